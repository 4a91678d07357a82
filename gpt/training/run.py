"""The interface between the loop and a way to train: the `Objective` protocol, and the `Run`.

The loop (`gpt.training.trainer`) knows no objective by name. `--objective NAME` picks one from the
registry (`get_objective`), and the objective answers every question the loop has about it:

    check(cfg)                   its own settings, before anything is written
    check_unused(cfg)            its settings given to a run of another objective: refused
    prepare(cfg, model, ...)     what it trains on, batched (loaders and, for records,
                                 `RecordData`),
                                 and what a step calls on a batch: `loss(*batch, chunk_size=...)`
    count(batches)               what a step's loss is the mean over (target tokens, pairs, ...)
    columns(cfg, data)           its metrics.csv columns
    evaluate(run)                one evaluation's measurements, by column
    describe_row(row)            the line printed for a metrics row
    best_line(best)              how the summary names the best validation score

and, as attributes, the names its plot gives the loss axis and an accuracy on the second axis.
Two members are optional (an objective without them keeps the defaults, `plot_panels` and
`may_be_best` below):

    plot_panels(columns)         columns loss.png draws below the losses; default none
    may_be_best(run, row)        whether an evaluation may become best/; default every one
`gpt.objectives` holds the built-in ones (cross-entropy and its variants, DPO) and registers them
when imported (`import gpt` does); an objective of one's own is a class with these methods, given to
`register`. Every objective's evaluate returns "train_loss" and "val_loss": early stopping and
best/ follow the validation loss, lower being better, among the evaluations `may_be_best` lets in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from gpt.data.buckets import BucketBatchSampler
from gpt.data.windows import ResumableSampler
from gpt.eval.tasks import EvalTask
from gpt.model.config import ConfigError
from gpt.model.model import GPT
from gpt.training.distributed import Dist
from gpt.training.metrics import MetricsLog
from gpt.training.record_data import RecordData
from gpt.training.train_state import TrainState

if TYPE_CHECKING:
    from gpt.checkpoints.saver import CheckpointSaver
    from gpt.training.run_dir import RunLock
    from gpt.training.settings import TrainConfig
    from gpt.training.tb import TensorBoardLog

@dataclass
class Prepared:
    """What an objective prepares for a run (`Objective.prepare`)."""

    train_loader: DataLoader[Any]
    eval_loaders: dict[str, DataLoader[Any]]
    """"train" and "val": the same batches at every evaluation."""
    records: RecordData | None
    """A run on records' template, validation records and datasets; None for text."""
    loss: Callable[..., Tensor]
    """What each micro-batch's step calls, `loss(*batch, chunk_size=cfg.loss_chunk)`: its mean loss,
    through the model's forward (so that DDP and FSDP see it)."""
    start: dict[str, float] = field(default_factory=dict)
    """Measurements of the model training starts from that the objective compares later
    evaluations with (its `may_be_best`); the same on every rank."""


class Objective(Protocol):
    """One way to train: what the loop asks of it (see the module docstring)."""

    name: str
    """The value of --objective that selects it."""
    loss_name: str
    """The loss axis of loss.png ("cross-entropy loss", "DPO loss")."""

    def check(self, cfg: TrainConfig) -> None:
        """Raise `ConfigError` for a setting of `cfg` this objective cannot train with."""

    def check_unused(self, cfg: TrainConfig) -> None:
        """Raise `ConfigError` if `cfg` (a run of another objective) sets one of this one's
        settings."""

    def prepare(self, cfg: TrainConfig, model: GPT, context_length: int,
                token_ids: tuple[np.ndarray, np.ndarray] | None, *, dist: Dist, dtype: torch.dtype,
                compile: bool) -> Prepared:
        """The run's loaders and loss (compiled with `compile`), in windows or records of at most
        `context_length` tokens; `token_ids` = (train, val) arrays replace a text run's --data.
        Whatever may fail (a teacher, a reference) is loaded before a file is written."""

    def count(self, batches: Iterable[Sequence[Tensor]]) -> int:
        """What a step's loss is the mean over, in `batches` (counted on the host)."""

    def columns(self, cfg: TrainConfig, records: RecordData | None) -> tuple[str, ...]:
        """The run's metrics.csv columns (`gpt.training.metrics.columns`)."""

    def evaluate(self, run: Run) -> dict[str, float]:
        """One evaluation, by column: "train_loss", "val_loss" and the objective's own."""

    def accuracy_column(self, columns: Sequence[str]) -> str | None:
        """The column loss.png draws on a second axis (an accuracy in [0, 1]), or None."""

    def describe_row(self, row: dict[str, float]) -> str:
        """One evaluation's row as the line printed during training."""

    def best_line(self, best: float) -> str:
        """The best validation score in words, for the summary ("loss 1.2345 (perplexity 3.4)")."""


