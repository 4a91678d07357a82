import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.testing import assert_close

from gpt.base.errors import UserError
from gpt.model.config import GPTConfig
from gpt.model.loss import IGNORE_INDEX
from gpt.model.model import GPT, Dropout, dropout_keep_mask, reference_attention

TINY = GPTConfig.preset("tiny", drop_rate=0.0)


def test_logits_shape() -> None:
    model = GPT(TINY)
    idx = torch.randint(0, TINY.vocab_size, (3, 17))
    assert model(idx).shape == (3, 17, TINY.vocab_size)


def test_too_long_sequence_names_both_lengths() -> None:
    model = GPT(TINY)
    idx = torch.zeros(1, TINY.context_length + 1, dtype=torch.long)
    with pytest.raises(UserError, match=f"{TINY.context_length + 1}.*{TINY.context_length}"):
        model(idx)


@pytest.mark.parametrize("pad_multiple", [1, 64])  # 64: the head has padding rows
@pytest.mark.parametrize("chunk_size", [0, 7])
def test_loss_is_cross_entropy_of_the_full_logits(pad_multiple: int, chunk_size: int) -> None:
    """`GPT.loss` against `F.cross_entropy` on the logits of `forward`: same value, same gradients.
    """
    model = GPT(GPTConfig.preset("tiny", vocab_size=300, drop_rate=0.0,
                                 vocab_pad_multiple=pad_multiple))
    assert model.lm_head.weight.size(0) == (300 if pad_multiple == 1 else 320)
    idx, targets = torch.randint(0, 300, (2, 9)), torch.randint(0, 300, (2, 9))
    targets[1, :3] = IGNORE_INDEX
    expected = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten(),
                               ignore_index=IGNORE_INDEX)
    expected_grads = torch.autograd.grad(expected, list(model.parameters()))
    loss = model.loss(idx, targets, chunk_size=chunk_size)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert loss.shape == () and loss.dtype == torch.float32
    assert_close(loss, expected)
    for (name, _), got, want in zip(model.named_parameters(), grads, expected_grads, strict=True):
        assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)


def test_head_is_tied_by_shared_storage() -> None:
    model = GPT(TINY)
    assert model.lm_head.weight is model.tok_emb.weight
    assert model.lm_head.weight.data_ptr() == model.tok_emb.weight.data_ptr()
    with torch.no_grad():
        model.tok_emb.weight[0, 0] = 123.0
    assert model.lm_head.weight[0, 0] == 123.0


def test_untied_head_is_a_separate_tensor() -> None:
    model = GPT(TINY.replace(tie_embeddings=False))
    assert model.lm_head.weight.data_ptr() != model.tok_emb.weight.data_ptr()


def test_parameter_count_matches_a_formula() -> None:
    cfg = GPTConfig(vocab_size=1000, context_length=32, emb_dim=48, n_heads=4, n_layers=3,
                    qkv_bias=True)
    V, L, C = cfg.vocab_size, cfg.context_length, cfg.emb_dim
    per_block = (2 * 2 * C) + (3 * C * C + 3 * C) + (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C
                                                                                         + C)
    expected = V * C + L * C + cfg.n_layers * per_block + 2 * C
    model = GPT(cfg)
    assert model.num_parameters() == expected
    assert model.num_parameters(count_tied_head_twice=True) == expected + V * C
    untied = GPT(cfg.replace(tie_embeddings=False))
    assert untied.num_parameters() == expected + V * C


def test_book_parameter_counts_for_gpt2_small() -> None:
    with torch.device("meta"):
        model = GPT(GPTConfig.preset("gpt2-small"))
    assert model.num_parameters() == 124_439_808
    assert model.num_parameters(count_tied_head_twice=True) == 163_037_184


@pytest.mark.parametrize(("T", "S"), [(1, 1), (7, 7), (1, 9), (4, 9)])
def test_sdpa_agrees_with_the_explicit_formula(T: int, S: int) -> None:
    q = torch.randn(2, 3, T, 8)
    k, v = torch.randn(2, 3, S, 8), torch.randn(2, 3, S, 8)
    mask = torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert_close(reference_attention(q, k, v), expected, atol=1e-6, rtol=1e-5)


def test_attention_layer_equals_formula_on_its_own_projections() -> None:
    model = GPT(TINY).eval()
    attn = model.blocks[0].attn
    x = torch.randn(2, 11, TINY.emb_dim)
    q, k, v = attn.qkv(x).split(TINY.emb_dim, dim=2)
    heads = [t.view(2, 11, TINY.n_heads, TINY.head_dim).transpose(1, 2) for t in (q, k, v)]
    y = reference_attention(*heads).transpose(1, 2).reshape(2, 11, TINY.emb_dim)
    assert_close(attn(x), attn.proj(y), atol=1e-6, rtol=1e-5)


