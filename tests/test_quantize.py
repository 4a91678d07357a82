"""Decoding weights: int8 against bf16 on a trained model and a dequantized reference; prepacked
bf16 against plain bf16; the state dict; `generate.py --quantize`."""

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import GPT2Config, GPT2LMHeadModel

from gpt.base.atomic import atomic_directory
from gpt.base.errors import UserError
from gpt.checkpoints.checkpoint import load_checkpoint as load_model
from gpt.checkpoints.checkpoint import save_model
from gpt.checkpoints.weights import cast, load_pretrained
from gpt.cli.export import export
from gpt.cli.generate import main as generate_main
from gpt.model.config import GPTConfig
from gpt.model.loss import lm_loss
from gpt.model.model import GPT
from gpt.model.quantize import (
    Int8Linear,
    PackedLinear,
    can_prepack,
    prepack,
    prepare_for_decoding,
    quantize_int8,
    quantize_rows,
)
from gpt.model.sampling import generate

VOCAB, CONTEXT = 256, 64
# The tiny preset with a small vocabulary, so that a few hundred steps train it well.
CFG = GPTConfig.preset("tiny", vocab_size=VOCAB, context_length=CONTEXT, drop_rate=0.0)


def generated_text(n_tokens: int, seed: int = 0) -> Tensor:
    """A token stream with structure to learn: 32 fixed random 8-token phrases, each phrase usually
    (4 times in 5) followed by the one a fixed random map assigns it, otherwise by a random one."""
    g = torch.Generator().manual_seed(seed)
    phrases = torch.randint(0, VOCAB, (32, 8), generator=g)
    successor = torch.randperm(32, generator=g)
    order, phrase = [], 0
    while len(order) * 8 < n_tokens:
        order.append(phrase)
        follows = torch.rand((), generator=g) < 0.8
        phrase = int(successor[phrase]) if follows else int(torch.randint(0, 32, (), generator=g))
    return phrases[torch.tensor(order)].flatten()[:n_tokens]


