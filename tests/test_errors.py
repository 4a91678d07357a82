"""The helpers that turn exceptions into one-line error messages."""

from gpt.errors import describe, first_line


def test_first_line_keeps_one_line_and_names_a_silent_exception() -> None:
    assert first_line(OSError("Connection refused\nmore detail")) == "Connection refused"
    assert first_line("  timed out  ") == "timed out"
    assert first_line(TimeoutError()) == "TimeoutError"


def test_describe_prefixes_the_type() -> None:
    assert describe(RuntimeError("no compiler\ntraceback text")) == "RuntimeError: no compiler"
    assert describe(EOFError()) == "EOFError"
