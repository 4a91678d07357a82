"""The console commands that `pip install` puts next to Python do what the root scripts and
`python -m` modules do: the same help, the same files, the same text.

Each console command runs as a real process (its exit status and output are what is tested); what it
is compared with, the `main` that the root script or module only calls (test_train_cli.py and
test_generate_cli.py check that of the scripts), runs in this process, started as the script or
module would be (its `sys.argv[0]`, which names it in its usage line): one start of Python and torch
fewer per comparison.
"""

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import gpt.cli.export
import gpt.cli.generate
import gpt.cli.train
import gpt.eval.evaluate
import gpt.eval.explain
from gpt.base.errors import command_name
from gpt.checkpoints.checkpoint import save_model
from gpt.model.config import GPTConfig
from gpt.model.model import GPT

ROOT = Path(__file__).resolve().parents[1]
# Each command, what it stands for (a root script, or a module run with `python -m`, whose argv[0]
# is the module's file), how its usage line names that, and the `main` that runs in its place.
COMMANDS = {
    "gpt-train": (ROOT / "train.py", "train.py", gpt.cli.train.main),
    "gpt-generate": (ROOT / "generate.py", "generate.py", gpt.cli.generate.main),
    "gpt-evaluate": (ROOT / "gpt" / "eval" / "evaluate.py", "python -m gpt evaluate",
                     gpt.eval.evaluate.main),
    "gpt-explain": (ROOT / "gpt" / "eval" / "explain.py", "python -m gpt explain",
                    gpt.eval.explain.main),
    "gpt-export": (ROOT / "gpt" / "cli" / "export.py", "python -m gpt export", gpt.cli.export.main),
}


def installed(name: str) -> str:
    """The path of console command `name` in this Python's environment (bin/, or Scripts\\ on
    Windows)."""
    path = shutil.which(name, path=str(Path(sys.executable).parent))
    assert path is not None, f"{name} is not installed next to {sys.executable}; run: pip install -e ."  # noqa: E501
    return path


def command(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run console command `name` with this checkout's `gpt` first on the path, as the tests import
    it."""
    done = subprocess.run([installed(name), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture
def reference(monkeypatch: pytest.MonkeyPatch, run_command) -> Callable[..., str]:
    """`reference(name, *args, cwd=...)`: what the script or module that console command `name`
    stands for prints to stdout, its `main` run here in `cwd` (the same width of help text as in
    `command`)."""
    # argparse wraps help to the terminal's width; the child's too
    monkeypatch.setenv("COLUMNS", "80")

    def run(name: str, *args: str, cwd: Path) -> str:
        started_as, _, main = COMMANDS[name]
        monkeypatch.chdir(cwd)
        monkeypatch.setattr(sys, "argv", [str(started_as), *args])
        status, out, err = run_command(main, list(args))
        assert status == 0, err
        return out

    return run


@pytest.mark.parametrize("name", COMMANDS)
def test_each_command_has_the_help_of_what_it_stands_for_under_its_name(name: str, tmp_path: Path,
                                                                        reference) -> None:
    ours, theirs = command(name, "--help", cwd=tmp_path).stdout, reference(name, "--help",
                                                                           cwd=tmp_path)
    assert ours.startswith(f"usage: {name} ")
    typed = COMMANDS[name][1]  # as typed: `python -m gpt export`, `train.py`
    assert theirs.startswith(f"usage: {typed} ")
    # After the usage block (whose line breaks depend on the name's length), the help is the same.
    assert ours.split("\n\n", 1)[1] == theirs.split("\n\n", 1)[1]


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    directory = tmp_path / "checkpoint"
    directory.mkdir()
    save_model(GPT(GPTConfig.preset("tiny")), directory)
    return directory


def test_gpt_export_writes_what_python_m_gpt_export_writes(checkpoint: Path, tmp_path: Path,
                                                           reference) -> None:
    ours = command("gpt-export", str(checkpoint), "by-command", cwd=tmp_path)
    theirs = reference("gpt-export", str(checkpoint), "by-module", cwd=tmp_path)
    assert ours.stdout.replace("by-command", "by-module") == theirs
    a, b = tmp_path / "by-command", tmp_path / "by-module"
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir()) and "README.md" in files
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_gpt_generate_prints_what_generate_py_prints(checkpoint: Path, tmp_path: Path,
                                                     reference) -> None:
    flags = ["--checkpoint", str(checkpoint), "--temperature", "0", "--max-new-tokens", "8",
             "--dtype", "float32", "--device", "cpu"]
    ours = command("gpt-generate", *flags, cwd=tmp_path)
    assert ours.stdout == reference("gpt-generate", *flags, cwd=tmp_path)
    assert ours.stdout.startswith("Every effort moves you")


def test_gpt_train_trains_as_train_py_does(tmp_path: Path, reference) -> None:
    (tmp_path / "corpus.txt").write_text("Every effort moves you a step closer to the sea. " * 60)
    flags = ["--data", "corpus.txt", "--preset", "tiny", "--context-length", "32", "--batch-size",
             "2",
             "--max-steps", "2", "--eval-freq", "2", "--sample-tokens", "0", "--dtype", "float32",
             "--device", "cpu"]
    command("gpt-train", *flags, "--run-name", "a", cwd=tmp_path)
    reference("gpt-train", *flags, "--run-name", "b", cwd=tmp_path)
    a, b = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    assert (a / "best" / "model.safetensors").read_bytes() == (b / "best" / "model.safetensors").read_bytes()  # noqa: E501

    # metrics.csv without its tokens_per_s column (timing)
    def losses(run_dir: Path) -> list[list[str]]:
        rows = [line.split(",") for line in (run_dir / "metrics.csv").read_text().splitlines()]
        assert rows[0][-1] == "tokens_per_s"
        return [row[:-1] for row in rows]

    assert losses(a) == losses(b)
    assert len(losses(a)) == 3  # the header, step 0 and step 2


def test_usage_names_the_console_command_only_if_started_as_one(monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: E501
    monkeypatch.setattr(sys, "argv", [str(Path(sys.executable).parent / "gpt-export"), "--help"])
    assert command_name("python -m gpt export") == "gpt-export"
    for started_as in ("train.py", "/usr/bin/pytest", "-c"):  # a script, or main called from Python
        monkeypatch.setattr(sys, "argv", [started_as])
        assert command_name("python -m gpt export") == "python -m gpt export"
    monkeypatch.setattr(sys, "argv", [str(ROOT / "gpt" / "__main__.py"), "generate", "--help"])
    assert command_name("generate.py") == "python -m gpt generate"
