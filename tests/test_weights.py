"""GPT-2 weights: parity with Hugging Face's GPT-2 and with a TensorFlow-written OpenAI checkpoint.

No network: HF models are tiny random `GPT2LMHeadModel`s, the OpenAI checkpoint is the committed
fixture `fixtures/openai_tiny/` (written by TensorFlow, see `fixtures/make_openai_fixture.py`), and
the hub is a fake module.
"""

import json
import os
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close
from transformers import GPT2Config, GPT2LMHeadModel

from gpt.base.errors import UserError
from gpt.checkpoints import weights
from gpt.checkpoints.checkpoint import model_from_state_dict, save_model
from gpt.checkpoints.key_map import gpt_to_hf_state_dict, key_pairs, to_gpt_state_dict
from gpt.checkpoints.tf_checkpoint import read_tf_checkpoint
from gpt.checkpoints.weights import config_from_hf, load_pretrained, save_hf
from gpt.cli.export import main as export_main
from gpt.cli.generate import main as generate_main
from gpt.model.config import ConfigError, GPTConfig
from gpt.model.model import GPT
from gpt.model.tokenizer import get_tokenizer

OPENAI_TINY = Path(__file__).parent / "fixtures" / "openai_tiny"

TINY_CONFIGS = [
    dict(n_layer=1, n_head=1, n_embd=16, n_positions=8, vocab_size=50, qkv_bias=True),
    dict(n_layer=2, n_head=4, n_embd=32, n_positions=32, vocab_size=101, qkv_bias=True),
    dict(n_layer=3, n_head=2, n_embd=24, n_positions=16, vocab_size=257, qkv_bias=False),
    dict(n_layer=4, n_head=8, n_embd=64, n_positions=64, vocab_size=300, qkv_bias=False),
    dict(n_layer=2, n_head=3, n_embd=48, n_positions=128, vocab_size=1000, qkv_bias=True),
]
GPT2_SIZES = {  # the published sizes: (n_layer, n_head, n_embd)
    "gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024),
    "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600),
}


