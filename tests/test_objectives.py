"""Training with another objective (label smoothing, focal loss, distillation) and --tensorboard,
through `train.py`'s flags and the trainer: what is trained, what is measured, what is refused."""

import csv
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_runs import TOKENS, tiny

from gpt.base.atomic import atomic_directory
from gpt.base.rng import seed_everything
from gpt.checkpoints.checkpoint import save_model
from gpt.cli.train import main
from gpt.model.config import GPTConfig
from gpt.model.model import GPT
from gpt.objectives.lm import OBJECTIVE_COLUMN
from gpt.training import trainer
from gpt.training.metrics import METRICS_COLUMNS
from gpt.training.tb import TensorBoardLog
from gpt.training.trainer import build_model, evaluate_and_save, setup, train

pytestmark = pytest.mark.usefixtures("one_thread")

def cli_flags(tmp_path: Path, corpus: Path, run_name: str, *more: str) -> list[str]:
    return ["--data", str(corpus), "--data-dir", str(tmp_path / "data"), "--preset", "tiny",
            "--context-length", "16", "--batch-size", "2", "--eval-iters", "1", "--dtype",
            "float32",
            "--device", "cpu", "--sample-tokens", "0", "--max-steps", "4", "--eval-freq", "2",
            "--out", str(tmp_path / "runs"), "--run-name", run_name, *more]


