"""GRPO's data side: prompts in batches handed out once per update, completions decoded for them,
and the rollouts kept between the updates of one batch (`gpt.objectives.grpo` is the objective).

    PromptDataset, prompt_collate   templated prompt records as token ids; a batch of them, with its
                                    place
    RolloutBatchSampler             the length-bucketed, resumable order of `BucketBatchSampler`,
                                    each
                                    batch handed out --updates-per-rollout times; its state holds
    RolloutState                    the rollouts between their updates and the metrics since the
                                    last
                                    evaluation
    decode_rows, draw               G completions of several prompts as one KV-cached batch
    completion_targets, ...         the sampled tokens as the loss reads them
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import tiktoken
import torch
from torch import Tensor
from torch.utils.data import Dataset

from gpt.base.device import eval_mode
from gpt.base.errors import UserError
from gpt.data.buckets import BucketBatchSampler
from gpt.data.records import Record, check_template, format_prompt
from gpt.data.windows import rank_share
from gpt.model.loss import IGNORE_INDEX
from gpt.model.model import GPT
from gpt.model.sampling import DecodeSession, nucleus
from gpt.model.tokenizer import ENDOFTEXT_ID
from gpt.objectives.rewards import PromptRecord

Place = tuple[int, int, int]
"""Where a batch is in the data order: (epoch, batch of the epoch, update of the batch); -1s for the
evaluation batches."""

# ---- prompts -------------------------------------------------------------------------------------


class PromptDataset(Dataset[tuple[Tensor, int, Place]]):
    """Prompt records as the token ids of their templated prompts, the last `room` of them (the rest
    of the context, `context_length`, is for the completion)."""

    def __init__(self, prompts: Sequence[PromptRecord], tokenizer: tiktoken.Encoding, template: str,
                 room: int, context_length: int) -> None:
        check_template(template)
        self.prompts = list(prompts)
        self.records: list[Record] = [prompt.record for prompt in self.prompts]
        texts = [format_prompt(template, record.prompt, record.input) for record in self.records]
        self.ids = [tokenizer.encode(text, disallowed_special=())[-room:] for text in texts]
        self.template = template
        self.context_length = context_length
        self.dropped = 0  # a long prompt keeps its end rather than being left out

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, item: int | tuple[int, int, int, int]) -> tuple[Tensor, int, Place]:
        """(prompt ids, index, place) of `item`: an index, or (index, epoch, batch, update) as
        `RolloutBatchSampler` hands them out."""
        index, epoch, batch, update = item if isinstance(item, tuple) else (item, -1, -1, 0)
        return torch.tensor(self.ids[index]), index, (epoch, batch, update)

    def lengths(self) -> list[int]:
        """The prompts' lengths in tokens (what the bucketed sampler sorts by)."""
        return [len(ids) for ids in self.ids]


def prompt_collate(batch: Sequence[tuple[Tensor, int, Place]]) -> tuple[Tensor, Tensor, Tensor,
                                                                        Tensor]:
    """(prompts (B, longest) padded with end-of-text, lengths (B,), record indices (B,), place
    (3,))."""
    lengths = [len(ids) for ids, _, _ in batch]
    prompts = torch.full((len(batch), max(lengths)), ENDOFTEXT_ID, dtype=torch.long)
    for row, (ids, _, _) in enumerate(batch):
        prompts[row, :len(ids)] = ids
    return (prompts, torch.tensor(lengths), torch.tensor([index for _, index, _ in batch]),
            torch.tensor(batch[0][2]))


# ---- the order of the batches, and what is kept between updates ----------------------------------


@dataclass
class Rollout:
    """One batch's sampled completions as the loss reads them."""

    inputs: Tensor
    targets: Tensor
    """The completion tokens; `IGNORE_INDEX` at the prompt and the padding (`completion_targets`).
    """
    advantages: Tensor
    """One per completion (`gpt.objectives.grpo.group_advantages`)."""
    reference: Tensor | None = None
    """The reference's log-probabilities of the targets, with --kl-beta."""
    old: Tensor | None = None
    """The policy's log-probabilities when it sampled them (set by the first update)."""

    def to(self, device: torch.device) -> Rollout:
        """This rollout on `device` (a checkpoint's is on the CPU)."""
        def move(tensor: Tensor | None) -> Tensor | None:
            return None if tensor is None else tensor.to(device)

        return Rollout(self.inputs.to(device), self.targets.to(device), self.advantages.to(device),
                       move(self.reference), move(self.old))


