"""Resuming a run exactly: what a checkpoint keeps besides the weights, and putting it back.

A run stopped at step s and resumed continues as if it had never stopped: the same batches in the
same order, the same dropout masks, the same optimizer moments, so the same losses bit for bit. For
that, `train_state.pt` (written by `gpt.checkpoints.checkpoint.save_checkpoint`) holds
`checkpoint_state`:

    train_config   the run's settings (those in `RESUME_FIXED` must not change on resume)
    state          the loop's counters (`gpt.training.train_state.TrainState`)
    optimizer      AdamW's moments and step counts
    scaler         float16's loss scale
    sampler        the epoch and the position in it of the data order (`ResumableSampler`)
    num_windows    how many training windows there were (a changed corpus is refused)
    rng            the CPU's global random generators and the one of the device in use (dropout
                   draws from them)

An FSDP checkpoint (`gpt.training.sharded_checkpoint`) has "sharded": True, and AdamW's tensors in
its sharded/ directory instead of "optimizer" (its param groups are "optimizer_groups").

Only tensors and plain Python values, so it loads with `torch.load(..., weights_only=True)`; every
entry is checked (`gpt.training.train_state.state_problem`) before anything is written.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple

import torch

from gpt.base.atomic import copy_directory, resolve_directory
from gpt.base.device import load_scaler_state
from gpt.base.errors import UserError
from gpt.base.files import permission_errors
from gpt.base.rng import rng_state, set_rng_state
from gpt.checkpoints.checkpoint import (
    RESUME_FIX,
    TRAIN_STATE_FILE,
    TRAIN_STATE_FORMAT,
    WEIGHTS_FILE,
    load_train_state,
    read_torch_file,
)
from gpt.data.buckets import BucketBatchSampler
from gpt.data.windows import ResumableSampler
from gpt.model.config import read_json_object
from gpt.training.settings import (
    MODEL_OVERRIDES,
    RUN_CONFIG_FILE,
    TrainConfig,
    current_names,
    flag,
)
from gpt.training.train_state import TrainState, is_sharded, settings_problem, state_problem

RESUME_FIXED = ("data", "val_data", "val_fraction", "decode_errors", "preset", "init",
                *MODEL_OVERRIDES,
                "context_length", "stride", "grad_accum", "seed", "prompt_template", "mask_prompt",
                "label_smoothing", "focal_gamma", "distill_weight", "distill_temperature",
                "objective",
                "dpo_beta", "reference", "reward", "group_size", "kl_beta", "rollout_tokens",
                "updates_per_rollout", "eval_task", "eval_task_limit", "lora_rank", "lora_alpha",
                "lora_dropout", "lora_targets")
"""What a resumed run must keep: these fix the model, the training windows and their order, and the
objective (LoRA's adapters too), so the checkpoint's weights, optimizer state and data-loader
position still mean what they meant, and metrics.csv keeps its columns (DPO's reference is loaded
again, from --reference or --init, and its log-probabilities computed again: the same numbers). So
does the global batch, `batch_size` x the number of processes (`check_resume_settings`). `--teacher`
may name another path (the teacher's directory moved, or the run continues on another machine: the
teacher is read-only and in no checkpoint, and `load_teacher` checks it again), but a run with a
teacher keeps one and a run without stays without. GRPO's rewards, group size, rollout length and
updates per rollout fix what its steps sample and in which order, and --kl-beta whether a reference
is loaded."""


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
    """The checkpoint to resume for `--resume path`: path itself if it is one, else path/last (or
    path/best when there is no last/: a run killed between the two writes of its first save); None
    for a run directory with its settings but no checkpoint (stopped before its first save), which
    then starts again from step 0."""
    if not path.is_dir():
        raise UserError(f"--resume {path}: no such run directory; give one such as runs/NAME")
    checkpoint = path if (path / TRAIN_STATE_FILE).is_file() else resolve_directory(path / "last")
    if not checkpoint.is_dir():
        checkpoint = resolve_directory(path / "best")
    if checkpoint.is_dir():
        return checkpoint
    if (path / RUN_CONFIG_FILE).is_file():
        return None
    raise UserError(f"--resume {path}: there is no {path / 'last'} checkpoint in it (an empty run "
                    "directory, or not one); start a new run instead")


def resume_config(path: Path) -> dict[str, Any]:
    """The settings of the run a `--resume path` continues (the base that flags then override): its
    checkpoint's, or its train_config.json's when it has no checkpoint yet."""
    with permission_errors():  # a run directory this user may not list
        checkpoint = find_resume_checkpoint(path)
    if checkpoint is None:
        settings = read_json_object(path / RUN_CONFIG_FILE, "the run's settings")
        problem = settings_problem(settings)
        if problem is not None:
            raise UserError(f"{path / RUN_CONFIG_FILE} does not hold a run's settings ({problem}); "
                            f"start a "
                            "new run")
        return current_names(settings)
    return current_names(read_resume_state(checkpoint)["train_config"])


def read_resume_state(checkpoint: Path, fix: str = RESUME_FIX) -> dict[str, Any]:
    """`checkpoint`'s train state (`load_train_state`), checked to hold every entry that resuming
    reads, each of the type and in the range it must have: a damaged or foreign file is refused
    here, before the run directory is written to, not half-way through `restore` or the first step.
    Also what generate.py and the export read a run's settings and counters through (`fix`: what a
    user of theirs does about a damaged file)."""
    saved = load_train_state(checkpoint, fix)
    problem = state_problem(saved)
    if problem is not None:
        raise UserError(f"{checkpoint / TRAIN_STATE_FILE} is not a complete training state "
                        f"({problem}); {fix}")
    return saved


def saved_settings(saved: dict[str, Any]) -> dict[str, Any]:
    """Every setting of the run whose (checked) train state `saved` is: a setting added since the
    run was saved has its default."""
    return {**TrainConfig().to_dict(), **current_names(saved["train_config"])}


class SettledBest(NamedTuple):
    """What `settle_best` found: the checkpoint to resume and its state, what to say, whether to
    copy."""

    checkpoint: Path
    saved: dict[str, Any]
    note: str | None = None
    """What was not as the checkpoint says, and what the resumed run does about it; None if all was.
    """
    copy_to_best: bool = False
    """Whether best/ is to become a copy of `checkpoint` (`copy_best`), which is itself the best."""


def settle_best(checkpoint: Path, saved: dict[str, Any], *, chosen: bool) -> SettledBest:
    """Make what a resumed run says of its best weights true of best/, before it resumes
    `checkpoint`.

    A run saves best/ before last/ (`gpt.training.trainer.save_checkpoints`), so the best that the
    state in last/ names is on disk whenever last/ is written; a kill between the two writes leaves
    best/ newer than last/, and a run saved by an earlier version (which wrote last/ first, and
    could be stopped, or meet a full disk, before its best/) can leave best/ older than last/ says,
    or missing. For `checkpoint` = last/ (`saved` its state, checked), this reads best/'s step and
    loss:

    - as last/ names them: nothing to do;
    - best/ newer than last/ (a kill between the writes, or an evaluation that `save_freq` saved
      only best/ at): when the run directory was given (`chosen`: not last/ by name), the run
      resumes from best/, the newest checkpoint of the run (exactly as from a last/ of that step);
      when last/ was named, best/ is counted as the best so far;
    - last/ is itself the best (of its own step) and best/ older or missing: best/ becomes a copy of
      last/ (`copy_to_best`);
    - else the weights last/ names are nowhere: best/'s (or, without best/, none) are counted as the
      best so far, and the next improvement on them replaces best/.

    Reads only; a damaged best/ is a `UserError` that says to move it aside.
    """
    run_dir = checkpoint.parent
    if checkpoint != resolve_directory(run_dir / "last"):  # best/ itself, or a checkpoint elsewhere
        require_optimizer_state(checkpoint, saved)
        return SettledBest(checkpoint, saved)
    best_dir, state = resolve_directory(run_dir / "best"), saved["state"]
    kept = _best_on_disk(best_dir)
    if kept == (state["best_step"], state["best_val_loss"]):
        return SettledBest(checkpoint, saved)
    said = (f"{checkpoint} names step {state['best_step']} (validation loss "
            f"{state['best_val_loss']:.4f}) "
            "as the best, but " + (f"{best_dir} holds step {kept[0]} ({kept[1]:.4f})"
                                   if kept[1] < math.inf
                                   else f"there is no {best_dir}"))
    best_saved = read_resume_state(best_dir) if kept[0] > state["step"] and chosen else None
    if best_saved is not None and not best_saved.get("without_optimizer"):
        return SettledBest(best_dir, best_saved,
                           f"{said}: best/ was saved later (--save-freq skipped last/ there, or "
                           f"the run stopped between the two writes); resuming from {best_dir}, "
                           f"the newest "
                           "checkpoint of the run")
    if kept[0] <= state["step"] == state["best_step"] and (checkpoint / WEIGHTS_FILE).is_file():
        return SettledBest(checkpoint, saved, f"{said}: the run stopped before saving its best/; "
                           f"{best_dir} is now a copy of {checkpoint}, the best", copy_to_best=True)
    counters = {**state, "best_step": kept[0], "best_val_loss": kept[1]}
    counted = f"{best_dir}'s" if kept[1] < math.inf else "none"
    return SettledBest(checkpoint, {**saved, "state": counters},
                       f"{said}: the resumed run counts {counted} as the best so far")


def require_optimizer_state(checkpoint: Path, saved: dict[str, Any]) -> None:
    """Refuse to resume from a checkpoint saved without AdamW's state (--best-weights-only)."""
    if saved.get("without_optimizer") is True:
        raise UserError(f"--resume: {checkpoint} was saved by --best-weights-only without the "
                        f"optimizer "
                        "state (AdamW's moments), so the run cannot go on exactly from it; resume "
                        "from "
                        f"{checkpoint.parent / 'last'}, or start a new run from its weights with "
                        f"--init {checkpoint}")


