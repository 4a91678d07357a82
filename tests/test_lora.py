"""LoRA adapters (`gpt.model.lora`) and their checkpoints (`gpt.checkpoints.lora`): the base's
logits at step 0, the update as the formula, merging, only the adapters training, the base
untouched, checkpoints of adapters alone and their size, every command loading them, and every bad
setting."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_runs import TOKENS, cli_error, params, tiny

from gpt.checkpoints.checkpoint import (
    ADAPTERS_FILE,
    LORA_FILE,
    WEIGHTS_FILE,
    load_checkpoint,
    save_model,
    stored_shapes,
)
from gpt.checkpoints.lora import weights_sha256
from gpt.checkpoints.weights import load_pretrained, save_hf
from gpt.cli.export import export
from gpt.cli.generate import main as generate_main
from gpt.eval.evaluate import main as evaluate_main
from gpt.model.config import GPTConfig
from gpt.model.lora import (
    DEFAULT_TARGETS,
    TARGETS,
    LoRALinear,
    LoRASettings,
    adapters_off,
    add_lora,
    merge_lora,
)
from gpt.model.model import GPT
from gpt.model.sampling import generate
from gpt.model.tokenizer import get_tokenizer
from gpt.training import trainer

pytestmark = pytest.mark.usefixtures("one_thread")
ALL = LoRASettings(rank=4, alpha=8.0, dropout=0.0, targets=TARGETS)


def tiny_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig.preset("tiny", **{"drop_rate": 0.0, "qkv_bias": True, **overrides})).eval()


def trained_adapters(model: GPT, seed: int = 1) -> GPT:
    """`model` with every adapter's B drawn at random, as if trained (B starts at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A saved tiny model, the base (--init) of the LoRA runs here."""
    directory = tmp_path_factory.mktemp("base") / "base"
    directory.mkdir()
    save_model(tiny_model(7, drop_rate=0.1), directory)
    return directory


def lora_cfg(tmp_path: Path, base: Path, **overrides):
    settings = dict(init=str(base), lora_rank=4, lora_alpha=8.0, lora_dropout=0.1, max_steps=4,
                    eval_freq=2)
    return tiny(tmp_path, **{**settings, **overrides})


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, base_dir) -> trainer.Run:
    """A LoRA run trained for 4 steps (dropout on: the base's and the adapters')."""
    with torch.random.fork_rng():
        run = trainer.setup(lora_cfg(tmp_path_factory.mktemp("lora"), base_dir), token_ids=TOKENS)
        trainer.fit(run)
    return run


# ---- the adapted model ---------------------------------------------------------------------------


@pytest.mark.parametrize("targets", [DEFAULT_TARGETS, TARGETS, ("lm_head",)])
def test_at_step_0_a_lora_model_computes_exactly_the_base_logits(targets) -> None:
    model = tiny_model()
    x, y = torch.randint(0, 50257, (2, 12)), torch.randint(0, 50257, (2, 12))
    logits, loss = model(x), model.loss(x, y)
    add_lora(model, LoRASettings(4, 8.0, 0.0, targets))
    assert torch.equal(model(x), logits)
    assert torch.equal(model.loss(x, y), loss)
    model.train()  # no dropout anywhere: the training forward too
    assert torch.equal(model(x), logits)


def test_an_adapted_layer_computes_w_plus_alpha_over_r_b_a() -> None:
    linear = torch.nn.Linear(6, 5)
    layer = trained_adapters(torch.nn.ModuleDict({"l": LoRALinear(linear, rank=2, alpha=3.0)}))["l"]
    x = torch.randn(4, 6, dtype=torch.float64)
    tensors = (linear.weight, linear.bias, layer.lora_A, layer.lora_B)
    W, b, A, B = (t.detach().double() for t in tensors)
    expected = x @ (W + 3.0 / 2 * B @ A).T + b  # the LoRA paper's h = W0 x + (alpha/r) B A x
    torch.testing.assert_close(layer.double()(x), expected)


def test_adapters_keep_the_base_weight_names_and_tensors_beside_them() -> None:
    model = tiny_model()
    base = dict(model.state_dict(keep_vars=True))
    add_lora(model, ALL)
    adapted = dict(model.state_dict(keep_vars=True))
    assert all(adapted[name] is tensor for name, tensor in base.items())  # the same Parameters
    assert model.lm_head.weight is model.tok_emb.weight  # a tied head stays tied
    added = sorted(adapted.keys() - base.keys())
    layers = [f"blocks.{i}.{t}" for i in range(2) for t in TARGETS[:-1]] + ["lm_head"]
    assert added == sorted(f"{layer}.lora_{m}" for layer in layers for m in "AB")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(added)


