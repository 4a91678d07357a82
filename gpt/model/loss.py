"""The model's loss: next-token cross-entropy, with the LM head and the loss fused (`head_loss`).

A language model's loss is the cross-entropy between its predicted distribution at every position
and the token that actually comes next, averaged over the positions:

    loss = -mean_i log softmax(logits_i)[target_i]

Its perplexity and its average over a loader are `gpt.eval.perplexity`'s; the variants a run may
train with instead (label smoothing, focal loss, distillation) are `gpt.objectives.lm`'s.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100
"""Target value whose position is left out of the loss (PyTorch's convention, e.g. for padding)."""


def count_targets(batches: Iterable[Sequence[Tensor]]) -> int:
    """The counted targets (not `IGNORE_INDEX`) of (inputs, targets) batches: the tokens a training
    step's loss is the mean over (`gpt.training.trainer.train_step`). Call it before the batches go
    to the device: it sums on the host."""
    return sum(int((batch[1] != IGNORE_INDEX).sum()) for batch in batches)


def lm_loss(logits: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX,
            label_smoothing: float = 0.0) -> Tensor:
    """Mean token-level cross-entropy of `logits` (..., V) against `targets` (...).

    Averaged over the targets that are not `ignore_index` (NaN if there are none, as in PyTorch).
    `label_smoothing` mixes the one-hot target with the uniform distribution (0 = plain
    cross-entropy). The loss is computed in float32 (float64 if the logits are): a log-softmax over
    50k classes in bf16 keeps only ~3 significant digits.
    """
    return F.cross_entropy(at_least_float32(logits.flatten(0, -2)), targets.flatten(),
                           ignore_index=ignore_index, label_smoothing=label_smoothing)


def at_least_float32(logits: Tensor) -> Tensor:
    """float16/bfloat16 logits as float32; float32 and float64 as they are (float64 for gradcheck).
    """
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def head_loss(hidden: Tensor, head_weight: Tensor, targets: Tensor, chunk_size: int = 0,
              vocab_size: int | None = None) -> Tensor:
    """`lm_loss` of the LM head's logits `hidden @ head_weight.T`, without ever holding them in
    float32.

    hidden (..., C), head_weight (V, C), targets (...). Only the first `vocab_size` logits count
    (the rest belong to padding rows of the head; default: all V): the padding rows are left out of
    the matmul: they get no logits, and a zero gradient. The same loss and gradients as `lm_loss(
    F.linear(hidden, head_weight)[..., :vocab_size], targets)` up to float rounding, faster and in
    less memory (`HeadLoss`): that one holds the (..., V) logits in the compute dtype, again in
    float32 and again as each of their gradients, ~4 x 411 MB for a batch of 8 x 256 tokens, and
    runs a pass over all of them for each step of the softmax.
    With `chunk_size` 0 the head is one matmul over all positions; with N, it runs N positions at a
    time and its logits never exist whole (only their gradient does, in the compute dtype); without
    gradients (under `torch.no_grad()`), only the loss is computed.
    """
    vocab_size = head_weight.size(0) if vocab_size is None else vocab_size
    device_type = hidden.device.type
    # Autocast would run the head in its dtype: the hidden states go in cast (`HeadLoss` casts the
    # weight itself).
    if torch.is_autocast_enabled(device_type):
        hidden = hidden.to(torch.get_autocast_dtype(device_type))
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or head_weight.requires_grad)
    return HeadLoss.apply(hidden.flatten(0, -2), head_weight, targets.flatten(), chunk_size,
                          vocab_size, with_grad)


