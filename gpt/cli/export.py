"""Export a trained checkpoint as a Hugging Face model directory: `gpt-export RUN_DIR OUT_DIR`.

OUT_DIR then holds what `transformers.pipeline("text-generation", model=OUT_DIR)` loads on its own,
laid out as a model repository on the Hugging Face hub:

    config.json, model.safetensors    the weights, as `gpt.checkpoints.weights.save_hf` writes them
    generation_config.json            <|endoftext|> as BOS, EOS and padding; generate.py's sampling
                                      defaults
    vocab.json, merges.txt            GPT-2's BPE: OpenAI's encoder.json and vocab.bpe
                                      (see gpt.model.tokenizer)
    tokenizer_config.json,            what transformers' GPT2Tokenizer reads besides those two; for
                                      a
      special_tokens_map.json         fine-tuned run, its prompt template as a chat_template
    README.md                         the model card: the model, its training data, settings, steps,
                                      a fine-tuned run's prompt template with an example,
                                      validation loss and perplexity, the command that reproduces it

A LoRA run's checkpoint is exported with its adapters merged into its base's weights (W + (alpha/r)
B A, `gpt.model.lora.merge_lora`): a plain GPT-2 again.

The card's training facts come from the checkpoint's `train_state.pt` (the settings and counters
saved with those weights) and the run's `metrics.csv`; a checkpoint without them says "unknown".
Everything is checked and read first, then written to a temporary directory renamed to OUT_DIR at
the end, so a bad RUN_DIR or a kill leaves OUT_DIR as it was. OUT_DIR must be new, empty or an
earlier export, which is replaced whole.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import shutil
from pathlib import Path
from typing import Any

from gpt.base.atomic import atomic_directory, write_json
from gpt.base.errors import ArgumentParser, UserError, command_name, run_cli
from gpt.checkpoints.checkpoint import (
    CONFIG_FILE,
    TRAIN_STATE_FILE,
    WEIGHTS_FILE,
    require_model_checkpoint,
)
from gpt.checkpoints.load import DEFAULT_TEMPERATURE
from gpt.checkpoints.weights import HUB_MODELS, HUB_ORG, load_pretrained, save_hf
from gpt.data.corpora import CORPORA, HF_PREFIX
from gpt.data.records import format_prompt, is_record_file
from gpt.eval.perplexity import perplexity
from gpt.model.config import GPTConfig
from gpt.model.tokenizer import ENDOFTEXT, ENDOFTEXT_ID, bpe_files
from gpt.training.metrics import METRICS_FILE, MetricsLog
from gpt.training.resume import read_resume_state, saved_settings
from gpt.training.settings import TrainConfig, flag

GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
CARD_FILE = "README.md"
EXPORT_FILES = {CONFIG_FILE, WEIGHTS_FILE, GENERATION_CONFIG_FILE, *TOKENIZER_FILES, CARD_FILE}

GPT2_VOCAB_SIZE = ENDOFTEXT_ID + 1  # the tokenizer's ids; <|endoftext|> is the last
# What `generate.py` samples a text run with when given no flags (its --temperature, --top-k,
# --max-new-tokens), so that `pipeline(...)(prompt)` samples alike (a fine-tuned run's own default:
# `sampling_defaults`); tests/test_export.py checks they still agree.
SAMPLING_DEFAULTS = {"do_sample": True, "temperature": DEFAULT_TEMPERATURE, "top_k": 50,
                     "max_new_tokens": 100}
EVALUATION_COLUMNS = ("step", "epoch", "tokens_seen", "train_loss", "val_loss")  # the card shows
# Where the run directory went: no setting of the model, and reused it would collide with that run.
RUN_LOCATION = ("out", "run_name")
SPECIAL_TOKENS = {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT}


def export(checkpoint_or_run: str | Path, out_dir: str | Path) -> Path:
    """Write the Hugging Face directory `out_dir` for a checkpoint or run directory (its best/, else
    last/); return the checkpoint directory exported. Raises `UserError` before writing anything if
    the checkpoint is missing or damaged, or if `out_dir` holds files that are not an export's."""
    out_dir = Path(out_dir)
    checkpoint = require_model_checkpoint(Path(checkpoint_or_run))
    if out_dir.exists() and (not out_dir.is_dir() or {p.name
                                                      for p in out_dir.iterdir()} - EXPORT_FILES):
        raise UserError(f"{out_dir} exists and holds other files; the export replaces the whole "
                        "directory, so give a new or empty one, or an earlier export")
    model = load_pretrained(checkpoint)  # a LoRA run's: its base with the adapters merged into it
    if model.config.vocab_size != GPT2_VOCAB_SIZE:
        raise UserError(f"{checkpoint} has vocab_size {model.config.vocab_size}, not GPT-2's "
                        f"{GPT2_VOCAB_SIZE}, so GPT-2's tokenizer does not fit it; gpt.save_hf "
                        f"writes "
                        "its weights alone")
    training = read_training(checkpoint)
    template = training.settings.get("prompt_template") if training else None
    card = model_card(model.config, model.num_parameters(), training)
    vocab_bpe, encoder_json = bpe_files()
    with atomic_directory(out_dir) as tmp:
        save_hf(model, tmp)  # replaces the empty `tmp` with config.json + model.safetensors
        write_json(tmp / GENERATION_CONFIG_FILE, {"bos_token_id": ENDOFTEXT_ID,
                                                  "eos_token_id": ENDOFTEXT_ID,
                                                  "pad_token_id": ENDOFTEXT_ID,
                                                  **sampling_defaults(training)})
        # the same files, under transformers' names
        shutil.copyfile(encoder_json, tmp / "vocab.json")
        shutil.copyfile(vocab_bpe, tmp / "merges.txt")
        write_json(tmp / "tokenizer_config.json", {
            "tokenizer_class": "GPT2Tokenizer", **SPECIAL_TOKENS, "add_prefix_space": False,
            "model_max_length": model.config.context_length, "errors": "replace",
            # transformers would otherwise "clean up" " ," into ",": not what the model wrote.
            "clean_up_tokenization_spaces": False,
            **({"chat_template": chat_template(template)} if template else {})})
        write_json(tmp / "special_tokens_map.json", SPECIAL_TOKENS)
        (tmp / CARD_FILE).write_text(card)
    return checkpoint


