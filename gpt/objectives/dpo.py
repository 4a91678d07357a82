"""Direct Preference Optimization: its loss, the log-probabilities it compares, the reference, the
metrics.

DPO (Rafailov et al. 2023) tunes a model, the policy pi, towards the responses people prefer, with
no reward model and no sampling. For a prompt x with a chosen response y_w and a rejected one y_l:

    loss = -log sigmoid(beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log
    pi_ref(y_l|x))])

log pi(y|x) is the sum of the log-probabilities of the response's tokens (`sequence_logps`; the
prompt's are masked as in fine-tuning) and pi_ref the reference: a frozen copy of the weights
training starts from (`load_reference`). beta * (log pi(y|x) - log pi_ref(y|x)) is the response's
implicit reward; the loss raises the chosen response's above the rejected one's, and pi_ref
anchors pi where the pairs say nothing. At the start pi = pi_ref: every reward is 0, the loss log 2.

The reference never changes, so its log-probabilities are computed once per pair before training
(`cache_reference`) and travel with the batches (`gpt.data.pairs.pair_collate`): a step runs one
model, on the pairs' two responses in one padded batch (`pair_loss`, set up by `prepare_dpo`).
`evaluate_dpo` measures what a DPO run logs at each evaluation (`DPO_COLUMNS`). `DPO` is the
objective the loop sees (`gpt.training.run.Objective`), registered as --objective dpo.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from gpt.base.device import autocast, eval_mode
from gpt.base.errors import UserError
from gpt.data.pairs import PreferenceDataset, load_pairs, pair_collate
from gpt.data.records import is_record_file
from gpt.eval.answers import val_exact_match
from gpt.model.config import ConfigError, GPTConfig
from gpt.model.loss import IGNORE_INDEX, at_least_float32
from gpt.model.model import GPT
from gpt.model.tokenizer import get_tokenizer
from gpt.objectives.lm import ANSWER_COLUMN
from gpt.objectives.teacher import as_base, base_is_reference, load_frozen
from gpt.training import metrics
from gpt.training.distributed import Dist
from gpt.training.record_data import RecordData, dataset_loaders, resolve_template, split_records
from gpt.training.run import Prepared, Run, register
from gpt.training.settings import TrainConfig

CHOSEN_FALL_WARNING = 5.0
"""Nats the validation chosen responses' mean log-probability may fall below its first evaluation's
before the run warns (about 150 times less likely): DPO widens the margin by pushing the rejected
responses down, and may push the chosen ones down with them until the model answers nothing well."""
DPO_COLUMNS = ("val_reward_accuracy", "val_reward_margin", "val_chosen_logp", "val_rejected_logp")
"""A DPO run's columns in place of val_perplexity, all of the validation pairs: the share whose
chosen response has the higher implicit reward, the mean reward margin (chosen minus rejected), and
the mean log-probabilities of the chosen and of the rejected responses."""

# ---- the loss -----------------------------------------------------------------------------------


def sequence_logps(logits: Tensor, targets: Tensor) -> Tensor:
    """log p(response | prompt) of each row: the sum of the log-probabilities of its counted
    targets.

    logits (N, T, V), targets (N, T) with `IGNORE_INDEX` at the prompt and the padding -> (N,),
    computed in float32 (float64 for float64 logits), like `gpt.model.loss.lm_loss`.
    """
    token_nll = F.cross_entropy(at_least_float32(logits.flatten(0, 1)), targets.flatten(),
                                ignore_index=IGNORE_INDEX, reduction="none")  # 0 at ignored targets
    return -token_nll.view(targets.shape).sum(dim=1)


def dpo_losses(policy: Tensor, reference: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """(losses (B,), rewards (2B,)) of B pairs, from the policy's and the reference's
    log-probabilities (2B,) of their responses, the B chosen ones first (as `pair_collate` lays them
    out)."""
    rewards = beta * (policy - reference)
    chosen, rejected = rewards.chunk(2)
    return -F.logsigmoid(chosen - rejected), rewards


def chosen_nll(policy: Tensor, targets: Tensor) -> Tensor:
    """The mean negative log-likelihood per token of the chosen responses (the first half of
    `pair_collate`'s rows), from their summed log-probabilities `policy` (2B,): RPO's added term,
    as TRL's rpo_alpha computes it (cross-entropy over the chosen responses' tokens)."""
    chosen_tokens = (targets.chunk(2)[0] != IGNORE_INDEX).sum()
    return -policy.chunk(2)[0].sum() / chosen_tokens


def pair_loss(beta: float, model: Callable[[Tensor], Tensor], inputs: Tensor, targets: Tensor,
              reference: Tensor, *, chunk_size: int = 0, rpo_alpha: float = 0.0) -> Tensor:
    """The mean DPO loss of one batch of pairs (`pair_collate`'s), chosen and rejected responses
    read in one forward pass: what a DPO run's steps call (`prepare_dpo` binds `beta` and `model`),
    plus `rpo_alpha` x the chosen responses' `chosen_nll` (RPO, Pang et al. 2024; 0: plain DPO).
    `chunk_size` must be 0: the whole logits are needed
    (`gpt.objectives.lm.Objective.check_loss_chunk`)."""
    if chunk_size:
        raise ValueError("pair_loss: DPO needs whole logits; chunk_size must be 0")
    policy = sequence_logps(model(inputs), targets)
    losses, _ = dpo_losses(policy, reference, beta)
    return losses.mean() + rpo_alpha * chosen_nll(policy, targets) if rpo_alpha else losses.mean()


def count_pairs(batches: Iterable[Sequence[Tensor]]) -> int:
    """The pairs of `pair_collate` batches: what a DPO step's loss is the mean over."""
    return sum(len(batch[0]) // 2 for batch in batches)


# ---- the reference ------------------------------------------------------------------------------


def load_reference(cfg: TrainConfig, policy: GPTConfig, device: torch.device) -> GPT:
    """The frozen reference of a DPO run: `--reference`, or else the `--init` weights as the run's
    model was first built from them (with its settings' overrides, `TrainConfig.model_overrides`).
    It must have the policy's vocabulary and shape: its log-probabilities are of the same tokens,
    and it is meant to be where the policy starts from."""
    flag, name = ("--reference", cfg.reference) if cfg.reference else ("--init", cfg.init)
    reference = load_frozen(name, flag, device, **({} if cfg.reference else cfg.model_overrides))
    if reference.config.vocab_size != policy.vocab_size:
        raise UserError(f"{flag} {name} predicts {reference.config.vocab_size} token ids and the "
                        f"trained model {policy.vocab_size}; DPO compares their log-probabilities "
                        f"of the same "
                        "tokens, so choose a reference trained with the same tokenizer")
    shape, wanted = ((c.n_layers, c.n_heads, c.emb_dim, c.context_length)
                     for c in (reference.config, policy))
    if shape != wanted:
        raise UserError(f"{flag} {name} has another shape (layers, heads, width, context: {shape}) "
                        f"than the trained model ({wanted}); the reference is the model's starting "
                        f"point, so "
                        "choose one of the same shape (or drop --reference: the --init weights)")
    return reference


@torch.no_grad()
def batch_logps(model: GPT, inputs: Tensor, targets: Tensor, dtype: torch.dtype) -> Tensor:
    """`sequence_logps` of `model` (in the mode it is in) for one batch, under autocast to `dtype`.
    """
    device = next(model.parameters()).device
    with autocast(device, dtype):
        return sequence_logps(model(inputs.to(device)), targets.to(device))


def cache_reference(reference: GPT, datasets: Iterable[PreferenceDataset], batch_size: int,
                    dtype: torch.dtype) -> None:
    """Set every dataset's `reference`: the reference model's log-probabilities of both responses of
    each pair, `batch_size` pairs at a time in the pairs' order (fixed batches, so a resumed run
    computes the same numbers again, bit for bit)."""
    for dataset in datasets:
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=pair_collate,
                            # iterating draws no number from the global one
                            generator=torch.Generator())
        rows = [batch_logps(reference, inputs, targets, dtype).view(2, -1).t()
                for inputs, targets, _ in loader]
        dataset.reference = torch.cat(rows).float().cpu()  # (pairs, 2): chosen, rejected


def prepare_dpo(cfg: TrainConfig, model: GPT, pairs: Iterable[PreferenceDataset],
                dtype: torch.dtype, measure: Callable[[GPT], None] | None = None,
                ) -> Callable[..., Tensor]:
    """The loss a DPO run's steps call, `loss(inputs, targets, reference, chunk_size=0)`
    (`pair_loss` bound to `model`; `gpt.training.distributed.Dist.wrap` compiles it, or puts it
    under DDP), once the reference (`load_reference`) has been run over every pair
    (`cache_reference`) and let go: from here on a step runs `model` alone. Under torchrun every
    rank caches every pair's numbers: the same on all ranks, whichever pairs each one's batches
    hold. `measure(reference)` is called before the reference is let go (to measure the starting
    point). A model with LoRA adapters (`--lora-rank`) is its own reference, its adapters
    switched off (`gpt.objectives.teacher.as_base`): its base is the --init weights, so no second
    copy of them is loaded (unless --reference names another model)."""
    frozen = (as_base(model) if base_is_reference(model, cfg.reference)  # no second copy
              else contextlib.nullcontext(load_reference(cfg, model.config,
                                                         next(model.parameters()).device)))
    with frozen as reference:
        cache_reference(reference, pairs, cfg.batch_size, dtype)
        if measure is not None:
            measure(reference)
    return partial(pair_loss, cfg.dpo_beta, model, rpo_alpha=cfg.rpo_alpha)


# ---- the metrics --------------------------------------------------------------------------------


def evaluate_pairs(model: GPT, loader: Iterable[Sequence[Tensor]], beta: float,
                   dtype: torch.dtype = torch.float32,
                   all_reduce: Callable[[list[float]], list[float]] | None = None) -> dict[str,
                                                                                           float]:
    """The DPO metrics of the pairs `loader` gives (`pair_collate` batches), in eval mode (put back
    after): "loss" (the mean DPO loss), "accuracy" (the share of pairs whose chosen response has the
    higher reward; a tie is not), "margin" (the mean chosen-minus-rejected reward), "chosen_logp"
    and "rejected_logp" (the responses' mean log-probabilities under `model`). `all_reduce` sums the
    totals and the pair count over the ranks of a data-parallel run
    (`gpt.training.distributed.Dist.sum_values`), each of which read its own pairs: the means are
    then over all of them, the same on every rank."""
    with eval_mode(model):
        logps, references = zip(*((batch_logps(model, inputs, targets, dtype).view(2, -1),
                                   reference.view(2, -1)) for inputs, targets, reference in loader),
                                strict=True)
    # (2, pairs) each
    policy, reference = torch.cat(logps, dim=1).cpu(), torch.cat(references, dim=1)
    losses, rewards = dpo_losses(policy.flatten(), reference.flatten(), beta)
    chosen, rejected = rewards.chunk(2)
    totals = [losses.sum(), (chosen > rejected).sum(), (chosen - rejected).sum(),
              *policy.sum(dim=1)]
    sums = [float(total) for total in totals] + [float(losses.numel())]
    *sums, pairs = all_reduce(sums) if all_reduce else sums
    names = ("loss", "accuracy", "margin", "chosen_logp", "rejected_logp")
    return {name: total / pairs for name, total in zip(names, sums, strict=True)}


def evaluate_dpo(model: GPT, loaders: Mapping[str, Iterable[Sequence[Tensor]]], beta: float,
                 dtype: torch.dtype, all_reduce: Callable[[list[float]], list[float]] | None = None,
                 ) -> dict[str, float]:
    """A DPO run's evaluation: the DPO loss of the "train" and "val" evaluation batches, and the
    other metrics of the validation pairs, under their metrics.csv names (`DPO_COLUMNS`); over
    all ranks' batches with `all_reduce` (as in `evaluate_pairs`)."""
    train, val = (evaluate_pairs(model, loaders[name], beta, dtype, all_reduce)
                  for name in ("train", "val"))
    names = ("accuracy", "margin", "chosen_logp", "rejected_logp")
    return {"train_loss": train["loss"], "val_loss": val["loss"],
            **{column: val[name] for column, name in zip(DPO_COLUMNS, names, strict=True)}}


# ---- the objective ------------------------------------------------------------------------------


def preference_loaders(cfg: TrainConfig, context_length: int,
                       dist: Dist) -> tuple[DataLoader[Any], dict[str, DataLoader[Any]],
                                            RecordData]:
    """The loaders of a DPO run's preference pairs (`gpt.data.pairs`), split and batched as records
    are (`gpt.training.record_data`): each batch is `pair_collate`'s (inputs, targets, reference) of
    --batch-size pairs, 2 x --batch-size rows; under torchrun (`dist`), this rank's shares."""
    train, val = split_records(cfg.data, cfg.val_data, cfg.val_fraction, cfg.seed, load_pairs)
    template = resolve_template(cfg, train[0].kind, warn=dist.is_main)
    tokenizer = get_tokenizer()
    datasets = {name: PreferenceDataset(pairs, tokenizer, template, max_length=context_length)
                for name, pairs in (("train", train), ("val", val))}
    train_loader, eval_loaders, tokens = dataset_loaders(datasets, cfg, pair_collate, dist)
    chosen = [pair.record(pair.chosen) for pair in datasets["val"].pairs]  # the answers to sample
    # a pair: two rows
    records = RecordData(template, chosen, datasets["train"].dropped, 2 * tokens,
                         (datasets["train"], datasets["val"]), what="preference pairs",
                         rows_per_example=2)
    return train_loader, eval_loaders, records


def warn_chosen_fall(logged: Sequence[dict[str, float]], row: dict[str, float],
                     rpo_alpha: float) -> None:
    """Print one warning line when `row`'s mean chosen log-probability is more than
    `CHOSEN_FALL_WARNING` nats below the first `logged` row's and the previous row's was not (once
    per crossing, not at every evaluation)."""
    chosen = DPO_COLUMNS[2]
    if not logged:
        return
    fall, before = (logged[0][chosen] - value[chosen] for value in (row, logged[-1]))
    if fall > CHOSEN_FALL_WARNING >= before:
        fix = "raise --rpo-alpha" if rpo_alpha else "add --rpo-alpha 1"
        tqdm.write(f"warning: the chosen responses' log-probability fell by {fall:.1f} nats since "
                   f"step {logged[0]['step']:.0f} ({logged[0][chosen]:.2f} -> {row[chosen]:.2f}): "
                   f"DPO is pushing the chosen answers down too, a collapse; {fix}, or lower --lr")


class DPO:
    """--objective dpo (`gpt.training.run.Objective`): preference pairs against a frozen reference.
    """

    name = "dpo"
    loss_name = "DPO loss"

    def check(self, cfg: TrainConfig) -> None:
        """--dpo-beta, and what DPO needs besides: preference records, a trained start, masked
        prompts, whole logits."""
        if not (cfg.dpo_beta > 0 and math.isfinite(cfg.dpo_beta)):
            raise ConfigError(f"--dpo-beta must be above 0, got {cfg.dpo_beta!r}; e.g. --dpo-beta "
                              f"0.1")
        if not (cfg.rpo_alpha >= 0 and math.isfinite(cfg.rpo_alpha)):
            raise ConfigError(f"--rpo-alpha must be 0 or more, got {cfg.rpo_alpha!r}; e.g. "
                              f"--rpo-alpha 1")
        if cfg.loss_chunk:
            raise ConfigError("--loss-chunk computes plain cross-entropy only; drop --loss-chunk "
                              "to train with --objective dpo")
        if not is_record_file(cfg.data):
            raise ConfigError(f"--objective dpo trains on preference records, not text "
                              f"({cfg.data!r}); "
                              'give --data FILE.jsonl with {"prompt", "chosen", "rejected"} '
                              'records')
        if cfg.init == "scratch":
            raise ConfigError("--objective dpo tunes a trained model against a frozen copy of it; "
                              "pass --init with it (a fine-tuned run's runs/NAME/best, or gpt2)")
        if not cfg.mask_prompt:
            raise ConfigError("--objective dpo compares the log-probabilities of the responses "
                              "alone; drop --no-mask-prompt")

    def check_unused(self, cfg: TrainConfig) -> None:
        for flag, value in (("--reference", cfg.reference if cfg.objective != "grpo" else None),
                            ("--rpo-alpha", cfg.rpo_alpha or None)):
            if value is not None:  # GRPO's KL term has a --reference too
                raise ConfigError(f"{flag} is a setting of --objective dpo; add --objective dpo, "
                                  f"or drop {flag}")

    def prepare(self, cfg: TrainConfig, model: GPT, context_length: int,
                token_ids: tuple[np.ndarray, np.ndarray] | None, *, dist: Dist, dtype: torch.dtype,
                compile: bool) -> Prepared:
        """The pairs, then the reference run over them (`prepare_dpo`)."""
        train_loader, eval_loaders, records = preference_loaders(cfg, context_length, dist)
        start: dict[str, float] = {}
        loss = prepare_dpo(cfg, model, records.datasets, dtype,
                           measure=lambda reference: start.update(self.measure_start(
                               cfg, reference, records, dtype)))
        return Prepared(train_loader, eval_loaders, records, torch.compile(loss) if compile
                        else loss,
                        start=start)

    def measure_start(self, cfg: TrainConfig, reference: GPT, records: RecordData,
                      dtype: torch.dtype) -> dict[str, float]:
        """The reference's exact match of the validation chosen answers (with --eval-answers): the
        score a later evaluation must keep to become best/ (`may_be_best`)."""
        if not cfg.eval_answers:
            return {}
        return {ANSWER_COLUMN: val_exact_match(reference, records.val_records, records.template,
                                               limit=cfg.eval_answers, dtype=dtype)}

    def count(self, batches: Iterable[Sequence[Tensor]]) -> int:
        return count_pairs(batches)

    def columns(self, cfg: TrainConfig, records: RecordData | None) -> tuple[str, ...]:
        """`DPO_COLUMNS`, and with --eval-answers the greedy answers' exact match of the validation
        chosen responses (`ANSWER_COLUMN`), as in fine-tuning."""
        return metrics.columns(val=DPO_COLUMNS, extra=(ANSWER_COLUMN,) if cfg.eval_answers else ())

    def evaluate(self, run: Run) -> dict[str, float]:
        """`evaluate_dpo`, the exact match of the chosen answers, and a warning line (rank 0) when
        the chosen log-probability has just fallen more than `CHOSEN_FALL_WARNING` below the first
        evaluation's."""
        row = evaluate_dpo(run.model, run.eval_loaders, run.cfg.dpo_beta, run.dtype,
                           run.dist.sum_values)
        if ANSWER_COLUMN in run.metrics.columns and run.records is not None:
            row[ANSWER_COLUMN] = val_exact_match(run.model, run.records.val_records,
                                                 run.records.template, limit=run.cfg.eval_answers,
                                                 dtype=run.dtype)
        if run.dist.is_main:
            warn_chosen_fall(run.metrics.rows(), row, run.cfg.rpo_alpha)
        return row

    def accuracy_column(self, columns: Sequence[str]) -> str | None:
        return DPO_COLUMNS[0]

    def plot_panels(self, columns: Sequence[str]) -> dict[str, tuple[str, ...]]:
        """The chosen and rejected log-probabilities below the losses (a collapse shows there: both
        fall), and the exact match of the chosen answers when the run measures it."""
        panels: dict[str, tuple[str, ...]] = {"mean log-probability": DPO_COLUMNS[2:]}
        if ANSWER_COLUMN in columns:
            panels["exact match"] = (ANSWER_COLUMN,)
        return panels

    def may_be_best(self, run: Run, row: dict[str, float]) -> bool:
        """An evaluation whose chosen answers are answered exactly less often than by the
        reference (the model training started from, unless --reference) never becomes best/: a
        lower DPO loss then comes from a model that lost answers it gave."""
        start = run.start.get(ANSWER_COLUMN)
        return start is None or row[ANSWER_COLUMN] >= start

    def describe_row(self, row: dict[str, float]) -> str:
        accuracy, margin, chosen, rejected = DPO_COLUMNS
        extra = [f"exact {row[ANSWER_COLUMN]:.0%}"] if ANSWER_COLUMN in row else []
        return metrics.format_row(row, val_note=(
            f"reward accuracy {row[accuracy]:.0%}, margin {row[margin]:.3f}, log p chosen "
            f"{row[chosen]:.2f}, rejected {row[rejected]:.2f}"), extra=extra)

    def best_line(self, best: float) -> str:
        return f"DPO loss {best:.4f}"


register(DPO())
