"""Decoding against independent references: argmax loops, softmax frequencies, HF `generate`."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import Tensor
from torch.testing import assert_close
from transformers import GPT2Config, GPT2LMHeadModel

from gpt.base.errors import UserError
from gpt.checkpoints.key_map import gpt_to_hf_state_dict
from gpt.model.config import GPTConfig
from gpt.model.model import GPT
from gpt.model.sampling import DecodeSession, generate, sample_next, stream

VOCAB = 101


def random_model(context_length: int = 32, **overrides: object) -> GPT:
    """A small model whose greedy continuations vary and depend on the whole context.

    With GPT-2's 0.02 init every token gets about the same logit and greedy decoding repeats one
    token, which would make agreement between two decoding sessions nearly automatic. Unit-scale
    embeddings and head spread the logits; blocks at 0.2 make tokens far back in the window (the
    cache) matter.
    """
    cfg = GPTConfig(vocab_size=VOCAB, context_length=context_length, emb_dim=32, n_heads=4,
                    n_layers=2,
                    **{"drop_rate": 0.0, "tie_embeddings": False, **overrides})
    model = GPT(cfg).eval()
    scale = {"tok_emb": 1.0, "lm_head": 1.0, "pos_emb": 0.5}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # LayerNorm gains near 1, biases near 0
                param.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
            else:
                param.normal_(0.0, scale.get(name.split(".")[0], 0.2))
    return model


def argmax_loop(model: GPT, idx: Tensor, steps: int, window_start: dict[int,
                                                                        int] | None = None) -> Tensor:  # noqa: E501
    """Greedy decoding by full forwards. Without `window_start`: the last context_length tokens."""
    ctx = model.config.context_length
    with torch.no_grad():
        for _ in range(steps):
            n = idx.size(1)
            start = window_start[n] if window_start else max(0, n - ctx)
            next_token = model(idx[:, start:])[:, -1].argmax(dim=-1, keepdim=True)
            idx = torch.cat([idx, next_token], dim=1)
    return idx


def cached_window_starts(prompt_len: int, total: int, ctx: int) -> dict[int, int]:
    """What gpt/model/sampling.py documents for cached decoding: the first position the prediction
    after n tokens reads. The prompt is cropped to ctx; when the window would exceed ctx it restarts
    from the last ctx // 2 tokens."""
    start, starts = max(0, prompt_len - ctx), {}
    for n in range(prompt_len, total + 1):
        if n - start > ctx:
            start = n - ctx // 2
        starts[n] = start
    return starts


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_equals_a_plain_argmax_loop(use_cache: bool) -> None:
    model = random_model()
    idx = torch.randint(0, VOCAB, (3, 5))
    expected = argmax_loop(model, idx, 20)
    assert len(set(expected[0, 5:].tolist())) > 3  # the model does not just repeat one token
    assert torch.equal(generate(model, idx, 20, use_cache=use_cache), expected)


def test_near_zero_temperature_equals_greedy() -> None:
    model = random_model()
    idx = torch.randint(0, VOCAB, (2, 4))
    sampled = generate(model, idx, 15, temperature=1e-6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sampled, generate(model, idx, 15))


def test_stream_yields_the_tokens_generate_returns() -> None:
    model = random_model()
    idx = torch.randint(0, VOCAB, (2, 4))
    tokens = list(stream(model, idx, 7, temperature=1.0,
                         generator=torch.Generator().manual_seed(3)))
    assert [t.shape for t in tokens] == [(2,)] * 7
    full = generate(model, idx, 7, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.stack(tokens, dim=1), full[:, 4:])


