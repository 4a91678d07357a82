"""The one exception type the command-line fronts turn into a one-line message.

Library code raises `UserError` for problems the user can fix (a missing file, a bad flag, a corrupt
checkpoint, a bad argument). It is a `ValueError`, so a Python caller that passes a bad value can
catch it as one. Every command's `main` runs through `run_cli`, which prints the message as
`error: ...` and exits with status 2, with no traceback. Anything else is a bug and keeps its
traceback. `ArgumentParser` is the one parser of every command, whose usage errors are `UserError`s
too; `command_name` gives those commands the name they were started by, for their usage line.
"""

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

CONSOLE_PREFIX = "gpt-"  # every console command of the package starts so ([project.scripts])
DISPATCHER = "python -m gpt"  # runs gpt/__main__.py, which dispatches to a command (`gpt.cli`)


class UserError(ValueError):
    """A problem with the user's input; the message names the problem and the fix, on one line."""


class TrainingDiverged(UserError):
    """Training can no longer make progress: the loss or the gradient norm stopped being finite, or
    float16's loss scale collapsed."""


def first_line(problem: BaseException | str) -> str:
    """The first line of an exception's message (or of a reason string), for a one-line error; an
    exception without a message gives its type's name."""
    text = str(problem).strip()
    return text.splitlines()[0] if text else type(problem).__name__


def describe(exc: BaseException) -> str:
    """`Type: first line of the message`, or `Type` alone when there is no message."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def past_json_limits(exc: RecursionError | ValueError) -> str:
    """What `json.loads` raising `exc` (not a `JSONDecodeError`) means: its input went past one of
    Python's own limits, which Python's message would advise raising in code."""
    if isinstance(exc, RecursionError):
        return "JSON nested deeper than Python can read"
    return "an integer of more digits than Python converts"


def run_cli(main: Callable[[], None]) -> None:
    """Run a command-line front: a `UserError` becomes `error: <message>` on stderr and exit status
    2."""
    try:
        main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors (an unknown flag, a value of the wrong type, two flags that
    exclude each other) are a `UserError` too: one line through `run_cli`, not argparse's usage
    block. The one parser class of every command."""

    def error(self, message: str) -> NoReturn:
        # A root script (`train.py`) is typed with the interpreter in front of it.
        typed = f"python {self.prog}" if self.prog.endswith(".py") else self.prog
        raise UserError(f"{message}; see {typed} --help")


def command_name(default: str) -> str:
    """The command's name for its usage line: the console command's (`gpt-export`, from sys.argv[0])
    or `python -m gpt export` when it was started as one, else `default` (`python -m gpt export`,
    `train.py`), which is also what a `main` called from Python (a test, a notebook) shows."""
    started = Path(sys.argv[0])
    if started.name == "__main__.py" and started.parent.name == "gpt" and len(sys.argv) > 1:
        return f"{DISPATCHER} {sys.argv[1]}"  # argv: gpt/__main__.py, the command, its flags
    return started.name if started.name.startswith(CONSOLE_PREFIX) else default
