"""Checkpoints as directories, written atomically: `model.safetensors` + `config.json` (+ more).

`model_from_state_dict` is the one place a `GPT` is made from stored tensors (ours, or GPT-2's once
`gpt.checkpoints.weights` has converted their names) and its head tied to the embedding
again; `load_checkpoint` reads our checkpoints with it.

A model with LoRA adapters (`gpt.model.lora`) is stored as its adapters alone,
`adapters.safetensors`, with `lora.json` naming its base and the base's sha256
(`gpt.checkpoints.lora` reads them back).

A training checkpoint (`save_checkpoint`) adds `train_state.pt`: the optimizer, counters,
data-loader position, RNG states and training config, as plain tensors and Python containers that
`torch.load(..., weights_only=True)` reads without running any code from the file.

Every checkpoint directory is written with `gpt.base.atomic.atomic_directory` and read through
`gpt.base.atomic.resolve_directory`: a kill at any moment leaves either the old checkpoint or the
new one whole, never a mix.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from gpt.base.atomic import atomic_directory, resolve_directory, write_json
from gpt.base.errors import UserError, describe, first_line
from gpt.base.files import check_readable
from gpt.model.config import GPTConfig
from gpt.model.lora import adapter_state, is_adapter_state
from gpt.model.model import GPT

WEIGHTS_FILE = "model.safetensors"
ADAPTERS_FILE = "adapters.safetensors"  # a LoRA run's checkpoint: the adapters, not the weights
LORA_FILE = "lora.json"  # ... and their settings and base (`gpt.checkpoints.lora`)
CONFIG_FILE = "config.json"
TRAIN_STATE_FILE = "train_state.pt"
TRAIN_STATE_FORMAT = 1  # bump when the layout of train_state.pt changes incompatibly


def find_model_checkpoint(path: Path) -> Path | None:
    """The checkpoint directory holding the weights for `path`, or None if there is none.

    `path` may be a checkpoint itself or a run directory, whose `best/` is preferred and whose
    `last/` stands in when there is no `best/` yet (a run stopped before its first evaluation). The
    one rule shared by `generate.py --checkpoint`, `load_pretrained` and `python -m gpt export`.
    """
    for candidate in (path, path / "best", path / "last"):
        candidate = resolve_directory(candidate)
        if weights_file(candidate).is_file():
            return candidate
    return None


def weights_file(directory: Path) -> Path:
    """The file of a checkpoint directory that holds its tensors: `model.safetensors`, or a LoRA
    checkpoint's `adapters.safetensors` (`model.safetensors` when it has neither)."""
    adapters = directory / ADAPTERS_FILE
    return adapters if adapters.is_file() and not (directory / WEIGHTS_FILE).is_file() else \
        directory / WEIGHTS_FILE


def require_model_checkpoint(path: Path, flag: str | None = None) -> Path:
    """`find_model_checkpoint(path)`, or a `UserError` saying what `path` should be.

    `flag` is how the user gave `path` (e.g. `--checkpoint`), for the message.
    """
    found = find_model_checkpoint(path)
    if found is None:
        given = f"{flag} {path}" if flag else str(path)
        raise UserError(f"{given} is neither a checkpoint directory (with {WEIGHTS_FILE}) nor a "
                        f"run "
                        "directory (with best/ or last/); pass e.g. runs/<run-name>")
    return found


def latest_checkpoint(runs_dir: Path = Path("runs"), which: str = "best") -> Path | None:
    """`<run>/<which>` of the most recently written run under `runs_dir`, or None if there is none.
    """
    candidates = [resolve_directory(run / which) for run in Path(runs_dir).glob("*/")]
    candidates = [c for c in candidates if weights_file(c).is_file()]
    return max(candidates, key=lambda c: weights_file(c).stat().st_mtime, default=None)


