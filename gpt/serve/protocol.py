"""The OpenAI request bodies the server accepts, checked field by field, turned into token ids.

`parse_completion` and `parse_chat` take the decoded JSON body and return a `Parsed` request, or
raise `RequestError`, which the server answers with a 400 and OpenAI's error object:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "n", "code": null}}

Every field is checked for its type and range here, before anything reaches the engine, so a
malformed request can never become a 500. Fields this server does not implement (penalties,
logit_bias, tools, ...) are refused when set to anything but their neutral value, rather than
silently ignored; fields that change nothing here (`user`, `metadata`, ...) are ignored.

Chat messages become one prompt (`chat_prompt`). With the prompt template of the fine-tuning run
being served, each user message is laid out as in training (`format_prompt`) and each earlier
assistant reply follows it, ended by the <|endoftext|> token as the training examples were; a
system message is plain text followed by a blank line. Without a template (a pretrained model), the
messages' contents are joined with newlines, with no roles: the model continues the text.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import tiktoken

from gpt.base.errors import UserError
from gpt.cli.generate import encode_prompt
from gpt.data.records import format_prompt
from gpt.model.model import GPT
from gpt.model.tokenizer import ENDOFTEXT_ID
from gpt.serve.engine import Sampling

MAX_STOPS = 4
MAX_STOP_CHARS = 256
MAX_TOP_LOGPROBS = 20
ROLES = ("system", "developer", "user", "assistant")


class RequestError(Exception):
    """A request the server refuses, with the HTTP status and OpenAI's error fields."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 status: int = 400, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code
        self.status, self.kind = status, kind

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass(frozen=True)
class Served:
    """What the server serves and the limits it sets on a request."""

    model: GPT
    name: str
    """The model id clients name in `model` (and /v1/models lists)."""
    tokenizer: tiktoken.Encoding
    template: str | None
    max_tokens: int
    """The largest `max_tokens` a request may ask for."""
    max_choices: int
    """The most choices (prompts x n) one request may ask for: the engine's rows."""
    chat_max_tokens: int = 256
    """`max_tokens` of a chat request that gives none (completions: 16, as OpenAI's)."""


@dataclass(frozen=True)
class Parsed:
    """A checked request: its prompts as token ids and the settings for each choice."""

    chat: bool
    prompts: list[list[int]]
    texts: list[str]
    """The prompts as text (for `echo`)."""
    sampling: Sampling
    n: int
    stream: bool
    include_usage: bool
    echo: bool = False


# ---- single fields ------------------------------------------------------------------------------


def _integer(body: dict[str, Any], name: str, default: int | None, low: int,
             high: int | None = None, what: str = "") -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer, got {json_type(value)}", name)
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"between {low} and {high}"
        raise RequestError(f"{name} must be {bounds}{what}, got {value}", name)
    return value


def _number(body: dict[str, Any], name: str, default: float | None, low: float, high: float,
            low_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"{name} must be a number, got {json_type(value)}", name)
    if value > high or value < low or (low_open and value == low):
        interval = f"({low:g}, {high:g}]" if low_open else f"[{low:g}, {high:g}]"
        raise RequestError(f"{name} must be in {interval}, got {value}", name)
    return float(value)


