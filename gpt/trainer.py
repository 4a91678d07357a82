"""Pretraining, as a few plain functions to read top-down:

    train(cfg)                     setup + fit
      setup(cfg)                   seed, model, data, loaders, optimizer; a resumed run's state restored
      fit(run)                     epochs x steps until done, early stopping or Ctrl-C
        train_step(run, batches)   zero grads, forward, loss, backward, clip, check finite, step
        evaluate(run, ...)         train/val loss, early stopping, metrics.csv, checkpoints, loss.png

`TrainConfig` holds every setting (one docstring each, which is also the `--help` of `train.py`); the
learning rate is a pure function of the step (`lr_at`). A run directory `runs/<name>/` holds
`train_config.json`, `metrics.csv`, `loss.png`, and the checkpoints `last/` (every evaluation) and
`best/` (lowest validation loss), each `model.safetensors` + `config.json` + `train_state.pt`.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import csv
import dataclasses
import inspect
import itertools
import math
import random
import signal
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, cast, get_args, get_type_hints

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from gpt.atomic import resolve_directory, write_json
from gpt.checkpoint import (
    TRAIN_STATE_FILE,
    WEIGHTS_FILE,
    load_model,
    load_train_state,
    save_checkpoint,
)
from gpt.config import ConfigError, GPTConfig, preset_names
from gpt.data import ERRORS_MODES, ResumableSampler, SlidingWindowDataset, create_dataloader, prepare_data
from gpt.device import DTYPES, autocast, keep_freed_memory, pick_device, training_dtype
from gpt.errors import UserError
from gpt.loss import evaluate_loss, head_loss, perplexity
from gpt.model import GPT
from gpt.plot import plot_losses
from gpt.sampling import generate
from gpt.tokenizer import ENDOFTEXT, get_tokenizer

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# GPT-3's (and nanoGPT's) betas: a beta2 of 0.95 forgets old gradient scales faster than the default
# 0.999, which keeps Adam's steps stable with the high learning rates small models train well at.
ADAM_BETAS = (0.9, 0.95)
MODEL_OVERRIDES = ("n_layers", "emb_dim", "n_heads", "drop_rate", "vocab_pad_multiple")
# What a resumed run must keep: these fix the model, the training windows and their order, so the
# checkpoint's weights, optimizer state and data-loader position still mean what they meant.
RESUME_FIXED = ("data", "val_data", "val_fraction", "errors", "preset", "init", *MODEL_OVERRIDES,
                "context_length", "stride", "batch_size", "grad_accum", "seed")
METRICS_FILE = "metrics.csv"
METRICS_COLUMNS = ("step", "epoch", "tokens_seen", "train_loss", "val_loss", "val_perplexity", "lr",
                   "grad_norm", "tokens_per_s")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# ---- configuration ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run. `python train.py --help` shows these docstrings."""

    # data
    data: str = "default"
    """Training text: a corpus name (default: Python's help topics, offline; the-verdict;
    tinyshakespeare), a text file, a directory of .txt files, a glob, or hf:NAME[:CONFIG]:SPLIT."""
    val_data: str | None = None
    """Validation text (same forms as --data); without it the last --val-fraction of --data is held out."""
    val_fraction: float = 0.1
    """Fraction of --data (its end) held out for validation when --val-data is not given."""
    errors: str = "strict"
    """What to do with bytes that are not UTF-8: strict (refuse the file) or replace (with U+FFFD)."""
    data_dir: str = "data"
    """Where downloaded corpora and token caches are kept."""

    # model
    preset: str = "mini"
    """Model size for --init scratch: mini (4 layers, 256 wide, 4 heads, context 256), tiny,
    gpt2-small/medium/large/xl (alias gpt2)."""
    init: str = "scratch"
    """scratch (random weights of --preset), or GPT-2 weights to start from: gpt2, gpt2-medium, ...,
    a Hugging Face directory or file, or a checkpoint directory of an earlier run (runs/NAME/best)."""
    n_layers: int | None = None
    """Transformer blocks (overrides the preset)."""
    emb_dim: int | None = None
    """Embedding width (overrides the preset)."""
    n_heads: int | None = None
    """Attention heads; must divide --emb-dim (overrides the preset)."""
    drop_rate: float | None = None
    """Dropout probability (overrides the preset's: 0 for mini, 0.1 for the others)."""
    vocab_pad_multiple: int | None = None
    """Pad the embedding table and LM head to a multiple of this many rows (overrides the preset's:
    64 for mini, 1 for the others); same results, faster matmuls (see BENCHMARKS.md)."""
    context_length: int | None = None
    """Tokens per training window; at most the model's context length, which is also the default
    (256 for mini, 1024 for GPT-2)."""
    stride: int | None = None
    """Distance between the starts of consecutive training windows; default --context-length (no
    overlap). A smaller stride gives more, overlapping windows per epoch."""

    # optimisation
    batch_size: int = 8
    """Windows per micro-batch."""
    grad_accum: int = 1
    """Micro-batches whose gradients add up to one optimizer step (effective batch = batch_size x this)."""
    epochs: int = 3
    """Passes over the training windows."""
    max_steps: int = 0
    """Stop after this many optimizer steps even if epochs remain (the LR schedule ends there too);
    0 = no limit, train all --epochs."""
    lr: float = 2e-3
    """Peak learning rate, reached at the end of the warm-up."""
    min_lr: float = 2e-4
    """Learning rate at the end of the cosine decay (the floor)."""
    warmup_steps: int = 10
    """Optimizer steps of linear warm-up from ~0 to --lr."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices (embeddings included) but not to biases or LayerNorms."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables clipping)."""

    # evaluation, early stopping, logging
    eval_freq: int = 20
    """Evaluate, log and save last/ every this many optimizer steps (and at the end)."""
    eval_iters: int = 2
    """Batches of training and of validation data the losses are averaged over at each evaluation
    (spread evenly over each split; the same batches every time)."""
    patience: int = 5
    """Stop after this many evaluations without a validation-loss improvement (0 disables)."""
    min_delta: float = 0.0
    """How much lower the validation loss must be than the best so far to count as an improvement."""
    sample_prompt: str = "Every effort moves you"
    """Start of the text sampled after each epoch and at the end."""
    sample_tokens: int = 30
    """Tokens to sample after each epoch and at the end (0 disables sampling)."""
    log_scale: bool = False
    """Draw loss.png with a logarithmic loss axis."""

    # system
    dtype: str = "auto"
    """Autocast precision: auto (bfloat16 where the hardware has it, else float16 on CUDA, else
    float32), float32, bfloat16 or float16 (CUDA only). Weights stay float32 either way."""
    compile: bool = False
    """Compile the model with torch.compile (a slow first step; measured no faster on a CPU, see
    BENCHMARKS.md)."""
    loss_chunk: int = 0
    """Run the LM head and the loss this many positions at a time, never holding a whole batch of
    logits (less memory; 0 = the whole batch at once, measured faster on a CPU: BENCHMARKS.md)."""
    keep_freed_memory: bool = True
    """Linux: keep freed memory in the process for reuse instead of handing it back to the kernel
    after every step (2.6x faster steps on a CPU, see BENCHMARKS.md; no effect on a GPU's memory).
    A setting of the whole process (glibc's mallopt), not undone when training ends."""
    device: str = "auto"
    """auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps."""
    seed: int = 123
    """Seed of every random number generator (init, dropout, data order)."""
    out: str = "runs"
    """Directory that holds the run directories."""
    run_name: str | None = None
    """Name of this run's directory under --out; default the start time, e.g. 20250101-120000."""

    def __post_init__(self) -> None:
        self._check_types()

        def need(ok: bool, name: str, what: str, example: Any) -> None:
            if not ok:
                raise ConfigError(f"{_flag(name)} must be {what}, got {getattr(self, name)!r}; "
                                  f"e.g. {_flag(name)} {example}")

        for name in ("batch_size", "grad_accum", "epochs", "eval_freq", "eval_iters"):
            need(getattr(self, name) >= 1, name, "at least 1", getattr(TrainConfig, name))
        for name in ("context_length", "stride", "n_layers", "emb_dim", "n_heads", "vocab_pad_multiple"):
            need(getattr(self, name) is None or getattr(self, name) >= 1, name, "at least 1", 256)
        need(self.lr > 0 and math.isfinite(self.lr), "lr", "a positive number", 1e-3)
        need(0 <= self.min_lr <= self.lr, "min_lr", f"between 0 and --lr ({self.lr:g})", self.lr / 10)
        for name in ("max_steps", "warmup_steps", "weight_decay", "grad_clip", "patience", "min_delta",
                     "sample_tokens", "loss_chunk"):
            need(getattr(self, name) >= 0, name, "0 or more", getattr(TrainConfig, name))
        need(0 < self.val_fraction < 1, "val_fraction", "between 0 and 1", 0.1)
        need(self.drop_rate is None or 0 <= self.drop_rate < 1, "drop_rate", "in [0, 1)", 0.1)
        need(self.errors in ERRORS_MODES, "errors", f"one of {', '.join(ERRORS_MODES)}", "replace")
        need(self.dtype == "auto" or self.dtype in DTYPES, "dtype", f"auto or one of {', '.join(DTYPES)}",
             "float32")
        need(self.init != "scratch" or self.preset in preset_names(), "preset",
             f"one of {', '.join(preset_names())}", "mini")
        need(self.sample_tokens == 0 or self.sample_prompt != "", "sample_prompt",
             "some text (or use --sample-tokens 0)", '"Every effort moves you"')

    def _check_types(self) -> None:
        """Values from a TOML file or Python are not parsed by argparse: check each field's type."""
        hints = get_type_hints(TrainConfig)
        for f in dataclasses.fields(self):
            value, allowed = getattr(self, f.name), get_args(hints[f.name]) or (hints[f.name],)
            ok = isinstance(value, allowed) and (bool in allowed or not isinstance(value, bool))
            if float in allowed:  # an integer is a fine float (lr = 1 in TOML)
                ok = ok or (isinstance(value, int) and not isinstance(value, bool))
            if not ok:
                names = " or ".join("none" if t is type(None) else t.__name__ for t in allowed)
                raise ConfigError(f"{_flag(f.name)} must be {names}, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a dict (a TOML file, a saved run); unknown keys are an error, not ignored."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
        return cls(**data)


# ---- the pieces: seeds, precision, learning rate, optimizer -----------------------------------


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (torch.manual_seed seeds every GPU too)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every global generator's state, as tensors and plain values (safe to load weights-only)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": pos,
                       "has_gauss": has_gauss, "gauss": gauss}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then cosine decay to `min_lr`.

        step < warmup_steps:   lr * (step + 1) / warmup_steps
        then, until total:     min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2,
                               p = (step - warmup_steps) / (total_steps - warmup_steps)
        step >= total_steps:   min_lr
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: weight decay on every matrix (>= 2-D), none on vectors.

    Vectors are biases and LayerNorm gains/shifts: decaying them pulls shifts and scales towards 0,
    which only hurts. The embedding tables are matrices and *do* decay, as in GPT-2 and nanoGPT: with
    tied embeddings the token embedding is also the output layer's weight, the largest matrix of a
    small model; the position embedding follows the same rule. A tied tensor is listed once.
    """
    params = [p for p in model.parameters() if p.requires_grad]  # parameters() yields shared ones once
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def build_model(cfg: TrainConfig) -> GPT:
    """A fresh model: the preset's random init, or published/earlier weights for `--init`."""
    overrides = {name: getattr(cfg, name) for name in MODEL_OVERRIDES if getattr(cfg, name) is not None}
    if cfg.init == "scratch":
        return GPT(GPTConfig.preset(cfg.preset, **overrides))
    from gpt.weights import load_pretrained  # here: only --init needs the hub and format readers

    return load_pretrained(cfg.init, **overrides)


