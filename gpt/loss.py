"""The training objective: next-token cross-entropy, its perplexity, and its average over a loader.

A language model's loss is the cross-entropy between its predicted distribution at every position and
the token that actually comes next, averaged over the positions:

    loss = -mean_i log softmax(logits_i)[target_i]

Perplexity, exp(loss), reads as "the model is as unsure as a uniform choice among this many tokens":
~50257 for an untrained GPT-2-sized vocabulary, ~20-30 for GPT-2 small on web text.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100
"""Target value whose position is left out of the loss (PyTorch's convention, e.g. for padding)."""


def lm_loss(logits: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX,
            label_smoothing: float = 0.0) -> Tensor:
    """Mean token-level cross-entropy of `logits` (..., V) against `targets` (...).

    Averaged over the targets that are not `ignore_index` (NaN if there are none, as in PyTorch).
    `label_smoothing` mixes the one-hot target with the uniform distribution (0 = plain cross-entropy).
    The loss is computed in float32 whatever the dtype of `logits`: a log-softmax over 50k classes in
    bf16 keeps only ~3 significant digits.
    """
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=ignore_index,
                           label_smoothing=label_smoothing)


def perplexity(loss: float) -> float:
    """exp(loss); infinity where that overflows a float (a loss above ~709)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager[None]:
    """Mixed precision for `dtype` on `device`; float32 means no autocast (full precision)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def evaluate_loss(model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]], max_batches: int | None = None,
                  *, dtype: torch.dtype = torch.float32) -> float:
    """Mean loss over the first `max_batches` batches of `loader` (all of them if None).

    The model runs in eval mode (no dropout) without gradients, and is put back into the mode it was
    in. The mean is over target tokens, so a short last batch weighs by its size, not as a full batch.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad(), autocast(device, dtype):
            for i, (x, y) in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                x, y = x.to(device), y.to(device)
                n = int((y != IGNORE_INDEX).sum())
                if n == 0:  # a batch of nothing but ignored targets has no loss (lm_loss: NaN)
                    continue
                total += lm_loss(model(x), y).item() * n
                count += n
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("evaluate_loss: the loader gave no target tokens to average over")
    return total / count
