"""The random generators a run draws from (Python's, NumPy's, torch's, the device's): seeded at the
start, saved in every checkpoint and restored on resume, so that a resumed run continues exactly."""

from __future__ import annotations

import random
import sys
from typing import Any

import numpy as np
import torch

from gpt.base.device import device_rng_state, set_device_rng_state


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (torch.manual_seed seeds every GPU too): the
    generators whose states `rng_state` saves."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict[str, Any]:
    """The global generators' states and `device`'s (`gpt.base.device.device_rng_state`), as tensors
    and plain values (safe to load weights-only)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": pos,
                      "has_gauss": has_gauss, "gauss": gauss},
            "device": device_rng_state(device)}


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore what `rng_state` captured, the device's generator onto `device`.

    A checkpoint taken on another kind of device (or one that saved every GPU's generator, under
    "cuda", which is ignored) has none for `device`: a note says that dropout then draws other
    numbers than an unbroken run would have.
    """
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["gauss"]))
    saved = state.get("device")
    if not set_device_rng_state(device, saved) and (saved is not None or device.type != "cpu"):
        taken = f"on {saved['type']}" if saved else "on a CPU, or by an older version"
        print(f"note: the checkpoint holds no {device.type} random state (it was taken {taken}): "
              f"dropout's "
              "random stream starts afresh, so the losses will not repeat those of an unbroken run",
              file=sys.stderr)
