"""`gpt.load_model`: the commands' loader for Python: a run, GPT-2 weights or the latest run."""

from pathlib import Path

import pytest
import torch
from transformers import GPT2LMHeadModel

import gpt
from gpt.base.atomic import atomic_directory
from gpt.checkpoints.checkpoint import save_model
from gpt.model.config import GPTConfig
from gpt.model.model import GPT

CFG = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.1,
                qkv_bias=True)
IDS = torch.tensor([[3, 14, 15, 92, 65, 35]])


def saved_run(run_dir: Path) -> GPT:
    """A run directory whose best/ holds a random model (returned)."""
    model = GPT(CFG)
    with atomic_directory(run_dir / "best") as tmp:
        save_model(model, tmp)
    return model


def test_a_run_loads_in_eval_mode_with_its_weights_in_the_dtype_asked(tmp_path: Path) -> None:
    saved = saved_run(tmp_path / "run")
    loaded = gpt.load_model(tmp_path / "run")
    assert not loaded.training  # dropout 0.1 would make two calls differ
    assert torch.equal(loaded(IDS), saved.eval()(IDS))
    half = gpt.load_model(str(tmp_path / "run"), device="cpu", dtype="bfloat16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert torch.equal(half.tok_emb.weight, saved.tok_emb.weight.to(torch.bfloat16))


def test_hugging_face_weights_give_transformers_logits(tmp_path: Path) -> None:
    gpt.save_hf(saved_run(tmp_path / "run"), tmp_path / "hf")
    reference = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        expected = reference(IDS).logits
        assert torch.allclose(gpt.load_model(tmp_path / "hf")(IDS), expected, atol=1e-5)


def test_none_is_the_latest_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    saved_run(tmp_path / "runs" / "old")
    newest = saved_run(tmp_path / "runs" / "new")
    monkeypatch.chdir(tmp_path)
    assert torch.equal(gpt.load_model().tok_emb.weight, newest.tok_emb.weight)


@pytest.mark.parametrize(("source", "dtype", "message"), [
    ("nowhere", "float32", "'nowhere' is neither a file or directory nor a known model"),
    ("run", "float64", "dtype must be auto or one of float32, bfloat16, float16"),
])
def test_bad_arguments_are_one_line_user_errors(tmp_path: Path, source: str, dtype: str,
                                                message: str) -> None:
    saved_run(tmp_path / "run")
    with pytest.raises(gpt.UserError, match=message):
        gpt.load_model(tmp_path / source if source == "run" else source, dtype=dtype)
