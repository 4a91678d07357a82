"""GRPO runs through train.py: what a run logs and prints, the frozen reference, learning to answer
a checkable question after a fine-tune that answers it right a third of the time, exact resume
between the updates of one rollout, a reward that fails mid-run, and 2 gloo ranks against one
process."""

import csv
import dataclasses
import io
import json
import math
import os
import random
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_distributed import _free_port, _torchrun_env
from test_resume import interrupt_after
from tiny_runs import assert_same_params, params, tiny

from gpt.base.errors import UserError
from gpt.checkpoints.checkpoint import load_checkpoint, save_model
from gpt.cli.generate import GenerationOptions, run_generation
from gpt.cli.train import main as train_main
from gpt.eval.answers import answer
from gpt.model.config import GPTConfig
from gpt.model.model import GPT
from gpt.model.tokenizer import get_tokenizer
from gpt.objectives.grpo import GRPO_EXTRA, VAL_COLUMN
from gpt.objectives.rollouts import prompt_collate
from gpt.training import metrics, trainer
from gpt.training.settings import TrainConfig
from gpt.training.trainer import fit, setup, train

pytestmark = pytest.mark.usefixtures("one_thread")
SYLLABLES = ["ka", "lo", "mi", "zu", "ra", "te", "vo", "ni", "sa", "pe", "do", "gu"]


def words(n: int, seed: int) -> list[str]:
    """`n` different made-up words of two syllables."""
    rng = random.Random(seed)
    found: dict[str, None] = {}
    while len(found) < n:
        found.setdefault(rng.choice(SYLLABLES) + rng.choice(SYLLABLES), None)
    return list(found)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def rows(run_dir: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO((run_dir / "metrics.csv").read_text())))


@pytest.fixture
def init_dir(tmp_path: Path) -> Path:
    """A random tiny model to start from: its completions are random text."""
    torch.manual_seed(7)
    directory = tmp_path / "init"
    directory.mkdir()
    save_model(GPT(GPTConfig.preset("tiny", drop_rate=0.0)), directory)
    return directory


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    """24 prompts of 4 tokens each, templated: decoded in a batch of any size, each row's numbers
    are the same (no prompt is decoded a token at a time for waiting on a longer one)."""
    tokenizer = get_tokenizer()
    same = [w for w in words(80, seed=1) if len(tokenizer.encode(f"Say {w} ")) == 4][:24]
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Say {w}"} for w in same])


def grpo_run(tmp_path: Path, data: Path, init: Path, **overrides) -> TrainConfig:
    # A random model's completions contain a k or an x about half of the time: groups differ.
    settings = dict(data=str(data), init=str(init), objective="grpo", reward=("regex:[kx]",),
                    group_size=4,
                    rollout_tokens=4, context_length=None, drop_rate=0.0, batch_size=2, eval_freq=2,
                    eval_iters=2, max_steps=4, lr=3e-3, sample_tokens=0)
    return tiny(tmp_path, **{**settings, **overrides})


def test_a_grpo_run_logs_its_metrics_prints_them_and_keeps_the_reference_frozen(
        tmp_path, prompts_file, init_dir, capsys) -> None:
    cfg = grpo_run(tmp_path, prompts_file, init_dir, kl_beta=0.5, eval_freq=1, max_steps=3)
    run = setup(cfg)
    reference = run.records.step.reference  # type: ignore[union-attr]
    before = params(reference)
    result = fit(run)
    assert_same_params(before, params(reference))  # bit-identical: never trained
    assert not any(p.requires_grad for p in reference.parameters())
    logged = rows(result.run_dir)
    assert list(logged[0]) == list(metrics.columns(val=(VAL_COLUMN,), extra=GRPO_EXTRA))
    assert [row["step"] for row in logged] == ["0", "1", "2", "3"]
    # Step 1 sampled with the --init weights, which the reference is: its KL is 0 exactly; later
    # not.
    assert float(logged[1]["kl"]) == 0.0 and float(logged[3]["kl"]) > 0
    for row in logged:
        assert float(row["val_loss"]) == -float(row[VAL_COLUMN])  # best/ follows the highest reward
    assert 0 < float(logged[1]["train_reward"]) < 1 and float(logged[1]["equal_groups"]) < 1
    assert float(logged[1]["completion_tokens"]) == 4.0  # a random model never says end-of-text
    out = capsys.readouterr().out
    assert "22 training prompts, 4 completions each of up to 4 tokens" in out
    assert "| sampled reward " in out and "(mean reward " in out and "KL 0.0000 |" in out
    assert f"best validation mean reward {-result.best_val_loss:.4f} at step" in out
    assert (result.run_dir / "loss.png").stat().st_size > 0