# ---- setup ------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """The loop's counters; saved in every checkpoint so that a resumed run continues exactly."""

    step: int = 0
    """Optimizer steps taken."""
    tokens_seen: int = 0
    """Input tokens trained on so far."""
    best_val_loss: float = math.inf
    """Lowest validation loss so far (improvements smaller than min_delta do not count)."""
    best_step: int = 0
    """The step at which `best_val_loss` was measured (the weights in best/)."""
    evals_since_best: int = 0
    """Evaluations in a row without an improvement: the early-stopping counter."""


@dataclass
class Run:
    """Everything `fit` works on, as `setup` built it."""

    cfg: TrainConfig
    run_dir: Path
    model: GPT
    hidden_states: Callable[[Tensor], Tensor]
    """What the training steps call: `model.hidden_states`, or its torch.compile wrapper."""
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    """Loss scaling for float16 (a no-op when disabled, i.e. for every other dtype)."""
    train_loader: DataLoader[tuple[Tensor, Tensor]]
    eval_loaders: dict[str, DataLoader[tuple[Tensor, Tensor]]]
    """"train" and "val": the same `eval_iters` batches at every evaluation (see `_eval_loader`)."""
    device: torch.device
    dtype: torch.dtype
    total_steps: int
    tokens_per_epoch: int
    state: TrainState = field(default_factory=TrainState)
    history: list[dict[str, float]] = field(default_factory=list)
    """One row of metrics per evaluation (what metrics.csv holds, and loss.png draws)."""

    @property
    def windows(self) -> SlidingWindowDataset:
        """The training windows: the dataset `train_loader` draws from."""
        return cast(SlidingWindowDataset, self.train_loader.dataset)

    @property
    def sampler(self) -> ResumableSampler:
        """`train_loader`'s sampler, whose position in the epoch a checkpoint saves."""
        return cast(ResumableSampler, self.train_loader.sampler)