def stored_state(model: GPT) -> dict[str, Tensor]:
    """What a checkpoint stores of `model`: its state dict, except that a tied head is stored once,
    as `tok_emb.weight` (`lm_head.weight` would be the same tensor again); of a model with LoRA
    adapters, the adapters alone (the base is the one `lora.json` names)."""
    adapters = adapter_state(model)
    if adapters:
        return adapters
    state = model.state_dict()
    if model.config.tie_embeddings:
        del state["lm_head.weight"]
    return state


def stored_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor `stored_state` gives for a `GPT(cfg)`, computed on the meta
    device."""
    with torch.device("meta"):
        return {name: tuple(t.shape) for name, t in stored_state(GPT(cfg)).items()}


def model_from_state_dict(cfg: GPTConfig, state: Mapping[str, Tensor], where: str) -> GPT:
    """A `GPT(cfg)` whose parameters are the tensors of `state`, taken as they are (not copied).

    `state` must hold exactly the tensors of `stored_state`, with their shapes; otherwise a
    `UserError` naming `where` (the file) says what does not match. The model is built on the meta
    device (no memory, no random init) and then *assigned* the tensors, so a memory-mapped file
    stays the only copy of the weights; the head is then re-tied. The one loader: `load_checkpoint`
    reads our checkpoints with it, `gpt.checkpoints.weights` the published formats once their names
    are converted.
    """
    with torch.device("meta"):
        model = GPT(cfg)
    expected = {name: tuple(t.shape) for name, t in stored_state(model).items()}
    missing, unexpected = (sorted(expected.keys() - state.keys()),
                           sorted(state.keys() - expected.keys()))
    if missing or unexpected:
        raise UserError(f"{where} does not match its config (n_layers={cfg.n_layers}, qkv_bias="
                        f"{cfg.qkv_bias}, tie_embeddings={cfg.tie_embeddings}): missing "
                        f"{missing[:3]}, "
                        f"unexpected {unexpected[:3]}; load it with the config it was saved with")
    for name, tensor in state.items():
        if tuple(tensor.shape) != expected[name]:
            raise UserError(f"{where}: tensor {name!r} has shape {tuple(tensor.shape)}, its config "
                            f"implies {expected[name]}; load it with the config it was saved with")
    model.load_state_dict(state, strict=False, assign=True)  # not strict: a tied head is not stored
    model.tie_weights()
    return model


def read_safetensors(path: Path, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """The tensors of a safetensors file; on the CPU, views of its copy-on-write memory map, so
    nothing is read until used and training writes to private pages, never to the file."""
    check_readable(Path(path))  # safetensors would call an unreadable file missing or truncated
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
    # ValueError: a header that is not JSON, say
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"cannot read {path} ({first_line(exc)}); the file is truncated or not "
                        "safetensors: replace it with a complete copy") from None


def save_model(model: GPT, directory: Path) -> None:
    """Write `model.safetensors` (`stored_state`) and `config.json` into `directory` (not atomic by
    itself)."""
    _write_model(stored_state(model), model.config, Path(directory))


def _write_model(tensors: Mapping[str, Tensor], cfg: GPTConfig, directory: Path) -> None:
    save_file({name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()},
              directory / (ADAPTERS_FILE if is_adapter_state(tensors) else WEIGHTS_FILE))
    cfg.save(directory / CONFIG_FILE)


def load_checkpoint(directory: Path, device: str | torch.device = "cpu", **overrides: Any) -> GPT:
    """Read a checkpoint directory written by `save_model` into a new `GPT` on `device`.

    `overrides` replace fields of its `config.json` (e.g. `drop_rate=0.0`); the weights must still
    fit. What `--resume`, `--init` of a checkpoint, every command and `gpt.load_model` read with
    (`gpt.load_model` is the public loader: it also takes GPT-2 weights, a device and a dtype).
    """
    directory = resolve_directory(directory)
    if weights_file(directory).name == ADAPTERS_FILE:
        raise UserError(f"{directory} holds LoRA adapters, not a whole model; load it with "
                        "gpt.load_model, which adds the base they adapt")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise UserError(f"checkpoint {directory} has no {name}; is it a checkpoint directory?")
    cfg = GPTConfig.load(directory / CONFIG_FILE).replace(**overrides)
    state = read_safetensors(directory / WEIGHTS_FILE, device)
    return model_from_state_dict(cfg, state, str(directory / WEIGHTS_FILE))


def save_checkpoint(model: GPT, train_state: dict[str, Any], directory: Path) -> None:
    """Atomically write a training checkpoint: the model (`save_model`) and `train_state.pt`.

    `train_state` must hold only tensors and plain Python values (dict, list, tuple, str, int,
    float, bool, None), so that `load_train_state` can read it with `weights_only=True`.
    """
    write_checkpoint(stored_state(model), model.config, train_state, directory)


def write_checkpoint(tensors: Mapping[str, Tensor], cfg: GPTConfig, train_state: dict[str, Any],
                     directory: Path) -> None:
    """`save_checkpoint` from the model's `stored_state` and config rather than the model: what
    `gpt.checkpoints.saver` writes from a copy taken earlier."""
    with atomic_directory(directory) as tmp:
        write_checkpoint_files(tensors, cfg, train_state, tmp)


def write_checkpoint_files(tensors: Mapping[str, Tensor] | None, cfg: GPTConfig,
                           train_state: dict[str, Any],
                           directory: Path) -> None:
    """The files of `write_checkpoint`, into `directory` as it is (not atomic by itself); without
    `tensors`, no `model.safetensors` (an FSDP checkpoint's shards hold the weights instead:
    `gpt.training.sharded_checkpoint`). A LoRA run's `train_state` has "lora", its adapters'
    settings and base, also written as `lora.json`."""
    if tensors is None:
        cfg.save(directory / CONFIG_FILE)
    else:
        _write_model(tensors, cfg, directory)
    if "lora" in train_state:
        write_json(directory / LORA_FILE, train_state["lora"])
    torch.save({"format": TRAIN_STATE_FORMAT, **train_state}, directory / TRAIN_STATE_FILE)


def read_torch_file(path: Path, fix: str, **load_args: Any) -> Any:
    """What `torch.load(path, weights_only=True)` reads, on the CPU: the file is data, never code,
    even if someone hands us a malicious one. The one place a `.pt`/`.bin` file is read; when it
    cannot be, a `UserError` names the file and `fix`."""
    check_readable(Path(path))  # not a damaged file: one this user may not read
    try:
        return torch.load(path, map_location="cpu", weights_only=True, **load_args)
    # a damaged file makes the unpickler raise almost anything (KeyError, ...)
    except Exception as exc:
        # The unpickler's own message advises weights_only=False, which would run the file's code.
        reason = type(exc).__name__ if isinstance(exc, pickle.UnpicklingError) else describe(exc)
        raise UserError(f"cannot read {path} safely with torch.load(weights_only=True) ({reason}): "
                        f"the file "
                        "is truncated, not a PyTorch file, or holds objects other than tensors and "
                        "plain "
                        f"values (refused unread); {fix}") from None


RESUME_FIX = "resume from another checkpoint (best/) or start a new run"
"""What to do about a damaged train_state.pt when resuming; a reader for another purpose
(generate.py's prompt template, the export's model card) passes its own."""


def load_train_state(directory: Path, fix: str = RESUME_FIX) -> dict[str, Any]:
    """The `train_state` saved by `save_checkpoint` in `directory` (tensors on the CPU).

    Raises `UserError` naming the file if it is missing, truncated, not a training state, or of
    another format version; for a damaged file, the message ends with `fix`.
    """
    directory = resolve_directory(directory)
    path = directory / TRAIN_STATE_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing, so {directory} cannot be resumed (a weights-only "
                        f"checkpoint); start a new run from its weights with --init {directory}")
    state = read_torch_file(path, fix)
    if not isinstance(state, dict) or state.get("format") != TRAIN_STATE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise UserError(f"{path} is not a training state of format {TRAIN_STATE_FORMAT} (found "
                        f"{found!r}); it was written by another version of this trainer")
    return state
