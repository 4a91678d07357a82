"""Serving a model over HTTP: `gpt-serve` (`python -m gpt serve`).

    batch.py      batched decoding: a KV cache with one position per row
    engine.py     the decoding loop on its own thread: continuous batching of the requests in flight
    text.py       tokens to text: whole characters, stop strings held back
    protocol.py   the OpenAI request bodies, checked, turned into token ids
    responses.py  the OpenAI response bodies and stream chunks
    app.py        the Starlette app: routes, errors, streaming, the page (static/)
    cli.py        the command: flags, model loading, uvicorn

Only app.py and cli.py's `main` need the optional `[serve]` extra (Starlette and uvicorn); the rest
is plain PyTorch and can be used without it. Imports every other package (the generate command's
prompt handling among them); none imports it (`python -m gpt serve` reaches it by name).
"""
