"""README.md and docs/*.md: every relative link resolves, and every command they name exists.

Links: `[text](path)`, `[text](path#anchor)` and `[text](#anchor)` outside code: the file exists,
and the anchor is a heading of that file (GitHub's slugs). Commands, in code blocks and inline code:

- `python -m gpt <command>` and `gpt-<command>`: a command of the command table (`COMMANDS` in
  `gpt/cli/__init__.py` when it has one, else the `gpt-*` console scripts of pyproject.toml);
- `python -m gpt.x.y`: a module that `importlib.util.find_spec` finds;
- `python path/to/script.py`: a file of the repository;
- the flags after `python train.py` (also under torchrun) and `gpt-train`/`python -m gpt train`:
  flags of `gpt.training.flags.build_parser()`; after generate.py and the other commands: flags
  their `--help` lists; after another script: a flag written in its source.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import re
import shlex
import sys
import unicodedata
from functools import cache
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
COMMAND = re.compile(r"(?:^|[\s;&|(])(python3?\s+-m\s+\S+(?:\s+\S+)*|python3?\s+\S+\.py(?:\s+\S+)*"
                     r"|gpt-[a-z]+(?:\s+\S+)*|torchrun\s+(?:\S+\s+)*?\S*train\.py(?:\s+\S+)*)")


def split_page(text: str) -> tuple[list[str], list[str]]:
    """(prose lines, code lines): fenced code blocks apart from the rest."""
    prose: list[str] = []
    code: list[str] = []
    fence = None
    for line in text.splitlines():
        marker = FENCE.match(line.strip())
        if marker and (fence is None or line.strip().startswith(fence)):
            fence = marker.group(1) if fence is None else None
            continue
        (code if fence else prose).append(line)
    return prose, code


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its text as rendered, lowercased, without punctuation but `-`
    and `_`, spaces as `-`."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links: their text
    text = text.replace("`", "").replace("*", "").strip().lower()
    kept = "".join(c for c in text if c in "-_ " or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


@cache
def anchors(page: Path) -> frozenset[str]:
    prose, _ = split_page(page.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    found = set()
    for line in prose:
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            base = slug(heading.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return frozenset(found)


def links(page: Path) -> list[str]:
    prose, _ = split_page(page.read_text(encoding="utf-8"))
    text = "\n".join(INLINE_CODE.sub("", line) for line in prose)
    return [m.group(1) for m in LINK.finditer(text)]


def code_texts(page: Path) -> list[str]:
    """Every code block line (continued lines joined, `$ ` prompts and comments dropped) and every
    inline code span of the prose."""
    prose, code = split_page(page.read_text(encoding="utf-8"))
    texts = []
    joined = "\n".join(code).replace("\\\n", " ")
    for line in joined.splitlines():
        line = line.strip().removeprefix("$ ")
        texts.append(re.split(r"\s#\s|\s#$", line)[0])
    for line in prose:
        texts.extend(m.group(2).strip() for m in INLINE_CODE.finditer(line))
    return texts


def commands(page: Path) -> list[list[str]]:
    """The commands a page names, as word lists (from the command word to the end of its text; a
    text is cut at `&&`, `||`, `;` and `|` first)."""
    found = []
    for text in code_texts(page):
        for segment in re.split(r"&&|\|\||;|\|", text):
            for match in COMMAND.finditer(segment):
                try:
                    found.append(shlex.split(match.group(1)))
                except ValueError:  # an unbalanced quote
                    found.append(match.group(1).split())
    return found


@cache
def pyproject_scripts() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def has_command_table() -> bool:
    return hasattr(importlib.import_module("gpt.cli"), "COMMANDS")


@cache
def command_table() -> frozenset[str]:
    """The commands of `python -m gpt <command>`: gpt.cli's COMMANDS when it has one, else the names
    of the gpt-* console scripts (the same commands, before `python -m gpt` exists)."""
    if has_command_table():
        return frozenset(importlib.import_module("gpt.cli").COMMANDS)
    return frozenset(name.removeprefix("gpt-") for name in pyproject_scripts())


@cache
def train_flags() -> frozenset[str]:
    from gpt.training.flags import build_parser

    return frozenset(build_parser()._option_string_actions)


@cache
def help_flags(command: str) -> frozenset[str]:
    """The flags `gpt-<command> --help` lists (the console script's entry point, run in-process)."""
    module, function = pyproject_scripts()[f"gpt-{command}"].split(":")
    entry = getattr(importlib.import_module(module), function)
    out = io.StringIO()
    argv = sys.argv
    sys.argv = [f"gpt-{command}", "--help"]
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            entry()
    finally:
        sys.argv = argv
    return frozenset(re.findall(r"--[a-z0-9][a-z0-9-]*", out.getvalue()))


def flags(words: list[str]) -> list[str]:
    return [w.split("=")[0] for w in words if w.startswith("--") and len(w) > 2]


def check_command(words: list[str]) -> list[str]:
    """What is wrong with one command (empty: nothing)."""
    head = words[0]
    if head == "torchrun":
        script = next(i for i, w in enumerate(words) if w.endswith("train.py"))
        return check_command(["python", *words[script:]])
    if head.startswith("gpt-"):
        name = head.removeprefix("gpt-")
        if f"gpt-{name}" not in pyproject_scripts():
            return [f"no console script gpt-{name}"]
        return check_flags(name, flags(words[1:]))
    if len(words) >= 3 and words[1] == "-m":
        module = words[2]
        if module == "gpt":
            table = command_table()
            if has_command_table() and not module_exists("gpt.__main__"):
                return ["gpt.cli has COMMANDS but there is no gpt/__main__.py"]
            if len(words) < 4 or "<" in words[3]:  # `python -m gpt`, `python -m gpt <command>`
                return []
            if words[3] not in table:
                return [f"no command {' '.join(words[:4])!r} (commands: {sorted(table)})"]
            return check_flags(words[3], flags(words[4:]))
        if module.startswith("gpt.") and not module_exists(module):
            return [f"no module {module}"]
        return []
    script = words[1]
    if "<" in script:  # a placeholder: python <script>.py
        return []
    path = ROOT / script
    if not path.is_file():
        return [f"no script {script}"]
    if path.name in ("train.py", "generate.py") and path.parent == ROOT:
        return check_flags(path.stem, flags(words[2:]))
    source = path.read_text(encoding="utf-8")
    return [f"{script}: no flag {flag}" for flag in flags(words[2:]) if f'"{flag}"' not in source]


def check_flags(command: str, given: list[str]) -> list[str]:
    known = train_flags() if command == "train" else help_flags(command)
    return [f"{command}: no flag {flag}" for flag in given if flag not in known]


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.name}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = broken_links(page)
    assert not broken, f"{page.name}: " + "; ".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_commands_exist(page: Path) -> None:
    problems = [f"{' '.join(words)}: {p}" for words in commands(page) for p in check_command(words)]
    assert not problems, f"{page.name}:\n" + "\n".join(problems)