def plot_panels(objective: Objective, columns: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """The columns loss.png draws in panels below the losses, by the panel's axis label: the
    objective's optional `plot_panels(columns)` ({"log-probability": ("val_chosen_logp", ...)}),
    else none."""
    panels: Callable[[Sequence[str]], dict[str, tuple[str, ...]]] | None = getattr(
        objective, "plot_panels", None)
    return panels(columns) if panels else {}


def may_be_best(objective: Objective, run: Run, row: dict[str, float]) -> bool:
    """Whether the evaluation `row` may become best/ when its validation loss is the lowest: the
    objective's optional `may_be_best(run, row)` (a guard against a loss that improves while the
    model gets worse), else True. An evaluation kept out counts as one without improvement, for
    early stopping too."""
    guard: Callable[[Run, dict[str, float]], bool] | None = getattr(objective, "may_be_best", None)
    return guard(run, row) if guard else True


OBJECTIVES: dict[str, Objective] = {}
"""The registered objectives by name, in the order of registration (`--objective`'s choices)."""


def register(objective: Objective) -> Objective:
    """Make `objective` selectable as --objective NAME; returns it."""
    OBJECTIVES[objective.name] = objective
    return objective


def get_objective(name: str) -> Objective:
    """The registered objective called `name`; `ConfigError` naming the choices if there is none."""
    if name not in OBJECTIVES:
        raise ConfigError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {name!r}; "
                          f"e.g. --objective {list(OBJECTIVES)[-1]}")
    return OBJECTIVES[name]


@dataclass
class Run:
    """Everything `fit` works on, as `gpt.training.trainer.setup` built it."""

    cfg: TrainConfig
    run_dir: Path
    model: GPT
    objective: Objective
    """What training minimises (--objective): its loss, evaluation, metrics and summary."""
    loss: Callable[..., Tensor]
    """What the training steps call: the objective's loss of a batch's tensors, compiled with
    `--compile`; under torchrun through DDP, or with the model sharded (`Dist.wrap`)."""
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    """Loss scaling for float16 (a no-op when disabled, i.e. for every other dtype)."""
    train_loader: DataLoader[Any]
    eval_loaders: dict[str, DataLoader[Any]]
    """"train" and "val": the same `eval_iters` batches at every evaluation."""
    device: torch.device
    dtype: torch.dtype
    total_steps: int
    tokens_per_epoch: int
    metrics: MetricsLog
    """metrics.csv: one row per evaluation (loss.png is drawn from it)."""
    # writes last/ and best/ (in a thread with `async_save`); `fit` waits for it
    saver: CheckpointSaver
    lock: RunLock
    """This process's lock on `run_dir`, released when `fit` ends."""
    state: TrainState = field(default_factory=TrainState)
    tasks: list[EvalTask] = field(default_factory=list)
    """The benchmark tasks scored at every evaluation (--eval-task), each its own column."""
    records: RecordData | None = None
    """A run on records' template, validation records and datasets (`gpt.training.record_data`);
    None for text."""
    # this rank among torchrun's (`gpt.training.distributed`)
    dist: Dist = field(default_factory=Dist)
    tensorboard: TensorBoardLog | None = None
    """With `--tensorboard`: each metrics row also goes to the run directory's event files."""
    start: dict[str, float] = field(default_factory=dict)
    """The objective's measurements of the starting model (`Prepared.start`)."""
    last_saved: int = -1  # the step of the latest last/ (`save_freq` may skip evaluations)
    lora: dict[str, Any] | None = None
    """With --lora-rank: the adapters' settings and base, written as every checkpoint's lora.json
    (`gpt.checkpoints.lora`)."""

    @property
    def windows(self) -> Any:
        """The training windows (or records, or pairs): the dataset `train_loader` draws from."""
        return self.train_loader.dataset

    @property
    def sampler(self) -> ResumableSampler | BucketBatchSampler:
        """`train_loader`'s sampler (of batches, for records), whose position a checkpoint saves."""
        batches, windows = self.train_loader.batch_sampler, self.train_loader.sampler
        return batches if isinstance(batches, BucketBatchSampler) else cast(ResumableSampler,
                                                                            windows)
