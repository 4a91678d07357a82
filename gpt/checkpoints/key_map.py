"""GPT-2's weights under our names: one table, `KEY_MAP`, and the conversions through it.

Every published format goes through `KEY_MAP`: one row per tensor, with its name in each format and
whether it is a Conv1D kernel. OpenAI's TensorFlow code stores every linear layer as a width-1
convolution kernel of shape (1, in, out); HF's `Conv1D` keeps the (in, out) layout; `nn.Linear`
wants (out, in). `to_gpt_state_dict` reads a file's tensors into our names (checked, as views where
it can), `gpt_to_hf_state_dict` writes ours in Hugging Face's. `gpt.checkpoints.weights` loads and
saves with them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from gpt.base.errors import UserError
from gpt.checkpoints.checkpoint import stored_shapes
from gpt.model.config import GPTConfig

# The published formats; our own checkpoints are read by load_checkpoint.
Format = Literal["hf", "openai"]


class KeyRow(NamedTuple):
    """One tensor of GPT-2 under its name in each format; `{i}` stands for the block index."""

    ours: str
    hf: str
    openai: str | None  # None: OpenAI's release does not store it (its head is always tied)
    # stored as a Conv1D kernel: (in, out) in HF, (1, in, out) in OpenAI; ours is (out, in)
    conv1d: bool


KEY_MAP: list[KeyRow] = [
    KeyRow("tok_emb.weight", "transformer.wte.weight", "model/wte", False),
    KeyRow("pos_emb.weight", "transformer.wpe.weight", "model/wpe", False),
    KeyRow("blocks.{i}.norm1.weight", "transformer.h.{i}.ln_1.weight", "model/h{i}/ln_1/g", False),
    KeyRow("blocks.{i}.norm1.bias", "transformer.h.{i}.ln_1.bias", "model/h{i}/ln_1/b", False),
    KeyRow("blocks.{i}.attn.qkv.weight", "transformer.h.{i}.attn.c_attn.weight",
           "model/h{i}/attn/c_attn/w", True),
    KeyRow("blocks.{i}.attn.qkv.bias", "transformer.h.{i}.attn.c_attn.bias",
           "model/h{i}/attn/c_attn/b", False),
    KeyRow("blocks.{i}.attn.proj.weight", "transformer.h.{i}.attn.c_proj.weight",
           "model/h{i}/attn/c_proj/w", True),
    KeyRow("blocks.{i}.attn.proj.bias", "transformer.h.{i}.attn.c_proj.bias",
           "model/h{i}/attn/c_proj/b", False),
    KeyRow("blocks.{i}.norm2.weight", "transformer.h.{i}.ln_2.weight", "model/h{i}/ln_2/g", False),
    KeyRow("blocks.{i}.norm2.bias", "transformer.h.{i}.ln_2.bias", "model/h{i}/ln_2/b", False),
    KeyRow("blocks.{i}.mlp.fc.weight", "transformer.h.{i}.mlp.c_fc.weight", "model/h{i}/mlp/c_fc/w",
           True),
    KeyRow("blocks.{i}.mlp.fc.bias", "transformer.h.{i}.mlp.c_fc.bias", "model/h{i}/mlp/c_fc/b",
           False),
    KeyRow("blocks.{i}.mlp.proj.weight", "transformer.h.{i}.mlp.c_proj.weight",
           "model/h{i}/mlp/c_proj/w", True),
    KeyRow("blocks.{i}.mlp.proj.bias", "transformer.h.{i}.mlp.c_proj.bias",
           "model/h{i}/mlp/c_proj/b", False),
    KeyRow("final_norm.weight", "transformer.ln_f.weight", "model/ln_f/g", False),
    KeyRow("final_norm.bias", "transformer.ln_f.bias", "model/ln_f/b", False),
    KeyRow("lm_head.weight", "lm_head.weight", None, False),
]
# One row per token: padded to `GPTConfig.padded_vocab_size` in our model, `vocab_size` rows in
# files.
_VOCAB_ROWS = {"tok_emb.weight", "lm_head.weight"}
# Optional in our model (the book trains without it); a checkpoint loaded without it must hold
# zeros.
_QKV_BIAS = next(row for row in KEY_MAP if row.ours.endswith("attn.qkv.bias"))

# Stored by HF but not weights: each block's causal-mask buffers (in older files and the published
# ones).
_HF_BUFFER = re.compile(r"transformer\.h\.\d+\.attn\.(masked_)?bias")



def key_pairs(cfg: GPTConfig, fmt: Format = "hf") -> list[tuple[str, str, bool]]:
    """`(our name, name in fmt, is a Conv1D kernel)` for every tensor `GPT(cfg)` stores in `fmt`.

    A tied head is the token embedding, so `lm_head.weight` is not a separate tensor; without a qkv
    bias the model has no `attn.qkv.bias`.
    """
    pairs = []
    for row in KEY_MAP:
        if row.ours == "lm_head.weight" and cfg.tie_embeddings:
            continue
        if row.ours.endswith("attn.qkv.bias") and not cfg.qkv_bias:
            continue
        theirs = getattr(row, fmt)
        if theirs is None:
            raise UserError("OpenAI's GPT-2 format always ties the head to the token embedding; "
                            "load it with tie_embeddings=True")
        for i in range(cfg.n_layers) if "{i}" in row.ours else [None]:
            pairs.append((row.ours.format(i=i), theirs.format(i=i), row.conv1d))
    return pairs


def _file_shape(shape: tuple[int, ...], fmt: Format, conv1d: bool) -> tuple[int, ...]:
    """The shape a tensor of our `shape` has in `fmt` (see `KeyRow.conv1d`)."""
    if not conv1d:
        return shape
    return ((1,) if fmt == "openai" else ()) + shape[::-1]


def to_gpt_state_dict(state: Mapping[str, Tensor], cfg: GPTConfig, fmt: Format = "hf",
                      where: str = "checkpoint") -> dict[str, Tensor]:
    """Convert a state dict in `fmt` names/layout into our names, as float32 views (row-major
    float32 copies of tensors stored in another dtype).

    The result is what our checkpoints store (`gpt.checkpoints.checkpoint.stored_state`, a tied head
    once) and what `model_from_state_dict` builds a model from. Every tensor `cfg` needs must be
    present with the expected shape, and every stored tensor must be used (bar HF's mask buffers and
    a stored copy of a tied head): a checkpoint that does not match its config is an error, not a
    half-loaded model. `where` names the checkpoint in the errors.
    """
    # a bare GPT2Model's keys
    if fmt == "hf" and not any(k.startswith("transformer.") for k in state):
        state = {k if k.startswith("lm_head.") else f"transformer.{k}": v for k, v in state.items()}
    stored_cfg = cfg.replace(vocab_pad_multiple=1)  # the files hold the real vocabulary, unpadded
    expected = stored_shapes(stored_cfg)
    ours_state: dict[str, Tensor] = {}
    used = set()
    for ours, theirs, conv1d in key_pairs(cfg, fmt):
        if theirs not in state:
            raise UserError(f"{where} is missing tensor {theirs!r} (needed for {ours!r})")
        tensor, stored = state[theirs], _file_shape(expected[ours], fmt, conv1d)
        if tuple(tensor.shape) != stored:
            raise UserError(f"{where}: tensor {theirs!r} has shape {tuple(tensor.shape)}, expected "
                            f"{stored} for this config")
        if conv1d:
            # a view, not a copy: see the top
            tensor = (tensor[0] if fmt == "openai" else tensor).t()
        # A file in another dtype is copied anyway: row-major then, as `cast` makes its copies.
        ours_state[ours] = tensor if tensor.dtype == torch.float32 else tensor.to(
            torch.float32, memory_format=torch.contiguous_format)
        used.add(theirs)
    if not cfg.qkv_bias:
        for i in range(cfg.n_layers):
            name = getattr(_QKV_BIAS, fmt).format(i=i)
            bias = state.get(name)
            if bias is not None and bias.abs().max() > 0:
                raise UserError(
                    f"{where} has a non-zero qkv bias in block {i}; load it with qkv_bias=True"
                )
            used.add(name)
    unused = sorted(name for name in set(state) - used if not _ignorable(name, cfg, fmt))
    if unused:
        raise UserError(
            f"{where} holds tensors this config does not use ({', '.join(unused[:3])}"
            f"{', ...' if len(unused) > 3 else ''}); does its config (n_layers={cfg.n_layers}, "
            f"tie_embeddings={cfg.tie_embeddings}) match the weights?"
        )
    padding = cfg.padded_vocab_size - stored_cfg.padded_vocab_size
    for name in _VOCAB_ROWS & ours_state.keys():  # zero rows up to padded_vocab_size (a copy)
        ours_state[name] = F.pad(ours_state[name], (0, 0, 0,
                                                    padding)) if padding else ours_state[name]
    return ours_state


def _ignorable(name: str, cfg: GPTConfig, fmt: Format) -> bool:
    """Whether a stored tensor that no parameter uses may be dropped silently."""
    # a module's state dict (old .bin files) has the tied head under its own name too
    if fmt == "hf":
        return bool(_HF_BUFFER.fullmatch(name)) or (name == "lm_head.weight" and cfg.tie_embeddings)
    # OpenAI: e.g. a `global_step` counter saved beside the model
    return not name.startswith("model/")


def gpt_to_hf_state_dict(state: Mapping[str, Tensor], cfg: GPTConfig) -> dict[str, Tensor]:
    """The inverse of `to_gpt_state_dict(..., "hf")`: our state dict in HF `GPT2LMHeadModel` names,
    as HF's `model.safetensors` stores them (a tied head once, as `transformer.wte.weight`).

    HF GPT-2 always has a qkv bias; a model trained without one gets zeros (the same function).
    """
    def stored(ours: str, conv1d: bool) -> Tensor:
        tensor = state[ours][:cfg.vocab_size] if ours in _VOCAB_ROWS else state[ours]  # unpadded
        return (tensor.t() if conv1d else tensor).contiguous()

    hf_state = {theirs: stored(ours, conv1d) for ours, theirs, conv1d in key_pairs(cfg, "hf")}
    if not cfg.qkv_bias:
        for i in range(cfg.n_layers):
            hf_state[_QKV_BIAS.hf.format(i=i)] = torch.zeros(3 * cfg.emb_dim)
    return hf_state