def test_every_page_is_linked_from_the_readme() -> None:
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(ROOT / "README.md")}
    missing = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not missing, f"README.md links none of: {missing}"


def test_the_checks_catch_what_they_check(tmp_path: Path) -> None:
    """The checker itself: a broken link, a missing heading, commands that do not exist."""
    page = tmp_path / "page.md"
    page.write_text(
        "# A title: `code`\n\n[a](missing.md) [b](#nope) [c](#a-title-code) [d](page.md)\n"
        "```\n[e](in-code.md)\n$ python train.py --batch-size 8 \\\n    --bogus  # --x\n```\n"
        "Run `gpt-generate --top-k 5` or `python -m gpt nothing`.\n")
    assert [b.split(":")[0] for b in broken_links(page)] == ["missing.md", "#nope"]
    found = commands(page)
    assert found == [["python", "train.py", "--batch-size", "8", "--bogus"],
                     ["gpt-generate", "--top-k", "5"], ["python", "-m", "gpt", "nothing"]]
    assert [len(check_command(words)) for words in found] == [1, 0, 1]
    heading = "Measuring a model: `python -m gpt evaluate`"
    assert slug(heading) == "measuring-a-model-python--m-gpt-evaluate"
    assert slug("Why torch >= 2.6") == "why-torch--26"
    assert check_command(["python", "-m", "gpt", "no-such-command"])
    assert check_command(["python", "-m", "gpt.no.such.module"])
    assert check_command(["python", "benchmarks/no_such.py"])
    assert check_command(["python", "benchmarks/bench_train.py", "--no-such-flag"])
    assert check_command(["python", "train.py", "--no-such-flag"])
    assert check_command(["gpt-train", "--no-such-flag"])
    assert check_command(["python", "generate.py", "--no-such-flag"])
    assert check_command(["python", "-m", "gpt", "evaluate", "--no-such-flag"])
    assert check_command(["torchrun", "--standalone", "train.py", "--no-such-flag"])
    assert check_command(["gpt-nothing"])
    assert not check_command(["python", "train.py", "--batch-size", "8", "--no-async-save"])
    assert not check_command(["python", "generate.py", "--top-p", "0.9"])
    assert not check_command(["python", "-m", "gpt.training.trainer"])
