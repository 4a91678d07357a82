"""LoRA runs through train.py: learning new answers and a preferred style, DPO and GRPO against the
base with its adapters off (DPO's also after a resume), and refusals: a resume that adds or drops
adapters, a base that is gone or has changed."""

import csv
import dataclasses
import io
import shutil
from pathlib import Path

import pytest
import torch
from test_dpo import dpo_run, init_dir, pairs_file, rows, saved, style_pairs, tiny_model, words
from test_finetune import capitals, write_jsonl
from test_grpo_runs import grpo_run, prompts_file
from test_resume import interrupt_after
from tiny_runs import TOKENS, cli_error, tiny

from gpt.base.errors import UserError
from gpt.checkpoints.weights import load_pretrained
from gpt.cli.generate import main as generate_main
from gpt.eval.answers import answer
from gpt.training.trainer import fit, setup, train

pytestmark = pytest.mark.usefixtures("one_thread")
__all__ = ["init_dir", "pairs_file", "prompts_file"]  # fixtures of test_dpo and test_grpo_runs
ALL_LAYERS = "attn.qkv,attn.proj,mlp.fc,mlp.proj,lm_head"


def exact_match(run_dir: Path) -> float:
    return float(list(csv.DictReader(io.StringIO((run_dir / "metrics.csv").read_text())))[-1]
                 ["val_exact_match"])


# ---- learning -------------------------------------------------------------------------------


def test_lora_teaches_a_tiny_model_new_answers_to_questions_it_has_seen(tmp_path) -> None:
    records = capitals(50)
    # The base learnt last year's capitals: every country's answer is the next country's city now.
    moved = [{**row, "answer": records[(i + 1) % 50]["answer"]} for i, row in enumerate(records)]
    old = write_jsonl(tmp_path / "old.jsonl", moved)
    new = write_jsonl(tmp_path / "new.jsonl", records)
    common = dict(context_length=None, drop_rate=0.0, batch_size=10, min_lr=1e-3, warmup_steps=5,
                  eval_freq=1000, eval_iters=5, eval_answers=50)
    base = train(tiny(tmp_path, data=str(old), val_data=str(new), emb_dim=128, n_heads=4, epochs=30,
                      lr=3e-3, run_name="base", **common))
    assert exact_match(base.run_dir) <= 0.1  # it answers with last year's capitals
    # The adapters alone learn the new ones; the head too: the base's frozen 128-wide embedding is
    # the head's weight, and a tiny model's few blocks cannot turn its rows alone into new answers.
    lora = train(tiny(tmp_path, data=str(new), val_data=str(new), init=str(base.run_dir / "best"),
                      lora_rank=16, lora_alpha=16.0, lora_dropout=0.0, lora_targets=ALL_LAYERS,
                      epochs=24, lr=1e-2, run_name="lora", **common))
    assert exact_match(lora.run_dir) >= 0.9


def test_dpo_with_lora_makes_a_tiny_model_answer_in_the_chosen_style(tmp_path) -> None:
    names = words(100, seed=3)  # the set-up of test_dpo's: a fine-tuned model, then DPO
    sft_names, dpo_names, held_out = names[:50], names[50:80], names[80:]
    sft_rows = [{"prompt": row["prompt"],
                 "response": row["chosen"] if i % 4 == 0 else row["rejected"]}
                for i, row in enumerate(style_pairs(sft_names))]
    sft_data = write_jsonl(tmp_path / "sft.jsonl", sft_rows)
    common = dict(preset="tiny", context_length=None, drop_rate=0.0, eval_answers=0, warmup_steps=5)
    sft = train(tiny(tmp_path, data=str(sft_data), val_data=str(sft_data), batch_size=10, epochs=20,
                     lr=1e-2, min_lr=1e-3, eval_freq=1000, run_name="sft", **common))
    pairs = write_jsonl(tmp_path / "p.jsonl", style_pairs(dpo_names))
    result = train(tiny(tmp_path, data=str(pairs),
                        val_data=str(write_jsonl(tmp_path / "v.jsonl", style_pairs(held_out))),
                        init=str(sft.run_dir / "best"), objective="dpo", dpo_beta=0.5, batch_size=6,
                        epochs=8, lr=3e-3, min_lr=3e-4, eval_freq=1000, eval_iters=4, lora_rank=8,
                        lora_dropout=0.0, run_name="dpo", **common))
    assert float(rows(result.run_dir)[-1]["val_reward_accuracy"]) >= 0.9
    tuned, before = load_pretrained(result.run_dir / "last"), load_pretrained(sft.run_dir / "best")
    styled = [[answer(model, f"Is {w} a word? ", 8).startswith("It is") for w in held_out]
              for model in (before, tuned)]
    assert sum(styled[0]) <= 2 and all(styled[1])  # mostly "Yes." before; all "It is ..." after


# ---- DPO's reference: the base, adapters off ----------------------------------------------------


