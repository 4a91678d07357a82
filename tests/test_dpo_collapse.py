"""DPO's collapse (issue 31): a run whose loss and reward accuracy look perfect while the model
stops answering. It is reproduced on a tiny model, seen (the chosen log-probability plotted, a
warning line, best/ guarded by the exact match) and prevented by --rpo-alpha."""

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_runs import cli_error, tiny

from gpt.checkpoints.checkpoint import load_checkpoint
from gpt.eval.answers import answer
from gpt.model.loss import IGNORE_INDEX
from gpt.objectives.dpo import CHOSEN_FALL_WARNING, DPO, chosen_nll, pair_loss, warn_chosen_fall
from gpt.objectives.lm import ANSWER_COLUMN
from gpt.training.run import get_objective
from gpt.training.settings import TrainConfig
from gpt.training.trainer import metrics_log, train

pytestmark = pytest.mark.usefixtures("one_thread")
SYLLABLES = ["ka", "lo", "mi", "zu", "ra", "te", "vo", "ni", "sa", "pe", "do", "gu"]
INSTRUMENTS = ["flute", "drum", "harp", "horn"]


def names(n: int) -> list[str]:
    rng, found = random.Random(3), []
    while len(found) < n:
        name = (rng.choice(SYLLABLES) + rng.choice(SYLLABLES)).capitalize()
        found += [name] if name not in found else []
    return found


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_rpo_adds_alpha_times_the_chosen_responses_mean_token_nll_to_the_dpo_loss() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 5, 11)  # 2 pairs: rows 0-1 chosen, 2-3 rejected
    targets = torch.randint(0, 11, (4, 5))
    targets[:, :2] = IGNORE_INDEX  # the prompt
    targets[1, 4] = IGNORE_INDEX  # padding
    reference = torch.randn(4)
    plain = pair_loss(0.1, lambda _: logits, torch.zeros(4, 5), targets, reference)
    with_rpo = pair_loss(0.1, lambda _: logits, torch.zeros(4, 5), targets, reference,
                         rpo_alpha=0.5)
    by_hand = torch.nn.functional.cross_entropy(logits[:2].reshape(-1, 11), targets[:2].reshape(-1))
    assert with_rpo.item() == pytest.approx(plain.item() + 0.5 * by_hand.item(), rel=1e-5)
    assert chosen_nll(torch.tensor([-6.0, -4.0, -1.0, -1.0]),
                      targets).item() == pytest.approx(10 / 5)


def test_the_warning_comes_once_when_the_chosen_log_probability_falls_past_the_documented_amount(
        capsys) -> None:
    def row(step: int, chosen: float) -> dict[str, float]:
        return {"step": step, "val_chosen_logp": chosen}

    start = -20.0
    logged = [row(0, start), row(5, start - CHOSEN_FALL_WARNING + 0.5)]
    warn_chosen_fall(logged, row(10, start - CHOSEN_FALL_WARNING - 0.5), rpo_alpha=0.0)
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("warning: the chosen responses' log-probability "
                                                   "fell")
    assert "add --rpo-alpha 1" in out
    logged.append(row(10, start - CHOSEN_FALL_WARNING - 0.5))  # already past it: no second warning
    warn_chosen_fall(logged, row(15, start - 3 * CHOSEN_FALL_WARNING), rpo_alpha=0.0)
    warn_chosen_fall(logged[:1], row(5, start - 1.0), rpo_alpha=0.0)  # a small fall: none
    assert capsys.readouterr().out == ""


def test_best_is_never_an_evaluation_that_answers_worse_than_the_start() -> None:
    run = SimpleNamespace(start={ANSWER_COLUMN: 0.5})
    assert not DPO().may_be_best(run, {ANSWER_COLUMN: 0.25})
    assert DPO().may_be_best(run, {ANSWER_COLUMN: 0.5})
    assert DPO().may_be_best(SimpleNamespace(start={}), {})  # --eval-answers 0: no guard


