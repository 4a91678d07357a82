"""Shared test settings: deterministic, single-process CPU runs."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