def test_resume_between_the_updates_of_one_rollout_continues_exactly(
        tmp_path, prompts_file, init_dir, monkeypatch) -> None:
    # Dropout and two updates per rollout: both the random stream and the kept rollout must resume.
    cfg = grpo_run(tmp_path, prompts_file, init_dir, drop_rate=0.1, updates_per_rollout=2,
                   max_steps=8,
                   eval_freq=4, kl_beta=0.1)
    straight = train(dataclasses.replace(cfg, run_name="straight"))
    interrupt_after(5, monkeypatch)  # after the first update of the third rollout
    assert train(cfg).stop_reason == "interrupted"
    monkeypatch.undo()
    torch.manual_seed(999)  # the resumed run restores its own random state
    resumed = train(dataclasses.replace(cfg, prompt_template="plain"), resume=tmp_path / "run")
    assert min(resumed.step_losses) == 6 and resumed.step == straight.step == 8
    assert resumed.step_losses == {s: straight.step_losses[s] for s in resumed.step_losses}
    assert len(set(straight.step_losses.values())) > 4  # the steps differ: something was learnt
    assert_same_params(params(load_checkpoint(tmp_path / "straight" / "last")),
                       params(load_checkpoint(tmp_path / "run" / "last")))
    timings = ("tokens_per_s", "sample_seconds", "learn_seconds")

    def measured(run: str) -> list[dict[str, str]]:
        return [{k: v for k, v in row.items() if k not in timings} for row in rows(tmp_path / run)]

    assert measured("run") == measured("straight")


def test_a_resumed_run_keeps_its_rewards(tmp_path, prompts_file, init_dir) -> None:
    cfg = grpo_run(tmp_path, prompts_file, init_dir, max_steps=1, eval_freq=1)
    train(cfg)
    with pytest.raises(UserError, match=r"--resume: --reward \('exact',\) differs from the run's "):
        train(dataclasses.replace(cfg, reward=("exact",), prompt_template="plain"),
              resume=tmp_path / "run")


def test_gradient_accumulation_over_unequal_micro_batches_matches_one_big_batch(
        tmp_path, prompts_file, init_dir) -> None:
    # The same prompts sample the same completions; with the sequence mean the step's gradient is
    # that of the mean over all of them, however the micro-batches split them (3 prompts and 1
    # here).
    big = setup(grpo_run(tmp_path, prompts_file, init_dir, batch_size=4,
                         loss_aggregation="sequence",
                         run_name="big"))
    small = setup(grpo_run(tmp_path, prompts_file, init_dir, batch_size=2, grad_accum=2,
                           loss_aggregation="sequence", run_name="small"))
    for run in (big, small):
        run.optimizer.step = lambda *args, **kwargs: None  # keep the gradients to compare them
    items = [big.records.datasets[0][(i, 0, 0, 0)] for i in range(4)]  # type: ignore[union-attr]
    # the second micro-batch's place
    last = [(ids, index, (0, 1, 0)) for ids, index, _ in items[3:]]
    trainer.train_step(big, [prompt_collate(items)])
    trainer.train_step(small, [prompt_collate(items[:3]), prompt_collate(last)])
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in big.model.parameters()]))
    assert norm > 0.1  # the groups taught something
    for a, b in zip(big.model.parameters(), small.model.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)
    for run in (big, small):
        run.lock.release()


def test_a_bfloat16_run_samples_and_learns_under_autocast(tmp_path, prompts_file, init_dir) -> None:
    result = train(grpo_run(tmp_path, prompts_file, init_dir, dtype="bfloat16", max_steps=2,
                            kl_beta=0.1))
    (row,) = rows(result.run_dir)[1:]
    assert float(row["grad_norm"]) > 0.1 and 0 < float(row["train_reward"]) < 1
    # a random model: no stop
    assert float(row["completion_tokens"]) == 4.0 and float(row["kl"]) >= 0
    weights = load_checkpoint(result.run_dir / "last").parameters()
    assert all(math.isfinite(float(p.detach().sum())) for p in weights)


def test_a_reward_that_raises_mid_run_ends_it_with_one_line(tmp_path, prompts_file, init_dir,
                                                             run_command) -> None:
    (tmp_path / "bad.py").write_text("def reward(prompt, completion, record):\n"
                                     "    return 1 / len(completion.split('k')[5])\n")
    result = run_command(train_main, ["--objective", "grpo", "--data", str(prompts_file), "--init",
                                      str(init_dir), "--reward", f"{tmp_path / 'bad.py'}:reward",
                                      "--device", "cpu", "--out", str(tmp_path / "runs")])
    assert result.status == 2 and "Traceback" not in result.err and result.err.count("error:") == 1
    line = result.err.splitlines()[-1]  # after the run's first line on stdout: it had started
    assert (f"error: --reward {tmp_path / 'bad.py'}:reward raised IndexError: list index out of "
            f"range on {prompts_file}:") in line


