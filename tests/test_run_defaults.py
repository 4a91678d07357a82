"""What a fine-tuned run passes on (issue 31): its prompt template to runs started from it (--init),
its generation defaults to generate.py, and its exact match to loss.png."""

import io
import json
from pathlib import Path

import pytest
from tiny_runs import tiny

from gpt.checkpoints.checkpoint import load_checkpoint
from gpt.checkpoints.load import generation_defaults
from gpt.cli.generate import INTERACTIVE_HINT, GenerationOptions, run_generation
from gpt.data.records import format_prompt
from gpt.eval.answers import answer
from gpt.training.run import get_objective
from gpt.training.settings import TrainConfig
from gpt.training.trainer import metrics_log, setup, train

pytestmark = pytest.mark.usefixtures("one_thread")
QA = [{"question": f"What is {a} plus {b}?", "answer": f"{a + b}."} for a in range(4)
      for b in range(3)]


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def qa_run(tmp_path_factory) -> Path:
    """A run fine-tuned (two steps) on question/answer records: the 'qa' template."""
    tmp = tmp_path_factory.mktemp("qa")
    data = write_jsonl(tmp / "qa.jsonl", QA)
    return train(tiny(tmp, data=data, context_length=None, max_steps=2, eval_answers=0,
                      run_name="qa")).run_dir


def pairs_file(tmp_path: Path) -> str:
    return write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": row["question"],
                                                   "chosen": row["answer"],
                                                  "rejected": "No."} for row in QA])


def test_dpo_from_a_fine_tuned_run_keeps_its_template_though_the_pairs_name_another(
        qa_run, tmp_path, capsys) -> None:
    run = setup(tiny(tmp_path, data=pairs_file(tmp_path), init=str(qa_run / "best"),
                     objective="dpo",
                     context_length=None, run_name="kept"))
    assert run.records.template == "qa"  # the pairs' key, prompt, would have given 'plain'
    assert "warning" not in capsys.readouterr().err
    saved = json.loads((run.run_dir / "train_config.json").read_text())
    assert saved["prompt_template"] == "qa"


def test_a_template_other_than_the_init_runs_is_named_in_one_warning_line(qa_run, tmp_path,
                                                                          capsys) -> None:
    responses = write_jsonl(tmp_path / "more.jsonl",
                            [{"prompt": row["question"], "response": row["answer"]} for row in QA])
    run = setup(tiny(tmp_path, data=responses, init=str(qa_run), prompt_template="plain",
                     context_length=None, run_name="switched"))
    assert run.records.template == "plain"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"warning: --init {qa_run} was fine-tuned with "
                                                   f"prompt "
                                                   "template 'qa'"), err
    assert "'plain'" in err


def generate(checkpoint: Path, inp: io.StringIO | None = None, **options) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    settings = dict(prompt=QA[0]["question"], max_new_tokens=6, checkpoint=checkpoint, device="cpu",
                    dtype="float32")
    run_generation(GenerationOptions(**{**settings, **options}), out=out, err=err, inp=inp)
    return out.getvalue(), err.getvalue()


def test_generate_answers_a_fine_tuned_run_greedily_by_default_and_says_so(qa_run) -> None:
    assert generation_defaults(qa_run / "best") == {"temperature": 0.0}
    out, err = generate(qa_run)
    greedy = answer(load_checkpoint(qa_run / "best"), format_prompt("qa", QA[0]["question"]), 6)
    assert out == greedy + "\n"
    assert "decoding: greedy (temperature 0), the fine-tuned run's default; --temperature 0.8 samples" in err  # noqa: E501
    out, err = generate(qa_run, temperature=0.9, seed=1)
    assert "decoding: temperature 0.9, --temperature" in err


def test_a_generation_temperature_set_at_training_time_is_the_runs_default(tmp_path) -> None:
    data = write_jsonl(tmp_path / "qa.jsonl", QA)
    run_dir = train(tiny(tmp_path, data=data, context_length=None, max_steps=1, eval_answers=0,
                         generation_temperature=0.7)).run_dir
    assert generation_defaults(run_dir / "last") == {"temperature": 0.7}
    _, err = generate(run_dir, seed=1)
    assert "decoding: temperature 0.7, the fine-tuned run's default" in err


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_interactive_on_a_terminal_shows_a_hint_and_a_prompt_and_skips_empty_lines(qa_run) -> None:
    question = QA[1]["question"]
    out, err = generate(qa_run, interactive=True, inp=Terminal(f"\n{question}\n   \n"))
    greedy = answer(load_checkpoint(qa_run / "best"), format_prompt("qa", question), 6)
    assert out == greedy + "\n"  # one answer: the empty lines were not questions
    # before each of the 3 lines, and at the end
    assert INTERACTIVE_HINT in err and err.count("> ") == 4
    piped_out, piped_err = generate(qa_run, interactive=True, inp=io.StringIO(f"\n{question}\n"))
    assert piped_out == out and INTERACTIVE_HINT not in piped_err and "> " not in piped_err


def test_loss_png_draws_a_fine_tuning_runs_exact_match_on_a_second_axis(tmp_path) -> None:
    cfg = TrainConfig(data="qa.jsonl")
    log = metrics_log(get_objective("lm"), cfg, object(), tmp_path)
    assert log.accuracy == "val_exact_match"
    for step, exact in ((0, 0.0), (5, 0.25), (10, 0.75)):
        log.append({name: 1.0 for name in log.columns}
                   | {"step": step, "epoch": step / 10, "tokens_seen": step,
                      "val_exact_match": exact})
    fig = log.plot(tmp_path / "loss.png", tokens_per_epoch=100, best_step=10)
    axes = {ax.get_ylabel(): ax for ax in fig.axes}
    assert axes["exact match"].get_lines()[0].get_ydata().tolist() == [0.0, 0.25, 0.75]
    legend = [text.get_text() for text in fig.axes[0].get_legend().get_texts()]
    assert "validation exact match" in legend
    text_log = metrics_log(get_objective("lm"), TrainConfig(), None, tmp_path)
    assert text_log.accuracy is None  # pretraining: no second axis
