"""The training objective: next-token cross-entropy, its variants, its perplexity, its loader average.

A language model's loss is the cross-entropy between its predicted distribution at every position and
the token that actually comes next, averaged over the positions:

    loss = -mean_i log softmax(logits_i)[target_i]

Perplexity, exp(loss), reads as "the model is as unsure as a uniform choice among this many tokens":
~50257 for an untrained GPT-2-sized vocabulary, ~20-30 for GPT-2 small on web text.

The variants a run may train with instead (label smoothing, focal loss, distillation from a teacher)
are at the end, gathered by `Objective`, which also selects preference tuning (DPO, `gpt.dpo`); the
LM head and the loss run fused, optionally in chunks (`head_loss`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpt.device import autocast, eval_mode
from gpt.errors import UserError

if TYPE_CHECKING:  # gpt.model imports this module
    from gpt.model import GPT

OBJECTIVES = ("lm", "dpo")
"""The values of --objective (`Objective.name`)."""
IGNORE_INDEX = -100
"""Target value whose position is left out of the loss (PyTorch's convention, e.g. for padding)."""


def count_targets(batches: Iterable[Sequence[Tensor]]) -> int:
    """The counted targets (not `IGNORE_INDEX`) of (inputs, targets) batches: the tokens a training
    step's loss is the mean over (`gpt.trainer.train_step`). Call it before the batches go to the
    device: it sums on the host."""
    return sum(int((batch[1] != IGNORE_INDEX).sum()) for batch in batches)


def lm_loss(logits: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX,
            label_smoothing: float = 0.0) -> Tensor:
    """Mean token-level cross-entropy of `logits` (..., V) against `targets` (...).

    Averaged over the targets that are not `ignore_index` (NaN if there are none, as in PyTorch).
    `label_smoothing` mixes the one-hot target with the uniform distribution (0 = plain cross-entropy).
    The loss is computed in float32 (float64 if the logits are): a log-softmax over 50k classes in
    bf16 keeps only ~3 significant digits.
    """
    return F.cross_entropy(at_least_float32(logits.flatten(0, -2)), targets.flatten(),
                           ignore_index=ignore_index, label_smoothing=label_smoothing)


def at_least_float32(logits: Tensor) -> Tensor:
    """float16/bfloat16 logits as float32; float32 and float64 as they are (float64 for gradcheck)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def head_loss(hidden: Tensor, head_weight: Tensor, targets: Tensor, chunk_size: int = 0,
              vocab_size: int | None = None) -> Tensor:
    """`lm_loss` of the LM head's logits `hidden @ head_weight.T`, without ever holding them in float32.

    hidden (..., C), head_weight (V, C), targets (...). Only the first `vocab_size` logits count (the
    rest belong to padding rows of the head; default: all V): the padding rows are left out of the
    matmul: they get no logits, and a zero gradient. The same loss and gradients as `lm_loss(
    F.linear(hidden, head_weight)[..., :vocab_size], targets)` up to float rounding, faster and in less
    memory (`HeadLoss`): that one holds the (..., V) logits in the compute dtype, again in float32 and
    again as each of their gradients, ~4 x 411 MB for a batch of 8 x 256 tokens, and runs a pass over
    all of them for each step of the softmax.
    With `chunk_size` 0 the head is one matmul over all positions; with N, it runs N positions at a
    time and its logits never exist whole (only their gradient does, in the compute dtype); without
    gradients (under `torch.no_grad()`), only the loss is computed.
    """
    vocab_size = head_weight.size(0) if vocab_size is None else vocab_size
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):  # autocast would run the head in this dtype
        hidden = hidden.to(torch.get_autocast_dtype(device_type))  # and `HeadLoss` casts the weight
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
    is kept but g, in the compute dtype. With a `chunk` of rows, the head's matmuls run that many rows
    at a time (0: all at once). 1/n, the incoming gradient (which carries a loss scale) and the 0 of
    ignored rows are applied in backward, in float32, to the (rows, C) operands: no pass over g.

    In float16, g is kept times `GRAD_HEADROOM`: a probability as small as 1/V of GPT-2's vocabulary
    would otherwise be a subnormal float16 number, with fewer bits, or 0 (with the 1/n applied, whole
    rows of the head's gradient would be zero before the loss scaler could act).
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
    """The same on a GPU, where each block's half-dozen kernel launches, not the cache, set the size:
    16 x 1024 positions take 16 blocks of launches instead of 2048, and a block's float32 copy (1024 x
    50257, 206 MB) stays small next to the bf16 logits. Not measured (no GPU was at hand)."""

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
        with torch.autocast(hidden.device.type, enabled=False):  # the dtypes were chosen by the caller
            for first in range(0, rows, chunk):
                part = slice(first, first + chunk)
                if with_grad:
                    logits = torch.mm(hidden[part], head.t(), out=grad_logits[part])  # (n, V)
                else:
                    logits = hidden[part] @ head.t()
                with torch.profiler.record_function("cross_entropy_blocks"):  # named for profile_train
                    for top in range(0, logits.size(0), block_rows):
                        end = min(top + block_rows, logits.size(0))
                        block, at = slice(top, end), slice(first + top, first + end)  # in the chunk, in all
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
            ctx.padding, ctx.headroom, ctx.weight_dtype = weight.size(0) - vocab_size, headroom, weight.dtype
        return -(target_logp * counted[:, None]).sum() / count

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor,
                 ) -> tuple[Tensor | None, Tensor | None, None, None, None, None]:
        grad_logits, grad_hidden, hidden, counted, count = ctx.saved_tensors
        # All-ignored targets give a NaN loss but zero gradients (every row's factor is 0).
        row_scale = counted[:, None] * (grad_loss.float() / (count.clamp(min=1) * ctx.headroom))  # (N, 1)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            # (V, N) @ (N, C): the result is laid out as the weight is, so it is cast to the weight's
            # dtype in one contiguous pass, and becomes its .grad without a copy. (C, N) @ (N, V),
            # transposed, takes as long but leaves a transposed gradient, which the cast and the
            # gradient's accumulation then each copy across rows (BENCHMARKS.md: the profile).
            scaled = (hidden.float() * row_scale).to(hidden.dtype)  # (N, C)
            grad_weight = (grad_logits.t() @ scaled).to(ctx.weight_dtype)  # (V, C)
            if ctx.padding:  # the padding rows of the head get a zero gradient
                grad_weight = F.pad(grad_weight, (0, 0, 0, ctx.padding))
        return (grad_hidden.float() * row_scale).to(hidden.dtype), grad_weight, None, None, None, None


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

    def __call__(self, idx: Tensor) -> Tensor: ...


def evaluate_loss(model: LanguageModel, loader: Iterable[tuple[Tensor, Tensor]],
                  max_batches: int | None = None, *, dtype: torch.dtype = torch.float32,
                  chunk_size: int = 0, loss: Callable[..., Tensor] | None = None,
                  all_reduce: Callable[[list[float]], list[float]] | None = None) -> float:
    """Mean loss over the first `max_batches` batches of `loader` (all of them if None).

    The model runs in eval mode (no dropout) without gradients, and is put back into the mode it was
    in. The mean is over target tokens, so a short last batch weighs by its size, not as a full batch.
    Each batch's loss is `model.loss(x, y, chunk_size=chunk_size)`: the training loss, and with a
    `chunk_size` just as sparing of memory. `loss`, called the same way, measures something else on
    the same model (a training objective: `objective_loss`). `all_reduce` sums [loss total, token
    count] over the ranks of a data-parallel run (`gpt.distributed.Dist.sum_values`), each of which
    evaluated its own batches: the mean is then over all of them.
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


