"""DPO through train.py: the loss against the formula by hand, the frozen reference, the metrics,
learning a preferred style after fine-tuning, exact resume, gradient accumulation, bf16, and every
bad input."""

import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import random
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from test_distributed import _free_port, _torchrun_env
from test_resume import interrupt_after
from tiny_runs import assert_same_params, cli_error, params, tiny

from gpt.checkpoints.checkpoint import load_checkpoint, save_model
from gpt.cli.generate import GenerationOptions, run_generation
from gpt.data.pairs import PreferenceDataset, PreferencePair, pair_collate
from gpt.data.records import format_prompt
from gpt.eval.answers import answer
from gpt.model.config import GPTConfig
from gpt.model.model import GPT
from gpt.model.tokenizer import ENDOFTEXT_ID, get_tokenizer
from gpt.objectives.dpo import (
    DPO_COLUMNS,
    cache_reference,
    dpo_losses,
    evaluate_dpo,
    evaluate_pairs,
    load_reference,
    pair_loss,
    sequence_logps,
)
from gpt.training import trainer
from gpt.training.metrics import METRICS_COLUMNS
from gpt.training.run import get_objective
from gpt.training.settings import TrainConfig
from gpt.training.trainer import metrics_log, setup, train

pytestmark = pytest.mark.usefixtures("one_thread")
TOKENIZER = get_tokenizer()
SYLLABLES = ["ka", "lo", "mi", "zu", "ra", "te", "vo", "ni", "sa", "pe", "do", "gu"]
BETA = 0.5


def words(n: int, seed: int) -> list[str]:
    """`n` different made-up words of two syllables."""
    rng = random.Random(seed)
    found: dict[str, None] = {}
    while len(found) < n:
        found.setdefault(rng.choice(SYLLABLES) + rng.choice(SYLLABLES), None)
    return list(found)


def style_pairs(names: list[str]) -> list[dict[str, str]]:
    """Pairs whose chosen answer is a full sentence and the rejected one a bare "Yes."."""
    return [{"prompt": f"Is {w} a word?", "chosen": "It is a word.", "rejected": "Yes."}
            for w in names]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def hand_logp(model: GPT, prompt: str, response: str) -> float:
    """log p(response + end-of-text | plain-templated prompt), token by token, from the text alone.
    """
    prompt_ids = TOKENIZER.encode(format_prompt("plain", prompt))
    response_ids = [*TOKENIZER.encode(response), ENDOFTEXT_ID]
    tokens = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logps = torch.log_softmax(model(tokens[:, :-1])[0].double(), dim=-1)
    return sum(logps[len(prompt_ids) - 1 + i, token].item() for i, token in enumerate(response_ids))


def tiny_model(seed: int, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig.preset("tiny", drop_rate=0.0, **overrides)).eval()


def saved(model: GPT, directory: Path) -> Path:
    directory.mkdir(parents=True)
    save_model(model, directory)
    return directory


@pytest.fixture
def init_dir(tmp_path: Path) -> Path:
    """A saved tiny model to start DPO runs from (--init)."""
    return saved(tiny_model(7), tmp_path / "init")


@pytest.fixture
def pairs_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "pairs.jsonl", style_pairs(words(24, seed=1)))


def dpo_run(tmp_path: Path, data: Path, init: Path, **overrides):
    settings = dict(data=str(data), init=str(init), objective="dpo", dpo_beta=BETA,
                    context_length=None,
                    preset="tiny", drop_rate=0.0, batch_size=4, eval_freq=3, eval_iters=2,
                    sample_tokens=0)
    return tiny(tmp_path, **{**settings, **overrides})


def rows(run_dir: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO((run_dir / "metrics.csv").read_text())))


# ---- the loss and its log-probabilities ---------------------------------------------------------


PAIRS = [PreferencePair("Say kalo.", "I say kalo.", "kalo."),
         PreferencePair("Say something longer, please, with more words.", "I say it.", "No")]


