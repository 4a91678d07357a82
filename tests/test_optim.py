"""The optimizer's pieces: the learning-rate schedule against its formula, the weight-decay groups.
"""

import itertools

import numpy as np
import pytest

from gpt.model.config import GPTConfig
from gpt.model.model import GPT
from gpt.training.optim import lr_at, param_groups


def test_lr_schedule_follows_the_formula() -> None:
    lr, min_lr, warmup, total = 1e-3, 1e-4, 10, 110
    at = [lr_at(s, lr=lr, min_lr=min_lr, warmup_steps=warmup, total_steps=total)
          for s in range(130)]
    assert at[0] == pytest.approx(lr / 10) and at[4] == pytest.approx(lr / 2)  # linear warm-up
    assert at[9] == pytest.approx(lr) and at[10] == pytest.approx(lr)  # the peak
    assert at[60] == pytest.approx((lr + min_lr) / 2)  # half-way down the cosine
    for step in range(10, 110):
        expected = min_lr + (lr - min_lr) * (1 + np.cos(np.pi * (step - 10) / 100)) / 2
        assert at[step] == pytest.approx(expected, rel=1e-12)
    assert all(a >= b for a, b in itertools.pairwise(at[10:]))  # never rises after the peak
    assert at[110:] == [min_lr] * 20  # the floor
    assert lr_at(0, lr=lr, min_lr=min_lr, warmup_steps=0, total_steps=total) == pytest.approx(lr)


def test_weight_decay_applies_to_exactly_the_matrices() -> None:
    model = GPT(GPTConfig.preset("tiny"))  # 2 blocks, tied head
    decay, no_decay = param_groups(model, weight_decay=0.1)
    names = {id(p): name for name, p in model.named_parameters()}
    matrices = ["tok_emb.weight", "pos_emb.weight"] + [
        f"blocks.{i}.{m}.weight" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc",
                                                             "mlp.proj")]
    assert sorted(names[id(p)] for p in decay["params"]) == sorted(matrices)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    vectors = sorted(names[id(p)] for p in no_decay["params"])
    assert all(n.endswith(".bias") or "norm" in n for n in vectors)
    # Every parameter exactly once; the tied LM head is the token embedding, not a second entry.
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert model.lm_head.weight is model.tok_emb.weight


