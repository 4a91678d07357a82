"""The HTTP side of `gpt-serve`: a Starlette app over an `Engine`.

    GET  /                       the page (static/index.html), and /static/app.js, /static/style.css
    GET  /health                 {"status": "ok", ...the engine's counters}
    GET  /v1/models              the one model served
    POST /v1/completions         OpenAI's completions
    POST /v1/chat/completions    OpenAI's chat completions

Every answer that is not a success is OpenAI's error object with a 4xx status (a bug in the server
gives a 500 with the same object and its traceback in the server's log, never in the response).
With an API key, every /v1 request must carry `Authorization: Bearer KEY`; the page and /health
hold nothing but the page itself and the server's counters, and need none.

A request's jobs are handed to the engine thread; its events come back through an asyncio queue
(`call_soon_threadsafe`). When the client goes away (Starlette cancels a stream whose client
disconnected; a whole response waits on the disconnect as well) the jobs are cancelled and the
engine frees their rows at its next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gpt.serve import responses as r
from gpt.serve.engine import Engine, Event, Job
from gpt.serve.protocol import (
    Parsed,
    RequestError,
    Served,
    error_body,
    parse_chat,
    parse_completion,
)

log = logging.getLogger("gpt.serve")

STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
          "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/static/style.css": ("style.css", "text/css; charset=utf-8")}
"""Every file the server sends: a fixed table, so no path from a request ever reaches the disk."""
PAGE_HEADERS = {
    # The page may load and call nothing but this server, even if some text it shows were markup.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; img-src 'self' data:; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def create_app(served: Served, engine: Engine, *, api_key: str | None = None,
               max_body_bytes: int = 1 << 20) -> Starlette:
    """The app; `engine` must be started (and is closed by the caller)."""
    files = {path: (resources.files("gpt.serve").joinpath("static", name).read_bytes(), kind)
             for path, (name, kind) in STATIC.items()}

    async def page(request: Request) -> Response:
        content, kind = files[request.url.path]
        return Response(content, media_type=kind, headers=PAGE_HEADERS)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": served.name, **engine.stats()})

    def model_object() -> dict[str, Any]:
        return {"id": served.name, "object": "model", "created": 0, "owned_by": "gpt"}

    async def models(request: Request) -> Response:
        _authorize(request, api_key)
        return JSONResponse({"object": "list", "data": [model_object()]})

    async def model(request: Request) -> Response:
        _authorize(request, api_key)
        if request.path_params["name"] != served.name:
            raise RequestError(f"the model {request.path_params['name']!r} does not exist here",
                               "model", "model_not_found", status=404)
        return JSONResponse(model_object())

    async def completions(request: Request) -> Response:
        _authorize(request, api_key)
        parsed = parse_completion(await _read_json(request, max_body_bytes), served)
        return await _respond(request, parsed, served, engine)

    async def chat(request: Request) -> Response:
        _authorize(request, api_key)
        parsed = parse_chat(await _read_json(request, max_body_bytes), served)
        return await _respond(request, parsed, served, engine)

    routes = [Route(path, page) for path in STATIC]
    routes += [Route("/health", health), Route("/v1/models", models),
               Route("/v1/models/{name:path}", model),
               Route("/v1/completions", completions, methods=["POST"]),
               Route("/v1/chat/completions", chat, methods=["POST"])]
    handlers = {RequestError: _request_error, HTTPException: _http_error, Exception: _server_error}
    return Starlette(routes=routes, exception_handlers=handlers)  # type: ignore[arg-type]


# ---- errors -------------------------------------------------------------------------------------


async def _request_error(request: Request, exc: RequestError) -> Response:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    message = {404: f"no such path: {request.url.path}",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(
                   exc.status_code, str(exc.detail))
    return JSONResponse(error_body(message, code=str(exc.status_code)),
                        status_code=exc.status_code, headers=exc.headers)


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("internal error on %s %s", request.method, request.url.path)
    return JSONResponse(error_body("internal server error (see the server's log)", "server_error"),
                        status_code=500)


def _authorize(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    given = request.headers.get("authorization", "")
    # compare_digest: the time taken does not tell how much of a guessed key was right.
    if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
        raise RequestError("missing or wrong API key: send the header Authorization: Bearer KEY",
                           code="invalid_api_key", status=401)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


async def _read_json(request: Request, max_bytes: int) -> object:
    """The body as JSON, refused past `max_bytes` (before reading it all, when it says its size)."""
    too_big = RequestError(f"the request body is over this server's {max_bytes} bytes "
                           "(gpt-serve --max-body-bytes)", code="request_too_large", status=413)
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise too_big
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_bytes:
                raise too_big
    except ClientDisconnect:  # gone before the body was whole: nobody reads the answer
        raise RequestError("the client disconnected before sending the whole body") from None
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError too
        raise RequestError(f"the request body is not valid JSON ({exc})") from None


# ---- generation ---------------------------------------------------------------------------------


class Running:
    """The engine jobs of one request and the queue their events arrive on."""

    def __init__(self, parsed: Parsed, engine: Engine) -> None:
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[list[Event]] = asyncio.Queue()

        def emit(events: list[Event]) -> None:  # on the engine thread
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
                loop.call_soon_threadsafe(self.queue.put_nowait, events)

        self.jobs = [Job(prompt, parsed.sampling, emit, parsed.n, i * parsed.n)
                     for i, prompt in enumerate(parsed.prompts)]
        self.open = len(self.jobs) * parsed.n
        for job in self.jobs:
            engine.submit(job)

    async def events(self) -> AsyncIterator[Event]:
        """Every event until each choice has finished; the jobs are cancelled when the iteration
        ends early (the client went away) or fails."""
        try:
            while self.open:
                for event in await self.queue.get():
                    if event.error is not None:
                        raise RuntimeError(event.error)
                    self.open -= event.finish_reason is not None
                    yield event
        finally:
            self.cancel()

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancelled = True


async def _respond(request: Request, parsed: Parsed, served: Served, engine: Engine) -> Response:
    if parsed.stream:
        return StreamingResponse(_stream(parsed, served, engine), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    running = Running(parsed, engine)
    collect = asyncio.ensure_future(_collect(running, parsed))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not collect.done():
            collect.cancel()
            running.cancel()
    if collect.cancelled():  # the client went away: its rows are freed, nobody reads an answer
        return Response(status_code=499)
    choices = collect.result()
    created, prompt_tokens = r.now(), sum(map(len, parsed.prompts))
    if parsed.chat:
        body = r.chat_body(r.new_id("chatcmpl"), created, served.name, choices,
                           parsed.sampling.logprobs is not None, served.tokenizer, prompt_tokens)
    else:
        prefixes = [parsed.texts[i // parsed.n] if parsed.echo else "" for i in range(len(choices))]
        body = r.completion_body(r.new_id("cmpl"), created, served.name, choices, prefixes,
                                 parsed.sampling.logprobs is not None, served.tokenizer,
                                 prompt_tokens)
    return JSONResponse(body)


async def _collect(running: Running, parsed: Parsed) -> list[r.Choice]:
    choices = [r.Choice() for _ in range(len(parsed.prompts) * parsed.n)]
    async for event in running.events():
        choice = choices[event.choice]
        choice.pieces.extend(event.pieces)
        choice.completion_tokens = event.completion_tokens
        choice.finish_reason = event.finish_reason or choice.finish_reason
    return choices


async def _disconnected(request: Request) -> None:
    """Returns once the client has closed the connection (the body has been read before)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def _stream(parsed: Parsed, served: Served, engine: Engine) -> AsyncIterator[str]:
    """The server-sent events of a streamed response, as OpenAI sends them: one chunk per token,
    a last chunk per choice with its finish_reason, the usage chunk if asked for, then [DONE].

    The jobs are submitted here, when the response starts, not before: a generator that never
    starts (the client left at once) never runs its clean-up either. Once started, its clean-up
    runs however it ends (closed or cancelled at any `yield` or `await`), and cancels the jobs.
    """
    running = Running(parsed, engine)
    try:
        async for text in _chunks(running, parsed, served):
            yield text
    finally:
        running.cancel()


