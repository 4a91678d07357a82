"""Training data: token ids -> (train, validation) split -> windows -> seeded, resumable batches.

Where the ids come from is two modules down: `gpt.data.corpora` says what a `--data` string names
and reads it, `gpt.data.token_cache` tokenizes it once into a memmapped file. This module starts
from those ids. `split_tokens` / `prepare_data` give the (train, validation) arrays, as views of the
one memmap. `SlidingWindowDataset` cuts an array into (input, target) windows the way the book does
(`range(0, N - L, stride)`), but lazily: it keeps the one array and slices on demand, so its memory
is O(N) whatever the stride, and a memmap stays on disk until a window is read. `create_dataloader`
wraps it with a sampler whose order depends only on (seed, epoch), so a checkpoint resumes at
exactly the next batch. `build_loaders` makes a training run's loaders from the two arrays (the
shuffled training batches and the fixed evaluation batches), and `micro_batch_groups` groups batches
into optimizer steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence, Sized
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from gpt.data.corpora import DataError
from gpt.data.token_cache import load_tokens

T = TypeVar("T")

# ---------------------------------------------------------------------------------------------
# Splits.


def split_tokens(tokens: np.ndarray, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """(train, val): the last val_fraction of the tokens is validation (rounded to whole tokens).

    Both are views: a memmap's parts stay memmaps of the same file, read from disk on demand.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction!r}; "
                        f"e.g. 0.1")
    n = len(tokens)
    n_train = n - round(n * val_fraction)
    return tokens[:n_train], tokens[n_train:]