def setup(cfg: TrainConfig, *, resume: Path | None = None,
          token_ids: tuple[np.ndarray, np.ndarray] | None = None) -> Run:
    """Build the run: seed, model, data, loaders, optimizer, run directory.

    `resume` (a run directory, or a checkpoint directory in one) continues a run where that checkpoint
    was taken; `cfg` must then agree with the run's settings on `RESUME_FIXED` (see `resume_config`).
    `token_ids` = (train, val) arrays replace `prepare_data(cfg.data, ...)`.
    """
    checkpoint: Path | None = None  # the checkpoint resumed from, and its training state
    saved: dict[str, Any] = {}
    if resume is not None:
        checkpoint = find_resume_checkpoint(Path(resume))
        saved = load_train_state(checkpoint)
        _check_resume_settings(cfg, saved, checkpoint)
        run_dir = checkpoint.parent
    else:
        run_dir = new_run_dir(cfg)
    cfg = dataclasses.replace(cfg, out=str(run_dir.parent), run_name=run_dir.name)
    device = pick_device(cfg.device)
    dtype = training_dtype(cfg.dtype, device)
    if cfg.keep_freed_memory:
        keep_freed_memory()

    seed_everything(cfg.seed)
    model = load_model(checkpoint, device) if checkpoint else build_model(cfg).to(device)
    model.train()
    model_context = model.config.context_length
    context_length = cfg.context_length or model_context
    if context_length > model_context:
        raise UserError(f"--context-length {context_length} exceeds the model's context length "
                        f"{model_context}; use --context-length {model_context} or less")

    train_ids, val_ids = token_ids if token_ids is not None else prepare_data(
        cfg.data, cfg.val_data, val_fraction=cfg.val_fraction, context_length=context_length,
        data_dir=Path(cfg.data_dir), errors=cfg.errors)
    train_loader = create_dataloader(train_ids, cfg.batch_size, context_length,
                                     cfg.stride or context_length, shuffle=True, seed=cfg.seed)
    # A DataLoader draws a seed for its workers from the *global* torch generator each time it is
    # iterated; with its own generator it leaves the global one (dropout's) alone, so the dropout
    # masks do not depend on where a run was stopped and resumed.
    train_loader.generator = torch.Generator()
    windows = len(cast(SlidingWindowDataset, train_loader.dataset))
    batches_per_epoch = windows // cfg.batch_size
    if batches_per_epoch == 0:
        raise UserError(f"the training data has {windows} windows of {context_length} "
                        f"tokens, fewer than one batch of {cfg.batch_size}; lower --batch-size, "
                        "--context-length or --stride, or use more text")
    eval_loaders = {name: _eval_loader(ids, cfg.batch_size, context_length, cfg.eval_iters)
                    for name, ids in (("train", train_ids), ("val", val_ids))}

    # The fused kernel updates a tensor in one pass instead of ~10: on CPU 7x faster than the default
    # loop for the mini model (16 ms a step instead of 120 ms, measured on one core).
    fused = True if device.type in ("cpu", "cuda") else None
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=ADAM_BETAS,
                                  fused=fused)
    steps = math.ceil(batches_per_epoch / cfg.grad_accum) * cfg.epochs
    run = Run(
        cfg=cfg, run_dir=run_dir, model=model,
        hidden_states=torch.compile(model.hidden_states) if cfg.compile else model.hidden_states,
        optimizer=optimizer, scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
        train_loader=train_loader, eval_loaders=eval_loaders, device=device, dtype=dtype,
        total_steps=min(steps, cfg.max_steps or steps),
        tokens_per_epoch=batches_per_epoch * cfg.batch_size * context_length,
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "train_config.json", cfg.to_dict())
    if checkpoint is not None:
        restore(run, saved, checkpoint)  # last: it also sets the random generators
    return run


