import pytest
import torch

from gpt.checkpoint import atomic_directory, load_model, save_model
from gpt.config import GPTConfig
from gpt.errors import UserError
from gpt.model import GPT


@pytest.mark.parametrize("tied", [True, False])
def test_model_round_trip(tmp_path, tied: bool) -> None:
    model = GPT(GPTConfig.preset("tiny", tie_embeddings=tied))
    with atomic_directory(tmp_path / "best") as directory:
        save_model(model, directory)
    loaded = load_model(tmp_path / "best")
    assert loaded.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert (loaded.lm_head.weight is loaded.tok_emb.weight) == tied


def test_failed_write_keeps_the_previous_checkpoint(tmp_path) -> None:
    model = GPT(GPTConfig.preset("tiny"))
    with atomic_directory(tmp_path / "last") as directory:
        save_model(model, directory)
    with pytest.raises(KeyboardInterrupt), atomic_directory(tmp_path / "last") as directory:
        (directory / "model.safetensors").write_bytes(b"half a fi")
        raise KeyboardInterrupt
    assert torch.equal(load_model(tmp_path / "last").tok_emb.weight, model.tok_emb.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_truncated_weights_are_reported(tmp_path) -> None:
    model = GPT(GPTConfig.preset("tiny"))
    save_model(model, tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or not safetensors"):
        load_model(tmp_path)