async def _chunks(running: Running, parsed: Parsed, served: Served) -> AsyncIterator[str]:
    prefix = "chatcmpl" if parsed.chat else "cmpl"
    request_id, created, name = r.new_id(prefix), r.now(), served.name
    wants_logprobs = parsed.sampling.logprobs is not None
    choices = len(parsed.prompts) * parsed.n
    offsets = [0] * choices
    used = [0] * choices
    prompt_tokens, finished = sum(map(len, parsed.prompts)), 0

    def chunk(index: int, text: str | None, logprobs: dict[str, Any] | None,
              finish: str | None, delta: dict[str, Any] | None = None) -> str:
        if parsed.chat:
            delta = delta if delta is not None else ({} if text is None else {"content": text})
            body = r.chat_chunk(request_id, created, name, index, delta, logprobs, finish)
        else:
            body = r.completion_chunk(request_id, created, name, index, text or "", logprobs,
                                      finish)
        if finish is not None and finished == choices:
            # The last choice's last chunk carries the usage too (its `usage` is null elsewhere),
            # so every response has it; include_usage adds OpenAI's own usage-only chunk.
            body["usage"] = r.usage(prompt_tokens, sum(used))
        return _sse(body)

    for i in range(choices):  # the first event of each choice: the role, or the echoed prompt
        if parsed.chat:
            yield chunk(i, None, None, None, {"role": "assistant", "content": ""})
        elif parsed.echo:
            text = parsed.texts[i // parsed.n]
            offsets[i] = len(text)
            yield chunk(i, text, None, None)
    try:
        async for event in running.events():
            i = event.choice
            for piece in event.pieces:
                logprobs = None
                if wants_logprobs:
                    logprobs = (r.chat_logprobs([piece], served.tokenizer) if parsed.chat else
                                r.completion_logprobs([piece], served.tokenizer, offsets[i]))
                offsets[i] += len(piece.text)
                yield chunk(i, piece.text, logprobs, None)
            used[i] = event.completion_tokens
            if event.finish_reason is not None:
                finished += 1
                yield chunk(i, None, None, event.finish_reason)
    except RuntimeError as exc:  # the engine failed on this request: say so in the stream
        yield _sse(error_body(str(exc), "server_error"))
        return
    if parsed.include_usage:
        yield _sse(r.usage_chunk(request_id, created, name, parsed.chat, prompt_tokens, sum(used)))
    yield _sse("[DONE]")
