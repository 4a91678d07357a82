"""Splits, windows, the resumable sampler and loaders: against the book's loop and plain slicing."""

from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import encode, one_line_error

from gpt.base.errors import UserError
from gpt.data.windows import (
    DataError,
    SlidingWindowDataset,
    create_dataloader,
    prepare_data,
    split_tokens,
)


def book_windows(ids: list[int], length: int, stride: int) -> list[tuple[list[int], list[int]]]:
    """The book's eager loop, as the reference."""
    return [(ids[s:s + length], ids[s + 1:s + length + 1]) for s in range(0, len(ids) - length,
                                                                          stride)]


# ---------------------------------------------------------------------------------------------
# Windows, batches, memory.


@pytest.mark.parametrize("n", [1, 5, 6, 7, 50, 257])
@pytest.mark.parametrize("length", [1, 4, 5, 16])
@pytest.mark.parametrize("stride", [1, 3, 4, 5, 17])
def test_windows_match_the_book_formula(n: int, length: int, stride: int) -> None:
    ids = list(range(1000, 1000 + n))
    dataset = SlidingWindowDataset(np.array(ids, dtype=np.uint16), length, stride)
    expected = book_windows(ids, length, stride)
    assert len(dataset) == len(expected)
    for i, (x, y) in enumerate(expected):
        got_x, got_y = dataset[i]
        assert got_x.dtype == got_y.dtype == torch.int64
        assert got_x.tolist() == x and got_y.tolist() == y


@pytest.mark.parametrize("length", [256, 1024])
@pytest.mark.parametrize("stride_of", [lambda L: 1, lambda L: L // 2, lambda L: L, lambda L: L
                                       + 37])
def test_gpt_sized_windows_match_the_book(length: int, stride_of) -> None:
    stride = stride_of(length)
    ids = np.random.default_rng(length).integers(0, 50257, size=3 * length + 11).astype(np.uint16)
    dataset = SlidingWindowDataset(ids, length, stride)
    starts = range(0, len(ids) - length, stride)
    assert len(dataset) == len(starts)
    for i, s in enumerate(starts):
        x, y = dataset[i]
        assert torch.equal(x, torch.from_numpy(ids[s:s + length].astype(np.int64)))
        assert torch.equal(y, torch.from_numpy(ids[s + 1:s + length + 1].astype(np.int64)))
    with pytest.raises(IndexError):
        dataset[len(starts)]


def test_bad_window_settings_are_user_errors() -> None:
    for kwargs in ({"context_length": 0, "stride": 1}, {"context_length": 4, "stride": 0}):
        with pytest.raises(UserError, match="must be >= 1"):
            SlidingWindowDataset(np.arange(10), **kwargs)
    # still a ValueError for plain Python callers
    with pytest.raises(ValueError, match="batch_size"):
        create_dataloader(np.arange(10), batch_size=0, context_length=2, stride=2)


def test_dataset_over_a_memmap_keeps_it_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "ids.bin"
    ids = np.arange(100_000, dtype=np.uint16) % 50257
    ids.tofile(path)
    tokens = np.memmap(path, dtype=np.uint16, mode="r", shape=(len(ids),))
    train, val = split_tokens(tokens, 0.25)
    for array, offset in ((tokens, 0), (train, 0), (val, 75_000)):
        # views of the file, not copies
        assert isinstance(array, np.memmap) and not array.flags.owndata
        for stride in (1, 64):
            dataset = SlidingWindowDataset(array, 64, stride)
            assert dataset.token_ids is array  # kept, not copied or widened to int64
            last = len(dataset) - 1
            start = offset + last * stride
            assert dataset[last][0].tolist() == ids[start:start + 64].tolist()
            assert dataset[last][1].tolist() == ids[start + 1:start + 65].tolist()


