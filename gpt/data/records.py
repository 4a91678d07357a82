"""Question/answer and instruction records: read them, lay them out with a template, tokenize them.

A record is a prompt and the response the model should give (`Record`). `load_records` reads a
`.jsonl` file (one JSON object per line) or a `.json` file (a list of objects, or of
`[question, answer]` pairs); every object has one of the key sets in `KEY_SETS`. A template
(`format_prompt`) turns the prompt into the text the model reads; `encode_record` makes the training
example:

    input  = template(prompt) + response + <|endoftext|>, the last token left out
    target = the same tokens shifted left by one, -100 where the target is a prompt token

The masks come from positions (where the prompt ends), never from token values, so an end-of-text
token used as padding is never taken for the real one, which is a target: the model learns to stop.
`InstructionDataset` holds the encoded records and `pad_collate` pads a batch to its longest record
(inputs with end-of-text, targets with -100, which the loss leaves out). It takes `Record`s or the
objects a records file holds, as `json.load` gives them (`from_json_items`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import tiktoken
import torch
from torch import Tensor
from torch.utils.data import Dataset

from gpt.base.errors import UserError, past_json_limits
from gpt.model.loss import IGNORE_INDEX
from gpt.model.tokenizer import ENDOFTEXT_ID

RECORD_SUFFIXES = (".json", ".jsonl")
"""A --data file with one of these suffixes holds records; anything else is text to pretrain on."""
KEY_SETS = {("instruction", "output"): "alpaca", ("prompt", "response"): "plain",
            ("prompt", "completion"): "plain", ("question", "answer"): "qa"}
"""The accepted record keys (prompt key, response key), each with its kind's default template. An
Alpaca record may also have an "input"; a `.json` list may hold [question, answer] pairs (kind
qa)."""
ALPACA_HEAD = ("Below is an instruction that describes a task. Write a response that appropriately "
               "completes the request.\n\n### Instruction:\n")
TEMPLATES = {"plain": "{prompt} ", "qa": "Question: {prompt}\nAnswer: "}
"""The named templates besides alpaca (the layout of Raschka's chapter 7, see `format_prompt`)."""

T = TypeVar("T")


@dataclass(frozen=True)
class Record:
    """One example: what the model reads (`prompt`, and an optional `input` for it) and should
    answer."""

    prompt: str
    response: str
    input: str = ""
    kind: str = "qa"
    """alpaca, plain or qa: which template it gets by default (`KEY_SETS`)."""


def is_record_file(data: str | None) -> bool:
    """True if `data` (a --data or --val-data value) names a records file, by its suffix."""
    return data is not None and Path(data).suffix.lower() in RECORD_SUFFIXES


# ---- reading ------------------------------------------------------------------------------------


def load_records(path: str | Path) -> list[Record]:
    """The records of a `.jsonl` or `.json` file; `UserError` naming the file and line of a bad one.
    """
    example = '{"question": "What is the capital of France?", "answer": "Paris"}'
    return [_record(item, where) for where, item in read_items(path, example)]


def from_json_items(items: Sequence[Any], kind: type[T],
                    parse: Callable[[object, str], T]) -> list[T]:
    """`items` as `kind` objects: those that are kept as they are, any other (a dict or list as
    `json.load` gives it) checked and converted by `parse`, the file loader's, so that it fails
    with the file's one-line `UserError`, naming "record N" (from 1) where that names the file."""
    return [item if isinstance(item, kind) else parse(item, f"record {n}")
            for n, item in enumerate(items, 1)]


def read_items(path: str | Path, example: str) -> list[tuple[str, object]]:
    """(where, JSON value) of each record of a `.jsonl` or `.json` file, `where` naming its file and
    line (or place in the list); `UserError` for an unreadable file, bad JSON, or no records (the
    message shows `example`, one record)."""
    items = list(iter_items(path))
    if not items:
        raise UserError(f"{path} holds no records; add one per line, e.g. {example}")
    return items


def iter_items(path: str | Path) -> Iterator[tuple[str, object]]:
    """`read_items` one record at a time, for files too large to hold: a `.jsonl` file is read a
    line at a time (never whole); a `.json` list is parsed whole (JSON has no record boundaries to
    stream by). `UserError` for an unreadable file or bad JSON when the reading reaches it; an
    empty file yields nothing (the caller says what it needed)."""
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as file:
            if path.suffix.lower() == ".jsonl":
                for n, line in enumerate(file, 1):
                    if line.strip():
                        yield f"{path}:{n}", _parse(line, path, n)
                return
            text = file.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read records file {path}: "
                        f"{getattr(exc, 'strerror', None) or exc}") from None
    data = _parse(text, path, 0) if text.strip() else []
    if not isinstance(data, list):
        raise UserError(f"{path}: a .json records file must hold a list of records, found a "
                        f"{type(data).__name__}; wrap the records in [ ... ] or use .jsonl")
    yield from ((f"{path}: record {n}", item) for n, item in enumerate(data, 1))


def _parse(text: str, path: Path, line: int) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"{path}:{line or exc.lineno}"
        raise UserError(f"{where}: not valid JSON ({exc.msg}, column {exc.colno}); fix that "
                        f"line") from None
    except (RecursionError, ValueError) as exc:  # what json.loads raises past Python's own limits
        where = f"{path}:{line}" if line else str(path)
        raise UserError(f"{where}: {past_json_limits(exc)}, which no record holds; fix "
                        f"{'that line' if line else 'the file'}") from None