# ---- the variants: label smoothing, focal loss, distillation -----------------------------------


def focal_loss(logits: Tensor, targets: Tensor, gamma: float, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean focal loss -(1 - p)^gamma * log p over the targets that are not `ignore_index`.

    p is the probability the model gives the target token, softmax over the whole vocabulary (Lin et
    al. 2017, there over object classes). The factor (1 - p)^gamma shrinks the loss of tokens the
    model already predicts well, so their gradient goes to the hard ones; gamma 0 is plain
    cross-entropy. Computed in float32 (float64 if the logits are), like `lm_loss`.
    """
    logp = F.log_softmax(at_least_float32(logits.flatten(0, -2)), dim=-1)  # (N, V)
    targets = targets.flatten()
    counted = targets != ignore_index
    logp_target = logp.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)  # ignored rows read token 0
    # 1 - p as -expm1(log p), which keeps the small difference where p rounds to 1.0. Where even log p
    # is 0 (a near-certain token), 1 - p is 0, and the gradient of pow(gamma < 1) there infinite: the
    # floor turns it into 0 (such a token's loss is 0 either way).
    one_minus_p = (-torch.expm1(logp_target)).clamp(min=torch.finfo(logp.dtype).tiny)
    modulation = one_minus_p.pow(gamma)
    return -(modulation * logp_target)[counted].mean()  # no counted target: NaN, as in lm_loss


def distillation_kl(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, temperature: float,
                    ignore_index: int = IGNORE_INDEX) -> Tensor:
    """KL(teacher_T || student_T), averaged over the positions whose target is not `ignore_index`.

    teacher_T = softmax(teacher_logits / T) and student_T the same for the student, over the
    vocabulary; per position KL = sum_k teacher_T[k] * (log teacher_T[k] - log student_T[k]), which is
    0 exactly when the two distributions agree. A temperature above 1 flattens both, so the student
    also learns how the teacher ranks the unlikely tokens ("dark knowledge", Hinton et al. 2015).
    """
    counted = targets.flatten() != ignore_index
    student = F.log_softmax(at_least_float32(student_logits.flatten(0, -2)[counted]) / temperature, dim=-1)
    teacher = F.log_softmax(at_least_float32(teacher_logits.flatten(0, -2)[counted]) / temperature, dim=-1)
    return (teacher.exp() * (teacher - student)).sum(dim=-1).mean()


@dataclass(frozen=True)
class Objective:
    """What training minimises: cross-entropy or one of its variants, set by `train.py`'s flags.

        hard   = lm_loss(logits, targets, label_smoothing)   or   focal_loss(logits, targets, gamma)
        loss   = hard                                                             without a teacher
               = (1 - A) * hard + A * T^2 * distillation_kl(logits, teacher_logits, targets, T)   with

    The T^2 keeps the distillation gradient on the scale of the hard loss's as T changes (the softened
    softmax's gradient shrinks as 1/T^2). Validation losses stay plain cross-entropy (`lm_loss`), so
    runs with different objectives remain comparable.
    """

    label_smoothing: float = 0.0
    """Mix the one-hot target with the uniform distribution by this much (0 = plain cross-entropy)."""
    focal_gamma: float = 0.0
    """Focal loss: weight each token's loss by (1 - p)^gamma (0 = plain cross-entropy)."""
    teacher: str | None = None
    """The model distilled from (a name or path, for messages); None trains on the targets alone."""
    distill_weight: float = 0.5
    """A: the share of the distillation term in the loss, in [0, 1] (used with a teacher only)."""
    distill_temperature: float = 2.0
    """T: both models' logits are divided by this before their softmax (used with a teacher only)."""
    name: str = "lm"
    """lm: next-token cross-entropy (or one of the variants above); dpo: Direct Preference Optimization
    on pairs of responses, whose loss is `gpt.dpo`'s, not `loss` below."""
    dpo_beta: float = 0.1
    """DPO's beta: the scale of the implicit reward beta * (log pi - log pi_ref) (used with dpo only)."""

    def __post_init__(self) -> None:
        def need(ok: bool, flag: str, value: float, what: str, example: str) -> None:
            if not (ok and math.isfinite(value)):
                raise UserError(f"--{flag} must be {what}, got {value!r}; e.g. --{flag} {example}")

        need(0 <= self.label_smoothing < 1, "label-smoothing", self.label_smoothing, "in [0, 1)", "0.1")
        need(self.focal_gamma >= 0, "focal-gamma", self.focal_gamma, "0 or more", "2")
        need(0 <= self.distill_weight <= 1, "distill-weight", self.distill_weight, "in [0, 1]", "0.5")
        need(self.distill_temperature > 0, "distill-temperature", self.distill_temperature, "above 0", "2")
        need(self.dpo_beta > 0, "dpo-beta", self.dpo_beta, "above 0", "0.1")
        if self.name not in OBJECTIVES:
            raise UserError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.name!r}; "
                            "e.g. --objective dpo")
        variant = self.variant_flag
        if self.name == "dpo" and variant is not None:
            raise UserError(f"--objective dpo has a loss of its own and does not combine with {variant}; "
                            f"drop {variant}")
        if self.label_smoothing > 0 and self.focal_gamma > 0:
            raise UserError("--label-smoothing and --focal-gamma both reshape the cross-entropy and do "
                               "not combine here; give only one of them")

    @property
    def variant_flag(self) -> str | None:
        """The flag that makes this a variant of cross-entropy (--teacher, ...), or None."""
        return ("--teacher" if self.teacher is not None else "--label-smoothing" if self.label_smoothing
                else "--focal-gamma" if self.focal_gamma else None)

    @property
    def is_cross_entropy(self) -> bool:
        """Whether this is plain cross-entropy, the loss `head_loss` computes (also in chunks)."""
        return self.name == "lm" and self.variant_flag is None

    def check_loss_chunk(self, loss_chunk: int) -> None:
        """Refuse `--loss-chunk` with any other objective: the chunked head computes plain cross-entropy
        only, while the variants need each position's whole distribution (and the teacher's), and DPO
        each response token's log-probability."""
        if loss_chunk and not self.is_cross_entropy:
            flag = self.variant_flag or f"--objective {self.name}"
            raise UserError(f"--loss-chunk computes plain cross-entropy only; drop --loss-chunk to "
                               f"train with {flag}")

    def loss(self, logits: Tensor, targets: Tensor, teacher_logits: Tensor | None = None) -> Tensor:
        """The objective of `logits` (..., V) against `targets` (...), -100 targets left out; with a
        teacher, `teacher_logits` are its logits for the same inputs (computed without gradients)."""
        if self.focal_gamma > 0:
            hard = focal_loss(logits, targets, self.focal_gamma)
        else:
            hard = lm_loss(logits, targets, label_smoothing=self.label_smoothing)
        if self.teacher is None:
            return hard
        if teacher_logits is None:
            raise ValueError(f"Objective.loss: distilling from {self.teacher} needs its teacher_logits")
        weight, temperature = self.distill_weight, self.distill_temperature
        kl = distillation_kl(logits, teacher_logits, targets, temperature)
        return (1 - weight) * hard + weight * temperature**2 * kl


