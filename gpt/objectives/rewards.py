"""What GRPO (`gpt.objectives.grpo`) learns from: prompt records, and the rewards that score
completions.

A prompt record is a fine-tuning record (`gpt.data.records.KEY_SETS`) whose response, when it has
one, is the reference answer a reward may compare with: {"question": ..., "answer": ...}, {"prompt":
..., "response": ...}, or a prompt alone ({"prompt": ...}, {"question": ...}, {"instruction": ...})
for rewards that need no reference. `load_prompts` reads them.

A reward scores one completion (its text, end-of-text left out) of one record; a run's `--reward`
flags are summed (`score`). The built-in ones, by the text of the flag:

    exact            1 if the completion equals the reference answer (whitespace normalised), else 0
    contains         1 if the completion contains the reference answer (whitespace normalised)
    number           1 if the last number in the completion equals the last one in the reference
    regex:PATTERN    1 if `re.search(PATTERN, completion)` finds a match
    FILE.py:NAME     the function NAME of the Python file FILE.py, called as NAME(prompt,
                     completion,
                     record) with the record's JSON object; it returns a number

Every flag is read, every file imported and every function looked up before a run starts
(`parse_rewards`); a reward that needs references with a record that has none is refused when the
records are read (`check_references`); a reward that raises or returns something that is not a
finite number during the run ends it with one line naming the record and the reward (`score`).
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt.base.errors import UserError, describe
from gpt.data.records import KEY_SETS, Record, read_items
from gpt.eval.answers import normalise

RewardFunction = Callable[..., Any]
"""(prompt, completion, record's JSON object) -> a number; a built-in one is also given the
reference answer."""
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
"""A number as `number` reads it: digits with optional thousands commas, a sign and decimals."""
EXAMPLE = '{"question": "What is 2 + 3?", "answer": "5"}'


@dataclass(frozen=True)
class PromptRecord:
    """One prompt to sample completions for, with the reference answer a reward may use."""

    record: Record
    """The prompt (and input) to template, and the reference answer as `response` ("" if none)."""
    fields: dict[str, Any] = field(compare=False)
    """The record as read: what a FILE.py:NAME reward receives."""
    where: str = ""
    """The file and line it came from, for messages."""


def load_prompts(path: str | Path) -> list[PromptRecord]:
    """The prompt records of a `.jsonl` or `.json` file; `UserError` naming the file and line of one
    without a prompt."""
    return [_prompt_record(item, where) for where, item in read_items(path, EXAMPLE)]


def _prompt_record(item: object, where: str) -> PromptRecord:
    if isinstance(item, list) and len(item) == 2 and all(isinstance(s, str) for s in item):
        item = {"question": item[0], "answer": item[1]}
    if isinstance(item, dict):
        # A key set whose two keys are there first, then one with its prompt alone.
        for (prompt_key, response_key), kind in sorted(KEY_SETS.items(),
                                                       key=lambda s: s[0][1] not in item):
            if prompt_key in item:
                values = (item[prompt_key], item.get(response_key, ""), item.get("input", ""))
                if not all(isinstance(v, str) for v in values):
                    raise UserError(f"{where}: {prompt_key}, {response_key} and input must be "
                                    f"strings")
                if not values[0].strip():
                    raise UserError(f"{where}: the {prompt_key} is empty; every record needs a "
                                    f"prompt")
                return PromptRecord(Record(*values, kind=kind), item, where)
    keys = ", ".join(sorted({prompt for prompt, _ in KEY_SETS}))
    found = "{" + ", ".join(map(str, item)) + "}" if isinstance(item, dict) else type(item).__name__
    raise UserError(f"{where}: no prompt in this record (found {found}); a prompt record has one "
                    f"of the keys {keys}, and its reference answer if a reward needs one, e.g. "
                    f"{EXAMPLE}")


# ---- the rewards ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reward:
    """One --reward: its flag's text, its function, and whether it reads the reference answer."""

    spec: str
    function: RewardFunction
    needs_reference: bool = False


def exact(prompt: str, completion: str, record: dict[str, Any], reference: str = "") -> float:
    """1.0 if `completion` equals `reference` once whitespace is normalised, else 0.0."""
    return float(normalise(completion) == normalise(reference))


def contains(prompt: str, completion: str, record: dict[str, Any], reference: str = "") -> float:
    """1.0 if `completion` contains `reference` once whitespace is normalised, else 0.0."""
    return float(normalise(reference) in normalise(completion))


def last_number(text: str) -> float | None:
    """The last number in `text` (`NUMBER`), or None if it has none."""
    found = NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def number(prompt: str, completion: str, record: dict[str, Any], reference: str = "") -> float:
    """1.0 if the last number in `completion` equals the last one in `reference`, else 0.0 (also
    when the completion has none)."""
    given = last_number(completion)
    return float(given is not None and given == last_number(reference))


BUILT_IN = {"exact": exact, "contains": contains, "number": number}
"""The rewards that compare with the reference answer, by name."""


def parse_reward(spec: str) -> Reward:
    """The `Reward` one --reward flag names; `UserError` if it names none (a bad pattern, a missing
    file or function)."""
    if spec in BUILT_IN:
        return Reward(spec, BUILT_IN[spec], needs_reference=True)
    if spec.startswith("regex:"):
        try:
            pattern = re.compile(spec.removeprefix("regex:"))
        except re.error as exc:
            raise UserError(f"--reward {spec}: not a regular expression ({exc}); fix the pattern, "
                            f"e.g. "
                            "--reward 'regex:^[0-9]+$'") from None
        return Reward(spec, lambda prompt, completion,
                      record: float(pattern.search(completion) is not None))
    file, _, name = spec.rpartition(":")
    if file.endswith(".py") and name:
        return Reward(spec, _function(spec, Path(file), name))
    raise UserError(f"--reward {spec!r} is none of exact, contains, number, regex:PATTERN or "
                    "FILE.py:FUNCTION; e.g. --reward exact")


def _function(spec: str, path: Path, name: str) -> RewardFunction:
    """Function `name` of the Python file `path`, imported as a module of its own."""
    if not path.is_file():
        raise UserError(f"--reward {spec}: there is no file {path}; give the path of a .py file")
    module_spec = importlib.util.spec_from_file_location(f"gpt_reward_{path.stem}", path)
    if module_spec is None or module_spec.loader is None:
        raise UserError(f"--reward {spec}: {path} cannot be imported as Python")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # whatever the user's file raises on import
        raise UserError(f"--reward {spec}: importing {path} raised {describe(exc)}; fix the "
                        f"file") from None
    function = getattr(module, name, None)
    if not callable(function):
        found = "no such name" if function is None else f"a {type(function).__name__}"
        raise UserError(f"--reward {spec}: {path} has no function {name} ({found}); define "
                        f"def {name}(prompt, completion, record) -> float")
    return function  # type: ignore[no-any-return]


def parse_rewards(specs: Sequence[str]) -> list[Reward]:
    """The rewards of a run's --reward flags (at least one)."""
    if not specs:
        raise UserError("--objective grpo needs a --reward to score completions with; e.g. "
                        "--reward exact (the answer equals the record's), or --reward "
                        "'regex:PATTERN'")
    return [parse_reward(spec) for spec in specs]


def check_references(rewards: Sequence[Reward], prompts: Sequence[PromptRecord]) -> None:
    """Refuse a reward that compares with reference answers when a record has none (or, for
    `number`, a reference without a number)."""
    for reward in (r for r in rewards if r.needs_reference):
        for prompt in prompts:
            reference = prompt.record.response
            if not reference.strip():
                keys = " or ".join(f'"{answer}"' for (question, answer) in KEY_SETS
                                   if question in prompt.fields)
                raise UserError(f"{prompt.where}: no reference answer, which --reward "
                                f"{reward.spec} compares completions with; add it as {keys}, or "
                                f"use a reward that "
                                "needs none (regex:PATTERN, FILE.py:FUNCTION)")
            if reward.spec == "number" and last_number(reference) is None:
                raise UserError(f"{prompt.where}: the reference answer {reference!r} has no number "
                                f"for "
                                "--reward number to compare with; fix the record or use --reward "
                                "exact")


def score(rewards: Sequence[Reward], prompt: PromptRecord, completion: str) -> float:
    """The sum of `rewards` of one completion of `prompt`; `UserError` naming the record and the
    reward if one raises or gives something that is not a finite number."""
    total = 0.0
    record = prompt.record
    for reward in rewards:
        try:
            if reward.needs_reference:
                value = reward.function(record.prompt, completion, prompt.fields, record.response)
            else:
                value = reward.function(record.prompt, completion, dict(prompt.fields))
        except Exception as exc:  # whatever a user's function raises
            raise UserError(f"--reward {reward.spec} raised {describe(exc)} on {prompt.where} "
                            f"(completion {completion[:60]!r}); fix the function") from None
        if not isinstance(value, (int, float)) or not math.isfinite(value):  # a bool is 0 or 1
            raise UserError(f"--reward {reward.spec} returned {value!r} on {prompt.where}, not a "
                            f"finite "
                            "number; make it return a float")
        total += float(value)
    return total