def test_dpo_with_lora_uses_the_base_as_reference_also_after_a_resume(tmp_path, pairs_file,
                                                                     init_dir, monkeypatch) -> None:
    plain = setup(dpo_run(tmp_path, pairs_file, init_dir, run_name="plain"))
    expected = [dataset.reference for dataset in plain.records.datasets]  # a loaded reference's
    plain.lock.release()
    cfg = dpo_run(tmp_path, pairs_file, init_dir, lora_rank=4, lora_dropout=0.1, drop_rate=0.1,
                  max_steps=8, lr=1e-2)
    straight = train(dataclasses.replace(cfg, run_name="straight"))
    interrupt_after(5, monkeypatch)
    train(cfg)
    monkeypatch.undo()
    cfg = dataclasses.replace(cfg, prompt_template="plain")  # as the run resolved it
    run = setup(cfg, resume=tmp_path / "run")  # its adapters trained: off, they are the base again
    datasets = run.records.datasets
    assert all(torch.equal(d.reference, e) for d, e in zip(datasets, expected, strict=True))
    assert [p for p in run.model.parameters() if p.requires_grad] == \
        [p for n, p in run.model.named_parameters() if "lora_" in n]
    run.lock.release()
    resumed = train(cfg, resume=tmp_path / "run")
    assert resumed.step_losses == {s: v for s, v in straight.step_losses.items() if s > 5}
    measured = [[{k: v for k, v in row.items() if k != "tokens_per_s"}
                 for row in rows(tmp_path / name)] for name in ("run", "straight")]
    assert measured[0] == measured[1]


def test_grpo_with_lora_takes_its_kl_to_the_base_without_a_second_model(tmp_path, prompts_file,
                                                                        init_dir) -> None:
    cfg = grpo_run(tmp_path, prompts_file, init_dir, kl_beta=0.5, eval_freq=1, max_steps=4,
                   lora_rank=4, lora_dropout=0.0, lr=1e-2)
    run = setup(cfg)
    assert run.records.step.reference is run.model  # type: ignore[union-attr]
    result = fit(run)
    logged = rows(result.run_dir)
    # Step 1 sampled with B = 0, the base itself: its KL is 0 exactly; later the adapters moved.
    assert float(logged[1]["kl"]) == 0.0 and float(logged[4]["kl"]) > 0
    # The same run against the --init weights loaded as a second model: the same steps.
    loaded = train(dataclasses.replace(cfg, reference=str(init_dir), run_name="loaded"))
    assert loaded.step_losses == result.step_losses
    assert [row["kl"] for row in rows(loaded.run_dir)] == [row["kl"] for row in logged]


# ---- refusals: one line, exit 2, nothing written ------------------------------------------------


@pytest.fixture
def base_and_runs(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A saved base, a LoRA run and a full run from it, 2 steps each."""
    base = saved(tiny_model(5), tmp_path / "base")
    for name, rank in (("lora", 4), ("full", 0)):
        train(tiny(tmp_path, init=str(base), lora_rank=rank, max_steps=2, eval_freq=2,
                   run_name=name), token_ids=TOKENS)
    return base, tmp_path / "lora", tmp_path / "full"


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file()}


def test_a_resume_that_adds_or_drops_adapters_is_refused(base_and_runs, capsys) -> None:
    _, lora, full = base_and_runs
    before = snapshot(lora.parent)
    capsys.readouterr()
    err = cli_error(["--resume", str(full), "--lora-rank", "4"], capsys)
    assert "--resume: --lora-rank 4 differs from the run's 0" in err
    err = cli_error(["--resume", str(lora), "--lora-rank", "0"], capsys)
    assert "--resume: --lora-rank 0 differs from the run's 4" in err
    assert snapshot(lora.parent) == before


def test_a_lora_run_whose_base_is_gone_is_refused_by_every_command(base_and_runs, capsys) -> None:
    base, lora, _ = base_and_runs
    shutil.move(base, base.with_name("moved"))
    before = snapshot(lora)
    capsys.readouterr()
    err = cli_error(["--resume", str(lora)], capsys)
    assert f"holds LoRA adapters of the base {base}, which cannot be loaded" in err
    assert f"write where it is now into base.source in {lora / 'last' / 'lora.json'}" in err
    with pytest.raises(UserError, match="which cannot be loaded"):
        generate_main(["--checkpoint", str(lora), "--device", "cpu", "--max-new-tokens", "2"])
    assert snapshot(lora) == before


def test_a_lora_run_whose_base_changed_is_refused(base_and_runs, capsys) -> None:
    base, lora, _ = base_and_runs
    shutil.rmtree(base)
    saved(tiny_model(6), base)  # other weights at the same path
    capsys.readouterr()
    err = cli_error(["--resume", str(lora)], capsys)
    assert f"the base {base} of the LoRA adapters in {lora / 'last'} has other weights than they " \
        "were trained on (sha256 " in err
    with pytest.raises(UserError, match="put back the base they were trained on"):
        load_pretrained(lora)
