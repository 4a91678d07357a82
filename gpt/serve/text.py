"""Tokens to text for a server: whole characters only, `stop` strings cut out before they are sent.

A GPT-2 token is a byte string and a UTF-8 character may span tokens, so each token's text comes
from an incremental decoder (as `generate.py`'s `write_text`): a token that ends inside a character
has the text "" and the next one carries the whole character.

A stop string may also span tokens, and nothing of it may reach the client. `StopFilter` therefore
holds back the tokens whose text could be the start of a stop string, and releases them once the
text that follows shows that it is not; when a stop string is complete, the text before it is
released (the token it starts in cut short) and the rest is dropped.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field, replace

import tiktoken

REPLACEMENT = "\N{REPLACEMENT CHARACTER}".encode()


def token_bytes(tokenizer: tiktoken.Encoding, token: int) -> bytes:
    """The bytes of one token; an id past the tokenizer's (a padded vocabulary) reads as U+FFFD."""
    return tokenizer.decode_single_token_bytes(token) if token < tokenizer.n_vocab else REPLACEMENT


@dataclass(frozen=True)
class Piece:
    """One generated token and what the client is sent for it."""

    token: int
    text: str
    """The text the token completes (whole characters; "" when it ends inside one)."""
    raw: bytes
    """The token's own bytes (for logprobs: `bytes`, and `token` decoded with replacement)."""
    logprob: float | None = None
    """log p(token) under the model's distribution (temperature 1, no top-k/top-p), if asked for."""
    top: list[tuple[int, float]] = field(default_factory=list)
    """The most likely tokens at this step with their log-probabilities, most likely first."""


class Detokenizer:
    """Token ids in, `Piece`s with whole-character text out."""

    def __init__(self, tokenizer: tiktoken.Encoding) -> None:
        self.tokenizer = tokenizer
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def piece(self, token: int, logprob: float | None = None,
              top: list[tuple[int, float]] | None = None) -> Piece:
        raw = token_bytes(self.tokenizer, token)
        return Piece(token, self.utf8.decode(raw), raw, logprob, top or [])

    def flush(self) -> str:
        """Bytes of an unfinished character at the end, as U+FFFD ("" when there are none)."""
        return self.utf8.decode(b"", final=True)


class StopFilter:
    """Releases pieces whose text cannot be part of a stop string; finds the first stop string.

    `push(piece)` returns (released pieces, stopped). Once stopped, the released pieces end right
    before the stop string and nothing more is accepted. `finish()` releases what is held at the end
    of generation (no stop string can complete any more).
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held: list[Piece] = []
        self.stopped = False

    def push(self, piece: Piece) -> tuple[list[Piece], bool]:
        if self.stopped:
            raise RuntimeError("StopFilter already stopped")
        self.held.append(piece)
        if not self.stops:
            return self._release(len(self.held)), False
        text = "".join(p.text for p in self.held)
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.stopped = True
            return self._cut(min(found)), True
        # Keep the longest end of the text that a stop string begins with; release what is before.
        keep = max((n for s in self.stops for n in range(1, min(len(s), len(text) + 1))
                    if text.endswith(s[:n])), default=0)
        releasable, count, end = len(text) - keep, 0, 0
        for p in self.held:
            if end + len(p.text) > releasable:
                break
            end += len(p.text)
            count += 1
        return self._release(count), False

    def finish(self) -> list[Piece]:
        return self._release(len(self.held))

    def _release(self, count: int) -> list[Piece]:
        released, self.held = self.held[:count], self.held[count:]
        return released

    def _cut(self, at: int) -> list[Piece]:
        """The held pieces whose text starts before character `at`, the last one cut short there."""
        out, start = [], 0
        for p in self.held:
            if start >= at:
                break
            if start + len(p.text) > at:
                p = replace(p, text=p.text[:at - start])
            out.append(p)
            start += len(p.text)
        self.held = []
        return out
