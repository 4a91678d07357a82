"""GRPO: reinforcement learning against rewards that can be checked, with a group of samples as
baseline.

For each prompt the policy samples G completions (`decode_rows`, the project's KV-cached decoding);
each gets a reward (`gpt.objectives.rewards`), and its advantage is its reward against its group's
(`group_advantages`; Shao et al. 2024, DeepSeekMath). The loss of a completion token is PPO's
clipped surrogate (`ppo_clip_loss`), plus beta x the k3 estimate of the KL to a frozen reference
(`k3_kl`):

    ratio     = exp(log p(token) - log p_old(token))
    advantage = (reward - mean(group)) / (std(group) + 1e-4)      --scale-rewards none: no division
    loss      = -min(ratio * advantage, clamp(ratio, 1 - clip, 1 + clip) * advantage)
                + beta * (exp(ref - log p) - (ref - log p) - 1)

averaged over the completion tokens of a micro-batch (--loss-aggregation token) or over its
completions, each its tokens' mean (sequence); the prompt and the padding carry no loss.

How it plugs into the loop (`gpt.training.run.Objective`), which knows nothing of sampling: a batch
of the training loader is a batch of prompts with its place in the data order (`prompt_collate`),
and the loss the step calls (`GRPOStep`) samples the batch's completions, scores them, and returns
the loss of the sampled tokens. With --updates-per-rollout K the loader hands every batch out K
times (`RolloutBatchSampler`: --grad-accum batches, then the same ones again, K times), and the step
keeps the rollout between them (`RolloutState`): the first update samples and keeps its
log-probabilities as the "old" ones (the same weights sampled them, so its ratio is exactly 1), the
later ones reuse both.
The kept rollouts and the metrics gathered since the last evaluation are part of the sampler's
state, so a checkpoint taken between two updates of one rollout resumes exactly. Sampling draws from
a generator of its own per prompt, seeded with (--seed, epoch, record): the same prompt gets the
same random numbers whatever batch, rank or resumed run it is in.

At each evaluation the fixed training and validation prompts are answered greedily: "train_loss" and
"val_loss" are minus their mean rewards, so best/ and early stopping follow the validation mean
reward (higher is better); `GRPO_EXTRA` are the sampled rollouts' metrics since the last evaluation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from gpt.base.device import autocast
from gpt.base.errors import UserError
from gpt.data.records import is_record_file
from gpt.model.config import ConfigError, GPTConfig
from gpt.model.loss import IGNORE_INDEX, at_least_float32
from gpt.model.model import GPT
from gpt.model.tokenizer import get_tokenizer
from gpt.objectives.rewards import (
    PromptRecord,
    Reward,
    check_references,
    load_prompts,
    parse_rewards,
    score,
)
from gpt.objectives.rollouts import (
    PromptDataset,
    Rollout,
    RolloutBatchSampler,
    RolloutState,
    completion_targets,
    completion_texts,
    decode_rows,
    prompt_collate,
    rollout_seed,
)
from gpt.objectives.teacher import as_base, base_is_reference, load_frozen
from gpt.training import metrics
from gpt.training.distributed import Dist
from gpt.training.record_data import RecordData, dataset_loaders, split_records
from gpt.training.run import Prepared, Run, register
from gpt.training.settings import TrainConfig, flag, need_setting

VAL_COLUMN = "val_reward"
"""The mean reward of the greedy answers to the validation prompts (in place of val_perplexity)."""
GRPO_EXTRA = ("train_reward", "reward_std", "equal_groups", "completion_tokens", "kl",
              "clip_fraction",
              "sample_seconds", "learn_seconds")
"""The sampled rollouts since the last evaluation: their mean reward, the mean of each group's
reward std, the share of groups whose rewards were all equal (they teach nothing), the mean
completion length in tokens (end-of-text included), the mean k3 KL to the reference per completion
token (nan without --kl-beta), the share of completion tokens whose ratio was clipped, and the
seconds spent sampling (decoding, rewards, the reference) and learning (forward, backward,
optimizer)."""
EPS = 1e-4
"""Added to a group's reward std before dividing by it."""

