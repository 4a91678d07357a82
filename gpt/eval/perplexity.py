"""The loss over a loader and its perplexity: what every evaluation of a language model reports.

Perplexity, exp(loss), reads as "the model is as unsure as a uniform choice among this many tokens":
~50257 for an untrained GPT-2-sized vocabulary, ~20-30 for GPT-2 small on web text.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from gpt.base.device import autocast, eval_mode
from gpt.model.loss import IGNORE_INDEX


def perplexity(loss: float) -> float:
    """exp(loss); infinity where that overflows a float (a loss above ~709)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


class LanguageModel(Protocol):
    """What `evaluate_loss` needs of a model (`gpt.model.model.GPT` is one)."""

    training: bool

    def parameters(self) -> Iterator[nn.Parameter]: ...

    def train(self, mode: bool = True) -> Any: ...

    def loss(self, idx: Tensor, targets: Tensor, *, chunk_size: int = 0) -> Tensor: ...

    def __call__(self, idx: Tensor) -> Tensor: ...


def evaluate_loss(model: LanguageModel, loader: Iterable[tuple[Tensor, Tensor]],
                  max_batches: int | None = None, *, dtype: torch.dtype = torch.float32,
                  chunk_size: int = 0, loss: Callable[..., Tensor] | None = None,
                  all_reduce: Callable[[list[float]], list[float]] | None = None) -> float:
    """Mean loss over the first `max_batches` batches of `loader` (all of them if None).

    The model runs in eval mode (no dropout) without gradients, and is put back into the mode it was
    in. The mean is over target tokens, so a short last batch weighs by its size, not as a full
    batch. Each batch's loss is `model.loss(x, y, chunk_size=chunk_size)`: the training loss, and
    with a `chunk_size` just as sparing of memory. `loss`, called the same way, measures something
    else on the same model (a training objective: `objective_loss`). `all_reduce` sums [loss total,
    token count] over the ranks of a data-parallel run (`gpt.training.distributed.Dist.sum_values`),
    each of which evaluated its own batches: the mean is then over all of them.
    """
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with eval_mode(model), torch.no_grad(), autocast(device, dtype):
        for i, (x, y) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x, y = x.to(device), y.to(device)
            n = int((y != IGNORE_INDEX).sum())
            if n == 0:  # a batch of nothing but ignored targets has no loss (lm_loss: NaN)
                continue
            total += (loss or model.loss)(x, y, chunk_size=chunk_size).item() * n
            count += n
    total, tokens = all_reduce([total, count]) if all_reduce else (total, count)
    if tokens == 0:
        raise ValueError("evaluate_loss: the loader gave no target tokens to average over")
    return total / tokens
