"""The `generate.py` command: sample text from a checkpoint or GPT-2 weights, streamed to the
terminal.

`build_parser` holds its flags (the model's, shared with the other commands, from
`gpt.checkpoints.load`), `GenerationOptions` their values, checked, and `main(argv)` runs it: check
every value, load a model, write the text as it is sampled. `generate.py` at the repository root and
`python -m gpt generate` only call `main`.
"""

from __future__ import annotations

import codecs
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import tiktoken
import torch

from gpt.base.device import configure_device, decoding_dtype, flag_fixable_errors, pick_device
from gpt.base.errors import ArgumentParser, UserError, command_name, run_cli
from gpt.checkpoints.load import (
    DEFAULT_TEMPERATURE,
    add_model_flags,
    find_checkpoint,
    generation_defaults,
    load_from_flags,
)
from gpt.data.records import format_prompt
from gpt.model.model import GPT
from gpt.model.quantize import SCHEMES, check_int8_supported, check_scheme, prepare_for_decoding
from gpt.model.sampling import check_sampling_args, check_seed, compile_for_decoding, stream
from gpt.model.tokenizer import ENDOFTEXT_ID, get_tokenizer
from gpt.training.resume import run_template


@dataclass(frozen=True)
class GenerationOptions:
    """What `run_generation` samples, from which model, and how: one field per flag of
    generate.py (`build_parser` takes its defaults from here). Every value is checked when the
    object is made."""

    prompt: str = "Every effort moves you"
    """The text to continue; for a fine-tuned run, the question (only the answer is printed)."""
    max_new_tokens: int = 100
    """Tokens to add to each prompt."""
    temperature: float | None = None
    """Sampling temperature; 0 is greedy decoding. None: the model's default (`generation_defaults`:
    a fine-tuned run's saved one, greedy unless set at training time; 0.8 for text)."""
    top_k: int | None = 50
    """Sample only among the k most likely tokens (None: all of them)."""
    top_p: float | None = None
    """Then only within the nucleus of this much probability mass, in (0, 1] (None: no nucleus)."""
    seed: int | None = None
    """Seed of the sampling generator, for repeatable text; None draws a fresh one."""
    num_samples: int = 1
    """Continuations of each prompt."""
    checkpoint: Path | None = None
    """A run or checkpoint directory; with neither it nor `init`, the latest run under runs/."""
    init: str | None = None
    """GPT-2 weights (a name or a path) instead of a checkpoint."""
    device: str = "auto"
    """Where to run, as --device takes it (auto, cpu, cuda, cuda:N, mps)."""
    dtype: str = "auto"
    """The weights' dtype, as --dtype takes it (auto, float32, bfloat16, float16)."""
    no_cache: bool = False
    """Recompute the whole window for every token instead of reusing the KV cache (for checking)."""
    compile: bool = False
    """torch.compile the model with frozen weights before sampling."""
    interactive: bool = False
    """Read the prompts from the input stream, one per line, instead of `prompt`."""
    raw: bool = False
    """Leave out a fine-tuned run's prompt template: continue the prompt as it is."""
    quantize: str = "none"
    """Decoding weights: none, int8 or int8-no-head (`gpt.model.quantize.SCHEMES`)."""

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise UserError(f"--num-samples must be >= 1, got {self.num_samples}")
        # What `stream` checks, here so that a typo fails before the model is loaded.
        temperature = DEFAULT_TEMPERATURE if self.temperature is None else self.temperature
        check_sampling_args(self.max_new_tokens, temperature, self.top_k, self.top_p)
        check_seed(self.seed)
        check_scheme(self.quantize)


def build_parser() -> ArgumentParser:
    """generate.py's flags, their defaults those of `GenerationOptions`."""
    defaults = GenerationOptions()
    parser = ArgumentParser(
        prog=command_name("generate.py"),
        description="Sample text from a trained checkpoint or from GPT-2 weights, streamed to the "
                    "terminal.")
    parser.add_argument("--prompt", default=defaults.prompt,
                        help="text to continue; for a fine-tuned run, the question (laid out with "
                             "the run's prompt template; only the answer is printed)")
    parser.add_argument("--interactive", action="store_true",
                        help="read one prompt per line from standard input and answer each (Ctrl-D "
                             "ends)")
    parser.add_argument("--raw", action="store_true",
                        help="a fine-tuned run's prompt template off: continue the prompt as it is")
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens,
                        help="tokens to add (default %(default)s)")
    parser.add_argument("--temperature", type=float, default=defaults.temperature,
                        help="sampling temperature; 0 = greedy (default: the model's, which "
                             "generate.py names: greedy for a fine-tuned run unless it was trained "
                             f"with --generation-temperature, {DEFAULT_TEMPERATURE} for text)")
    parser.add_argument("--top-k", type=int, default=defaults.top_k,
                        help="sample only among the k most likely tokens (default %(default)s)")
    parser.add_argument("--top-p", type=float, default=defaults.top_p,
                        help="then only within the nucleus of this probability mass, in (0, 1]")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="random seed, for repeatable samples")
    parser.add_argument("--num-samples", type=int, default=defaults.num_samples,
                        help="how many continuations (default %(default)s)")
    add_model_flags(parser, quantize=True)
    parser.add_argument("--no-cache", action="store_true",
                        help="recompute the whole window for every token (slow; for checking)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model with frozen weights: a one-time compilation, "
                             "then more tokens/s on a CPU; pays for long or many samples (see "
                             "BENCHMARKS.md)")
    return parser