def _record(item: object, where: str) -> Record:
    if isinstance(item, list) and len(item) == 2 and all(isinstance(s, str) for s in item):
        return _checked(Record(item[0], item[1], kind="qa"), where)
    if isinstance(item, dict):
        for (prompt_key, response_key), kind in KEY_SETS.items():
            if prompt_key in item and response_key in item:
                values = (item[prompt_key], item[response_key], item.get("input", ""))
                if not all(isinstance(v, str) for v in values):
                    raise UserError(f"{where}: {prompt_key}, {response_key} and input must be "
                                    f"strings")
                return _checked(Record(*values, kind=kind), where)
    accepted = ", ".join("{" + ", ".join(keys) + "}" for keys in KEY_SETS)
    found = "{" + ", ".join(map(str, item)) + "}" if isinstance(item, dict) else type(item).__name__
    raise UserError(f"{where}: a record needs one of the key sets {accepted} (Alpaca's may add "
                    f"\"input\"), or is a [question, answer] pair in a .json list; found {found}")


def _checked(record: Record, where: str) -> Record:
    for what in ("prompt", "response"):
        if not getattr(record, what).strip():
            raise UserError(f"{where}: the {what} is empty; every record needs a prompt and a "
                            f"response")
    return record


# ---- templates ----------------------------------------------------------------------------------


def check_template(template: str) -> str:
    """`template` if it is a name (alpaca, plain, qa) or a string with a {prompt} field; else
    `UserError`."""
    if template != "alpaca" and template not in TEMPLATES and "{prompt}" not in template:
        raise UserError(f"--prompt-template {template!r} is neither alpaca, plain nor qa, and has "
                        f"no "
                        "{prompt} field; e.g. --prompt-template 'Q: {prompt}\\nA: '")
    return template


def format_prompt(template: str, prompt: str, input: str = "") -> str:
    """The text the model reads before the response.

    alpaca: the instruction, the input (if any) and "### Response:" under their headings. plain:
    the prompt and a space. qa: "Question: <prompt>\\nAnswer: ". A custom template's {prompt} and
    {input} fields are filled in; an input with no field of its own follows the prompt.
    """
    if template == "alpaca":
        given = f"\n\n### Input:\n{input}" if input else ""
        return ALPACA_HEAD + prompt + given + "\n\n### Response:\n"
    text = TEMPLATES.get(template, template)
    if input and "{input}" not in text:
        prompt = f"{prompt}\n\n{input}"
    return text.replace("{prompt}", prompt).replace("{input}", input)


# ---- tokens and targets -------------------------------------------------------------------------


def encode_record(record: Record, tokenizer: tiktoken.Encoding, template: str, *,
                  mask_prompt: bool = True,
                  max_length: int = 1024) -> tuple[list[int], list[int]] | None:
    """(input_ids, target_ids) of one record, at most `max_length` each, or None if it cannot fit.

    The prompt is cut from the left when the whole is too long; the response and its end-of-text
    token are always kept whole, with at least one prompt token before them (the input the first
    response token is predicted from). Text that spells "<|endoftext|>" is encoded as plain text.
    """
    prompt = tokenizer.encode(format_prompt(template, record.prompt, record.input),
                              disallowed_special=())
    response = [*tokenizer.encode(record.response, disallowed_special=()), ENDOFTEXT_ID]
    keep = max_length + 1 - len(response)  # prompt tokens that fit
    if keep < 1:
        return None
    prompt = prompt[-keep:]
    tokens = prompt + response
    targets = tokens[1:]
    if mask_prompt:  # targets[i] is tokens[i + 1]: a prompt token for i + 1 < len(prompt)
        targets[:len(prompt) - 1] = [IGNORE_INDEX] * (len(prompt) - 1)
    return tokens[:-1], targets


class InstructionDataset(Dataset[tuple[Tensor, Tensor]]):
    """Records as (input_ids, target_ids) int64 tensors of equal length (`encode_record`).

    `records` are `Record`s or what a records file holds, as `json.load` gives it: objects with
    one of the key sets of `KEY_SETS` (`{"instruction", "input", "output"}`, ...) or [question,
    answer] pairs, checked as `load_records` checks them. Records that cannot fit in `max_length`
    tokens are left out; `dropped` counts them.
    """

    def __init__(self, records: Sequence[Record | dict[str, Any] | list[str]],
                 tokenizer: tiktoken.Encoding, template: str = "qa", *, mask_prompt: bool = True,
                 max_length: int = 1024) -> None:
        check_template(template)
        self.records: list[Record] = []
        self.examples: list[tuple[list[int], list[int]]] = []
        for record in from_json_items(records, Record, _record):
            example = encode_record(record, tokenizer, template, mask_prompt=mask_prompt,
                                    max_length=max_length)
            if example is not None:
                self.records.append(record)
                self.examples.append(example)
        self.dropped = len(records) - len(self.examples)
        self.template = template
        self.context_length = max_length

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        inputs, targets = self.examples[i]
        return torch.tensor(inputs), torch.tensor(targets)

    def lengths(self) -> list[int]:
        """The input length of every example (what the bucketed sampler sorts by)."""
        return [len(inputs) for inputs, _ in self.examples]


def pad_collate(batch: Sequence[tuple[Tensor, Tensor]], pad_id: int = ENDOFTEXT_ID,
                ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """(inputs, targets), each (B, longest): inputs padded with `pad_id`, targets with
    `ignore_index`."""
    longest = max(len(inputs) for inputs, _ in batch)
    inputs = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    targets = torch.full((len(batch), longest), ignore_index, dtype=torch.long)
    for row, (x, y) in enumerate(batch):
        inputs[row, :len(x)] = x
        targets[row, :len(y)] = y
    return inputs, targets
