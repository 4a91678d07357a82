"""A live gpt-serve for the tests: a tiny checkpoint, and the app run by uvicorn on a thread of the
test process, on 127.0.0.1 at a port the system picked (bound before the server starts: no race)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="gpt-serve's extra is not installed")
uvicorn = pytest.importorskip("uvicorn", reason="gpt-serve's extra is not installed")

from gpt.base.atomic import atomic_directory  # noqa: E402 - after the skips above
from gpt.checkpoints.checkpoint import save_model  # noqa: E402
from gpt.model.config import GPTConfig  # noqa: E402
from gpt.model.model import GPT  # noqa: E402
from gpt.serve.app import create_app  # noqa: E402
from gpt.serve.cli import build_parser, load_served  # noqa: E402
from gpt.serve.engine import Engine  # noqa: E402
from gpt.serve.protocol import Served  # noqa: E402

# GPT-2's vocabulary (the API speaks text), small and untied so that greedy text varies; a short
# context, so that requests of 40 tokens run past it (the cache is re-filled as generate.py does).
CFG = GPTConfig(context_length=32, emb_dim=32, n_heads=2, n_layers=1, drop_rate=0.0,
                tie_embeddings=False)


def save_run(directory: Path, seed: int = 0) -> Path:
    """A run directory holding a tiny random model as its best/ checkpoint.

    Its LM head is scaled up, so that its next-token probabilities spread as a trained model's do
    (a fresh model gives every token about 1/50257) and greedy choices are clear-cut.
    """
    import torch

    torch.manual_seed(seed)
    model = GPT(CFG).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(60)
    with atomic_directory(directory / "best") as tmp:
        save_model(model, tmp)
    return directory


@contextlib.contextmanager
def running(app: object) -> Iterator[str]:
    """Serve `app` on 127.0.0.1 until the block ends; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@contextlib.contextmanager
def serve(run_dir: Path, *flags: str, api_key: str | None = None,
          max_body_bytes: int = 1 << 20) -> Iterator[tuple[str, Served, Engine]]:
    """Load `run_dir` as `gpt-serve --checkpoint run_dir --dtype float32 flags...` loads it and
    serve it; yields (base URL, what is served, the engine)."""
    args = build_parser().parse_args(["--checkpoint", str(run_dir), "--device", "cpu",
                                      "--dtype", "float32", *flags])
    served, engine = load_served(args)
    try:
        app = create_app(served, engine, api_key=api_key, max_body_bytes=max_body_bytes)
        with running(app) as url:
            yield url, served, engine
    finally:
        engine.close()