def test_the_loss_and_metrics_are_the_formula_by_hand_from_per_token_log_probabilities() -> None:
    policy, reference = tiny_model(1), tiny_model(2)
    dataset = PreferenceDataset(PAIRS, TOKENIZER, "plain")
    cache_reference(reference, [dataset], batch_size=2, dtype=torch.float32)
    by_hand = [[hand_logp(model, p.prompt, response) for model in (policy, reference)]
               # chosen 0, rejected 0, chosen 1, ...
               for p in PAIRS for response in (p.chosen, p.rejected)]
    expected = torch.tensor([[by_hand[0][1], by_hand[1][1]], [by_hand[2][1], by_hand[3][1]]])
    torch.testing.assert_close(dataset.reference, expected.float(), rtol=1e-5, atol=1e-5)
    losses, margins, wins = [], [], []
    for i in range(len(PAIRS)):
        (pi_w, ref_w), (pi_l, ref_l) = by_hand[2 * i], by_hand[2 * i + 1]
        margin = BETA * ((pi_w - ref_w) - (pi_l - ref_l))
        losses.append(-math.log(1 / (1 + math.exp(-margin))))
        margins.append(margin)
        wins.append(margin > 0)
    inputs, targets, ref = pair_collate([dataset[0], dataset[1]])  # padded: the masks must hold
    loss = sum(losses) / 2
    assert pair_loss(BETA, policy, inputs, targets, ref).item() == pytest.approx(loss, rel=1e-4,
                                                                                 abs=1e-5)
    metrics = evaluate_pairs(policy, [(inputs, targets, ref)], BETA)
    assert metrics["loss"] == pytest.approx(loss, rel=1e-4, abs=1e-5)
    assert metrics["margin"] == pytest.approx(sum(margins) / 2, rel=1e-4, abs=1e-5)
    assert metrics["accuracy"] == sum(wins) / 2
    assert metrics["chosen_logp"] == pytest.approx((by_hand[0][0] + by_hand[2][0]) / 2, rel=1e-5,
                                                   abs=1e-4)
    assert metrics["rejected_logp"] == pytest.approx((by_hand[1][0] + by_hand[3][0]) / 2, rel=1e-5,
                                                     abs=1e-4)


def test_sequence_log_probabilities_leave_out_masked_targets() -> None:
    logits = torch.randn(2, 4, 7)
    targets = torch.tensor([[-100, 3, 1, -100], [-100, -100, -100, 6]])
    logps = F.log_softmax(logits, dim=-1)
    expected = [logps[0, 1, 3] + logps[0, 2, 1], logps[1, 3, 6]]
    torch.testing.assert_close(sequence_logps(logits, targets), torch.stack(expected))


def test_at_the_start_the_loss_is_log_2_and_every_reward_is_0() -> None:
    policy = tiny_model(1)
    dataset = PreferenceDataset(PAIRS, TOKENIZER, "plain")
    # the reference is the policy
    cache_reference(policy, [dataset], batch_size=2, dtype=torch.float32)
    inputs, targets, reference = pair_collate([dataset[0], dataset[1]])
    with torch.no_grad():
        losses, rewards = dpo_losses(sequence_logps(policy(inputs), targets), reference, BETA)
    assert torch.equal(rewards, torch.zeros(4))
    assert losses.tolist() == [pytest.approx(math.log(2), abs=1e-7)] * 2
    # With gradients on, the forward pass may take other kernels: equal up to rounding.
    assert pair_loss(BETA, policy, inputs, targets, reference).item() == pytest.approx(math.log(2),
                                                                                       abs=1e-6)


# ---- the reference -------------------------------------------------------------------------------


