"""Resuming a run exactly: what a checkpoint keeps besides the weights, and putting it back.

A run stopped at step s and resumed continues as if it had never stopped: the same batches in the
same order, the same dropout masks, the same optimizer moments, so the same losses bit for bit. For
that, `train_state.pt` (written by `gpt.checkpoints.checkpoint.save_checkpoint`) holds `checkpoint_state`:

    train_config   the run's settings (those in `RESUME_FIXED` must not change on resume)
    state          the loop's counters (`TrainState`)
    optimizer      AdamW's moments and step counts
    scaler         float16's loss scale
    sampler        the epoch and the position in it of the data order (`ResumableSampler`)
    num_windows    how many training windows there were (a changed corpus is refused)
    rng            the CPU's global random generators and the one of the device in use (dropout
                   draws from them)

An FSDP checkpoint (`gpt.training.sharded_checkpoint`) has "sharded": True, and AdamW's tensors in its
sharded/ directory instead of "optimizer" (its param groups are "optimizer_groups").

Only tensors and plain Python values, so it loads with `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from gpt.base.atomic import resolve_directory
from gpt.base.device import load_scaler_state
from gpt.base.errors import UserError, describe
from gpt.base.rng import rng_state, set_rng_state
from gpt.checkpoints.checkpoint import TRAIN_STATE_FILE, WEIGHTS_FILE, load_train_state
from gpt.data.windows import ResumableSampler
from gpt.model.config import read_json_object
from gpt.training.settings import MODEL_OVERRIDES, RUN_CONFIG_FILE, TrainConfig, current_names, flag

if TYPE_CHECKING:  # gpt.training.record_data imports gpt.training.distributed, which imports this module
    from gpt.training.record_data import BucketBatchSampler

RESUME_FIXED = ("data", "val_data", "val_fraction", "decode_errors", "preset", "init", *MODEL_OVERRIDES,
                "context_length", "stride", "grad_accum", "seed", "prompt_template", "mask_prompt",
                "label_smoothing", "focal_gamma", "distill_weight", "distill_temperature", "objective",
                "dpo_beta", "reference", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets")
"""What a resumed run must keep: these fix the model, the training windows and their order, and the
objective (LoRA's adapters too), so the checkpoint's weights, optimizer state and data-loader
position still mean what they meant, and metrics.csv keeps its columns (DPO's reference is loaded
again, from --reference or --init, and its log-probabilities computed again: the same numbers). So
does the global batch, `batch_size` x the number of processes (`check_resume_settings`). `--teacher`
may name another path (the teacher's directory moved, or the run continues on another machine: the
teacher is read-only and in no checkpoint, and `load_teacher` checks it again), but a run with a
teacher keeps one and a run without stays without."""


@dataclass
class TrainState:
    """The loop's counters; saved in every checkpoint so that a resumed run continues exactly."""

    step: int = 0
    """Optimizer steps taken."""
    tokens_seen: int = 0
    """Input tokens trained on so far."""
    best_val_loss: float = math.inf
    """Lowest validation loss so far (improvements smaller than min_delta do not count)."""
    best_step: int = 0
    """The step at which `best_val_loss` was measured (the weights in best/)."""
    evals_since_best: int = 0
    """Evaluations in a row without an improvement: the early-stopping counter."""

    def keep_score(self, val_loss: float, min_delta: float) -> bool:
        """Count an evaluation for early stopping; True if `val_loss` is a new best (by more than
        `min_delta`), which resets the count of evaluations without one."""
        improved = val_loss < self.best_val_loss - min_delta
        if improved:
            self.best_val_loss, self.best_step, self.evals_since_best = val_loss, self.step, 0
        else:
            self.evals_since_best += 1
        return improved

    def state_dict(self) -> dict[str, Any]:
        """The counters as a plain dict (what `load_state_dict` takes back)."""
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Set every counter from a `state_dict()`."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, state[f.name])


def is_sharded(saved: dict[str, Any]) -> bool:
    """Whether the train state `saved` is an FSDP checkpoint's (its weights and moments in sharded/)."""
    return saved.get("sharded") is True


def checkpoint_state(*, cfg: TrainConfig, state: TrainState, optimizer: torch.optim.Optimizer,
                     scaler: torch.amp.GradScaler, sampler: ResumableSampler | BucketBatchSampler,
                     num_windows: int, device: torch.device) -> dict[str, Any]:
    """Everything besides the weights that a resumed run needs to continue exactly (see above)."""
    return {
        "train_config": cfg.to_dict(),
        "state": state.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "sampler": sampler.state_dict(),
        "num_windows": num_windows,
        "rng": rng_state(device),
    }


def find_resume_checkpoint(path: Path) -> Path | None:
    """The checkpoint to resume for `--resume path`: path itself if it is one, else path/last; None
    for a run directory with its settings but no checkpoint (stopped before its first save), which
    then starts again from step 0."""
    if not path.is_dir():
        raise UserError(f"--resume {path}: no such run directory; give one such as runs/NAME")
    checkpoint = path if (path / TRAIN_STATE_FILE).is_file() else resolve_directory(path / "last")
    if checkpoint.is_dir():
        return checkpoint
    if (path / RUN_CONFIG_FILE).is_file():
        return None
    raise UserError(f"--resume {path}: there is no {path / 'last'} checkpoint in it (an empty run "
                    "directory, or not one); start a new run instead")


def resume_config(path: Path) -> dict[str, Any]:
    """The settings of the run a `--resume path` continues (the base that flags then override): its
    checkpoint's, or its train_config.json's when it has no checkpoint yet."""
    checkpoint = find_resume_checkpoint(path)
    if checkpoint is None:
        return current_names(read_json_object(path / RUN_CONFIG_FILE, "the run's settings"))
    return current_names(read_resume_state(checkpoint)["train_config"])


def read_resume_state(checkpoint: Path) -> dict[str, Any]:
    """`checkpoint`'s train state (`load_train_state`), checked to hold every entry that resuming
    reads, each of the type it must have: a damaged or foreign file is refused here, before the run
    directory is written to, not half-way through `restore` or the first step."""
    saved = load_train_state(checkpoint)
    problem = _state_problem(saved)
    if problem is not None:
        raise UserError(f"{checkpoint / TRAIN_STATE_FILE} is not a complete training state ({problem}); "
                        "resume from another checkpoint (best/) or start a new run")
    return saved


def _state_problem(saved: dict[str, Any]) -> str | None:
    """What is missing or of the wrong type in a loaded train state (see the module docstring), or None."""
    kind: type
    optimizer = () if is_sharded(saved) else (("optimizer", dict),)
    for key, kind in (("train_config", dict), ("state", dict), *optimizer, ("scaler", dict),
                      ("sampler", dict), ("num_windows", int), ("rng", dict)):
        if not isinstance(saved.get(key), kind):
            found = type(saved[key]).__name__ if key in saved else "missing"
            return f"{key!r} is {found}, not a {kind.__name__}"
    numbers = [(f"state {f.name!r}", saved["state"].get(f.name), float if f.name == "best_val_loss" else int)
               for f in dataclasses.fields(TrainState)]
    numbers += [(f"sampler {name!r}", saved["sampler"].get(name), int)
                for name in ("epoch", "position", "seed")]
    for what, value, kind in numbers:
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
            return f"{what} is {value!r}, not a number of type {kind.__name__}"
    if is_sharded(saved):
        if not isinstance(saved.get("optimizer_groups", []), list):
            return "its 'optimizer_groups' is not a list"
    elif not (isinstance(saved["optimizer"].get("state"), dict)
              and isinstance(saved["optimizer"].get("param_groups"), list)):
        return "the optimizer state lacks its 'state' or 'param_groups'"
    rng, numpy = saved["rng"], saved["rng"].get("numpy")
    try:  # on throwaway generators: the global ones are set last, by `restore`
        random.Random().setstate(rng["python"])
        torch.Generator().set_state(rng["torch"])
        np.random.RandomState().set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32),
                                           numpy["pos"], numpy["has_gauss"], numpy["gauss"]))
    except Exception as exc:  # whatever a malformed state makes them raise
        return f"its random generator states cannot be set ({describe(exc)})"
    return None


