"""What goes wrong, end to end: damaged files, a full disk, divergence, kills, no network. Each ends
in one `error:` line (or a clean stop) with the run directory as it was, or resumable."""

import multiprocessing
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_runs import TOKENS, assert_same_params, params, tiny

import gpt.training.record_data
from gpt.base.errors import UserError, run_cli
from gpt.checkpoints.checkpoint import load_checkpoint, load_train_state
from gpt.cli.generate import main as generate_main
from gpt.cli.train import main
from gpt.training import trainer
from gpt.training.metrics import MetricsLog
from gpt.training.resume import read_resume_state
from gpt.training.trainer import TrainingDiverged, fit, setup, train

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(emb_dim=16, n_heads=2)  # the tiny preset, narrower: small checkpoints, fast saves


def small(tmp_path: Path, **overrides) -> object:
    return tiny(tmp_path, **{**SMALL, **overrides})


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> Path:
    """A run directory with best/ and last/ (step 2), made once; tests damage copies of it."""
    out = tmp_path_factory.mktemp("saved")
    train(small(out, max_steps=2, eval_freq=2), token_ids=TOKENS)
    return out / "run"


def snapshot(directory: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else None
            for p in sorted(directory.rglob("*"))}


def one_error_line(run, capsys) -> str:
    """What `run()` (a command's main) prints, having exited with status 2 and one line."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(run)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


def damaged(good: bytes, how: str) -> bytes:
    """`good` damaged as a disk, a copy or a user may damage a file."""
    return {"text": b"hello", "one byte 0x80": b"\x80", "empty": b"", "random bytes":
            np.random.default_rng(0).bytes(5000), "cut at 10": good[:10], "cut at "
                                                                          "1000": good[:1000],
            "cut at half": good[:len(good) // 2], "cut 10 bytes short": good[:-10]}[how]


DAMAGES = ["text", "one byte 0x80", "empty", "random bytes", "cut at 10", "cut at 1000", "cut at "
                                                                                         "half",
           "cut 10 bytes short"]


def wrong_structure(state: dict, how: str) -> object:
    """A readable torch file holding something else than a training state."""
    if how == "only a format":
        return {"format": 1}
    if how == "a list":
        return [1, 2]
    if how == "no rng":
        del state["rng"]
    elif how == "step a string":
        state["state"]["step"] = "2"
    elif how == "step a bool":
        state["state"]["step"] = True
    elif how == "python rng too short":
        state["rng"]["python"] = (3, (1, 2), None)
    elif how == "optimizer a string":
        state["optimizer"] = "adam"
    return state


STRUCTURES = ["only a format", "a list", "no rng", "step a string", "step a bool", "python rng too "
                                                                                   "short",
              "optimizer a string"]


@pytest.mark.parametrize("how", DAMAGES + STRUCTURES)
def test_a_damaged_training_state_is_one_line_and_changes_nothing(tmp_path, capsys, saved_run,
                                                                  how) -> None:
    run = shutil.copytree(saved_run, tmp_path / "run")
    path = run / "last" / "train_state.pt"
    if how in DAMAGES:
        path.write_bytes(damaged(path.read_bytes(), how))
    else:
        torch.save(wrong_structure(load_train_state(run / "last"), how), path)
    before = snapshot(run)
    err = one_error_line(lambda: main(["--resume", str(run)]), capsys)
    assert str(path) in err and ("resume from another checkpoint (best/)" in err or "another "
                                                                                    "version" in err)  # noqa: E501
    assert snapshot(run) == before


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_weights_to_resume_are_one_line_and_change_nothing(tmp_path, capsys, saved_run,
                                                                   how) -> None:
    run = shutil.copytree(saved_run, tmp_path / "run")
    path = run / "last" / "model.safetensors"
    path.write_bytes(damaged(path.read_bytes(), how))
    before = snapshot(run)
    err = one_error_line(lambda: main(["--resume", str(run)]), capsys)
    assert f"cannot read {path}" in err and "replace it with a complete copy" in err
    assert snapshot(run) == before


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_init_weights_are_one_line_in_train_and_generate(tmp_path, capsys, monkeypatch,
                                                                 saved_run,
                                                                 suffix, how) -> None:
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pt":
        torch.save({"wte.weight": torch.zeros(50257, 16)}, path)
    else:
        shutil.copy(saved_run / "last" / "model.safetensors", path)
    path.write_bytes(damaged(path.read_bytes(), how))

    def not_read(*args, **kwargs):
        raise AssertionError("the data was read before the model was built")

    monkeypatch.setattr(gpt.training.record_data, "prepare_data", not_read)
    err = one_error_line(lambda: main(["--init", str(path), "--out", str(tmp_path / "runs"),
                                       "--run-name",
                                       "x", "--device", "cpu"]), capsys)
    assert f"cannot read {path}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no run directory left behind
    assert one_error_line(lambda: generate_main(["--init", str(path), "--device", "cpu"]),
                          capsys) == err


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path, capsys) -> None:
    config = tmp_path / "run.toml"
    config.write_bytes("# r\xe9sum\xe9 of the settings\nlr = 0.001\n".encode("latin-1"))
    err = one_error_line(lambda: main(["--config", str(config)]), capsys)
    assert err == f"error: --config {config} is not UTF-8 text (byte 0xe9 at offset 3); save it as UTF-8\n"  # noqa: E501


# ---- a full disk ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory, one_thread) -> tuple[Path, trainer.TrainResult]:
    """A 6-step run that nothing interrupts (made once, read only), to compare resumed runs against.
    """
    out = tmp_path_factory.mktemp("six")
    return out / "run", train(small(out, max_steps=6, eval_freq=2), token_ids=TOKENS)


@pytest.mark.parametrize(("limit", "reason", "async_save"), [
    # model.safetensors, then torch.save of train_state.pt, then that in the background thread
    (1_000_000, r"Error while serializing: I/O error: File too large \(os error 27\)", False),
    (5_000_000, r"\[enforce fail at inline_container.cc:\d+\]", False),
    (5_000_000, r"\[enforce fail at inline_container.cc:\d+\]", True),
])
def test_a_file_size_limit_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch,
                                                                      six_steps,
                                                                      limit, reason,
                                                                      async_save) -> None:
    """RLIMIT_FSIZE (what `ulimit -f` sets; a full disk fails the same writes with ENOSPC) during
    the save at step 4: one line, last/ still the whole step-2 checkpoint, no temporary, and a
    resume finishes the run as if nothing had happened. With the background save, the limit lasts
    until the thread has written (the limit is the process's), and its error reaches the loop."""
    straight_dir, straight = six_steps
    cfg = small(tmp_path, max_steps=6, eval_freq=2, async_save=async_save)
    real_save = trainer.save_checkpoints

    def save_under_a_limit(run, *, last, best, final=False):
        if run.state.step < 4:
            return real_save(run, last=last, best=best, final=final)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        try:
            real_save(run, last=last, best=best, final=final)
            run.saver.wait()  # the background write, under the limit too
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    monkeypatch.setattr(trainer, "save_checkpoints", save_under_a_limit)
    with pytest.raises(UserError) as info:
        train(cfg, token_ids=TOKENS)
    run_dir = tmp_path / "run"
    assert "\n" not in str(info.value)
    # best/ is written first (step 4 improves), so that last/ only names a best that is on disk
    assert str(info.value).startswith(f"cannot write {run_dir / 'best'} (")
    assert f"{run_dir / 'best'} keeps its previous version" in str(info.value)
    assert re.search(reason, str(info.value))
    assert read_resume_state(run_dir / "last")["state"]["step"] == 2
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "best", "last", "loss.png",
                                                         "metrics.csv",
                                                         "train_config.json"]
    monkeypatch.undo()
    resumed = train(cfg, resume=run_dir, token_ids=TOKENS)
    assert resumed.step == 6
    assert_same_params(params(load_checkpoint(run_dir / "last")),
                       params(load_checkpoint(straight_dir / "last")))
    assert resumed.step_losses == {s: straight.step_losses[s] for s in (3, 4, 5, 6)}


