"""Frozen second models: the teacher of knowledge distillation, loaded from a name or a path.

Distillation (`gpt.objectives.lm.Objective` with a teacher) compares the teacher's and the student's
distributions over the next token, token id by token id, so both must share one vocabulary (the same
tokenizer); their sizes may differ. The teacher only ever runs forward: eval mode (no dropout), no
gradients, so it costs one forward pass per step and no optimizer state. `load_frozen` loads any
such model (DPO's and GRPO's references, `gpt.objectives.dpo` and `gpt.objectives.grpo`, are
others). A model with LoRA adapters carries its frozen base already: `base_is_reference` says when
that base serves as the reference, under `as_base` (adapters off, eval mode), instead of a second
copy of the same weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from gpt.base.device import eval_mode
from gpt.base.errors import UserError
from gpt.checkpoints.weights import load_pretrained
from gpt.model.config import GPTConfig
from gpt.model.lora import adapters_off, has_lora
from gpt.model.model import GPT


def load_frozen(name_or_path: str, flag: str, device: str | torch.device = "cpu",
                **overrides: Any) -> GPT:
    """`name_or_path` (anything `load_pretrained` reads: gpt2, a Hugging Face directory, a run or
    checkpoint directory) on `device`, in eval mode and without gradients; a `UserError` names the
    `flag` that gave it. `overrides` replace fields of its config, as for `load_pretrained`."""
    try:
        # Building a model draws its random init from torch's generator: forked, so the trained
        # model's run (its dropout) draws the same numbers with a frozen model as without.
        with torch.random.fork_rng(devices=[]):
            model = load_pretrained(name_or_path, **overrides)
    except UserError as exc:
        raise UserError(f"{flag} {name_or_path}: {exc}") from None
    return model.to(device).eval().requires_grad_(False)


def base_is_reference(model: GPT, reference: str | None) -> bool:
    """Whether `model`'s own base is the reference of DPO or GRPO: it has LoRA adapters, and
    --reference (`reference`) names no other model. Its base is then the --init weights the
    reference would be loaded from, frozen already."""
    return has_lora(model) and reference is None


@contextlib.contextmanager
def as_base(model: GPT) -> Iterator[GPT]:
    """`model` with its adapters switched off and in eval mode for the block: the frozen base,
    as a reference runs. A model without adapters is only put in eval mode."""
    with adapters_off(model), eval_mode(model):
        yield model


def load_teacher(name_or_path: str, student: GPTConfig, context_length: int,
                 device: str | torch.device = "cpu") -> GPT:
    """The `--teacher` model on `device`, frozen, after checking that it can teach `student`.

    `name_or_path` is anything `load_pretrained` reads. It must have the student's `vocab_size` and
    read windows of `context_length` tokens (the training windows' length).
    """
    teacher = load_frozen(name_or_path, "--teacher", device)
    if teacher.config.vocab_size != student.vocab_size:
        raise UserError(f"--teacher {name_or_path} predicts {teacher.config.vocab_size} token ids "
                        f"and the student {student.vocab_size}; distillation compares them id by "
                        f"id, so choose a "
                        "teacher trained with the student's tokenizer")
    if teacher.config.context_length < context_length:
        raise UserError(f"--teacher {name_or_path} reads at most {teacher.config.context_length} "
                        f"tokens, the training windows are {context_length}; use --context-length "
                        f"{teacher.config.context_length}")
    return teacher
