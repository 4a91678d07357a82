"""`python -m gpt <command>`: the command table, and bad flags of every command ending in one line.

Each case runs as a real process (its exit status and stderr are what a user sees), in an empty
directory that must stay empty: a refused command writes nothing.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpt.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]

# What each command needs besides the flag under test, so that the flag is what it refuses.
REQUIRED = {"train": [], "generate": [], "evaluate": ["--data", "x.txt"],
            "explain": ["--text", "hi"], "export": ["run", "out"], "serve": []}
BAD_VALUES = {
    "train": (["--batch-size", "many"], "argument --batch-size: invalid int value: 'many'"),
    "generate": (["--top-k", "1e30"], "argument --top-k: invalid int value: '1e30'"),
    "evaluate": (["--stride", "x"], "argument --stride: invalid int value: 'x'"),
    # then the choices, which Python versions quote differently
    "explain": (["--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
}


def python_m_gpt(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "gpt", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=env)


def refused(done: subprocess.CompletedProcess, cwd: Path) -> str:
    """The one `error: ...` line of a refused command, after checking it is all it did."""
    assert done.returncode == 2 and done.stdout == "", done
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: "), done.stderr
    assert list(cwd.iterdir()) == []
    return done.stderr.removesuffix("\n")


def test_the_table_lists_every_command() -> None:
    assert list(COMMANDS) == ["train", "generate", "evaluate", "explain", "export", "serve"]


@pytest.mark.parametrize("name", COMMANDS)
def test_an_unknown_flag_is_one_line_naming_the_command_as_typed(name: str, tmp_path: Path) -> None:
    done = python_m_gpt(tmp_path, name, *REQUIRED[name], "--foo")
    assert refused(done, tmp_path) == (f"error: unrecognized arguments: --foo; "
                                       f"see python -m gpt {name} --help")


@pytest.mark.parametrize("name", BAD_VALUES)
def test_a_value_of_the_wrong_kind_is_one_line(name: str, tmp_path: Path) -> None:
    flags, message = BAD_VALUES[name]
    done = python_m_gpt(tmp_path, name, *REQUIRED[name], *flags)
    line = refused(done, tmp_path)
    assert line.startswith(f"error: {message}")
    assert line.endswith(f"; see python -m gpt {name} --help")


def test_export_of_a_missing_run_is_one_line(tmp_path: Path) -> None:
    assert "error: run is neither a checkpoint directory" in refused(
        python_m_gpt(tmp_path, "export", "run", "out"), tmp_path)


def test_no_command_prints_the_table_and_an_unknown_one_is_one_line(tmp_path: Path) -> None:
    done = python_m_gpt(tmp_path)
    assert done.returncode == 2 and done.stderr == ""
    lines = done.stdout.splitlines()
    assert lines[0].startswith("usage: python -m gpt <command>")
    assert [line.split()[0] for line in lines[3:]] == list(COMMANDS)
    assert refused(python_m_gpt(tmp_path, "fly"), tmp_path) == (
        "error: unknown command 'fly'; the commands are train, generate, evaluate, explain, "
        "export, serve (see python -m gpt --help)")


def test_help_is_the_table_in_process_and_the_commands_help_names_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["--help"])
    assert capsys.readouterr().out.splitlines()[0].startswith("usage: python -m gpt <command>")
    done = python_m_gpt(tmp_path, "generate", "--help")
    assert done.returncode == 0 and done.stdout.startswith("usage: python -m gpt generate [-h]")
    assert "--checkpoint RUN_DIR" in done.stdout and "--quantize SCHEME" in done.stdout