def test_attention_without_dropout_is_sdpas_math_kernel_bit_for_bit_in_float32() -> None:
    """Written out the same way as SDPA's own fallback (its math kernel), the formula gives its
    result exactly, with a square causal mask and with one shifted for a KV cache."""
    k, v = torch.randn(2, 3, 16, 8), torch.randn(2, 3, 16, 8)
    with sdpa_kernel(SDPBackend.MATH):
        for T in (16, 5):
            q = torch.randn(2, 3, T, 8)
            mask = torch.ones(T, 16, dtype=torch.bool).tril(diagonal=16 - T)
            assert torch.equal(reference_attention(q, k, v),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def causal_softmax(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(QKᵀ/√D) over the visible keys, written independently of `reference_attention`."""
    T, S = q.size(-2), k.size(-2)
    future = torch.arange(S)[None, :] > torch.arange(S - T, S)[:, None]  # key j after query i
    scores = q @ k.transpose(-2, -1) / q.size(-1) ** 0.5
    return torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.75])
def test_dropout_keep_mask_keeps_each_element_with_probability_one_minus_p(p: float) -> None:
    torch.manual_seed(0)
    n = 1_000_000
    keep = dropout_keep_mask(torch.Size([10, n // 10]), p, torch.device("cpu")).flatten()
    assert keep.shape == (n,) and keep.dtype == torch.bool
    sigma = ((1 - p) * p / n) ** 0.5
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma + 1 / 131072  # + the quantisation
    # Independent elements, the four 16-bit lanes of each 64-bit draw included: as many neighbours
    # are both kept as the product of the probabilities says (shared bits would make it more).
    both = (keep[:-1] & keep[1:]).float().mean().item()
    assert abs(both - (1 - p) ** 2) < 5 * sigma + 1 / 65536


def test_dropout_keep_mask_takes_any_last_size_and_follows_the_seed() -> None:
    def draw(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return dropout_keep_mask(torch.Size([3, 7, 13]), 0.5, torch.device("cpu"))  # 13: not 4k

    assert draw(1).shape == (3, 7, 13)
    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))


def test_attention_dropout_zeroes_weights_and_scales_the_kept_ones_by_one_over_keep() -> None:
    """With V the identity, attention returns its (dropped-out) weights: each visible one is exactly
    0 where the mask dropped it and softmax / (1 - p) where it kept it."""
    T, p = 64, 0.25
    q, k = torch.randn(1, 2, T, T), torch.randn(1, 2, T, T)
    torch.manual_seed(3)
    weights = reference_attention(q, k, torch.eye(T).expand(1, 2, T, T), dropout_p=p)
    torch.manual_seed(3)
    keep = dropout_keep_mask(torch.Size([1, 2, T, T]), p, torch.device("cpu"))
    visible = torch.ones(T, T, dtype=torch.bool).tril().expand(1, 2, T, T)
    expected = causal_softmax(q, k) / (1 - p)
    assert torch.all(weights[~keep | ~visible] == 0)
    assert_close(weights[keep & visible], expected[keep & visible], atol=1e-6, rtol=1e-5)
    dropped = (~keep & visible).sum() / visible.sum()
    assert 0.2 < dropped < 0.3  # about p of the visible weights (2080 of them) are dropped


@pytest.mark.parametrize(("T", "S"), [(16, 16), (5, 16)])
def test_attention_dropout_equals_the_formula_with_the_same_mask(T: int, S: int) -> None:
    """Output and gradients against dropout written as a formula, with the mask the call drew:
    softmax(QKᵀ/√D + M) * keep / (1 - p) @ V. The same seed gives the same result, another not."""
    p = 0.1
    q, k, v = torch.randn(2, 3, T, 8), torch.randn(2, 3, S, 8), torch.randn(2, 3, S, 8)
    for t in (q, k, v):
        t.requires_grad_()
    torch.manual_seed(5)
    y = reference_attention(q, k, v, dropout_p=p)
    torch.manual_seed(5)
    keep = dropout_keep_mask(torch.Size([2, 3, T, S]), p, torch.device("cpu"))
    expected = (causal_softmax(q, k) * keep / (1 - p)) @ v
    assert_close(y, expected, atol=1e-6, rtol=1e-5)
    grad_y = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, (q, k, v), grad_y),
                         torch.autograd.grad(expected, (q, k, v), grad_y), strict=True):
        assert_close(got, want, atol=1e-5, rtol=1e-4)
    torch.manual_seed(5)
    assert torch.equal(reference_attention(q, k, v, dropout_p=p), y)
    assert not torch.equal(reference_attention(q, k, v, dropout_p=p), y)  # the next draw differs
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_bf16 = reference_attention(q, k, v, dropout_p=p)
    assert y_bf16.dtype == torch.bfloat16
    assert_close(y_bf16.float(), expected, atol=0.05, rtol=0.05)


def test_dropout_module_zeroes_with_the_mask_and_scales_the_rest_in_training_only() -> None:
    """The embeddings' and residual stream's dropout: x * keep / (1 - p) with the mask it drew, the
    same as the gradient; in eval mode (and with p = 0) the identity."""
    p, x = 0.2, torch.randn(3, 10, 24, requires_grad=True)
    torch.manual_seed(4)
    y = Dropout(p)(x)
    torch.manual_seed(4)
    keep = dropout_keep_mask(x.shape, p, x.device)
    assert_close(y, x * keep / (1 - p), rtol=0, atol=1e-6)
    assert 0.1 < (y == 0).float().mean() < 0.3  # about p dropped
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert_close(grad, keep / (1 - p), rtol=0, atol=1e-6)
    assert torch.equal(Dropout(p).eval()(x), x) and torch.equal(Dropout(0.0)(x), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dropout_keeps_the_dtype_and_equals_where_with_its_mask(dtype: torch.dtype) -> None:
    """The mask is applied as a product with its bytes as uint8 (`as_factor`): the same numbers as
    `torch.where(keep, x, 0)`, in x's dtype, also for attention's weights."""
    x = torch.randn(2, 3, 16, 16).to(dtype)
    torch.manual_seed(1)
    y = Dropout(0.3)(x)
    torch.manual_seed(1)
    keep = dropout_keep_mask(x.shape, 0.3, x.device)
    assert y.dtype == dtype
    assert torch.equal(y, torch.where(keep, x / (1 - 0.3), 0.0).to(dtype))


def test_causality_future_tokens_do_not_change_past_logits() -> None:
    model = GPT(TINY).eval()
    idx = torch.randint(0, TINY.vocab_size, (1, 20))
    changed = idx.clone()
    changed[0, 12:] = (changed[0, 12:] + 1) % TINY.vocab_size
    assert_close(model(idx)[:, :12], model(changed)[:, :12])
    assert not torch.allclose(model(idx)[:, 12:], model(changed)[:, 12:])


def test_kv_cache_gives_the_logits_of_a_full_forward() -> None:
    model = GPT(TINY).eval()
    idx = torch.randint(0, TINY.vocab_size, (2, 24))
    full = model(idx)
    cache = model.new_kv_cache(batch_size=2)
    pieces = [model(idx[:, :10], cache), model(idx[:, 10:11], cache), model(idx[:, 11:24], cache)]
    assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_last_only_gives_the_last_positions_logits() -> None:
    model = GPT(GPTConfig.preset("tiny", drop_rate=0.0, vocab_pad_multiple=64)).eval()
    idx = torch.randint(0, model.config.vocab_size, (2, 7))
    last = model(idx, last_only=True)
    assert last.shape == (2, 1, model.config.vocab_size)
    assert_close(last, model(idx)[:, -1:], rtol=0, atol=1e-6)


def test_kv_cache_cannot_grow_past_the_context() -> None:
    model = GPT(TINY).eval()
    cache = model.new_kv_cache(batch_size=1)
    model(torch.zeros(1, TINY.context_length, dtype=torch.long), cache)
    with pytest.raises(UserError, match="exceeds the model's context_length"):
        model(torch.zeros(1, 1, dtype=torch.long), cache)


def test_dropout_is_active_only_in_training_mode() -> None:
    model = GPT(TINY.replace(drop_rate=0.5))
    idx = torch.randint(0, TINY.vocab_size, (1, 16))
    model.train()
    assert not torch.equal(model(idx), model(idx))
    model.eval()
    assert torch.equal(model(idx), model(idx))


def test_init_scales_residual_projections() -> None:
    cfg = GPTConfig(vocab_size=512, context_length=16, emb_dim=256, n_heads=4, n_layers=8)
    model = GPT(cfg)
    assert model.blocks[0].mlp.fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].mlp.proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)


@pytest.mark.parametrize("tie", [True, False])
def test_padded_vocabulary_changes_nothing_but_the_table_size(tie: bool) -> None:
    cfg = GPTConfig(vocab_size=100, context_length=16, emb_dim=32, n_heads=4, n_layers=2,
                    drop_rate=0.0,
                    tie_embeddings=tie)
    plain, padded = GPT(cfg).eval(), GPT(cfg.replace(vocab_pad_multiple=64)).eval()
    assert padded.tok_emb.weight.shape == (128, 32) and padded.lm_head.weight.shape == (128, 32)
    assert not padded.tok_emb.weight[100:].any() and not padded.lm_head.weight[100:].any()
    with torch.no_grad():  # the same weights in the first 100 rows; something loud in the padding
        for name, param in padded.named_parameters():
            source = plain.get_parameter(name)
            param[:len(source)] = source
        padded.lm_head.weight[100:] = 100.0
    assert padded.num_parameters() == plain.num_parameters()
    assert (padded.num_parameters(count_tied_head_twice=True)
            == plain.num_parameters(count_tied_head_twice=True))
    idx = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        assert_close(padded(idx), plain(idx))  # (2, 16, 100): the padding's logits are dropped