def random_hf_gpt2(spec: dict) -> GPT2LMHeadModel:
    spec = dict(spec)
    qkv_bias = spec.pop("qkv_bias", True)
    hf = GPT2LMHeadModel(GPT2Config(**spec, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()
    with torch.no_grad():
        # HF inits biases and LayerNorms to 0/1: randomise
        for name, param in hf.named_parameters():
            param.copy_(torch.randn_like(param) * 0.1 + (1.0 if name.endswith("ln_1.weight")
                                                         else 0))
            if name.endswith("attn.c_attn.bias") and not qkv_bias:
                param.zero_()
    return hf


def to_ours(hf: GPT2LMHeadModel, qkv_bias: bool) -> GPT:
    cfg = config_from_hf(hf.config.to_dict(), qkv_bias=qkv_bias, drop_rate=0.0)
    return model_from_state_dict(cfg, to_gpt_state_dict(hf.state_dict(), cfg), "hf").eval()


def assert_same_logits(ours: GPT, hf: GPT2LMHeadModel) -> None:
    idx = torch.randint(0, hf.config.vocab_size, (2, hf.config.n_positions))
    with torch.no_grad():
        assert_close(ours(idx), hf(idx).logits, atol=1e-5, rtol=1e-5)


# ---- the mapping ------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", TINY_CONFIGS,
                         ids=lambda s: f"L{s['n_layer']}H{s['n_head']}C{s['n_embd']}")
def test_logits_match_hf(spec: dict) -> None:
    hf = random_hf_gpt2(spec)
    ours = to_ours(hf, spec["qkv_bias"])
    assert_same_logits(ours, hf)
    hf_count = sum(p.numel() for p in hf.parameters())
    bias_params = 0 if spec["qkv_bias"] else spec["n_layer"] * 3 * spec["n_embd"]
    assert ours.num_parameters() + bias_params == hf_count


def test_round_trip_to_hf_layout_is_exact() -> None:
    """Back to HF's names, as its model.safetensors holds them: the tied head once, as wte."""
    hf = random_hf_gpt2(TINY_CONFIGS[1])
    ours = to_ours(hf, qkv_bias=True)
    back = gpt_to_hf_state_dict(ours.state_dict(), ours.config)
    assert set(back) == set(hf.state_dict()) - {"lm_head.weight"}
    for name, tensor in hf.state_dict().items():
        assert torch.equal(back.get(name, back["transformer.wte.weight"]), tensor), name


def openai_shapes(n_vocab: int, n_ctx: int, n_embd: int, n_layer: int) -> dict[str, tuple[int,
                                                                                          ...]]:
    """Every variable of OpenAI's `gpt-2/src/model.py`, written out from that code (not from our
    table)."""
    shapes = {"model/wte": (n_vocab, n_embd), "model/wpe": (n_ctx, n_embd),
              "model/ln_f/g": (n_embd,), "model/ln_f/b": (n_embd,)}
    for i in range(n_layer):
        for norm in ("ln_1", "ln_2"):
            shapes |= {f"model/h{i}/{norm}/g": (n_embd,), f"model/h{i}/{norm}/b": (n_embd,)}
        for conv, n_in, n_out in (("attn/c_attn", n_embd, 3 * n_embd), ("attn/c_proj", n_embd,
                                                                        n_embd),
                                  ("mlp/c_fc", n_embd, 4 * n_embd), ("mlp/c_proj", 4 * n_embd,
                                                                     n_embd)):
            shapes |= {f"model/h{i}/{conv}/w": (1, n_in, n_out), f"model/h{i}/{conv}/b": (n_out,)}
    return shapes


@pytest.mark.parametrize("size", GPT2_SIZES)
@pytest.mark.parametrize("fmt", ["hf", "openai"])
def test_mapping_is_complete_for_every_gpt2_size(size: str, fmt: str) -> None:
    """Every stored tensor of the real sizes is used exactly once, with the right shape; all on
    meta."""
    n_layer, n_head, n_embd = GPT2_SIZES[size]
    cfg = GPTConfig.preset(size)
    if fmt == "hf":
        with torch.device("meta"):
            hf = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd))
        source = hf.state_dict()
        stored = set(source) - {"lm_head.weight"}  # tied: the same tensor as wte
    else:
        source = {name: torch.empty(shape, device="meta")
                  for name, shape in openai_shapes(50257, 1024, n_embd, n_layer).items()}
        stored = set(source)
    assert cfg == config_from_hf(GPT2Config(n_layer=n_layer, n_head=n_head,
                                            n_embd=n_embd).to_dict())
    theirs = [name for _, name, _ in key_pairs(cfg, fmt)]
    assert sorted(theirs) == sorted(stored)  # each stored tensor once, no other
    state = to_gpt_state_dict(source, cfg, fmt)
    model = model_from_state_dict(cfg, state, size)  # checks names and shapes as the model has them
    assert all(t.is_meta for t in state.values())
    assert model.lm_head.weight is model.tok_emb.weight


def test_openai_fixture_has_openai_names_and_shapes() -> None:
    """The TF-written fixture and the spec above agree, so the spec is OpenAI's naming, not ours."""
    tensors = read_tf_checkpoint(OPENAI_TINY / "model.ckpt")
    assert {k: tuple(v.shape) for k, v in tensors.items()} == openai_shapes(64, 16, 16, 2)


# ---- load_pretrained --------------------------------------------------------------------------


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_hf_directory_loads_with_hf_logits(tmp_path: Path, weights: str) -> None:
    hf = random_hf_gpt2(TINY_CONFIGS[1])
    hf.save_pretrained(tmp_path)
    if weights == "pytorch_model.bin":  # the older layout: a pickled state dict
        torch.save(hf.state_dict(), tmp_path / weights)
        (tmp_path / "model.safetensors").unlink()
    ours = load_pretrained(tmp_path, drop_rate=0.0)
    assert not ours.training
    assert ours.lm_head.weight is ours.tok_emb.weight  # tied: one Parameter, updated once
    assert len(list(ours.parameters())) == len(list(hf.parameters()))
    assert_same_logits(ours, hf)


