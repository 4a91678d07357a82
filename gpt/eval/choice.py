"""Multiple choice (HellaSwag and your own): which ending of a context does the model prefer?

A record is a context, two or more endings and the index of the right one, in either shape:

    {"ctx": "...", "endings": ["...", ...], "label": 3}       HellaSwag's files (other keys ignored)
    {"context": "...", "choices": ["...", ...], "answer": 0}  the generic shape

one JSON object per line of a `.jsonl` file (read a line at a time, so a file of any size
streams), or a `.json` list of them. The index may also be a string of digits ("3": copies of
HellaSwag converted from Hugging Face datasets store it so). Every ending is scored by the model's
log-likelihood of its tokens after the context, the ending joined to the context by one space, as
lm-evaluation-harness and llm.c's / nanoGPT-style HellaSwag scripts do: the tokens of `context`
followed by those of " " + ending, each encoded on its own (an empty context reads one end-of-text
token instead, as lm-evaluation-harness does, so the first ending token has something to be
predicted from). Two accuracies:

    acc        the ending with the highest summed log-likelihood is the right one
    acc_norm   ... with the highest mean log-likelihood per token (the figure HellaSwag reports)

acc_norm follows llm.c's hellaswag.py (the lowest mean loss per token); lm-evaluation-harness
divides by the ending's length in bytes instead, so its acc_norm differs a little (see
docs/evaluation-tasks.md). A context and ending longer than the model reads lose the context's
first tokens (`fit_left`); such records are counted (`truncated`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import tiktoken
import torch
from tqdm import tqdm

from gpt.base.errors import UserError
from gpt.data.records import iter_items
from gpt.eval.scoring import Accuracy, Row, batched, check_limit, fit_left, score_rows
from gpt.model.model import GPT
from gpt.model.tokenizer import ENDOFTEXT_ID

SHAPES = {("ctx", "endings", "label"): "HellaSwag", ("context", "choices", "answer"): "generic"}
"""The accepted key sets (context, endings, right index), with the name of each shape."""
EXAMPLE = '{"context": "The sky is", "choices": ["blue.", "made of cheese."], "answer": 0}'


@dataclass(frozen=True)
class ChoiceRecord:
    """One question: the context, its endings, the index of the right one, where it was read."""

    context: str
    endings: tuple[str, ...]
    label: int
    where: str = ""


def read_choice_records(path: str | Path, limit: int | None = None) -> Iterator[ChoiceRecord]:
    """The first `limit` records of `path` (all with None), one at a time, each checked;
    `UserError` naming the file and line of the first bad one, or if there is none at all."""
    check_limit(limit)
    n = 0
    for where, item in iter_items(path):
        if limit is not None and n >= limit:
            return
        yield parse_choice(item, where)
        n += 1
    if n == 0:
        raise UserError(f"{path} holds no records; add one per line, e.g. {EXAMPLE}")


def parse_choice(item: object, where: str) -> ChoiceRecord:
    """The record a JSON value stands for; `UserError` saying what is wrong with it."""
    shapes = " or ".join("{" + ", ".join(f'"{k}"' for k in keys) + "}" for keys in SHAPES)
    if not isinstance(item, dict):
        raise UserError(f"{where}: a record is a JSON object with keys {shapes}, found a "
                        f"{type(item).__name__}")
    keys = next((keys for keys in SHAPES if keys[0] in item), None)
    if keys is None:
        raise UserError(f"{where}: no context: a record has the keys {shapes}; found "
                        f"{{{', '.join(map(str, item))}}}")
    context_key, endings_key, label_key = keys
    context, endings, label = item[context_key], item.get(endings_key), item.get(label_key)
    if not isinstance(context, str):
        raise UserError(f"{where}: {context_key} must be a string, found {type(context).__name__}")
    if not isinstance(endings, list) or len(endings) < 2:
        found = "none" if endings is None else f"{endings!r:.60}"
        raise UserError(f"{where}: a record needs a list of at least two endings under "
                        f'"{endings_key}", found {found}')
    for i, ending in enumerate(endings):
        if not isinstance(ending, str) or not ending.strip():
            raise UserError(f"{where}: ending {i} is {ending!r:.40}, which tokenizes to nothing to "
                            "score (it would be scored on the joining space alone); every ending "
                            "needs some text")
    index = _label(label, label_key, len(endings), where)
    return ChoiceRecord(context, tuple(endings), index, where)


def _label(label: object, key: str, n_endings: int, where: str) -> int:
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)
    if not isinstance(label, int) or isinstance(label, bool):
        hint = (" (HellaSwag's test split has no labels: use its validation split)"
                if label == "" else "")
        raise UserError(f'{where}: "{key}" must be the index of the right ending, an integer, '
                        f"found {label!r:.40}{hint}")
    if not 0 <= label < n_endings:
        raise UserError(f'{where}: "{key}" is {label}, out of range for {n_endings} endings '
                        f"(0 to {n_endings - 1})")
    return label


# ---- tokens -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedChoice:
    """A record as the rows to score: one per ending, its context's tokens then the ending's."""

    rows: tuple[Row, ...]
    label: int
    truncated: bool
    """Whether the context lost tokens from its beginning to fit the model."""


def encode_choice(record: ChoiceRecord, tokenizer: tiktoken.Encoding,
                  context_length: int) -> EncodedChoice:
    """`record`'s rows for a model that reads `context_length` tokens.

    Each row is the context's tokens and the tokens of " " + ending, the last one left out (it is
    only predicted), cut from the left to the model's length (`fit_left`); `UserError` if an ending
    alone leaves no room for a context token to predict its first token from.
    """
    context = tokenizer.encode(record.context, disallowed_special=()) or [ENDOFTEXT_ID]
    rows, truncated = [], False
    for i, ending in enumerate(record.endings):
        ending_ids = tokenizer.encode(" " + ending, disallowed_special=())
        if len(ending_ids) > context_length:
            raise UserError(f"{record.where}: ending {i} is {len(ending_ids)} tokens, and the "
                            f"model reads {context_length}: it needs at least one context token "
                            "before the ending; shorten the ending or use a model with a longer "
                            "context")
        sequence, cut = fit_left(context + ending_ids, context_length + 1)
        truncated |= cut
        inputs = sequence[:-1]
        rows.append(Row(inputs, len(inputs) - len(ending_ids), ending_ids))
    return EncodedChoice(tuple(rows), record.label, truncated)


# ---- scores -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChoiceScores:
    """Per ending: the summed and the mean-per-token log-likelihood; the two picks and the label."""

    sums: tuple[float, ...]
    means: tuple[float, ...]
    label: int
    truncated: bool

    @property
    def pick(self) -> int:
        """The ending with the highest summed log-likelihood (the first of equals): acc's choice."""
        return max(range(len(self.sums)), key=self.sums.__getitem__)

    @property
    def pick_norm(self) -> int:
        """The ending with the highest mean log-likelihood per token: acc_norm's choice."""
        return max(range(len(self.means)), key=self.means.__getitem__)


