"""The commands (`python -m gpt <command>`, the `gpt-*` console scripts, train.py and
generate.py). The top: Imports every other package; none imports it.

`COMMANDS` is the table `python -m gpt` dispatches by (`main`): each command's module, whose
`main(argv)` runs it, is imported only when that command runs.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from gpt.base.errors import DISPATCHER, UserError

COMMANDS = {
    "train": ("gpt.cli.train", "pretrain or fine-tune a model (train.py)"),
    "generate": ("gpt.cli.generate", "sample text from a run or GPT-2 weights (generate.py)"),
    "evaluate": ("gpt.eval.evaluate", "a model's perplexity and bits per byte on a text"),
    "explain": ("gpt.eval.explain", "a text's loss token by token"),
    "export": ("gpt.cli.export", "a checkpoint as a Hugging Face model directory"),
    "serve": ("gpt.serve.cli", "an OpenAI-compatible HTTP server and a chat page (extra [serve])"),
}
"""Command name -> (the module whose `main(argv)` runs it, what it does)."""


def usage() -> str:
    """The table of commands that `python -m gpt` prints."""
    width = max(map(len, COMMANDS))
    lines = [f"usage: {DISPATCHER} <command> [flags]", "",
             f"commands ({DISPATCHER} <command> --help lists its flags):"]
    lines += [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m gpt <command> [flags]`: run the command's `main` with the flags. No command prints
    the table and exits with status 2 (--help: status 0); an unknown one is a `UserError`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        if not argv:
            raise SystemExit(2)
        return
    name, flags = argv[0], argv[1:]
    if name not in COMMANDS:
        raise UserError(f"unknown command {name!r}; the commands are {', '.join(COMMANDS)} "
                        f"(see {DISPATCHER} --help)")
    importlib.import_module(COMMANDS[name][0]).main(flags)