def check_resume_settings(cfg: TrainConfig, saved: dict[str, Any], checkpoint: Path,
                          world_size: int = 1) -> None:
    """Refuse settings that differ from the checkpoint's in `RESUME_FIXED`, and a global batch
    (`batch_size` x `world_size` processes) that differs from the run's; `saved` is its train state
    (with "world_size" when a multi-process run wrote it)."""
    # A setting added since the run was saved has its default there.
    before = {**TrainConfig().to_dict(), **current_names(saved["train_config"])}
    then = before["batch_size"] * saved.get("world_size", 1)
    if cfg.batch_size * world_size != then:
        fix = (f"use --batch-size {then // world_size}" if then % world_size == 0 else
               f"use a number of processes that divides {then}")
        raise UserError(f"--resume: the global batch --batch-size {cfg.batch_size} x {world_size} "
                        f"process(es) differs from the run's {then} windows (in "
                        f"{checkpoint / TRAIN_STATE_FILE}); {fix}, so that the data order carries on")
    if cfg.parallel == "fsdp" and world_size > 1 and not is_sharded(saved):
        raise UserError(f"--resume: {checkpoint} was written by one process or DDP, whose optimizer state "
                        "--parallel fsdp does not read; resume it with --parallel ddp, or start an FSDP run "
                        f"from its weights with --init {checkpoint}")
    if (before["teacher"] is None) != (cfg.teacher is None):
        raise UserError(f"--resume: the run was trained {'with' if cfg.teacher is None else 'without'} "
                        "--teacher and a resumed run keeps its objective; start a new run to change it")
    for name in RESUME_FIXED:
        if before.get(name) != getattr(cfg, name):
            raise UserError(
                f"--resume: {flag(name)} {getattr(cfg, name)!r} differs from the run's "
                f"{before.get(name)!r} (in {checkpoint / TRAIN_STATE_FILE}); a resumed run "
                "keeps its model, data and objective, so drop the flag or start a new run")


