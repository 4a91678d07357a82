"""LoRA checkpoints: the adapters, their settings and a reference to their base, never a copy of it.

A run trained with `--lora-rank` (`gpt.model.lora`) saves in `best/` and `last/`

    adapters.safetensors   the adapters' tensors (`blocks.0.attn.qkv.lora_A`, ...)
    lora.json              their settings and base: {"rank", "alpha", "dropout", "targets", "base":
                           {"source", "overrides", "sha256"}}
    config.json            the model's config (the base's, as the run built it)
    train_state.pt         as any run's (`gpt.training.resume`): AdamW's state of the adapters alone

`base.source` is what `--init` named (a path made absolute, or a hub name such as gpt2-medium),
`base.overrides` the settings that replaced fields of its config, and `base.sha256` the hash of
its weights as the run loaded them (`weights_sha256`). `load_adapted` loads the base again, refuses
it in one line if its hash differs (the adapters were trained against other weights: they would
compute something else), and puts the adapters back: merged into the weights for generating,
evaluating, exporting and starting a new run (`gpt.checkpoints.weights.load_pretrained` calls it),
beside them to resume training (`gpt.training.sharded_checkpoint.checkpoint_model`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gpt.base.errors import UserError
from gpt.checkpoints.checkpoint import ADAPTERS_FILE, LORA_FILE, read_safetensors
from gpt.model.config import read_json_object
from gpt.model.lora import LoRASettings, adapter_state, add_lora, is_adapter_name, merge_lora
from gpt.model.model import GPT


def is_lora_checkpoint(directory: Path) -> bool:
    """Whether the checkpoint `directory` holds LoRA adapters (and no whole model)."""
    return (directory / ADAPTERS_FILE).is_file()


def weights_sha256(model: nn.Module) -> str:
    """The sha256 of `model`'s weights, adapters left out: every tensor's name, dtype, shape and
    bytes in name order, a tied head once. The same weights give the same hash whatever file or
    format they were read from, and on whatever device they are."""
    digest = hashlib.sha256()
    seen: set[int] = set()  # a tied head is the embedding's tensor again
    for name, tensor in sorted(model.state_dict(keep_vars=True).items()):
        if is_adapter_name(name) or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)};".encode())
        digest.update(data.view(torch.uint8).numpy().data if data.numel() else b"")
    return digest.hexdigest()


def base_source(init: str) -> str:
    """How `lora.json` names the base `--init` gave: an existing path made absolute (a later command
    may run elsewhere), a name (gpt2-medium) as it is."""
    path = Path(init)
    return str(path.resolve()) if path.exists() else init


def start_adapters(model: GPT, settings: LoRASettings, source: str,
                   overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Adapt `model` (the base, as `--init` `source` with `overrides` built it): its hash taken,
    then its weights frozen and adapters added (`gpt.model.lora.add_lora`). Returns the LoRA record
    every checkpoint of the run writes as `lora.json`."""
    sha256 = weights_sha256(model)
    add_lora(model, settings)
    return {"rank": settings.rank, "alpha": settings.alpha, "dropout": settings.dropout,
            "targets": list(settings.targets),
            "base": {"source": base_source(source), "overrides": dict(overrides), "sha256": sha256}}


def read_lora_record(checkpoint: Path) -> dict[str, Any]:
    """`checkpoint`'s `lora.json`, checked to hold what `load_adapted` reads."""
    path = checkpoint / LORA_FILE
    record = read_json_object(path, "a LoRA checkpoint's settings and base")
    base = record.get("base")
    number = (int, float)
    ok = (isinstance(record.get("rank"), int) and isinstance(record.get("alpha"), number)
          and isinstance(record.get("dropout"), number) and isinstance(record.get("targets"), list)
          and isinstance(base, dict) and isinstance(base.get("source"), str)
          and isinstance(base.get("overrides"), dict) and isinstance(base.get("sha256"), str))
    if not ok:
        raise UserError(f"{path} lacks one of rank, alpha, dropout, targets, base.source, "
                        "base.overrides, base.sha256; it is damaged: use another checkpoint "
                        "(best/)")
    return record


def settings_of(record: Mapping[str, Any]) -> LoRASettings:
    """The adapters' settings in a LoRA record (`start_adapters`'s)."""
    return LoRASettings(record["rank"], float(record["alpha"]), float(record["dropout"]),
                        tuple(record["targets"]))


def load_adapted(checkpoint: Path, load_base: Callable[..., GPT],
                 device: str | torch.device = "cpu", *, merge: bool = True,
                 **overrides: Any) -> GPT:
    """The model of a LoRA `checkpoint`: its base, loaded by `load_base(source, **overrides)`
    (`gpt.checkpoints.weights.load_pretrained`) and checked against the hash in `lora.json`, with
    the adapters added and read; merged into the weights (`merge`, a plain GPT) or kept beside them,
    frozen base and trainable adapters (to resume). `overrides` replace fields of the base's config
    besides those the run set (e.g. `drop_rate=0.0`). A base that cannot be loaded, or whose
    weights changed, is a one-line `UserError`."""
    record = read_lora_record(checkpoint)
    base, where = record["base"], checkpoint / LORA_FILE
    try:
        model = load_base(base["source"], **{**base["overrides"], **overrides})
    except UserError as exc:
        raise UserError(f"{checkpoint} holds LoRA adapters of the base {base['source']}, which "
                        f"cannot be loaded ({exc}); put the base back there, or write where it is "
                        f"now into base.source in {where}") from None
    sha256 = weights_sha256(model)
    if sha256 != base["sha256"]:
        raise UserError(f"the base {base['source']} of the LoRA adapters in {checkpoint} has other "
                        f"weights than they were trained on (sha256 {sha256[:12]}..., not "
                        f"{base['sha256'][:12]}... as in {where}); put back the base they were "
                        "trained on, or train new adapters")
    add_lora(model, settings_of(record))
    _read_adapters(model, checkpoint)
    if merge:
        merge_lora(model)
    return model.to(device)


def _read_adapters(model: GPT, checkpoint: Path) -> None:
    """Copy the adapters of `checkpoint` into `model`'s (added with the checkpoint's settings)."""
    where = checkpoint / ADAPTERS_FILE
    stored, expected = read_safetensors(where), adapter_state(model)
    missing = sorted(expected.keys() - stored.keys())
    unexpected = sorted(stored.keys() - expected.keys())
    wrong = [name for name in expected.keys() & stored.keys()
             if stored[name].shape != expected[name].shape]
    if missing or unexpected or wrong:
        raise UserError(f"{where} does not match the adapters {checkpoint / LORA_FILE} describes "
                        f"(missing {missing[:2]}, unexpected {unexpected[:2]}, of another shape "
                        f"{wrong[:2]}); it is damaged: use another checkpoint (best/)")
    with torch.no_grad():
        for name, tensor in expected.items():
            tensor.copy_(stored[name])