CONTENT = "\x00content\x00"
"""A stand-in for a message's text, to split a rendered prompt template around."""


def sampling_defaults(training: Training | None) -> dict[str, Any]:
    """generation_config.json's sampling: a fine-tuned run's own default (greedy unless it was
    trained with --generation-temperature, as `gpt.checkpoints.load.generation_defaults`), else
    `SAMPLING_DEFAULTS`: what generate.py does with the checkpoint."""
    if training is None or not training.settings.get("prompt_template"):
        return SAMPLING_DEFAULTS
    temperature = float(training.settings.get("generation_temperature", 0.0))
    sampled = {"do_sample": True, "temperature": temperature, "top_k": SAMPLING_DEFAULTS["top_k"]}
    return {**(sampled if temperature else {"do_sample": False}),
            "max_new_tokens": SAMPLING_DEFAULTS["max_new_tokens"]}


def chat_template(template: str) -> str:
    """The Jinja chat template that lays out the last message's content as the run's prompt
    `template` does (`gpt.data.records.format_prompt`, without an input): what transformers'
    apply_chat_template, and so `pipeline` given chat messages, feeds the model."""
    before, after = format_prompt(template, CONTENT).split(CONTENT)
    # JSON strings are Jinja string literals too: the template's text, newlines included, verbatim.
    return (f"{{{{ {json.dumps(before)} }}}}{{{{ messages[-1]['content'] }}}}"
            f"{{{{ {json.dumps(after)} }}}}")


def template_section(template: str) -> list[str]:
    """The card's account of a fine-tuned model's prompt template, with an example to run."""
    question = "What is the capital of France?"
    return ["## Prompt template", "",
            f"Fine-tuned on records laid out with the prompt template `{template}`: the model "
            f"answers "
            "a prompt in that layout, and stops at `<|endoftext|>`. For the question "
            f"{json.dumps(question)} it reads", "", "```", format_prompt(template, question) + "|",
            "```",
            "", "(up to the `|`). The tokenizer's `chat_template` lays out the last chat message "
                "the same "
            "way, so either of these gives the answer `generate.py` gives (greedy, as "
            "`generation_config.json` says):", "", "```python", "from transformers import pipeline",
            "",
            'generator = pipeline("text-generation", model="path/to/this/directory")',
            f"prompt = {json.dumps(format_prompt(template, question))}",
            'print(generator(prompt, return_full_text=False)[0]["generated_text"])',
            f'messages = [{{"role": "user", "content": {json.dumps(question)}}}]',
            'print(generator(messages)[0]["generated_text"][-1]["content"])', "```", ""]