def _boolean(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be true or false, got {json_type(value)}", name)
    return value


def json_type(value: object) -> str:
    """A value's JSON type, for messages."""
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "an array", dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _unsupported(body: dict[str, Any], names: dict[str, tuple[object, ...]]) -> None:
    """Refuse each field of `names` that is set to something but its neutral values."""
    for name, neutral in names.items():
        value = body.get(name)
        if value is not None and value not in neutral:
            raise RequestError(f"{name} is not supported by this server; leave it out", name,
                               "unsupported_parameter")


# ---- the common part ----------------------------------------------------------------------------


def _check_model(body: dict[str, Any], served: Served) -> None:
    model = body.get("model")
    if not isinstance(model, str):
        raise RequestError(f"model must be a string naming the served model, {served.name!r}",
                           "model")
    if model != served.name:
        raise RequestError(f"the model {model!r} does not exist here; this server serves "
                           f"{served.name!r} (GET /v1/models)", "model", "model_not_found")


def _stops(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise RequestError("stop must be a string or an array of strings", "stop")
    if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise RequestError(f"stop takes at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} "
                           "characters", "stop")
    return tuple(s for s in stops if s)


def _sampling(body: dict[str, Any], served: Served, default_max_tokens: int,
              logprobs: int | None, max_tokens_name: str = "max_tokens") -> Sampling:
    what = " (this server's limit; see gpt-serve --max-tokens-limit)"
    max_tokens = _integer(body, max_tokens_name, default_max_tokens, 1, served.max_tokens, what)
    seed = _integer(body, "seed", None, -(2**63), 2**64 - 1)
    top_k = _integer(body, "top_k", None, 1)
    return Sampling(max_tokens=min(max_tokens or default_max_tokens, served.max_tokens),
                    temperature=_number(body, "temperature", 1.0, 0.0, 2.0) or 0.0,
                    top_p=_number(body, "top_p", None, 0.0, 1.0, low_open=True),
                    top_k=top_k, stop=_stops(body), seed=seed, logprobs=logprobs)


def _stream_options(body: dict[str, Any], stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise RequestError("stream_options is only allowed with stream: true", "stream_options")
    if not isinstance(options, dict):
        raise RequestError("stream_options must be an object", "stream_options")
    return _boolean(options, "include_usage")


def _n(body: dict[str, Any], served: Served, prompts: int) -> int:
    n = _integer(body, "n", 1, 1, served.max_choices) or 1
    if n * prompts > served.max_choices:
        raise RequestError(f"{prompts} prompts x n={n} choices is more than this server's "
                           f"{served.max_choices} (gpt-serve --max-batch)", "n")
    return n


def _object(body: object) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {json_type(body)}")
    return body


# ---- /v1/completions ----------------------------------------------------------------------------


def parse_completion(body: object, served: Served) -> Parsed:
    """A checked `/v1/completions` request."""
    body = _object(body)
    _check_model(body, served)
    _unsupported(body, {"suffix": ("",), "frequency_penalty": (0,), "presence_penalty": (0,),
                        "logit_bias": ({},)})
    texts, prompts = _prompts(body.get("prompt"), served)
    logprobs = _integer(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
    echo = _boolean(body, "echo")
    if echo and logprobs is not None:
        raise RequestError("echo with logprobs (the prompt's log-probabilities) is not supported; "
                           "leave out one of them", "echo", "unsupported_parameter")
    n = _n(body, served, len(prompts))
    if body.get("best_of") not in (None, n):
        raise RequestError("best_of is not supported (other than equal to n)", "best_of",
                           "unsupported_parameter")
    stream = _boolean(body, "stream")
    return Parsed(False, prompts, texts, _sampling(body, served, 16, logprobs), n, stream,
                  _stream_options(body, stream), echo)


def _prompts(prompt: object, served: Served) -> tuple[list[str], list[list[int]]]:
    """A completion's `prompt`: a string, an array of strings, an array of token ids, or an array
    of such arrays; as texts and token ids, each cut to the model's last `context_length` tokens
    (as `generate.py` does), an empty one read as <|endoftext|>."""
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        items = [prompt]
    elif isinstance(prompt, list) and prompt:
        items = prompt
    else:
        raise RequestError("prompt must be a string, an array of strings, an array of token ids "
                           "or an array of such arrays, and not empty", "prompt")
    texts, prompts = [], []
    for item in items:
        if isinstance(item, str):
            texts.append(item)
            prompts.append(_encode(item, served))
        elif (isinstance(item, list) and item
              and all(isinstance(t, int) and not isinstance(t, bool) for t in item)):
            if not all(0 <= t < served.model.config.vocab_size for t in item):
                raise RequestError(f"prompt token ids must be in [0, "
                                   f"{served.model.config.vocab_size})", "prompt")
            texts.append(served.tokenizer.decode(item, errors="replace")
                         if max(item) < served.tokenizer.n_vocab else "")
            prompts.append(item[-served.model.config.context_length:])
        else:
            raise RequestError("each prompt must be a string or a non-empty array of token ids",
                               "prompt")
    return texts, prompts


def _encode(text: str, served: Served) -> list[int]:
    try:  # generate.py's own encoding: the same ids for the same prompt
        return encode_prompt(text, served.tokenizer, served.model, io.StringIO())
    except UserError as exc:
        raise RequestError(str(exc), "prompt") from None


# ---- /v1/chat/completions -----------------------------------------------------------------------


def parse_chat(body: object, served: Served) -> Parsed:
    """A checked `/v1/chat/completions` request."""
    body = _object(body)
    _check_model(body, served)
    _unsupported(body, {"frequency_penalty": (0,), "presence_penalty": (0,), "logit_bias": ({},),
                        "tools": ([],), "functions": ([],), "tool_choice": ("none",),
                        "audio": (), "prediction": ()})
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise RequestError("response_format other than text is not supported", "response_format",
                           "unsupported_parameter")
    messages = _messages(body.get("messages"))
    segments = chat_prompt(messages, served.template)
    ids = chat_ids(segments, served)
    top = _integer(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
    wants_logprobs = _boolean(body, "logprobs")
    if top is not None and not wants_logprobs:
        raise RequestError("top_logprobs needs logprobs: true", "top_logprobs")
    logprobs = (top or 0) if wants_logprobs else None
    name = "max_tokens"
    if body.get("max_completion_tokens") is not None:
        name = "max_completion_tokens"
    sampling = _sampling(body, served, min(served.chat_max_tokens, served.max_tokens), logprobs,
                         name)
    stream = _boolean(body, "stream")
    return Parsed(True, [ids], ["<|endoftext|>".join(segments)], sampling, _n(body, served, 1),
                  stream, _stream_options(body, stream))


def _messages(messages: object) -> list[tuple[str, str]]:
    """(role, content) of each message; content given as text parts is joined."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty array of {role, content} objects",
                           "messages")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} must be an object with role and content", where)
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise RequestError(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}",
                               f"{where}.role")
        if isinstance(content, list):
            parts = [p.get("text") if isinstance(p, dict) and p.get("type") == "text" else None
                     for p in content]
            if not all(isinstance(p, str) for p in parts):
                raise RequestError(f"{where}.content: only text parts are supported",
                                   f"{where}.content")
            content = "".join(parts)  # type: ignore[arg-type]
        if not isinstance(content, str):
            raise RequestError(f"{where}.content must be a string or an array of text parts",
                               f"{where}.content")
        out.append((role, content))
    return out


def chat_prompt(messages: list[tuple[str, str]], template: str | None) -> list[str]:
    """The text the model continues for `messages` (see the module docstring), in segments that
    <|endoftext|> tokens separate: under a template, each earlier answer ends a segment."""
    if template is None:
        return ["\n".join(content for _, content in messages)]
    segments, current = [], ""
    for i, (role, content) in enumerate(messages):
        if role in ("system", "developer"):
            current += content + "\n\n"
        elif role == "user":
            current += format_prompt(template, content)
        else:  # an earlier answer, ended as in training; a last assistant message is continued
            current += content
            if i + 1 < len(messages):
                segments.append(current)
                current = ""
    return [*segments, current]


def chat_ids(segments: list[str], served: Served) -> list[int]:
    """Token ids of a chat prompt: the segments as plain text (letters that spell <|endoftext|> in a
    message stay letters), joined by the <|endoftext|> token."""
    ids: list[int] = []
    for i, segment in enumerate(segments):
        if i:
            ids.append(ENDOFTEXT_ID)
        ids.extend(served.tokenizer.encode_ordinary(segment))
    ids = ids or [ENDOFTEXT_ID]  # as generate.py reads an empty prompt
    if max(ids) >= served.model.config.vocab_size:
        raise RequestError(f"the messages have token id {max(ids)} but the model's vocab_size is "
                           f"{served.model.config.vocab_size}", "messages")
    return ids[-served.model.config.context_length:]
