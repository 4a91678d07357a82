"""A tiny training run's settings and data, shared by the trainer and resume tests."""

from pathlib import Path

import numpy as np
import pytest
import torch

from gpt.base.errors import run_cli
from gpt.cli.train import main
from gpt.model.model import GPT
from gpt.training.settings import TrainConfig


def pattern_tokens(n: int, offset: int = 0) -> np.ndarray:
    """A deterministic, learnable token stream (no RNG, no files): a cycle through 61 token ids."""
    return ((np.arange(offset, offset + n) * 17) % 61 * 811).astype(np.uint16)


# 370 tokens make 23 windows of 16 (the book's count: starts 0, 16, ..., 352): 11 batches of 2 and
# one window that drop_last leaves out, so every epoch exercises the partial-batch path.
TOKENS = (pattern_tokens(370), pattern_tokens(120, offset=5000))
STEPS_PER_EPOCH = 11


def tiny(tmp_path: Path, **overrides) -> TrainConfig:
    # Every setting the losses depend on is pinned here, so changing a default cannot change a test.
    settings = dict(preset="tiny", drop_rate=0.1, context_length=16, batch_size=2, grad_accum=1,
                    epochs=3,
                    max_steps=0, lr=3e-3, min_lr=1e-4, warmup_steps=3, weight_decay=0.1,
                    grad_clip=1.0,
                    eval_freq=4, eval_iters=2, patience=0, sample_tokens=0, dtype="float32",
                    loss_chunk=0, device="cpu", seed=123, out=str(tmp_path), run_name="run")
    return TrainConfig(**{**settings, **overrides})


def params(model: GPT) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def cli_error(argv: list[str], capsys) -> str:
    """The one line `train.py argv` prints, having exited with status 2."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err
