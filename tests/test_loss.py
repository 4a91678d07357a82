import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from gpt.base.errors import UserError, run_cli
from gpt.eval.perplexity import evaluate_loss, perplexity
from gpt.model.config import GPTConfig
from gpt.model.loss import IGNORE_INDEX, HeadLoss, head_loss, lm_loss
from gpt.model.model import GPT
from gpt.objectives.lm import CrossEntropy, distillation_kl, focal_loss


def hand_loss(logits: torch.Tensor, targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """-mean log softmax at the target, mixed with the uniform target for label smoothing, in
    float64."""
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


@pytest.mark.parametrize("block_rows", [1, 3, HeadLoss.GPU_BLOCK_ROWS])
def test_head_loss_is_the_same_for_any_block_of_softmax_rows(monkeypatch, block_rows: int) -> None:
    """The softmax runs `block_rows` rows at a time (8 on a CPU, 1024 on a GPU: run here on a CPU).
    """
    monkeypatch.setattr(HeadLoss, "CPU_BLOCK_ROWS", block_rows)
    hidden, weight = torch.randn(3, 37, 16), torch.randn(101, 16)
    targets = torch.randint(0, 101, (3, 37))
    targets[1, 3:9] = IGNORE_INDEX
    expected_loss, expected_dh, expected_dw = reference_head_loss(hidden, weight, targets)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = head_loss(h, w, targets, chunk_size=10)
    loss.backward()
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(h.grad, expected_dh)
    torch.testing.assert_close(w.grad, expected_dw)


@pytest.mark.parametrize("chunk_size", [0, 50])
def test_head_loss_under_bf16_autocast_is_close_to_float32(chunk_size: int) -> None:
    hidden, weight = torch.randn(4, 64, 32), 0.3 * torch.randn(500, 32)
    targets = torch.randint(0, 500, (4, 64))
    expected_loss, expected_dh, expected_dw = reference_head_loss(hidden, weight, targets)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head_loss(h, w, targets, chunk_size=chunk_size)
    loss.backward()
    # fp32 master weights' grads
    assert loss.dtype == torch.float32 and w.grad.dtype == torch.float32
    assert w.grad.is_contiguous()  # laid out as the weight: no transposed copy on its way to .grad
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


# ---- the variants: label smoothing, focal loss, distillation -----------------------------------


def logits_and_targets(dtype: torch.dtype = torch.float32, n_ignored: int = 4):
    logits = (torch.randn(3, 5, 11) * 3).to(dtype)
    targets = torch.randint(0, 11, (3, 5))
    targets.view(-1)[torch.randperm(15)[:n_ignored]] = IGNORE_INDEX
    return logits, targets


def hand_focal(logits: torch.Tensor, targets: torch.Tensor, gamma: float) -> torch.Tensor:
    """-(1 - p)^gamma log p of the target, averaged over the counted targets, in float64."""
    probs = torch.softmax(logits.double(), dim=-1).flatten(0, -2)
    keep = targets.flatten() != IGNORE_INDEX
    p = probs[keep].gather(1, targets.flatten()[keep][:, None]).squeeze(1)
    return (-((1 - p) ** gamma) * p.log()).mean()


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.5])
def test_label_smoothing_objective_is_torch_cross_entropy_with_label_smoothing(smoothing: float) -> None:  # noqa: E501
    logits, targets = logits_and_targets()
    loss = CrossEntropy(label_smoothing=smoothing).loss(logits, targets)
    torch.testing.assert_close(loss, F.cross_entropy(logits.view(-1, 11), targets.view(-1),
                                                     label_smoothing=smoothing))


def test_focal_loss_with_gamma_0_is_cross_entropy() -> None:
    logits, targets = logits_and_targets()
    torch.testing.assert_close(focal_loss(logits, targets, 0.0),
                               F.cross_entropy(logits.view(-1, 11), targets.view(-1)))


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0, 5.0])
def test_focal_loss_is_the_formula_and_below_cross_entropy(gamma: float) -> None:
    logits, targets = logits_and_targets()
    loss = CrossEntropy(focal_gamma=gamma).loss(logits, targets)
    torch.testing.assert_close(loss.double(), hand_focal(logits, targets, gamma), rtol=1e-6,
                               atol=1e-6)
    assert loss < lm_loss(logits, targets)  # every token's loss shrinks by its factor (1 - p)^gamma


def test_focal_loss_of_bf16_logits_is_float32() -> None:
    logits, targets = logits_and_targets(torch.bfloat16)
    loss = focal_loss(logits, targets, 2.0)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), hand_focal(logits.float(), targets, 2.0), rtol=1e-6,
                               atol=1e-6)


@pytest.mark.parametrize(("weight", "temperature"), [(0.5, 2.0), (1.0, 1.0), (0.1, 4.0), (0.0,
                                                                                          3.0)])
def test_distillation_is_cross_entropy_plus_t_squared_kl_div_of_the_softened_distributions(
        weight: float, temperature: float) -> None:
    logits, targets = logits_and_targets()
    teacher = torch.randn(3, 5, 11) * 2
    objective = CrossEntropy(teacher="t", distill_weight=weight, distill_temperature=temperature)
    loss = objective.loss(logits, teacher_logits=teacher, targets=targets)
    keep = targets.view(-1) != IGNORE_INDEX
    student_t = F.log_softmax(logits.view(-1, 11)[keep] / temperature, dim=-1)
    teacher_t = F.log_softmax(teacher.view(-1, 11)[keep] / temperature, dim=-1)
    # mean over counted rows
    kl = F.kl_div(student_t, teacher_t, log_target=True, reduction="batchmean")
    ce = F.cross_entropy(logits.view(-1, 11), targets.view(-1))
    torch.testing.assert_close(loss, (1 - weight) * ce + weight * temperature**2 * kl)
    torch.testing.assert_close(distillation_kl(logits, teacher, targets, temperature), kl)