def test_gradients_flow_only_through_the_policy_and_the_reference_stays_bit_identical(
        tmp_path, pairs_file, init_dir) -> None:
    init_bytes = hashlib.sha256((init_dir / "model.safetensors").read_bytes()).hexdigest()
    run = setup(dpo_run(tmp_path, pairs_file, init_dir, max_steps=6))
    train_pairs, val_pairs = run.records.datasets
    cached = [train_pairs.reference.clone(), val_pairs.reference.clone()]
    inputs, targets, reference = next(iter(run.train_loader))
    loss = run.loss(inputs, targets, reference)
    loss.backward()
    assert not reference.requires_grad and reference.grad is None  # a constant in the loss
    assert all(p.grad is not None for p in run.model.parameters())
    # The policy's gradient is that of the formula with the reference's numbers as constants.
    grads = [p.grad.clone() for p in run.model.parameters()]
    run.model.zero_grad()
    logps = sequence_logps(run.model(inputs), targets)
    chosen, rejected = (logps - reference).chunk(2)
    (-F.logsigmoid(BETA * (chosen - rejected))).mean().backward()
    for grad, p in zip(grads, run.model.parameters(), strict=True):
        torch.testing.assert_close(grad, p.grad)
    run.model.zero_grad()
    trainer.fit(run)
    # After training, the reference is what the starting weights give, bit for bit, and they are
    # untouched.
    assert torch.equal(train_pairs.reference, cached[0]) and torch.equal(val_pairs.reference,
                                                                         cached[1])
    frozen = load_reference(run.cfg, run.model.config, torch.device("cpu"))
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    fresh = [PreferenceDataset(d.pairs, TOKENIZER, d.template) for d in (train_pairs, val_pairs)]
    cache_reference(frozen, fresh, run.cfg.batch_size, torch.float32)
    assert torch.equal(fresh[0].reference, cached[0]) and torch.equal(fresh[1].reference, cached[1])
    assert hashlib.sha256((init_dir / "model.safetensors").read_bytes()).hexdigest() == init_bytes
    start = params(load_checkpoint(init_dir))
    # the policy moved
    assert any(not torch.equal(p, start[name]) for name, p in params(run.model).items())


# ---- a run: metrics, best/, early stopping, accumulation, bf16 -----------------------------------


def test_a_dpo_run_logs_its_metrics_prints_them_and_keeps_the_best_checkpoint(
        tmp_path, pairs_file, init_dir, capsys) -> None:
    result = train(dpo_run(tmp_path, pairs_file, init_dir, max_steps=6, lr=1e-2))
    out = capsys.readouterr().out
    logged = rows(result.run_dir)
    assert list(logged[0]) == [*METRICS_COLUMNS[:5], *DPO_COLUMNS, *METRICS_COLUMNS[6:],
                               "val_exact_match"]
    assert [row["step"] for row in logged] == ["0", "3", "6"]
    # policy = reference: the loss is log 2, the rewards 0 (up to the batches' rounding)
    first = logged[0]
    assert float(first["val_loss"]) == pytest.approx(math.log(2), abs=1e-5)
    assert float(first["val_reward_margin"]) == pytest.approx(0.0, abs=1e-5)
    assert all(0 <= float(row["val_reward_accuracy"]) <= 1 for row in logged)
    assert "reward accuracy" in out and "margin" in out and "log p chosen" in out
    assert "22 training preference pairs (0 dropped" in out
    assert "best validation DPO loss" in out
    val_losses = [float(row["val_loss"]) for row in logged]
    assert result.best_val_loss == pytest.approx(min(val_losses), rel=1e-6)
    best_step = int(logged[val_losses.index(min(val_losses))]["step"])
    assert result.best_step == best_step
    assert (result.run_dir / "loss.png").stat().st_size > 0
    # best/ holds the weights of that evaluation: measured again against the same reference, the
    # same validation DPO loss.
    run = setup(dpo_run(tmp_path, pairs_file, result.run_dir / "best", reference=str(init_dir),
                        run_name="again"))
    measured = evaluate_dpo(run.model, run.eval_loaders, BETA, torch.float32)
    assert measured["val_loss"] == pytest.approx(min(val_losses), rel=1e-5)
    assert json.loads((result.run_dir / "train_config.json").read_text())["prompt_template"] == "plain"  # noqa: E501


