"""The run directory: checked before anything is built, one writer, reusable before its first save.
"""

import contextlib
import io
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_runs import TOKENS, assert_same_params, cli_error, params, tiny

import gpt.training.record_data
import gpt.training.run_dir
from gpt.base.atomic import remove_stale_temporaries
from gpt.base.errors import run_cli
from gpt.checkpoints.checkpoint import load_checkpoint
from gpt.cli.train import main
from gpt.training import trainer
from gpt.training.metrics import MetricsLog
from gpt.training.trainer import setup, train

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
TEXT = " ".join(f"token{i % 37} and so on." for i in range(400))


@pytest.fixture
def nothing_built(monkeypatch) -> None:
    """Building a model or reading the data fails the test: the checks must come first."""
    def built(*args, **kwargs):
        raise AssertionError("built a model or read the data before the run directory was checked")

    monkeypatch.setattr(trainer, "build_model", built)
    monkeypatch.setattr(gpt.training.record_data, "prepare_data", built)


@pytest.mark.parametrize("case", ["out under a file", "out is a file", "run name is a file",
                                  "unwritable"])
def test_a_bad_output_directory_fails_before_anything_is_built(tmp_path, monkeypatch, capsys,
                                                               nothing_built,
                                                               case: str) -> None:
    (tmp_path / "file").write_text("mine")
    out, name, blocker = {"out under a file": (tmp_path / "file" / "runs", "x", tmp_path / "file"),
                          "out is a file": (tmp_path / "file", "x", tmp_path / "file"),
                          "run name is a file": (tmp_path, "file", tmp_path / "file"),
                          "unwritable": (tmp_path / "locked" / "runs", "x",
                                         tmp_path / "locked")}[case]
    # the tests may run as root, who may write anywhere: a user who may not
    if case == "unwritable":
        blocker.mkdir()
        real_access = os.access
        monkeypatch.setattr(gpt.training.run_dir.os, "access",
                            lambda path, mode: Path(path) != blocker and real_access(path, mode))
    err = cli_error(["--preset", "tiny", "--out", str(out), "--run-name", name], capsys)
    fix = "make it writable" if case == "unwritable" else "is a file"
    assert str(blocker) in err and fix in err and "choose another --out" in err
    assert (tmp_path / "file").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "locked"][:1
                                                                            + (case == "unwritable")]  # noqa: E501


def _resume_in_child(run_dir: Path, answer) -> None:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            run_cli(lambda: main(["--resume", str(run_dir)]))
    except SystemExit as exc:
        answer.send((exc.code, err.getvalue()))


def test_a_second_writer_is_refused_naming_the_first(tmp_path) -> None:
    """A --resume of a run that is still being written: another process (forked, so that it starts
    at once), refused with the first one's process id."""
    # holds the lock until its fit ends
    first = setup(tiny(tmp_path, max_steps=4), token_ids=TOKENS)
    answer, child_end = multiprocessing.Pipe()
    child = multiprocessing.get_context("fork").Process(target=_resume_in_child,
                                                        args=(first.run_dir, child_end))
    child.start()
    assert answer.poll(120)
    assert answer.recv() == (2, f"error: {first.run_dir} is in use: process {os.getpid()} is "
                                f"writing it (it holds {first.run_dir / '.lock'}); wait for it to "
                                f"end or stop it, or choose "
                                "another --run-name\n")
    child.join()
    fit_result = trainer.fit(first)  # ... and the lock goes with it
    resumed = setup(tiny(tmp_path, max_steps=4), resume=first.run_dir, token_ids=TOKENS)
    assert resumed.state.step == fit_result.step


