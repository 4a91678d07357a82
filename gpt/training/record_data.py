"""A run's data: text windows, or records split, encoded, and batched by length with a resumable
order.

`text_loaders` gives a run on text its loaders (`gpt.data.windows`). `record_loaders` is
`gpt.data.windows.build_loaders` for records: it reads --data (and --val-data, or holds out the
last --val-fraction of the records after a seeded shuffle), lays them out with the run's template
(`resolve_template`: kept from a fine-tuned --init), encodes them (`gpt.data.records`), and
returns the shuffled training loader and the fixed evaluation loaders; `dataset_loaders` does the
same for any encoded datasets (an objective's, such as DPO's pairs). Batches are padded to
their longest record, so `BucketBatchSampler` groups records of similar length: shuffle, sort
within chunks of `BUCKET_BATCHES` batches, cut into batches, shuffle the batches. Like
`gpt.data.windows.ResumableSampler` its order depends only on (seed, epoch) and it counts the
batches handed out, so a checkpoint resumes at exactly the next batch. Under torchrun its batches
are global ones of `batch_size x world_size` records, of which each rank takes its share
(`gpt.data.windows.rank_share`), so the ranks together train on the batches of one process with
`--batch-size batch_size x world_size`.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from gpt.base.errors import UserError
from gpt.checkpoints.checkpoint import find_model_checkpoint
from gpt.data.buckets import BucketBatchSampler
from gpt.data.records import InstructionDataset, Record, load_records, pad_collate
from gpt.data.windows import build_loaders, eval_picks, prepare_data
from gpt.model.tokenizer import get_tokenizer
from gpt.training.distributed import Dist
from gpt.training.resume import run_template

if TYPE_CHECKING:
    from gpt.training.settings import TrainConfig

@dataclass
class RecordData:
    """What the trainer keeps of a run on records besides its loaders."""

    template: str
    """The prompt template, resolved (a record kind's default when --prompt-template is not given).
    """
    val_records: list[Record]
    """The validation records that fit the context, for `gpt.eval.answers.val_exact_match` and the
    samples."""
    dropped: int
    """Training records left out: too long for a single response token in the context."""
    tokens_per_epoch: int
    """Input tokens of the first epoch's batches, padding included (others differ a little): the
    unit of the epoch column."""
    datasets: tuple[Any, Any]
    """The (training, validation) datasets the loaders read (an objective may compute with them,
    as DPO caches its reference's log-probabilities of the pairs)."""
    what: str = "records"
    """The training examples in words, for the run's first line ("preference pairs")."""
    rows_per_example: int = 1
    """Batch rows an example takes (a pair is two responses)."""

    def describe(self, kept: int, context_length: int) -> str:
        """The training records in words, for the run's first line."""
        return (f"{kept} training {self.what} ({self.dropped} dropped: no room for a response "
                f"token in {context_length}), prompt template {self.template!r}")


Batches = DataLoader[tuple[Tensor, Tensor]]
T = TypeVar("T")


def text_loaders(cfg: TrainConfig, context_length: int, token_ids: tuple[np.ndarray,
                                                                         np.ndarray] | None,
                 *, dist: Dist, pin_memory: bool = False) -> tuple[Batches, dict[str, Batches]]:
    """A run on text's loaders: `gpt.data.windows.prepare_data` of --data (or `token_ids` = (train,
    val) in its place), then `build_loaders`, which `pin_memory` is passed to (records are small,
    and their batches are padded as they come). Under torchrun (`dist`), this rank's slices."""
    train_ids, val_ids = token_ids if token_ids is not None else prepare_data(
        cfg.data, cfg.val_data, val_fraction=cfg.val_fraction, context_length=context_length,
        data_dir=Path(cfg.data_dir), errors=cfg.decode_errors)
    return build_loaders(train_ids, val_ids, batch_size=cfg.batch_size,
                         context_length=context_length,
                         stride=cfg.stride or context_length, eval_batches=cfg.eval_iters,
                         seed=cfg.seed,
                         pin_memory=pin_memory, rank=dist.rank, world_size=dist.world_size)


def split_records(data: str, val_data: str | None, val_fraction: float, seed: int,
                  load: Callable[[str], list[T]]) -> tuple[list[T], list[T]]:
    """(train, validation) records read by `load` (`load_records`, `load_pairs`): `val_data`'s, or
    the last `val_fraction` of `data`'s after a shuffle."""
    records = load(data)
    if val_data is not None:
        return records, load(val_data)
    records = records[:]
    random.Random(seed).shuffle(records)
    n_val = round(len(records) * val_fraction)
    if not 0 < n_val < len(records):
        raise UserError(f"{data} has {len(records)} records: --val-fraction {val_fraction:g} "
                        f"leaves {n_val} for validation and {len(records) - n_val} for training; "
                        f"each needs one, "
                        "so use more records, another --val-fraction, or --val-data")
    return records[:-n_val], records[-n_val:]


def init_template(init: str) -> str | None:
    """The prompt template of the fine-tuned run `init` (--init) names, or None: GPT-2 weights, a
    pretraining run, weights without a training state."""
    if init == "scratch" or not Path(init).is_dir():
        return None
    checkpoint = find_model_checkpoint(Path(init))
    return None if checkpoint is None else run_template(checkpoint)


def resolve_template(cfg: TrainConfig, first_kind: str, *, warn: bool = True) -> str:
    """The prompt template of a run on records: --prompt-template; else the template of the run
    --init was fine-tuned in (a model answers in the layout it learnt: switching it silently
    gives a model that seems to have forgotten); else the default of the first training record's
    kind (`first_kind`). With `warn`, one line names a template that differs from the --init
    run's."""
    inherited = init_template(cfg.init)
    template = cfg.prompt_template or inherited or first_kind
    if warn and inherited is not None and template != inherited:
        print(f"warning: --init {cfg.init} was fine-tuned with prompt template {inherited!r} and "
              f"this run lays its records out with {template!r} (--prompt-template); drop "
              f"--prompt-template "
              "to keep the model's", file=sys.stderr)
    return template


def record_loaders(cfg: TrainConfig, context_length: int, dist: Dist | None = None,
                   ) -> tuple[Batches, dict[str, Batches], RecordData]:
    """(training loader, {"train", "val"} evaluation loaders, `RecordData`) of a records run:
    --data, --val-data, --val-fraction, --prompt-template, --mask-prompt, --batch-size,
    --eval-iters, --seed.

    The template is `resolve_template`'s. Raises `UserError` if a split keeps no record that fits
    `context_length`. Under torchrun (`dist`), this rank's shares.
    """
    train, val = split_records(cfg.data, cfg.val_data, cfg.val_fraction, cfg.seed, load_records)
    template = resolve_template(cfg, train[0].kind, warn=dist is None or dist.is_main)
    tokenizer = get_tokenizer()
    datasets = {name: InstructionDataset(records, tokenizer, template, mask_prompt=cfg.mask_prompt,
                                         max_length=context_length)
                for name, records in (("train", train), ("val", val))}
    train_loader, eval_loaders, tokens = dataset_loaders(datasets, cfg, pad_collate, dist or Dist())
    records = RecordData(template, datasets["val"].records, datasets["train"].dropped, tokens,
                         (datasets["train"], datasets["val"]))
    return train_loader, eval_loaders, records


def dataset_loaders(datasets: Mapping[str, Any], cfg: TrainConfig, collate: Callable[..., Any],
                    dist: Dist) -> tuple[Any, dict[str, Any], int]:
    """(training loader, {"train", "val"} evaluation loaders, padded tokens of the first epoch) of
    the encoded `datasets` ("train" and "val": records, or an objective's examples with `lengths()`,
    `dropped` and `context_length`), batched by --batch-size, --eval-iters and --seed; this rank's
    shares under torchrun (`dist`); `UserError` if one of them kept nothing."""
    batch_size, seed = cfg.batch_size, cfg.seed
    for name, dataset in datasets.items():
        if len(dataset) == 0:
            raise UserError(f"all {dataset.dropped} {name} records are too long for even one "
                            f"response token in a context of {dataset.context_length} tokens (the "
                            f"response and "
                            "its end-of-text are never cut); use a larger --context-length or "
                            "shorter responses")
    sampler = BucketBatchSampler(datasets["train"].lengths(), batch_size * dist.world_size, seed,
                                 rank=dist.rank, world_size=dist.world_size)
    train_loader = DataLoader(datasets["train"], batch_sampler=sampler, collate_fn=collate)
    # as in gpt.data.windows.build_loaders: the global one untouched
    train_loader.generator = torch.Generator()
    eval_loaders = {name: _eval_loader(data, batch_size, cfg.eval_iters, collate, dist)
                    for name, data in datasets.items()}
    return train_loader, eval_loaders, sampler.padded_tokens()


def _eval_loader(dataset: Any, batch_size: int, batches: int,
                 collate: Callable[..., Any], dist: Dist) -> DataLoader[Any]:
    """`batches` batches of records spread evenly over `dataset` (or all of it): the same every time
    (this rank's shares of them: `gpt.data.windows.eval_picks`)."""
    picks = eval_picks(len(dataset), batch_size, batches, dist.rank, dist.world_size)
    return DataLoader(Subset(dataset, picks), batch_size=batch_size, collate_fn=collate,
                      generator=torch.Generator())
