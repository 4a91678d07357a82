"""The optimizer: AdamW with weight decay on matrices only, and the learning-rate schedule `lr_at`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then cosine decay to
    `min_lr`.

        step < warmup_steps:   lr * (step + 1) / warmup_steps
        then, until total:     min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2,
                               p = (step - warmup_steps) / (total_steps - warmup_steps)
        step >= total_steps:   min_lr
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: weight decay on every matrix (>= 2-D), none on vectors.

    Vectors are biases and LayerNorm gains/shifts: decaying them pulls shifts and scales towards 0,
    which only hurts. The embedding tables are matrices and *do* decay, as in GPT-2 and nanoGPT:
    with tied embeddings the token embedding is also the output layer's weight, the largest matrix
    of a small model; the position embedding follows the same rule. A tied tensor is listed once.
    """
    # parameters() yields shared ones once
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float],
                    ) -> torch.optim.AdamW:
    """AdamW over `param_groups` with `betas` (`TrainConfig.adam_betas`), with the fused kernel.

    The fused kernel updates each tensor in one pass instead of one pass per arithmetic operation:
    much faster than the default loop on a CPU (see BENCHMARKS.md). torch (>= 2.6, pyproject.toml)
    has it on every device `gpt.base.device.pick_device` returns: cpu, cuda and mps.
    """
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, fused=True)
