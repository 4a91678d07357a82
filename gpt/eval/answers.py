"""Answer accuracy of a fine-tuned model: greedy answers to validation prompts, compared with the
references.

`answer` decodes greedily from a templated prompt until end-of-text; `val_exact_match` is the share
of validation records whose answer equals the reference once whitespace is normalised (runs of
spaces and newlines read as one space, none at either end): the `val_exact_match` column of a
fine-tuning run's metrics.csv.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gpt.base.device import autocast
from gpt.data.records import Record, format_prompt
from gpt.model.model import GPT
from gpt.model.sampling import generate
from gpt.model.tokenizer import ENDOFTEXT_ID, get_tokenizer


def answer(model: GPT, prompt_text: str, max_new_tokens: int, *,
           dtype: torch.dtype = torch.float32) -> str:
    """The greedy continuation of `prompt_text` (already templated) up to end-of-text, as text.

    The prompt keeps its last tokens when it is too long, leaving room for `max_new_tokens` (at most
    the model's context less one).
    """
    tokenizer = get_tokenizer()
    context = model.config.context_length
    max_new_tokens = min(max_new_tokens, context - 1)
    ids = tokenizer.encode(prompt_text, disallowed_special=())[-(context - max_new_tokens):]
    device = model.tok_emb.weight.device
    idx = torch.tensor([ids], device=device)
    with autocast(device, dtype):
        out = generate(model, idx, max_new_tokens, eos_id=ENDOFTEXT_ID)[0, len(ids):].tolist()
    if ENDOFTEXT_ID in out:
        out = out[:out.index(ENDOFTEXT_ID)]
    return tokenizer.decode(out)


def sample_answer(model: GPT, record: Record, template: str, max_new_tokens: int, *,
                  dtype: torch.dtype) -> str:
    """"<the record's prompt> -> <the model's answer>": the sample a fine-tuning run prints (of its
    first validation record)."""
    prompt = format_prompt(template, record.prompt, record.input)
    given = answer(model, prompt, max_new_tokens, dtype=dtype)
    return f"{record.prompt} -> {given}"


def normalise(text: str) -> str:
    """`text` with every run of whitespace as one space and none at the ends."""
    return " ".join(text.split())


def val_exact_match(model: GPT, records: Sequence[Record], template: str, *, limit: int,
                    dtype: torch.dtype = torch.float32) -> float:
    """Share of the first `limit` `records` whose greedy answer equals their response
    (whitespace-normalised).

    Each answer may run a few tokens past its reference's length: enough to see whether the model
    stops where the reference does, not more (a longer answer is wrong anyway).
    """
    tokenizer = get_tokenizer()
    chosen = records[:limit]
    right = 0
    for record in chosen:
        room = len(tokenizer.encode(record.response, disallowed_special=())) + 4
        given = answer(model, format_prompt(template, record.prompt, record.input), room,
                       dtype=dtype)
        right += normalise(given) == normalise(record.response)
    return right / len(chosen)
