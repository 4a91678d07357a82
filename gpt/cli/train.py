"""The `train.py` command: its command line parsed (settings from four sources), then a run trained.

`build_parser` (in `gpt.training.flags`, made from the settings it turns into flags) holds its
flags and `main(argv)` runs it. `train.py` at the repository root and `python -m gpt train` only
call `main`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpt.base.errors import run_cli
from gpt.training.flags import build_parser, read_toml
from gpt.training.resume import resume_config
from gpt.training.settings import TrainConfig
from gpt.training.trainer import train


def parse_args(argv: Sequence[str]) -> tuple[TrainConfig, Path | None]:
    """(settings, run to resume or None) from `train.py`'s command line.

    Later sources win: defaults < the resumed run's settings < the --config file < the flags given.
    """
    given = vars(build_parser().parse_args(argv))
    config_file, resume = given.pop("config", None), given.pop("resume", None)
    values: dict[str, Any] = {}
    if resume is not None:
        values.update(resume_config(resume))
    if config_file is not None:
        values.update(read_toml(config_file))
    values.update(given)
    return TrainConfig.from_dict(values), resume


def main(argv: Sequence[str] | None = None) -> None:
    """`python train.py ...`: parse, train; exit status 130 after Ctrl-C (with last/ saved)."""
    cfg, resume = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        result = train(cfg, resume=resume)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the loop started
        print("interrupted; nothing was saved after the last checkpoint", file=sys.stderr)
        raise SystemExit(130) from None
    if result.stop_reason == "interrupted":
        raise SystemExit(130)


def cli() -> None:
    """The console-script entry point: `main`, with bad input turned into one `error: ...` line and
    exit status 2 (`gpt.base.errors.run_cli`)."""
    run_cli(main)


if __name__ == "__main__":
    run_cli(main)