def test_loss_png_draws_the_reward_accuracy_against_a_second_axis(tmp_path) -> None:
    log = metrics_log(get_objective("dpo"), TrainConfig(objective="dpo", data="p.jsonl",
                                                        init="gpt2"),
                      None, tmp_path)
    for step, accuracy in ((0, 0.0), (5, 0.5), (10, 0.95)):
        log.append({name: 0.5 for name in log.columns}
                   | {"step": step, "epoch": step / 10, "tokens_seen": step,
                      "val_reward_accuracy": accuracy})
    fig = log.plot(tmp_path / "loss.png", tokens_per_epoch=100, best_step=10)
    axes = {ax.get_ylabel(): ax for ax in fig.axes}
    assert axes["DPO loss"].get_lines()[0].get_ydata().tolist() == [0.5, 0.5, 0.5]
    assert axes["reward accuracy"].get_lines()[0].get_ydata().tolist() == [0.0, 0.5, 0.95]
    assert (tmp_path / "loss.png").stat().st_size > 0


def test_early_stopping_watches_the_validation_dpo_loss(tmp_path, pairs_file, init_dir) -> None:
    # A learning rate too small to move the loss by min_delta: no evaluation counts as an
    # improvement.
    result = train(dpo_run(tmp_path, pairs_file, init_dir, lr=1e-9, min_lr=0.0, eval_freq=1,
                           patience=2,
                           min_delta=0.01, epochs=5))
    assert result.stop_reason == "early_stop" and result.step == 2 and result.best_step == 0


def test_grad_accumulation_over_unequal_micro_batches_matches_one_big_batch(
        tmp_path, pairs_file, init_dir) -> None:
    big = setup(dpo_run(tmp_path, pairs_file, init_dir, run_name="big"))
    small = setup(dpo_run(tmp_path, pairs_file, init_dir, batch_size=2, grad_accum=2,
                          run_name="small"))
    for run in (big, small):
        run.optimizer.step = lambda *args, **kwargs: None  # keep the gradients to compare them
    items = [big.records.datasets[0][i] for i in range(4)]
    big_stats = trainer.train_step(big, [pair_collate(items)])
    small_stats = trainer.train_step(small, [pair_collate(items[:3]), pair_collate(items[3:])])
    assert small_stats.loss == pytest.approx(big_stats.loss, rel=1e-6)
    for a, b in zip(big.model.parameters(), small.model.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)


def test_a_bfloat16_step_is_close_to_the_float32_step(tmp_path, pairs_file, init_dir) -> None:
    runs = [setup(dpo_run(tmp_path, pairs_file, init_dir, dtype=dtype, run_name=dtype))
            for dtype in ("float32", "bfloat16")]
    # The reference was computed in each run's precision: close, not equal.
    torch.testing.assert_close(runs[1].records.datasets[0].reference,
                               runs[0].records.datasets[0].reference,
                               rtol=2e-2, atol=0.5)
    batch = next(iter(runs[0].train_loader))
    full, half = (trainer.train_step(run, [batch]) for run in runs)
    assert half.loss == pytest.approx(full.loss, abs=0.05) and math.isfinite(half.grad_norm)


# ---- resume -------------------------------------------------------------------------------------


