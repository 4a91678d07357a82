"""The teacher of knowledge distillation: any GPT with the student's vocabulary, loaded frozen.

Distillation (`gpt.loss.Objective` with a teacher) compares the teacher's and the student's
distributions over the next token, token id by token id, so both must share one vocabulary (the same
tokenizer); their sizes may differ. The teacher only ever runs forward: eval mode (no dropout), no
gradients, so it costs one forward pass per step and no optimizer state.
"""

from __future__ import annotations

import torch

from gpt.config import GPTConfig
from gpt.errors import UserError
from gpt.model import GPT
from gpt.weights import load_pretrained


def load_teacher(name_or_path: str, student: GPTConfig, context_length: int,
                 device: str | torch.device = "cpu") -> GPT:
    """The `--teacher` model on `device`, frozen, after checking that it can teach `student`.

    `name_or_path` is anything `load_pretrained` reads (gpt2, a Hugging Face directory, a run or
    checkpoint directory). It must have the student's `vocab_size` and read windows of
    `context_length` tokens (the training windows' length).
    """
    try:
        teacher = load_pretrained(name_or_path)
    except UserError as exc:
        raise UserError(f"--teacher {name_or_path}: {exc}") from None
    if teacher.config.vocab_size != student.vocab_size:
        raise UserError(f"--teacher {name_or_path} predicts {teacher.config.vocab_size} token ids and the "
                        f"student {student.vocab_size}; distillation compares them id by id, so choose a "
                        "teacher trained with the student's tokenizer")
    if teacher.config.context_length < context_length:
        raise UserError(f"--teacher {name_or_path} reads at most {teacher.config.context_length} tokens, "
                        f"the training windows are {context_length}; use --context-length "
                        f"{teacher.config.context_length}")
    return teacher.to(device).eval().requires_grad_(False)