def test_adapters_off_is_the_base_and_merged_is_the_adapted_model() -> None:
    model = tiny_model()
    x = torch.randint(0, 50257, (2, 12))
    base = model(x)
    trained_adapters(add_lora(model, ALL))
    adapted = model(x)
    assert (adapted - base).abs().max() > 0.1
    with adapters_off(model):
        assert torch.equal(model(x), base)
    assert torch.equal(model(x), adapted)  # on again after the block
    merged = merge_lora(copy.deepcopy(model))
    torch.testing.assert_close(merged(x), adapted, rtol=1e-5, atol=1e-5)
    assert merged.state_dict().keys() == tiny_model().state_dict().keys()
    assert all(p.requires_grad for p in merged.parameters())
    # The adapted head got its own weight: the token embedding is the base's.
    assert not merged.config.tie_embeddings
    assert torch.equal(merged.tok_emb.weight, tiny_model().tok_emb.weight)


# ---- training: only the adapters learn ------------------------------------------------------


def test_only_the_adapters_have_gradients_and_optimizer_state(lora_run) -> None:
    adapters = {name: p for name, p in lora_run.model.named_parameters() if "lora_" in name}
    in_optimizer = [p for group in lora_run.optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in in_optimizer} == {id(p) for p in adapters.values()}
    assert {id(p) for p in lora_run.optimizer.state} == {id(p) for p in adapters.values()}
    named = lora_run.model.named_parameters()
    assert all((p.grad is not None) == ("lora_" in name) for name, p in named)
    assert all(p.abs().max() > 0 for name, p in adapters.items() if name.endswith("lora_B"))


def test_the_base_weights_are_bit_identical_after_training(lora_run, base_dir) -> None:
    trained = params(lora_run.model)
    for name, tensor in params(load_checkpoint(base_dir)).items():
        assert torch.equal(trained[name], tensor), name


def test_after_training_merged_and_unmerged_logits_agree(lora_run) -> None:
    x = torch.from_numpy(TOKENS[1][:16].astype("int64"))[None]
    model = copy.deepcopy(lora_run.model).eval()
    with torch.no_grad():
        merged = merge_lora(copy.deepcopy(model))(x)
        torch.testing.assert_close(merged, model(x), rtol=1e-5, atol=1e-5)


# ---- checkpoints: the adapters and a reference to the base ----------------------------------


def test_a_lora_checkpoint_holds_the_adapters_and_the_base_hash_not_the_base(lora_run,
                                                                           base_dir) -> None:
    for name in ("best", "last"):
        directory = lora_run.run_dir / name
        assert {p.name for p in directory.iterdir()} == {ADAPTERS_FILE, LORA_FILE, "config.json",
                                                         "train_state.pt"}
    record = json.loads((lora_run.run_dir / "last" / LORA_FILE).read_text())
    assert record == {"rank": 4, "alpha": 8.0, "dropout": 0.1, "targets": list(DEFAULT_TARGETS),
                      "base": {"source": str(base_dir.resolve()), "overrides": {"drop_rate": 0.1},
                               "sha256": weights_sha256(load_checkpoint(base_dir))}}


def test_the_base_hash_is_of_the_weights_whatever_their_file(base_dir, tmp_path) -> None:
    model = load_checkpoint(base_dir)
    save_hf(model, tmp_path / "hf")  # another format, another layout of every linear layer
    assert weights_sha256(load_pretrained(tmp_path / "hf")) == weights_sha256(model)
    with torch.no_grad():
        model.blocks[1].mlp.fc.weight[3, 5] += 1e-6
    assert weights_sha256(model) != weights_sha256(load_checkpoint(base_dir))


def test_every_command_reads_a_lora_run_as_its_base_with_the_adapters_merged(lora_run, tmp_path,
                                                                               run_command) -> None:
    model = copy.deepcopy(lora_run.model).eval()
    merged = merge_lora(copy.deepcopy(model))
    # --init, a teacher, a reference (load_pretrained): the merged model, weights names and all.
    loaded = load_pretrained(lora_run.run_dir)
    assert loaded.state_dict().keys() == merged.state_dict().keys()
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, merged.state_dict()[name], rtol=0, atol=0, msg=name)
    # generate.py: greedy text of the adapted model.
    tokenizer = get_tokenizer()
    prompt = torch.tensor([tokenizer.encode("Hello there")])
    expected = tokenizer.decode(generate(model, prompt, 6)[0, prompt.size(1):].tolist())
    best = str(lora_run.run_dir / "best")
    result = run_command(generate_main, ["--checkpoint", best, "--prompt", "Hello there",
                                         "--temperature", "0", "--max-new-tokens", "6", "--dtype",
                                         "float32", "--device", "cpu"])
    assert result.status == 0 and result.out == "Hello there" + expected + "\n"
    # evaluate: the adapted model's perplexity.
    text = tmp_path / "text.txt"
    text.write_text("Every effort moves you forward, one step at a time. " * 6)
    result = run_command(evaluate_main, ["--checkpoint", best, "--data", str(text), "--data-dir",
                                         str(tmp_path / "data"), "--device", "cpu", "--dtype",
                                         "float32", "--json"])
    ids = torch.tensor([tokenizer.encode(text.read_text())])
    with torch.no_grad():
        loss = F.cross_entropy(model(ids[:, :-1])[0], ids[0, 1:]).item()
    assert json.loads(result.out)["loss"] == pytest.approx(loss, rel=1e-5)