@pytest.fixture(scope="module")
def trained() -> GPT:
    """The tiny model after 300 AdamW steps on `generated_text`, in bf16 for decoding."""
    torch.manual_seed(0)
    text = generated_text(40_000)
    model = GPT(CFG)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        starts = torch.randint(0, len(text) - CONTEXT - 1, (16,))
        window = torch.stack([text[s:s + CONTEXT + 1] for s in starts.tolist()])
        loss = F.cross_entropy(model(window[:, :-1]).flatten(0, 1), window[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 1.5  # it learned the phrases (uniform guessing: ln 256 = 5.5)
    return model.eval().to(torch.bfloat16)


def copy_of(model: GPT) -> GPT:
    clone = GPT(model.config).to(model.tok_emb.weight.dtype)
    clone.load_state_dict(model.state_dict())
    return clone.eval()


def prompts() -> Tensor:
    return generated_text(4 * 16, seed=1).view(4, 16)


# Logits: 4 bf16 steps at 8-16, and 2.7x the largest int8 deviation measured (0.094).
NEAR_TIE = 0.25


def assert_same_greedy_text(got: Tensor, reference: GPT, idx: Tensor) -> None:
    """`got` (B, T + n) is `reference`'s greedy continuation of `idx` (B, T), token for token, up to
    the first token `reference` chose by less than `NEAR_TIE` over the runner-up: a near tie, which
    any rounding may decide (the trained model has none: min gap 0.56; a model trained from another
    seed had one of 0.06). At least 3/4 of the new tokens must be compared."""
    expected = generate(reference, idx, got.size(1) - idx.size(1))
    with torch.inference_mode():  # the logits that chose each new token
        logits = reference(expected[:, :-1]).float()[:, idx.size(1) - 1:]
    top2 = logits.topk(2, dim=-1).values
    gaps = top2[..., 0] - top2[..., 1]  # (B, n)
    compared = 0
    for row, clear in enumerate(gaps >= NEAR_TIE):
        n = len(clear) if clear.all() else int((~clear).nonzero()[0])
        assert torch.equal(got[row, :idx.size(1) + n], expected[row, :idx.size(1) + n]), row
        compared += n
    assert compared >= 0.75 * gaps.numel(), compared


@pytest.mark.parametrize("include_head", [True, False])
def test_int8_logits_point_the_way_bf16_logits_do_at_every_position(trained: GPT,
                                                                    include_head: bool) -> None:
    text = generated_text(2 * CONTEXT, seed=2).view(2, CONTEXT)
    int8 = quantize_int8(copy_of(trained), include_head=include_head)
    with torch.inference_mode():
        reference, quantized = trained(text).float(), int8(text).float()
    cosine = F.cosine_similarity(quantized, reference, dim=-1)  # (2, CONTEXT): one per position
    assert cosine.min() >= 0.999
    assert not torch.equal(quantized, reference)  # the weights really changed


@pytest.mark.parametrize("include_head", [True, False])
def test_int8_greedy_decoding_matches_bf16_on_a_trained_model(trained: GPT,
                                                              include_head: bool) -> None:
    int8 = quantize_int8(copy_of(trained), include_head=include_head)
    assert_same_greedy_text(generate(int8, prompts(), 40), trained, prompts())


def test_int8_cached_decoding_equals_uncached(trained: GPT) -> None:
    int8 = quantize_int8(copy_of(trained))
    idx = prompts()
    cached = generate(int8, idx, 30, use_cache=True)
    assert_same_greedy_text(generate(int8, idx, 30, use_cache=False), int8, idx)
    with torch.inference_mode():  # each cached step's logits are those of a full forward
        cache = int8.new_kv_cache(idx.size(0))
        int8(cached[:, :16], cache)
        for n in range(16, 40):
            step = int8(cached[:, n:n + 1], cache)[:, -1].float()
            full = int8(cached[:, :n + 1])[:, -1].float()
            assert (step - full).abs().max() <= 0.02 * full.abs().max()


def test_an_int8_layer_computes_with_its_dequantized_weight() -> None:
    """Against the formula y = x @ (q * scale).T + b in float64, for the awkward inputs too: a
    strided view, and rows that start off the kernel's 32-byte alignment (it would crash on
    them)."""
    linear = torch.nn.Linear(64, 48).to(torch.bfloat16)
    layer = Int8Linear.from_linear(linear)
    dequantized = layer.weight.double() * layer.scales.double()[:, None]
    x = torch.randn(5, 3, 64).to(torch.bfloat16)
    strided = torch.randn(5, 3, 128).to(torch.bfloat16)[..., ::2]
    offset = torch.randn(5 * 3 * 64 + 1).to(torch.bfloat16)[1:].view(5, 3, 64)
    for inputs in (x, strided, offset):
        expected = inputs.double() @ dequantized.T + linear.bias.double()
        got = layer(inputs)
        assert got.shape == (5, 3, 48) and got.dtype == torch.bfloat16
        assert (got.double() - expected).abs().max() <= 0.02 * expected.abs().max()


def test_quantized_rows_are_within_half_a_step_of_the_weights() -> None:
    # rows of very different scales
    weight = torch.randn(32, 64) * torch.logspace(-3, 1, 32)[:, None]
    weight[5] = 0.0  # an all-zero row (vocabulary padding) must not divide by zero
    q, scales = quantize_rows(weight.to(torch.bfloat16))
    assert q.dtype == torch.int8 and scales.dtype == torch.bfloat16 and q.abs().max() <= 127
    assert q.abs().amax(dim=1)[torch.arange(32) != 5].min() >= 126  # each row uses the full range
    error = (q.float() * scales.float()[:, None] - weight.to(torch.bfloat16).float()).abs()
    assert (error <= scales.float()[:, None] * 0.5 * 1.01).all()
    assert torch.equal(q[5], torch.zeros(64, dtype=torch.int8))


def test_quantizing_the_tied_head_leaves_the_embedding_alone(trained: GPT) -> None:
    model = copy_of(trained)
    assert model.lm_head.weight is model.tok_emb.weight
    embedding = model.tok_emb.weight.detach().clone()
    quantize_int8(model, include_head=True)
    assert isinstance(model.lm_head, Int8Linear) and model.lm_head.weight.dtype == torch.int8
    assert isinstance(model.tok_emb.weight, torch.nn.Parameter)
    assert torch.equal(model.tok_emb.weight, embedding)
    kept = quantize_int8(copy_of(trained), include_head=False)
    assert kept.lm_head.weight is kept.tok_emb.weight
    assert isinstance(kept.blocks[0].mlp.fc, Int8Linear)


@pytest.mark.parametrize("include_head", [True, False])
def test_a_quantized_state_dict_round_trips(trained: GPT, tmp_path: Path,
                                            include_head: bool) -> None:
    model = quantize_int8(copy_of(trained), include_head=include_head)
    torch.save(model.state_dict(), tmp_path / "int8.pt")
    fresh = quantize_int8(GPT(CFG).to(torch.bfloat16), include_head=include_head).eval()
    fresh.load_state_dict(torch.load(tmp_path / "int8.pt", weights_only=True))
    text = prompts()
    with torch.inference_mode():
        assert torch.equal(fresh(text), model(text))


def test_the_loss_of_a_model_made_for_decoding_is_the_loss_of_its_logits(trained: GPT) -> None:
    """`GPT.loss` (what evaluation calls) cannot chunk a head with no plain weight: full logits
    then."""
    text = generated_text(2 * (CONTEXT + 1), seed=3).view(2, CONTEXT + 1)
    x, y = text[:, :-1], text[:, 1:]
    models = [quantize_int8(copy_of(trained))] + ([prepack(copy_of(trained))]
                                                  if can_prepack(trained) else [])
    with torch.no_grad():
        for model in models:
            assert torch.equal(model.loss(x, y, chunk_size=16), lm_loss(model(x), y))


def test_int8_refuses_what_its_kernel_cannot_run() -> None:
    with pytest.raises(UserError, match="bfloat16"):
        quantize_int8(GPT(CFG))  # float32 on a CPU
    with pytest.raises(UserError, match="multiple of 16"):
        quantize_int8(GPT(CFG.replace(emb_dim=72, n_heads=2)).to(torch.bfloat16))
    with pytest.raises(UserError, match="unknown --quantize 'int4'"):
        prepare_for_decoding(GPT(CFG).to(torch.bfloat16), "int4")


@pytest.mark.skipif(not can_prepack(GPT(CFG).to(torch.bfloat16)), reason="needs a CPU with native "
                                                                         "bf16")
def test_prepacked_bf16_decodes_exactly_like_plain_bf16(trained: GPT) -> None:
    packed = prepack(copy_of(trained))
    assert isinstance(packed.lm_head, PackedLinear) and isinstance(packed.blocks[1].attn.qkv,
                                                                   PackedLinear)
    # the tied table stays as it was
    assert torch.equal(packed.tok_emb.weight, trained.tok_emb.weight)
    idx = prompts()
    assert_same_greedy_text(generate(packed, idx, 40), trained, idx)
    with torch.inference_mode():  # one position at a time (a decoding step): the same bits
        cache, packed_cache = trained.new_kv_cache(4), packed.new_kv_cache(4)
        for n in range(16):
            token = idx[:, n:n + 1]
            assert torch.equal(packed(token, packed_cache), trained(token, cache))
    state = packed.state_dict()  # unpacked again, under the nn.Linear names
    assert all(torch.equal(state[name], value) for name, value in trained.state_dict().items())


def test_generate_quantize_flag_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           run_command) -> None:
    """`generate.py --quantize` (its `main`; test_generate_cli.py runs the script as a process): it
    samples, and says the weights are int8; bad values are one line."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(context_length=32, emb_dim=32, n_heads=2, n_layers=1, drop_rate=0.0))
    with atomic_directory(tmp_path / "runs" / "x" / "best") as tmp:
        save_model(model, tmp)
    monkeypatch.chdir(tmp_path)  # the default checkpoint: the latest run under runs/
    greedy = ["--temperature", "0", "--max-new-tokens", "6"]
    status, out, err = run_command(generate_main, [*greedy, "--quantize", "int8"])
    assert status == 0, err
    assert out.startswith("Every effort moves you") and "int8" in err
    bad_flags = [(["--quantize", "int4"], "int4"), (["--quantize", "int8", "--dtype", "float32"],
                                                    "bfloat16")]
    for bad, named in bad_flags:
        status, out, err = run_command(generate_main, bad)
        assert status == 2 and out == ""
        assert err.startswith("error: ") and err.count("\n") == 1
        assert named in err


# ---- every way a model is loaded: our checkpoint, a HF directory, OpenAI's files, an export ------


# written by TensorFlow, emb_dim 16
OPENAI_TINY = Path(__file__).parent / "fixtures" / "openai_tiny"


def model_source(how: str, tmp_path: Path) -> tuple[list[str], Callable[[], GPT]]:
    """generate.py's flags for a model saved the `how` way, and a loader giving it in float32."""
    torch.manual_seed(0)
    if how == "openai":
        return ["--init", str(OPENAI_TINY)], lambda: load_pretrained(OPENAI_TINY)
    directory = tmp_path / how
    if how.startswith("hf"):  # written by transformers itself: Conv1D weights (in, out)
        hf = GPT2LMHeadModel(GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=2))
        (hf.half() if how == "hf_float16" else hf).save_pretrained(directory)
        return ["--init", str(directory)], lambda: load_pretrained(directory)
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    save_model(GPT(GPTConfig(context_length=64, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0)),
               checkpoint)
    if how == "checkpoint":
        return ["--checkpoint", str(checkpoint)], lambda: load_model(checkpoint)
    export(checkpoint, directory)  # our weights in HF's layout, read back as HF's are
    return ["--init", str(directory)], lambda: load_pretrained(directory)


