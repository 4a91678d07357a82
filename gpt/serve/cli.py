"""`gpt-serve` (also `python -m gpt.serve`): load a model once, serve it over HTTP until Ctrl-C.

    gpt-serve --checkpoint runs/NAME              # http://127.0.0.1:8000: the page, and /v1
    gpt-serve --init gpt2 --port 8080 --max-batch 8
    gpt-serve --checkpoint runs/NAME --host 0.0.0.0 --api-key "$KEY"

The model is loaded as `generate.py` loads it (`gpt.checkpoints.load`: the same --device, --dtype
and --quantize). The web stack is the optional extra `[serve]`; without it the command ends with one
line naming the install command.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from gpt.base.device import configure_device, decoding_dtype, flag_fixable_errors, pick_device
from gpt.base.errors import ArgumentParser, UserError, command_name, run_cli
from gpt.checkpoints.load import add_model_flags, find_checkpoint, load_from_flags
from gpt.model.quantize import check_int8_supported, check_scheme, prepare_for_decoding
from gpt.model.tokenizer import ENDOFTEXT_ID, get_tokenizer
from gpt.serve.engine import Engine
from gpt.serve.protocol import Served
from gpt.training.resume import run_template

INSTALL = 'pip install -e ".[serve]"'
API_KEY_ENV = "GPT_SERVE_API_KEY"


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=command_name("python -m gpt serve"),
                            description="Serve a model over HTTP: OpenAI's completions and chat "
                                        "API, and a web page that shows each token's probability.")
    add_model_flags(parser, quantize=True)
    parser.add_argument("--raw", action="store_true",
                        help="chat without the fine-tuned run's prompt template (plain text)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), metavar="KEY",
                        help=f"require 'Authorization: Bearer KEY' on every /v1 request "
                             f"(default: ${API_KEY_ENV}, else none)")
    parser.add_argument("--model-name", default=None, metavar="NAME",
                        help="the model id clients send (default: the run's or weights' name)")
    parser.add_argument("--max-batch", type=int, default=16, metavar="N",
                        help="sequences decoded together; more requests wait (default 16)")
    parser.add_argument("--max-tokens-limit", type=int, default=1024, metavar="N",
                        help="the largest max_tokens a request may ask for (default 1024)")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, metavar="BYTES",
                        help="the largest request body (default 1 MiB)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:  # first: a missing extra should not cost a model load
        import uvicorn

        from gpt.serve.app import create_app
    except ImportError as exc:
        raise UserError(f"gpt-serve needs the serve extra ({exc.name} is missing): "
                        f"{INSTALL}") from None
    for name in ("max_batch", "max_tokens_limit", "max_body_bytes"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.port < 65536:
        raise UserError(f"--port must be in 0..65535, got {args.port}")
    check_scheme(args.quantize)
    if not is_loopback(args.host) and not args.api_key:
        print(f"warning: --host {args.host}: anyone who can reach this address can use the model; "
              f"the server has no authentication (pass --api-key KEY or set ${API_KEY_ENV})",
              file=sys.stderr)
    served, engine = load_served(args)
    app = create_app(served, engine, api_key=args.api_key, max_body_bytes=args.max_body_bytes)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {served.name!r} on http://{shown}:{args.port}/ (the page; the API under /v1)",
          file=sys.stderr)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        engine.close()


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_served(args: argparse.Namespace) -> tuple[Served, Engine]:
    """Load the model as generate.py does and start the engine; the `Served` description."""
    device = pick_device(args.device)
    dtype = decoding_dtype(args.dtype, device)
    if args.quantize != "none":
        check_int8_supported(device, dtype)
    configure_device(device)
    with flag_fixable_errors("use --dtype bfloat16, a smaller model, a smaller --max-batch, or "
                             "--device cpu"):
        model = prepare_for_decoding(
            load_from_flags(args.checkpoint, args.init, device, dtype, sys.stderr),
            args.quantize)
    template, name = None, args.init
    if args.init is None:
        found = find_checkpoint(args.checkpoint)
        template = None if args.raw else run_template(found)
        name = found.parent.name if found.name.strip(".").split(".")[0] in ("best", "last") \
            else found.name
    served = Served(model=model, name=args.model_name or str(name), tokenizer=get_tokenizer(),
                    template=template, max_tokens=args.max_tokens_limit,
                    max_choices=args.max_batch)
    eos_id = ENDOFTEXT_ID if model.config.vocab_size > ENDOFTEXT_ID else None
    engine = Engine(model, served.tokenizer, args.max_batch, eos_id)
    print(f"KV cache: up to {args.max_batch} sequences, "
          f"{engine.cache.bytes_per_row() / 2**20:.0f} MiB each; "
          f"chat template: {template or 'none (plain text)'}", file=sys.stderr)
    engine.start()
    return served, engine


def cli() -> None:
    """The console-script entry point."""
    run_cli(main)