# ---- the formulas -------------------------------------------------------------------------------


def group_advantages(rewards: Tensor, group_size: int, scale: bool = True,
                     eps: float = EPS) -> Tensor:
    """Each reward against its group's: (r - mean) / (std + eps), or r - mean without `scale`.

    `rewards` (N,) holds N / group_size groups, each of `group_size` consecutive completions of one
    prompt; std is the sample standard deviation (n - 1), as in TRL. A group whose rewards are all
    equal gets advantages of exactly 0 (not NaN, nor rounding noise from its mean).
    """
    groups = rewards.view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    equal = groups.amax(dim=1, keepdim=True) == groups.amin(dim=1, keepdim=True)
    return centred.masked_fill(equal, 0.0).view(-1)


def ppo_clip_terms(log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor,
                   clip_ratio: float) -> Tensor:
    """-min(ratio * A, clamp(ratio, 1 - clip, 1 + clip) * A) per element, ratio = exp(log p - log
    p_old)."""
    ratio = torch.exp(log_probs - old_log_probs)
    clipped = ratio.clamp(1 - clip_ratio, 1 + clip_ratio)
    return -torch.min(ratio * advantages, clipped * advantages)


def ppo_clip_loss(log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, clip_ratio: float,
                  mask: Tensor | None = None) -> Tensor:
    """PPO's clipped surrogate loss, -mean(min(ratio * A, clamp(ratio, 1 - clip, 1 + clip) * A)).

    `advantages` broadcast against the log-probabilities (one per sequence: shape (N, 1) for (N, T)
    tokens); `mask` (True where a token counts) makes it the mean over the counted elements. With
    `old_log_probs` = `log_probs.detach()` the ratio is 1 and the gradient is REINFORCE's, -A grad
    log p.
    """
    terms = ppo_clip_terms(log_probs, old_log_probs, advantages, clip_ratio)
    if mask is None:
        return terms.mean()
    return (terms * mask).sum() / mask.sum()


def k3_kl(log_probs: Tensor, ref_log_probs: Tensor) -> Tensor:
    """The k3 estimate of KL(policy || reference) per sampled token: exp(d) - d - 1, d = ref - log p
    (Schulman 2020): never negative, 0 where the two agree, and unbiased for tokens drawn from the
    policy."""
    delta = ref_log_probs - log_probs
    return torch.exp(delta) - delta - 1


def aggregate(terms: Tensor, mask: Tensor, how: str) -> Tensor:
    """The loss of per-token `terms` (N, T) over the tokens `mask` keeps: "token", the mean over all
    of them; "sequence", the mean over rows of each row's mean (every row has a kept token)."""
    terms = terms * mask
    if how == "token":
        return terms.sum() / mask.sum()
    return (terms.sum(dim=1) / mask.sum(dim=1)).mean()


def token_logps(logits: Tensor, targets: Tensor) -> Tensor:
    """log p of each target token (N, T) from `logits` (N, T, V), in float32; 0 where the target is
    `IGNORE_INDEX` (the prompt, the padding)."""
    nll = F.cross_entropy(at_least_float32(logits.flatten(0, 1)), targets.flatten(),
                          ignore_index=IGNORE_INDEX, reduction="none")
    return -nll.view(targets.shape)


# ---- the step -----------------------------------------------------------------------------------


