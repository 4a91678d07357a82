import numpy as np
import pytest
import torch

from gpt.data import SlidingWindowDataset, create_dataloader


def book_windows(ids: list[int], length: int, stride: int) -> list[tuple[list[int], list[int]]]:
    """The book's eager loop, as the reference."""
    return [(ids[s:s + length], ids[s + 1:s + length + 1]) for s in range(0, len(ids) - length, stride)]


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


def test_dataloader_order_is_reproducible_and_resumable() -> None:
    ids = np.arange(500, dtype=np.uint16)
    loader = create_dataloader(ids, batch_size=4, context_length=8, stride=8, seed=3)
    first = [x for x, _ in loader]
    again = [x for x, _ in create_dataloader(ids, batch_size=4, context_length=8, stride=8, seed=3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))

    interrupted = create_dataloader(ids, batch_size=4, context_length=8, stride=8, seed=3)
    iterator = iter(interrupted)
    for _ in range(5):
        next(iterator)
    state = interrupted.sampler.state_dict()
    resumed = create_dataloader(ids, batch_size=4, context_length=8, stride=8, seed=3)
    resumed.sampler.load_state_dict(state)
    rest = [x for x, _ in resumed]
    assert all(torch.equal(a, b) for a, b in zip(first[5:], rest, strict=True))