STATS = ("rewards", "reward_sum", "groups", "group_std_sum", "equal_groups", "completion_tokens",
         "kl_sum", "kl_tokens", "clipped", "tokens", "sample_seconds", "learn_seconds")
"""The sums `RolloutState.stats` keeps from one evaluation to the next."""


@dataclass
class RolloutState:
    """What a GRPO run keeps between steps: the rollouts whose later updates are still to come, by
    (epoch, batch), and the sums of the rollouts' metrics since the last evaluation (`STATS`)."""

    rollouts: dict[tuple[int, int], Rollout] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STATS, 0.0))

    def add(self, **values: float) -> None:
        """Add to the sums."""
        for name, value in values.items():
            self.stats[name] += value

    def take_stats(self) -> dict[str, float]:
        """The sums since the last call, which starts them again from 0."""
        stats, self.stats = self.stats, dict.fromkeys(STATS, 0.0)
        return stats

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values (a checkpoint loads weights-only)."""
        rollouts = [{"epoch": epoch, "batch": batch, **{name: value for name,
                                                        value in vars(rollout).items()
                                                         if value is not None}}
                    for (epoch, batch), rollout in self.rollouts.items()]
        return {"rollouts": rollouts, "stats": dict(self.stats)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rollouts = {(saved.pop("epoch"), saved.pop("batch")): Rollout(**saved)
                         for saved in (dict(entry) for entry in state.get("rollouts", []))}
        self.stats = {**dict.fromkeys(STATS, 0.0), **state.get("stats", {})}


class RolloutBatchSampler(BucketBatchSampler):
    """`BucketBatchSampler`'s batches of prompts, each handed out `updates` times: `grad_accum`
    batches (one optimizer step), then the same again, `updates` times in all, then the next ones.

    Each index comes as (index, epoch, batch, update) (`PromptDataset`), so the loss knows which
    rollout a batch's update belongs to. With more than one update the batches of an epoch that do
    not fill a last step of `grad_accum` are left out (a step must not hold two updates of one
    batch). Its state (a checkpoint's "sampler") includes `state`'s kept rollouts and metrics."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, *, updates: int,
                 grad_accum: int,
                 state: RolloutState, rank: int = 0, world_size: int = 1) -> None:
        super().__init__(lengths, batch_size, seed, rank=rank, world_size=world_size)
        self.updates, self.grad_accum, self.state = updates, grad_accum, state
        whole = self.num_batches // grad_accum * grad_accum  # whole steps of grad_accum batches
        self.base_batches = self.num_batches if updates == 1 else whole
        if self.base_batches == 0:
            raise UserError(f"{len(lengths)} training prompts make {self.num_batches} batches of "
                            f"--batch-size {batch_size // world_size}, fewer than --grad-accum "
                            f"{grad_accum} "
                            "that --updates-per-rollout repeats together; use more prompts or a "
                            "smaller --grad-accum or --batch-size")
        self.num_batches = self.base_batches * updates  # what the loader hands out in an epoch

    def locate(self, position: int) -> tuple[int, int]:
        """(batch, update) of the `position`-th batch handed out in an epoch."""
        chunk, offset = divmod(position, self.grad_accum * self.updates)
        size = min(self.grad_accum, self.base_batches - chunk * self.grad_accum)
        update, batch = divmod(offset, size)
        return chunk * self.grad_accum + batch, update

    def __iter__(self) -> Iterator[list[Any]]:
        batches = self.batches(self.epoch)
        while self.position < self.num_batches:
            batch, update = self.locate(self.position)
            self.position += 1
            yield [(index, self.epoch, batch, update)
                   for index in rank_share(batches[batch], self.rank, self.world_size)]
        self.epoch += 1
        self.position = 0

    def padded_tokens(self, epoch: int = 0) -> int:
        """Prompt tokens of `epoch`'s batches, padding and repeats included."""
        batches = self.batches(epoch)[:self.base_batches]
        return self.updates * sum(len(b) * max(self.lengths[i] for i in b) for b in batches)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rollouts": {**self.state.state_dict(), "rank": self.rank}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The data order, and the kept rollouts and metric sums if this rank saved them. Under
        torchrun rank 0 writes the checkpoint: another rank starts its sums from 0, and samples
        again a batch whose later updates were still to come (with the weights of the
        checkpoint)."""
        super().load_state_dict(state)
        kept = state.get("rollouts", {})
        self.state.load_state_dict(kept if kept.get("rank", 0) == self.rank else {})



def draw(logits: Tensor, uniforms: Tensor, temperature: float, top_k: int | None = None,
         top_p: float | None = None) -> Tensor:
    """One token per row of (N, V) logits from the distribution `gpt.model.sampling.sample_next`
    draws from (temperature, then top-k, then top-p), picked by inverting its CDF at `uniforms` (N,)
    in [0, 1) instead of by `torch.multinomial`: each row's randomness is its own (see
    `decode_rows`)."""
    logits = logits.float()
    candidates = None
    if top_k is not None and top_k < logits.size(-1):
        logits, candidates = torch.topk(logits, top_k, dim=-1)
    logits = logits / temperature
    if top_p is not None and top_p < 1.0:
        logits = nucleus(logits, top_p)
    cdf = torch.softmax(logits, dim=-1).cumsum(dim=-1)
    # The first token whose cumulative probability passes u: token i with probability p_i.
    choice = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], right=True)
    choice = choice.clamp(max=cdf.size(-1) - 1)
    return (choice if candidates is None else candidates.gather(-1, choice)).squeeze(-1)


@torch.inference_mode()
def decode_rows(model: GPT, prompts: Tensor, lengths: Tensor, max_new_tokens: int, *,
                temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                uniforms: Tensor | None = None, eos_id: int = ENDOFTEXT_ID) -> tuple[Tensor,
                                                                                     Tensor]:
    """Complete every row of `prompts` (N, T), row r's prompt being its first `lengths[r]` tokens,
    as one batch through the KV cache (`gpt.model.sampling.DecodeSession`): (sequences (N, S), new
    (N,)).

    Row r of the sequences is its prompt, then its `new[r]` completion tokens (up to
    `max_new_tokens`, the last one end-of-text if it stopped there), then end-of-text padding.
    Prompts of different lengths need no padding mask: decoding starts at the shortest, and a row
    still in its prompt is fed its own next prompt token instead of the drawn one, so every token
    sits at its true position. Temperature 0 is greedy; otherwise row r's j-th new token is drawn
    with `uniforms[r, j]` (`draw`). `T + max_new_tokens` must fit the model's context. In eval mode,
    restored after.
    """
    rows, width = prompts.shape
    device = prompts.device
    lengths = lengths.to(device)
    total = int(lengths.max()) + max_new_tokens
    seq = torch.full((rows, total), eos_id, dtype=torch.long, device=device)
    seq[:, :width] = prompts
    new = torch.zeros(rows, dtype=torch.long, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    start = int(lengths.min())
    with eval_mode(model):
        session = DecodeSession(model)
        logits = session.start(seq[:, :start])
        for position in range(start, total):
            if temperature == 0 or uniforms is None:
                drawn = logits.argmax(dim=-1)
            else:
                u = uniforms.gather(1, new.clamp(max=max_new_tokens - 1)[:, None]).squeeze(1)
                drawn = draw(logits, u, temperature, top_k, top_p)
            generating = (position >= lengths) & ~done
            # done rows: end-of-text already
            token = torch.where(generating, drawn, seq[:, position])
            seq[:, position] = token
            new += generating
            done |= generating & ((token == eos_id) | (new == max_new_tokens))
            if bool(done.all()) or position + 1 == total:
                break
            logits = session.step(token)
    return seq[:, :int((lengths + new).max())], new


def completion_targets(seq: Tensor, lengths: Tensor, new: Tensor) -> tuple[Tensor, Tensor]:
    """(inputs, targets) of decoded sequences for the loss: targets are the next tokens,
    `IGNORE_INDEX` except at the completion's (the prompt masked as in fine-tuning, the padding left
    out)."""
    inputs, targets = seq[:, :-1], seq[:, 1:].clone()
    # of each target in the sequence
    position = torch.arange(1, seq.size(1), device=seq.device)[None]
    lengths, new = lengths.to(seq.device)[:, None], new[:, None]
    counted = (position >= lengths) & (position < lengths + new)
    return inputs, targets.masked_fill(~counted, IGNORE_INDEX)


def completion_texts(seq: Tensor, lengths: Tensor, new: Tensor,
                     tokenizer: tiktoken.Encoding) -> list[str]:
    """The text of each row's completion, without its end-of-text."""
    texts = []
    for row, start, count in zip(seq.tolist(), lengths.tolist(), new.tolist(), strict=True):
        tokens = row[start:start + count]
        texts.append(tokenizer.decode(tokens[:-1] if tokens and tokens[-1] == ENDOFTEXT_ID
                                      else tokens))
    return texts


def rollout_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of the random numbers of record `index`'s completions in `epoch`."""
    return ((seed * 1_000_003 + epoch) * 1_000_003 + index) % 2**63
