"""GPT-2 weights: the one table that maps Hugging Face's tensor names onto ours.

HF's `GPT2LMHeadModel` keeps OpenAI's layout: its linear layers are `Conv1D` modules whose weights
are stored as (in, out), the transpose of `nn.Linear`'s (out, in). Everything else is a rename, and
the LM head is the token embedding (tied), so it is not stored separately.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from gpt.config import GPTConfig
from gpt.errors import UserError

# (our name, HF name, stored transposed in HF). `{i}` stands for the block index.
HF_KEY_MAP: list[tuple[str, str, bool]] = [
    ("tok_emb.weight", "transformer.wte.weight", False),
    ("pos_emb.weight", "transformer.wpe.weight", False),
    ("blocks.{i}.norm1.weight", "transformer.h.{i}.ln_1.weight", False),
    ("blocks.{i}.norm1.bias", "transformer.h.{i}.ln_1.bias", False),
    ("blocks.{i}.attn.qkv.weight", "transformer.h.{i}.attn.c_attn.weight", True),
    ("blocks.{i}.attn.qkv.bias", "transformer.h.{i}.attn.c_attn.bias", False),
    ("blocks.{i}.attn.proj.weight", "transformer.h.{i}.attn.c_proj.weight", True),
    ("blocks.{i}.attn.proj.bias", "transformer.h.{i}.attn.c_proj.bias", False),
    ("blocks.{i}.norm2.weight", "transformer.h.{i}.ln_2.weight", False),
    ("blocks.{i}.norm2.bias", "transformer.h.{i}.ln_2.bias", False),
    ("blocks.{i}.mlp.fc.weight", "transformer.h.{i}.mlp.c_fc.weight", True),
    ("blocks.{i}.mlp.fc.bias", "transformer.h.{i}.mlp.c_fc.bias", False),
    ("blocks.{i}.mlp.proj.weight", "transformer.h.{i}.mlp.c_proj.weight", True),
    ("blocks.{i}.mlp.proj.bias", "transformer.h.{i}.mlp.c_proj.bias", False),
    ("final_norm.weight", "transformer.ln_f.weight", False),
    ("final_norm.bias", "transformer.ln_f.bias", False),
    ("lm_head.weight", "lm_head.weight", False),
]


def hf_key_pairs(cfg: GPTConfig) -> list[tuple[str, str, bool]]:
    """`HF_KEY_MAP` expanded for every block of `cfg`, less the tensors `cfg` does not have.

    A tied head is the token embedding, so `lm_head.weight` is not a separate tensor; without a qkv
    bias the model has no `attn.qkv.bias`.
    """
    pairs = []
    for ours, theirs, transposed in HF_KEY_MAP:
        if ours == "lm_head.weight" and cfg.tie_embeddings:
            continue
        if ours.endswith("attn.qkv.bias") and not cfg.qkv_bias:
            continue
        layers = range(cfg.n_layers) if "{i}" in ours else [None]
        for i in layers:
            pairs.append((ours.format(i=i), theirs.format(i=i), transposed))
    return pairs


def config_from_hf(hf_config: Mapping[str, Any], **overrides: Any) -> GPTConfig:
    """Our config for a HF `GPT2Config` (as a dict, e.g. a loaded `config.json`)."""
    try:
        fields = dict(
            vocab_size=hf_config["vocab_size"],
            context_length=hf_config["n_positions"],
            emb_dim=hf_config["n_embd"],
            n_heads=hf_config["n_head"],
            n_layers=hf_config["n_layer"],
            drop_rate=hf_config.get("resid_pdrop", 0.1),
            qkv_bias=True,
            tie_embeddings=hf_config.get("tie_word_embeddings", True),
            layer_norm_eps=hf_config.get("layer_norm_epsilon", 1e-5),
        )
    except KeyError as exc:
        raise UserError(f"HF GPT-2 config lacks the field {exc.args[0]!r}; is it a GPT-2 config?") \
            from None
    return GPTConfig(**{**fields, **overrides})


def hf_to_gpt_state_dict(hf_state: Mapping[str, Tensor], cfg: GPTConfig) -> dict[str, Tensor]:
    """Convert a HF `GPT2LMHeadModel` (or `GPT2Model`) state dict into a state dict for `GPT(cfg)`.

    Every tensor `cfg` needs must be present with the expected shape; the errors name the tensor.
    Tensors are transposed where HF stores Conv1D weights, never copied otherwise.
    """
    if not any(k.startswith("transformer.") for k in hf_state):  # a bare GPT2Model's keys
        hf_state = {f"transformer.{k}": v for k, v in hf_state.items()}
    expected = expected_shapes(cfg)
    state: dict[str, Tensor] = {}
    for ours, theirs, transposed in hf_key_pairs(cfg):
        if theirs not in hf_state:
            raise UserError(f"checkpoint is missing tensor {theirs!r} (needed for {ours!r})")
        tensor = hf_state[theirs]
        tensor = tensor.t() if transposed else tensor
        if tuple(tensor.shape) != expected[ours]:
            raise UserError(
                f"tensor {theirs!r} has shape {tuple(hf_state[theirs].shape)}, expected "
                f"{expected[ours][::-1] if transposed else expected[ours]} for this config"
            )
        state[ours] = tensor
    if not cfg.qkv_bias:
        for i in range(cfg.n_layers):
            bias = hf_state.get(f"transformer.h.{i}.attn.c_attn.bias")
            if bias is not None and bias.abs().max() > 0:
                raise UserError(
                    f"checkpoint has a non-zero qkv bias in block {i}; load it with qkv_bias=True"
                )
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]  # so load_state_dict(strict=True) works
    return state


def gpt_to_hf_state_dict(state: Mapping[str, Tensor], cfg: GPTConfig) -> dict[str, Tensor]:
    """The inverse of `hf_to_gpt_state_dict`: our state dict in HF `GPT2LMHeadModel` names/layout.

    HF GPT-2 always has a qkv bias; a model trained without one gets zeros (the same function).
    """
    hf_state = {
        theirs: (state[ours].t() if transposed else state[ours]).contiguous()
        for ours, theirs, transposed in hf_key_pairs(cfg)
    }
    if not cfg.qkv_bias:
        for i in range(cfg.n_layers):
            hf_state[f"transformer.h.{i}.attn.c_attn.bias"] = torch.zeros(3 * cfg.emb_dim)
    if cfg.tie_embeddings:
        hf_state["lm_head.weight"] = hf_state["transformer.wte.weight"]
    return hf_state


def expected_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor in `GPT(cfg).state_dict()`, computed without building the model."""
    with torch.device("meta"):
        from gpt.model import GPT  # imported here: model.py must stay free of weight-format code

        return {name: tuple(t.shape) for name, t in GPT(cfg).state_dict().items()}