class HeadLoss(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T` against `targets`, its gradient made in forward.

    The gradient of the mean cross-entropy with respect to row i's logits is
    (softmax(logits_i) - onehot(target_i)) / n for the n counted rows, and 0 for ignored ones. The
    forward pass writes the logits into a buffer and turns them into g = softmax - onehot there,
    `block_rows` rows at a time; then g @ weight (`hidden`'s gradient but for the row factors) is
    one matmul, and `weight`'s gradient g.T @ hidden one more in backward. Nothing of size (rows, V)
    is kept but g, in the compute dtype. With a `chunk` of rows, the head's matmuls run that many
    rows at a time (0: all at once). 1/n, the incoming gradient (which carries a loss scale) and the
    0 of ignored rows are applied in backward, in float32, to the (rows, C) operands: no pass over
    g.

    In float16, g is kept times `GRAD_HEADROOM`: a probability as small as 1/V of GPT-2's vocabulary
    would otherwise be a subnormal float16 number, with fewer bits, or 0 (with the 1/n applied,
    whole rows of the head's gradient would be zero before the loss scaler could act).
    """

    GRAD_HEADROOM = 2.0**8
    """A power of two, so exact in any float format. Times it, 1/50257 is a normal float16 number,
    while g @ weight, at most 2 x 256 x max|weight|, stays far below float16's largest (65504)."""

    CPU_BLOCK_ROWS = 8
    """Rows whose softmax is taken at a time on a CPU. 8 rows of GPT-2's 50257 logits in float32 are
    1.6 MB, which stay in a core's cache through the cast, log-softmax, exp and one-hot: the logits
    then cross main memory about twice (written by the matmul, read back and overwritten by g)
    instead of once per step of the softmax, its backward and the casts around them."""

    GPU_BLOCK_ROWS = 1024
    """The same on a GPU, where each block's half-dozen kernel launches, not the cache, set the
    size: 16 x 1024 positions take 16 blocks of launches instead of 2048, and a block's float32 copy
    (1024 x 50257, 206 MB) stays small next to the bf16 logits. Not measured (no GPU was at
    hand)."""

    @staticmethod
    def block_rows(device: torch.device) -> int:
        return HeadLoss.CPU_BLOCK_ROWS if device.type == "cpu" else HeadLoss.GPU_BLOCK_ROWS

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor,
                targets: Tensor, chunk: int, vocab_size: int, with_grad: bool) -> Tensor:
        rows = hidden.size(0)
        chunk = chunk or max(rows, 1)
        head = weight[:vocab_size].to(hidden.dtype)  # (V, C), contiguous rows, in the compute dtype
        counted = targets != IGNORE_INDEX  # (N,)
        target = targets.clamp(min=0)[:, None]  # (N, 1): ignored rows point at token 0, weight 0
        accumulate = torch.promote_types(hidden.dtype, torch.float32)  # float64 for gradcheck
        target_logp = torch.empty(rows, 1, dtype=accumulate, device=hidden.device)  # (N, 1)
        headroom = HeadLoss.GRAD_HEADROOM if hidden.dtype == torch.float16 else 1.0
        block_rows = HeadLoss.block_rows(hidden.device)
        minus_one = torch.full((block_rows, 1), -headroom, dtype=accumulate, device=hidden.device)
        if with_grad:  # without (evaluation), nothing of size (N, V) is kept
            grad_logits = hidden.new_empty(rows, vocab_size)
            grad_hidden = torch.empty_like(hidden)
        # the dtypes were chosen by the caller
        with torch.autocast(hidden.device.type, enabled=False):
            for first in range(0, rows, chunk):
                part = slice(first, first + chunk)
                if with_grad:
                    logits = torch.mm(hidden[part], head.t(), out=grad_logits[part])  # (n, V)
                else:
                    logits = hidden[part] @ head.t()
                # named for profile_train
                with torch.profiler.record_function("cross_entropy_blocks"):
                    for top in range(0, logits.size(0), block_rows):
                        end = min(top + block_rows, logits.size(0))
                        # in the chunk, in all
                        block, at = slice(top, end), slice(first + top, first + end)
                        logp = torch.log_softmax(logits[block].to(accumulate), dim=-1)
                        torch.gather(logp, 1, target[at], out=target_logp[at])
                        if with_grad:  # the block's logits become g: softmax minus the one-hot
                            grad = logp.exp_().mul_(headroom) if headroom != 1 else logp.exp_()
                            logits[block] = grad.scatter_add_(1, target[at], minus_one[:end - top])
                if with_grad:
                    torch.mm(grad_logits[part], head, out=grad_hidden[part])
        count = counted.sum()
        if with_grad:
            ctx.save_for_backward(grad_logits, grad_hidden, hidden, counted, count)
            ctx.padding, ctx.headroom, ctx.weight_dtype = (weight.size(0) - vocab_size, headroom,
                                                           weight.dtype)
        return -(target_logp * counted[:, None]).sum() / count

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor,
                 ) -> tuple[Tensor | None, Tensor | None, None, None, None, None]:
        grad_logits, grad_hidden, hidden, counted, count = ctx.saved_tensors
        # All-ignored targets give a NaN loss but zero gradients (every row's factor is 0).
        # (N, 1)
        row_scale = counted[:, None] * (grad_loss.float() / (count.clamp(min=1) * ctx.headroom))
        grad_weight = None
        if ctx.needs_input_grad[1]:
            # (V, N) @ (N, C): the result is laid out as the weight is, so it is cast to the
            # weight's dtype in one contiguous pass, and becomes its .grad without a copy. (C, N) @
            # (N, V), transposed, takes as long but leaves a transposed gradient, which the cast and
            # the gradient's accumulation then each copy across rows (BENCHMARKS.md: the profile).
            scaled = (hidden.float() * row_scale).to(hidden.dtype)  # (N, C)
            grad_weight = (grad_logits.t() @ scaled).to(ctx.weight_dtype)  # (V, C)
            if ctx.padding:  # the padding rows of the head get a zero gradient
                grad_weight = F.pad(grad_weight, (0, 0, 0, ctx.padding))
        return ((grad_hidden.float() * row_scale).to(hidden.dtype), grad_weight, None, None, None,
                None)