def copy_best(checkpoint: Path) -> None:
    """Make the run's best/ a copy of `checkpoint` (its last/), atomically (`settle_best`)."""
    copy_directory(checkpoint, checkpoint.parent / "best")


def _best_on_disk(best_dir: Path) -> tuple[int, float]:
    """(step, validation loss) of the checkpoint `best_dir`; (0, inf) when there is none."""
    if not best_dir.is_dir():
        return 0, math.inf
    fix = (f"move {best_dir} aside and resume again (the run saves a new best/ at its next "
           "improvement)")
    path = best_dir / TRAIN_STATE_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing, so the run's best checkpoint cannot be checked; {fix}")
    saved = read_torch_file(path, fix, mmap=True)  # mapped: its counters are all that is read
    ours = isinstance(saved, dict) and saved.get("format") == TRAIN_STATE_FORMAT
    problem = state_problem(saved) if ours else \
        f"not a training state of format {TRAIN_STATE_FORMAT}"
    if problem is not None:
        raise UserError(f"{path} is not a complete training state ({problem}); {fix}")
    return saved["state"]["step"], saved["state"]["best_val_loss"]


def check_resume_settings(cfg: TrainConfig, saved: dict[str, Any], checkpoint: Path,
                          world_size: int = 1) -> None:
    """Refuse settings that differ from the checkpoint's in `RESUME_FIXED`, and a global batch
    (`batch_size` x `world_size` processes) that differs from the run's; `saved` is its train state
    (with "world_size" when a multi-process run wrote it)."""
    before = saved_settings(saved)
    then = before["batch_size"] * saved.get("world_size", 1)
    if cfg.batch_size * world_size != then:
        fix = (f"use --batch-size {then // world_size}" if then % world_size == 0 else
               f"use a number of processes that divides {then}")
        raise UserError(f"--resume: the global batch --batch-size {cfg.batch_size} x {world_size} "
                        f"process(es) differs from the run's {then} windows (in "
                        f"{checkpoint / TRAIN_STATE_FILE}); {fix}, so that the data order carries "
                        f"on")
    if cfg.parallel == "fsdp" and world_size > 1 and not is_sharded(saved):
        raise UserError(f"--resume: {checkpoint} was written by one process or DDP, whose "
                        f"optimizer state "
                        "--parallel fsdp does not read; resume it with --parallel ddp, or start an "
                        "FSDP run "
                        f"from its weights with --init {checkpoint}")
    if (before["teacher"] is None) != (cfg.teacher is None):
        raise UserError(f"--resume: the run was trained "
                        f"{'with' if cfg.teacher is None else 'without'} "
                        "--teacher and a resumed run keeps its objective; start a new run to "
                        "change it")
    for name in RESUME_FIXED:
        value = before.get(name)
        # JSON: a list
        if (tuple(value) if isinstance(value, list) else value) != getattr(cfg, name):
            raise UserError(
                f"--resume: {flag(name)} {getattr(cfg, name)!r} differs from the run's "
                f"{before.get(name)!r} (in {checkpoint / TRAIN_STATE_FILE}); a resumed run "
                "keeps its model, data and objective, so drop the flag or start a new run")


