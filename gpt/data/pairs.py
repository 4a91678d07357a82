"""Preference records: a prompt with a chosen and a rejected response, encoded as two fine-tuning
examples.

A preference record says which of two responses to one prompt is the better: `{"prompt", "chosen",
"rejected"}`, or Alpaca's prompt `{"instruction", "input" (optional), "chosen", "rejected"}`, or
`{"question", "chosen", "rejected"}`, one JSON object per line of a `.jsonl` file or in a `.json`
list; `load_pairs` reads them. Each response is encoded as a fine-tuning record would be
(`gpt.data.records.encode_record`): the templated prompt, the response and <|endoftext|>, the
prompt's targets -100, so that the sum of the log-probabilities of the counted targets is log
p(response | prompt) (`gpt.objectives.dpo`). Both responses of a pair read the same prompt tokens: a
prompt too long for the context is cut by as many tokens for both.

`PreferenceDataset` holds the encoded pairs (`PreferencePair`s, or the objects of a pairs file as
`json.load` gives them) and, once `gpt.objectives.dpo` has computed them, the reference
model's log-probabilities of both responses; `pair_collate` makes a batch of B pairs one padded
batch of 2B rows, the B chosen responses first, so the model reads both in one forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tiktoken
import torch
from torch import Tensor
from torch.utils.data import Dataset

from gpt.base.errors import UserError
from gpt.data.records import (
    Record,
    check_template,
    encode_record,
    from_json_items,
    pad_collate,
    read_items,
)

PROMPT_KEYS = {"prompt": "plain", "instruction": "alpaca", "question": "qa"}
"""A preference record's prompt key, and the template its kind gets by default (as in
`gpt.data.records`)."""
EXAMPLE = '{"prompt": "Name a colour.", "chosen": "Blue is a colour.", "rejected": "Blue"}'

Example = tuple[list[int], list[int]]  # (input_ids, target_ids), as `encode_record` makes them
# chosen (in, target), rejected (...), reference
PairItem = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


@dataclass(frozen=True)
class PreferencePair:
    """One prompt (with an optional `input`), the response preferred and the one rejected."""

    prompt: str
    chosen: str
    rejected: str
    input: str = ""
    kind: str = "plain"
    """alpaca, plain or qa: which template it gets by default (`PROMPT_KEYS`)."""

    def record(self, response: str) -> Record:
        """The fine-tuning record of this prompt with `response` (the chosen or the rejected one).
        """
        return Record(self.prompt, response, self.input, self.kind)


# ---- reading ------------------------------------------------------------------------------------


def load_pairs(path: str | Path) -> list[PreferencePair]:
    """The preference records of a `.jsonl` or `.json` file; `UserError` naming the file and line of
    a bad one: a key missing, a value not a string or empty, or chosen the same as rejected."""
    return [_pair(item, where) for where, item in read_items(path, EXAMPLE)]


def _pair(item: object, where: str) -> PreferencePair:
    if not isinstance(item, dict):
        raise UserError(f"{where}: a preference record is a JSON object such as {EXAMPLE}; found a "
                        f"{type(item).__name__}")
    prompt_key = next((key for key in PROMPT_KEYS if key in item), None)
    missing = [key for key in ("chosen", "rejected") if key not in item]
    if prompt_key is None or missing:
        missing = (["prompt (or instruction, or question)"] if prompt_key is None else []) + missing
        raise UserError(f"{where}: a preference record needs a prompt and the chosen and rejected "
                        f"responses, e.g. {EXAMPLE}; it has no {' and no '.join(missing)}")
    values = (item[prompt_key], item["chosen"], item["rejected"], item.get("input", ""))
    if not all(isinstance(value, str) for value in values):
        raise UserError(f"{where}: {prompt_key}, chosen, rejected and input must be strings")
    for key, value in zip((prompt_key, "chosen", "rejected"), values, strict=False):
        if not value.strip():
            raise UserError(f"{where}: the {key} is empty; every preference record needs a prompt "
                            f"and "
                            "two responses")
    pair = PreferencePair(*values, kind=PROMPT_KEYS[prompt_key])
    if pair.chosen.strip() == pair.rejected.strip():
        raise UserError(f"{where}: chosen and rejected are the same text, so neither is preferred; "
                        f"make "
                        "them differ, or drop the record")
    return pair


# ---- tokens, targets, batches -------------------------------------------------------------------


def encode_pair(pair: PreferencePair, tokenizer: tiktoken.Encoding, template: str,
                max_length: int = 1024) -> tuple[Example, Example] | None:
    """(chosen, rejected) examples of `encode_record`, at most `max_length` tokens each, or None if
    either cannot fit. `encode_record` cuts a long prompt to make room for its response: here both
    lose as many prompt tokens as the longer response needs, so both read the same prompt."""
    lengths = [len(tokenizer.encode(response, disallowed_special=())) for response in (pair.chosen,
                                                                                       pair.rejected)]
    longest = max(lengths)
    chosen, rejected = (encode_record(pair.record(response), tokenizer, template,
                                      max_length=max_length - (longest - length))
                        for response, length in zip((pair.chosen, pair.rejected), lengths,
                                                    strict=True))
    return None if chosen is None or rejected is None else (chosen, rejected)


class PreferenceDataset(Dataset[PairItem]):
    """Preference pairs encoded (`encode_pair`), with the reference model's log-probabilities.

    `pairs` are `PreferencePair`s or what a pairs file holds, as `json.load` gives it (`{"prompt",
    "chosen", "rejected"}`, ...), checked as `load_pairs` checks them. Pairs that cannot fit in
    `max_length` tokens are left out; `dropped` counts them.
    """

    def __init__(self, pairs: Sequence[PreferencePair | dict[str, Any]],
                 tokenizer: tiktoken.Encoding, template: str = "plain", *,
                 max_length: int = 1024) -> None:
        check_template(template)
        self.pairs: list[PreferencePair] = []
        self.examples: list[tuple[Example, Example]] = []
        for pair in from_json_items(pairs, PreferencePair, _pair):
            encoded = encode_pair(pair, tokenizer, template, max_length)
            if encoded is not None:
                self.pairs.append(pair)
                self.examples.append(encoded)
        self.dropped = len(pairs) - len(self.examples)
        self.template = template
        self.context_length = max_length
        self.reference = torch.full((len(self.examples), 2), math.nan)
        """The reference model's log p(chosen | prompt) and log p(rejected | prompt) of every pair
        (`gpt.objectives.dpo.cache_reference`); NaN until it has run."""

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> PairItem:
        (chosen_in, chosen_target), (rejected_in, rejected_target) = self.examples[i]
        return (torch.tensor(chosen_in), torch.tensor(chosen_target), torch.tensor(rejected_in),
                torch.tensor(rejected_target), self.reference[i])

    def lengths(self) -> list[int]:
        """The longer input of every pair (what the bucketed sampler sorts by: the batch's padding).
        """
        return [max(len(chosen[0]), len(rejected[0])) for chosen, rejected in self.examples]


def pair_collate(batch: Sequence[PairItem]) -> tuple[Tensor, Tensor, Tensor]:
    """(inputs, targets, reference) of B pairs: inputs and targets (2B, longest) padded as by
    `pad_collate`, the B chosen responses in rows 0..B-1 and the rejected ones in rows B..2B-1, and
    reference (2B,) the reference model's log-probability of each row's response."""
    rows = [(item[0], item[1]) for item in batch] + [(item[2], item[3]) for item in batch]
    inputs, targets = pad_collate(rows)
    # (B, 2) -> chosen..., rejected...
    reference = torch.stack([item[4] for item in batch]).t().flatten()
    return inputs, targets, reference