def test_resume_continues_a_dpo_run_exactly(tmp_path, pairs_file, init_dir, monkeypatch) -> None:
    cfg = dpo_run(tmp_path, pairs_file, init_dir, drop_rate=0.1, epochs=2, eval_freq=4)
    straight = train(dataclasses.replace(cfg, run_name="straight"))
    interrupt_after(5, monkeypatch)  # mid-epoch (the 22 training pairs make 6 batches an epoch)
    assert train(cfg).stop_reason == "interrupted"
    monkeypatch.undo()
    torch.manual_seed(999)  # the resumed run restores its own random state
    resumed = train(dataclasses.replace(cfg, prompt_template="plain"), resume=tmp_path / "run")
    # last/ is step 5's
    assert min(resumed.step_losses) == 6 and resumed.step == straight.step == 12
    assert resumed.step_losses == {s: straight.step_losses[s] for s in resumed.step_losses}
    assert_same_params(params(load_checkpoint(tmp_path / "straight" / "last")),
                       params(load_checkpoint(tmp_path / "run" / "last")))
    def measured(run: str) -> list[dict[str, str]]:
        return [{k: v for k, v in row.items() if k != "tokens_per_s"}
                for row in rows(tmp_path / run)]

    assert measured("run") == measured("straight")


# ---- learning a preferred style -----------------------------------------------------------------


def prompt_ids(name: str) -> list[int]:
    return TOKENIZER.encode(format_prompt("plain", f"Is {name} a word?"))


def same_length_words(n: int, seed: int) -> list[str]:
    """`n` of `words` whose prompts are all 7 tokens long, so every answer starts at the same
    position: a prompt one token longer puts its answer at a position fine-tuning never trained
    (measured: the model's answers to such prompts are anyone's guess)."""
    found = [w for w in words(len(SYLLABLES) ** 2, seed) if len(prompt_ids(w)) == 7]
    assert len(found) >= n
    return found[:n]