# ---- what the run recorded --------------------------------------------------------------------


@dataclasses.dataclass
class Training:
    """What a checkpoint's run recorded about how its weights were trained."""

    settings: dict[str, Any]
    """The run's `TrainConfig`, as saved with the checkpoint."""
    step: int
    """Optimizer steps behind these weights."""
    tokens_seen: int
    """Training tokens read by then."""
    best_val_loss: float
    """The lowest validation loss the run had measured by then (inf before its first evaluation)."""
    best_step: int
    """The step at which `best_val_loss` was measured."""
    evaluations: list[dict[str, float]]
    """The run's metrics.csv, one row per evaluation (empty if the run directory has none)."""


def read_training(checkpoint: Path) -> Training | None:
    """The record of `checkpoint`'s training, or None for weights saved without one."""
    if not (checkpoint / TRAIN_STATE_FILE).is_file():
        return None
    saved = read_resume_state(checkpoint, fix=f"move {checkpoint / TRAIN_STATE_FILE} aside to "
                                              f"export the "
                              "weights without a record of their training, or export another "
                              "checkpoint")
    counters = saved["state"]
    return Training(saved_settings(saved), counters["step"], counters["tokens_seen"],
                    counters["best_val_loss"], counters["best_step"],
                    read_evaluations(checkpoint.parent / METRICS_FILE))


def read_evaluations(path: Path) -> list[dict[str, float]]:
    """The columns of a run's metrics.csv that the card shows, as numbers; [] if there is none."""
    try:
        return [{key: row[key] for key in EVALUATION_COLUMNS} for row in MetricsLog(path).rows()]
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise UserError(f"{path} is damaged ({type(exc).__name__}: {exc}); restore it, or move it "
                        f"out of "
                        "the run directory to export without the evaluation table") from None


# ---- the model card ---------------------------------------------------------------------------


def model_card(cfg: GPTConfig, parameters: int, training: Training | None) -> str:
    """README.md: YAML metadata for the hub, then what the model is, how it was trained, how to use
    it."""
    settings = training.settings if training else {}
    data, init = str(settings.get("data", "")), str(settings.get("init", ""))
    meta = ["library_name: transformers", "license: mit", "pipeline_tag: text-generation",
            "tags:", "- gpt2", "- text-generation", "- pytorch"]
    if data.startswith(HF_PREFIX):  # hf:NAME[:CONFIG]:SPLIT
        meta += ["datasets:", f"- {data.removeprefix(HF_PREFIX).split(':')[0]}"]
    if init in HUB_MODELS:
        meta.append(f"base_model: {HUB_ORG}/{init}")
    lines = ["---", *meta, "---", "",
             f"# A GPT-2 model, {parameters / 1e6:.1f}M parameters", "",
             "Trained with `gpt`, a from-scratch GPT-2 pretraining framework in plain PyTorch, and "
             "exported as a Hugging Face `GPT2LMHeadModel` with GPT-2's tokenizer.", "",
             "## Model", "",
             "| | |", "|---|---|",
             f"| architecture | GPT-2: {cfg.n_layers} layers, {cfg.emb_dim} wide, {cfg.n_heads} "
             f"heads |",
             f"| context length | {cfg.context_length} tokens |",
             f"| vocabulary | GPT-2's byte-pair encoding, {cfg.vocab_size:,} tokens |",
             f"| parameters | {parameters:,} (the output layer shares the token embedding) |"
             if cfg.tie_embeddings else f"| parameters | {parameters:,} |", "",
             "## Training", ""]
    lines += training_section(training) if training else [
        "unknown: the checkpoint was saved without its training state (train_state.pt), so its "
        "data, settings, steps and validation loss are not recorded."]
    template = settings.get("prompt_template")
    if template:
        lines += ["", *template_section(template)]
    lines += ["", "## Use", "", "```python", "from transformers import pipeline", "",
              'generator = pipeline("text-generation", model="path/to/this/directory")',
              'print(generator("Every effort moves you")[0]["generated_text"])', "```", "",
              sampling_line(sampling_defaults(training)),
              "", "License: MIT, as this framework and GPT-2's weights; the training text may "
                  "carry "
              "terms of its own."]
    return "\n".join(lines) + "\n"


