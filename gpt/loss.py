"""The training objective: next-token cross-entropy, its perplexity, and its average over a loader.

A language model's loss is the cross-entropy between its predicted distribution at every position and
the token that actually comes next, averaged over the positions:

    loss = -mean_i log softmax(logits_i)[target_i]

Perplexity, exp(loss), reads as "the model is as unsure as a uniform choice among this many tokens":
~50257 for an untrained GPT-2-sized vocabulary, ~20-30 for GPT-2 small on web text.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpt.device import autocast

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


# Left out of torch.compile (`train.py --compile` compiles `GPT.loss`): the compiler takes the model up
# to its head, and the head's loss runs as written here, whose chunked path is laid out around the
# buffers it fills in place. Compiling it too would be a new speed option, to measure first.
@torch.compiler.disable
def head_loss(hidden: Tensor, head_weight: Tensor, targets: Tensor, chunk_size: int = 0,
              vocab_size: int | None = None) -> Tensor:
    """`lm_loss` of the LM head's logits `hidden @ head_weight.T`, optionally without materialising them.

    hidden (..., C), head_weight (V, C), targets (...). Only the first `vocab_size` logits count (the
    rest belong to padding rows of the head; default: all V). With `chunk_size` 0 this is exactly
    `lm_loss(F.linear(hidden, head_weight)[..., :vocab_size], targets)`: the (..., V) logits exist in
    full, in float32 too (inside `lm_loss`) and again as their gradient, ~3 x 411 MB for a batch of
    8 x 256 tokens.
    With `chunk_size` N the head and the loss run N positions at a time (`ChunkedHeadLoss`): at most
    N x V float32 values live at once, and the gradient kept for backward is (positions, V) in the
    compute dtype (bf16 under autocast); without gradients (under `torch.no_grad()`) only the
    loss is computed. Same loss and gradients up to float rounding.
    """
    vocab_size = head_weight.size(0) if vocab_size is None else vocab_size
    if chunk_size == 0:
        return lm_loss(F.linear(hidden, head_weight)[..., :vocab_size], targets)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):  # autocast would run the head in this dtype
        dtype = torch.get_autocast_dtype(device_type)
        hidden, head_weight = hidden.to(dtype), head_weight.to(dtype)
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or head_weight.requires_grad)
    return ChunkedHeadLoss.apply(hidden.flatten(0, -2), head_weight, targets.flatten(), chunk_size,
                                 vocab_size, with_grad)


class ChunkedHeadLoss(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T` against `targets`, `chunk` rows at a time.

    The gradient of the mean cross-entropy with respect to row i's logits is
    (softmax(logits_i) - onehot(target_i)) / n for the n counted rows, and 0 for ignored ones. The
    forward pass computes g = softmax - onehot chunk by chunk while the chunk's logits are at hand, in
    place of them, and turns it into g @ weight (for `hidden`'s gradient) straight away; `weight`'s
    gradient (g.T @ hidden) is one matmul over all rows in backward. Nothing of size (rows, V) is kept
    but g, in the compute dtype.

    g is kept times `GRAD_HEADROOM`, not divided by n: in float16 a probability divided by the row
    count (1/50257/16384 for GPT-2 at 16 x 1024 tokens) is below float16's smallest number and would
    be stored as 0 before the loss scaler could act, zeroing whole rows of the head's gradient. 1/n
    and the incoming gradient (which carries the loss scale) are applied in backward, in float32, to
    the (rows, C) operands rather than to g, so backward adds no pass over (rows, V).
    """

    GRAD_HEADROOM = 2.0**8
    """A power of two, so exact in any float format. Times it, a probability as small as 1/V of GPT-2's
    vocabulary is a normal float16 number (unscaled it would be subnormal, with fewer bits), while
    g @ weight, at most 2 x 256 x max|weight|, stays far below float16's largest number (65504). It
    changes nothing in bf16 or float32, whose range is float32's."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor,
                targets: Tensor, chunk: int, vocab_size: int, with_grad: bool) -> Tensor:
        counted = targets != IGNORE_INDEX  # (N,)
        count = counted.sum()
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        if with_grad:  # without (evaluation), nothing of size (N, V) is made at all
            row_factor = counted[:, None] * ChunkedHeadLoss.GRAD_HEADROOM  # (N, 1): 0 for ignored rows
            grad_logits = hidden.new_empty(hidden.size(0), weight.size(0))
            grad_logits[:, vocab_size:] = 0  # padding rows of the head: no logits, no gradient
            grad_hidden = torch.empty_like(hidden)
        with torch.autocast(hidden.device.type, enabled=False):  # the dtypes were chosen by the caller
            for start in range(0, hidden.size(0), chunk):
                rows = slice(start, start + chunk)
                logits = (hidden[rows] @ weight.t())[:, :vocab_size].float()  # (n, V)
                target = targets[rows].clamp(min=0)[:, None]  # ignored rows point at token 0, weight 0
                log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)  # (n, 1)
                loss_sum += ((log_norm - logits.gather(1, target)) * counted[rows, None]).sum()
                if with_grad:
                    # In place, the logits become g: softmax, minus the one-hot, times the row's factor.
                    grad = logits.sub_(log_norm).exp_().scatter_add_(1, target, -torch.ones_like(log_norm))
                    grad_logits[rows, :vocab_size] = grad.mul_(row_factor[rows])
                    torch.mm(grad_logits[rows], weight, out=grad_hidden[rows])
        if with_grad:
            ctx.save_for_backward(grad_logits, grad_hidden, hidden, count)
        return loss_sum / count

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor,
                 ) -> tuple[Tensor | None, Tensor | None, None, None, None, None]:
        grad_logits, grad_hidden, hidden, count = ctx.saved_tensors
        # All-ignored targets give a NaN loss but zero gradients (g is 0 on every row).
        scale = grad_loss.float() / (count.clamp(min=1) * ChunkedHeadLoss.GRAD_HEADROOM)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            # (C, N) @ (N, V), then transposed: faster on a CPU than (V, N) @ (N, C), whose left
            # operand would be a transposed view.
            grad_weight = ((hidden.float() * scale).to(hidden.dtype).t() @ grad_logits).t()  # (V, C)
        return (grad_hidden.float() * scale).to(hidden.dtype), grad_weight, None, None, None, None


def perplexity(loss: float) -> float:
    """exp(loss); infinity where that overflows a float (a loss above ~709)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


class LanguageModel(Protocol):
    """What `evaluate_loss` needs of a model (`gpt.model.GPT` is one)."""

    training: bool

    def parameters(self) -> Iterator[nn.Parameter]: ...

    def train(self, mode: bool = True) -> Any: ...

    def loss(self, idx: Tensor, targets: Tensor, *, chunk_size: int = 0) -> Tensor: ...


def evaluate_loss(model: LanguageModel, loader: Iterable[tuple[Tensor, Tensor]],
                  max_batches: int | None = None, *, dtype: torch.dtype = torch.float32,
                  chunk_size: int = 0) -> float:
    """Mean loss over the first `max_batches` batches of `loader` (all of them if None).

    The model runs in eval mode (no dropout) without gradients, and is put back into the mode it was
    in. The mean is over target tokens, so a short last batch weighs by its size, not as a full batch.
    Each batch's loss is `model.loss(x, y, chunk_size=chunk_size)`: the training loss, and with a
    `chunk_size` just as sparing of memory.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.train(False)
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
                total += model.loss(x, y, chunk_size=chunk_size).item() * n
                count += n
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("evaluate_loss: the loader gave no target tokens to average over")
    return total / count
