"""--objective lm: next-token cross-entropy and its variants (label smoothing, focal loss,
distillation from a teacher), on text or on question-answer records.

The plain loss is the model's own (`gpt.model.loss`); the variants reshape it (`CrossEntropy`).
Validation losses stay plain cross-entropy whatever the variant, so runs remain comparable; a
variant's own loss on the training batches is the extra column `OBJECTIVE_COLUMN`, and a run on
records answers its validation prompts greedily at each evaluation (`ANSWER_COLUMN`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from gpt.base.errors import UserError
from gpt.data.records import is_record_file
from gpt.eval.answers import val_exact_match
from gpt.eval.perplexity import evaluate_loss, perplexity
from gpt.model.config import ConfigError
from gpt.model.loss import IGNORE_INDEX, at_least_float32, count_targets, lm_loss
from gpt.model.model import GPT
from gpt.objectives.teacher import load_teacher
from gpt.training import metrics
from gpt.training.distributed import Dist
from gpt.training.record_data import RecordData, record_loaders, text_loaders
from gpt.training.run import Prepared, Run, register
from gpt.training.settings import TrainConfig, need_setting

ANSWER_COLUMN = "val_exact_match"
"""The extra column of a run on records: the share of validation answers that were exactly right."""
OBJECTIVE_COLUMN = "train_objective"
"""The training objective on the same batches as train_loss; only in runs whose objective is not
plain cross-entropy (a pretraining run's metrics.csv keeps
`gpt.training.metrics.METRICS_COLUMNS`)."""


def focal_loss(logits: Tensor, targets: Tensor, gamma: float,
               ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean focal loss -(1 - p)^gamma * log p over the targets that are not `ignore_index`.

    p is the probability the model gives the target token, softmax over the whole vocabulary (Lin et
    al. 2017, there over object classes). The factor (1 - p)^gamma shrinks the loss of tokens the
    model already predicts well, so their gradient goes to the hard ones; gamma 0 is plain
    cross-entropy. Computed in float32 (float64 if the logits are), like `lm_loss`.
    """
    logp = F.log_softmax(at_least_float32(logits.flatten(0, -2)), dim=-1)  # (N, V)
    targets = targets.flatten()
    counted = targets != ignore_index
    # ignored rows read token 0
    logp_target = logp.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    # 1 - p as -expm1(log p), which keeps the small difference where p rounds to 1.0. Where even log
    # p is 0 (a near-certain token), 1 - p is 0, and the gradient of pow(gamma < 1) there infinite:
    # the floor turns it into 0 (such a token's loss is 0 either way).
    one_minus_p = (-torch.expm1(logp_target)).clamp(min=torch.finfo(logp.dtype).tiny)
    modulation = one_minus_p.pow(gamma)
    return -(modulation * logp_target)[counted].mean()  # no counted target: NaN, as in lm_loss


def distillation_kl(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor,
                    temperature: float,
                    ignore_index: int = IGNORE_INDEX) -> Tensor:
    """KL(teacher_T || student_T), averaged over the positions whose target is not `ignore_index`.

    teacher_T = softmax(teacher_logits / T) and student_T the same for the student, over the
    vocabulary; per position KL = sum_k teacher_T[k] * (log teacher_T[k] - log student_T[k]), which
    is 0 exactly when the two distributions agree. A temperature above 1 flattens both, so the
    student also learns how the teacher ranks the unlikely tokens ("dark knowledge", Hinton et al.
    2015).
    """
    counted = targets.flatten() != ignore_index
    student = F.log_softmax(at_least_float32(student_logits.flatten(0, -2)[counted]) / temperature,
                            dim=-1)
    teacher = F.log_softmax(at_least_float32(teacher_logits.flatten(0, -2)[counted]) / temperature,
                            dim=-1)
    return (teacher.exp() * (teacher - student)).sum(dim=-1).mean()


