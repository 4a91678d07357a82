"""Resuming a run: exactly where it stopped, or not at all (changed model or data)."""

import dataclasses
import math
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_runs import STEPS_PER_EPOCH, TOKENS, assert_same_params, params, tiny

from gpt.base.errors import UserError
from gpt.base.rng import rng_state, set_rng_state
from gpt.checkpoints.checkpoint import (
    TRAIN_STATE_FILE,
    load_checkpoint,
    load_train_state,
    save_model,
)
from gpt.cli.train import parse_args
from gpt.model.config import GPTConfig
from gpt.model.model import GPT
from gpt.training import trainer
from gpt.training.settings import TrainConfig
from gpt.training.train_state import TrainState
from gpt.training.trainer import setup, train

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the pieces: counters and random generators --------------------------------------------------


def test_train_state_round_trips_through_a_weights_only_file(tmp_path) -> None:
    state = TrainState(step=7, tokens_seen=224, best_val_loss=2.5, best_step=4, evals_since_best=1)
    saved = state.state_dict()
    # The layout of the "state" entry of train_state.pt, as checkpoints of earlier versions hold it.
    assert saved == {"step": 7, "tokens_seen": 224, "best_val_loss": 2.5, "best_step": 4,
                     "evals_since_best": 1}
    torch.save(saved, tmp_path / "state.pt")
    loaded = TrainState()
    loaded.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert loaded == state
    assert TrainState().state_dict()["best_val_loss"] == math.inf  # no evaluation yet
    with pytest.raises(KeyError, match="evals_since_best"):
        TrainState().load_state_dict({k: v for k, v in saved.items() if k != "evals_since_best"})


def draws() -> tuple:
    return random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3).tolist()


def test_rng_state_brings_every_generator_back(tmp_path) -> None:
    np.random.randn()  # numpy keeps a spare Gaussian: part of its state
    torch.save(rng_state(torch.device("cpu")), tmp_path / "rng.pt")
    expected = draws()
    draws()
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True), torch.device("cpu"))
    assert draws() == expected


# ---- exact resume -----------------------------------------------------------------------------


def interrupt_after(step: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Press Ctrl-C (a real SIGINT) right after optimizer step `step`."""
    original = trainer.train_step

    def step_then_interrupt(run, batches):
        stats = original(run, batches)
        if run.state.step == step:
            signal.raise_signal(signal.SIGINT)
        return stats

    monkeypatch.setattr(trainer, "train_step", step_then_interrupt)


def resumable(tmp_path: Path, name: str) -> TrainConfig:
    # Dropout: the random stream must resume too.
    return tiny(tmp_path, drop_rate=0.1, epochs=2, eval_freq=6, sample_tokens=3, run_name=name)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> tuple[Path, trainer.TrainResult]:
    """A run that never stops, to compare resumed runs against."""
    out = tmp_path_factory.mktemp("straight")
    with torch.random.fork_rng():
        result = train(resumable(out, "straight"), token_ids=TOKENS)
    assert result.step == 2 * STEPS_PER_EPOCH and result.stop_reason == "done"
    return out / "straight", result


@pytest.mark.parametrize("stop_at", [5, STEPS_PER_EPOCH])  # mid-epoch; the end of an epoch
def test_resume_continues_exactly(tmp_path, monkeypatch, capsys, straight_run,
                                  stop_at: int) -> None:
    straight_dir, straight = straight_run
    # No samples, unlike the straight run: sampling must not change the training's random stream.
    cfg = dataclasses.replace(resumable(tmp_path, "run"), sample_tokens=0)
    interrupt_after(stop_at, monkeypatch)
    first = train(cfg, token_ids=TOKENS)
    assert (first.stop_reason, first.step) == ("interrupted", stop_at)
    assert f"--resume {tmp_path / 'run'}" in capsys.readouterr().out
    monkeypatch.undo()

    # whatever happened in between: the resumed run restores its own RNG state
    torch.manual_seed(999)
    resumed = train(cfg, resume=tmp_path / "run", token_ids=TOKENS)
    assert resumed.step_losses == {s: v for s, v in straight.step_losses.items() if s > stop_at}
    assert_same_params(params(load_checkpoint(tmp_path / "run" / "last")),
                       params(load_checkpoint(straight_dir / "last")))
    # metrics.csv has each evaluation once, as the straight run logged it (tokens/s aside).
    straight_csv = (straight_dir / "metrics.csv").read_text().splitlines()
    resumed_csv = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert [line.split(",")[:6] for line in resumed_csv] == [line.split(",")[:6]
                                                             for line in straight_csv]


def test_resume_refuses_changed_model_or_data(tmp_path) -> None:
    cfg = tiny(tmp_path, epochs=1, eval_freq=4, max_steps=4)
    train(cfg, token_ids=TOKENS)
    files = {name: (tmp_path / "run" / name).read_bytes() for name in ("train_config.json",
                                                                       "metrics.csv")}
    with pytest.raises(UserError, match="--n-layers 3 differs from the run's None"):
        setup(cfg.__class__(**{**cfg.to_dict(), "n_layers": 3}), resume=tmp_path / "run",
              token_ids=TOKENS)
    with pytest.raises(UserError, match=r"training data changed .*\(23 windows then, 22 now\)"):
        setup(cfg, resume=tmp_path / "run", token_ids=(TOKENS[0][:360], TOKENS[1]))
    with pytest.raises(UserError, match="--decode-errors 'replace' differs from the run's "
                                        "'strict'"):
        setup(dataclasses.replace(cfg, decode_errors="replace"), resume=tmp_path / "run",
              token_ids=TOKENS)
    # Refused before the run directory was written to: nothing in it changed.
    assert files == {name: (tmp_path / "run" / name).read_bytes() for name in files}
    with pytest.raises(UserError, match="already holds a run; continue it with --resume"):
        setup(cfg, token_ids=TOKENS)
    # Weights and config.json of another model put into last/: they agree with each other, but not
    # with the optimizer state beside them.
    save_model(GPT(GPTConfig.preset("tiny", n_layers=1)), tmp_path / "run" / "last")
    with pytest.raises(UserError, match=r"train_state\.pt: its optimizer state does not fit"):
        setup(cfg, resume=tmp_path / "run", token_ids=TOKENS)




def test_a_run_saved_with_the_old_errors_setting_resumes(tmp_path, capsys) -> None:
    """Runs from before `errors` was renamed `decode_errors` keep the old key in train_state.pt."""
    cfg = tiny(tmp_path, epochs=1, eval_freq=4, max_steps=4, decode_errors="replace")
    train(cfg, token_ids=TOKENS)
    path = tmp_path / "run" / "last" / TRAIN_STATE_FILE
    saved = torch.load(path, weights_only=True)
    saved["train_config"]["errors"] = saved["train_config"].pop("decode_errors")
    torch.save(saved, path)
    assert load_train_state(tmp_path / "run" / "last")["train_config"]["errors"] == "replace"

    resumed_cfg, _ = parse_args(["--resume", str(tmp_path / "run"), "--max-steps", "6"])
    assert resumed_cfg.decode_errors == "replace" and resumed_cfg.max_steps == 6
    result = train(resumed_cfg, resume=tmp_path / "run", token_ids=TOKENS)
    assert result.step == 6