def main(argv: list[str] | None = None) -> None:
    """`python generate.py ...`: parse and check the flags, then sample."""
    run_generation(GenerationOptions(**vars(build_parser().parse_args(argv))))


def cli() -> None:
    """The console-script entry point."""
    run_cli(main)


def run_generation(options: GenerationOptions, *, out: TextIO | None = None,
                   err: TextIO | None = None, inp: TextIO | None = None) -> None:
    """Load the model `options` name, then sample (its values were checked when it was made, so a
    typo fails at once, not after loading).

    A checkpoint of a run fine-tuned on records (`gpt.data.records`) answers: each prompt is laid
    out with the run's template (unless `raw`) and only the answer is written. `interactive` reads
    the prompts from `inp`, one per line. `out`/`err`/`inp` default to the current
    sys.stdout/stderr/stdin, looked up at the call. Out of memory and a failed `--compile` (at the
    first token) end in a one-line `UserError` naming the fix.
    """
    o = options
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    inp = sys.stdin if inp is None else inp
    torch_device = pick_device(o.device)
    torch_dtype = decoding_dtype(o.dtype, torch_device)
    if o.quantize != "none":
        check_int8_supported(torch_device, torch_dtype)
    configure_device(torch_device)
    # Before the model: a damaged training state is refused before the weights are read.
    answers = not o.raw and o.init is None  # a fine-tuned run answers in its template
    template = run_template(find_checkpoint(o.checkpoint)) if answers else None
    with flag_fixable_errors("use --dtype auto, bfloat16 or float16 (half float32's memory), a "
                             "smaller model, or --device cpu"):
        model = load_from_flags(o.checkpoint, o.init, torch_device, torch_dtype, err)
        started = time.perf_counter()
        # Before compiling: inductor packs the (frozen) weights itself, so no prepacking then.
        model = prepare_for_decoding(model, o.quantize, pack=not o.compile)
        if o.quantize != "none":
            print(f"{SCHEMES[o.quantize]} ({time.perf_counter() - started:.1f} s)", file=err)
        if o.compile:
            model = compile_for_decoding(model)
        temperature = sampling_temperature(o, err)
        tokenizer = get_tokenizer()
        eos_id = ENDOFTEXT_ID if model.config.vocab_size > ENDOFTEXT_ID else None
        generator = torch.Generator(device=torch_device)
        if o.seed is None:
            generator.seed()
        else:
            generator.manual_seed(o.seed)
        for text in prompts(o, inp, err):
            full = text if template is None else format_prompt(template, text)
            idx = torch.tensor([encode_prompt(full, tokenizer, model, err)], device=torch_device)
            for i in range(o.num_samples):
                if o.num_samples > 1:
                    out.write(f"--- sample {i + 1} of {o.num_samples} ---\n")
                # an answer is printed without its question
                out.write(text if template is None else "")
                new = stream(model, idx, o.max_new_tokens, temperature=temperature,
                             top_k=o.top_k, top_p=o.top_p, eos_id=eos_id, use_cache=not o.no_cache,
                             generator=generator)
                try:
                    write_text(token_ids(new, eos_id), tokenizer, out)
                finally:  # also before an error, which goes to `err`
                    out.write("\n")
                    out.flush()


def sampling_temperature(options: GenerationOptions, err: TextIO) -> float:
    """--temperature, else the model's default (`generation_defaults`); one line to `err` says which
    is used and where it comes from."""
    if options.temperature is not None:
        temperature, source = options.temperature, "--temperature"
    elif options.init is not None:
        temperature, source = DEFAULT_TEMPERATURE, "the default for text"
    else:
        checkpoint = find_checkpoint(options.checkpoint)
        temperature = generation_defaults(checkpoint)["temperature"]
        source = ("the fine-tuned run's default" if run_template(checkpoint) is not None
                  else "the default for text")
    how = "greedy (temperature 0)" if temperature == 0 else f"temperature {temperature:g}"
    other = (f"--temperature {DEFAULT_TEMPERATURE} samples" if temperature == 0
             else "--temperature 0 is greedy")
    print(f"decoding: {how}, {source}; {other}", file=err)
    return temperature


INTERACTIVE_HINT = ("type a question and press Enter for its answer (an empty line is skipped; "
                    "Ctrl-D ends)")


def prompts(options: GenerationOptions, inp: TextIO, err: TextIO) -> Iterator[str]:
    """The prompts to answer: `options.prompt`, or with `interactive` one per non-empty line of
    `inp`; on a terminal a one-line hint first and a "> " prompt (to `err`) before each line."""
    if not options.interactive:
        yield options.prompt
        return
    terminal = inp.isatty()
    if terminal:
        print(INTERACTIVE_HINT, file=err)
    while True:
        if terminal:
            err.write("> ")
            err.flush()
        line = inp.readline()
        if not line:
            return
        text = line.rstrip("\n")
        if text.strip():  # an empty line is not a question to answer
            yield text


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
        piece = (tokenizer.decode_single_token_bytes(token) if token < tokenizer.n_vocab
                 else b"\xef\xbf\xbd")
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