def _eval_loader(token_ids: np.ndarray, batch_size: int, context_length: int, batches: int,
                 ) -> DataLoader[tuple[Tensor, Tensor]]:
    """`batches` batches of non-overlapping windows spread evenly over the split (or all of its
    windows, if fewer): every evaluation reads the same windows, from the whole text, not its start."""
    dataset = SlidingWindowDataset(token_ids, context_length, context_length)
    if len(dataset) == 0:
        raise UserError(f"{len(token_ids)} tokens make no window of {context_length} + 1 tokens to "
                        "evaluate on; use more text or a smaller --context-length")
    count = min(len(dataset), batches * batch_size)
    picks = np.linspace(0, len(dataset) - 1, count).round().astype(int).tolist()  # distinct: step >= 1
    # Its own generator, as for the training loader (see setup).
    return DataLoader(Subset(dataset, picks), batch_size=batch_size, generator=torch.Generator())


def new_run_dir(cfg: TrainConfig) -> Path:
    """`out/run_name` (default name: the start time), which must not hold a run already."""
    run_dir = Path(cfg.out) / (cfg.run_name or time.strftime("%Y%m%d-%H%M%S"))
    if run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"{run_dir} already holds a run; continue it with --resume {run_dir}, or pick "
                        "another --run-name")
    return run_dir


