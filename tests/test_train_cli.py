"""train.py end to end: real subprocesses for Ctrl-C and the exit status of bad input; the smoke
run, divergence and the bad-input cases in-process through the same `run_cli(main)` the script runs
(fast, and the same code path)."""

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpt.base.errors import run_cli
from gpt.checkpoints.checkpoint import load_train_state
from gpt.cli.train import main, parse_args
from gpt.training.settings import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def tiny_flags(tmp_path: Path, corpus: Path, *more: str) -> list[str]:
    return ["--data", str(corpus), "--data-dir", str(tmp_path / "data"), "--preset", "tiny",
            "--context-length", "16", "--batch-size", "2", "--eval-iters", "1", "--dtype",
            "float32",
            "--device", "cpu", "--sample-tokens", "4", "--out", str(tmp_path / "runs"),
            "--run-name", "cli",
            *more]


def run_script(*args: str, **kwargs) -> subprocess.Popen:
    # One thread: a tiny model gains nothing from two, and on a busy machine they wait on each
    # other.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kwargs)


@pytest.mark.usefixtures("one_thread")
def test_smoke_run_writes_metrics_plot_and_both_checkpoints(tmp_path, corpus, run_command) -> None:
    status, out, err = run_command(main, tiny_flags(tmp_path, corpus, "--max-steps", "6",
                                                    "--eval-freq", "3"))
    assert status == 0, err
    run = tmp_path / "runs" / "cli"
    lines = (run / "metrics.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in lines] == ["step", "0", "3", "6"]
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for checkpoint in ("best", "last"):
        assert load_train_state(run / checkpoint)["state"]["step"] in (3, 6)
        assert (run / checkpoint / "model.safetensors").is_file()
    assert "sample at the end: Every effort moves you" in out
    assert "best validation loss" in out and "Traceback" not in err


def test_ctrl_c_saves_last_and_resume_finishes_the_run(tmp_path, corpus, capsys) -> None:
    flags = tiny_flags(tmp_path, corpus, "--epochs", "1000", "--max-steps", "0", "--eval-freq",
                       "50")
    proc = run_script(*flags)
    metrics = tmp_path / "runs" / "cli" / "metrics.csv"
    deadline = time.monotonic() + 120
    while not metrics.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # the first evaluation (step 0) is written: the loop is running
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    run = tmp_path / "runs" / "cli"
    assert f"continue with: python train.py --resume {run}" in out
    step = load_train_state(run / "last")["state"]["step"]
    assert step >= 1

    # The run's own settings come back from the checkpoint; only the step limit is new.
    main(["--resume", str(run), "--max-steps", str(step + 2)])
    assert load_train_state(run / "last")["state"]["step"] == step + 2
    assert f"step {step} now" in capsys.readouterr().out


def test_divergence_exits_non_zero_naming_the_step(tmp_path, corpus, capsys) -> None:
    err = cli_error(tiny_flags(tmp_path, corpus, "--lr", "1e30", "--warmup-steps", "0",
                               "--max-steps", "10"),
                    capsys)
    assert err.startswith("error: the loss is nan at step 2: training stopped before that step "
                          "changed")


def test_bad_input_from_the_script_is_one_line_without_traceback(tmp_path) -> None:
    proc = run_script("--batch-size", "0")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert err == "error: --batch-size must be at least 1, got 0; e.g. --batch-size 8\n"


def cli_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    err = captured.err.splitlines()[-1] + "\n"  # after a progress bar (tokenizing) if there was one
    assert err.startswith("error: ") and "Traceback" not in captured.err, captured.err
    return err


@pytest.mark.parametrize(("flags", "message"), [
    (["--preset", "huge"], "--preset must be one of"),
    (["--batch-size", "-3"], "--batch-size must be at least 1, got -3"),
    (["--lr", "0"], "--lr must be a positive number, got 0.0"),
    (["--lr", "-0.1"], "--lr must be a positive number"),
    (["--batch-size", "many"], "argument --batch-size: invalid int value: 'many'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--dtype", "float16", "--device", "cpu"], "--dtype float16 needs a CUDA GPU"),
])
def test_bad_flags(flags, message, capsys, tmp_path) -> None:
    assert message in cli_error([*flags, "--out", str(tmp_path)], capsys)


