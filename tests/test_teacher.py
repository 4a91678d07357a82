"""The distillation teacher: loaded frozen from any weights, refused when it cannot teach the
student."""

from pathlib import Path

import pytest
import torch

from gpt.base.atomic import atomic_directory
from gpt.base.errors import UserError
from gpt.checkpoints.checkpoint import save_model
from gpt.checkpoints.weights import save_hf
from gpt.model.config import GPTConfig
from gpt.model.model import GPT
from gpt.objectives.teacher import load_teacher

STUDENT = GPTConfig(vocab_size=101, context_length=16, emb_dim=32, n_heads=2, n_layers=1,
                    drop_rate=0.1)


def saved(model: GPT, directory: Path) -> Path:
    with atomic_directory(directory) as tmp:
        save_model(model, tmp)
    return directory


@pytest.mark.parametrize("layout", ["run", "hf"])
def test_a_bigger_teacher_loads_frozen_in_eval_mode_with_its_logits(tmp_path: Path,
                                                                    layout: str) -> None:
    model = GPT(STUDENT.replace(emb_dim=64, n_layers=2, context_length=32)).eval()
    if layout == "run":
        saved(model, tmp_path / "run" / "best")
        path = tmp_path / "run"
    else:
        save_hf(model, tmp_path / "hf")
        path = tmp_path / "hf"
    teacher = load_teacher(str(path), STUDENT, context_length=16)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    idx = torch.randint(0, 101, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(teacher(idx), model(idx))


def test_a_teacher_with_another_vocabulary_is_refused(tmp_path: Path) -> None:
    path = saved(GPT(STUDENT.replace(vocab_size=50257)), tmp_path / "big-vocab")
    with pytest.raises(UserError, match=r"--teacher .*big-vocab predicts 50257 token ids and the "
                                        r"student 101; distillation compares them id by id"):
        load_teacher(str(path), STUDENT, context_length=16)


def test_a_teacher_with_a_shorter_context_is_refused(tmp_path: Path) -> None:
    path = saved(GPT(STUDENT.replace(context_length=8)), tmp_path / "short")
    with pytest.raises(UserError, match=r"reads at most 8 tokens, the training windows are 16; use "
                                        r"--context-length 8$"):
        load_teacher(str(path), STUDENT, context_length=16)


def test_a_missing_teacher_is_named(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"^--teacher nowhere: 'nowhere' is neither a file or "
                                        r"directory"):
        load_teacher("nowhere", STUDENT, context_length=16)
