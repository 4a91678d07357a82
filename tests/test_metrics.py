"""metrics.csv: appended row by row, read back as numbers, cut back atomically when a run resumes.
"""

import math
import os

import pytest

import gpt.base.atomic
from gpt.training.metrics import METRICS_COLUMNS, MetricsLog, format_row


def row(step: int) -> dict[str, float]:
    """A row whose every value tells the step and the column apart: step 4, column 4 -> 44."""
    return {"step": step, **{c: step * 10 + i for i, c in enumerate(METRICS_COLUMNS) if i}}


def log_of(tmp_path, steps) -> MetricsLog:
    log = MetricsLog(tmp_path / "metrics.csv")
    for step in steps:
        log.append(row(step))
    return log


def test_rows_read_back_what_was_appended_under_a_header(tmp_path) -> None:
    log = log_of(tmp_path, (0, 4, 8))
    assert log.path.read_text().splitlines()[0] == ",".join(METRICS_COLUMNS)
    assert log.rows() == [row(0), row(4), row(8)]
    # and tokens_seen; the rest are floats
    assert [type(r["step"]) for r in log.rows()] == [int] * 3
    assert MetricsLog(tmp_path / "none.csv").rows() == []


def test_metrics_after_the_resumed_step_are_dropped(tmp_path) -> None:
    """A kill between logging an evaluation and saving its checkpoint: the resumed run logs it
    again."""
    log = log_of(tmp_path, (0, 4, 8))
    kept = log.truncate(up_to_step=4)
    assert [r["step"] for r in kept] == [0, 4] and kept[1]["val_loss"] == 44
    assert log.path.read_text().splitlines()[0] == ",".join(METRICS_COLUMNS)
    assert log.truncate(up_to_step=100) == kept  # the file itself lost the row of step 8
    log.append(row(8))
    assert log.rows() == [row(0), row(4), row(8)]


@pytest.mark.parametrize("killed", ["before the rename", "after the rename"])
def test_truncate_replaces_the_file_in_one_rename(tmp_path, monkeypatch, killed: str) -> None:
    """A kill at any moment of `truncate` leaves the old file or the new one, whole: until the
    rename the old file is untouched (so a kill before it loses nothing), and the rename is one
    step."""
    log = log_of(tmp_path, (0, 4, 8))
    old = log.path.read_bytes()
    real_replace = os.replace

    def replace_then_die(src, dst):
        assert log.path.read_bytes() == old  # nothing was deleted or rewritten in place before this
        if killed == "after the rename":
            real_replace(src, dst)
        raise KeyboardInterrupt

    monkeypatch.setattr(gpt.base.atomic.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        log.truncate(up_to_step=4)
    monkeypatch.undo()
    expected = [row(0), row(4), row(8)] if killed == "before the rename" else [row(0), row(4)]
    assert log.rows() == expected
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]  # no temporary file left


def test_a_half_written_last_row_is_left_out_and_cut_off(tmp_path) -> None:
    """A process killed while appending leaves a last line without its line end."""
    log = log_of(tmp_path, (0, 4))
    with open(log.path, "a") as f:
        f.write("8,80.0,8")
    assert log.rows() == [row(0), row(4)]
    assert log.truncate(up_to_step=100) == [row(0), row(4)]
    log.append(row(8))
    assert log.rows() == [row(0), row(4), row(8)]


def test_plot_draws_the_rows_and_marks_the_best_step(tmp_path) -> None:
    log = log_of(tmp_path, (0, 4, 8))
    fig = log.plot(tmp_path / "loss.png", tokens_per_epoch=100, best_step=4)
    train, val, best = fig.axes[0].get_lines()
    assert list(train.get_xdata()) == [r["epoch"] for r in log.rows()]
    assert list(train.get_ydata()) == [3, 43, 83] and list(val.get_ydata()) == [4, 44, 84]
    assert (list(best.get_xdata()), list(best.get_ydata())) == ([41], [44])
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_format_row_prints_the_step_losses_and_speed() -> None:
    line = format_row({"step": 20, "epoch": 0.25, "tokens_seen": 40960, "train_loss": 5.4321,
                       "val_loss": 5.6789, "val_perplexity": math.exp(5.6789), "lr": 1.5e-3,
                       "grad_norm": 0.875, "tokens_per_s": 12345.6})
    assert line == ("step    20 | epoch 0.25 | tokens 40,960 | train 5.432 | val 5.679 (ppl 292.6) "
                    "| lr 1.50e-03 | grad norm 0.88 | 12,346 tok/s")
    first = format_row({**row(0), "lr": math.nan, "grad_norm": math.nan, "tokens_per_s": math.nan})
    assert first == "step     0 | epoch 1.00 | tokens 2 | train 3.000 | val 4.000 (ppl 5.0)"
