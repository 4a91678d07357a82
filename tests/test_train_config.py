"""Training settings: checked on construction, named as their flags, read from TOML and old runs."""

import dataclasses

import pytest

from gpt.base.errors import UserError
from gpt.model.config import ConfigError
from gpt.training.flags import build_parser, field_docs, read_toml
from gpt.training.settings import RENAMED, TrainConfig, current_names


@pytest.mark.parametrize(("overrides", "message"), [
    ({"batch_size": 0}, "--batch-size must be at least 1, got 0"),
    ({"lr": 0.0}, "--lr must be a positive number"),
    ({"lr": -1e-3}, "--lr must be a positive number"),
    ({"min_lr": 1.0}, "--min-lr must be between 0 and --lr"),
    ({"preset": "huge"}, "--preset must be one of gpt2-small, .*mini"),
    ({"dtype": "int8"}, "--dtype must be auto or one of"),
    ({"batch_size": "8"}, "--batch-size must be int, got '8'"),
    ({"compile": 1}, "--compile must be bool"),
    ({"val_fraction": 1.5}, "--val-fraction must be between 0 and 1"),
    ({"decode_errors": "ignore"}, "--decode-errors must be one of strict, replace, got 'ignore'"),
])
def test_bad_settings_are_refused_naming_the_flag(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        TrainConfig(**overrides)


def test_config_from_dict_refuses_unknown_keys_and_takes_ints_as_floats() -> None:
    with pytest.raises(ConfigError, match="unknown setting"):
        TrainConfig.from_dict({"batchsize": 4})
    assert TrainConfig.from_dict({"lr": 1}).lr == 1




def test_old_setting_names_are_read_as_the_new_ones() -> None:
    """A train_config.json or TOML file written before `errors` became `decode_errors` still loads.
    """
    assert RENAMED == {"errors": "decode_errors"}
    assert TrainConfig.from_dict({"errors": "replace"}).decode_errors == "replace"
    assert current_names({"errors": "replace", "lr": 1.0}) == {"decode_errors": "replace",
                                                               "lr": 1.0}
    with pytest.raises(ConfigError, match="errors and decode_errors are the same setting"):
        current_names({"errors": "replace", "decode_errors": "strict"})


def test_toml_files_use_the_flag_names_with_either_separator_and_old_names(tmp_path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('batch-size = 3\nlog_scale = true\nerrors = "replace"\n')
    assert read_toml(path) == {"batch_size": 3, "log_scale": True, "decode_errors": "replace"}
    with pytest.raises(UserError, match=f"cannot read --config {tmp_path / 'none.toml'}"):
        read_toml(tmp_path / "none.toml")


def test_every_setting_is_a_documented_flag_and_the_old_flag_is_an_alias() -> None:
    docs = field_docs(TrainConfig)
    assert list(docs) == [f.name for f in dataclasses.fields(TrainConfig)]
    assert docs["lr"] == "Peak learning rate, reached at the end of the warm-up."
    parser = build_parser()
    assert vars(parser.parse_args(["--errors", "replace"])) == {"decode_errors": "replace"}
    assert vars(parser.parse_args(["--decode-errors", "replace", "--no-compile"])) == {
        "decode_errors": "replace", "compile": False}
    assert vars(parser.parse_args([])) == {}  # no defaults: only the flags given override
    with pytest.raises(UserError, match=r"argument --lr: invalid float value: 'fast'; see python "
                                        r"train\.py"):
        parser.parse_args(["--lr", "fast"])

