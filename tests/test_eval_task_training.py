"""`--eval-task` during training: the task's accuracy as a metrics.csv column at every evaluation,
equal to what `python -m gpt evaluate --task` gives for the same weights, kept across a resume."""

import csv
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from test_resume import interrupt_after
from tiny_runs import TOKENS, cli_error, tiny

from gpt.base.errors import run_cli
from gpt.eval.evaluate import main as evaluate_main
from gpt.training.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent
CHOICES = ROOT / "docs" / "examples" / "choice-sample.jsonl"
COLUMN = "choice_acc_norm:choice-sample"


def rows(run_dir: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def task_run(tmp_path: Path, **overrides):
    return tiny(tmp_path, eval_task=[f"choice:{CHOICES}"], eval_task_limit=8, context_length=32,
                eval_freq=4, epochs=2, **overrides)


def test_the_task_column_equals_the_command_on_the_same_weights(tmp_path, capsys) -> None:
    result = train(task_run(tmp_path, max_steps=8), token_ids=TOKENS)
    columns, logged = rows(result.run_dir)
    assert columns[-1] == COLUMN and [row["step"] for row in logged] == ["0", "4", "8"]
    assert all(0.0 <= float(row[COLUMN]) <= 1.0 for row in logged)
    assert f"| {COLUMN} " in capsys.readouterr().out
    run_cli(lambda: evaluate_main(["--checkpoint", str(result.run_dir / "last"), "--task", "choice",
                                   "--data", str(CHOICES), "--limit", "8", "--context-length", "32",
                                   "--dtype", "float32", "--device", "cpu", "--json"]))
    report = json.loads(capsys.readouterr().out)
    assert report["acc_norm"] == pytest.approx(float(logged[-1][COLUMN]), abs=1e-9)
    assert report["records"] == 8


def test_a_resumed_run_logs_the_same_task_column_as_a_straight_one(tmp_path, monkeypatch) -> None:
    cfg = task_run(tmp_path, drop_rate=0.1, max_steps=8)
    train(dataclasses.replace(cfg, run_name="straight"), token_ids=TOKENS)
    interrupt_after(5, monkeypatch)
    assert train(cfg, token_ids=TOKENS).stop_reason == "interrupted"
    monkeypatch.undo()
    torch.manual_seed(999)
    train(cfg, resume=tmp_path / "run", token_ids=TOKENS)
    (straight_columns, straight), (resumed_columns, resumed) = rows(tmp_path / "straight"), rows(
        tmp_path / "run")
    assert resumed_columns == straight_columns
    assert [row[COLUMN] for row in resumed] == [row[COLUMN] for row in straight]


def test_a_bad_task_is_one_line_before_training(tmp_path, capsys) -> None:
    for spec, message in (("quiz:nowhere.jsonl", "is not KIND:FILE"),
                          (f"choice:{tmp_path / 'nowhere.jsonl'}", "there is no file")):
        err = cli_error(["--eval-task", spec, "--preset", "tiny", "--device", "cpu",
                         "--out", str(tmp_path / "runs")], capsys)
        assert message in err
    assert not (tmp_path / "runs").exists()


def test_the_limit_must_be_at_least_one(tmp_path) -> None:
    with pytest.raises(ValueError, match="--eval-task-limit must be at least 1"):
        tiny(tmp_path, eval_task_limit=0)


def test_settings_from_toml_take_a_list_of_tasks(tmp_path) -> None:
    specs = [f"choice:{CHOICES}", f"last-word:{CHOICES.parent / 'last-word-sample.txt'}"]
    assert tiny(tmp_path, eval_task=specs).eval_task == tuple(specs)
    with pytest.raises(ValueError, match="--eval-task must be a list of strings"):
        tiny(tmp_path, eval_task="choice:a.jsonl")
