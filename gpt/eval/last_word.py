"""Last-word accuracy (LAMBADA's task): does greedy decoding give a passage's last word exactly?

A passage file is either
    `.jsonl`   one JSON object per line with the passage under "text" (LAMBADA's lambada_test.jsonl
               as lm-evaluation-harness distributes it), or a `.json` list of such objects;
    any other  plain UTF-8 text, one passage per line (blank lines skipped).

The target is the passage's final whitespace-delimited word, punctuation and all; the context is the
text before it (trailing whitespace dropped), and the word follows it after one space. The model
reads the context and decodes greedily until the word is complete: the passage counts as correct
when the continuation spells " " + word and then ends the word, with whitespace or end-of-text.
A continuation that adds anything to the word ("word." for "word") or stops short is wrong.

`score_passages` does this for many passages in one forward pass: the context and the target's
tokens are read teacher-forced, and the greedy token at each position is exactly what greedy
decoding would produce as long as it agrees with the target's tokens; the first position where it
does not decides the passage, unless it spells the same bytes in other tokens (" apples" where the
target is " app" + "les"), and then that passage alone is decoded token by token (`decode_word`).

The perplexity reported with it is that of the last word: exp of the mean, over passages, of the
word's summed negative log-likelihood (per word, as the GPT-2 paper and lm-evaluation-harness
report LAMBADA's), with the mean loss per token of the word's tokens beside it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import tiktoken
import torch
from tqdm import tqdm

from gpt.base.device import autocast
from gpt.base.errors import UserError
from gpt.data.records import iter_items
from gpt.eval.perplexity import perplexity
from gpt.eval.scoring import Accuracy, Row, batched, check_limit, fit_left, score_rows
from gpt.model.model import GPT
from gpt.model.sampling import stream
from gpt.model.tokenizer import ENDOFTEXT_ID

JSON_SUFFIXES = (".jsonl", ".json")
EXAMPLE = '{"text": "She opened the door and let the cat in. The cat"}'


@dataclass(frozen=True)
class Passage:
    """A passage cut into the context and its last word."""

    context: str
    word: str
    where: str = ""


def read_passages(path: str | Path, limit: int | None = None) -> Iterator[Passage]:
    """The first `limit` passages of `path` (all with None), one at a time; `UserError` naming the
    file and line of a bad one, or if there is none."""
    check_limit(limit)
    n = 0
    for where, text in _texts(Path(path)):
        if limit is not None and n >= limit:
            return
        yield split_passage(text, where)
        n += 1
    if n == 0:
        raise UserError(f"{path} holds no passages; write one per line (plain text), or one JSON "
                        f"object per line of a .jsonl file, e.g. {EXAMPLE}")


def _texts(path: Path) -> Iterator[tuple[str, str]]:
    if path.suffix.lower() in JSON_SUFFIXES:
        for where, item in iter_items(path):
            text = item.get("text") if isinstance(item, dict) else None
            if not isinstance(text, str):
                raise UserError(f'{where}: a passage record is a JSON object with a "text" string, '
                                f"e.g. {EXAMPLE}")
            yield where, text
        return
    try:
        with path.open(encoding="utf-8") as file:
            for n, line in enumerate(file, 1):
                if line.strip():
                    yield f"{path}:{n}", line
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise UserError(f"cannot read passages file {path}: {reason}") from None


def split_passage(text: str, where: str = "") -> Passage:
    """The context and last word of `text`; `UserError` for a passage of fewer than two words."""
    text = text.rstrip()
    words = text.split()
    if len(words) < 2:
        raise UserError(f"{where}: the passage {text!r:.60} has {len(words)} word"
                        f"{'s' * (len(words) != 1)}; a last word needs a context of words before "
                        "it")
    return Passage(text[:len(text) - len(words[-1])].rstrip(), words[-1], where)


# ---- judging a continuation ---------------------------------------------------------------------


class WordJudge:
    """Follows a greedy continuation token by token and says when it has decided the passage."""

    def __init__(self, word: str, tokenizer: tiktoken.Encoding) -> None:
        self.target = (" " + word).encode("utf-8")
        self.tokenizer = tokenizer
        self.so_far = b""

    def feed(self, token: int) -> bool | None:
        """True: the continuation is the word, then a word boundary; False: it cannot be; None: not
        decided yet (what came so far is the beginning of " " + word, or all of it)."""
        if token == ENDOFTEXT_ID:
            return self.so_far == self.target
        self.so_far += self.tokenizer.decode_single_token_bytes(token)
        n = len(self.target)
        if self.so_far[:n] != self.target[:len(self.so_far)]:
            return False
        if len(self.so_far) <= n:
            return None
        return self.so_far[n:].decode("utf-8", errors="ignore")[:1].isspace()

    @property
    def steps_left(self) -> int:
        """A bound on the tokens still needed: every token adds at least a byte, so one more than
        the target's bytes decides it."""
        return len(self.target) + 1 - len(self.so_far)


