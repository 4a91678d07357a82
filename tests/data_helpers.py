"""Shared by the data tests (corpora, token cache, data): the reference tokenization and the check
that an error is one line."""

import pytest

from gpt.base.errors import UserError
from gpt.model.tokenizer import ENDOFTEXT_ID, get_tokenizer

EOT = ENDOFTEXT_ID


def encode(text: str) -> list[int]:
    """The reference: tiktoken on the whole text at once, special-token text treated as plain text.
    """
    return get_tokenizer().encode_ordinary(text)


def one_line_error(excinfo: pytest.ExceptionInfo[UserError]) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message
