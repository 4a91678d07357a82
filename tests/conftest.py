"""Shared test settings: deterministic, single-process CPU runs."""

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from gpt.base.errors import run_cli


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a socket fails, as on a machine without internet."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from a second thread, and on a busy CPU threads wait on each other.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class CommandResult(NamedTuple):
    status: int
    out: str
    err: str

    def one_line_error(self) -> str:
        """The `error: ...` line of a refused command, after checking that the command printed
        nothing else but progress, no traceback, and exited with status 2."""
        assert self.status == 2 and self.out == "", self
        assert "Traceback" not in self.err and self.err.count("error:") == 1, self.err
        line = self.err.splitlines()[-1]
        assert line.startswith("error: "), self.err
        return line


@pytest.fixture
def run_command(capsys: pytest.CaptureFixture[str]) -> Callable[..., CommandResult]:
    """`run_command(main, argv)` runs a command's `main` in this process the way its console script
    does (through `run_cli`) and returns its exit status, stdout and stderr."""

    def run(main: Callable[[list[str]], None], argv: list[str]) -> CommandResult:
        try:
            run_cli(lambda: main(argv))
            status = 0
        except SystemExit as exc:
            status = int(exc.code or 0)
        out, err = capsys.readouterr()
        return CommandResult(status, out, err)

    return run


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A small text file for `train.py --data` (~2,800 GPT-2 tokens): a tiny run's windows with room
    for a validation split."""
    path = tmp_path / "corpus.txt"
    path.write_text(" ".join(f"token{i % 37} and so on." for i in range(400)))
    return path