def published_layout(hf: GPT2LMHeadModel) -> dict[str, torch.Tensor]:
    """The state dict as in the published model.safetensors: bare GPT2Model names, mask buffers."""
    n = hf.config.n_positions
    state = dict(hf.transformer.state_dict())
    for i in range(hf.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.ones(n, n).tril().view(1, 1, n, n)
    return state


def test_lone_safetensors_file_infers_its_size(tmp_path: Path) -> None:
    hf = random_hf_gpt2(dict(n_layer=2, n_head=2, n_embd=128, n_positions=16, vocab_size=70))
    save_file(published_layout(hf), tmp_path / "gpt2.safetensors")
    ours = load_pretrained(tmp_path / "gpt2.safetensors", drop_rate=0.0)
    # 128 // 64
    assert (ours.config.n_layers, ours.config.emb_dim, ours.config.n_heads) == (2, 128, 2)
    assert (ours.config.vocab_size, ours.config.context_length) == (70, 16)
    assert_same_logits(ours, hf)


def test_lone_file_takes_n_heads_override(tmp_path: Path) -> None:
    hf = random_hf_gpt2(dict(n_layer=1, n_head=4, n_embd=48, n_positions=8, vocab_size=30))
    save_file(published_layout(hf), tmp_path / "model.safetensors")
    with pytest.raises(UserError, match=r"emb_dim 48 is not a multiple of GPT-2's head size 64; "
                                        r"pass n_h"):
        load_pretrained(tmp_path / "model.safetensors")
    assert_same_logits(load_pretrained(tmp_path / "model.safetensors", n_heads=4, drop_rate=0.0),
                       hf)


def test_openai_checkpoint_matches_tensorflow_logits() -> None:
    # computed by TensorFlow in make_openai_fixture.py
    expected = np.load(OPENAI_TINY / "expected.npz")
    model = load_pretrained(OPENAI_TINY)
    hparams = json.loads((OPENAI_TINY / "hparams.json").read_text())
    cfg = model.config
    assert (cfg.vocab_size, cfg.context_length, cfg.emb_dim, cfg.n_heads, cfg.n_layers) == tuple(
        hparams[k] for k in ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer"))
    with torch.no_grad():
        logits = model(torch.from_numpy(expected["input_ids"]))
    assert_close(logits, torch.from_numpy(expected["logits"]), atol=1e-5, rtol=1e-5)


def test_loaded_weights_train_without_touching_the_file(tmp_path: Path) -> None:
    """The parameters are views of a copy-on-write memory map: an optimizer step must not write
    back."""
    hf = random_hf_gpt2(TINY_CONFIGS[0])
    hf.save_pretrained(tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()
    model = load_pretrained(tmp_path).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    idx = torch.randint(0, 50, (2, 8))
    model(idx).logsumexp(-1).mean().backward()
    optimizer.step()
    assert not torch.equal(model.tok_emb.weight, hf.transformer.wte.weight)
    assert model.lm_head.weight is model.tok_emb.weight
    assert (tmp_path / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("pad", [1, 64], ids=["unpadded", "padded-vocabulary"])
def test_our_checkpoint_and_run_directories_load(tmp_path: Path, pad: int) -> None:
    """As `--init runs/NAME` reads them; the default `mini` preset pads its vocabulary, and our
    checkpoints store the padded table as the model holds it."""
    model = GPT(GPTConfig.preset("tiny", vocab_pad_multiple=pad)).eval()
    (tmp_path / "run" / "best").mkdir(parents=True)
    save_model(model, tmp_path / "run" / "best")
    for path in (tmp_path / "run", tmp_path / "run" / "best"):
        loaded = load_pretrained(path, drop_rate=0.0)
        assert loaded.config == model.config.replace(drop_rate=0.0)
        assert not loaded.training and loaded.lm_head.weight is loaded.tok_emb.weight
        for name, tensor in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], tensor), name


# ---- model names and the hub ------------------------------------------------------------------


def fake_hub(monkeypatch: pytest.MonkeyPatch, download: object, reachable: bool = True) -> None:
    module = types.ModuleType("huggingface_hub")
    module.hf_hub_download = download  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "huggingface_hub", module)
    reason = None if reachable else "huggingface.co:443: refused"
    monkeypatch.setattr(weights, "hub_unreachable", lambda: reason)


@pytest.mark.parametrize("reachable", [True, False])
def test_model_name_downloads_from_the_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           reachable: bool) -> None:
    """Online the hub is asked; offline only its local cache (which here has the files)."""
    hf = random_hf_gpt2(TINY_CONFIGS[0])
    hf.save_pretrained(tmp_path)
    asked = []

    def download(repo_id: str, filename: str, local_files_only: bool) -> str:
        assert local_files_only is not reachable
        asked.append((repo_id, filename))
        return str(tmp_path / filename)

    fake_hub(monkeypatch, download, reachable)
    monkeypatch.chdir(tmp_path)  # where no file named like the model exists
    assert_same_logits(load_pretrained("gpt2-medium", drop_rate=0.0), hf)
    load_pretrained("openai-community/gpt2")
    assert asked == [("openai-community/gpt2-medium", "config.json"),
                     ("openai-community/gpt2-medium", "model.safetensors"),
                     ("openai-community/gpt2", "config.json"), ("openai-community/gpt2",
                                                                "model.safetensors")]