# ---- the loop ---------------------------------------------------------------------------------


@dataclass
class StepStats:
    """What one optimizer step reports."""

    loss: float
    grad_norm: float
    lr: float
    tokens: int


@dataclass
class TrainResult:
    """How a run ended."""

    run_dir: Path
    stop_reason: str
    """done (all steps), early_stop (patience ran out) or interrupted (Ctrl-C; last/ saved)."""
    step: int
    best_step: int
    best_val_loss: float
    step_losses: dict[int, float]
    """Training loss of every step taken in this call, by step number (1 = the first step)."""


class TrainingDiverged(UserError):
    """The loss or the gradient norm stopped being finite."""


def train(cfg: TrainConfig, *, resume: Path | None = None,
          token_ids: tuple[np.ndarray, np.ndarray] | None = None) -> TrainResult:
    """Train a GPT as `cfg` says (see `setup` for `resume` and `token_ids`)."""
    return fit(setup(cfg, resume=resume, token_ids=token_ids))


def fit(run: Run) -> TrainResult:
    """Train until all steps are done, early stopping fires, or Ctrl-C; see the module docstring."""
    cfg, state = run.cfg, run.state
    _print_header(run)
    stop: str | None = None
    step_losses: dict[int, float] = {}
    window_tokens, window_seconds = 0, 0.0  # for tokens/s: training time only, not evaluation
    bar = tqdm(total=run.total_steps, initial=state.step, unit="step", disable=None, dynamic_ncols=True)
    with bar, ctrl_c_flag() as interrupted:
        if state.step == 0:  # the untrained model's losses: where the curves start
            evaluate(run)
        saved_step = state.step
        while stop is None:
            if state.step >= run.total_steps:
                stop = "done"
                break
            epoch = run.sampler.epoch
            for batches in micro_batch_groups(run.train_loader, cfg.grad_accum):
                started = time.perf_counter()
                stats = train_step(run, batches)
                window_seconds += time.perf_counter() - started
                window_tokens += stats.tokens
                step_losses[state.step] = stats.loss
                if state.step % cfg.eval_freq == 0 or state.step == run.total_steps:
                    if evaluate(run, stats, window_tokens / window_seconds):
                        stop = "early_stop"
                    saved_step, window_tokens, window_seconds = state.step, 0, 0.0
                val = run.history[-1]["val_loss"] if run.history else math.nan
                bar.set_postfix(loss=f"{stats.loss:.3f}", val=f"{val:.3f}", lr=f"{stats.lr:.1e}",
                                refresh=False)
                bar.update()
                if stop is None and state.step >= run.total_steps:
                    stop = "done"
                if stop is None and interrupted():
                    stop = "interrupted"
                if stop is not None:
                    break
            else:
                _print_sample(run, f"after epoch {epoch + 1}")
        if stop == "interrupted" and saved_step != state.step:
            save_checkpoint(run.model, checkpoint_state(run), run.run_dir / "last")
    if stop != "interrupted":
        _print_sample(run, "at the end")
    best = state.best_val_loss
    print(f"best validation loss {best:.4f} (perplexity {perplexity(best):.1f}) at step {state.best_step}: "
          f"weights in {run.run_dir / 'best'}")
    if stop == "early_stop":
        print(f"stopped early at step {state.step}: {cfg.patience} evaluations without improvement")
    if stop == "interrupted":
        print(f"interrupted at step {state.step}; {run.run_dir / 'last'} is saved; continue with: "
              f"python train.py --resume {run.run_dir}")
    return TrainResult(run.run_dir, stop, state.step, state.best_step, state.best_val_loss, step_losses)


