from pathlib import Path

import pytest
import torch

from gpt.atomic import atomic_directory
from gpt.checkpoint import (
    TRAIN_STATE_FILE,
    TRAIN_STATE_FORMAT,
    find_model_checkpoint,
    load_model,
    load_train_state,
    save_checkpoint,
    save_model,
)
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


def test_find_model_checkpoint_prefers_best_then_last(tmp_path: Path) -> None:
    model = GPT(GPTConfig.preset("tiny"))
    run = tmp_path / "run"
    assert find_model_checkpoint(run) is None
    save_model(model, (run / "last").mkdir(parents=True) or run / "last")
    assert find_model_checkpoint(run) == run / "last"  # stopped before its first evaluation
    save_model(model, (run / "best").mkdir() or run / "best")
    assert find_model_checkpoint(run) == run / "best"
    assert find_model_checkpoint(run / "last") == run / "last"  # a checkpoint is itself
    (run / "best").rename(run / ".best.old")  # killed between the two renames of a replace
    assert find_model_checkpoint(run) == run / ".best.old"


def test_truncated_weights_are_reported(tmp_path) -> None:
    model = GPT(GPTConfig.preset("tiny"))
    save_model(model, tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or not safetensors"):
        load_model(tmp_path)


def test_training_checkpoint_round_trip_loads_weights_only(tmp_path) -> None:
    model = GPT(GPTConfig.preset("tiny"))
    state = {"step": 7, "best": float("inf"), "rng": (3, tuple(range(625)), None),
             "moments": {"m": torch.arange(5.0)}, "config": {"lr": 1e-3, "run_name": None}}
    save_checkpoint(model, state, tmp_path / "last")
    loaded = load_train_state(tmp_path / "last")
    assert loaded["format"] == TRAIN_STATE_FORMAT
    assert {k: loaded[k] for k in ("step", "best", "rng", "config")} == {
        k: state[k] for k in ("step", "best", "rng", "config")}
    assert torch.equal(loaded["moments"]["m"], state["moments"]["m"])
    assert torch.equal(load_model(tmp_path / "last").tok_emb.weight, model.tok_emb.weight)


def test_bad_training_states_are_reported_naming_the_file(tmp_path) -> None:
    model = GPT(GPTConfig.preset("tiny"))
    save_model(model, tmp_path)
    path = tmp_path / TRAIN_STATE_FILE
    with pytest.raises(UserError, match=f"{path} is missing"):
        load_train_state(tmp_path)

    torch.save({"format": TRAIN_STATE_FORMAT, "step": 1, "pad": torch.zeros(1000)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=f"cannot read {path} .*truncated"):
        load_train_state(tmp_path)
    path.write_bytes(b"")
    with pytest.raises(UserError, match="truncated"):
        load_train_state(tmp_path)

    torch.save({"format": TRAIN_STATE_FORMAT, "payload": Path("/etc")}, path)  # an arbitrary object
    with pytest.raises(UserError, match="refused unread"):
        load_train_state(tmp_path)

    torch.save({"format": 99}, path)
    with pytest.raises(UserError, match="not a training state of format 1"):
        load_train_state(tmp_path)
