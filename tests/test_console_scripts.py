"""The console commands that `pip install` puts next to Python do what the root scripts and
`python -m` modules do: the same help, the same files, the same text."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gpt.checkpoint import save_model
from gpt.config import GPTConfig
from gpt.errors import command_name
from gpt.model import GPT

ROOT = Path(__file__).resolve().parents[1]
# Each command, and what it stands for: a root script, or a module run with `python -m`.
COMMANDS = {
    "gpt-train": [str(ROOT / "train.py")],
    "gpt-generate": [str(ROOT / "generate.py")],
    "gpt-evaluate": ["-m", "gpt.evaluate"],
    "gpt-explain": ["-m", "gpt.explain"],
    "gpt-export": ["-m", "gpt.export"],
}


def installed(name: str) -> str:
    """The path of console command `name` in this Python's environment (bin/, or Scripts\\ on Windows)."""
    path = shutil.which(name, path=str(Path(sys.executable).parent))
    assert path is not None, f"{name} is not installed next to {sys.executable}; run: pip install -e ."
    return path


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run a command with this checkout's `gpt` first on the path, as the tests import it."""
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    return done


def command(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run([installed(name), *args], cwd)


def reference(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run([sys.executable, *COMMANDS[name], *args], cwd)


@pytest.mark.parametrize("name", COMMANDS)
def test_each_command_has_the_help_of_what_it_stands_for_under_its_name(name: str, tmp_path: Path) -> None:
    ours, theirs = command(name, "--help", cwd=tmp_path), reference(name, "--help", cwd=tmp_path)
    assert ours.stdout.startswith(f"usage: {name} ")
    how = COMMANDS[name]  # the usage line names it as typed: `python -m gpt.export`, `train.py`
    typed = f"python -m {how[1]}" if how[0] == "-m" else Path(how[0]).name
    assert theirs.stdout.startswith(f"usage: {typed} ")
    # After the usage block (whose line breaks depend on the name's length), the help is the same.
    assert ours.stdout.split("\n\n", 1)[1] == theirs.stdout.split("\n\n", 1)[1]


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    directory = tmp_path / "checkpoint"
    directory.mkdir()
    save_model(GPT(GPTConfig.preset("tiny")), directory)
    return directory


def test_gpt_export_writes_what_python_m_gpt_export_writes(checkpoint: Path, tmp_path: Path) -> None:
    ours = command("gpt-export", str(checkpoint), "by-command", cwd=tmp_path)
    theirs = reference("gpt-export", str(checkpoint), "by-module", cwd=tmp_path)
    assert ours.stdout.replace("by-command", "by-module") == theirs.stdout
    a, b = tmp_path / "by-command", tmp_path / "by-module"
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir()) and "README.md" in files
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_gpt_generate_prints_what_generate_py_prints(checkpoint: Path, tmp_path: Path) -> None:
    flags = ["--checkpoint", str(checkpoint), "--temperature", "0", "--max-new-tokens", "8",
             "--dtype", "float32", "--device", "cpu"]
    ours = command("gpt-generate", *flags, cwd=tmp_path)
    assert ours.stdout == reference("gpt-generate", *flags, cwd=tmp_path).stdout
    assert ours.stdout.startswith("Every effort moves you")


def test_gpt_train_trains_as_train_py_does(tmp_path: Path) -> None:
    (tmp_path / "corpus.txt").write_text("Every effort moves you a step closer to the sea. " * 60)
    flags = ["--data", "corpus.txt", "--preset", "tiny", "--context-length", "32", "--batch-size", "2",
             "--max-steps", "2", "--eval-freq", "2", "--sample-tokens", "0", "--dtype", "float32",
             "--device", "cpu"]
    command("gpt-train", *flags, "--run-name", "a", cwd=tmp_path)
    reference("gpt-train", *flags, "--run-name", "b", cwd=tmp_path)
    a, b = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    assert (a / "best" / "model.safetensors").read_bytes() == (b / "best" / "model.safetensors").read_bytes()

    def losses(run_dir: Path) -> list[list[str]]:  # metrics.csv without its tokens_per_s column (timing)
        rows = [line.split(",") for line in (run_dir / "metrics.csv").read_text().splitlines()]
        assert rows[0][-1] == "tokens_per_s"
        return [row[:-1] for row in rows]

    assert losses(a) == losses(b)
    assert len(losses(a)) == 3  # the header, step 0 and step 2


def test_usage_names_the_console_command_only_if_started_as_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", [str(Path(sys.executable).parent / "gpt-export"), "--help"])
    assert command_name("python -m gpt.export") == "gpt-export"
    for started_as in ("train.py", "/usr/bin/pytest", "-c"):  # a script, or main called from Python
        monkeypatch.setattr(sys, "argv", [started_as])
        assert command_name("python -m gpt.export") == "python -m gpt.export"
