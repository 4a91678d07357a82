"""Perplexity of any model on any text: `python -m gpt evaluate --checkpoint RUN_DIR --data SOURCE`.

(`--task choice` and `--task last-word` measure benchmark accuracy instead: `gpt.eval.task_cli`,
docs/evaluation-tasks.md. What follows is the default task, perplexity.)

A text longer than the model's context is scored by the standard sliding-window procedure
(`Windows`): windows of L tokens every S tokens, each token scored once, by the window that gives it
the most context. With S = L the windows do not overlap and a token near a window's start is
predicted from few tokens; a smaller S gives every token after the first window at least L - S + 1
tokens of context (a lower, fairer loss), for about L / S times the compute.

Reported: the tokens scored, the mean loss (nats per token), the perplexity exp(loss), and bits per
byte (see `bits_per_byte`), which compares models whose tokenizers cut text differently. The text is
read from the token cache (`gpt.data.token_cache.load_tokens`, any source `train.py --data`
accepts) one batch of windows at a time, so a corpus larger than memory streams from its memmap.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import tiktoken
import torch
from torch import Tensor
from tqdm import tqdm

from gpt.base.device import keep_freed_memory, pick_device, training_dtype
from gpt.base.errors import ArgumentParser, UserError, command_name, run_cli
from gpt.checkpoints.load import add_model_flags, load_from_flags
from gpt.data.token_cache import ERRORS_MODES, load_tokens
from gpt.eval.perplexity import LanguageModel, evaluate_loss, perplexity
from gpt.eval.task_cli import add_task_flags, prepare_task, run_task
from gpt.model.loss import IGNORE_INDEX
from gpt.model.model import GPT
from gpt.model.tokenizer import ENDOFTEXT_ID, get_tokenizer

TokenIds = np.ndarray | Tensor
"""A 1-D sequence of token ids: a NumPy array (the token cache's memmap) or a tensor."""


class Span(NamedTuple):
    """One window: it reads `inputs` tokens from `start` and scores its last `scored` predictions.
    """

    start: int
    inputs: int
    scored: int


@dataclass(frozen=True)
class Windows:
    """How a text of N tokens t_0 .. t_{N-1} is cut into windows and batched for scoring.

    The window starting at b reads t_b .. t_{b+L-1} and predicts, at each of them, the next token:
    its targets are t_{b+1} .. t_{b+L}, fewer if the text ends first. Windows start at b = 0, S,
    2S, ... until one reaches the last token. Each scores only the targets after the previous
    window's last one: the first window all its L, the next ones their last S, the last one what
    remains. So every token but t_0 is scored exactly once (N - 1 in all), and every one outside the
    first window with at least L - S + 1 tokens of context. (Hugging Face's perplexity guide does
    the same with windows of L tokens that score L - 1 predictions; ours spans L + 1 tokens and
    scores L, as a training window does, so S = L is exactly the trainer's non-overlapping
    validation windows.)
    """

    context_length: int
    """L: tokens each window reads (at most the model's context length)."""
    stride: int
    """S: tokens between the starts of consecutive windows, 1 to L."""
    batch_size: int = 8
    """Windows per forward pass."""

    def __post_init__(self) -> None:
        if self.context_length < 1:
            raise UserError(f"--context-length must be at least 1, got {self.context_length}")
        if not 1 <= self.stride <= self.context_length:
            raise UserError(f"--stride must be between 1 and --context-length "
                            f"({self.context_length}), "
                               f"got {self.stride}; a stride above it would skip tokens")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {self.batch_size}")

    @classmethod
    def for_model(cls, model: GPT, context_length: int | None = None, stride: int | None = None,
                  batch_size: int = 8) -> Windows:
        """Windows `model` can read: L defaults to its context length, S to half of L (each token
        outside the first window then sees at least half a window of context)."""
        model_context = model.config.context_length
        length = model_context if context_length is None else context_length
        if length > model_context:
            raise UserError(f"--context-length {length} exceeds the model's context length "
                               f"{model_context}; use --context-length {model_context} or less")
        return cls(length, max(1, length // 2) if stride is None else stride, batch_size)

    def spans(self, n_tokens: int) -> Iterator[Span]:
        """The windows over a text of `n_tokens` tokens, in order."""
        require_two_tokens(n_tokens)
        last = n_tokens - 1  # the last token is the last target
        scored_until, start = 0, 0  # targets t_1 .. t_scored_until are scored
        while scored_until < last:
            end = min(start + self.context_length, last)  # this window's last target
            yield Span(start, end - start, end - scored_until)
            scored_until, start = end, start + self.stride

    def batches(self, ids: TokenIds) -> Iterator[tuple[Tensor, Tensor]]:
        """(inputs, targets) batches of up to `batch_size` windows of one length over `ids`; a
        target its window does not score (an earlier window did, with less context) is -100
        (`lm_loss` skips it). Only one batch of tokens is read from `ids` at a time."""
        batch: list[Span] = []
        for span in self.spans(len(ids)):
            if batch and (len(batch) == self.batch_size or span.inputs != batch[0].inputs):
                yield _stack(ids, batch)
                batch = []
            batch.append(span)
        yield _stack(ids, batch)


def require_two_tokens(n_tokens: int) -> None:
    """A loss needs one token to read and one to predict."""
    if n_tokens < 2:
        raise UserError(f"the text is {n_tokens} token{'s' * (n_tokens != 1)} long; a loss needs "
                        f"at "
                           "least two (one to read, one to predict)")


def _stack(ids: TokenIds, spans: list[Span]) -> tuple[Tensor, Tensor]:
    x = torch.stack([_read(ids, s.start, s.start + s.inputs) for s in spans])  # (B, n)
    y = torch.stack([_read(ids, s.start + 1, s.start + s.inputs + 1) for s in spans])  # (B, n)
    for row, span in enumerate(spans):
        y[row, :span.inputs - span.scored] = IGNORE_INDEX
    return x, y


def _read(ids: TokenIds, start: int, stop: int) -> Tensor:
    """ids[start:stop] as int64 (a memmap's uint16 pages are read here, and only these)."""
    return torch.from_numpy(np.asarray(ids[start:stop], dtype=np.int64))


def sliding_window_nll(model: LanguageModel, ids: TokenIds, windows: Windows, *,
                       dtype: torch.dtype = torch.float32, progress: bool = False) -> tuple[float,
                                                                                            int]:
    """(summed loss in nats, tokens scored) of the text `ids` under `model`, by `windows`.

    The loss is `evaluate_loss` over `windows.batches(ids)` (eval mode, no gradients, autocast in
    `dtype`), so it is exactly the validation loss of `train.py` when the stride is the context
    length. `progress` shows a tqdm bar of tokens scored (on a terminal only).
    """
    tokens = len(ids) - 1
    batches = windows.batches(ids)
    if progress:
        bar = tqdm(total=tokens, unit="tok", unit_scale=True, disable=None, leave=False)
        batches = _counted(batches, bar)
    return evaluate_loss(model, batches, dtype=dtype) * tokens, tokens


def _counted(batches: Iterator[tuple[Tensor, Tensor]], bar: tqdm) -> Iterator[tuple[Tensor,
                                                                                    Tensor]]:
    with bar:
        for x, y in batches:
            yield x, y
            bar.update(int((y != IGNORE_INDEX).sum()))


def scored_bytes(ids: TokenIds, tokenizer: tiktoken.Encoding, chunk: int = 1 << 20) -> int:
    """UTF-8 bytes of the text the scored tokens ids[1:] stand for (`<|endoftext|>` counts 0: it
    marks a document boundary and is no text). Read `chunk` ids at a time."""
    lengths = np.array([len(tokenizer.decode_single_token_bytes(i))
                        for i in range(tokenizer.n_vocab)])
    lengths[ENDOFTEXT_ID] = 0
    return sum(int(lengths[np.asarray(ids[i:i + chunk])].sum()) for i in range(1, len(ids), chunk))


def bits_per_byte(nll_nats: float, n_bytes: int) -> float:
    """The total loss in bits per UTF-8 byte of the scored text: nll_nats / ln 2 / n_bytes.

    A loss per token depends on how many tokens the tokenizer cuts the text into; the same text's
    bytes do not, so bits per byte compares models across tokenizers (and with compressors). NaN for
    a text of no bytes.
    """
    return nll_nats / math.log(2) / n_bytes if n_bytes else math.nan


# ---- command line -----------------------------------------------------------------------------


def build_parser() -> ArgumentParser:
    """The command's flags: the model's (`add_model_flags`; --dtype is the autocast precision, the
    weights stay float32), the text's, the windows'."""
    parser = ArgumentParser(prog=command_name("python -m gpt evaluate"),
                            description=__doc__.splitlines()[0])
    add_model_flags(parser)
    add_task_flags(parser)
    parser.add_argument("--data", required=True, metavar="SOURCE",
                        help="the text to score, in any form train.py --data takes: a corpus name "
                             "(default, the-verdict, tinyshakespeare), a text file, a directory of "
                             ".txt files, a glob, or hf:NAME[:CONFIG]:SPLIT; with --task choice or "
                             "last-word, the task's file")
    parser.add_argument("--data-dir", type=Path, default=Path("data"),
                        help="where downloaded corpora and token caches are kept (default data)")
    parser.add_argument("--decode-errors", "--errors", default="strict", choices=ERRORS_MODES,
                        help="bytes that are not UTF-8: strict (refuse) or replace (with U+FFFD)")
    parser.add_argument("--context-length", type=int, metavar="L",
                        help="tokens per window (default: the model's context length)")
    parser.add_argument("--stride", type=int, metavar="S",
                        help="tokens between window starts, 1 to L (default L/2; L = no overlap, "
                             "fastest)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="windows (records, passages) per forward pass (default 8)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the "
                                                            "table")
    return parser


def main(argv: list[str] | None = None) -> None:
    """`python -m gpt evaluate ...`: check every flag, load the model, then the text, then score
    it."""
    args = build_parser().parse_args(argv)
    task = prepare_task(args)  # a task's file is checked before the model loads
    device = pick_device(args.device)
    dtype = training_dtype(args.dtype, device)
    model = load_from_flags(args.checkpoint, args.init, device, torch.float32, sys.stderr)
    windows = Windows.for_model(model, args.context_length, args.stride, args.batch_size)
    tokenizer = get_tokenizer()
    if model.config.vocab_size < tokenizer.n_vocab:
        raise UserError(f"the model predicts {model.config.vocab_size} token ids, GPT-2's "
                        f"tokenizer has "
                        f"{tokenizer.n_vocab}; score a model trained with the GPT-2 tokenizer")
    if task is not None:  # --context-length and --batch-size were checked as the windows' are
        run_task(task, model, args, dtype)
        return
    ids = load_tokens(args.data, data_dir=args.data_dir, errors=args.decode_errors)
    keep_freed_memory()  # every batch's logits are as big as a training step's: reuse their memory
    nll, tokens = sliding_window_nll(model, ids, windows, dtype=dtype, progress=not args.json)
    n_bytes = scored_bytes(ids, tokenizer)
    result = {"tokens": tokens, "loss": nll / tokens, "perplexity": perplexity(nll / tokens),
              "bits_per_byte": bits_per_byte(nll, n_bytes), "bytes": n_bytes,
              "context_length": windows.context_length, "stride": windows.stride,
              "dtype": str(dtype).removeprefix("torch.")}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.data}: {len(ids):,} tokens in windows of {windows.context_length} every "
          f"{windows.stride}, "
          f"autocast {result['dtype']}")
    print(f"tokens scored  {tokens:,}")
    print(f"mean loss      {result['loss']:.4f} nats per token")
    print(f"perplexity     {result['perplexity']:.2f}")
    print(f"bits per byte  {result['bits_per_byte']:.4f} ({n_bytes:,} UTF-8 bytes)")


def cli() -> None:
    """Console-script entry point."""
    run_cli(main)


if __name__ == "__main__":
    run_cli(main)