def test_offline_hub_says_what_to_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def download(repo_id: str, filename: str, local_files_only: bool) -> str:
        raise ConnectionError("Failed to resolve 'huggingface.co'\n(more lines of traceback text)")

    fake_hub(monkeypatch, download)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as info:
        load_pretrained("gpt2")
    message = str(info.value)
    assert "\n" not in message
    assert "ConnectionError: Failed to resolve 'huggingface.co'" in message
    assert ("download config.json and model.safetensors from "
            "https://huggingface.co/openai-community/gpt2 into a directory and pass that"
            in message)


def test_unresolvable_hub_fails_at_once_when_the_cache_misses(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: E501
    def cache_miss(repo_id: str, filename: str, local_files_only: bool) -> str:
        assert local_files_only  # never a network attempt with its long retries
        raise FileNotFoundError("not in the cache")

    fake_hub(monkeypatch, cache_miss, reachable=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"cannot download openai-community/gpt2 \(the hub cannot "
                                        r"be reached \(huggingface.co:443: refused\) and the files "
                                        r"are not in the local cache\); download config.json and "
                                        r"model.safetensors"):
        load_pretrained("gpt2")


def test_missing_huggingface_hub_is_explained(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes the import fail
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r'huggingface_hub is not installed .*pip install -e '
                                        r'"\.\[hf\]"'
                                        r".*huggingface\.co/openai-community/gpt2-xl"):
        load_pretrained("gpt2-xl")


def test_unknown_name_lists_the_known_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="'gpt3' is neither a file or directory nor a known model; "
                                        "known models: gpt2, gpt2-medium, gpt2-large, gpt2-xl"):
        load_pretrained("gpt3")


# ---- save_hf and the export command -----------------------------------------------------------


