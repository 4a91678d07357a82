"""Benchmark accuracy during training: what `--eval-task KIND:FILE` adds to every evaluation.

    tasks = load_eval_tasks(["choice:hellaswag_val.jsonl"], limit=500, context_length=1024)
    for task in tasks:  # at every evaluation
        row[task.column] = task_accuracy(model, task, dtype=dtype, rank=dist.rank,
                                         world_size=dist.world_size, all_reduce=dist.sum_values)

A task is read and tokenized once, when training starts: the first `limit` records of its file (the
same ones at every evaluation, so the column moves only because the model did), cut to the run's
context length. `task_accuracy` scores them with the model in eval mode and returns the accuracy:
acc_norm for a `choice` task (`gpt.eval.choice`), the last-word accuracy for a `last-word` task
(`gpt.eval.last_word`). Under torchrun each rank scores every world_size-th record from its rank on,
and `all_reduce` (`Dist.sum_values`) adds up the counts, so every rank returns the same accuracy of
all of them; with `all_reduce=None` a rank returns its own share's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt.base.errors import UserError
from gpt.eval.choice import EncodedChoice, encode_choice, read_choice_records, score_choices
from gpt.eval.last_word import EncodedPassage, encode_passage, read_passages, score_passages
from gpt.eval.scoring import batched
from gpt.model.model import GPT
from gpt.model.tokenizer import get_tokenizer

COLUMN_PREFIXES = {"choice": "choice_acc_norm", "last-word": "last_word_acc"}
"""Each task kind's metrics.csv column, `<prefix>:<file stem>`: choice_acc_norm:hellaswag_val."""


@dataclass(frozen=True)
class EvalTask:
    """A task's records, tokenized for one context length, and the column its accuracy goes to."""

    kind: str
    path: Path
    records: tuple[EncodedChoice, ...] | tuple[EncodedPassage, ...]

    @property
    def column(self) -> str:
        return f"{COLUMN_PREFIXES[self.kind]}:{self.path.stem}"


def parse_task_spec(spec: str) -> tuple[str, Path]:
    """`choice:FILE` or `last-word:FILE` -> (kind, path); `UserError` for anything else."""
    kind, sep, file = spec.partition(":")
    if not sep or kind not in COLUMN_PREFIXES or not file:
        raise UserError(f"--eval-task {spec!r} is not KIND:FILE with KIND one of "
                        f"{', '.join(COLUMN_PREFIXES)}; e.g. --eval-task "
                        "choice:hellaswag_val.jsonl")
    return kind, Path(file)


def load_eval_task(spec: str, limit: int, context_length: int) -> EvalTask:
    """The first `limit` records of the task `spec` names, tokenized for `context_length`; every
    problem with the file is a `UserError` here, before training starts."""
    kind, path = parse_task_spec(spec)
    tokenizer = get_tokenizer()
    if kind == "choice":
        records = read_choice_records(path, limit)
        return EvalTask(kind, path, tuple(encode_choice(r, tokenizer, context_length)
                                          for r in records))
    passages = read_passages(path, limit)
    return EvalTask(kind, path, tuple(encode_passage(p, tokenizer, context_length)
                                      for p in passages))


def load_eval_tasks(specs: Sequence[str], limit: int, context_length: int) -> list[EvalTask]:
    """Every `--eval-task`; `UserError` if two would write the same column (same kind and stem)."""
    tasks = [load_eval_task(spec, limit, context_length) for spec in specs]
    columns = [task.column for task in tasks]
    for column in columns:
        if columns.count(column) > 1:
            raise UserError(f"two --eval-task files would both log {column}; give them "
                            "different names")
    return tasks


def task_accuracy(model: GPT, task: EvalTask, *, dtype: torch.dtype = torch.float32, rank: int = 0,
                  world_size: int = 1,
                  all_reduce: Callable[[list[float]], list[float]] | None = None,
                  batch_size: int = 8) -> float:
    """The accuracy of `model` on `task`'s records (this rank's share: every `world_size`-th from
    `rank`; with `all_reduce`, summed over the ranks): acc_norm for choice, last-word accuracy for
    last-word. `model` is the plain `GPT` (not a DDP wrapper: no gradients flow here)."""
    share = task.records[rank::world_size]
    correct = 0
    choices = [r for r in share if isinstance(r, EncodedChoice)]
    for some in batched(choices, batch_size):
        correct += sum(s.pick_norm == s.label for s in score_choices(model, some, dtype=dtype))
    passages = [r for r in share if isinstance(r, EncodedPassage)]
    for more in batched(passages, batch_size):
        correct += sum(s.correct for s in score_passages(model, more, get_tokenizer(), dtype=dtype))
    counts = [float(correct), float(len(share))]
    right, n = all_reduce(counts) if all_reduce else counts
    return right / n
