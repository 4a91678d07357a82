"""What `generate.py` does once its flags are parsed: check them, load a model, stream text out."""

from __future__ import annotations

import codecs
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TextIO

import tiktoken
import torch

from gpt.checkpoint import WEIGHTS_FILE, find_model_checkpoint, latest_checkpoint, load_model
from gpt.device import decoding_dtype, pick_device
from gpt.errors import UserError, describe
from gpt.model import GPT
from gpt.quantize import SCHEMES, check_int8_supported, check_scheme, prepare_for_decoding
from gpt.sampling import check_sampling_args, compile_for_decoding, stream
from gpt.tokenizer import ENDOFTEXT_ID, get_tokenizer


def find_checkpoint(path: Path | None, runs_dir: Path = Path("runs")) -> Path:
    """The checkpoint directory to load: `path` itself, its best/ (else last/), or the latest run's."""
    if path is None:
        found = latest_checkpoint(runs_dir, "best") or latest_checkpoint(runs_dir, "last")
        if found is None:
            raise UserError(f"no checkpoint found under {runs_dir}/; train one with `python train.py`, "
                            "or start from GPT-2 weights with `--init gpt2`")
        return found
    found = find_model_checkpoint(path)
    if found is not None:
        return found
    raise UserError(f"--checkpoint {path} is neither a checkpoint directory (with {WEIGHTS_FILE}) nor "
                    "a run directory (with best/ or last/); pass e.g. runs/<run-name>")


def load_for_generation(checkpoint: Path | None, init: str | None, device: torch.device,
                        dtype: torch.dtype, err: TextIO) -> GPT:
    if init is not None:
        from gpt.weights import load_pretrained  # imported only when asked for: it may pull in more

        model, source = load_pretrained(init), init
    else:
        found = find_checkpoint(checkpoint)
        model, source = load_model(found, device), str(found)
    model = model.to(device=device, dtype=dtype)
    print(f"loaded {source} ({model.num_parameters() / 1e6:.1f}M parameters) on {device} as "
          f"{str(dtype).removeprefix('torch.')}", file=err)
    return model


def encode_prompt(prompt: str, tokenizer: tiktoken.Encoding, model: GPT, err: TextIO) -> list[int]:
    """Prompt token ids the model can read: the last `context_length` of them, never none."""
    cfg = model.config
    ids = tokenizer.encode(prompt, allowed_special={"<|endoftext|>"})
    if not ids:  # GPT-2's convention for "no prompt": start from the end-of-text token
        ids = [ENDOFTEXT_ID]
    if max(ids) >= cfg.vocab_size:
        raise UserError(f"the prompt has token id {max(ids)} but the model's vocab_size is "
                        f"{cfg.vocab_size}; this model was not trained with the GPT-2 tokenizer")
    if len(ids) > cfg.context_length:
        print(f"note: the prompt is {len(ids)} tokens; the model reads only the last "
              f"{cfg.context_length} (its context_length)", file=err)
        ids = ids[-cfg.context_length:]
    return ids


def write_text(tokens: Iterable[int], tokenizer: tiktoken.Encoding, out: TextIO) -> None:
    """Write the text of `tokens` to `out` as they arrive, flushing each piece.

    A GPT-2 token is a byte string, and one UTF-8 character (an emoji, a CJK character) may be split
    across tokens. An incremental decoder holds such bytes back until the character is complete, so
    only whole characters are written; bytes still incomplete at the end become U+FFFD.
    """
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in tokens:
        # A model with a vocabulary padded past the tokenizer's may (rarely) pick an unused id.
        piece = tokenizer.decode_single_token_bytes(token) if token < tokenizer.n_vocab else b"\xef\xbf\xbd"
        text = utf8.decode(piece)
        if text:
            out.write(text)
            out.flush()
    out.write(utf8.decode(b"", final=True))


def token_ids(new: Iterable[torch.Tensor], eos_id: int | None) -> Iterator[int]:
    """The ids of a one-row `stream`, ending before end-of-text (which is not text to print)."""
    for token in new:
        token_id = int(token.item())
        if token_id == eos_id:
            return
        yield token_id


def run_generation(*, prompt: str, max_new_tokens: int, temperature: float, top_k: int | None,
                   top_p: float | None, seed: int | None, num_samples: int, checkpoint: Path | None,
                   init: str | None, device: str, dtype: str, no_cache: bool, compile: bool = False,
                   quantize: str = "none", out: TextIO | None = None, err: TextIO | None = None) -> None:
    """Check every value first (a typo fails in a second, not after loading), then sample.

    `out`/`err` default to the current sys.stdout/sys.stderr, looked up at the call.
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    if max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    if num_samples < 1:
        raise UserError(f"--num-samples must be >= 1, got {num_samples}")
    check_sampling_args(temperature, top_k, top_p)
    if checkpoint is not None and init is not None:
        raise UserError("--checkpoint and --init both name weights to load; pass only one")
    check_scheme(quantize)
    torch_device = pick_device(device)
    torch_dtype = decoding_dtype(dtype, torch_device)
    if quantize != "none":
        check_int8_supported(torch_device, torch_dtype)
    model = load_for_generation(checkpoint, init, torch_device, torch_dtype, err)
    started = time.perf_counter()
    # Before compiling: inductor packs the (frozen) weights itself, so no prepacking then.
    model = prepare_for_decoding(model, quantize, pack=not compile)
    if quantize != "none":
        print(f"{SCHEMES[quantize]} ({time.perf_counter() - started:.1f} s)", file=err)
    compile_failed: tuple[type[Exception], ...] = ()  # what the first call raises if compiling fails
    if compile:
        from torch._dynamo.exc import BackendCompilerFailed  # only here: importing it takes ~1 s

        model, compile_failed = compile_for_decoding(model), (BackendCompilerFailed,)
    tokenizer = get_tokenizer()
    idx = torch.tensor([encode_prompt(prompt, tokenizer, model, err)], device=torch_device)
    eos_id = ENDOFTEXT_ID if model.config.vocab_size > ENDOFTEXT_ID else None
    generator = torch.Generator(device=torch_device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    for i in range(num_samples):
        if num_samples > 1:
            out.write(f"--- sample {i + 1} of {num_samples} ---\n")
        out.write(prompt)
        new = stream(model, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                     eos_id=eos_id, use_cache=not no_cache, generator=generator)
        try:
            write_text(token_ids(new, eos_id), tokenizer, out)
        except compile_failed as exc:
            out.write("\n")
            cause = getattr(exc, "inner_exception", exc)  # what the compiler raised
            raise UserError(f"--compile failed ({describe(cause)}); run without --compile (on a CPU it needs "
                            "a working C++ compiler)") from None
        out.write("\n")
        out.flush()
