"""The `generate.py` command: sample text from a checkpoint or GPT-2 weights, streamed to the terminal.

`build_parser` holds its flags and `main(argv)` runs it: check every value, load a model, write the
text as it is sampled. `generate.py` at the repository root only calls `main`.
"""

from __future__ import annotations

import argparse
import codecs
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TextIO

import tiktoken
import torch

from gpt.base.device import DTYPES, configure_device, decoding_dtype, flag_fixable_errors, pick_device
from gpt.base.errors import UserError, run_cli
from gpt.checkpoints.checkpoint import (
    TRAIN_STATE_FILE,
    latest_checkpoint,
    load_train_state,
    require_model_checkpoint,
)
from gpt.checkpoints.weights import load_pretrained
from gpt.data.records import format_prompt
from gpt.model.model import GPT
from gpt.model.quantize import SCHEMES, check_int8_supported, check_scheme, prepare_for_decoding
from gpt.model.sampling import check_sampling_args, compile_for_decoding, stream
from gpt.model.tokenizer import ENDOFTEXT_ID, get_tokenizer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Sample text from a trained checkpoint or from GPT-2 weights, streamed to the terminal.")
    parser.add_argument("--prompt", default="Every effort moves you",
                        help="text to continue; for a fine-tuned run, the question (laid out with the "
                             "run's prompt template; only the answer is printed)")
    parser.add_argument("--interactive", action="store_true",
                        help="read one prompt per line from standard input and answer each (Ctrl-D ends)")
    parser.add_argument("--raw", action="store_true",
                        help="a fine-tuned run's prompt template off: continue the prompt as it is")
    parser.add_argument("--max-new-tokens", type=int, default=100, help="tokens to add (default 100)")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="sampling temperature; 0 = greedy (default 0.8)")
    parser.add_argument("--top-k", type=int, default=50,
                        help="sample only among the k most likely tokens (default 50)")
    parser.add_argument("--top-p", type=float, default=None,
                        help="then only within the nucleus of this probability mass, in (0, 1]")
    parser.add_argument("--seed", type=int, default=None, help="random seed, for repeatable samples")
    parser.add_argument("--num-samples", type=int, default=1, help="how many continuations (default 1)")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--checkpoint", type=Path, default=None, metavar="RUN_DIR",
                         help="a run directory (its best/, else last/) or a checkpoint directory; "
                              "default: the most recent run under runs/")
    weights.add_argument("--init", default=None, metavar="NAME_OR_PATH",
                         help="GPT-2 weights instead of a checkpoint: gpt2, gpt2-medium, ... or a path")
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="auto: bfloat16 (each token reads every weight, so half the bytes decode "
                             "faster, also on CPU), float16 on GPUs without bf16; float32 for the exact "
                             "trained weights")
    parser.add_argument("--no-cache", action="store_true",
                        help="recompute the whole window for every token (slow; for checking)")
    parser.add_argument("--quantize", default="none", metavar="SCHEME",
                        help="weights for faster decoding: none (default), int8 (weight-only int8 in "
                             "every linear layer, the LM head included) or int8-no-head (the head "
                             "stays bfloat16); int8 needs bfloat16 on a CPU")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model with frozen weights: a one-time compilation, then "
                             "more tokens/s on a CPU; pays for long or many samples (see BENCHMARKS.md)")
    return parser


def main(argv: list[str] | None = None) -> None:
    run_generation(**vars(build_parser().parse_args(argv)))


def cli() -> None:
    """The console-script entry point."""
    run_cli(main)


