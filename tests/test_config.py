import json
from pathlib import Path

import pytest
import torch

from gpt.model.config import (
    PRESETS,
    ConfigError,
    GPTConfig,
    check_known_fields,
    preset_names,
    read_json_object,
)
from gpt.model.model import GPT


def test_defaults_are_gpt2_small() -> None:
    assert GPTConfig() == GPTConfig.preset("gpt2-small") == GPTConfig.preset("gpt2")


@pytest.mark.parametrize(
    ("name", "millions"),
    [("gpt2-small", 124), ("gpt2-medium", 355), ("gpt2-large", 774), ("gpt2-xl", 1558)],
)
def test_gpt2_presets_have_the_published_sizes(name: str, millions: int) -> None:
    with torch.device("meta"):  # shapes only, no memory
        model = GPT(GPTConfig.preset(name))
    assert round(model.num_parameters() / 1e6) == millions


def test_unknown_preset_lists_the_names() -> None:
    with pytest.raises(ConfigError) as err:
        GPTConfig.preset("gpt5")
    for name in preset_names():
        assert name in str(err.value)


def test_preset_overrides_are_checked() -> None:
    assert GPTConfig.preset("mini", n_layers=2).n_layers == 2
    with pytest.raises(ValueError, match="divisible by n_heads"):
        GPTConfig.preset("mini", n_heads=3)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"emb_dim": 100, "n_heads": 3}, "emb_dim \\(100\\) must be divisible by n_heads \\(3\\)"),
        ({"n_layers": 0}, "n_layers must be a positive integer"),
        ({"vocab_size": -5}, "vocab_size must be a positive integer"),
        ({"context_length": 2.5}, "context_length must be a positive integer"),
        ({"drop_rate": 1.0}, "drop_rate must be in \\[0, 1\\)"),
        ({"layer_norm_eps": 0.0}, "layer_norm_eps must be > 0"),
    ],
)
def test_invalid_fields_raise_value_error(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GPTConfig(**fields)


def test_json_round_trip(tmp_path) -> None:
    cfg = GPTConfig.preset("tiny", drop_rate=0.0)
    cfg.save(tmp_path / "config.json")
    assert GPTConfig.load(tmp_path / "config.json") == cfg


def test_from_dict_rejects_unknown_fields() -> None:
    with pytest.raises(ConfigError, match="unknown GPTConfig field"):
        GPTConfig.from_dict({"emb_dim": 64, "n_head": 2})
    with pytest.raises(ConfigError, match=r"unknown GPTConfig field\(s\) n_head; known: "
                                          r"vocab_size, "):
        GPTConfig().replace(n_head=2)
    with pytest.raises(ConfigError, match="unknown GPTConfig field"):
        GPTConfig.preset("tiny", layers=2)


def test_check_known_fields_names_every_unknown_one_and_the_known_ones() -> None:
    # all known: no error
    check_known_fields({"lr": 1, "seed": 2}, ["lr", "seed", "epochs"], "setting")
    check_known_fields([], ["lr"], "setting")
    with pytest.raises(ConfigError) as info:
        check_known_fields({"lr": 1, "sed": 2, "batchsize": 3}, ["lr", "seed", "batch_size"],
                           "setting")
    assert str(info.value) == "unknown setting(s) batchsize, sed; known: lr, seed, batch_size"
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(("content", "message"), [
    (None, r"cannot read \S+x\.json \(FileNotFoundError: .*\); it should hold a model config$"),
    ("{\"emb_dim\": 64,", r"cannot read \S+x\.json \(JSONDecodeError: .*\); it should hold a model "
                          r"config$"),
    (b"\xff\xfe{}", r"cannot read \S+x\.json \(UnicodeDecodeError: .*\); it should hold a model "
                    r"config$"),
    ("[1, 2]", r"x\.json holds a JSON list, not an object; it should hold a model config$"),
])
def test_read_json_object_errors_are_one_line(tmp_path: Path, content: str | bytes | None,
                                              message: str) -> None:
    path = tmp_path / "x.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message) as info:
        read_json_object(path, "a model config")
    assert "\n" not in str(info.value)


def test_read_json_object_returns_the_object(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text(json.dumps({"n_embd": 16, "nested": {"a": [1]}}))
    assert read_json_object(tmp_path / "x.json", "a config") == {"n_embd": 16, "nested": {"a": [1]}}


def test_every_preset_is_valid() -> None:
    for cfg in PRESETS.values():
        assert cfg.emb_dim % cfg.n_heads == 0


def test_padded_vocab_size_rounds_up_to_the_multiple() -> None:
    assert GPTConfig().padded_vocab_size == 50257  # GPT-2's published shape: no padding
    assert GPTConfig(vocab_pad_multiple=64).padded_vocab_size == 50304
    assert GPTConfig(vocab_size=128, vocab_pad_multiple=64).padded_vocab_size == 128
    with pytest.raises(ConfigError, match="vocab_pad_multiple must be a positive integer"):
        GPTConfig(vocab_pad_multiple=0)