def micro_batch_groups(loader: Iterable[tuple[Tensor, Tensor]], size: int,
                       ) -> Iterator[list[tuple[Tensor, Tensor]]]:
    """The loader's batches in groups of `size` (one optimizer step each); the last may be smaller."""
    group: list[tuple[Tensor, Tensor]] = []
    for batch in loader:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def train_step(run: Run, batches: list[tuple[Tensor, Tensor]]) -> StepStats:
    """One optimizer step over `batches` (gradient accumulation): zero grads, then per micro-batch
    forward + loss + backward, then clip the gradient norm and step. Raises `TrainingDiverged`
    before the weights change if the loss or the gradient norm is not finite."""
    cfg, state = run.cfg, run.state
    lr = lr_at(state.step, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps,
               total_steps=run.total_steps)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.optimizer.zero_grad(set_to_none=True)
    total_loss = torch.zeros((), device=run.device)
    tokens = 0
    for x, y in batches:
        x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
        with autocast(run.device, run.dtype):
            # Divided by the number of micro-batches, the summed gradients are those of their mean loss.
            hidden = run.hidden_states(x)  # (B, T, C): the model up to its LM head
            loss = head_loss(hidden, run.model.lm_head.weight, y, cfg.loss_chunk,
                             run.model.config.vocab_size) / len(batches)
        run.scaler.scale(loss).backward()
        total_loss += loss.detach()
        tokens += x.numel()
    run.scaler.unscale_(run.optimizer)  # clip (and report) the true gradient, not the scaled one
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip or math.inf)
    loss_value, norm_value = total_loss.item(), grad_norm.item()
    checks = [("loss", loss_value)]
    if not run.scaler.is_enabled():  # with float16 an infinite gradient is routine: the scaler skips
        checks.append(("gradient norm", norm_value))  # that step and lowers its scale
    for what, value in checks:
        if not math.isfinite(value):
            raise TrainingDiverged(
                f"the {what} is {value} at step {state.step + 1}: training stopped before that step "
                f"changed the weights, and {run.run_dir / 'last'} holds the last good checkpoint; "
                "lower --lr, keep --grad-clip on, or use --dtype float32")
    run.scaler.step(run.optimizer)
    run.scaler.update()
    state.step += 1
    state.tokens_seen += tokens
    return StepStats(loss_value, norm_value, lr, tokens)


def estimate_losses(run: Run) -> tuple[float, float]:
    """(train, validation) loss, each averaged over its `eval_iters` evaluation batches."""
    train_loss, val_loss = (evaluate_loss(run.model, run.eval_loaders[name], dtype=run.dtype)
                            for name in ("train", "val"))
    return train_loss, val_loss


def evaluate(run: Run, stats: StepStats | None = None, tokens_per_s: float = math.nan) -> bool:
    """Measure, keep score for early stopping, log, checkpoint and plot; True if it is time to stop.

    last/ is saved at every evaluation and best/ whenever the validation loss improves, each one
    atomically (see gpt/checkpoint.py), so a kill at any moment leaves the previous one whole.
    """
    cfg, state = run.cfg, run.state
    train_loss, val_loss = estimate_losses(run)
    improved = val_loss < state.best_val_loss - cfg.min_delta
    if improved:
        state.best_val_loss, state.best_step, state.evals_since_best = val_loss, state.step, 0
    else:
        state.evals_since_best += 1
    row = {"step": state.step, "epoch": state.tokens_seen / run.tokens_per_epoch,
           "tokens_seen": state.tokens_seen, "train_loss": train_loss, "val_loss": val_loss,
           "val_perplexity": perplexity(val_loss), "lr": stats.lr if stats else math.nan,
           "grad_norm": stats.grad_norm if stats else math.nan, "tokens_per_s": tokens_per_s}
    run.history.append(row)
    append_metrics(run.run_dir / METRICS_FILE, row)
    save_checkpoint(run.model, checkpoint_state(run), run.run_dir / "last")
    if improved:
        save_checkpoint(run.model, checkpoint_state(run), run.run_dir / "best")
    best_index = max((i for i, r in enumerate(run.history) if r["step"] == state.best_step), default=None)
    plot_losses([r["epoch"] for r in run.history], [r["train_loss"] for r in run.history],
                [r["val_loss"] for r in run.history], run.run_dir / "loss.png",
                tokens_per_epoch=run.tokens_per_epoch, best_index=best_index, log_scale=cfg.log_scale,
                title=f"{run.run_dir.name}: {run.model.num_parameters() / 1e6:.1f}M parameters")
    tqdm.write(_format_row(row) + ("  (best)" if improved else ""))
    return cfg.patience > 0 and state.evals_since_best >= cfg.patience


def sample_text(run: Run) -> str:
    """`sample_prompt` and `sample_tokens` tokens after it, drawn from the top 40 at temperature 1.

    The draws come from a generator of their own, seeded with the run's seed: sampling never touches
    the global random stream that dropout uses, so a run trains the same with or without samples, and
    each sample differs from the last only because the model did.
    """
    tokenizer = get_tokenizer()
    prompt = tokenizer.encode(run.cfg.sample_prompt, allowed_special={ENDOFTEXT})
    idx = torch.tensor([prompt], device=run.device)
    generator = torch.Generator(run.device).manual_seed(run.cfg.seed)
    with autocast(run.device, run.dtype):
        out = generate(run.model, idx, run.cfg.sample_tokens, temperature=1.0, top_k=40, generator=generator)
    return tokenizer.decode(out[0].tolist())