def first_token_probability(model: GPT, name: str, text: str) -> float:
    """p(the first token of `text` | the templated prompt about `name`)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids(name)]))[0, -1].double()
    return torch.softmax(logits, dim=-1)[TOKENIZER.encode(text)[0]].item()


def test_after_fine_tuning_dpo_makes_a_tiny_model_prefer_the_chosen_style(tmp_path, capsys) -> None:
    """Each held-out prompt's log-probability margin log p(chosen) - log p(rejected) goes from about
    log(1/3) to far above 0, and the rejected style's share of answers from 3/4 to almost none.

    Chosen "Certainly." and rejected "Yes." differ only in their first token, so the margin is that
    token's log-odds. Fine-tuning gives every prompt each answer once in the chosen style and three
    times in the rejected one: the model learns p(chosen) = 1/4 for any name, held-out ones too.
    What greedy decoding answers after DPO is not asserted: DPO moves only the chosen/rejected
    log-ratio, and at the first position the softmax normalizer cancels from it, so the other
    50,255 logits there are free to drift. Measured over 12 seeds (of the words and of training):
    every margin after DPO >= 3.3 and p(rejected) <= 0.04, but the greedy answer "Certainly." to all
    40 prompts in 7 of them and to 0 to 4 in the others ("." or end-of-text first).
    """
    chosen, rejected = "Certainly.", "Yes."
    names = same_length_words(12 + 30 + 40, seed=3)
    sft_names, dpo_names, held_out = names[:12], names[12:42], names[42:]

    def pairs(names_: list[str]) -> list[dict[str, str]]:
        return [{"prompt": f"Is {w} a word?", "chosen": chosen, "rejected": rejected}
                for w in names_]

    def margins(model: GPT) -> list[float]:
        return [hand_logp(model, prompt, chosen) - hand_logp(model, prompt, rejected)
                for prompt in (f"Is {w} a word?" for w in held_out)]

    def rejected_share(model: GPT) -> list[float]:
        return [first_token_probability(model, w, rejected) for w in held_out]

    sft_rows = [{"prompt": row["prompt"], "response": row["chosen"] if k == 0 else row["rejected"]}
                for row in pairs(sft_names) for k in range(4)]
    sft_data = write_jsonl(tmp_path / "sft.jsonl", sft_rows)
    common = dict(preset="tiny", context_length=None, drop_rate=0.0, eval_answers=0, warmup_steps=5)
    sft = train(tiny(tmp_path, data=str(sft_data), val_data=str(sft_data), batch_size=10, epochs=20,
                     lr=1e-2, min_lr=1e-3, eval_freq=1000, run_name="sft", **common))
    sft_model = load_checkpoint(sft.run_dir / "best")
    before = margins(sft_model)  # measured over 12 seeds: -1.26 to -0.98 (log(1/3) = -1.10)
    assert all(-1.6 < m < -0.6 for m in before), before
    assert all(p > 0.6 for p in rejected_share(sft_model))  # measured: >= 0.73
    answers = {answer(sft_model, format_prompt("plain", f"Is {w} a word?"), 8) for w in held_out}
    assert answers == {rejected}  # p(rejected) about 3/4, p(chosen) about 1/4: greedy says "Yes."

    train_data = write_jsonl(tmp_path / "pairs.jsonl", pairs(dpo_names))
    val_data = write_jsonl(tmp_path / "held_out.jsonl", pairs(held_out))
    result = train(tiny(tmp_path, data=str(train_data), val_data=str(val_data),
                        init=str(sft.run_dir / "best"), objective="dpo", dpo_beta=1.0,
                        batch_size=6, epochs=6, lr=2e-3, min_lr=2e-4, eval_freq=1000, eval_iters=7,
                        run_name="dpo", **common))
    last = rows(result.run_dir)[-1]
    assert float(last["val_reward_accuracy"]) == 1.0, last
    dpo_model = load_checkpoint(result.run_dir / "last")
    after = margins(dpo_model)  # measured over 12 seeds: the smallest 3.3 to 15.2
    assert all(m > 2.0 for m in after), after
    assert all(p < 0.15 for p in rejected_share(dpo_model))  # measured: <= 0.04
    # generate.py answers like any fine-tuned run: the template applied, stopped at end-of-text (the
    # same greedy decoding as `answer`, so the same text whatever the model has learned).
    given = answer(dpo_model, format_prompt("plain", f"Is {held_out[0]} a word?"), 8)
    capsys.readouterr()
    out = io.StringIO()
    options = GenerationOptions(prompt=f"Is {held_out[0]} a word?", max_new_tokens=8,
                                temperature=0.0, top_k=None, checkpoint=result.run_dir / "last",
                                device="cpu", dtype="float32")
    run_generation(options, out=out, err=io.StringIO())
    assert out.getvalue() == given + "\n"


# ---- bad input: one line, exit 2, nothing written -----------------------------------------------


@pytest.mark.parametrize(("rows_", "flags", "message"), [
    ([{"prompt": "p", "rejected": "a"}], [], "pairs.jsonl:1: a preference record needs a prompt "
                                             "and the"),
    ([{"prompt": "p", "chosen": "a"}], [], "it has no rejected"),
    ([{"prompt": "p", "chosen": "same", "rejected": "same"}], [], "chosen and rejected are the "
                                                                  "same text"),
    (None, ["--dpo-beta", "0"], "--dpo-beta must be above 0, got 0.0"),
    (None, ["--dpo-beta", "-1"], "--dpo-beta must be above 0, got -1.0"),
    (None, ["--data", "default"], "--objective dpo trains on preference records, not text "
                                  "('default')"),
    (None, ["--init", "scratch"], "pass --init with it"),
    (None, ["--reference", "VOCAB"], "predicts 1000 token ids and the trained model 50257"),
    (None, ["--reference", "SHAPE"], "has another shape (layers, heads, width, context: (1, 2, 64, "
                                     "128))"),
    (None, ["--loss-chunk", "8"], "drop --loss-chunk to train with --objective dpo"),
    (None, ["--label-smoothing", "0.1"], "--objective dpo has a loss of its own and does not "
                                         "combine with "
                                         "--label-smoothing"),
    (None, ["--no-mask-prompt"], "drop --no-mask-prompt"),
    (None, ["--objective", "ppo"], "--objective must be one of lm, dpo, grpo, got 'ppo'"),
])
def test_bad_dpo_input_is_one_line_and_writes_nothing(tmp_path, init_dir, capsys, rows_, flags,
                                                      message) -> None:
    data = write_jsonl(tmp_path / "pairs.jsonl", rows_ or style_pairs(words(10, seed=1)))
    saved(tiny_model(1, vocab_size=1000), tmp_path / "VOCAB")
    saved(tiny_model(1, n_layers=1), tmp_path / "SHAPE")
    flags = [str(tmp_path / flag) if flag in ("VOCAB", "SHAPE") else flag for flag in flags]
    out = tmp_path / "runs"
    err = cli_error(["--objective", "dpo", "--data", str(data), "--init", str(init_dir), "--device",
                     "cpu",
                     "--out", str(out), *flags], capsys)
    assert message in err
    assert not out.exists()


def test_a_reference_without_dpo_is_refused(tmp_path, capsys) -> None:
    err = cli_error(["--reference", "gpt2", "--out", str(tmp_path / "runs")], capsys)
    assert "--reference is a setting of --objective dpo" in err


# ---- under torchrun ------------------------------------------------------------------------------


def _dpo_rank(rank: int, port: int, runs: dict[str, TrainConfig]) -> None:
    """One rank of the 2-rank DPO runs (gloo, batch 2 per rank), one after the other."""
    os.environ.update(_torchrun_env(rank, port))
    torch.set_num_threads(1)
    for name, cfg in runs.items():
        result = train(cfg)
        (Path(cfg.out) / f"{name}.{rank}.json").write_text(json.dumps(result.step_losses))


def test_two_ranks_of_dpo_equal_one_process_with_twice_the_batch(tmp_path, pairs_file,
                                                                 init_dir) -> None:
    # 18 training pairs: 4 global batches of 4 and one of 2 (a pair on each rank); 6 validation
    # pairs: batches of 4 and 2 in one process, so each rank's mean differs from the global one.
    # A learning rate that keeps the losses well above 0, where float32 rounding is relatively
    # small.
    common = dict(max_steps=6, val_fraction=0.25, eval_iters=4, lr=1e-3)
    one = train(dpo_run(tmp_path, pairs_file, init_dir, run_name="one", **common))
    runs = {parallel: dpo_run(tmp_path, pairs_file, init_dir, batch_size=2, parallel=parallel,
                              run_name=parallel, **common) for parallel in ("ddp", "fsdp")}
    mp.start_processes(_dpo_rank, args=(_free_port(), runs), nprocs=2, start_method="spawn")
    assert len(set(one.step_losses.values())) == 6  # the weights moved: not log 2 at every step
    reference = rows(one.run_dir)
    for name in runs:
        ranks = [{int(step): loss for step,
                  loss in json.loads((tmp_path / f"{name}.{r}.json").read_text())
                  .items()} for r in range(2)]
        assert ranks[0] == ranks[1] and len(ranks[0]) == 6, name  # one loss, all-reduced
        assert ranks[0] == pytest.approx(one.step_losses, rel=1e-5), name
        logged = rows(tmp_path / name)
        assert [row["step"] for row in logged] == [row["step"] for row in reference] == ["0", "3",
                                                                                         "6"]
        for column in ("train_loss", "val_loss", *DPO_COLUMNS):
            assert [float(row[column]) for row in logged] == pytest.approx(
                [float(row[column]) for row in reference], rel=1e-5, abs=1e-5), (name, column)
        two_params = params(load_checkpoint(tmp_path / name / "last"))
        for key, value in params(load_checkpoint(one.run_dir / "last")).items():
            torch.testing.assert_close(two_params[key], value, rtol=1e-4, atol=1e-5, msg=f"{name} "
                                                                                         f"{key}")