@dataclass(frozen=True)
class CrossEntropy:
    """Cross-entropy or one of its variants, as `train.py`'s flags set it: what --objective lm
    minimises.

        hard   = lm_loss(logits, targets, label_smoothing)   or   focal_loss(logits, targets, gamma)
        loss   = hard                                                   (without a teacher)
               = (1 - A) * hard + A * T^2 * distillation_kl(logits, teacher_logits, targets, T)
                                                                            (with a teacher)

    The T^2 keeps the distillation gradient on the scale of the hard loss's as T changes (the
    softened softmax's gradient shrinks as 1/T^2). Validation losses stay plain cross-entropy
    (`lm_loss`), so runs with different objectives remain comparable.
    """

    label_smoothing: float = 0.0
    """Mix the one-hot target with the uniform distribution by this much (0 = plain cross-entropy).
    """
    focal_gamma: float = 0.0
    """Focal loss: weight each token's loss by (1 - p)^gamma (0 = plain cross-entropy)."""
    teacher: str | None = None
    """The model distilled from (a name or path, for messages); None trains on the targets alone."""
    distill_weight: float = 0.5
    """A: the share of the distillation term in the loss, in [0, 1] (used with a teacher only)."""
    distill_temperature: float = 2.0
    """T: both models' logits are divided by this before their softmax (used with a teacher only).
    """
    def __post_init__(self) -> None:
        need, finite = partial(need_setting, self), math.isfinite
        need(0 <= self.label_smoothing < 1, "label_smoothing", "in [0, 1)", "0.1")
        need(self.focal_gamma >= 0 and finite(self.focal_gamma), "focal_gamma", "0 or more", "2")
        need(0 <= self.distill_weight <= 1, "distill_weight", "in [0, 1]", "0.5")
        need(self.distill_temperature > 0 and finite(self.distill_temperature),
             "distill_temperature", "above 0", "2")
        if self.label_smoothing > 0 and self.focal_gamma > 0:
            raise UserError("--label-smoothing and --focal-gamma both reshape the cross-entropy "
                            "and do not combine here; give only one of them")

    @property
    def variant_flag(self) -> str | None:
        """The flag that makes this a variant of cross-entropy (--teacher, ...), or None."""
        return ("--teacher" if self.teacher is not None else "--label-smoothing"
                if self.label_smoothing
                else "--focal-gamma" if self.focal_gamma else None)

    @property
    def is_cross_entropy(self) -> bool:
        """Whether this is plain cross-entropy, the loss `head_loss` computes (also in chunks)."""
        return self.variant_flag is None

    def check_loss_chunk(self, loss_chunk: int) -> None:
        """Refuse `--loss-chunk` with a variant: the chunked head computes plain cross-entropy only,
        while the variants need each position's whole distribution (and the teacher's)."""
        if loss_chunk and self.variant_flag is not None:
            raise UserError(f"--loss-chunk computes plain cross-entropy only; drop --loss-chunk to "
                            f"train with {self.variant_flag}")

    def loss(self, logits: Tensor, targets: Tensor, teacher_logits: Tensor | None = None) -> Tensor:
        """The objective of `logits` (..., V) against `targets` (...), -100 targets left out; with a
        teacher, `teacher_logits` are its logits for the same inputs (computed without
        gradients)."""
        if self.focal_gamma > 0:
            hard = focal_loss(logits, targets, self.focal_gamma)
        else:
            hard = lm_loss(logits, targets, label_smoothing=self.label_smoothing)
        if self.teacher is None:
            return hard
        if teacher_logits is None:
            raise ValueError(f"CrossEntropy.loss: distilling from {self.teacher} needs its "
                             f"teacher_logits")
        weight, temperature = self.distill_weight, self.distill_temperature
        kl = distillation_kl(logits, teacher_logits, targets, temperature)
        return (1 - weight) * hard + weight * temperature**2 * kl


def objective_loss(objective: CrossEntropy, model: Callable[[Tensor], Tensor],
                   teacher: Callable[[Tensor], Tensor] | None, idx: Tensor, targets: Tensor, *,
                   chunk_size: int = 0) -> Tensor:
    """`objective.loss` of `model`'s logits for `idx` against `targets`: the micro-batch's mean
    loss.

    Called like `GPT.loss` (`functools.partial` binds the first three), under the caller's autocast;
    the `teacher`'s logits come from the same inputs under that autocast, without gradients.
    `chunk_size` must be 0: the variants need whole logits (`CrossEntropy.check_loss_chunk`).
    """
    if chunk_size:
        raise ValueError("objective_loss: the variants need whole logits; chunk_size must be 0")
    teacher_logits = None
    if teacher is not None:
        with torch.no_grad():
            teacher_logits = teacher(idx)
    return objective.loss(model(idx), targets, teacher_logits)


def training_loss(objective: CrossEntropy, model: GPT, teacher: Callable[[Tensor], Tensor] | None,
                  *, compile: bool = False) -> Callable[..., Tensor]:
    """What a training step calls, as `model.loss(idx, targets, chunk_size=...)`: `model.loss`
    for plain cross-entropy (the path `--loss-chunk` can split), else `objective_loss` bound to
    `objective`, `model` and `teacher`. With `compile`, through torch.compile: for plain
    cross-entropy the transformer only, the head's loss run as written (its chunked path fills
    buffers in place, and compiling it too would be a new speed option to measure first)."""
    if not objective.is_cross_entropy:
        loss = partial(objective_loss, objective, model, teacher)
        return torch.compile(loss) if compile else loss
    if not compile:
        # Looked up at each call: under FSDP, `Dist.wrap` replaces `model.loss` by the method that
        # gathers the root's shards, after this loss is made.
        return lambda idx, targets, *, chunk_size=0: model.loss(idx, targets, chunk_size=chunk_size)
    body = torch.compile(model.hidden_states)
    return lambda idx, targets, *, chunk_size=0: model.head_loss(body(idx), targets,
                                                                 chunk_size=chunk_size)