def prepare_data(data: str = "default", val_data: str | None = None, *, val_fraction: float = 0.1,
                 context_length: int = 256, data_dir: Path = Path("data"), errors: str = "strict",
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(train_ids, val_ids) ready for create_dataloader, after checking each holds at least one
    window (context_length + 1 tokens); raises UserError otherwise, naming the counts.

    Without `val_data` the validation part is the last `val_fraction` of `data`; with it, all of
    `data` trains and all of `val_data` validates.
    """
    if not isinstance(context_length, int) or context_length < 1:
        raise DataError(f"context_length must be a positive integer, got {context_length!r}")
    need = context_length + 1
    tokens = load_tokens(data, data_dir=data_dir, errors=errors)
    fix = "use more text or a smaller context length"
    if len(tokens) < need:
        raise DataError(f"{data!r} has {len(tokens)} tokens, but one window needs context_length + "
                        f"1 = {need}; {fix}")
    if val_data is not None:
        val = load_tokens(val_data, data_dir=data_dir, errors=errors)
        if len(val) < need:
            raise DataError(f"validation source {val_data!r} has {len(val)} tokens, but one window "
                            f"needs context_length + 1 = {need}; {fix}")
        return tokens, val
    train, val = split_tokens(tokens, val_fraction)
    n = len(tokens)
    if min(len(train), len(val)) >= need:
        return train, val
    if n < 2 * need:
        raise DataError(
            f"{data!r} has {n} tokens, too few for one training and one validation window of "
            f"context_length "
            f"+ 1 = {need} tokens each; {fix}, or give a separate validation source"
        )
    part, size = ("validation", len(val)) if len(val) < need else ("training", len(train))
    # The fractions whose rounded split leaves both parts a window (three decimals, rounded
    # inwards).
    low, high = math.ceil(need / n * 1000) / 1000, math.floor((1 - need / n) * 1000) / 1000
    raise DataError(
        f"the {part} split of {data!r} (val_fraction {val_fraction:g} of {n} tokens) has {size} "
        f"tokens, but one window needs context_length + 1 = {need}; use a validation fraction "
        f"between {low:g} and {high:g}, or give a separate validation source"
    )


# ---------------------------------------------------------------------------------------------
# Windows and batches.


class SlidingWindowDataset(Dataset[tuple[Tensor, Tensor]]):
    """Window i starts at s = i * stride: x = ids[s : s + L], y = ids[s + 1 : s + L + 1] (int64).

    There is a window for every start s with s + L + 1 <= N. `token_ids` may be a NumPy array (a
    memmap of a token cache included), a 1-D tensor or a list; it is kept as is, never copied per
    window, so a memmap stays on disk until a window is read.
    """

    def __init__(self, token_ids: np.ndarray | Tensor | list[int], context_length: int,
                 stride: int) -> None:
        if context_length < 1:
            raise DataError(f"context_length must be >= 1, got {context_length}; pass a positive "
                            f"one")
        if stride < 1:
            raise DataError(f"stride must be >= 1, got {stride}; stride = context length: no "
                            f"overlap")
        if isinstance(token_ids, list):
            token_ids = np.asarray(token_ids, dtype=np.int64)
        if token_ids.ndim != 1:
            raise DataError(f"token_ids must be 1-D, got shape {tuple(token_ids.shape)}; flatten "
                            f"it")
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
    to resume mid-epoch at exactly the next batch: `state_dict()` / `load_state_dict()`. The
    shuffled order is one int32 tensor, never a Python list of int objects (a pointer and a boxed
    int per window): with stride 1 there are as many windows as tokens.

    With `world_size` ranks (`gpt.training.distributed`), the order is cut into global batches of
    `batch_size x world_size` samples and rank r hands out the r-th slice of `batch_size` of each:
    the ranks' batches together are the batches of one process with `batch_size x world_size`, and a
    last partial global batch is left out (as a DataLoader's `drop_last` would). `position` then
    counts the samples handed out to all ranks, so a checkpoint means the same for any number of
    ranks.
    """

    def __init__(self, data_source: Sized, shuffle: bool, seed: int, *, batch_size: int = 1,
                 rank: int = 0, world_size: int = 1) -> None:
        self.num_samples = len(data_source)
        self.shuffle = shuffle
        self.seed = seed
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.epoch = 0
        self.position = 0  # samples of this epoch already handed out (to all ranks)

    def _order(self) -> Tensor | range:
        if not self.shuffle:
            return range(self.num_samples)
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        dtype = torch.int32 if self.num_samples < 2**31 else torch.int64
        return torch.randperm(self.num_samples, generator=generator, dtype=dtype)

    def _whole(self) -> int:
        """The samples in whole global batches (all of them in one process with batch size 1)."""
        size = self.batch_size * self.world_size
        return self.num_samples - self.num_samples % size

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        while self.position < self._whole():
            # this rank's slice of the global batch
            start = self.position + self.rank * self.batch_size
            self.position += self.batch_size * self.world_size
            yield from (int(index) for index in order[start:start + self.batch_size])
        self.epoch += 1
        self.position = 0

    def __len__(self) -> int:
        return (self._whole() - self.position) // self.world_size

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position, self.seed = state["epoch"], state["position"], state["seed"]


def create_dataloader(token_ids: np.ndarray | Tensor | list[int], batch_size: int = 8,
                      context_length: int = 256, stride: int = 256, shuffle: bool = True,
                      drop_last: bool = True, seed: int = 0,
                      num_workers: int = 0, pin_memory: bool = False) -> DataLoader[tuple[Tensor,
                                                                                          Tensor]]:
    """A DataLoader of (x, y) batches, each (batch_size, context_length) int64.

    Its sampler (`loader.sampler`, a `ResumableSampler`) carries the epoch and position for exact
    resume. With `num_workers > 0` the loader pre-fetches batches, so a sampler's position runs
    ahead of the batches consumed; a checkpoint should record the batches it trained on instead.
    `pin_memory` (for a CUDA run only) puts the batches in page-locked memory, which copies to the
    GPU faster and lets the copy overlap the step (`non_blocking`); elsewhere it only costs.
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}; pass a positive batch size")
    dataset = SlidingWindowDataset(token_ids, context_length, stride)
    sampler = ResumableSampler(dataset, shuffle=shuffle, seed=seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                      num_workers=num_workers, pin_memory=pin_memory)


def build_loaders(train_ids: np.ndarray, val_ids: np.ndarray, *, batch_size: int,
                  context_length: int,
                  stride: int, eval_batches: int, seed: int, pin_memory: bool = False,
                  rank: int = 0, world_size: int = 1,
                  ) -> tuple[DataLoader[tuple[Tensor, Tensor]], dict[str, DataLoader[tuple[Tensor,
                                                                                           Tensor]]]]:
    """The loaders of a training run: (training batches, {"train": ..., "val": ...} evaluation
    batches).

    The training loader shuffles with a seeded, resumable sampler and leaves out a last partial
    batch; it must have at least one batch. Each evaluation loader gives `eval_batches` batches of
    non-overlapping windows spread evenly over its split (or all of its windows, if fewer): every
    evaluation reads the same windows, from the whole text, not its start. With `world_size` ranks,
    the batches (training and evaluation) are this rank's slices of those of one process with
    `batch_size x world_size` (see `ResumableSampler`). `pin_memory`: as for `create_dataloader`.
    """
    dataset = SlidingWindowDataset(train_ids, context_length, stride)
    global_batch = batch_size * world_size
    if len(dataset) < global_batch:
        per = f" x {world_size} processes" if world_size > 1 else ""
        fewer = " (or the processes)" if world_size > 1 else ""
        raise DataError(f"the training data has {len(dataset)} windows of {context_length} tokens, "
                        f"fewer than one batch of {batch_size}{per}; lower --batch-size{fewer}, "
                        f"--context-length "
                        "or --stride, or use more text")
    sampler = ResumableSampler(dataset, shuffle=True, seed=seed, batch_size=batch_size, rank=rank,
                               world_size=world_size)
    # A DataLoader draws a seed for its workers from the *global* torch generator each time it is
    # iterated; with its own generator it leaves the global one (dropout's) alone, so the dropout
    # masks do not depend on where a run was stopped and resumed.
    train_loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                              pin_memory=pin_memory, generator=torch.Generator())
    eval_loaders = {name: _eval_loader(ids, batch_size, context_length, eval_batches, rank,
                                       world_size)
                    for name, ids in (("train", train_ids), ("val", val_ids))}
    return train_loader, eval_loaders


def _eval_loader(token_ids: np.ndarray, batch_size: int, context_length: int, batches: int,
                 rank: int,
                 world_size: int) -> DataLoader[tuple[Tensor, Tensor]]:
    dataset = SlidingWindowDataset(token_ids, context_length, context_length)
    if len(dataset) == 0:
        raise DataError(f"{len(token_ids)} tokens make no window of {context_length} + 1 tokens to "
                        "evaluate on; use more text or a smaller --context-length")
    # Its own generator, as for the training loader.
    return DataLoader(Subset(dataset, eval_picks(len(dataset), batch_size, batches, rank,
                                                 world_size)),
                      batch_size=batch_size, generator=torch.Generator())


def eval_picks(count: int, batch_size: int, batches: int, rank: int = 0,
               world_size: int = 1) -> list[int]:
    """The indices out of `count` (windows or records) that rank `rank` evaluates on, in batches of
    `batch_size`: `batches` global batches of `batch_size x world_size` spread evenly over all
    `count` (or every index, if fewer), each cut into the ranks' shares (`rank_share`). Every rank
    gets the same number of batches, none empty (under FSDP every forward is a collective that all
    ranks must join): a last global batch with fewer indices than ranks is left out."""
    size = batch_size * world_size
    total = min(count, batches * size)
    if 0 < total % size < world_size:
        total -= total % size
    if total == 0:
        raise DataError(f"{count} evaluation windows (or records) are fewer than the {world_size} "
                        f"processes; "
                        "use more validation data or fewer processes")
    picks = np.linspace(0, count - 1, total).round().astype(int).tolist()  # distinct: step >= 1
    return [pick for start in range(0, total, size) for pick in rank_share(picks[start:start
                                                                                 + size], rank,
                                                                           world_size)]


def rank_share(batch: Sequence[T], rank: int, world_size: int) -> Sequence[T]:
    """Rank `rank`'s part of a global `batch`: the ranks' parts in rank order make the batch, and
    their sizes differ by one at most (equal for a whole batch of `batch_size x world_size`)."""
    return batch[rank * len(batch) // world_size:(rank + 1) * len(batch) // world_size]


def micro_batch_groups(loader: Iterable[tuple[Tensor, Tensor]], size: int,
                       ) -> Iterator[list[tuple[Tensor, Tensor]]]:
    """The loader's batches in groups of `size` (one optimizer step each); the last may be smaller.
    """
    group: list[tuple[Tensor, Tensor]] = []
    for batch in loader:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group