class GRPOStep:
    """What a GRPO run's steps call, `loss(prompts, lengths, indices, place, chunk_size=0)` on a
    batch of `prompt_collate`: its first update samples the batch's rollout (`sample`), every update
    returns the loss of the rollout's completion tokens under `model` (see the module docstring). It
    also answers the evaluation prompts greedily (`greedy_rewards`)."""

    def __init__(self, cfg: TrainConfig, model: GPT, reference: GPT | None,
                 rewards: Sequence[Reward],
                 prompts: Sequence[PromptRecord], state: RolloutState) -> None:
        self.model, self.reference, self.rewards, self.prompts, self.state = (
            model, reference, list(rewards), list(prompts), state)
        self.group_size, self.max_new_tokens, self.seed = (cfg.group_size, cfg.rollout_tokens,
                                                           cfg.seed)
        self.sampling = dict(temperature=cfg.rollout_temperature, top_k=cfg.rollout_top_k,
                             top_p=cfg.rollout_top_p)
        self.clip_ratio, self.kl_beta, self.updates = (cfg.clip_ratio, cfg.kl_beta,
                                                       cfg.updates_per_rollout)
        self.aggregation, self.scale = cfg.loss_aggregation, cfg.scale_rewards == "group"
        self.tokenizer = get_tokenizer()
        self.mark: float | None = None
        """When the last sampling ended: the time since is learning (until an evaluation)."""

    def __call__(self, prompts: Tensor, lengths: Tensor, indices: Tensor, place: Tensor, *,
                 chunk_size: int = 0) -> Tensor:
        if chunk_size:
            raise ValueError("GRPOStep: the loss needs whole logits; chunk_size must be 0")
        epoch, batch, update = place.tolist()
        started = time.perf_counter()
        if self.mark is not None:
            self.state.add(learn_seconds=started - self.mark)
        rollout = self.state.rollouts.pop((epoch, batch), None)
        if rollout is None:  # the first update (or a resumed one whose rollout no checkpoint kept)
            rollout = self.sample(prompts, lengths, indices, epoch)
        else:
            rollout = rollout.to(prompts.device)
        self.mark = time.perf_counter()
        self.state.add(sample_seconds=self.mark - started)
        logps = token_logps(self.model(rollout.inputs), rollout.targets)
        # the weights that sampled it: the ratio is exactly 1 at this update
        if rollout.old is None:
            rollout.old = logps.detach()
        if update + 1 < self.updates:
            self.state.rollouts[epoch, batch] = rollout
        return self.loss(logps, rollout)

    def loss(self, logps: Tensor, rollout: Rollout) -> Tensor:
        """The loss of the policy's log-probabilities `logps` of `rollout`'s targets, and its
        metrics."""
        assert rollout.old is not None
        mask = rollout.targets != IGNORE_INDEX
        advantages = rollout.advantages[:, None]
        terms = ppo_clip_terms(logps, rollout.old, advantages, self.clip_ratio)
        with torch.no_grad():  # clipped: where the clamp took the gradient away
            ratio = torch.exp(logps - rollout.old)
            clipped = (((ratio < 1 - self.clip_ratio) & (advantages < 0))
                       | ((ratio > 1 + self.clip_ratio) & (advantages > 0))) & mask
            self.state.add(clipped=float(clipped.sum()), tokens=float(mask.sum()))
        if self.kl_beta > 0:
            assert rollout.reference is not None
            kl = k3_kl(logps, rollout.reference)
            terms = terms + self.kl_beta * kl
            self.state.add(kl_sum=float((kl.detach() * mask).sum()), kl_tokens=float(mask.sum()))
        return aggregate(terms, mask, self.aggregation)

    def sample(self, prompts: Tensor, lengths: Tensor, indices: Tensor, epoch: int) -> Rollout:
        """G completions of each prompt of the batch (one batch for them all), their rewards and
        advantages, and with --kl-beta the reference's log-probabilities of them."""
        size, device = self.group_size, prompts.device
        uniforms = torch.cat([torch.rand(size, self.max_new_tokens,
                                         generator=torch.Generator().manual_seed(
            rollout_seed(self.seed, epoch, index))) for index in indices.tolist()]).to(device)
        rows, row_lengths = prompts.repeat_interleave(size, dim=0), lengths.repeat_interleave(size)
        seq, new = decode_rows(self.model, rows, row_lengths, self.max_new_tokens,
                               uniforms=uniforms,
                               **self.sampling)  # type: ignore[arg-type]
        seq, new = seq.clone(), new.clone()  # out of inference mode: the loss's backward reads them
        texts = completion_texts(seq, row_lengths, new, self.tokenizer)
        records = [self.prompts[index] for index in indices.tolist() for _ in range(size)]
        rewards = torch.tensor([score(self.rewards, record, text) for record, text in zip(records,
                                                                                          texts,
                                                                                          strict=True)])
        groups = rewards.view(-1, size)
        self.state.add(rewards=len(rewards), reward_sum=float(rewards.sum()), groups=len(groups),
                       group_std_sum=float(groups.std(dim=1).sum()),
                       equal_groups=float((groups.amax(dim=1) == groups.amin(dim=1)).sum()),
                       completion_tokens=float(new.sum()))
        inputs, targets = completion_targets(seq, row_lengths, new)
        reference = None
        if self.reference is not None:  # a LoRA policy's reference is its base: adapters off
            with torch.no_grad(), as_base(self.reference):
                reference = token_logps(self.reference(inputs), targets)
        return Rollout(inputs, targets, group_advantages(rewards, size, self.scale).to(device),
                       reference)

    def greedy_rewards(self, loader: Iterable[Sequence[Tensor]], prompts: Sequence[PromptRecord],
                       dtype: torch.dtype) -> list[float]:
        """[sum of the rewards, count] of the greedy completions of the prompts of `loader`'s
        batches."""
        device = next(self.model.parameters()).device
        total, count = 0.0, 0
        with autocast(device, dtype):
            for batch, lengths, indices, _ in loader:
                seq, new = decode_rows(self.model, batch.to(device), lengths, self.max_new_tokens)
                texts = completion_texts(seq, lengths, new, self.tokenizer)
                total += sum(score(self.rewards, prompts[index], text)
                             for index, text in zip(indices.tolist(), texts, strict=True))
                count += len(texts)
        return [total, count]