def cross_entropy(cfg: TrainConfig) -> CrossEntropy:
    """The variant of cross-entropy `cfg`'s flags select (which checks their values)."""
    return CrossEntropy(label_smoothing=cfg.label_smoothing, focal_gamma=cfg.focal_gamma,
                        teacher=cfg.teacher, distill_weight=cfg.distill_weight,
                        distill_temperature=cfg.distill_temperature)


class LanguageModeling:
    """--objective lm (`gpt.training.run.Objective`): the loss of the next token, on text or
    records."""

    name = "lm"
    loss_name = "cross-entropy loss"

    def check(self, cfg: TrainConfig) -> None:
        cross_entropy(cfg).check_loss_chunk(cfg.loss_chunk)

    def check_unused(self, cfg: TrainConfig) -> None:
        variant = cross_entropy(cfg).variant_flag
        if variant is not None:
            raise ConfigError(f"--objective {cfg.objective} has a loss of its own and does not "
                              f"combine with {variant}; drop {variant}")

    def prepare(self, cfg: TrainConfig, model: GPT, context_length: int,
                token_ids: tuple[np.ndarray, np.ndarray] | None, *, dist: Dist, dtype: torch.dtype,
                compile: bool) -> Prepared:
        """Records or text windows, and the loss of `cross_entropy(cfg)`; the teacher first, so that
        one that cannot teach stops the run before the token cache is written."""
        device = next(model.parameters()).device
        teacher = load_teacher(cfg.teacher, model.config, context_length, device) if cfg.teacher \
            else None
        if is_record_file(cfg.data):
            train_loader, eval_loaders, records = record_loaders(cfg, context_length, dist)
        else:
            train_loader, eval_loaders = text_loaders(cfg, context_length, token_ids, dist=dist,
                                                      pin_memory=device.type == "cuda")
            records = None
        loss = training_loss(cross_entropy(cfg), model, teacher, compile=compile)
        return Prepared(train_loader, eval_loaders, records, loss)

    def count(self, batches: Iterable[Sequence[Tensor]]) -> int:
        return count_targets(batches)

    def columns(self, cfg: TrainConfig, records: RecordData | None) -> tuple[str, ...]:
        answers = (ANSWER_COLUMN,) if records is not None and cfg.eval_answers else ()
        variant = () if cross_entropy(cfg).is_cross_entropy else (OBJECTIVE_COLUMN,)
        return metrics.columns(extra=answers + variant)

    def evaluate(self, run: Run) -> dict[str, float]:
        """Cross-entropy of the "train" and "val" evaluation batches; with a variant its own loss on
        the training batches too (the losses stay cross-entropy: runs compare); on records, the
        exact-match rate of the validation answers."""
        train_loss, val_loss = (
            evaluate_loss(run.model, run.eval_loaders[name], dtype=run.dtype,
                          chunk_size=run.cfg.loss_chunk, all_reduce=run.dist.sum_values)
            for name in ("train", "val"))
        row = {"train_loss": train_loss, "val_loss": val_loss,
               "val_perplexity": perplexity(val_loss)}
        if ANSWER_COLUMN in run.metrics.columns and run.records is not None:
            row[ANSWER_COLUMN] = val_exact_match(run.model, run.records.val_records,
                                                 run.records.template, limit=run.cfg.eval_answers,
                                                 dtype=run.dtype)
        if OBJECTIVE_COLUMN in run.metrics.columns:
            row[OBJECTIVE_COLUMN] = evaluate_loss(run.model, run.eval_loaders["train"],
                                                  dtype=run.dtype,
                                                  loss=run.loss, all_reduce=run.dist.sum_values)
        return row

    def accuracy_column(self, columns: Sequence[str]) -> str | None:
        """The exact match of a run on records, drawn on loss.png's second axis."""
        return ANSWER_COLUMN if ANSWER_COLUMN in columns else None

    def describe_row(self, row: dict[str, float]) -> str:
        train = f" (objective {row[OBJECTIVE_COLUMN]:.3f})" if OBJECTIVE_COLUMN in row else ""
        extra = [f"exact {row[ANSWER_COLUMN]:.0%}"] if ANSWER_COLUMN in row else []
        return metrics.format_row(row, train_note=train, extra=extra)

    def best_line(self, best: float) -> str:
        return f"loss {best:.4f} (perplexity {perplexity(best):.1f})"


register(LanguageModeling())
