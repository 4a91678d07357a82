"""A model to run: the model flags every command shares, and the one loader behind them.

`add_model_flags` defines --checkpoint / --init, --device, --dtype (and, for decoding, --quantize)
once, with one help text, for `generate`, `evaluate` and `explain`; `load_from_flags` loads what
they name. `load_model` is the same loader for Python (`gpt.load_model`). `find_checkpoint` is where
a command finds its weights without --checkpoint (the latest run), `run_template` the prompt
template a fine-tuned run saved with them and `generation_defaults` its sampling defaults.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TextIO

import torch

from gpt.base.device import DTYPES, decoding_dtype, pick_device
from gpt.base.errors import UserError
from gpt.checkpoints.checkpoint import (
    TRAIN_STATE_FILE,
    latest_checkpoint,
    load_train_state,
    require_model_checkpoint,
)
from gpt.checkpoints.weights import cast, load_pretrained
from gpt.model.model import GPT

RUNS_DIR = Path("runs")
"""Where a command looks for the latest run when given neither --checkpoint nor --init."""


def add_model_flags(parser: argparse.ArgumentParser, *, dtype_default: str = "auto",
                    quantize: bool = False) -> None:
    """The flags that say which model a command runs, and where and how: --checkpoint or --init,
    --device, --dtype (default `dtype_default`) and, with `quantize`, --quantize."""
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--checkpoint", type=Path, metavar="RUN_DIR",
                         help="a run directory (its best/, else last/) or a checkpoint directory; "
                              f"default: the most recent run under {RUNS_DIR}/")
    weights.add_argument("--init", metavar="NAME_OR_PATH",
                         help="GPT-2 weights instead of a checkpoint: gpt2, gpt2-medium, "
                              "gpt2-large, gpt2-xl, a Hugging Face directory or file, or OpenAI's "
                              "release directory")
    parser.add_argument("--device", default="auto",
                        help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")
    parser.add_argument("--dtype", default=dtype_default, choices=["auto", *DTYPES],
                        help="the precision the model computes in: auto is bfloat16 or float16 "
                             "where they are faster (decoding, which reads every weight for each "
                             "token: on every device; scoring a text: where the hardware computes "
                             "in them), else float32; float32 gives the exact trained weights and "
                             "losses (default: %(default)s)")
    if quantize:
        parser.add_argument("--quantize", default="none", metavar="SCHEME",
                            help="weights for faster decoding: none (default), int8 (weight-only "
                                 "int8 in every linear layer, the LM head included) or "
                                 "int8-no-head (the head stays bfloat16); int8 needs bfloat16 on a "
                                 "CPU")


def find_checkpoint(path: Path | None, runs_dir: Path = RUNS_DIR) -> Path:
    """The checkpoint directory to load: `path` itself, its best/ (else last/), or the latest
    run's."""
    if path is None:
        found = latest_checkpoint(runs_dir, "best") or latest_checkpoint(runs_dir, "last")
        if found is None:
            raise UserError(f"no checkpoint found under {runs_dir}/; train one with `python "
                            "train.py`, or start from GPT-2 weights with `--init gpt2`")
        return found
    return require_model_checkpoint(path, "--checkpoint")


DEFAULT_TEMPERATURE = 0.8
"""The temperature text is sampled with unless the model's run saved another default."""


def generation_defaults(checkpoint: Path) -> dict[str, float]:
    """The sampling settings a model is run with unless the command says otherwise: a fine-tuned
    run's saved ones (its `generation_temperature`, greedy unless set at training time, as Hugging
    Face's generation_config), else `DEFAULT_TEMPERATURE` for text."""
    if not (checkpoint / TRAIN_STATE_FILE).is_file():
        return {"temperature": DEFAULT_TEMPERATURE}
    config = load_train_state(checkpoint)["train_config"]
    if config.get("prompt_template") is None:
        return {"temperature": DEFAULT_TEMPERATURE}
    return {"temperature": float(config.get("generation_temperature", 0.0))}


def load_from_flags(checkpoint: Path | None, init: str | None, device: torch.device,
                    dtype: torch.dtype, err: TextIO | None = None) -> GPT:
    """The model of --checkpoint (default: the latest run's) or --init, its weights cast to `dtype`
    on `device`; a line saying what was loaded goes to `err`, if given."""
    if init is not None:
        model, source = load_pretrained(init), init
    else:
        found = find_checkpoint(checkpoint)
        model, source = load_pretrained(found), str(found)  # a LoRA run's: base + adapters, merged
    # Cast on the CPU, then move: the GPU never holds the float32 weights (twice the bytes) at once.
    model = cast(model, dtype).to(device)  # row-major copies (what the int8 kernel reads)
    if err is not None:
        print(f"loaded {source} ({model.num_parameters() / 1e6:.1f}M parameters) on {device} as "
              f"{str(dtype).removeprefix('torch.')}", file=err)
    return model


def load_model(checkpoint_or_init: str | Path | None = None, *, device: str | torch.device = "cpu",
               dtype: str | torch.dtype = torch.float32) -> GPT:
    """A model ready to run, in eval mode, as the commands load it.

    `checkpoint_or_init` is a run or checkpoint directory of this project, or GPT-2 weights (gpt2,
    gpt2-medium, ..., a Hugging Face directory or file, OpenAI's release directory: see
    `load_pretrained`); None is the most recent run under runs/. `device` and `dtype` are what
    --device and --dtype take (`auto` included: the dtype generate.py decodes in), or torch's own.
    """
    torch_device = device if isinstance(device, torch.device) else pick_device(device)
    if isinstance(dtype, str) and dtype != "auto" and dtype not in DTYPES:
        raise UserError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else decoding_dtype(dtype, torch_device)
    init = None if checkpoint_or_init is None else str(checkpoint_or_init)
    return load_from_flags(None, init, torch_device, torch_dtype).eval()