def load_reference(cfg: TrainConfig, policy: GPTConfig, device: torch.device) -> GPT:
    """The frozen reference of the KL term: --reference, or else the --init weights as the run's
    model was built from them; of the policy's vocabulary and shape (it is where the policy starts
    from)."""
    flag_, name = ("--reference", cfg.reference) if cfg.reference else ("--init", cfg.init)
    reference = load_frozen(name, flag_, device, **({} if cfg.reference else cfg.model_overrides))
    shape, wanted = ((c.vocab_size, c.n_layers, c.n_heads, c.emb_dim) for c in (reference.config,
                                                                                policy))
    if shape != wanted:
        raise UserError(f"{flag_} {name} has another vocabulary or shape (vocabulary, layers, "
                        f"heads, width: "
                        f"{shape}) than the trained model ({wanted}); the KL compares their "
                        f"probabilities "
                        "of the same tokens, so choose the model training starts from")
    return reference


# ---- the objective -------------------------------------------------------------------------------


@dataclass
class PromptData(RecordData):
    """A GRPO run's prompts (`RecordData`, `val_records` for the samples) and its step."""

    step: GRPOStep | None = None
    group_size: int = 8
    rollout_tokens: int = 64

    def describe(self, kept: int, context_length: int) -> str:
        return (f"{kept} training prompts, {self.group_size} completions each of up to "
                f"{self.rollout_tokens} tokens, prompt template {self.template!r}")


SETTINGS = ("reward", "group_size", "clip_ratio", "kl_beta", "rollout_tokens",
            "rollout_temperature",
            "rollout_top_k", "rollout_top_p", "updates_per_rollout", "loss_aggregation",
            "scale_rewards")
"""GRPO's own settings (`TrainConfig` fields): refused in a run of another objective."""