def test_dataloader_order_is_reproducible_and_resumable() -> None:
    ids = np.arange(500, dtype=np.uint16)
    loader = create_dataloader(ids, batch_size=4, context_length=8, stride=8, seed=3)
    first = [x for x, _ in loader]
    again = [x for x, _ in create_dataloader(ids, batch_size=4, context_length=8, stride=8, seed=3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    # A shuffle, not the identity; each window once.
    starts = [int(x[0]) for batch in first for x in batch]
    assert starts != sorted(starts) and len(set(starts)) == len(starts)

    interrupted = create_dataloader(ids, batch_size=4, context_length=8, stride=8, seed=3)
    iterator = iter(interrupted)
    for _ in range(5):
        next(iterator)
    state = interrupted.sampler.state_dict()
    resumed = create_dataloader(ids, batch_size=4, context_length=8, stride=8, seed=3)
    resumed.sampler.load_state_dict(state)
    rest = [x for x, _ in resumed]
    assert all(torch.equal(a, b) for a, b in zip(first[5:], rest, strict=True))


# ---------------------------------------------------------------------------------------------
# Splits.


def test_split_takes_validation_from_the_end_deterministically() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    train, val = split_tokens(tokens)
    assert train.tolist() == list(range(900)) and val.tolist() == list(range(900, 1000))
    again = split_tokens(tokens)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], val)
    train, val = split_tokens(np.arange(10), 0.25)  # 2.5 tokens rounds to 2 (half to even)
    assert (len(train), len(val)) == (8, 2)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_fraction_must_be_inside_zero_one(fraction: float) -> None:
    with pytest.raises(UserError, match="between 0 and 1"):
        split_tokens(np.arange(100), fraction)


def test_prepare_data_split_and_separate_validation(tmp_path: Path) -> None:
    train_file, val_file = tmp_path / "train.txt", tmp_path / "val.txt"
    train_file.write_text("It was a dark and stormy night; the rain fell in torrents. " * 20)
    val_file.write_text("Call me Ishmael. Some years ago, never mind how long precisely. " * 5)
    cache = tmp_path / "data"
    whole = encode(train_file.read_text())
    train, val = prepare_data(str(train_file), context_length=8, data_dir=cache, val_fraction=0.2)
    n_val = round(len(whole) * 0.2)
    assert train.tolist() == whole[:-n_val] and val.tolist() == whole[-n_val:]

    train, val = prepare_data(str(train_file), str(val_file), context_length=8, data_dir=cache)
    assert train.tolist() == whole and val.tolist() == encode(val_file.read_text())


# ---------------------------------------------------------------------------------------------
# Bad input: one-line UserErrors that say what to do.


def test_too_few_tokens_for_one_window_names_the_counts(tmp_path: Path) -> None:
    path = tmp_path / "short.txt"
    path.write_text("hello world")  # 2 tokens
    with pytest.raises(UserError) as excinfo:
        prepare_data(str(path), context_length=4, data_dir=tmp_path)
    message = one_line_error(excinfo)
    assert "has 2 tokens" in message and "context_length + 1 = 5" in message


def test_validation_split_too_small_names_the_counts(tmp_path: Path) -> None:
    path = tmp_path / "story.txt"
    path.write_text(" one" * 100)  # 100 tokens
    assert len(encode(path.read_text())) == 100
    with pytest.raises(UserError) as excinfo:
        prepare_data(str(path), context_length=16, data_dir=tmp_path, val_fraction=0.1)
    message = one_line_error(excinfo)
    assert "validation split" in message and "has 10 tokens" in message and "+ 1 = 17" in message
    assert "between 0.17 and 0.83" in message
    for fraction in (0.17, 0.83):  # the advice works at both ends
        train, val = prepare_data(str(path), context_length=16, data_dir=tmp_path,
                                  val_fraction=fraction)
        assert min(len(train), len(val)) >= 17
    with pytest.raises(UserError, match=r"training split .* has 16 tokens"):
        prepare_data(str(path), context_length=16, data_dir=tmp_path, val_fraction=0.84)
    with pytest.raises(UserError, match="too few for one training and one validation window"):
        prepare_data(str(path), context_length=60, data_dir=tmp_path)
    val_file = tmp_path / "val.txt"
    val_file.write_text(" two" * 5)
    with pytest.raises(UserError, match=r"validation source .* has 5 tokens"):
        prepare_data(str(path), str(val_file), context_length=16, data_dir=tmp_path)


def test_data_errors_are_user_errors_and_value_errors() -> None:
    assert issubclass(DataError, UserError) and issubclass(DataError, ValueError)