# hf_float16: a file in half precision, which the import copies to float32 (row-major, then).
LOADS = ["checkpoint", "hf", "hf_float16", "openai", "export"]


@pytest.mark.parametrize("how", LOADS)
def test_int8_and_prepacked_decoding_work_whichever_way_the_model_was_loaded(
        tmp_path: Path, how: str) -> None:
    """A HF or OpenAI import keeps each Conv1D weight as a transposed view of the file, and a plain
    `.to(bfloat16)` keeps that layout; the int8 kernel used to refuse it ("expect B to be
    contiguous"). Cast by `cast` (what generate.py does) or by `.to`: int8 logits point the way bf16
    logits do, and prepacked decoding steps are plain bf16's, bit for bit."""
    _, load = model_source(how, tmp_path)
    plain = load().to(torch.bfloat16).eval()
    assert plain.blocks[0].mlp.fc.weight.is_contiguous() == (how in ("checkpoint", "hf_float16"))
    assert all(p.is_contiguous() for p in cast(load(), torch.bfloat16).parameters())
    cfg = plain.config
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.context_length), generator=generator)
    with torch.inference_mode():
        reference = plain(tokens).float()
    for bf16 in (cast(load(), torch.bfloat16), load().to(torch.bfloat16)):
        int8 = quantize_int8(bf16.eval())
        with torch.inference_mode():
            quantized = int8(tokens).float()
        assert F.cosine_similarity(quantized, reference, dim=-1).min() >= 0.999
        assert not torch.equal(quantized, reference)  # the weights really are int8
    if not can_prepack(plain):
        return
    for bf16 in (cast(load(), torch.bfloat16), load().to(torch.bfloat16)):
        packed = prepack(bf16.eval())
        with torch.inference_mode():
            cache, packed_cache = plain.new_kv_cache(2), packed.new_kv_cache(2)
            for n in range(8):
                step = tokens[:, n:n + 1]
                assert torch.equal(packed(step, packed_cache), plain(step, cache)), n