@pytest.mark.parametrize("overrides", [
    {}, {"qkv_bias": False}, {"tie_embeddings": False},
    {"tie_embeddings": False, "qkv_bias": False, "init_scheme": "torch"},  # recipes/book-ch5.toml's
], ids=str)
def test_save_hf_loads_in_transformers_with_the_same_logits(tmp_path: Path,
                                                            overrides: dict) -> None:
    ours = GPT(GPTConfig.preset("tiny", vocab_size=97, context_length=16, drop_rate=0.0,
                                **overrides)).eval()
    with torch.no_grad():
        for param in ours.parameters():
            param.add_(torch.randn_like(param) * 0.1)  # biases and norms away from their 0/1 init
    save_hf(ours, tmp_path / "hf")
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json",
                                                                   "model.safetensors"]
    stored = load_file(tmp_path / "hf" / "model.safetensors")
    # a tied head is stored once
    assert ("lm_head.weight" in stored) == (not ours.config.tie_embeddings)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.model_type == "gpt2" and hf.config.activation_function == "gelu_new"
    assert hf.config.tie_word_embeddings is ours.config.tie_embeddings
    assert (hf.lm_head.weight is hf.transformer.wte.weight) is ours.config.tie_embeddings
    assert_same_logits(ours, hf)
    back = load_pretrained(tmp_path / "hf", **overrides)
    for name, tensor in ours.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_save_hf_refuses_a_directory_with_other_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds other files"):
        save_hf(GPT(GPTConfig.preset("tiny")), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("which", ["best", "last"])
def test_export_command_writes_a_transformers_directory(tmp_path: Path, run_command,
                                                        which: str) -> None:
    """A run's best/ is exported, or its last/ when it stopped before its first evaluation. (The
    command's `main`, in this process; test_export.py and test_console_scripts.py start it as a
    process.)"""
    ours = GPT(GPTConfig.preset("tiny", drop_rate=0.0)).eval()
    (tmp_path / "run" / which).mkdir(parents=True)
    save_model(ours, tmp_path / "run" / which)
    status, _, err = run_command(export_main, [str(tmp_path / "run"), str(tmp_path / "out")])
    assert status == 0, err
    assert_same_logits(ours, GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval())


def test_a_padded_vocabulary_loads_and_exports_the_same_logits(tmp_path: Path) -> None:
    hf = random_hf_gpt2(TINY_CONFIGS[1])  # vocab 101 -> 128 rows
    cfg = config_from_hf(hf.config.to_dict(), drop_rate=0.0, vocab_pad_multiple=64)
    ours = model_from_state_dict(cfg, to_gpt_state_dict(hf.state_dict(), cfg), "hf").eval()
    assert ours.tok_emb.weight.shape == (128, 32) and not ours.tok_emb.weight[101:].any()
    assert_same_logits(ours, hf)
    save_hf(ours, tmp_path / "out")  # back to 101 rows, as transformers expects
    assert_same_logits(ours, GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval())


def test_export_command_error_is_one_line(tmp_path: Path, run_command) -> None:
    line = run_command(export_main, [str(tmp_path / "nowhere"),
                                     str(tmp_path / "out")]).one_line_error()
    assert line == (
        f"error: {tmp_path / 'nowhere'} is neither a checkpoint directory (with model.safetensors) "
        f"nor a "
        "run directory (with best/ or last/); pass e.g. runs/<run-name>")


def test_generate_front_continues_like_transformers(tmp_path: Path, run_command) -> None:
    """`generate.py --init DIR` (its `main`), greedy, prints what HF's greedy `generate` makes of
    the same weights.

    float32 on both sides: the script's default (bf16) rounds the weights, and greedy decoding of a
    random model flips at near-ties.
    """
    hf = random_hf_gpt2(dict(n_layer=2, n_head=2, n_embd=16, n_positions=32, vocab_size=50257))
    hf.save_pretrained(tmp_path / "hf")
    status, out, err = run_command(generate_main, ["--init", str(tmp_path / "hf"),
                                                   "--max-new-tokens", "5",
                                                   "--prompt", "hi", "--temperature", "0",
                                                   "--dtype",
                                                   "float32", "--device", "cpu"])
    assert status == 0, err
    tokenizer = get_tokenizer()
    prompt = torch.tensor([tokenizer.encode("hi")])
    expected = hf.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)[0].tolist()
    assert out.strip() == tokenizer.decode(expected).strip()


# ---- bad input: one-line errors naming the problem --------------------------------------------


@pytest.fixture
def hf_dir(tmp_path: Path) -> Path:
    random_hf_gpt2(TINY_CONFIGS[1]).save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def edit_config(directory: Path, **changes: object) -> None:
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **changes}))


def test_missing_tensor_is_named(hf_dir: Path) -> None:
    state = load_file(hf_dir / "model.safetensors")
    del state["transformer.h.0.mlp.c_fc.bias"]
    save_file(state, hf_dir / "model.safetensors")
    with pytest.raises(UserError, match=r"is missing tensor 'transformer\.h\.0\.mlp\.c_fc\.bias'"):
        load_pretrained(hf_dir)


def test_shape_mismatch_names_tensor_and_shapes(hf_dir: Path) -> None:
    edit_config(hf_dir, n_positions=64)
    with pytest.raises(UserError, match=r"tensor 'transformer\.wpe\.weight' has shape \(32, 32\), "
                                        r"expected \(64, 32\) for this config"):
        load_pretrained(hf_dir)