def _print_sample(run: Run, when: str) -> None:
    if run.cfg.sample_tokens > 0:
        tqdm.write(f"sample {when}: " + sample_text(run).replace("\n", " "))


def _print_header(run: Run) -> None:
    cfg, windows = run.cfg, len(run.windows)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * run.windows.context_length
    print(f"{run.model.num_parameters() / 1e6:.1f}M parameters on {run.device} "
          f"({str(run.dtype).removeprefix('torch.')}); {windows} training windows, "
          f"{run.total_steps} steps of {tokens_per_step} tokens, step {run.state.step} now; "
          f"run directory {run.run_dir}")


def _format_row(row: dict[str, float]) -> str:
    parts = [f"step {row['step']:>5}", f"epoch {row['epoch']:.2f}", f"tokens {row['tokens_seen']:,}",
             f"train {row['train_loss']:.3f}", f"val {row['val_loss']:.3f} (ppl {row['val_perplexity']:.1f})"]
    if not math.isnan(row["lr"]):  # the evaluation before the first step has no step to report on
        parts += [f"lr {row['lr']:.2e}", f"grad norm {row['grad_norm']:.2f}",
                  f"{row['tokens_per_s']:,.0f} tok/s"]
    return " | ".join(parts)


@contextlib.contextmanager
def ctrl_c_flag() -> Iterator[Callable[[], bool]]:
    """Turn the first Ctrl-C into a flag the loop reads between steps; the second interrupts at once.

    Stopping between steps, never inside one, is what makes the checkpoint saved after a Ctrl-C
    consistent: no half-accumulated gradients, no half-updated optimizer. Yields `interrupted()`.
    """
    pressed = threading.Event()
    if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
        yield pressed.is_set
        return

    def handler(signum: int, frame: object) -> None:
        if pressed.is_set():
            raise KeyboardInterrupt
        pressed.set()
        tqdm.write("Ctrl-C: stopping after this step and saving last/ (press again to quit at once)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield pressed.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


# ---- checkpoints and resuming -----------------------------------------------------------------


def checkpoint_state(run: Run) -> dict[str, Any]:
    """Everything besides the weights that a resumed run needs to continue exactly."""
    return {
        "train_config": run.cfg.to_dict(),
        "state": dataclasses.asdict(run.state),
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(),
        "sampler": run.sampler.state_dict(),
        "num_windows": len(run.windows),
        "rng": rng_state(),
    }


def find_resume_checkpoint(path: Path) -> Path:
    """The checkpoint to resume for `--resume path`: path itself if it is one, else path/last."""
    if not path.is_dir():
        raise UserError(f"--resume {path}: no such run directory; give one such as runs/NAME")
    checkpoint = path if (path / TRAIN_STATE_FILE).is_file() else resolve_directory(path / "last")
    if not checkpoint.is_dir():
        raise UserError(f"--resume {path}: there is no {path / 'last'} checkpoint in it (an empty run "
                        "directory, or not one); start a new run instead")
    return checkpoint


def resume_config(path: Path) -> dict[str, Any]:
    """The settings of the run a `--resume path` continues (the base that flags then override)."""
    return load_train_state(find_resume_checkpoint(path))["train_config"]


def _check_resume_settings(cfg: TrainConfig, saved: dict[str, Any], checkpoint: Path) -> None:
    for name in RESUME_FIXED:
        if saved["train_config"].get(name) != getattr(cfg, name):
            raise UserError(
                f"--resume: {_flag(name)} {getattr(cfg, name)!r} differs from the run's "
                f"{saved['train_config'].get(name)!r} (in {checkpoint / TRAIN_STATE_FILE}); a resumed run "
                "keeps its model and data, so drop the flag or start a new run")


def restore(run: Run, saved: dict[str, Any], checkpoint: Path) -> None:
    """Put a resumed run back where `checkpoint` was taken (the weights are loaded already)."""
    where = checkpoint / TRAIN_STATE_FILE
    try:
        run.optimizer.load_state_dict(saved["optimizer"])
    except (ValueError, KeyError) as exc:
        raise UserError(f"{where}: its optimizer state does not fit the model in "
                        f"{checkpoint / WEIGHTS_FILE} ({exc}); resume from another checkpoint") from None
    for param in run.model.parameters():
        moment = run.optimizer.state.get(param, {}).get("exp_avg")
        if moment is not None and moment.shape != param.shape:
            raise UserError(f"{where}: its optimizer state has shape {tuple(moment.shape)} for a "
                            f"parameter of shape {tuple(param.shape)} in {checkpoint / WEIGHTS_FILE}; "
                            "resume from another checkpoint")
    run.optimizer.param_groups[0]["weight_decay"] = run.cfg.weight_decay  # a changed --weight-decay wins
    run.scaler.load_state_dict(saved["scaler"])
    windows = len(run.windows)
    if saved["num_windows"] != windows:
        raise UserError(f"the training data changed since {where} was written ({saved['num_windows']} "
                        f"windows then, {windows} now); resume with the same data, or start a new run")
    run.sampler.load_state_dict(saved["sampler"])
    run.state = TrainState(**saved["state"])
    run.history = read_metrics(run.run_dir / METRICS_FILE, up_to_step=run.state.step)
    set_rng_state(saved["rng"])


# ---- metrics.csv ------------------------------------------------------------------------------


def append_metrics(path: Path, row: dict[str, float]) -> None:
    """Add one evaluation's row to metrics.csv (with a header line if the file is new)."""
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRICS_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def read_metrics(path: Path, up_to_step: int) -> list[dict[str, float]]:
    """The rows of metrics.csv up to `up_to_step`; later ones are dropped from the file as well.

    Rows after the checkpoint a run resumes from were logged by steps that are now taken again.
    """
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    rows = [row for row in rows if row["step"] <= up_to_step]
    path.unlink()
    for row in rows:
        append_metrics(path, {**row, "step": int(row["step"]), "tokens_seen": int(row["tokens_seen"])})
    return rows


# ---- command line -----------------------------------------------------------------------------


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass `cls` (Python keeps none at runtime: read the source)."""
    body = cast(ast.ClassDef, ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]).body
    docs = {}
    for node, doc in itertools.pairwise(body):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)):
            docs[node.target.id] = " ".join(str(doc.value.value).split())
    return docs


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message}; see python train.py --help")


def build_parser() -> argparse.ArgumentParser:
    """`train.py`'s flags: --config, --resume, and one per `TrainConfig` field, documented by it.

    No flag has a default here (argparse.SUPPRESS), so the parsed namespace holds only the flags
    actually given: they override a --config file, which overrides a resumed run's settings.
    """
    parser = _ArgumentParser(
        prog="train.py", argument_default=argparse.SUPPRESS,
        description="Pretrain a GPT. With no flags: the mini model on the built-in corpus, a few minutes "
                    "on a laptop CPU; results in runs/<start time>/.")
    parser.add_argument("--config", type=Path, metavar="FILE.toml",
                        help="read settings from a TOML file, keys named as the flags (batch_size = 8); "
                             "flags given on the command line win")
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR",
                        help="continue the run in RUN_DIR (runs/NAME) exactly where its last/ checkpoint "
                             "was taken (or give RUN_DIR/best); its settings are reused, and flags that "
                             "do not change the model or data (--epochs, --lr, ...) override them")
    hints, docs = get_type_hints(TrainConfig), field_docs(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        kind = next(t for t in get_args(hints[f.name]) or (hints[f.name],) if t is not type(None))
        help_text = docs[f.name].replace("%", "%%") + ("" if f.default is None else f" [{f.default}]")
        if kind is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, help=help_text)
        else:
            metavar = {int: "N", float: "X", str: "TEXT"}[kind]
            parser.add_argument(_flag(f.name), type=kind, metavar=metavar, help=help_text)
    return parser


def read_toml(path: Path) -> dict[str, Any]:
    """The settings in a TOML file, keys as field names (`batch-size` is read as `batch_size`)."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise UserError(f"cannot read --config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"--config {path} is not valid TOML: {exc}") from None
    return {key.replace("-", "_"): value for key, value in data.items()}


def parse_args(argv: Sequence[str]) -> tuple[TrainConfig, Path | None]:
    """(settings, run to resume or None) from `train.py`'s command line.

    Later sources win: defaults < the resumed run's settings < the --config file < the flags given.
    """
    given = vars(build_parser().parse_args(argv))
    config_file, resume = given.pop("config", None), given.pop("resume", None)
    values: dict[str, Any] = {}
    if resume is not None:
        values.update(resume_config(resume))
    if config_file is not None:
        values.update(read_toml(config_file))
    values.update(given)
    return TrainConfig.from_dict(values), resume


def main(argv: Sequence[str] | None = None) -> None:
    """`python train.py ...`: parse, train; exit status 130 after Ctrl-C (with last/ saved)."""
    cfg, resume = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        result = train(cfg, resume=resume)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the loop started
        print("interrupted; nothing was saved after the last checkpoint", file=sys.stderr)
        raise SystemExit(130) from None
    if result.stop_reason == "interrupted":
        raise SystemExit(130)