def test_a_student_that_is_its_own_teacher_has_zero_kl() -> None:
    logits, targets = logits_and_targets()
    assert distillation_kl(logits, logits.clone(), targets, 2.0) == 0
    only_distillation = CrossEntropy(teacher="itself", distill_weight=1.0, distill_temperature=3.0)
    assert only_distillation.loss(logits, targets, logits.clone()) == 0
    # a shift
    assert distillation_kl(logits, logits + 0.5, targets, 2.0) == pytest.approx(0, abs=1e-6)
    # a sharper teacher is another one
    assert distillation_kl(logits, 2 * logits, targets, 2.0) > 0.01


def test_the_hard_part_of_distillation_is_the_smoothed_or_focal_loss() -> None:
    logits, targets = logits_and_targets()
    teacher = torch.randn(3, 5, 11)
    kl = distillation_kl(logits, teacher, targets, 2.0)
    for hard, settings in [(lm_loss(logits, targets, label_smoothing=0.2),
                            {"label_smoothing": 0.2}),
                           (focal_loss(logits, targets, 2.0), {"focal_gamma": 2.0})]:
        objective = CrossEntropy(**settings, teacher="t", distill_weight=0.25,
                                 distill_temperature=2.0)
        torch.testing.assert_close(objective.loss(logits, targets, teacher), 0.75 * hard
                                   + 0.25 * 4 * kl)


@pytest.mark.parametrize("objective", [
    CrossEntropy(label_smoothing=0.1), CrossEntropy(focal_gamma=0.5), CrossEntropy(focal_gamma=2.0),
    CrossEntropy(teacher="t", distill_weight=0.3, distill_temperature=2.0),
    CrossEntropy(focal_gamma=1.5, teacher="t", distill_weight=0.7, distill_temperature=0.5),
], ids=["smoothing", "focal-0.5", "focal-2", "distillation", "focal-distillation"])
def test_objective_gradients_match_finite_differences(objective: CrossEntropy) -> None:
    logits = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 3, 5, dtype=torch.float64)
    targets = torch.tensor([[0, 4, IGNORE_INDEX], [2, 2, 1]])
    assert torch.autograd.gradcheck(lambda z: objective.loss(z, targets, teacher), (logits,))


def test_focal_loss_of_a_near_certain_token_has_a_finite_gradient() -> None:
    logits = torch.tensor([[30.0, 0.0, 0.0]], requires_grad=True)  # p rounds to 1.0 in float32
    focal_loss(logits, torch.tensor([0]), 0.5).backward()
    assert torch.isfinite(logits.grad).all()


def test_default_objective_is_cross_entropy_and_allows_loss_chunk() -> None:
    objective = CrossEntropy()
    assert objective.is_cross_entropy
    objective.check_loss_chunk(64)
    logits, targets = logits_and_targets()
    torch.testing.assert_close(objective.loss(logits, targets), lm_loss(logits, targets))


@pytest.mark.parametrize(("settings", "message"), [
    ({"label_smoothing": 1.0}, "--label-smoothing must be in [0, 1), got 1.0; e.g. "
                               "--label-smoothing 0.1"),
    ({"label_smoothing": -0.1}, "--label-smoothing must be in [0, 1), got -0.1"),
    ({"label_smoothing": math.nan}, "--label-smoothing must be in [0, 1), got nan"),
    ({"focal_gamma": -1.0}, "--focal-gamma must be 0 or more, got -1.0; e.g. --focal-gamma 2"),
    ({"focal_gamma": math.inf}, "--focal-gamma must be 0 or more, got inf"),
    ({"distill_temperature": 0.0}, "--distill-temperature must be above 0, got 0.0"),
    ({"distill_temperature": -2.0}, "--distill-temperature must be above 0, got -2.0"),
    ({"distill_weight": 1.5}, "--distill-weight must be in [0, 1], got 1.5"),
    ({"label_smoothing": 0.1, "focal_gamma": 2.0}, "--label-smoothing and --focal-gamma both "
                                                   "reshape"),
])
def test_bad_objective_settings_are_one_line_naming_the_flag(settings: dict, message: str,
                                                             capsys: pytest.CaptureFixture[str]) -> None:  # noqa: E501
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: CrossEntropy(**settings))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1
    with pytest.raises(ValueError):  # plain Python callers can catch it as a ValueError
        CrossEntropy(**settings)


@pytest.mark.parametrize(("settings", "flag"), [({"label_smoothing": 0.1}, "--label-smoothing"),
                                                ({"focal_gamma": 1.0}, "--focal-gamma"),
                                                ({"teacher": "gpt2"}, "--teacher")])
def test_loss_chunk_is_refused_with_another_objective(settings: dict, flag: str) -> None:
    objective = CrossEntropy(**settings)
    assert not objective.is_cross_entropy
    objective.check_loss_chunk(0)
    with pytest.raises(UserError, match=f"--loss-chunk computes plain cross-entropy only; drop "
                                        f"--loss-chunk "
                                        f"to train with {flag}$"):
        objective.check_loss_chunk(128)


def test_distillation_without_teacher_logits_is_a_programming_error() -> None:
    logits, targets = logits_and_targets()
    with pytest.raises(ValueError, match="needs its teacher_logits"):
        CrossEntropy(teacher="gpt2").loss(logits, targets)