def test_after_a_fine_tune_grpo_makes_a_tiny_model_answer_right_through_train_py(
        tmp_path, capsys) -> None:
    # Made-up words are not words: "No." is right. The fine-tune answers it a third of the time,
    # each prompt both ways (2 x "Yes." and 1 x "No."), so greedy answers start out wrong.
    names = words(100, seed=3)
    sft_rows = [{"prompt": f"Is {w} a word?", "response": r}
                for w in names[:50] for r in ("Yes.", "No.", "Yes.")]
    common = dict(preset="tiny", context_length=None, drop_rate=0.0, eval_answers=0, warmup_steps=2)
    sft = train(tiny(tmp_path, data=str(write_jsonl(tmp_path / "sft.jsonl", sft_rows)),
                     val_fraction=0.1,
                     batch_size=10, epochs=5, lr=1e-2, min_lr=1e-3, eval_freq=1000, run_name="sft",
                     **common))
    question = [{"prompt": f"Is {w} a word?", "response": "No."} for w in names[50:]]
    train_data, val_data = (write_jsonl(tmp_path / f"{name}.jsonl", part)
                            for name, part in (("train", question[:30]), ("val", question[30:])))
    capsys.readouterr()
    train_main(["--objective", "grpo", "--data", str(train_data), "--val-data", str(val_data),
                "--init",
                str(sft.run_dir / "best"), "--reward", "exact", "--group-size", "8",
                "--rollout-tokens",
                "6", "--batch-size", "4", "--max-steps", "10", "--lr", "3e-3", "--min-lr", "3e-4",
                "--warmup-steps", "2", "--eval-freq", "5", "--eval-iters", "5", "--dtype",
                "float32",
                "--device", "cpu", "--sample-tokens", "0", "--out", str(tmp_path), "--run-name",
                "grpo"])
    logged = rows(tmp_path / "grpo")
    first, last = float(logged[0][VAL_COLUMN]), float(logged[-1][VAL_COLUMN])
    assert first <= 0.3 and (last >= first + 0.3 or last >= 0.9), logged  # a margin, not a tie
    assert "best validation mean reward" in capsys.readouterr().out
    best = load_checkpoint(tmp_path / "grpo" / "best")
    assert all(answer(best, f"Is {w} a word? ", 6) == "No." for w in names[80:])
    # generate.py answers the same way: the template applied, stopped at end-of-text
    out = io.StringIO()
    options = GenerationOptions(prompt=f"Is {names[90]} a word?", max_new_tokens=6,
                                temperature=0.0, top_k=None, checkpoint=tmp_path / "grpo" / "best",
                                device="cpu", dtype="float32")
    run_generation(options, out=out, err=io.StringIO())
    assert out.getvalue() == "No.\n"


# ---- under torchrun ------------------------------------------------------------------------------


def _grpo_rank(rank: int, port: int, cfg: TrainConfig) -> None:
    """One rank of the 2-rank GRPO run (gloo, 2 prompts per rank)."""
    os.environ.update(_torchrun_env(rank, port))
    torch.set_num_threads(1)
    result = train(cfg)
    (Path(cfg.out) / f"ddp.{rank}.json").write_text(json.dumps(result.step_losses))


def test_two_ranks_sample_and_learn_as_one_process_with_twice_the_batch(tmp_path, prompts_file,
                                                                        init_dir) -> None:
    # Each completion's random numbers are its prompt's own, so the ranks sample what one process
    # samples; with the sequence mean each rank's loss is a mean over its equal share of
    # completions. Compared at the first step, from the same weights: after it the runs part by more
    # than rounding, because centred advantages cancel many gradients (of the prompt's embeddings,
    # say) down to rounding noise, which AdamW's division by the gradient's own scale makes a step
    # of full size.
    common = dict(max_steps=2, eval_freq=1, loss_aggregation="sequence", kl_beta=0.1, lr=1e-3)
    one = train(grpo_run(tmp_path, prompts_file, init_dir, batch_size=4, run_name="one", **common))
    cfg = grpo_run(tmp_path, prompts_file, init_dir, run_name="ddp", **common)
    mp.start_processes(_grpo_rank, args=(_free_port(), cfg), nprocs=2, start_method="spawn")
    ranks = [{int(step): loss for step,
              loss in json.loads((tmp_path / f"ddp.{r}.json").read_text()).items()}
             for r in range(2)]
    assert ranks[0] == ranks[1] and ranks[0][1] == pytest.approx(one.step_losses[1], rel=1e-5,
                                                                 abs=1e-8)
    two, reference = rows(tmp_path / "ddp"), rows(one.run_dir)
    assert float(reference[1]["grad_norm"]) > 0.1 and 0 < float(reference[1]["train_reward"]) < 1
    for column in ("train_loss", "val_loss", "grad_norm", "train_reward", "reward_std",
                   "equal_groups",
                   "completion_tokens", "kl", "clip_fraction"):
        assert float(two[1][column]) == pytest.approx(float(reference[1][column]), rel=1e-5), column
    # the second step's samples
    for column in ("train_reward", "equal_groups", "completion_tokens"):
        assert float(two[2][column]) == float(reference[2][column]), column
