"""TensorBoard events: what `TensorBoardLog` writes reads back with TensorBoard's own event reader.
"""

import math
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gpt.base.errors import run_cli
from gpt.training.tb import TensorBoardLog

ROWS = [
    {"step": 0, "epoch": 0.0, "train_loss": 10.9, "val_loss": 10.8, "lr": math.nan},
    {"step": 20, "epoch": 0.5, "train_loss": 6.25, "val_loss": 6.5, "lr": 2e-3},
    {"step": 40, "epoch": 1.0, "train_loss": 5.125, "val_loss": 5.75, "lr": 1e-3},
]


def read_back(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def test_events_hold_every_logged_value_at_its_step(tmp_path: Path) -> None:
    log = TensorBoardLog(tmp_path)
    for row in ROWS:
        log.log(int(row["step"]), row)
    scalars = read_back(tmp_path)  # before close: each evaluation is flushed as it is logged
    log.close()
    assert sorted(scalars) == ["epoch", "lr", "train_loss", "val_loss"]
    for name in ("epoch", "train_loss", "val_loss"):
        assert scalars[name] == [(row["step"], pytest.approx(row[name])) for row in ROWS]
    assert scalars["lr"] == [(20, pytest.approx(2e-3)), (40, pytest.approx(1e-3))]  # no NaN point


def test_a_resumed_log_drops_the_events_after_the_checkpoint(tmp_path: Path) -> None:
    log = TensorBoardLog(tmp_path)
    for row in ROWS:
        log.log(int(row["step"]), row)
    log.close()
    resumed = TensorBoardLog(tmp_path, purge_step=21)  # continued from the checkpoint of step 20
    resumed.log(40, {**ROWS[2], "val_loss": 4.5})
    resumed.close()
    assert read_back(tmp_path)["val_loss"] == [(0, pytest.approx(10.8)), (20, pytest.approx(6.5)),
                                               (40, pytest.approx(4.5))]


def test_missing_tensorboard_says_which_extra_to_install(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:  # noqa: E501
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if it were not installed
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: TensorBoardLog(tmp_path))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ('error: --tensorboard needs the tensorboard package; '
                                       'install it with '
                                       'pip install -e ".[tb]"\n')
    assert list(tmp_path.iterdir()) == []  # nothing written