def test_bad_data_and_context(tmp_path, corpus, capsys) -> None:
    err = cli_error(tiny_flags(tmp_path, corpus, "--context-length", "129"), capsys)
    assert "--context-length 129 exceeds the model's context length 128" in err
    err = cli_error(tiny_flags(tmp_path, corpus, "--data", str(tmp_path / "missing.txt")), capsys)
    assert "missing.txt" in err
    assert not (tmp_path / "runs" / "cli").exists() or not any((tmp_path / "runs" / "cli").iterdir())  # noqa: E501


def test_resume_errors(tmp_path, corpus, capsys) -> None:
    err = cli_error(["--resume", str(tmp_path / "nowhere")], capsys)
    assert f"--resume {tmp_path / 'nowhere'}: no such run directory" in err
    (tmp_path / "empty").mkdir()
    err = cli_error(["--resume", str(tmp_path / "empty")], capsys)
    assert f"there is no {tmp_path / 'empty' / 'last'} checkpoint" in err

    main(tiny_flags(tmp_path, corpus, "--max-steps", "2", "--eval-freq", "2"))
    capsys.readouterr()
    run = tmp_path / "runs" / "cli"
    err = cli_error(["--resume", str(run), "--n-layers", "3"], capsys)
    assert "--n-layers 3 differs from the run's None" in err and "train_state.pt" in err

    weights = run / "last" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    err = cli_error(["--resume", str(run)], capsys)
    assert f"cannot read {weights}" in err and "truncated" in err

    state = run / "best" / "train_state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    err = cli_error(["--resume", str(run / "best")], capsys)
    assert f"cannot read {state}" in err and "truncated" in err


def test_config_file_then_flags(tmp_path, capsys) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text('batch-size = 3\nlr = 0.01\npreset = "tiny"\nlog_scale = true\n')
    cfg, resume = parse_args(["--config", str(toml), "--lr", "0.02"])
    assert resume is None
    assert cfg == TrainConfig(batch_size=3, lr=0.02, preset="tiny", log_scale=True)
    toml.write_text("batch_sise = 3\n")
    assert "unknown setting(s) batch_sise" in cli_error(["--config", str(toml)], capsys)
    toml.write_text("batch_size = \n")
    assert f"--config {toml} is not valid TOML" in cli_error(["--config", str(toml)], capsys)
    toml.write_text('batch_size = "3"\n')
    assert "--batch-size must be int, got '3'" in cli_error(["--config", str(toml)], capsys)
    toml.write_text('errors = "replace"\n')  # the old name of --decode-errors
    assert parse_args(["--config", str(toml)])[0].decode_errors == "replace"
    assert parse_args(["--config", str(toml), "--errors", "strict"])[0].decode_errors == "strict"


def test_help_documents_every_setting(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name in TrainConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in text
    assert "Peak learning rate, reached at the end of the warm-up. [0.002]" in text
    assert "--decode-errors TEXT, --errors TEXT" in text  # the old flag, still accepted


def test_the_root_script_only_calls_the_package_command() -> None:
    """`train.py` is `gpt.cli.train.main`; `python -m gpt.cli.train` is the same command."""
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main is main
    as_module = subprocess.run([sys.executable, "-m", "gpt.cli.train", "--batch-size", "0"],
                               capture_output=True, text=True, timeout=120, check=False,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert as_module.returncode == 2
    assert as_module.stderr == "error: --batch-size must be at least 1, got 0; e.g. --batch-size 8\n"  # noqa: E501