def test_the_export_of_a_lora_run_loads_in_transformers_as_the_adapted_model(lora_run, tmp_path,
                                                                            monkeypatch) -> None:
    from transformers import GPT2LMHeadModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    export(lora_run.run_dir, tmp_path / "hf")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    x = torch.from_numpy(TOKENS[1][:16].astype("int64"))[None]
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, lora_run.model.eval()(x), rtol=1e-5, atol=1e-5)
    lora_run.model.train()


def lora_checkpoint_bytes(cfg: GPTConfig, settings: LoRASettings, overhead: int) -> int:
    """A LoRA run's checkpoint directory size from the shapes: the adapters in float32 in
    adapters.safetensors and again as AdamW's two moments in train_state.pt, plus `overhead` (the
    files' headers, config.json, lora.json, the rest of the training state)."""
    with torch.device("meta"):
        model = add_lora(GPT(cfg), settings)
    adapters = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    return 3 * 4 * adapters + overhead


def base_bytes(cfg: GPTConfig) -> int:
    """The base's model.safetensors size from the shapes: every stored tensor in float32."""
    return sum(4 * math.prod(shape) for shape in stored_shapes(cfg).values())


def test_a_lora_checkpoint_is_under_a_tenth_of_its_base_on_disk_for_gpt2_shapes(tmp_path) -> None:
    # On disk: the mini preset, GPT-2's vocabulary and layer layout at 4 layers of 256 wide.
    cfg = GPTConfig.preset("mini")
    base = tmp_path / "base"
    base.mkdir()
    save_model(GPT(cfg), base)
    settings = LoRASettings(rank=8, alpha=16.0, dropout=0.05)
    run = trainer.train(tiny(tmp_path, preset="mini", drop_rate=0.0, init=str(base), lora_rank=8,
                             max_steps=1, run_name="lora"), token_ids=TOKENS)
    on_disk = sum(p.stat().st_size for p in (run.run_dir / "last").iterdir())
    base_size = (base / WEIGHTS_FILE).stat().st_size
    assert on_disk < base_size / 10
    # The size the shapes predict, with the overhead measured here: within 0.1% of the disk's.
    overhead = on_disk - lora_checkpoint_bytes(cfg, settings, 0)
    assert 0 < overhead < 64_000
    assert abs(base_bytes(cfg) - base_size) < base_size / 1000
    for name in ("gpt2-small", "gpt2-medium", "gpt2-large"):  # each layer's adapters: ~1/70 of it
        gpt2 = GPTConfig.preset(name)
        assert lora_checkpoint_bytes(gpt2, settings, overhead) < base_bytes(gpt2) / 10, name


# ---- bad input: one line, exit 2, nothing written -------------------------------------------


@pytest.mark.parametrize(("flags", "message"), [
    (["--lora-rank", "-1"], "--lora-rank must be 0 (off) or more, got -1"),
    (["--lora-rank", "4", "--lora-alpha", "0"], "--lora-alpha must be a positive number, got 0.0"),
    (["--lora-rank", "4", "--lora-dropout", "1"], "--lora-dropout must be in [0, 1), got 1.0"),
    (["--lora-rank", "4", "--lora-targets", "attn.q,mlp.fc"],
     "--lora-targets: unknown target 'attn.q'; choose from attn.qkv,attn.proj,"),
    (["--lora-rank", "4", "--lora-targets", "mlp.fc,mlp.fc"], "a target named twice"),
    (["--lora-alpha", "32"], "--lora-alpha sets up LoRA's adapters, which --lora-rank turns on"),
    (["--lora-rank", "4", "--init", "scratch"],
     "--lora-rank adapts trained weights, which --init names"),
    (["--lora-rank", "4", "--parallel", "fsdp"], "--lora-rank with --parallel fsdp: FSDP shards"),
    (["--lora-rank", "65"],
     "--lora-rank 65 is larger than blocks.0.attn.qkv, a 192 x 64 layer; use --lora-rank 64 or "
     "less"),
])
def test_bad_lora_settings_are_one_line_and_write_nothing(tmp_path, base_dir, capsys, flags,
                                                          message) -> None:
    out = tmp_path / "runs"
    err = cli_error(["--init", str(base_dir), "--data", "default", "--device", "cpu", "--out",
                     str(out), *flags], capsys)
    assert message in err
    assert not out.exists()