def metrics(run_dir: Path) -> tuple[list[str], list[dict[str, float]]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = [{name: float(value) for name, value in row.items()} for row in reader]
        return list(reader.fieldnames or []), rows


def saved_model(model: GPT, directory: Path) -> Path:
    with atomic_directory(directory) as tmp:
        save_model(model, tmp)
    return directory


# ---- label smoothing --------------------------------------------------------------------------


def test_label_smoothing_trains_differently_and_validates_with_plain_cross_entropy(tmp_path,
                                                                                   corpus) -> None:
    main(cli_flags(tmp_path, corpus, "plain"))
    main(cli_flags(tmp_path, corpus, "smooth", "--label-smoothing", "0.1"))
    (plain_columns, plain), (smooth_columns, smooth) = (metrics(tmp_path / "runs" / name)
                                                        for name in ("plain", "smooth"))
    assert plain_columns == list(METRICS_COLUMNS)  # a pretraining run's metrics.csv is unchanged
    assert smooth_columns == [*METRICS_COLUMNS, OBJECTIVE_COLUMN]
    assert [row["step"] for row in smooth] == [row["step"] for row in plain] == [0, 2, 4]
    # Step 0, the same initial weights: the loss columns are one definition (plain cross-entropy)
    # ...
    assert smooth[0]["val_loss"] == plain[0]["val_loss"]
    assert smooth[0]["train_loss"] == plain[0]["train_loss"]
    # ... and the objective is another number; after training on it the weights (and losses) differ.
    assert abs(smooth[0][OBJECTIVE_COLUMN] - smooth[0]["train_loss"]) > 1e-3
    assert smooth[-1]["val_loss"] != plain[-1]["val_loss"]


def test_the_objective_column_is_smoothed_cross_entropy_on_the_train_batches(tmp_path) -> None:
    run = setup(tiny(tmp_path, label_smoothing=0.1, drop_rate=0.0), token_ids=TOKENS)
    row = evaluate_and_save(run)
    plain, smoothed, count = 0.0, 0.0, 0
    with torch.no_grad():
        for x, y in run.eval_loaders["train"]:
            logits = run.model.eval()(x).flatten(0, 1)
            plain += F.cross_entropy(logits, y.flatten(), reduction="sum").item()
            smoothed += F.cross_entropy(logits, y.flatten(), label_smoothing=0.1).item() * y.numel()
            count += y.numel()
    assert row["train_loss"] == pytest.approx(plain / count, rel=1e-5)
    assert row[OBJECTIVE_COLUMN] == pytest.approx(smoothed / count, rel=1e-5)


# ---- distillation -----------------------------------------------------------------------------


def test_a_student_taught_by_its_own_init_has_zero_kl_at_step_one(tmp_path) -> None:
    """With the teacher = the student's initial weights (and no dropout), KL(teacher || student) is
    0 before the first update: the first step's loss is (1 - A) x the plain run's cross-entropy."""
    cfg = tiny(tmp_path, drop_rate=0.0, max_steps=2, eval_freq=2)
    # what `setup` does before building the model: the same initial weights
    seed_everything(cfg.seed)
    teacher = saved_model(build_model(cfg), tmp_path / "teacher")
    plain = train(cfg, token_ids=TOKENS)
    distilled = train(tiny(tmp_path, drop_rate=0.0, max_steps=2, eval_freq=2, run_name="distil",
                           teacher=str(teacher), distill_weight=0.25, distill_temperature=2.0),
                      token_ids=TOKENS)
    assert distilled.step_losses[1] == pytest.approx(0.75 * plain.step_losses[1], rel=1e-5)
    # it learns
    assert distilled.step_losses[2] != pytest.approx(0.75 * plain.step_losses[2], rel=1e-5)
    _, rows = metrics(tmp_path / "distil")
    assert rows[0][OBJECTIVE_COLUMN] == pytest.approx(0.75 * rows[0]["train_loss"], rel=1e-5)


# ---- TensorBoard ------------------------------------------------------------------------------


def test_tensorboard_events_hold_every_metrics_row(tmp_path, corpus) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    main(cli_flags(tmp_path, corpus, "tb", "--tensorboard"))
    run_dir = tmp_path / "runs" / "tb"
    _, rows = metrics(run_dir)
    events = EventAccumulator(str(run_dir))
    events.Reload()
    for name in ("train_loss", "val_loss", "val_perplexity", "epoch"):
        assert [(e.step, e.value) for e in events.Scalars(name)] == [
            (int(row["step"]), pytest.approx(row[name], rel=1e-6)) for row in rows]
    assert [(e.step, e.value) for e in events.Scalars("lr")] == [  # no learning rate before step 1
        (int(row["step"]), pytest.approx(row["lr"], rel=1e-6)) for row in rows[1:]]


def test_tensorboard_log_is_closed_when_training_fails(tmp_path, monkeypatch) -> None:
    closed = []
    close = TensorBoardLog.close
    monkeypatch.setattr(TensorBoardLog, "close", lambda self: (closed.append(True), close(self)))

    def fail(run, batches):
        raise RuntimeError("boom")

    monkeypatch.setattr(trainer, "train_step", fail)
    run = setup(tiny(tmp_path, tensorboard=True), token_ids=TOKENS)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(run)
    assert closed == [True]


# ---- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "message"), [
    (["--label-smoothing", "1.0"], "error: --label-smoothing must be in [0, 1), got 1.0; e.g. "
                                   "--label-smoothing 0.1"),
    (["--focal-gamma", "-1"], "error: --focal-gamma must be 0 or more, got -1.0; e.g. "
                              "--focal-gamma 2"),
    (["--distill-temperature", "0"], "error: --distill-temperature must be above 0, got 0.0"),
    (["--label-smoothing", "0.1", "--loss-chunk", "4"],
     "error: --loss-chunk computes plain cross-entropy only; drop --loss-chunk to train with "
     "--label-smoothing"),
    (["--teacher", "{tmp}/nowhere"], "error: --teacher {tmp}/nowhere: "),
    (["--teacher", "{tmp}/small-vocab"], "error: --teacher {tmp}/small-vocab predicts 101 token "
                                         "ids and the student 50257; distillation compares them id "
                                         "by id"),
    (["--tensorboard"], "error: --tensorboard needs the tensorboard package; install it with "
                        'pip install -e ".[tb]"'),
])
def test_bad_objective_flags_are_one_line_and_write_nothing(tmp_path, corpus, monkeypatch,
                                                            run_command,
                                                              flags, message) -> None:
    saved_model(GPT(GPTConfig(vocab_size=101, context_length=16, emb_dim=32, n_heads=2,
                              n_layers=1)),
                tmp_path / "small-vocab")
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if it were not installed
    flags = [flag.replace("{tmp}", str(tmp_path)) for flag in flags]
    line = run_command(main, cli_flags(tmp_path, corpus, "bad", *flags)).one_line_error()
    assert line.startswith(message.replace("{tmp}", str(tmp_path)))
    # no runs/, data/
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "small-vocab"]


@pytest.mark.parametrize(("flags", "message"), [
    (["--label-smoothing", "0.2"], "error: --resume: --label-smoothing 0.2 differs from the run's "
                                   "0.1"),
    (["--teacher", "{tmp}/teacher"], "error: --resume: the run was trained without --teacher"),
])
def test_a_resumed_run_keeps_its_objective(tmp_path, corpus, run_command, capsys, flags,
                                           message) -> None:
    main(cli_flags(tmp_path, corpus, "run", "--label-smoothing", "0.1", "--max-steps", "2"))
    assert "(objective " in capsys.readouterr().out  # the printed line shows the objective too
    saved_model(GPT(GPTConfig.preset("tiny")), tmp_path / "teacher")
    run = tmp_path / "runs" / "run"
    before = (run / "metrics.csv").read_text()
    flags = [flag.replace("{tmp}", str(tmp_path)) for flag in flags]
    line = run_command(main, ["--resume", str(run), *flags]).one_line_error()
    assert line.startswith(message)
    assert (run / "metrics.csv").read_text() == before