def score_choices(model: GPT, encoded: Sequence[EncodedChoice], *,
                  dtype: torch.dtype = torch.float32) -> list[ChoiceScores]:
    """The scores of every ending of every record in `encoded`, all in one forward pass."""
    scores = score_rows(model, [row for record in encoded for row in record.rows], dtype=dtype)
    out, at = [], 0
    for record in encoded:
        mine = scores[at:at + len(record.rows)]
        at += len(record.rows)
        sums = tuple(float(s.log_probs.sum()) for s in mine)
        means = tuple(float(s.log_probs.mean()) for s in mine)
        out.append(ChoiceScores(sums, means, record.label, record.truncated))
    return out


@dataclass
class ChoiceTally:
    """Running counts over scored records."""

    n: int = 0
    correct: int = 0
    correct_norm: int = 0
    truncated: int = 0
    endings: set[int] = field(default_factory=set)
    """The numbers of endings seen (4 for HellaSwag): the chance level is 1 over them."""

    def add(self, scores: Iterable[ChoiceScores]) -> None:
        for s in scores:
            self.n += 1
            self.correct += s.pick == s.label
            self.correct_norm += s.pick_norm == s.label
            self.truncated += s.truncated
            self.endings.add(len(s.sums))

    @property
    def n_endings(self) -> int:
        """The number of endings of every record (0 if they differ or none was scored)."""
        return next(iter(self.endings)) if len(self.endings) == 1 else 0

    @property
    def acc(self) -> Accuracy:
        return Accuracy(self.correct, self.n)

    @property
    def acc_norm(self) -> Accuracy:
        return Accuracy(self.correct_norm, self.n)


def evaluate_choices(model: GPT, records: Iterable[ChoiceRecord], tokenizer: tiktoken.Encoding, *,
                     batch_size: int = 8, dtype: torch.dtype = torch.float32,
                     context_length: int | None = None, bar: tqdm | None = None) -> ChoiceTally:
    """Score `records` (read lazily) `batch_size` records per forward pass; their tally.

    `context_length` (default the model's) is where contexts are cut; `bar` (tqdm) advances by one
    per record scored.
    """
    length = context_length or model.config.context_length
    tally = ChoiceTally()
    for batch in batched(records, batch_size):
        encoded = [encode_choice(record, tokenizer, length) for record in batch]
        tally.add(score_choices(model, encoded, dtype=dtype))
        if bar is not None:
            bar.update(len(batch))
    return tally
