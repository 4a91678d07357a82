"""Checkpoint directories: the round trip, the one loader's checks, run-directory lookup, train
state."""

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gpt.base.atomic import atomic_directory
from gpt.base.errors import UserError
from gpt.checkpoints.checkpoint import (
    TRAIN_STATE_FILE,
    TRAIN_STATE_FORMAT,
    find_model_checkpoint,
    load_checkpoint,
    load_train_state,
    model_from_state_dict,
    require_model_checkpoint,
    save_checkpoint,
    save_model,
    stored_shapes,
)
from gpt.checkpoints.weights import load_pretrained
from gpt.cli.train import main as train_main
from gpt.model.config import ConfigError, GPTConfig
from gpt.model.model import GPT


@pytest.mark.parametrize("tied", [True, False])
def test_model_round_trip(tmp_path, tied: bool) -> None:
    model = GPT(GPTConfig.preset("tiny", tie_embeddings=tied))
    with atomic_directory(tmp_path / "best") as directory:
        save_model(model, directory)
    loaded = load_checkpoint(tmp_path / "best")
    assert loaded.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name
    assert (loaded.lm_head.weight is loaded.tok_emb.weight) == tied


def test_tied_head_is_stored_once_and_is_the_embedding_again_after_loading(tmp_path: Path) -> None:
    model = GPT(GPTConfig.preset("tiny"))
    save_model(model, tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in stored and set(stored) == set(model.state_dict()) - {"lm_head.weight"}  # noqa: E501
    assert {k: tuple(v.shape) for k, v in stored.items()} == stored_shapes(model.config)
    loaded = load_checkpoint(tmp_path).train()
    assert loaded.lm_head.weight is loaded.tok_emb.weight
    # the head is no extra one
    assert len(list(loaded.parameters())) == len(list(model.parameters()))
    optimizer = torch.optim.SGD(loaded.parameters(), lr=1.0)
    loaded(torch.randint(0, 100, (1, 8))).sum().backward()
    optimizer.step()  # one update, seen through both names
    assert torch.equal(loaded.lm_head.weight, loaded.tok_emb.weight)
    assert not torch.equal(loaded.tok_emb.weight, model.tok_emb.weight)


def test_overrides_replace_config_fields_and_unknown_ones_are_refused(tmp_path: Path) -> None:
    model = GPT(GPTConfig.preset("tiny"))
    save_model(model, tmp_path)
    assert load_checkpoint(tmp_path, drop_rate=0.0).config == model.config.replace(drop_rate=0.0)
    with pytest.raises(ConfigError, match="unknown GPTConfig field"):
        load_checkpoint(tmp_path, dropout=0.0)


def mismatched_checkpoint(run: Path) -> Path:
    """A run whose best/ has the weights of 2 layers and a config.json saying 1."""
    (run / "best").mkdir(parents=True)
    save_model(GPT(GPTConfig.preset("tiny")), run / "best")
    config = json.loads((run / "best" / "config.json").read_text())
    (run / "best" / "config.json").write_text(json.dumps({**config, "n_layers": 1}))
    return run / "best"


def test_a_mismatched_checkpoint_is_refused_the_same_way_by_resume_and_init(tmp_path: Path,
                                                                           run_command) -> None:
    """`--resume` loads with `load_checkpoint`, `--init` (and `load_pretrained`) go through it: one
    check, one message, naming the file and what does not match."""
    best = mismatched_checkpoint(tmp_path / "run")
    with pytest.raises(UserError) as resumed:
        load_checkpoint(best)
    message = str(resumed.value)
    assert message.startswith(f"{best / 'model.safetensors'} does not match its config "
                              f"(n_layers=1, ")
    assert "unexpected ['blocks.1.attn.proj.bias', " in message and "\n" not in message
    for path in (tmp_path / "run", best):
        with pytest.raises(UserError) as loaded:
            load_pretrained(path)
        assert str(loaded.value) == message
    # train.py --init, its `main` (test_train_cli.py runs the script itself as a process).
    init = run_command(train_main, ["--init", str(tmp_path / "run"), "--out",
                                    str(tmp_path / "runs"),
                                    "--device", "cpu"])
    assert init.one_line_error() == f"error: {message}"


def test_a_tensor_of_the_wrong_shape_is_named(tmp_path: Path) -> None:
    state = dict(GPT(GPTConfig.preset("tiny")).state_dict())
    del state["lm_head.weight"]
    state["pos_emb.weight"] = state["pos_emb.weight"][:64]
    with pytest.raises(UserError, match=r"^somewhere: tensor 'pos_emb.weight' has shape \(64, "
                                        r"64\), its config implies \(128, 64\)"):
        model_from_state_dict(GPTConfig.preset("tiny"), state, "somewhere")


def test_failed_write_keeps_the_previous_checkpoint(tmp_path) -> None:
    model = GPT(GPTConfig.preset("tiny"))
    with atomic_directory(tmp_path / "last") as directory:
        save_model(model, directory)
    with pytest.raises(KeyboardInterrupt), atomic_directory(tmp_path / "last") as directory:
        (directory / "model.safetensors").write_bytes(b"half a fi")
        raise KeyboardInterrupt
    assert torch.equal(load_checkpoint(tmp_path / "last").tok_emb.weight, model.tok_emb.weight)
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


def test_require_model_checkpoint_says_what_the_path_should_be(tmp_path: Path) -> None:
    save_model(GPT(GPTConfig.preset("tiny")), (tmp_path / "run" / "last").mkdir(parents=True) or
               tmp_path / "run" / "last")
    assert require_model_checkpoint(tmp_path / "run") == tmp_path / "run" / "last"
    with pytest.raises(UserError) as info:
        require_model_checkpoint(tmp_path / "nowhere", "--checkpoint")
    assert str(info.value) == (f"--checkpoint {tmp_path / 'nowhere'} is neither a checkpoint "
                               f"directory (with "
                               "model.safetensors) nor a run directory (with best/ or last/); pass "
                               "e.g. runs/<run-name>")


def test_truncated_weights_are_reported(tmp_path) -> None:
    model = GPT(GPTConfig.preset("tiny"))
    save_model(model, tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or not safetensors"):
        load_checkpoint(tmp_path)


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
    assert torch.equal(load_checkpoint(tmp_path / "last").tok_emb.weight, model.tok_emb.weight)


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


def test_checkpoint_files_get_the_permissions_of_ordinary_files(tmp_path: Path) -> None:
    """safetensors creates its file readable by its owner only; a checkpoint is shared like any file
    the user writes: 0o666 less the umask, as `open` gives (the umask read here independently)."""
    umask = os.umask(0)
    os.umask(umask)
    save_checkpoint(GPT(GPTConfig.preset("tiny")), {"step": 1}, tmp_path / "ckpt")
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in (tmp_path / "ckpt").iterdir()}
    assert "model.safetensors" in modes and TRAIN_STATE_FILE in modes
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)