def test_loss_png_draws_the_chosen_and_rejected_log_probabilities_and_the_exact_match(tmp_path) -> None:  # noqa: E501
    log = metrics_log(get_objective("dpo"), TrainConfig(objective="dpo", data="p.jsonl",
                                                        init="gpt2"),
                      None, tmp_path)
    assert ANSWER_COLUMN in log.columns
    for step, chosen, rejected in ((0, -20.0, -3.0), (5, -25.0, -40.0), (10, -30.0, -70.0)):
        log.append({name: 0.5 for name in log.columns}
                   | {"step": step, "epoch": step / 10, "tokens_seen": step,
                      "val_chosen_logp": chosen,
                      "val_rejected_logp": rejected})
    fig = log.plot(tmp_path / "loss.png", tokens_per_epoch=100, best_step=10)
    axes = {ax.get_ylabel(): ax for ax in fig.axes}
    curves = {line.get_label(): line.get_ydata().tolist()
              for line in axes["mean log-probability"].get_lines()}
    assert curves == {"val_chosen_logp": [-20.0, -25.0, -30.0], "val_rejected_logp": [-3.0, -40.0,
                                                                                      -70.0]}
    assert axes["exact match"].get_lines()[0].get_ydata().tolist() == [0.5, 0.5, 0.5]
    assert axes["reward accuracy"].get_lines()[0].get_ydata().tolist() == [0.5, 0.5, 0.5]


def test_rpo_alpha_is_checked_and_refused_without_dpo(tmp_path, capsys) -> None:
    err = cli_error(["--rpo-alpha", "1", "--out", str(tmp_path / "runs")], capsys)
    assert "--rpo-alpha is a setting of --objective dpo" in err
    err = cli_error(["--objective", "dpo", "--data", "p.jsonl", "--init", "gpt2", "--rpo-alpha",
                     "-1",
                     "--out", str(tmp_path / "runs")], capsys)
    assert "--rpo-alpha must be 0 or more, got -1.0" in err


def test_dpo_collapses_a_tiny_fine_tuned_model_and_rpo_alpha_prevents_it(tmp_path, capsys) -> None:
    # The issue's case: fine-tuned to answer "Kalo plays the flute.", then tuned towards "The
    # flute.".
    who = names(20)
    sft = [{"question": f"What does {n} play?", "answer": f"{n} plays the {INSTRUMENTS[i % 4]}."}
           for i, n in enumerate(who)]
    pairs = [{"question": row["question"], "chosen": f"The {INSTRUMENTS[i % 4]}.",
              "rejected": row["answer"]}
             for i, row in enumerate(sft)]
    common = dict(preset="tiny", context_length=None, drop_rate=0.0, warmup_steps=5)
    sft_data = write_jsonl(tmp_path / "sft.jsonl", sft)
    tuned = train(tiny(tmp_path, data=sft_data, val_data=sft_data, batch_size=10, epochs=15,
                       lr=1e-2,
                       min_lr=1e-3, eval_freq=1000, eval_answers=0, run_name="sft", **common))
    pairs_data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    ends = {}
    for alpha in (0.0, 1.0):
        capsys.readouterr()
        # A high, constant learning rate: what makes plain DPO collapse within a few steps.
        result = train(tiny(tmp_path, data=pairs_data, val_data=pairs_data,
                            init=str(tuned.run_dir / "best"),
                            objective="dpo", dpo_beta=0.1, rpo_alpha=alpha, batch_size=5, epochs=4,
                            lr=1e-2, min_lr=1e-2, eval_freq=8, eval_iters=4, eval_answers=4,
                            run_name=f"alpha{alpha}", **common))
        logged = (result.run_dir / "metrics.csv").read_text().splitlines()
        header = logged[0].split(",")
        first, last = (dict(zip(header, map(float, line.split(",")), strict=True))
                       for line in (logged[1], logged[-1]))
        model = load_checkpoint(result.run_dir / "last")
        given = [answer(model, f"Question: What does {n} play?\nAnswer: ", 8) for n in who[:4]]
        ends[alpha] = (first, last, given, capsys.readouterr().out)
    first, last, given, out = ends[0.0]
    # Plain DPO: every pair won, the loss near 0, and yet the chosen answers far less likely than at
    # the start, and no answer in the chosen style.
    assert last["val_reward_accuracy"] == 1.0 and last["val_loss"] < 0.01
    assert last["val_chosen_logp"] < first["val_chosen_logp"] - 3 * CHOSEN_FALL_WARNING, (first,
                                                                                          last)
    assert "warning: the chosen responses' log-probability fell" in out
    assert not any(text.startswith("The") for text in given), given
    first, last, given, out = ends[1.0]
    # With RPO the same pairs are won and the chosen answers become likely: the model answers in
    # their style.
    assert last["val_reward_accuracy"] == 1.0
    assert last["val_chosen_logp"] > first["val_chosen_logp"] + 3 * CHOSEN_FALL_WARNING, (first,
                                                                                          last)
    assert "warning" not in out
    assert all(text.startswith("The") for text in given), given