def run_generation(*, prompt: str, max_new_tokens: int, temperature: float, top_k: int | None,
                   top_p: float | None, seed: int | None, num_samples: int, checkpoint: Path | None,
                   init: str | None, device: str, dtype: str, no_cache: bool, compile: bool = False,
                   interactive: bool = False, raw: bool = False, quantize: str = "none",
                   out: TextIO | None = None, err: TextIO | None = None, inp: TextIO | None = None) -> None:
    """Check every value first (a typo fails at once, not after loading), then sample.

    A checkpoint of a run fine-tuned on records (`gpt.data.records`) answers: each prompt is laid out
    with the run's template (unless `raw`) and only the answer is written. `interactive` reads the
    prompts from `inp`, one per line. `out`/`err`/`inp` default to the current
    sys.stdout/stderr/stdin, looked up at the call. Out of memory and a failed `--compile` (at the
    first token) end in a one-line `UserError` naming the fix.
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    inp = sys.stdin if inp is None else inp
    if num_samples < 1:
        raise UserError(f"--num-samples must be >= 1, got {num_samples}")
    check_sampling_args(max_new_tokens, temperature, top_k, top_p)  # what `stream` checks, done early
    check_scheme(quantize)
    torch_device = pick_device(device)
    torch_dtype = decoding_dtype(dtype, torch_device)
    if quantize != "none":
        check_int8_supported(torch_device, torch_dtype)
    configure_device(torch_device)
    with flag_fixable_errors("use --dtype auto, bfloat16 or float16 (half float32's memory), a smaller "
                             "model, or --device cpu"):
        model = load_for_generation(checkpoint, init, torch_device, torch_dtype, err)
        started = time.perf_counter()
        # Before compiling: inductor packs the (frozen) weights itself, so no prepacking then.
        model = prepare_for_decoding(model, quantize, pack=not compile)
        if quantize != "none":
            print(f"{SCHEMES[quantize]} ({time.perf_counter() - started:.1f} s)", file=err)
        if compile:
            model = compile_for_decoding(model)
        template = None if raw or init is not None else run_template(find_checkpoint(checkpoint))
        tokenizer = get_tokenizer()
        eos_id = ENDOFTEXT_ID if model.config.vocab_size > ENDOFTEXT_ID else None
        generator = torch.Generator(device=torch_device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        for text in (line.rstrip("\n") for line in inp) if interactive else [prompt]:
            full = text if template is None else format_prompt(template, text)
            idx = torch.tensor([encode_prompt(full, tokenizer, model, err)], device=torch_device)
            for i in range(num_samples):
                if num_samples > 1:
                    out.write(f"--- sample {i + 1} of {num_samples} ---\n")
                out.write(text if template is None else "")  # an answer is printed without its question
                new = stream(model, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             eos_id=eos_id, use_cache=not no_cache, generator=generator)
                try:
                    write_text(token_ids(new, eos_id), tokenizer, out)
                finally:  # also before an error, which goes to `err`
                    out.write("\n")
                    out.flush()


def run_template(checkpoint: Path) -> str | None:
    """The prompt template of the fine-tuning run that saved `checkpoint` (kept in its training state
    with the run's settings), or None: a pretraining run's, or weights without a training state."""
    if not (checkpoint / TRAIN_STATE_FILE).is_file():
        return None
    template: str | None = load_train_state(checkpoint)["train_config"].get("prompt_template")
    return template


def find_checkpoint(path: Path | None, runs_dir: Path = Path("runs")) -> Path:
    """The checkpoint directory to load: `path` itself, its best/ (else last/), or the latest run's."""
    if path is None:
        found = latest_checkpoint(runs_dir, "best") or latest_checkpoint(runs_dir, "last")
        if found is None:
            raise UserError(f"no checkpoint found under {runs_dir}/; train one with `python train.py`, "
                            "or start from GPT-2 weights with `--init gpt2`")
        return found
    return require_model_checkpoint(path, "--checkpoint")


def load_for_generation(checkpoint: Path | None, init: str | None, device: torch.device,
                        dtype: torch.dtype, err: TextIO) -> GPT:
    if init is not None:
        model, source = load_pretrained(init), init
    else:
        found = find_checkpoint(checkpoint)
        model, source = load_pretrained(found), str(found)  # a LoRA run's: base + adapters, merged
    # Cast on the CPU, then move: the GPU never holds the float32 weights (twice the bytes) at once.
    model = model.to(dtype=dtype).to(device)
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


if __name__ == "__main__":
    run_cli(main)