def test_a_full_disk_at_the_first_save_is_one_line_and_resumable(tmp_path, capsys) -> None:
    """train.py under a file-size limit that no checkpoint fits: exit 2, one line; then, with the
    limit gone, --resume starts the run again from step 0."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(f"token{i % 37} and so on." for i in range(400)))
    flags = ["--data", str(corpus), "--data-dir", str(tmp_path / "data"), "--preset", "tiny",
             "--emb-dim",
             "16", "--n-heads", "2", "--context-length", "16", "--batch-size", "2", "--eval-iters",
             "1",
             "--dtype", "float32", "--device", "cpu", "--sample-tokens", "0", "--max-steps", "2",
             "--eval-freq", "2", "--out", str(tmp_path / "runs"), "--run-name", "full"]

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000,
                                                   resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *flags], capture_output=True,
                          text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=limit_file_size,
                          timeout=300, check=False)
    run_dir = tmp_path / "runs" / "full"
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1].startswith(f"error: cannot write {run_dir / 'best'} (Error "
                                                   f"while "
                                                   "serializing: I/O error: File too large (os "
                                                   "error 27))")
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "loss.png", "metrics.csv",
                                                         "train_config.json"]
    main(["--resume", str(run_dir)])
    assert f"{run_dir} holds a run that stopped before its first checkpoint: starting it again" \
        in capsys.readouterr().out
    assert [row["step"] for row in MetricsLog(run_dir / "metrics.csv").rows()] == [0, 2]


# ---- divergence -------------------------------------------------------------------------------


def test_weights_whose_evaluation_is_not_finite_are_not_saved(tmp_path) -> None:
    run = setup(small(tmp_path, eval_freq=2), token_ids=TOKENS)

    def poison(module, inputs, hidden):  # the weights have gone bad: their outputs are not finite
        return hidden * torch.nan if not module.training and run.state.step == 4 else None

    run.model.final_norm.register_forward_hook(poison)
    last, best = run.run_dir / "last", run.run_dir / "best"
    with pytest.raises(TrainingDiverged) as info:
        fit(run)
    best_step = load_train_state(best)["state"]["step"]
    assert str(info.value) == (
        f"the training loss is nan at the evaluation of step 4: these weights are not saved; "
        f"{last} holds "
        f"the last checkpoint with finite losses and {best} the best (step {best_step}): resume "
        f"one "
        f"(--resume {best}) with a lower --lr, keep --grad-clip on, or use --dtype float32")
    assert load_train_state(last)["state"]["step"] == 2
    assert [row["step"] for row in MetricsLog(run.run_dir / "metrics.csv").rows()] == [0, 2]


# ---- kill -9 at random moments ----------------------------------------------------------------


def test_a_run_resumed_from_its_step_0_checkpoint_evaluates_step_0_once(tmp_path) -> None:
    """Killed after the first save (step 0), before the first step: the resumed run is the straight
    one, with one step-0 row (found by the kill loop below: it used to log step 0 again)."""
    straight = train(small(tmp_path, run_name="straight", max_steps=4, eval_freq=2),
                     token_ids=TOKENS)
    cfg = small(tmp_path, max_steps=4, eval_freq=2)
    run = setup(cfg, token_ids=TOKENS)
    run.total_steps = 0  # stops right after the step-0 evaluation and its checkpoint
    fit(run)
    resumed = train(cfg, resume=run.run_dir, token_ids=TOKENS)
    assert resumed.step_losses == straight.step_losses
    rows, straight_rows = (MetricsLog(d / "metrics.csv").rows() for d in (run.run_dir,
                                                                          tmp_path / "straight"))
    assert [(r["step"], r["val_loss"]) for r in rows] == [(r["step"], r["val_loss"])
                                                          for r in straight_rows]
    counters = [load_train_state(d / "last")["state"] for d in (run.run_dir, tmp_path / "straight")]
    assert counters[0] == counters[1]  # evals_since_best too: step 0 was not counted twice


def _train_in_child(cfg, resume) -> None:
    train(cfg, resume=resume, token_ids=TOKENS)


def test_random_kills_lose_nothing_and_leave_no_temporaries(tmp_path) -> None:
    """At least 20 SIGKILLs at random moments of a run that evaluates and saves at every step, each
    followed by a resume: every checkpoint left behind loads, the finished run's weights and metrics
    are a straight run's, and no temporary file is left."""
    cfg = small(tmp_path, epochs=1, eval_freq=1)
    straight = train(small(tmp_path, epochs=1, eval_freq=1, run_name="straight"), token_ids=TOKENS)
    run_dir, rng, kills = tmp_path / "run", random.Random(15), 0
    fork = multiprocessing.get_context("fork")  # starts at once: torch is imported already
    while kills < 20:
        resume = run_dir if (run_dir / "train_config.json").exists() else None
        child = fork.Process(target=_train_in_child, args=(cfg, resume))
        child.start()
        child.join(timeout=rng.uniform(0.05, 1.0))
        if child.exitcode is None:
            os.kill(child.pid, signal.SIGKILL)
            kills += 1
        child.join()
        for checkpoint in ("last", "best"):
            if (run_dir / checkpoint).exists():
                step = read_resume_state(run_dir / checkpoint)["state"]["step"]
                assert 0 <= step <= straight.step
                load_checkpoint(run_dir / checkpoint)
        if child.exitcode == 0:  # finished between two kills: start over, kill more
            shutil.rmtree(run_dir)
    resumed = train(cfg, resume=run_dir if (run_dir / "train_config.json").exists() else None,
                    token_ids=TOKENS)
    assert resumed.step == straight.step
    straight_weights = params(load_checkpoint(tmp_path / "straight" / "last"))
    assert_same_params(params(load_checkpoint(run_dir / "last")), straight_weights)
    straight_rows = MetricsLog(tmp_path / "straight" / "metrics.csv").rows()
    rows = MetricsLog(run_dir / "metrics.csv").rows()
    assert [row["step"] for row in rows] == [row["step"] for row in straight_rows]
    assert [row["val_loss"] for row in rows] == [row["val_loss"] for row in straight_rows]
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "best", "last", "loss.png",
                                                         "metrics.csv",
                                                         "train_config.json"]


# ---- no network -------------------------------------------------------------------------------


def test_init_gpt2_offline_fails_at_once_with_what_to_download(tmp_path, capsys, monkeypatch,
                                                             no_network) -> None:
    """No retries: the hub is asked once whether it can be reached, then only the local cache."""
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    err = one_error_line(lambda: generate_main(["--init", "gpt2", "--device", "cpu"]), capsys)
    assert err.startswith("error: cannot download openai-community/gpt2 (the hub cannot be reached "
                          "(huggingface.co:443: network disabled in this test) and the files are "
                          "not in "
                          "the local cache); download config.json and model.safetensors")
