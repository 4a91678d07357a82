"""The response bodies and stream chunks, in the shapes the OpenAI API sends.

    completion_body / chat_body        a whole response (`stream` false)
    completion_chunk / chat_chunk      one server-sent event's JSON (`stream` true)
    usage                              token counts: in every whole response; streamed, on the last
                                       choice's last chunk, and in a chunk of its own after it when
                                       `stream_options.include_usage` asks for it (as OpenAI does)

Log-probabilities are those of the model's own distribution (softmax of the logits, before
temperature, top-k and top-p), the numbers `python -m gpt.eval.explain` prints: chat's
`logprobs.content` entries (token, logprob, bytes, top_logprobs) and completions' older layout
(tokens, token_logprobs, top_logprobs as {token: logprob}, text_offset).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import tiktoken

from gpt.serve.text import Piece, token_bytes


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass
class Choice:
    """What a choice has produced so far (for a whole response)."""

    pieces: list[Piece] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.pieces)


def _token_text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def chat_logprobs(pieces: list[Piece], tokenizer: tiktoken.Encoding) -> dict[str, Any]:
    """Chat's `logprobs`: one entry per generated token."""
    def entry(token: int, logprob: float, raw: bytes | None = None) -> dict[str, Any]:
        raw = token_bytes(tokenizer, token) if raw is None else raw
        return {"token": _token_text(raw), "logprob": logprob, "bytes": list(raw)}

    return {"content": [
        {**entry(p.token, p.logprob, p.raw), "top_logprobs": [entry(t, lp) for t, lp in p.top]}
        for p in pieces if p.token >= 0 and p.logprob is not None]}


def completion_logprobs(pieces: list[Piece], tokenizer: tiktoken.Encoding,
                        offset: int) -> dict[str, Any]:
    """Completions' `logprobs`; `offset` is where the first piece's text starts in the choice."""
    shown = [p for p in pieces if p.token >= 0 and p.logprob is not None]
    offsets = []
    for p in pieces:
        if p.token >= 0 and p.logprob is not None:
            offsets.append(offset)
        offset += len(p.text)
    return {"tokens": [_token_text(p.raw) for p in shown],
            "token_logprobs": [p.logprob for p in shown],
            "top_logprobs": [{_token_text(token_bytes(tokenizer, t)): lp for t, lp in p.top}
                             for p in shown],
            "text_offset": offsets}


def completion_body(request_id: str, created: int, model: str, choices: list[Choice],
                    prefixes: list[str], logprobs: bool, tokenizer: tiktoken.Encoding,
                    prompt_tokens: int) -> dict[str, Any]:
    """A whole /v1/completions response; `prefixes[i]` is choice i's echoed prompt ("" without
    echo)."""
    return {
        "id": request_id, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": i, "text": prefix + c.text, "finish_reason": c.finish_reason,
                     "logprobs": completion_logprobs(c.pieces, tokenizer, len(prefix))
                     if logprobs else None}
                    for i, (c, prefix) in enumerate(zip(choices, prefixes, strict=True))],
        "usage": usage(prompt_tokens, sum(c.completion_tokens for c in choices)),
    }


def chat_body(request_id: str, created: int, model: str, choices: list[Choice], logprobs: bool,
              tokenizer: tiktoken.Encoding, prompt_tokens: int) -> dict[str, Any]:
    """A whole /v1/chat/completions response."""
    return {
        "id": request_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                     "finish_reason": c.finish_reason,
                     "logprobs": chat_logprobs(c.pieces, tokenizer) if logprobs else None}
                    for i, c in enumerate(choices)],
        "usage": usage(prompt_tokens, sum(c.completion_tokens for c in choices)),
    }


def completion_chunk(request_id: str, created: int, model: str, index: int, text: str,
                     logprobs: dict[str, Any] | None, finish_reason: str | None) -> dict[str, Any]:
    """One streamed /v1/completions event: a choice's next text (OpenAI sends one per token)."""
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs,
                         "finish_reason": finish_reason}], "usage": None}


def chat_chunk(request_id: str, created: int, model: str, index: int, delta: dict[str, Any],
               logprobs: dict[str, Any] | None, finish_reason: str | None) -> dict[str, Any]:
    """One streamed /v1/chat/completions event; the first of each choice carries the role."""
    return {"id": request_id, "object": "chat.completion.chunk", "created": created,
            "model": model, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                         "finish_reason": finish_reason}], "usage": None}


def usage_chunk(request_id: str, created: int, model: str, chat: bool, prompt_tokens: int,
                completion_tokens: int) -> dict[str, Any]:
    """The last event when `stream_options.include_usage`: no choices, the request's usage."""
    return {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}
