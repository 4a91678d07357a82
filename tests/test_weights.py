"""Parity with Hugging Face's GPT-2 on tiny random configs (no download)."""

import pytest
import torch
from torch.testing import assert_close
from transformers import GPT2Config, GPT2LMHeadModel

from gpt.config import GPTConfig
from gpt.errors import UserError
from gpt.model import GPT
from gpt.weights import config_from_hf, gpt_to_hf_state_dict, hf_to_gpt_state_dict

TINY_CONFIGS = [
    dict(n_layer=1, n_head=1, n_embd=16, n_positions=8, vocab_size=50, qkv_bias=True),
    dict(n_layer=2, n_head=4, n_embd=32, n_positions=32, vocab_size=101, qkv_bias=True),
    dict(n_layer=3, n_head=2, n_embd=24, n_positions=16, vocab_size=257, qkv_bias=False),
    dict(n_layer=4, n_head=8, n_embd=64, n_positions=64, vocab_size=300, qkv_bias=False),
    dict(n_layer=2, n_head=3, n_embd=48, n_positions=128, vocab_size=1000, qkv_bias=True),
]


def random_hf_gpt2(spec: dict) -> GPT2LMHeadModel:
    spec = dict(spec)
    qkv_bias = spec.pop("qkv_bias")
    hf = GPT2LMHeadModel(GPT2Config(**spec, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():  # HF inits biases and LayerNorms to 0/1: randomise
            param.copy_(torch.randn_like(param) * 0.1 + (1.0 if name.endswith("ln_1.weight") else 0))
            if name.endswith("attn.c_attn.bias") and not qkv_bias:
                param.zero_()
    return hf


def to_ours(hf: GPT2LMHeadModel, qkv_bias: bool) -> GPT:
    cfg = config_from_hf(hf.config.to_dict(), qkv_bias=qkv_bias, drop_rate=0.0)
    model = GPT(cfg).eval()
    model.load_state_dict(hf_to_gpt_state_dict(hf.state_dict(), cfg), strict=True)
    return model


@pytest.mark.parametrize("spec", TINY_CONFIGS, ids=lambda s: f"L{s['n_layer']}H{s['n_head']}C{s['n_embd']}")
def test_logits_match_hf(spec: dict) -> None:
    hf = random_hf_gpt2(spec)
    ours = to_ours(hf, spec["qkv_bias"])
    idx = torch.randint(0, spec["vocab_size"], (2, spec["n_positions"]))
    with torch.no_grad():
        assert_close(ours(idx), hf(idx).logits, atol=1e-5, rtol=1e-5)
    hf_count = sum(p.numel() for p in hf.parameters())
    bias_params = 0 if spec["qkv_bias"] else spec["n_layer"] * 3 * spec["n_embd"]
    assert ours.num_parameters() + bias_params == hf_count


def test_round_trip_to_hf_layout_is_exact() -> None:
    hf = random_hf_gpt2(TINY_CONFIGS[1])
    ours = to_ours(hf, qkv_bias=True)
    back = gpt_to_hf_state_dict(ours.state_dict(), ours.config)
    for name, tensor in hf.state_dict().items():
        assert torch.equal(back[name], tensor), name


def test_missing_tensor_is_named() -> None:
    hf = random_hf_gpt2(TINY_CONFIGS[0])
    state = hf.state_dict()
    del state["transformer.h.0.mlp.c_fc.bias"]
    cfg = config_from_hf(hf.config.to_dict())
    with pytest.raises(UserError, match=r"missing tensor 'transformer\.h\.0\.mlp\.c_fc\.bias'"):
        hf_to_gpt_state_dict(state, cfg)


def test_shape_mismatch_names_tensor_and_shapes() -> None:
    hf = random_hf_gpt2(TINY_CONFIGS[0])
    cfg = config_from_hf(hf.config.to_dict(), emb_dim=32, n_heads=1)
    expected = r"'transformer\.wte\.weight' has shape \(50, 16\), expected \(50, 32\)"
    with pytest.raises(UserError, match=expected):
        hf_to_gpt_state_dict(hf.state_dict(), cfg)


def test_nonzero_qkv_bias_needs_qkv_bias_true() -> None:
    hf = random_hf_gpt2(TINY_CONFIGS[0])
    cfg = config_from_hf(hf.config.to_dict(), qkv_bias=False)
    with pytest.raises(UserError, match="non-zero qkv bias"):
        hf_to_gpt_state_dict(hf.state_dict(), cfg)


def test_gpt2_preset_matches_hf_default_config() -> None:
    assert config_from_hf(GPT2Config().to_dict()) == GPTConfig.preset("gpt2")