def decode_word(model: GPT, prompt: list[int], judge: WordJudge, *,
                dtype: torch.dtype = torch.float32) -> bool:
    """Greedy decoding from `prompt` (its last `context_length` tokens are read) until `judge`
    decides; False if it has not decided when every token it could need was decoded."""
    device = model.tok_emb.weight.device
    with autocast(device, dtype):
        for token in stream(model, torch.tensor([prompt], device=device), max(1, judge.steps_left)):
            verdict = judge.feed(int(token[0]))
            if verdict is not None:
                return verdict
    return False


# ---- many passages at once ----------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedPassage:
    """A passage's tokens: the context (cut to fit), the target " " + word, whether it was cut."""

    passage: Passage
    context: list[int]
    target: list[int]
    truncated: bool


def encode_passage(passage: Passage, tokenizer: tiktoken.Encoding,
                   context_length: int) -> EncodedPassage:
    """The context keeps its last tokens so that context + target fit `context_length` (the model
    reads the target's last token too: its prediction after it says whether the word ended)."""
    target = tokenizer.encode(" " + passage.word, disallowed_special=())
    room = context_length - len(target)
    if room < 1:
        raise UserError(f"{passage.where}: the last word is {len(target)} tokens and the model "
                        f"reads {context_length}; it needs at least one context token besides")
    context, cut = fit_left(tokenizer.encode(passage.context, disallowed_special=()), room)
    return EncodedPassage(passage, context, target, cut)


@dataclass(frozen=True)
class PassageScore:
    """One passage's result: whether greedy decoding gives the word, and the word's summed negative
    log-likelihood (nats) over its `tokens` tokens."""

    correct: bool
    nll: float
    tokens: int
    truncated: bool


def score_passages(model: GPT, encoded: Sequence[EncodedPassage], tokenizer: tiktoken.Encoding, *,
                   dtype: torch.dtype = torch.float32) -> list[PassageScore]:
    """Every passage of `encoded` in one forward pass (plus a few tokens of decoding for the rare
    passage whose greedy tokens spell the word differently: see the module docstring)."""
    rows = [Row(p.context + p.target, len(p.context) - 1, p.target) for p in encoded]
    out = []
    for p, score in zip(encoded, score_rows(model, rows, dtype=dtype), strict=True):
        judge, verdict = WordJudge(p.passage.word, tokenizer), None
        for i, token in enumerate(score.greedy):  # len(target) + 1 predictions
            verdict = judge.feed(token)
            if verdict is not None:
                break
            if token != p.target[i]:  # greedy leaves the teacher-forced path, still undecided
                prompt = p.context + p.target[:i] + [token]
                verdict = decode_word(model, prompt, judge, dtype=dtype)
                break
        out.append(PassageScore(bool(verdict), -float(score.log_probs.sum()), len(p.target),
                                p.truncated))
    return out


@dataclass
class LastWordTally:
    """Running counts over scored passages."""

    n: int = 0
    correct: int = 0
    nll: float = 0.0
    tokens: int = 0
    truncated: int = 0

    def add(self, scores: Iterable[PassageScore]) -> None:
        for s in scores:
            self.n += 1
            self.correct += s.correct
            self.nll += s.nll
            self.tokens += s.tokens
            self.truncated += s.truncated

    @property
    def acc(self) -> Accuracy:
        return Accuracy(self.correct, self.n)

    @property
    def word_perplexity(self) -> float:
        """exp(mean over passages of the last word's summed negative log-likelihood)."""
        return perplexity(self.nll / self.n) if self.n else math.nan

    @property
    def token_loss(self) -> float:
        """Mean negative log-likelihood per token of the last words (nats)."""
        return self.nll / self.tokens if self.tokens else math.nan


def evaluate_passages(model: GPT, passages: Iterable[Passage], tokenizer: tiktoken.Encoding, *,
                      batch_size: int = 8, dtype: torch.dtype = torch.float32,
                      context_length: int | None = None, bar: tqdm | None = None) -> LastWordTally:
    """Score `passages` (read lazily) `batch_size` per forward pass; their tally. `context_length`
    (default the model's) is where contexts are cut; `bar` (tqdm) advances by one per passage."""
    length = context_length or model.config.context_length
    tally = LastWordTally()
    for batch in batched(passages, batch_size):
        encoded = [encode_passage(p, tokenizer, length) for p in batch]
        tally.add(score_passages(model, encoded, tokenizer, dtype=dtype))
        if bar is not None:
            bar.update(len(batch))
    return tally