def _check_position(sampler: ResumableSampler | BucketBatchSampler, where: Path) -> None:
    """Refuse a data-loader position that this run's data order never reaches: past the epoch's
    last whole batch, or (windows) not at the start of a batch."""
    batch = sampler.batch_size * sampler.world_size if isinstance(sampler, ResumableSampler) else 1
    if len(sampler) < 0 or sampler.position % batch:
        raise UserError(f"{where}: its data-loader position {sampler.position} is not the start of "
                        f"a "
                        "batch of this run's data order (a damaged file); resume from another "
                        "checkpoint (best/) or start a new run")


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
        # an FSDP checkpoint's was read with its weights (gpt.training.sharded_checkpoint)
        if not is_sharded(saved):
            optimizer.load_state_dict(saved["optimizer"])
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{where}: its optimizer state does not fit the model in "
                        f"{checkpoint / WEIGHTS_FILE} ({exc}); resume from another "
                        f"checkpoint") from None
    for param in (p for group in optimizer.param_groups for p in group["params"]):
        moment = optimizer.state.get(param, {}).get("exp_avg")
        if moment is not None and moment.shape != param.shape:
            raise UserError(f"{where}: its optimizer state has shape {tuple(moment.shape)} for a "
                            f"parameter of shape {tuple(param.shape)} in "
                            f"{checkpoint / WEIGHTS_FILE}; "
                            "resume from another checkpoint")
    load_scaler_state(scaler, saved["scaler"])
    if saved["num_windows"] != num_windows:
        raise UserError(f"the training data changed since {where} was written "
                        f"({saved['num_windows']} windows then, {num_windows} now); resume with "
                        f"the same data, or start a new run")
    sampler.load_state_dict(saved["sampler"])
    _check_position(sampler, where)
    state = TrainState()
    state.load_state_dict(saved["state"])
    set_rng_state(saved["rng"], device)
    return state


def run_template(checkpoint: Path) -> str | None:
    """The prompt template of the fine-tuning run that saved `checkpoint` (kept in its training
    state with the run's settings, read with the checks --resume applies), or None: a pretraining
    run's, or weights without a training state."""
    if not (checkpoint / TRAIN_STATE_FILE).is_file():
        return None
    saved = read_resume_state(checkpoint, fix=f"pass --raw to sample without the run's prompt "
                                              f"template "
                              f"(then {TRAIN_STATE_FILE} is not read), or use another checkpoint")
    template: str | None = saved_settings(saved)["prompt_template"]
    return template
