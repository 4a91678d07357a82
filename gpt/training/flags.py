"""`train.py`'s flags and TOML files: both made from `TrainConfig`'s fields.

`build_parser` turns each field of `gpt.training.settings.TrainConfig` into a flag (`batch_size` ->
`--batch-size`) whose `--help` is the docstring under the field (`field_docs`); `read_toml` reads a
`--config` file of the same names.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import sys
import textwrap
from pathlib import Path
from typing import Any, cast, get_args, get_origin, get_type_hints

from gpt.base.errors import ArgumentParser, UserError, command_name
from gpt.training.settings import RENAMED, TrainConfig, current_names, flag

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass `cls` (Python keeps none at runtime: read the
    source)."""
    body = cast(ast.ClassDef, ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]).body
    docs = {}
    for node, doc in itertools.pairwise(body):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)):
            docs[node.target.id] = " ".join(str(doc.value.value).split())
    return docs


def build_parser() -> ArgumentParser:
    """`train.py`'s flags: --config, --resume, and one per `TrainConfig` field, documented by it.

    No flag has a default here (argparse.SUPPRESS), so the parsed namespace holds only the flags
    actually given: they override a --config file, which overrides a resumed run's settings. An old
    name of a setting (`RENAMED`) is a second spelling of its flag.
    """
    parser = ArgumentParser(
        prog=command_name("train.py"), argument_default=argparse.SUPPRESS,
        description="Pretrain a GPT. With no flags: the mini model on the built-in corpus, a few "
                    "minutes "
                    "on a laptop CPU; results in runs/<start time>/.")
    parser.add_argument("--config", type=Path, metavar="FILE.toml",
                        help="read settings from a TOML file, keys named as the flags (batch_size "
                             "= 8); "
                             "flags given on the command line win")
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR",
                        help="continue the run in RUN_DIR (runs/NAME) exactly where its last/ "
                             "checkpoint "
                             "was taken (or give RUN_DIR/best); its settings are reused, and flags "
                             "that "
                             "do not change the model or data (--epochs, --lr, ...) override them")
    hints, docs = get_type_hints(TrainConfig), field_docs(TrainConfig)
    old_names = {new: old for old, new in RENAMED.items()}
    for f in dataclasses.fields(TrainConfig):
        kind = next(t for t in get_args(hints[f.name]) or (hints[f.name],) if t is not type(None))
        help_text = docs[f.name].replace("%", "%%") + ("" if f.default in (None, ()) else f" "
                                                                                          f"[{f.default}]")
        flags = [flag(f.name)] + ([flag(old_names[f.name])] if f.name in old_names else [])
        if get_origin(hints[f.name]) is tuple:  # repeatable: each use adds one value
            parser.add_argument(*flags, action="append", metavar="TEXT", help=help_text)
        elif kind is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            metavar = {int: "N", float: "X", str: "TEXT"}[kind]
            parser.add_argument(*flags, type=kind, metavar=metavar, help=help_text)
    return parser


def read_toml(path: Path) -> dict[str, Any]:
    """The settings in a TOML file, keys as field names (`batch-size` is read as `batch_size`, an
    old name as the current one)."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise UserError(f"cannot read --config {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:  # TOML is UTF-8, comments included
        raise UserError(f"--config {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at "
                        f"offset "
                        f"{exc.start}); save it as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"--config {path} is not valid TOML: {exc}") from None
    return current_names({key.replace("-", "_"): value for key, value in data.items()})
