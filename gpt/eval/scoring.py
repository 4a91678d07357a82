"""What the benchmark tasks share: scoring continuations in padded batches, and accuracy intervals.

A task (`gpt.eval.choice`, `gpt.eval.last_word`) turns each example into `Row`s: the tokens the
model reads, the position from which its predictions are wanted, and the tokens expected there.
`score_rows` runs many rows of different lengths in one forward pass (right-padded: the model is
causal, so padding after a row's last token changes none of its predictions) and returns, per row,
the log-probability of each expected token and the greedy (most likely) token at every wanted
position. Only the wanted positions go through the LM head: for GPT-2's 50,257-token vocabulary
the head's logits of a whole batch would be the largest tensor by far.

`wilson_interval` is the 95% interval reported with every accuracy (`Accuracy`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

import torch
from torch import Tensor

from gpt.base.device import autocast, eval_mode
from gpt.base.errors import UserError
from gpt.model.loss import IGNORE_INDEX
from gpt.model.model import GPT
from gpt.model.tokenizer import ENDOFTEXT_ID

T = TypeVar("T")

Z_95 = 1.959963984540054
"""The standard normal quantile of 0.975: a two-sided 95% interval."""


class Row(NamedTuple):
    """One sequence to score: the model reads `tokens`; its predictions at positions `start` ..
    len(tokens) - 1 are wanted, and the first len(`expected`) of them should be `expected`."""

    tokens: list[int]
    start: int
    expected: list[int]


class RowScore(NamedTuple):
    """`log_probs[i]`: ln p(expected[i] | what precedes it); `greedy[j]`: the most likely token at
    the j-th wanted position (ties: the lowest id)."""

    log_probs: Tensor
    greedy: list[int]


def fit_left(tokens: list[int], limit: int) -> tuple[list[int], bool]:
    """The last `limit` of `tokens`, and whether any were cut: a context too long for the model
    loses its beginning, as lm-evaluation-harness truncates (the tokens nearest the scored ones
    stay)."""
    return (tokens[-limit:], True) if len(tokens) > limit else (tokens, False)


def score_rows(model: GPT, rows: Sequence[Row], *,
               dtype: torch.dtype = torch.float32) -> list[RowScore]:
    """Score `rows` in one forward pass of `model` (eval mode, no gradients, autocast in `dtype`).

    The rows are right-padded with end-of-text to the longest; the targets of positions that are
    not wanted are `IGNORE_INDEX`, and only the hidden states of wanted positions go through the LM
    head.
    Log-probabilities come from float32 (or wider) logits, whatever the autocast precision.
    """
    context = model.config.context_length
    longest = max(len(row.tokens) for row in rows)
    if longest > context:  # the tasks cut their rows to fit; this is a caller's bug
        raise ValueError(f"a row of {longest} tokens exceeds the model's context length {context}")
    device = model.tok_emb.weight.device
    inputs = torch.full((len(rows), longest), ENDOFTEXT_ID, dtype=torch.long)
    targets = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
    wanted = torch.zeros((len(rows), longest), dtype=torch.bool)
    for r, row in enumerate(rows):
        if not 0 <= row.start < len(row.tokens) or len(row.expected) > len(row.tokens) - row.start:
            raise ValueError(f"row {r}: positions {row.start}.. of {len(row.tokens)} tokens cannot "
                             f"hold {len(row.expected)} expected tokens")
        inputs[r, :len(row.tokens)] = torch.tensor(row.tokens)
        expected = torch.tensor(row.expected, dtype=torch.long)
        targets[r, row.start:row.start + len(row.expected)] = expected
        wanted[r, row.start:len(row.tokens)] = True
    with eval_mode(model), torch.no_grad(), autocast(device, dtype):
        # (N, C) in row-major order: row 0's wanted positions first
        hidden = model.hidden_states(inputs.to(device))[wanted.to(device)]
        logits = model.lm_head(hidden)[:, :model.config.vocab_size]
    logits = logits.float().cpu()
    picked = targets[wanted]
    log_probs = torch.log_softmax(logits, dim=-1).gather(1, picked.clamp(min=0)[:, None])[:, 0]
    log_probs = log_probs.double().masked_fill(picked == IGNORE_INDEX, 0.0)
    greedy = logits.argmax(dim=-1)
    counts = wanted.sum(dim=1).tolist()
    return [RowScore(lp[:len(row.expected)], g.tolist())
            for row, lp, g in zip(rows, log_probs.split(counts), greedy.split(counts), strict=True)]


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a proportion `successes` / `n` (95% by default).

    Chosen over the normal (Wald) interval p +- z sqrt(p(1-p)/n) because that one collapses to a
    single point at 0% and 100% and leaves [0, 1] near them, exactly where small task files and
    tiny models put an accuracy; Wilson's stays inside [0, 1] and keeps its coverage there.
    """
    if n <= 0:
        return (math.nan, math.nan)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class Accuracy:
    """`correct` of `n` examples right, with its 95% Wilson interval."""

    correct: int
    n: int

    @property
    def value(self) -> float:
        return self.correct / self.n if self.n else math.nan

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.correct, self.n)

    def describe(self) -> str:
        """`0.2955  (2967/10042, 95% Wilson interval 0.2866-0.3045)`."""
        low, high = self.interval
        return (f"{self.value:.4f}  ({self.correct:,}/{self.n:,}, 95% Wilson interval "
                f"{low:.4f}-{high:.4f})")


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """`items` in lists of `size` (the last may be shorter), read lazily."""
    if size < 1:
        raise UserError(f"--batch-size must be at least 1, got {size}")
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def check_limit(limit: int | None) -> None:
    """--limit N: the first N examples of the file; N >= 1 (None: all of them)."""
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}; leave it out to use every "
                        "record")