class GRPO:
    """--objective grpo (`gpt.training.run.Objective`): sampled groups, checkable rewards, PPO's
    clip."""

    name = "grpo"
    loss_name = "minus the mean reward"

    def check(self, cfg: TrainConfig) -> None:
        """GRPO's settings, and what it needs besides: prompt records, masked prompts, whole logits,
        one forward per rank at a time."""
        need = partial(need_setting, cfg)

        if not is_record_file(cfg.data):
            raise ConfigError(f"--objective grpo samples answers to prompt records, not text "
                              f"({cfg.data!r}); "
                              'give --data FILE.jsonl with {"question", "answer"} or {"prompt"} '
                              'records')
        # every flag read, every file imported, before anything is written
        parse_rewards(cfg.reward)
        need(cfg.group_size >= 2, "group_size", "at least 2 (a group is the baseline)", 8)
        need(0 < cfg.clip_ratio < 1, "clip_ratio", "in (0, 1)", 0.2)
        need(cfg.kl_beta >= 0 and math.isfinite(cfg.kl_beta), "kl_beta", "0 or more", 0.04)
        need(cfg.rollout_tokens >= 1, "rollout_tokens", "at least 1", 64)
        need(cfg.rollout_temperature > 0 and math.isfinite(cfg.rollout_temperature),
             "rollout_temperature",
             "above 0 (a group of greedy answers is all alike)", 1.0)
        need(cfg.rollout_top_k is None or cfg.rollout_top_k >= 1, "rollout_top_k", "at least 1", 50)
        need(0 < cfg.rollout_top_p <= 1, "rollout_top_p", "in (0, 1]", 0.95)
        need(cfg.updates_per_rollout >= 1, "updates_per_rollout", "at least 1", 1)
        need(cfg.loss_aggregation in ("token", "sequence"), "loss_aggregation", "token or sequence",
             "token")
        need(cfg.scale_rewards in ("group", "none"), "scale_rewards", "group or none", "group")
        for refused, fix in ((cfg.loss_chunk, "drop --loss-chunk (the loss needs whole logits)"),
                             (cfg.compile, "drop --compile (decoding changes shape at every "
                                           "token)"),
                             (cfg.parallel == "fsdp", "use --parallel ddp (a rank's sampling may "
                                                      "stop "
                              "before another's, and FSDP's every forward is a collective)"),
                             (not cfg.mask_prompt, "drop --no-mask-prompt (only completions are "
                                                   "learnt)")):
            if refused:
                raise ConfigError(f"--objective grpo: {fix}")
        if cfg.reference is not None and cfg.kl_beta == 0:
            raise ConfigError("--reference is the model of the KL term, which --kl-beta 0 leaves "
                              "out; give --kl-beta (e.g. 0.04) or drop --reference")
        if cfg.kl_beta > 0 and cfg.reference is None and cfg.init == "scratch":
            raise ConfigError("--kl-beta keeps the model near the --init weights, and --init "
                              "scratch has none; pass --init (or --reference), or --kl-beta 0")

    def check_unused(self, cfg: TrainConfig) -> None:
        defaults = TrainConfig()
        for name in SETTINGS:
            if getattr(cfg, name) != getattr(defaults, name):
                raise ConfigError(f"{flag(name)} is a setting of --objective grpo; add --objective "
                                  f"grpo, or drop {flag(name)}")

    def prepare(self, cfg: TrainConfig, model: GPT, context_length: int,
                token_ids: tuple[np.ndarray, np.ndarray] | None, *, dist: Dist, dtype: torch.dtype,
                compile: bool) -> Prepared:
        """The prompts and rewards (checked against each other), the reference with --kl-beta, and
        the step."""
        room = context_length - cfg.rollout_tokens
        if room < 1:
            raise UserError(f"--rollout-tokens {cfg.rollout_tokens} leaves no room for a prompt in "
                            f"the context of {context_length} tokens; use --rollout-tokens "
                            f"{context_length // 2} "
                            "or fewer")
        rewards = parse_rewards(cfg.reward)
        train, val = split_records(cfg.data, cfg.val_data, cfg.val_fraction, cfg.seed, load_prompts)
        check_references(rewards, train + val)
        template = cfg.prompt_template or train[0].record.kind
        tokenizer = get_tokenizer()
        datasets = {name: PromptDataset(prompts, tokenizer, template, room, context_length)
                    for name, prompts in (("train", train), ("val", val))}
        _, eval_loaders, _ = dataset_loaders(datasets, cfg, prompt_collate, dist)
        state = RolloutState()
        sampler = RolloutBatchSampler(datasets["train"].lengths(), cfg.batch_size * dist.world_size,
                                      cfg.seed, updates=cfg.updates_per_rollout,
                                      grad_accum=cfg.grad_accum,
                                      state=state, rank=dist.rank, world_size=dist.world_size)
        train_loader = DataLoader(datasets["train"], batch_sampler=sampler,
                                  collate_fn=prompt_collate)
        # iterating draws nothing from the global generator
        train_loader.generator = torch.Generator()
        device = next(model.parameters()).device
        reference = None
        if cfg.kl_beta > 0:  # a LoRA policy is its own reference (`as_base`): no second copy
            reference = (model if base_is_reference(model, cfg.reference)
                         else load_reference(cfg, model.config, device))
        step = GRPOStep(cfg, model, reference, rewards, train, state)
        records = PromptData(template, datasets["val"].records, 0, sampler.padded_tokens(),
                             (datasets["train"], datasets["val"]), what="prompts",
                             rows_per_example=cfg.group_size, step=step, group_size=cfg.group_size,
                             rollout_tokens=cfg.rollout_tokens)
        return Prepared(train_loader, eval_loaders, records, step)

    def count(self, batches: Iterable[Sequence[Tensor]]) -> int:
        """Prompts: each micro-batch's loss is a mean over its own completions (or their tokens)."""
        return sum(len(batch[0]) for batch in batches)

    def columns(self, cfg: TrainConfig, records: RecordData | None) -> tuple[str, ...]:
        return metrics.columns(val=(VAL_COLUMN,), extra=GRPO_EXTRA)

    def evaluate(self, run: Run) -> dict[str, float]:
        """The greedy answers' mean rewards (train_loss and val_loss are minus them), and the
        rollouts' metrics since the last evaluation, over all ranks."""
        records = cast(PromptData, run.records)
        step = records.step
        assert step is not None
        if step.mark is not None:  # the last step's learning ended here
            step.state.add(learn_seconds=time.perf_counter() - step.mark)
            step.mark = None
        train_set, val_set = records.datasets
        greedy = [step.greedy_rewards(run.eval_loaders[name], dataset.prompts, run.dtype)
                  for name, dataset in (("train", train_set), ("val", val_set))]
        stats = step.state.take_stats()
        sums = run.dist.sum_values([*greedy[0], *greedy[1], *stats.values()])
        (train_total, train_count, val_total, val_count), totals = sums[:4], dict(zip(stats,
                                                                                      sums[4:],
                                                                                      strict=True))

        def ratio(part: str, whole: str) -> float:
            return totals[part] / totals[whole] if totals[whole] else math.nan

        val_reward = val_total / val_count
        # not -0.0
        return {"train_loss": 0.0 - train_total / train_count, "val_loss": 0.0 - val_reward,
                VAL_COLUMN: val_reward, "train_reward": ratio("reward_sum", "rewards"),
                "reward_std": ratio("group_std_sum", "groups"),
                "equal_groups": ratio("equal_groups", "groups"),
                "completion_tokens": ratio("completion_tokens", "rewards"),
                "kl": ratio("kl_sum", "kl_tokens"), "clip_fraction": ratio("clipped", "tokens"),
                "sample_seconds": totals["sample_seconds"] / run.dist.world_size,
                "learn_seconds": totals["learn_seconds"] / run.dist.world_size}

    def accuracy_column(self, columns: Sequence[str]) -> str | None:
        return None

    def describe_row(self, row: dict[str, float]) -> str:
        extra = []
        if not math.isnan(row["train_reward"]):
            extra.append(f"sampled reward {row['train_reward']:.3f} (group std "
                         f"{row['reward_std']:.3f}, "
                         f"{row['equal_groups']:.0%} of groups all equal), "
                         f"{row['completion_tokens']:.1f} "
                         f"tokens, clipped {row['clip_fraction']:.1%}")
            if not math.isnan(row["kl"]):
                extra.append(f"KL {row['kl']:.4f}")
            extra.append(f"sampling {row['sample_seconds']:.1f}s, learning "
                         f"{row['learn_seconds']:.1f}s")
        return metrics.format_row(row, val_note=f"mean reward {row[VAL_COLUMN]:.3f}", extra=extra)

    def best_line(self, best: float) -> str:
        return f"mean reward {0.0 - best:.4f}"


register(GRPO())