def sampling_line(sampling: dict[str, Any]) -> str:
    """The card's sentence on generation_config.json's sampling."""
    if not sampling["do_sample"]:
        return ("`generation_config.json` decodes greedily, as `generate.py` answers with this "
                f"fine-tuned run by default, {sampling['max_new_tokens']} new tokens at most.")
    return ("`generation_config.json` samples as `generate.py` does by default: temperature "
            f"{sampling['temperature']}, top-k {sampling['top_k']}, {sampling['max_new_tokens']} "
            f"new "
            "tokens; pass `do_sample=False` for greedy text.")


def training_section(training: Training) -> list[str]:
    """The card's account of a run: data, progress, losses, settings, the command that reproduces
    it."""
    settings = training.settings
    validation = (f"`{settings['val_data']}`" if settings["val_data"]
                  else f"the last {settings['val_fraction']:.0%} of the training text, held out")
    init = (f"random weights (preset `{settings['preset']}`)" if settings["init"] == "scratch"
            else f"the weights `{settings['init']}`")
    lines = [f"- training data: {describe_data(settings['data'])}",
             f"- validation data: {validation}",
             f"- started from: {init}",
             f"- these weights: step {training.step} ({training.tokens_seen:,} tokens seen)"]
    if math.isfinite(training.best_val_loss):
        best = f"{training.best_val_loss:.4f} (perplexity {perplexity(training.best_val_loss):.1f})"
        lines.append(f"- validation loss: {best}" if training.best_step == training.step else
                     f"- best validation loss of the run so far: {best}, at step "
                     f"{training.best_step} "
                     "(its best/ checkpoint)")
    else:
        lines.append("- validation loss: not measured yet")
    if training.evaluations:
        lines += ["", "Evaluations (the run's metrics.csv):", "",
                  "| step | epoch | tokens seen | train loss | validation loss | validation "
                  "perplexity |",
                  "|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['step']:.0f} | {r['epoch']:.2f} | {r['tokens_seen']:,.0f} | "
                  f"{r['train_loss']:.4f} | {r['val_loss']:.4f} | {perplexity(r['val_loss']):.1f} "
                  f"|" for r in training.evaluations]
    toml = [f"{name} = {json.dumps(value)}" for name, value in settings.items()
            if value is not None and name not in RUN_LOCATION]
    lines += ["", "Every setting (usable as `gpt-train --config settings.toml`):", "",
              "```toml", *toml, "```", "", "Reproduce (then `gpt-export runs/<run-name> OUT_DIR`):",
              "",
              "```bash", train_command(settings), "```"]
    return lines


def describe_data(source: str) -> str:
    if source in CORPORA:
        return f"`{source}`, {CORPORA[source]}"
    if source.startswith(HF_PREFIX):
        return f"the Hugging Face dataset `{source.removeprefix(HF_PREFIX)}` (name[:config]:split)"
    return f"`{source}` (local {'records' if is_record_file(source) else 'text'})"


def train_command(settings: dict[str, Any]) -> str:
    """`gpt-train` with a flag for every setting that differs from its default."""
    defaults = TrainConfig().to_dict()
    words = ["gpt-train"]
    for name, value in settings.items():
        if name in RUN_LOCATION or value is None or value == defaults.get(name):
            continue
        if isinstance(value, bool):
            words.append(flag(name) if value else "--no-" + flag(name).removeprefix("--"))
        elif isinstance(value, list):  # a repeatable flag, once per value
            words += [word for item in value for word in (flag(name), shlex.quote(str(item)))]
        else:
            words += [flag(name), shlex.quote(str(value))]
    return " ".join(words)


# ---- command line -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog=command_name("python -m gpt export"),
                            description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                        help="a run directory (its best/, else its last/, is exported) or a "
                             "checkpoint")
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR",
                        help="the directory to write: new, empty, or an earlier export (replaced "
                             "whole)")
    args = parser.parse_args(argv)
    checkpoint = export(args.run_dir, args.out_dir)
    print(f"wrote {args.out_dir} from {checkpoint}; "
          f"transformers.pipeline(\"text-generation\", model=\"{args.out_dir}\") loads it")


def cli() -> None:
    """The `gpt-export` console command."""
    run_cli(main)


if __name__ == "__main__":
    cli()
