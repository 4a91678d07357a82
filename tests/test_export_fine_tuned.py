"""An export of a fine-tuned run answers through transformers.pipeline as generate.py answers (issue
31): its prompt template is the tokenizer's chat_template and is in the model card, its generation
config is greedy."""

import io
import json
from pathlib import Path

import pytest
from tiny_runs import tiny

from gpt.cli.export import chat_template, export
from gpt.cli.generate import GenerationOptions, run_generation
from gpt.data.records import format_prompt
from gpt.training.trainer import train

QA = [{"question": f"What colour is the {thing}?", "answer": f"The {thing} is {colour}."}
      for thing, colour in (("sky", "blue"), ("grass", "green"), ("sun", "yellow"), ("snow",
                                                                                     "white"),
                            ("coal", "black"), ("rose", "red"))]


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory) -> tuple[Path, Path]:
    """(run directory, its export): a tiny model fine-tuned on six questions until it answers in
    their style."""
    tmp = tmp_path_factory.mktemp("ft")
    data = tmp / "qa.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in QA))
    run_dir = train(tiny(tmp, data=str(data), val_data=str(data), context_length=None,
                         drop_rate=0.0,
                         batch_size=6, epochs=40, lr=1e-2, eval_freq=1000, eval_answers=0)).run_dir
    out = tmp / "export"
    export(run_dir, out)
    return run_dir, out


@pytest.mark.parametrize("template", ["qa", "plain", "alpaca", "Q: {prompt}\n{input}A:"])
def test_the_chat_template_renders_the_last_message_as_format_prompt_does(template) -> None:
    from jinja2 import Template

    messages = [{"role": "user", "content": 'Why "so"?\nSay.'}]
    assert Template(chat_template(template)).render(messages=messages) == format_prompt(template,
                                                                                         'Why '
                                                                                         '"so"?\nSay.')


def test_pipeline_answers_the_template_and_chat_messages_as_generate_py(fine_tuned,
                                                                        monkeypatch) -> None:
    from transformers import pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run_dir, exported = fine_tuned
    config = json.loads((exported / "tokenizer_config.json").read_text())
    assert config["chat_template"] == chat_template("qa")
    assert json.loads((exported / "generation_config.json").read_text())["do_sample"] is False
    generator = pipeline("text-generation", model=str(exported), device="cpu")
    for row in QA[:3]:
        out = io.StringIO()
        run_generation(GenerationOptions(prompt=row["question"], max_new_tokens=12,
                                         checkpoint=run_dir,
                                         device="cpu", dtype="float32"), out=out, err=io.StringIO())
        given = out.getvalue().removesuffix("\n")
        assert given.startswith("The ") and given.endswith(".")  # an answer to compare, not junk
        templated = generator(format_prompt("qa", row["question"]), max_new_tokens=12,
                              return_full_text=False)[0]["generated_text"]
        chat = generator([{"role": "user", "content": row["question"]}], max_new_tokens=12)
        assert templated == given
        assert chat[0]["generated_text"][-1] == {"role": "assistant", "content": given}


def test_the_model_card_shows_the_template_with_an_example(fine_tuned) -> None:
    card = (fine_tuned[1] / "README.md").read_text()
    assert "## Prompt template" in card and "prompt template `qa`" in card
    assert "Question: What is the capital of France?\nAnswer: |" in card
    assert '"role": "user"' in card and "(local records)" in card
    assert "decodes greedily" in card