def restore(saved: dict[str, Any], checkpoint: Path, *, optimizer: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler, sampler: ResumableSampler | BucketBatchSampler,
            num_windows: int, device: torch.device) -> TrainState:
    """Put the optimizer, loss scaler, sampler and random generators back where `checkpoint` was
    taken (`saved` is its train state; the weights are loaded already); return the loop's counters.

    Everything is checked before the random generators are set, last (`device`'s: the one the run
    continues on). A run resumed with `--dtype float16` from one in another dtype starts from the
    initial loss scale (`load_scaler_state`).
    """
    where = checkpoint / TRAIN_STATE_FILE
    try:
        if not is_sharded(saved):  # an FSDP checkpoint's was read with its weights (gpt.training.sharded_checkpoint)
            optimizer.load_state_dict(saved["optimizer"])
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{where}: its optimizer state does not fit the model in "
                        f"{checkpoint / WEIGHTS_FILE} ({exc}); resume from another checkpoint") from None
    for param in (p for group in optimizer.param_groups for p in group["params"]):
        moment = optimizer.state.get(param, {}).get("exp_avg")
        if moment is not None and moment.shape != param.shape:
            raise UserError(f"{where}: its optimizer state has shape {tuple(moment.shape)} for a "
                            f"parameter of shape {tuple(param.shape)} in {checkpoint / WEIGHTS_FILE}; "
                            "resume from another checkpoint")
    load_scaler_state(scaler, saved["scaler"])
    if saved["num_windows"] != num_windows:
        raise UserError(f"the training data changed since {where} was written ({saved['num_windows']} "
                        f"windows then, {num_windows} now); resume with the same data, or start a new run")
    sampler.load_state_dict(saved["sampler"])
    state = TrainState()
    state.load_state_dict(saved["state"])
    set_rng_state(saved["rng"], device)
    return state
