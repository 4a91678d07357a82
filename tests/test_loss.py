import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from gpt.config import GPTConfig
from gpt.loss import IGNORE_INDEX, evaluate_loss, head_loss, lm_loss, perplexity
from gpt.model import GPT


def hand_loss(logits: torch.Tensor, targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """-mean log softmax at the target, mixed with the uniform target for label smoothing, in float64."""
    logp = torch.log_softmax(logits.double(), dim=-1).flatten(0, -2)
    targets = targets.flatten()
    keep = targets != IGNORE_INDEX
    logp, targets = logp[keep], targets[keep]
    nll = -logp[torch.arange(len(targets)), targets]
    uniform = -logp.mean(dim=-1)  # cross-entropy against the uniform distribution
    return ((1 - smoothing) * nll + smoothing * uniform).mean()


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("n_ignored", [0, 7])
def test_lm_loss_matches_cross_entropy_and_the_formula(smoothing: float, n_ignored: int) -> None:
    logits = torch.randn(3, 5, 11) * 3
    targets = torch.randint(0, 11, (3, 5))
    targets.view(-1)[torch.randperm(15)[:n_ignored]] = IGNORE_INDEX
    loss = lm_loss(logits, targets, label_smoothing=smoothing)
    reference = F.cross_entropy(logits.view(-1, 11), targets.view(-1), label_smoothing=smoothing)
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(loss.double(), hand_loss(logits, targets, smoothing))


def test_lm_loss_takes_another_ignore_index_and_upcasts_bf16() -> None:
    logits = torch.randn(2, 4, 9).bfloat16()
    targets = torch.tensor([[1, 2, 0, 0], [3, 0, 0, 0]])
    loss = lm_loss(logits, targets, ignore_index=0)
    assert loss.dtype == torch.float32
    as_default_ignore = targets.masked_fill(targets == 0, IGNORE_INDEX)
    torch.testing.assert_close(loss.double(), hand_loss(logits.float(), as_default_ignore, 0.0))


def test_perplexity_is_exp_of_the_loss() -> None:
    for loss in (0.0, 1.0, 3.3, 10.8249):
        assert perplexity(loss) == pytest.approx(math.e ** loss, rel=1e-12)
    assert perplexity(1000.0) == math.inf


def test_evaluate_loss_averages_over_target_tokens_in_eval_mode() -> None:
    model = GPT(GPTConfig.preset("tiny", vocab_size=50, context_length=8))
    x = torch.randint(0, 50, (5, 8))
    y = torch.randint(0, 50, (5, 8))
    y[0, :6] = IGNORE_INDEX  # unequal token counts per batch: a mean of batch means would differ
    loader = DataLoader(TensorDataset(x, y), batch_size=2)  # batches of 2, 2, 1
    model.train()
    got = evaluate_loss(model, loader, max_batches=2)
    assert model.training  # put back
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        logits = model(x[:4])  # the first two batches, without dropout
    summed = F.cross_entropy(logits.reshape(-1, 50), y[:4].reshape(-1), reduction="sum")
    expected = summed / (y[:4] != IGNORE_INDEX).sum()
    assert got == pytest.approx(expected.item(), rel=1e-5)
    assert evaluate_loss(model, loader) != pytest.approx(got, rel=1e-5)  # all three batches


def test_evaluate_loss_in_chunks_equals_the_whole_batch_at_once() -> None:
    model = GPT(GPTConfig.preset("tiny", vocab_size=50, context_length=8, vocab_pad_multiple=64))
    x, y = torch.randint(0, 50, (5, 8)), torch.randint(0, 50, (5, 8))
    y[0, :6] = IGNORE_INDEX
    loader = DataLoader(TensorDataset(x, y), batch_size=2)
    whole = evaluate_loss(model, loader)
    for chunk_size in (1, 5, 16, 100):
        assert evaluate_loss(model, loader, chunk_size=chunk_size) == pytest.approx(whole, rel=1e-6)


def test_evaluate_loss_refuses_an_empty_loader() -> None:
    model = GPT(GPTConfig.preset("tiny", vocab_size=50, context_length=8))
    with pytest.raises(ValueError, match="no target tokens"):
        evaluate_loss(model, [])


# ---- the LM head and the loss together, whole or in chunks -------------------------------------


def reference_head_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
    """Loss and gradients through full logits and `F.cross_entropy`, an independent reference."""
    hidden, weight = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    loss = F.cross_entropy((hidden @ weight.t()).flatten(0, -2), targets.flatten())
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("chunk_size", [0, 1, 7, 64, 1000])
def test_head_loss_equals_cross_entropy_of_the_full_logits(chunk_size: int) -> None:
    hidden, weight = torch.randn(3, 37, 16), torch.randn(101, 16)
    targets = torch.randint(0, 101, (3, 37))
    targets[0, :5] = targets[2, -1] = IGNORE_INDEX
    expected_loss, expected_dh, expected_dw = reference_head_loss(hidden, weight, targets)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = head_loss(h, w, targets, chunk_size)
    (2.5 * loss).backward()  # a scaled loss scales the gradients (gradient accumulation divides)
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(h.grad, 2.5 * expected_dh)
    torch.testing.assert_close(w.grad, 2.5 * expected_dw)


def test_chunked_head_loss_under_bf16_autocast_is_close_to_float32() -> None:
    hidden, weight = torch.randn(4, 64, 32), 0.3 * torch.randn(500, 32)
    targets = torch.randint(0, 500, (4, 64))
    expected_loss, expected_dh, expected_dw = reference_head_loss(hidden, weight, targets)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head_loss(h, w, targets, chunk_size=50)
    loss.backward()
    assert loss.dtype == torch.float32 and w.grad.dtype == torch.float32  # fp32 master weights' grads
    torch.testing.assert_close(loss, expected_loss, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(h.grad, expected_dh, rtol=5e-2, atol=2e-4)
    torch.testing.assert_close(w.grad, expected_dw, rtol=5e-2, atol=2e-4)


def test_chunked_head_loss_of_only_ignored_targets_is_nan_with_zero_gradients() -> None:
    h, w = torch.randn(2, 5, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
    targets = torch.full((2, 5), IGNORE_INDEX)
    loss = head_loss(h, w, targets, chunk_size=3)
    assert loss.isnan() and lm_loss(h @ w.t(), targets).isnan()  # as PyTorch's mean over nothing
    torch.autograd.backward(loss, torch.ones(()))
    assert not h.grad.any() and not w.grad.any()


@pytest.mark.parametrize("chunk_size", [0, 8])
def test_head_loss_ignores_the_padding_rows_of_the_head(chunk_size: int) -> None:
    hidden, weight = torch.randn(2, 9, 16), torch.randn(40, 16)
    targets = torch.randint(0, 40, (2, 9))
    expected_loss, expected_dh, expected_dw = reference_head_loss(hidden, weight, targets)
    padded = torch.cat([weight, 50 * torch.ones(24, 16)]).requires_grad_()  # 64 rows, 24 of padding
    h = hidden.clone().requires_grad_()
    loss = head_loss(h, padded, targets, chunk_size, vocab_size=40)
    loss.backward()
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(h.grad, expected_dh)
    torch.testing.assert_close(padded.grad[:40], expected_dw)
    assert not padded.grad[40:].any()
