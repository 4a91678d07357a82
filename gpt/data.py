"""Token ids -> training windows -> batches.

`SlidingWindowDataset` cuts a token array into (input, target) windows the way the book does
(`range(0, N - L, stride)`), but lazily: it keeps the one array and slices on demand, so its memory
is O(N) whatever the stride. `create_dataloader` wraps it with a seeded, resumable sampler.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler


class SlidingWindowDataset(Dataset[tuple[Tensor, Tensor]]):
    """Window i starts at s = i * stride: x = ids[s : s + L], y = ids[s + 1 : s + L + 1] (int64).

    There is a window for every start s with s + L + 1 <= N. `token_ids` may be a NumPy array (a
    memmap of a token cache included), a 1-D tensor or a list; it is kept as is, never copied per
    window, so a memmap stays on disk until a window is read.
    """

    def __init__(self, token_ids: np.ndarray | Tensor | list[int], context_length: int,
                 stride: int) -> None:
        if context_length < 1:
            raise ValueError(f"context_length must be >= 1, got {context_length}")
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        if isinstance(token_ids, list):
            token_ids = np.asarray(token_ids, dtype=np.int64)
        if token_ids.ndim != 1:
            raise ValueError(f"token_ids must be 1-D, got shape {tuple(token_ids.shape)}")
        self.token_ids = token_ids
        self.context_length = context_length
        self.stride = stride

    def __len__(self) -> int:
        n_starts = len(self.token_ids) - self.context_length  # starts s = 0 .. N - L - 1
        return max(0, (n_starts + self.stride - 1) // self.stride)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)} windows")
        start = i * self.stride
        chunk = self.token_ids[start:start + self.context_length + 1]  # L + 1 tokens
        chunk = torch.as_tensor(np.asarray(chunk, dtype=np.int64)) if not isinstance(
            chunk, Tensor) else chunk.long()
        return chunk[:-1], chunk[1:]


class ResumableSampler(Sampler[int]):
    """Shuffles (or not) with a generator seeded by (seed, epoch); remembers how far it got.

    The order of epoch e depends only on `seed` and e, so a checkpoint needs just (epoch, position)
    to resume mid-epoch at exactly the next batch: `state_dict()` / `load_state_dict()`.
    """

    def __init__(self, data_source: Sized, shuffle: bool, seed: int) -> None:
        self.num_samples = len(data_source)
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.position = 0  # samples of this epoch already handed out

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.num_samples, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        while self.position < self.num_samples:
            index = order[self.position]
            self.position += 1
            yield index
        self.epoch += 1
        self.position = 0

    def __len__(self) -> int:
        return self.num_samples - self.position

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position, self.seed = state["epoch"], state["position"], state["seed"]


def create_dataloader(token_ids: np.ndarray | Tensor | list[int], batch_size: int = 8,
                      context_length: int = 256, stride: int = 256, shuffle: bool = True,
                      drop_last: bool = True, seed: int = 0,
                      num_workers: int = 0) -> DataLoader[tuple[Tensor, Tensor]]:
    """A DataLoader of (x, y) batches, each (batch_size, context_length) int64.

    Its sampler (`loader.sampler`, a `ResumableSampler`) carries the epoch and position for exact
    resume. With `num_workers > 0` the loader pre-fetches batches, so a sampler's position runs
    ahead of the batches consumed; a checkpoint should record the batches it trained on instead.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dataset = SlidingWindowDataset(token_ids, context_length, stride)
    sampler = ResumableSampler(dataset, shuffle=shuffle, seed=seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                      num_workers=num_workers, pin_memory=torch.cuda.is_available())
