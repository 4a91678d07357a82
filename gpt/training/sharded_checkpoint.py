"""FSDP checkpoints: the sharded model and optimizer through torch.distributed.checkpoint, read
safely.

Under `--parallel fsdp` no rank holds the whole model (`gpt.training.distributed`), so a checkpoint
directory (last/, best/) is written by all ranks together:

    sharded/            torch.distributed.checkpoint's (DCP's) files: each rank's shards of the
                        weights
                        and of AdamW's moments (`__<rank>_0.distcp`), and their index (`.metadata`)
    train_state.pt      as in one process (`gpt.training.resume`), but AdamW's tensors are in
                        sharded/: only
                        its param groups (plain values) are here, as "optimizer_groups" (none in a
                        checkpoint of step 0, before AdamW has any state)
    config.json         the model's config
    model.safetensors   the whole model, gathered on rank 0: in best/, and in last/ at the end of a
                        run
                        (`final`), so generate.py, --init and the export read them unchanged

Atomic as every checkpoint (`gpt.base.atomic.atomic_directory`): rank 0 makes the temporary
directory and sends its name to the others, rank 0 writes its files there, every rank writes its
shards there, and DCP's closing collective returns on each rank only once all shards and the index
are written; rank 0 then renames it into place. The shards are keyed by parameter name, so they load
into any layout: FSDP on another number of ranks (DCP cuts the saved shards anew), DDP, or one
process.

Reading is where care is needed: DCP's own reader unpickles `.metadata` with `pickle.load`, and
loads a non-tensor entry with `torch.load(weights_only=False)`; either runs code a crafted file
names. `SafeReader` unpickles `.metadata` building only the classes of DCP's index and torch's sizes
and dtypes, and refuses an index with any entry that is not a tensor or a shard file outside
sharded/; the tensors DCP then reads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import pickle
import warnings
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as torch_dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule

from gpt.base.atomic import atomic_directory
from gpt.base.errors import UserError, describe, first_line
from gpt.checkpoints.checkpoint import WEIGHTS_FILE, load_checkpoint, write_checkpoint_files
from gpt.checkpoints.lora import is_lora_checkpoint, load_adapted
from gpt.checkpoints.weights import load_pretrained
from gpt.model.config import GPTConfig
from gpt.model.model import GPT
from gpt.training.distributed import Dist
from gpt.training.train_state import is_sharded

SHARDED_DIR = "sharded"
_INDEX_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata",
                                              "TensorProperties",
                                              "ChunkStorageMetadata", "MetadataIndex",
                                              "StorageMeta",
                                              "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # a layout by its name
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "WindowsPath"},
    "collections": {"OrderedDict"},
}
"""What DCP's `.metadata` may name: its index's dataclasses, torch.Size, dtypes (checked apart)."""


# ---- writing ------------------------------------------------------------------------------------


def save_sharded(model: GPT, optimizer: torch.optim.Optimizer, train_state: dict[str, Any],
                 directories: list[Path], dist: Dist, *, final: bool) -> None:
    """Write an FSDP checkpoint (see the module docstring) into each of `directories`: every rank
    must call this (it is a collective). `train_state` is `gpt.training.resume.checkpoint_state`'s;
    `final` (the run ends) puts the whole model in last/ too, as it always is in best/."""
    if not directories:  # (the same on every rank)
        return
    dist.add_rank_state(train_state)
    # The root keeps its gathered parameters after a forward: back to the shards, which the
    # optimizer's state is keyed by.
    if isinstance(model, FSDPModule):
        model.reshard()
    train_state = {**{k: v for k, v in train_state.items() if k != "optimizer"}, "sharded": True}
    shards: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer.state:  # else asking for it would make AdamW's state by taking a step (of lr 0)
        optimizer_state = get_optimizer_state_dict(model, optimizer)
        shards["optimizer"] = optimizer_state["state"]
        train_state["optimizer_groups"] = optimizer_state["param_groups"]
    whole = any(d.name == "best" or final for d in directories)
    full = whole_model_state(model) if whole else {}  # a collective: rank 0 gets it, the others {}
    for directory in directories:
        with atomic_directory(directory) if dist.is_main else contextlib.nullcontext(None) as made:
            where = [made]  # rank 0's temporary directory, sent to the others
            torch_dist.broadcast_object_list(where, src=0)
            tmp = cast(Path, where[0])
            if dist.is_main:
                tensors = full if directory.name == "best" or final else None
                write_checkpoint_files(tensors, model.config, train_state, tmp)
            dcp.save(shards, storage_writer=dcp.FileSystemWriter(tmp / SHARDED_DIR))


def whole_model_state(model: GPT) -> dict[str, Tensor]:
    """The whole model's tensors on rank 0's CPU, as `gpt.checkpoints.checkpoint.stored_state` names
    them (a tied head stored once); {} on the other ranks. Every rank must call it (it gathers the
    shards)."""
    state = cast(dict[str, Tensor], get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)))
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


# ---- reading ------------------------------------------------------------------------------------


def checkpoint_model(checkpoint: Path, device: torch.device) -> GPT:
    """The model to resume `checkpoint` into: its whole weights when it has them, a LoRA run's base
    with its adapters beside it (`gpt.checkpoints.lora`), else (an FSDP last/ mid-run) a fresh model
    of its config, which `load_sharded` fills in."""
    if is_lora_checkpoint(checkpoint):
        return load_adapted(checkpoint, load_pretrained, device, merge=False)
    if (checkpoint / WEIGHTS_FILE).is_file():
        return load_checkpoint(checkpoint, device)
    return GPT(GPTConfig.load(checkpoint / "config.json")).to(device)


def load_sharded(checkpoint: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                 saved: dict[str, Any]) -> None:
    """Put the weights and AdamW's state of an FSDP `checkpoint` (`saved` is its train state) into
    `model` and `optimizer`, whatever their layout: sharded over any number of ranks (every rank
    calls this), under DDP or in one process; nothing for another checkpoint
    (`gpt.training.resume.restore` reads it). A damaged or foreign sharded/ is a `UserError`."""
    if not is_sharded(saved):
        return
    groups = saved.get("optimizer_groups")  # None: saved at step 0, AdamW has no state yet
    shards: dict[str, Any] = {"model": get_model_state_dict(model)}
    # AdamW's state made (zero moments, by a step of lr 0) for the shards to be read into
    if groups:
        shards["optimizer"] = get_optimizer_state_dict(model, optimizer)["state"]
    where = checkpoint / SHARDED_DIR
    reader = SafeReader(where)
    # refused here, in one line: inside dcp.load a refusal is logged at length
    reader.read_metadata()
    try:
        # in one process DCP warns that it reads as one process: so it does
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(shards, storage_reader=reader, no_dist=not torch_dist.is_initialized())
        set_model_state_dict(model, shards["model"])
        if groups:
            set_optimizer_state_dict(model, optimizer, {"state": shards["optimizer"],
                                                        "param_groups": groups})
    except UserError:
        raise
    # DCP reports a missing or damaged shard as anything
    except (Exception, CheckpointException) as exc:
        raise UserError(f"cannot load the sharded checkpoint {where} ({_load_failure(exc)}): it is "
                        f"damaged, "
                        "incomplete or was written for another model; resume from another "
                        "checkpoint (best/)") from None


def _load_failure(exc: BaseException) -> str:
    """What went wrong in `dcp.load`, in one line: the first failing rank's own error inside a
    `CheckpointException` (a `BaseException`, whose message is whole tracebacks), and never
    torch.load's advice to set weights_only=False, which would run code from the file."""
    if isinstance(exc, CheckpointException) and exc.failures:
        exc = next(iter(exc.failures.values()))[0]
    if isinstance(exc, pickle.UnpicklingError) or "weights_only" in str(exc):
        return f"{type(exc).__name__}: a shard holds objects other than tensors, refused unread"
    return describe(exc)


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader, but reading the index (`.metadata`) without running code (module
    docstring)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / ".metadata"
        try:
            with open(path, "rb") as file:
                metadata = _IndexUnpickler(file).load()
        except Exception as exc:  # a damaged file makes the unpickler raise almost anything
            raise UserError(f"cannot read {path} safely ({first_line(exc)}): it is missing, "
                            f"damaged or not "
                            "a checkpoint index; resume from another checkpoint (best/)") from None
        problem = _index_problem(metadata)
        if problem:
            raise UserError(f"{path} is not an index of tensors ({problem}); refused unread: "
                            f"resume from "
                            "another checkpoint (best/)")
        metadata.storage_meta = StorageMeta(load_id=self.load_id)  # as DCP's reader sets it
        return metadata


class _IndexUnpickler(pickle.Unpickler):
    """Builds only `_INDEX_CLASSES` and torch dtypes: any other name in the file is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _INDEX_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which an index never holds")


def _index_problem(metadata: object) -> str | None:
    """What makes `metadata` other than an index of tensors stored in files of its own directory."""
    if not isinstance(metadata, Metadata):
        return f"a {type(metadata).__name__}"
    entries, storage = metadata.state_dict_metadata, metadata.storage_data
    if not isinstance(entries, dict):
        return "its entries are not listed"
    for name, entry in entries.items():
        # DCP would unpickle it with weights_only=False
        if not isinstance(entry, TensorStorageMetadata):
            return f"{name!r} is a {type(entry).__name__}"
    if not isinstance(storage, dict):
        return "its files are not listed"
    for info in storage.values():
        relative = Path(getattr(info, "relative_path", "/"))
        if relative.is_absolute() or len(relative.parts) != 1 or relative.name in ("..", "."):
            return f"a shard file {str(relative)!r} outside its directory"
    return None