def objective_loss(objective: Objective, model: Callable[[Tensor], Tensor],
                   teacher: Callable[[Tensor], Tensor] | None, idx: Tensor, targets: Tensor, *,
                   chunk_size: int = 0) -> Tensor:
    """`objective.loss` of `model`'s logits for `idx` against `targets`: the micro-batch's mean loss.

    Called like `GPT.loss` (`functools.partial` binds the first three), under the caller's autocast;
    the `teacher`'s logits come from the same inputs under that autocast, without gradients.
    `chunk_size` must be 0: the variants need whole logits (`Objective.check_loss_chunk`).
    """
    if chunk_size:
        raise ValueError("objective_loss: the variants need whole logits; chunk_size must be 0")
    teacher_logits = None
    if teacher is not None:
        with torch.no_grad():
            teacher_logits = teacher(idx)
    return objective.loss(model(idx), targets, teacher_logits)


def training_loss(objective: Objective, model: GPT, teacher: Callable[[Tensor], Tensor] | None, *,
                  compile: bool = False) -> Callable[..., Tensor]:
    """What a training step calls, as `model.loss(idx, targets, chunk_size=...)`: `model.loss` itself
    for plain cross-entropy (the path `--loss-chunk` can split), else `objective_loss` bound to
    `objective`, `model` and `teacher`. With `compile`, through torch.compile: for plain cross-entropy
    the transformer only, the head's loss run as written (its chunked path fills buffers in place, and
    compiling it too would be a new speed option to measure first)."""
    if not objective.is_cross_entropy:
        loss = partial(objective_loss, objective, model, teacher)
        return torch.compile(loss) if compile else loss
    if not compile:
        return model.loss
    body = torch.compile(model.hidden_states)
    return lambda idx, targets, *, chunk_size=0: model.head_loss(body(idx), targets, chunk_size=chunk_size)