def test_config_with_fewer_layers_than_the_tensors(hf_dir: Path) -> None:
    edit_config(hf_dir, n_layer=1)
    with pytest.raises(UserError, match=r"holds tensors this config does not use "
                                        r"\(transformer\.h\.1\."):
        load_pretrained(hf_dir)
    edit_config(hf_dir, n_layer=3)
    with pytest.raises(UserError, match=r"missing tensor 'transformer\.h\.2\.ln_1\.weight'"):
        load_pretrained(hf_dir)


def test_config_of_another_model_type(hf_dir: Path) -> None:
    edit_config(hf_dir, model_type="llama")
    with pytest.raises(UserError, match=r"config\.json is for a 'llama' model, not GPT-2"):
        load_pretrained(hf_dir)


def test_unknown_override_is_named(hf_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown GPTConfig field\(s\) n_head; known: "
                                          r"vocab_size, "):
        load_pretrained(hf_dir, n_head=2)


@pytest.mark.parametrize("damage", ["truncated", "not safetensors"])
def test_unreadable_safetensors(hf_dir: Path, damage: str) -> None:
    path = hf_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"<html>Not Found</html>")
    with pytest.raises(UserError, match=r"model\.safetensors .*the file is truncated or not "
                                        r"safetensors"):
        load_pretrained(hf_dir)


class _Exploit:
    marker = ""

    def __reduce__(self) -> tuple:
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pickles_are_loaded_without_running_code(tmp_path: Path, zip_format: bool) -> None:
    exploit = _Exploit()
    exploit.marker = str(tmp_path / "pwned")
    torch.save({"wte.weight": exploit}, tmp_path / "model.bin",
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(UserError, match=r"cannot read \S+model\.bin safely with "
                                        r"torch\.load\(weights_only"):
        load_pretrained(tmp_path / "model.bin")
    assert not (tmp_path / "pwned").exists()


def test_legacy_bin_file_loads(tmp_path: Path) -> None:
    """Files from torch < 1.6 cannot be memory-mapped; they are read whole, still with weights_only.
    """
    hf = random_hf_gpt2(dict(n_layer=1, n_head=1, n_embd=64, n_positions=8, vocab_size=30))
    torch.save(published_layout(hf), tmp_path / "old.bin", _use_new_zipfile_serialization=False)
    assert_same_logits(load_pretrained(tmp_path / "old.bin", drop_rate=0.0), hf)


def test_directory_of_no_known_layout_says_what_was_expected(tmp_path: Path) -> None:
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(UserError, match=r"none of the known layouts; expected a Hugging Face GPT-2 "
                                        r"directory \(config\.json \+ model\.safetensors or "
                                        r"pytorch_model\.bin\), OpenAI's release \(hparams\.json, "
                                        r"checkpoint, model\.ckpt\.index"):
        load_pretrained(tmp_path)
    with pytest.raises(UserError, match=r"expected a \.safetensors or \.bin file, or a directory"):
        load_pretrained(tmp_path / "weights.npz")


@pytest.fixture
def openai_dir(tmp_path: Path) -> Path:
    shutil.copytree(OPENAI_TINY, tmp_path / "openai")
    return tmp_path / "openai"


def test_openai_checkpoint_cannot_be_untied() -> None:
    with pytest.raises(UserError, match="OpenAI's GPT-2 format always ties the head"):
        load_pretrained(OPENAI_TINY, tie_embeddings=False)


def test_damaged_openai_hparams(openai_dir: Path) -> None:
    """(The damaged TensorFlow files are in test_tf_checkpoint.py.)"""
    path = openai_dir / "hparams.json"
    hparams = json.loads(path.read_text())
    os.truncate(path, path.stat().st_size // 2)
    with pytest.raises(UserError, match=r"cannot read \S+hparams\.json \(JSONDecodeError"):
        load_pretrained(openai_dir)
    del hparams["n_ctx"]
    path.write_text(json.dumps(hparams))
    with pytest.raises(UserError, match=r"hparams\.json lacks the field 'n_ctx'; it needs n_vocab, "
                                        r"n_ctx"):
        load_pretrained(openai_dir)