def test_top_k_draws_only_the_k_most_likely() -> None:
    logits = torch.randn(1, 200)
    draws = sample_next(logits.expand(5000, -1), temperature=2.0, top_k=6,
                        generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == set(logits[0].topk(6).indices.tolist())  # all of them, no others


def nucleus_by_loop(probs: list[float], top_p: float) -> set[int]:
    """The smallest set of most likely tokens whose probabilities sum to at least top_p."""
    chosen, mass = set(), 0.0
    for token in sorted(range(len(probs)), key=lambda i: -probs[i]):
        chosen.add(token)
        mass += probs[token]
        if mass >= top_p:
            return chosen
    return chosen


@pytest.mark.parametrize("top_p", [0.3, 0.75, 0.9])
def test_top_p_draws_only_the_nucleus(top_p: float) -> None:
    logits = torch.tensor([[2.0, 0.5, 1.7, -1.0, 1.0, 0.2, -0.5, 1.2]])
    nucleus = nucleus_by_loop(torch.softmax(logits[0] / 0.7, dim=0).tolist(), top_p)
    draws = sample_next(logits.expand(5000, -1), temperature=0.7, top_p=top_p,
                        generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == nucleus
    assert 1 < len(nucleus) < 8 or top_p == 0.3


def test_top_k_is_applied_before_top_p() -> None:
    # p = (.4, .3, .2, .1). Top-2 renormalised is (.57, .43): a 0.5 nucleus is token 0 alone. The
    # other order (nucleus of the full distribution, then top-2) would also keep token 1.
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    draws = sample_next(logits.expand(2000, -1), temperature=1.0, top_k=2, top_p=0.5,
                        generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {0}
    assert set(sample_next(logits.expand(2000, -1), temperature=1.0, top_p=0.5).tolist()) == {0, 1}


def chi_square_p_value(observed: Tensor, probs: Tensor) -> float:
    """P(X >= statistic) for Pearson's chi-square with len(probs) - 1 degrees of freedom."""
    expected = probs * observed.sum()
    statistic = ((observed - expected) ** 2 / expected).sum()
    dof = torch.tensor((len(probs) - 1) / 2, dtype=torch.float64)
    return torch.special.gammaincc(dof, statistic.double() / 2).item()


@pytest.mark.parametrize(("temperature", "top_k"), [(0.7, None), (1.0, None), (1.6, 5)])
def test_sampled_frequencies_follow_softmax(temperature: float, top_k: int | None) -> None:
    logits = torch.tensor([1.0, -0.5, 2.0, 0.3, 0.0, -1.2, 1.5, 0.8])
    draws = sample_next(logits.expand(20000, -1), temperature=temperature, top_k=top_k,
                        generator=torch.Generator().manual_seed(0))
    kept = logits.topk(top_k).indices if top_k else torch.arange(len(logits))
    assert set(draws.tolist()) == set(kept.tolist())
    observed = torch.bincount(draws, minlength=len(logits))[kept].double()
    assert chi_square_p_value(observed, torch.softmax(logits[kept].double() / temperature,
                                                      0)) > 1e-3
    # The test has power: the same draws are clearly not from the distribution at another
    # temperature.
    assert chi_square_p_value(observed, torch.softmax(logits[kept].double() / (2 * temperature),
                                                      0)) < 1e-6


def test_cached_logits_equal_uncached_within_the_context() -> None:
    model = random_model(context_length=24)
    tokens = torch.randint(0, VOCAB, (2, 24))
    cached, uncached = DecodeSession(model, use_cache=True), DecodeSession(model, use_cache=False)
    with torch.no_grad():
        assert_close(cached.start(tokens[:, :6]), uncached.start(tokens[:, :6]), atol=1e-5,
                     rtol=1e-5)
        for n in range(6, 24):
            expected = model(tokens[:, : n + 1])[:, -1]
            assert_close(cached.step(tokens[:, n]), expected, atol=1e-5, rtol=1e-5)
            assert_close(uncached.step(tokens[:, n]), expected, atol=1e-5, rtol=1e-5)


def test_past_the_context_each_session_reads_its_documented_window() -> None:
    ctx = 16
    model = random_model(context_length=ctx)
    tokens = torch.randint(0, VOCAB, (2, 60))
    starts = cached_window_starts(prompt_len=20, total=60, ctx=ctx)  # the prompt itself is too long
    cached, uncached = DecodeSession(model, use_cache=True), DecodeSession(model, use_cache=False)
    differs = []
    with torch.no_grad():
        for n in range(20, 60):
            if n == 20:
                got_cached, got_uncached = cached.start(tokens[:, :20]), uncached.start(tokens[:,
                                                                                               :20])
            else:
                got_cached, got_uncached = cached.step(tokens[:, n - 1]), uncached.step(tokens[:,
                                                                                               n - 1])  # noqa: E501
            assert_close(got_cached, model(tokens[:, starts[n]:n])[:, -1], atol=1e-5, rtol=1e-5)
            assert_close(got_uncached, model(tokens[:, n - ctx:n])[:, -1], atol=1e-5, rtol=1e-5)
            differs.append(not torch.allclose(got_cached, got_uncached, atol=1e-3))
    assert any(differs)  # the documented tradeoff is real: a rebuilt cache reads a shorter window


def test_greedy_past_the_context_follows_the_documented_windows() -> None:
    model = random_model(context_length=16)
    idx = torch.randint(0, VOCAB, (2, 5))
    out = generate(model, idx, 40)
    assert out.shape == (2, 45)
    assert torch.equal(out, argmax_loop(model, idx, 40, cached_window_starts(5, 45, 16)))
    assert torch.equal(generate(model, idx, 40, use_cache=False), argmax_loop(model, idx, 40))


def test_rows_stop_at_their_own_eos_and_are_padded() -> None:
    model = random_model()
    idx = torch.randint(0, VOCAB, (4, 3))
    free = generate(model, idx, 16)[:, 3:]  # no eos
    eos = int(free[0, 3])
    first = [row.tolist().index(eos) if eos in row.tolist() else None for row in free]
    assert first[0] is not None and first[0] <= 3
    assert any(f is None or f > first[0] for f in first[1:])  # rows do stop at different times
    expected = free.clone()
    for row, f in enumerate(first):
        if f is not None:
            expected[row, f + 1:] = eos
    length = 16 if None in first else max(first) + 1
    assert torch.equal(generate(model, idx, 16, eos_id=eos)[:, 3:], expected[:, :length])
    # One row alone stops right after its eos.
    alone = generate(model, idx[:1], 16, eos_id=eos)
    assert torch.equal(alone[0, 3:], free[0, : first[0] + 1])


def test_same_seed_same_sample_other_seed_other_sample() -> None:
    model = random_model()
    idx = torch.randint(0, VOCAB, (2, 4))

    def sample(seed: int) -> Tensor:
        return generate(model, idx, 20, temperature=1.0, top_k=20, top_p=0.9,
                        generator=torch.Generator().manual_seed(seed))

    assert torch.equal(sample(7), sample(7))
    assert not torch.equal(sample(7), sample(8))


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_matches_hugging_face_generate(use_cache: bool) -> None:
    ours = random_model(qkv_bias=True)
    cfg = ours.config
    hf_config = GPT2Config(vocab_size=VOCAB, n_positions=cfg.context_length, n_embd=cfg.emb_dim,
                           n_layer=cfg.n_layers, n_head=cfg.n_heads, tie_word_embeddings=False,
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = GPT2LMHeadModel(hf_config).eval()
    hf.load_state_dict(gpt_to_hf_state_dict(ours.state_dict(), cfg), strict=True)
    idx = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        assert_close(hf(idx).logits, ours(idx), atol=1e-5, rtol=1e-5)  # the same weights, really
        theirs = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=24,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    assert theirs.shape == (2, 30)
    assert torch.equal(generate(ours, idx, 24, use_cache=use_cache), theirs)


def test_bf16_model_and_autocast_decode_like_float32() -> None:
    model = random_model()
    idx = torch.randint(0, VOCAB, (2, 8))
    reference = DecodeSession(model).start(idx)
    scale = reference.abs().max()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.new_kv_cache(1)[0].keys.dtype == torch.bfloat16
        under_autocast = DecodeSession(model).start(idx)
        assert generate(model, idx, 5).shape == (2, 13)
    bf16_model = random_model()
    bf16_model.load_state_dict(model.state_dict())
    bf16_model.to(torch.bfloat16)
    in_bf16 = DecodeSession(bf16_model).start(idx)
    assert generate(bf16_model, idx, 5, temperature=1.0, top_k=10).shape == (2, 13)
    for logits in (under_autocast, in_bf16):
        assert logits.dtype == torch.bfloat16
        assert (logits.float() - reference).abs().max() < 0.05 * scale


def test_generation_uses_eval_mode_and_restores_the_mode() -> None:
    model = random_model(drop_rate=0.5)
    idx = torch.randint(0, VOCAB, (1, 4))
    model.train()
    first = generate(model, idx, 10)
    assert model.training
    assert torch.equal(first, generate(model.eval(), idx, 10))  # no dropout while generating


def test_inference_mode_does_not_leak_into_the_callers_loop() -> None:
    model = random_model()
    for _ in stream(model, torch.zeros(1, 1, dtype=torch.long), 3):
        assert not torch.is_inference_mode_enabled()


def test_zero_new_tokens_returns_the_prompt() -> None:
    idx = torch.randint(0, VOCAB, (2, 4))
    assert torch.equal(generate(random_model(), idx, 0), idx)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(temperature=-0.1), "temperature must be >= 0"),
        (dict(temperature=float("nan")), "temperature must be >= 0"),
        (dict(top_k=0), "top_k must be an integer >= 1"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0"),
        (dict(eos_id=VOCAB), f"eos_id {VOCAB} is not a token of this model"),
        (dict(idx=torch.zeros(4, dtype=torch.long)), "idx must be a"),
        (dict(idx=torch.zeros(1, 0, dtype=torch.long)), "idx must be a"),
    ],
)
def test_bad_arguments_fail_at_the_call(kwargs: dict, message: str) -> None:
    args = dict(idx=torch.zeros(1, 2, dtype=torch.long), max_new_tokens=3) | kwargs
    with pytest.raises(UserError, match=message):
        stream(random_model(), **args)  # raises before any iteration


@pytest.mark.parametrize("use_cache", [True, False])
def test_a_padded_vocabulary_never_yields_a_padding_id(use_cache: bool) -> None:
    """The padding rows' logits are dropped: even made the largest, they are never picked."""
    model = random_model(vocab_pad_multiple=64)
    vocab_size = model.config.vocab_size
    assert model.config.padded_vocab_size > vocab_size
    with torch.no_grad():
        model.lm_head.weight[vocab_size:] = 100.0 * model.tok_emb.weight[:vocab_size].abs().max()
    idx = torch.randint(0, vocab_size, (2, 5))
    assert argmax_loop(model, idx, 12).max() < vocab_size
    greedy = generate(model, idx, 12, use_cache=use_cache)
    torch.testing.assert_close(greedy, argmax_loop(model, idx, 12))
    sampled = generate(model, idx, 12, temperature=1.0, use_cache=use_cache,
                       generator=torch.Generator().manual_seed(0))
    assert sampled.max() < vocab_size


def test_a_compiled_model_decodes_like_the_eager_one() -> None:
    """`compile_for_decoding` (inductor, frozen weights): the same greedy tokens and, step by step,
    the same cached logits within 1e-5 (fp32). In a subprocess: freezing is a process-wide
    setting."""
    script = textwrap.dedent("""
        import sys, torch
        from torch._dynamo.utils import counters
        from torch.testing import assert_close
        sys.path.insert(0, sys.argv[1])
        from test_sampling import random_model
        from gpt.model.sampling import DecodeSession, compile_for_decoding, generate
        torch.manual_seed(0)
        model = random_model(context_length=24)
        compiled = compile_for_decoding(model)
        prompt = torch.randint(0, 101, (2, 5))
        with torch.inference_mode():
            eager_session, compiled_session = DecodeSession(model), DecodeSession(compiled)
            expected, got = eager_session.start(prompt), compiled_session.start(prompt)
            for _ in range(12):
                assert_close(got, expected, rtol=1e-5, atol=1e-5)
                token = expected.argmax(-1)
                expected, got = eager_session.step(token), compiled_session.step(token)
        # 30 new tokens: past the context of 24, so the cache is rebuilt on the way.
        assert torch.equal(generate(compiled, prompt, 30), generate(model, prompt, 30))
        print(counters["stats"]["unique_graphs"])
    """)
    result = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.split()[-1]) >= 1  # it really ran compiled graphs

