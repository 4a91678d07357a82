"""Batches of records of similar length, in a resumable order: `BucketBatchSampler`.

Batches of records are padded to their longest record, so records of similar length go together:
shuffle, sort within chunks of `BUCKET_BATCHES` batches, cut into batches, shuffle the batches. Like
`gpt.data.windows.ResumableSampler` its order depends only on (seed, epoch) and it counts the
batches handed out, so a checkpoint resumes at exactly the next batch. Under torchrun its batches
are global ones of `batch_size x world_size` records, of which each rank takes its share
(`gpt.data.windows.rank_share`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler

from gpt.data.windows import rank_share

BUCKET_BATCHES = 16
"""Batches' worth of shuffled records sorted by length together: more means less padding but batches
of more alike lengths (a less random order)."""


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of indices of records of similar length, in an order fixed by (seed, epoch);
    resumable.

    `batch_size` is the global batch's: with `world_size` ranks, rank `rank` hands out its share of
    each; the one short batch (the records left over), if it has fewer records than there are ranks
    (one would get none), is left out."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, *, rank: int = 0,
                 world_size: int = 1) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.position = 0  # global batches of this epoch already handed out
        self.num_batches = math.ceil(len(self.lengths) / batch_size)
        if 0 < len(self.lengths) % batch_size < world_size:
            self.num_batches -= 1

    def batches(self, epoch: int) -> list[list[int]]:
        """Every global batch of `epoch`, in order."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        chunk = self.batch_size * BUCKET_BATCHES
        batches = []
        for start in range(0, len(order), chunk):
            part = sorted(order[start:start + chunk], key=self.lengths.__getitem__)
            batches += [part[i:i + self.batch_size] for i in range(0, len(part), self.batch_size)]
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return [batch for batch in batches if len(batch) >= self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.batches(self.epoch)
        while self.position < self.num_batches:
            self.position += 1
            yield list(rank_share(batches[self.position - 1], self.rank, self.world_size))
        self.epoch += 1
        self.position = 0

    def __len__(self) -> int:
        return self.num_batches - self.position

    def padded_tokens(self, epoch: int = 0) -> int:
        """Input tokens of `epoch`'s batches, padding included (what the steps of an epoch read)."""
        return sum(len(batch) * max(self.lengths[i] for i in batch)
                   for batch in self.batches(epoch))

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position, self.seed = state["epoch"], state["position"], state["seed"]
