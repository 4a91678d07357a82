"""The one exception type the command-line fronts turn into a one-line message.

Library code raises `UserError` for problems the user can fix (a missing file, a bad flag, a corrupt
checkpoint, a bad argument). It is a `ValueError`, so a Python caller that passes a bad value can
catch it as one. Every command's `main` runs through `run_cli`, which prints the message as
`error: ...` and exits with status 2, with no traceback. Anything else is a bug and keeps its
traceback. `command_name` gives those commands the name they were started by, for their usage line.
"""

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

CONSOLE_PREFIX = "gpt-"  # every console command of the package starts so ([project.scripts])


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


def run_cli(main: Callable[[], None]) -> None:
    """Run a command-line front: a `UserError` becomes `error: <message>` on stderr and exit status 2."""
    try:
        main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors (an unknown flag, a value of the wrong type) are a `UserError` too:
    one line through `run_cli`, not argparse's usage block."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message}; see {self.prog} --help")


def command_name(default: str) -> str:
    """The command's name for its usage line: the console command's (`gpt-export`, from sys.argv[0])
    when it was started as one, else `default` (`python -m gpt.cli.export`, `train.py`), which is also
    what a `main` called from Python (a test, a notebook) shows."""
    name = Path(sys.argv[0]).name
    return name if name.startswith(CONSOLE_PREFIX) else default
