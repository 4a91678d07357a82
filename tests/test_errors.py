"""The error type of user-fixable problems and the helpers that turn exceptions into one-line
messages."""

import pytest
import torch

from gpt.base.errors import UserError, describe, first_line, run_cli
from gpt.checkpoints.key_map import key_pairs
from gpt.model.config import ConfigError, GPTConfig
from gpt.model.model import GPT
from gpt.model.sampling import stream


def test_first_line_keeps_one_line_and_names_a_silent_exception() -> None:
    assert first_line(OSError("Connection refused\nmore detail")) == "Connection refused"
    assert first_line("  timed out  ") == "timed out"
    assert first_line(TimeoutError()) == "TimeoutError"


def test_describe_prefixes_the_type() -> None:
    assert describe(RuntimeError("no compiler\ntraceback text")) == "RuntimeError: no compiler"
    assert describe(EOFError()) == "EOFError"


def test_a_user_error_is_a_value_error_for_library_callers() -> None:
    """A caller passing a bad argument can catch a plain ValueError, whichever module checks it."""
    assert issubclass(UserError, ValueError) and issubclass(ConfigError, UserError)
    model = GPT(GPTConfig.preset("tiny"))
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        stream(model, torch.zeros(1, 2, dtype=torch.long), 3, temperature=-1.0)
    with pytest.raises(ValueError, match="OpenAI's GPT-2 format always ties the head"):
        key_pairs(GPTConfig.preset("tiny", tie_embeddings=False), "openai")
    with pytest.raises(ValueError, match="n_layers must be a positive integer"):
        GPTConfig(n_layers=0)


def test_run_cli_turns_a_user_error_into_one_line_and_status_2(capsys: pytest.CaptureFixture[str]) -> None:  # noqa: E501
    def bad_input() -> None:
        raise UserError("--lr must be > 0, got -1; pass e.g. --lr 3e-4")

    with pytest.raises(SystemExit) as info:
        run_cli(bad_input)
    assert info.value.code == 2
    assert capsys.readouterr().err == "error: --lr must be > 0, got -1; pass e.g. --lr 3e-4\n"


def test_run_cli_lets_a_bug_keep_its_traceback() -> None:
    def bug() -> None:
        raise KeyError("not a user error")

    with pytest.raises(KeyError):
        run_cli(bug)
