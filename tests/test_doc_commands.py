"""Every `$ python train.py ...` and `$ python generate.py ...` command of docs/finetuning.md,
docs/preference.md and docs/grpo.md runs as written against the shipped examples/ (issue 31 item 6).

The commands of a page are taken from its fenced code blocks (a `$ ` line and its `\\`
continuations) and run in order, in a temporary directory holding a copy of examples/ (so the
runs/ they write stay out of the repository); `python` is this interpreter and a script is the
repository's. The pages run in one directory, in order: preference.md's DPO run starts from the
run finetuning.md's example trains.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["docs/finetuning.md", "docs/preference.md", "docs/grpo.md"]
SCRIPTS = ("train.py", "generate.py")


def code_lines(text: str) -> list[str]:
    """The lines inside the page's fenced code blocks."""
    lines: list[str] = []
    inside = False
    for line in text.splitlines():
        if line.strip().startswith("```"):
            inside = not inside
        elif inside:
            lines.append(line)
    return lines


def doc_commands(text: str) -> list[list[str]]:
    """The `$ python train.py|generate.py ...` commands of the page's code blocks, each as its
    arguments (shell-split, `\\` continuations joined)."""
    commands: list[list[str]] = []
    lines = iter(code_lines(text))
    for line in lines:
        if not line.startswith("$ "):
            continue
        command = line[2:]
        while command.endswith("\\"):
            command = command[:-1] + next(lines)
        words = shlex.split(command)
        if words[:1] == ["python"] and len(words) > 1 and words[1] in SCRIPTS:
            commands.append(words)
    return commands


def test_commands_are_found_across_continuation_lines() -> None:
    page = ("```\n$ python train.py --data a.jsonl \\\n    --run-name x\nout\n$ ls\n```\n"
            "$ python generate.py\n")
    assert doc_commands(page) == [["python", "train.py", "--data", "a.jsonl", "--run-name", "x"]]


def test_every_train_and_generate_command_of_the_pages_runs_against_the_shipped_examples(
        tmp_path: Path) -> None:
    commands = []
    for page in PAGES:
        found = doc_commands((ROOT / page).read_text(encoding="utf-8"))
        assert any(words[1] == "train.py" for words in found), f"{page} shows no train.py command"
        commands += found
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for words in commands:
        done = subprocess.run([sys.executable, str(ROOT / words[1]), *words[2:]], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=1200)
        output = f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        assert done.returncode == 0, f"{shlex.join(words)}\n{output}"
