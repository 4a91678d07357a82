"""Checkpoints as directories, written atomically: `model.safetensors` + `config.json` (+ more).

A training checkpoint (`save_checkpoint`) adds `train_state.pt`: the optimizer, counters, data-loader
position, RNG states and training config, as plain tensors and Python containers that
`torch.load(..., weights_only=True)` reads without running any code from the file.

Every checkpoint directory is written with `gpt.atomic.atomic_directory` and read through
`gpt.atomic.resolve_directory`: a kill at any moment leaves either the old checkpoint or the new one
whole, never a mix.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gpt.atomic import atomic_directory, resolve_directory
from gpt.config import GPTConfig
from gpt.errors import UserError
from gpt.model import GPT

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TRAIN_STATE_FILE = "train_state.pt"
TRAIN_STATE_FORMAT = 1  # bump when the layout of train_state.pt changes incompatibly


def find_model_checkpoint(path: Path) -> Path | None:
    """The checkpoint directory holding the weights for `path`, or None if there is none.

    `path` may be a checkpoint itself or a run directory, whose `best/` is preferred and whose `last/`
    stands in when there is no `best/` yet (a run stopped before its first evaluation). The one rule
    shared by `generate.py --checkpoint`, `load_pretrained` and `python -m gpt.export`.
    """
    for candidate in (path, path / "best", path / "last"):
        candidate = resolve_directory(candidate)
        if (candidate / WEIGHTS_FILE).is_file():
            return candidate
    return None


def latest_checkpoint(runs_dir: Path = Path("runs"), which: str = "best") -> Path | None:
    """`<run>/<which>` of the most recently written run under `runs_dir`, or None if there is none."""
    candidates = [resolve_directory(run / which) for run in Path(runs_dir).glob("*/")]
    candidates = [c for c in candidates if (c / WEIGHTS_FILE).is_file()]
    return max(candidates, key=lambda c: (c / WEIGHTS_FILE).stat().st_mtime, default=None)


def save_model(model: GPT, directory: Path) -> None:
    """Write `model.safetensors` and `config.json` into `directory` (not atomic by itself)."""
    directory = Path(directory)
    state = model.state_dict()
    if model.config.tie_embeddings:
        del state["lm_head.weight"]  # the same tensor as tok_emb.weight; stored once
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()},
              directory / WEIGHTS_FILE)
    model.config.save(directory / CONFIG_FILE)


def load_model(directory: Path, device: str | torch.device = "cpu") -> GPT:
    """Read a checkpoint directory written by `save_model` into a new `GPT` on `device`."""
    directory = resolve_directory(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise UserError(f"checkpoint {directory} has no {name}; is it a checkpoint directory?")
    cfg = GPTConfig.load(directory / CONFIG_FILE)
    try:
        state = load_file(directory / WEIGHTS_FILE, device=str(device))
    except (SafetensorError, OSError) as exc:
        raise UserError(f"cannot read {directory / WEIGHTS_FILE} ({exc}); the file is truncated "
                        "or not safetensors") from None
    with torch.device("meta"):
        model = GPT(cfg)
    expected = set(model.state_dict()) - ({"lm_head.weight"} if cfg.tie_embeddings else set())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise UserError(f"{directory / WEIGHTS_FILE} does not match its config.json: missing "
                        f"{missing[:3]}, unexpected {unexpected[:3]}")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name, tensor in state.items():
        if tuple(tensor.shape) != shapes[name]:
            raise UserError(f"{directory / WEIGHTS_FILE}: tensor {name!r} has shape "
                            f"{tuple(tensor.shape)}, config.json implies {shapes[name]}")
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight  # assign=True replaced the shared Parameter
    return model.to(device)


def save_checkpoint(model: GPT, train_state: dict[str, Any], directory: Path) -> None:
    """Atomically write a training checkpoint: the model (`save_model`) and `train_state.pt`.

    `train_state` must hold only tensors and plain Python values (dict, list, tuple, str, int, float,
    bool, None), so that `load_train_state` can read it with `weights_only=True`.
    """
    with atomic_directory(directory) as tmp:
        save_model(model, tmp)
        torch.save({"format": TRAIN_STATE_FORMAT, **train_state}, tmp / TRAIN_STATE_FILE)


def load_train_state(directory: Path) -> dict[str, Any]:
    """The `train_state` saved by `save_checkpoint` in `directory` (tensors on the CPU).

    Raises `UserError` naming the file if it is missing, truncated, not a training state, or of
    another format version.
    """
    directory = resolve_directory(directory)
    path = directory / TRAIN_STATE_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing, so {directory} cannot be resumed (a weights-only "
                        f"checkpoint); start a new run from its weights with --init {directory}")
    try:
        # weights_only: the file is data, never code, even if someone hands us a malicious one.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError) as exc:
        raise UserError(f"cannot read {path} ({type(exc).__name__}): the file is truncated or not a "
                        "PyTorch file; resume from another checkpoint (best/) or start a new run") from None
    except pickle.UnpicklingError:
        raise UserError(f"{path} holds objects other than tensors and plain values, so it was not "
                        "written by this trainer; it is refused unread") from None
    if not isinstance(state, dict) or state.get("format") != TRAIN_STATE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise UserError(f"{path} is not a training state of format {TRAIN_STATE_FORMAT} (found "
                        f"{found!r}); it was written by another version of this trainer")
    return state