def test_two_runs_started_together_one_trains_the_other_is_refused(tmp_path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    flags = ["--data", str(corpus), "--data-dir", str(tmp_path / "data"), "--preset", "tiny",
             "--context-length", "16", "--batch-size", "2", "--eval-iters", "1", "--dtype",
             "float32",
             "--device", "cpu", "--sample-tokens", "0", "--epochs", "1000", "--eval-freq", "2",
             "--out", str(tmp_path / "runs"), "--run-name", "both"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(ROOT / "train.py"), *flags],
                              stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    deadline = time.monotonic() + 180
    while all(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    refused = next(p for p in procs if p.poll() is not None)
    trained = procs[1 - procs.index(refused)]
    metrics = MetricsLog(tmp_path / "runs" / "both" / "metrics.csv")
    while len(metrics.rows()) < 2 and trained.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)  # training, not still starting
    trained.send_signal(signal.SIGINT)  # Ctrl-C: saves last/ and stops
    _, refused_err = refused.communicate(timeout=60)
    _, trained_err = trained.communicate(timeout=120)
    assert refused.returncode == 2 and trained.returncode == 130, trained_err
    run_dir = tmp_path / "runs" / "both"
    assert refused_err == (f"error: {run_dir} is in use: process {trained.pid} is writing it (it "
                           f"holds {run_dir / '.lock'}); wait for it to end or stop it, or choose "
                           f"another "
                           "--run-name\n")
    steps = [row["step"] for row in metrics.rows()]
    # one run's rows, once, in order
    assert len(steps) >= 2 and steps == list(range(0, 2 * len(steps), 2))


@pytest.mark.parametrize("restart", ["new run", "resume"])
def test_a_run_stopped_before_its_first_checkpoint_starts_again(tmp_path, capsys,
                                                                restart: str) -> None:
    """A run directory with settings but no checkpoint: both a new run of that name and a --resume
    start it from step 0, and the run is the one a clean start gives."""
    straight = train(tiny(tmp_path, run_name="straight", max_steps=6), token_ids=TOKENS)
    straight_weights = params(load_checkpoint(tmp_path / "straight" / "last"))
    cfg = tiny(tmp_path, max_steps=6)
    # train_config.json written; killed before the first save
    stopped = setup(cfg, token_ids=TOKENS)
    MetricsLog(stopped.run_dir / "metrics.csv").append({**dict.fromkeys(
        ("epoch", "train_loss", "val_loss", "val_perplexity", "lr", "grad_norm", "tokens_per_s"),
        1.0),
        "step": 0, "tokens_seen": 0})
    stopped.lock.release()
    capsys.readouterr()
    if restart == "new run":
        result = train(cfg, token_ids=TOKENS)
    else:
        result = train(cfg, resume=stopped.run_dir, token_ids=TOKENS)
    said = ("reusing the directory" if restart == "new run"
            else "starting it again from step 0 with its settings")
    out = capsys.readouterr().out
    assert f"{stopped.run_dir} holds a run that stopped before its first checkpoint: {said}" in out
    assert result.step_losses == straight.step_losses
    assert_same_params(params(load_checkpoint(stopped.run_dir / "last")), straight_weights)
    assert [row["step"] for row in MetricsLog(stopped.run_dir / "metrics.csv").rows()] == [0, 4, 6]


def test_a_directory_with_other_files_is_not_taken(tmp_path, capsys, nothing_built) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    err = cli_error(["--preset", "tiny", "--out", str(tmp_path), "--run-name", "x"], capsys)
    assert err == (f"error: {tmp_path / 'x'} holds files that are not a run's (notes.txt); choose "
                   f"another "
                   "--run-name or an empty directory\n")
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["notes.txt"]


def test_stale_temporaries_of_gone_processes_are_removed(tmp_path) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True,
                          text=True, check=True)
    dead = int(gone.stdout)
    names = {f".loss.png.tmp.{dead}.0a1b2c3d": "file", f".last.tmp.{dead}.0a1b2c3d": "dir",
             ".loss.png.0123456789ab.tmp": "file", ".best.tmp": "dir",  # written by older versions
             f".last.tmp.{os.getpid()}.0a1b2c3d": "dir",  # this process's: it may be writing it now
             ".notes.tmp": "file", "loss.png": "file"}  # not a temporary of a run's file
    for name, kind in names.items():
        (tmp_path / name).mkdir() if kind == "dir" else (tmp_path / name).write_bytes(b"")
    removed = remove_stale_temporaries(tmp_path, {"loss.png", "last", "best"})
    assert sorted(p.name for p in removed) == sorted(list(names)[:4])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(list(names)[4:])
