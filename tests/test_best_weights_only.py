"""`--best-weights-only`: best/ without the optimizer state, refused by --resume; last/ as before.
"""

from __future__ import annotations

from tiny_runs import STEPS_PER_EPOCH, TOKENS, cli_error, tiny

from gpt.checkpoints.checkpoint import TRAIN_STATE_FILE, load_checkpoint, load_train_state
from gpt.training.trainer import train


def test_best_holds_the_weights_and_a_train_state_without_the_optimizer(tmp_path) -> None:
    cfg = tiny(tmp_path, best_weights_only=True, epochs=1)
    result = train(cfg, token_ids=TOKENS)
    best, last = result.run_dir / "best", result.run_dir / "last"
    assert "optimizer" not in load_train_state(best)
    assert "optimizer" in load_train_state(last)
    model = load_checkpoint(best)
    # AdamW's two float32 moments of every parameter are what best/ leaves out.
    moments = sum(2 * 4 * p.numel() for p in model.parameters())
    saved = (last / TRAIN_STATE_FILE).stat().st_size - (best / TRAIN_STATE_FILE).stat().st_size
    assert 0.95 * moments < saved < 1.05 * moments + 100_000


def test_resuming_from_a_weights_only_best_is_one_line_naming_why(tmp_path, capsys) -> None:
    train(tiny(tmp_path, best_weights_only=True, epochs=1), token_ids=TOKENS)
    error = cli_error(["--resume", str(tmp_path / "run" / "best")], capsys)
    assert "--best-weights-only" in error and "without the optimizer state" in error
    assert f"resume from {tmp_path / 'run' / 'last'}" in error


def test_resuming_from_last_goes_on_to_the_end(tmp_path) -> None:
    train(tiny(tmp_path, best_weights_only=True, epochs=1), token_ids=TOKENS)
    resumed = train(tiny(tmp_path, best_weights_only=True, epochs=2), resume=tmp_path / "run",
                    token_ids=TOKENS)
    assert resumed.stop_reason == "done" and resumed.step == 2 * STEPS_PER_EPOCH
    assert min(resumed.step_losses) == STEPS_PER_EPOCH + 1