@pytest.mark.parametrize("how", LOADS)
def test_generate_decodes_in_int8_whichever_way_the_model_was_loaded(
        tmp_path: Path, how: str, run_command) -> None:
    """`generate.py --init HF_DIR --dtype bfloat16 --quantize int8` used to end in a traceback."""
    source, _ = model_source(how, tmp_path)
    flags = ["--dtype", "bfloat16", "--quantize", "int8", "--prompt", "!", "--max-new-tokens", "5",
             "--temperature", "0", "--device", "cpu"]
    status, out, err = run_command(generate_main, [*source, *flags])
    assert status == 0, err
    assert out.startswith("!") and "int8 weights in every linear layer" in err


def error_line(err: str) -> str:
    """The one `error: ` line a failed command printed, after what it printed while loading."""
    lines = err.splitlines()
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], err
    return lines[-1]


def failing(message: str) -> Callable[..., Tensor]:
    def kernel(*args, **kwargs) -> Tensor:
        raise RuntimeError(message)

    return kernel


def test_a_failing_int8_kernel_is_one_line_naming_quantize_none(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_command) -> None:
    source, _ = model_source("checkpoint", tmp_path)
    flags = [*source, "--dtype", "bfloat16", "--quantize", "int8", "--max-new-tokens", "2"]
    kernel = failing("_weight_int8pack_mm_cpu : no.\nmore")  # only the first line is shown
    monkeypatch.setattr(torch, "_weight_int8pack_mm", kernel)
    status, _, err = run_command(generate_main, flags)
    assert status == 2
    assert error_line(err) == ("error: torch's int8 kernel failed on this machine (RuntimeError: "
                               "_weight_int8pack_mm_cpu : no.); use --quantize none")
    # Out of memory keeps its own advice.
    out_of_memory = failing("DefaultCPUAllocator: can't allocate memory")
    monkeypatch.setattr(torch, "_weight_int8pack_mm", out_of_memory)
    status, _, err = run_command(generate_main, flags)
    assert status == 2 and error_line(err).startswith("error: out of memory (")


@pytest.mark.skipif(not can_prepack(GPT(CFG).to(torch.bfloat16)),
                    reason="needs a CPU with native bf16")
@pytest.mark.parametrize("op", ["_reorder_linear_weight", "_linear_pointwise"])
def test_a_failing_prepacked_kernel_is_one_line_naming_what_avoids_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_command, op: str) -> None:
    source, _ = model_source("checkpoint", tmp_path)
    monkeypatch.setattr(torch.ops.mkldnn, op, failing("mkldnn says no"))
    flags = [*source, "--max-new-tokens", "2"]
    status, _, err = run_command(generate_main, [*flags, "--dtype", "bfloat16"])
    assert status == 2
    assert error_line(err).endswith("(RuntimeError: mkldnn says no); use --quantize none with "
                                    "--dtype float32, whose weights are not prepacked")
    status, _, err = run_command(generate_main, [*flags, "--dtype", "float32"])
    assert status == 0, err  # the advice works
