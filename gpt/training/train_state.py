"""What `train_state.pt` holds besides the weights, and the checks it must pass before a run
resumes from it (or a command reads a run's settings and counters through it).

`TrainState` is the loop's counters. `state_problem` says what is missing, of the wrong type or out
of range in a loaded train state, down to AdamW's saved hyperparameters and the random generators'
states, so that a damaged or foreign file is refused in one line before anything is written
(`gpt.training.resume.read_resume_state`). `gpt.training.resume` writes and restores the state.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gpt.base.errors import UserError, describe, first_line
from gpt.training.settings import SEED_LIMIT, TrainConfig, current_names


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
    """Whether the train state `saved` is an FSDP checkpoint's (its weights and moments in
    sharded/)."""
    return saved.get("sharded") is True


def state_problem(saved: dict[str, Any]) -> str | None:
    """What is missing or of the wrong type in a loaded train state (see the module docstring), or
    None."""
    kind: type
    # An FSDP checkpoint keeps AdamW's state in its shards; --best-weights-only's best/ has none.
    optimizer = () if is_sharded(saved) or saved.get("without_optimizer") is True else (
        ("optimizer", dict),)
    for key, kind in (("train_config", dict), ("state", dict), *optimizer, ("scaler", dict),
                      ("sampler", dict), ("num_windows", int), ("rng", dict)):
        if not isinstance(saved.get(key), kind):
            found = type(saved[key]).__name__ if key in saved else "missing"
            return f"{key!r} is {found}, not a {kind.__name__}"
    numbers = [(f"state {f.name!r}", saved["state"].get(f.name), float if f.name == "best_val_loss"
                else int)
               for f in dataclasses.fields(TrainState)]
    numbers += [(f"sampler {name!r}", saved["sampler"].get(name), int)
                for name in ("epoch", "position", "seed")]
    for what, value, kind in numbers:
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
            return f"{what} is {value!r}, not a number of type {kind.__name__}"
    problem = _range_problem(saved) or settings_problem(saved["train_config"])
    if problem is not None:
        return problem
    if is_sharded(saved):
        if not isinstance(saved.get("optimizer_groups", []), list):
            return "its 'optimizer_groups' is not a list"
    elif saved.get("without_optimizer") is not True and not (
            isinstance(saved["optimizer"].get("state"), dict)
            and isinstance(saved["optimizer"].get("param_groups"), list)):
        return "the optimizer state lacks its 'state' or 'param_groups'"
    problem = _hyperparameter_problem(saved)
    if problem is not None:
        return problem
    rng, numpy = saved["rng"], saved["rng"].get("numpy")
    try:  # on throwaway generators: the global ones are set last, by `restore`
        random.Random().setstate(rng["python"])
        torch.Generator().set_state(rng["torch"])
        np.random.RandomState().set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32),
                                           numpy["pos"], numpy["has_gauss"], numpy["gauss"]))
    except Exception as exc:  # whatever a malformed state makes them raise
        return f"its random generator states cannot be set ({describe(exc)})"
    return None


def _range_problem(saved: dict[str, Any]) -> str | None:
    """Which counter of a train state (its types checked) is out of its range, or None: steps and
    counts are >= 0, the best step is one already taken, the best loss is a number or inf (none
    yet), the data order's position lies within its epoch and its seed and epoch where `--seed`
    is."""
    state, sampler = saved["state"], saved["sampler"]
    bounds = [("state 'step'", state["step"], 0, None),
              ("state 'tokens_seen'", state["tokens_seen"], 0, None),
              ("state 'best_step'", state["best_step"], 0, state["step"]),
              ("state 'evals_since_best'", state["evals_since_best"], 0, None),
              ("'num_windows'", saved["num_windows"], 1, None),
              ("'world_size'", saved.get("world_size", 1), 1, None),
              ("sampler 'position'", sampler["position"], 0, saved["num_windows"]),
              ("sampler 'epoch'", sampler["epoch"], 0, SEED_LIMIT - 1),
              ("sampler 'seed'", sampler["seed"], 0, SEED_LIMIT - 1)]
    for what, value, low, high in bounds:
        if not isinstance(value, int) or isinstance(value, bool) or value < low or \
                (high is not None and value > high):
            top = "..." if high is None else high
            return f"{what} is {value!r}, not an integer in [{low}, {top}]"
    if math.isnan(state["best_val_loss"]) or state["best_val_loss"] == -math.inf:
        return f"state 'best_val_loss' is {state['best_val_loss']!r}, not a loss (a number, or inf)"
    return None


def _hyperparameter_problem(saved: dict[str, Any]) -> str | None:
    """Which of AdamW's saved hyperparameters (each param group's: `load_state_dict` puts them
    back) or float16's saved loss scale is out of its range, or None."""
    groups = (saved.get("optimizer_groups") if is_sharded(saved)
              else saved.get("optimizer", {}).get("param_groups")) or []

    def number(x: object, *, positive: bool = False) -> bool:  # finite and >= 0 (or > 0)
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) \
            and (x > 0 if positive else x >= 0)

    for i, group in enumerate(groups):
        betas = group.get("betas") if isinstance(group, dict) else None
        if not (isinstance(group, dict) and number(group.get("lr"))
                and number(group.get("eps"), positive=True) and number(group.get("weight_decay"))
                and isinstance(betas, (tuple, list)) and len(betas) == 2
                and all(number(b) and b < 1 for b in betas)):
            return (f"optimizer param group {i} has an lr, eps, weight_decay or betas out of range "
                    "(lr and weight_decay >= 0, eps > 0, betas in [0, 1))")
    scale = saved["scaler"].get("scale")
    if scale is not None and not number(scale, positive=True):
        return f"scaler 'scale' is {scale!r}, not a positive number"
    return None


def settings_problem(settings: dict[str, Any]) -> str | None:
    """Why the saved settings of a run (`TrainConfig.to_dict` then) are not valid ones now, or None;
    its `--tensorboard` is not checked here, so that a run may resume without it."""
    try:
        TrainConfig.from_dict({**current_names(settings), "tensorboard": False})
    except (UserError, TypeError) as exc:  # TypeError: a key that is not a string
        return f"its settings: {first_line(exc)}"
    return None
