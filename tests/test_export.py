"""`gpt-export` writes a directory the Hugging Face tools load on their own, offline: transformers'
pipeline continues text as generate.py does, its tokenizer gives tiktoken's ids, and the model card
tells the run's data, settings, steps and losses as the run recorded them."""

import argparse
import csv
import json
import math
import os
import runpy
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gpt.cli.export
from gpt.checkpoints.checkpoint import save_model
from gpt.checkpoints.load import DEFAULT_TEMPERATURE
from gpt.cli.export import EXPORT_FILES, RUN_LOCATION, cli, export
from gpt.cli.generate import main as generate_main
from gpt.cli.train import parse_args
from gpt.model.config import GPTConfig
from gpt.model.model import GPT
from gpt.model.tokenizer import ENDOFTEXT_ID, get_tokenizer
from gpt.training.settings import TrainConfig
from gpt.training.trainer import train

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
TEXT = "Every effort moves you forward, and every step you take is a step toward the sea. " * 40
PROMPT = "Every effort moves you"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model trained for a few steps, with the run directory train.py writes."""
    tmp = tmp_path_factory.mktemp("run")
    (tmp / "corpus.txt").write_text(TEXT)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train(TrainConfig(
            data=str(tmp / "corpus.txt"), data_dir=str(tmp / "data"), preset="tiny",
            context_length=32,
            batch_size=2, max_steps=6, eval_freq=3, warmup_steps=2, sample_tokens=0,
            dtype="float32",
            device="cpu", out=str(tmp / "runs"), run_name="run"))
    finally:
        torch.set_num_threads(threads)
    return result.run_dir


@pytest.fixture(scope="module")
def exported(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "model"
    assert export(run, out) == run / "best"
    return out


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, no_network: None) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def test_export_writes_the_files_a_hub_model_repository_has(exported: Path) -> None:
    assert {p.name for p in exported.iterdir()} == EXPORT_FILES == {
        "config.json", "model.safetensors", "generation_config.json", "vocab.json", "merges.txt",
        "tokenizer_config.json", "special_tokens_map.json", "README.md"}
    assert not [p for p in exported.parent.iterdir() if p.name.startswith(".")]  # no temporary left


def test_pipeline_continues_greedily_exactly_as_generate_py(run: Path, exported: Path,
                                                            offline: None,
                                                            run_command) -> None:
    from transformers import pipeline

    generator = pipeline("text-generation", model=str(exported), device="cpu")
    hf_text = generator(PROMPT, max_new_tokens=20, do_sample=False)[0]["generated_text"]
    # generate.py's `main` (test_generate_cli.py runs the script itself as a process).
    status, out, err = run_command(generate_main, [
        "--checkpoint", str(run), "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens",
        "20",
        "--dtype", "float32", "--device", "cpu"])
    assert status == 0, err
    assert out == hf_text + "\n"
    assert len(hf_text) > len(PROMPT)


def test_auto_tokenizer_gives_tiktokens_ids(exported: Path, offline: None) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(exported))
    text = ("Hello, do you like tea? <|endoftext|> In the sunlit terraces\n\n  def f(x):\treturn x "
            "** 2  # 3.14 café 🤖 日本語 ''' \r\n it's, they'll ,odd spacing ,")
    ids = get_tokenizer().encode(text, allowed_special={"<|endoftext|>"})
    assert tokenizer(text)["input_ids"] == ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == ENDOFTEXT_ID
    assert len(tokenizer) == ENDOFTEXT_ID + 1


class _Parsed(Exception):
    """Carries the flags generate.py parsed, out of its main."""


def generate_py_defaults(monkeypatch: pytest.MonkeyPatch) -> dict:
    """The values `python generate.py` runs with when given no flags, from its own parser."""
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(vars(parse(self, args, namespace)))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", ["generate.py"])
    with pytest.raises(_Parsed) as parsed:
        runpy.run_path(str(ROOT / "generate.py"), run_name="__main__")
    return parsed.value.args[0]


def test_generation_config_samples_as_generate_py_does(exported: Path, offline: None,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import GenerationConfig

    config = GenerationConfig.from_pretrained(str(exported))
    defaults = generate_py_defaults(monkeypatch)
    assert defaults["temperature"] is None  # the model's own: for a text run, DEFAULT_TEMPERATURE
    assert (config.temperature, config.top_k, config.max_new_tokens) == (
        DEFAULT_TEMPERATURE, defaults["top_k"], defaults["max_new_tokens"])
    assert config.do_sample
    assert config.eos_token_id == config.bos_token_id == config.pad_token_id == ENDOFTEXT_ID


def test_model_card_tells_what_the_run_recorded(run: Path, exported: Path) -> None:
    card = (exported / "README.md").read_text()
    front, body = card.removeprefix("---\n").split("\n---\n", 1)
    for line in ("library_name: transformers", "license: mit", "pipeline_tag: text-generation",
                 "tags:"):
        assert line in front.splitlines()
    settings = json.loads((run / "train_config.json").read_text())
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # best/ holds the lowest validation loss
    best = min(rows, key=lambda row: float(row["val_loss"]))
    val_loss = float(best["val_loss"])
    assert f"validation loss: {val_loss:.4f} (perplexity {math.exp(val_loss):.1f})" in body
    assert f"these weights: step {int(best['step'])} " in body
    assert f"training data: `{settings['data']}`" in body
    for row in rows:  # the evaluation table, one line per metrics.csv row
        assert f"| {row['step']} | {float(row['epoch']):.2f} | " in body
    # The TOML block and the command are the run's settings (where the run went aside).
    toml = tomllib.loads(body.split("```toml\n")[1].split("```")[0])
    expected = {k: v for k, v in settings.items() if v is not None and k not in RUN_LOCATION}
    assert toml == expected
    command = body.split("```bash\n")[1].split("```")[0].strip()
    assert command.startswith("gpt-train ")
    cfg, resume = parse_args(shlex.split(command)[1:])
    assert resume is None
    assert {k: v for k, v in cfg.to_dict().items() if k not in RUN_LOCATION} == {
        k: v for k, v in settings.items() if k not in RUN_LOCATION}


def test_a_bare_checkpoint_exports_with_training_unknown(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    save_model(GPT(GPTConfig.preset("tiny")), tmp_path / "weights")
    export(tmp_path / "weights", tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    training = card.split("## Training\n")[1].split("\n## ")[0]
    assert training.strip().startswith("unknown: ")
    assert "## Model" in card and "| context length | 128 tokens |" in card


def damage(run: Path, what: str) -> None:
    if what == "missing run":
        shutil.rmtree(run)
    elif what == "truncated weights":
        path = run / "best" / "model.safetensors"
        path.write_bytes(path.read_bytes()[:1000])
    elif what == "config not JSON":
        (run / "best" / "config.json").write_text("{not json")
    elif what == "truncated train state":
        path = run / "best" / "train_state.pt"
        path.write_bytes(path.read_bytes()[:500])
    elif what == "metrics not numbers":
        (run / "metrics.csv").write_text("step,epoch,tokens_seen,train_loss,val_loss\n0,x,0,1,1\n")


@pytest.mark.parametrize("what", ["missing run", "truncated weights", "config not JSON",
                                  "truncated train state", "metrics not numbers"])
def test_a_damaged_run_is_one_line_exit_2_and_no_output(
        what: str, run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    damage(copy, what)
    monkeypatch.setattr(sys, "argv", ["gpt-export", str(copy), str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_:
        cli()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == (["run"] if what != "missing run" else [])


def test_the_command_refuses_a_missing_run_in_one_line(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "gpt.cli.export", str(tmp_path / "nope"),
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert "runs/<run-name>" in done.stderr
    assert not (tmp_path / "out").exists()


def test_a_directory_with_other_files_is_refused_and_an_earlier_export_replaced(
        run: Path, exported: Path, tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(gpt.UserError, match="holds other files"):
        export(run, tmp_path / "mine")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    again = tmp_path / "again"
    shutil.copytree(exported, again)
    (again / "README.md").write_text("stale")
    export(run, again)
    assert (again / "README.md").read_text() == (exported / "README.md").read_text()


def test_a_failure_while_writing_leaves_no_output(run: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gpt.cli.export.shutil, "copyfile", disk_full)
    # one line (gpt.base.atomic)
    with pytest.raises(gpt.UserError, match="No space left on device"):
        export(run, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
