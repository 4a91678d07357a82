"""`python -m gpt evaluate --task choice|last-word`: the tasks' flags, checks and report.

`gpt.eval.evaluate` owns the command; this module adds `--task` and `--limit` to its parser, checks
a task's flags and reads its whole file once before the model is loaded (a bad record fails in
seconds, not after an hour of scoring, and the count sizes the progress bar: the file is read a
record at a time, never held), then scores it a second time through and prints the table or JSON.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from gpt.base.errors import ArgumentParser, UserError
from gpt.eval.choice import ChoiceTally, evaluate_choices, read_choice_records
from gpt.eval.last_word import LastWordTally, evaluate_passages, read_passages
from gpt.eval.scoring import Z_95, check_limit
from gpt.model.model import GPT
from gpt.model.tokenizer import get_tokenizer

TASKS = ("perplexity", "choice", "last-word")
INTERVAL = f"Wilson score interval, 95% (z = {Z_95:.2f})"


def add_task_flags(parser: ArgumentParser) -> None:
    """--task and --limit (the task's --data is the same flag as perplexity's: a file here)."""
    parser.add_argument("--task", default="perplexity", choices=TASKS,
                        help="perplexity (default): the loss of a text; choice: multiple-choice "
                             "accuracy over a .jsonl of HellaSwag ({ctx, endings, label}) or "
                             "{context, choices, answer} records; last-word: greedy last-word "
                             "accuracy (LAMBADA) over passages (.jsonl {text} or one per line)")
    parser.add_argument("--limit", type=int, metavar="N",
                        help="choice and last-word: score only the first N records (default all)")


@dataclass(frozen=True)
class TaskRun:
    """A task whose flags were checked and whose file was read through once: ready to score."""

    task: str
    data: str
    limit: int | None
    count: int
    """Records (choice) or passages (last-word) to score: the progress bar's total."""


def prepare_task(args: argparse.Namespace) -> TaskRun | None:
    """None for --task perplexity (after refusing the task-only flags); else the task's file read
    through once, every record checked (`UserError` for the first bad one), and counted."""
    if args.task == "perplexity":
        if args.limit is not None:
            raise UserError("--limit applies to --task choice and last-word; perplexity scores the "
                            "whole text (cut the text file instead)")
        return None
    if args.stride is not None:
        raise UserError(f"--stride applies to --task perplexity only; --task {args.task} scores "
                        "each record in one window")
    check_limit(args.limit)
    read = read_choice_records if args.task == "choice" else read_passages
    return TaskRun(args.task, args.data, args.limit, sum(1 for _ in read(args.data, args.limit)))


def run_task(run: TaskRun, model: GPT, args: argparse.Namespace, dtype: torch.dtype) -> None:
    """Score the task with `model` and print the table (or one JSON object with --json)."""
    length = model.config.context_length if args.context_length is None else args.context_length
    if not 1 <= length <= model.config.context_length:
        raise UserError(f"--context-length must be between 1 and the model's context length "
                        f"{model.config.context_length}, got {length}")
    tokenizer = get_tokenizer()
    unit = "record" if run.task == "choice" else "passage"
    options: dict[str, Any] = dict(batch_size=args.batch_size, dtype=dtype, context_length=length)
    with tqdm(total=run.count, unit=unit, disable=True if args.json else None, leave=False) as bar:
        if run.task == "choice":
            records = read_choice_records(run.data, run.limit)
            tally = evaluate_choices(model, records, tokenizer, bar=bar, **options)
            result, lines = choice_report(tally)
        else:
            passages = read_passages(run.data, run.limit)
            words = evaluate_passages(model, passages, tokenizer, bar=bar, **options)
            result, lines = last_word_report(words)
    result.update(context_length=length, dtype=str(dtype).removeprefix("torch."), interval=INTERVAL)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{run.data}: {lines[0]}, context {length} tokens, autocast {result['dtype']}")
    for line in lines[1:]:
        print(line)
    cut = result["truncated"]
    print(f"{'truncated':<10} {cut:,} {unit}{'s' * (cut != 1)} (context cut from the left to fit "
          f"{length} tokens)")


def choice_report(tally: ChoiceTally) -> tuple[dict[str, Any], list[str]]:
    """A choice task's JSON fields, and its table's lines (the first one completes the header)."""
    result = {"task": "choice", "records": tally.n, "endings": sorted(tally.endings),
              "acc": tally.acc.value, "acc_interval": list(tally.acc.interval),
              "correct": tally.correct, "acc_norm": tally.acc_norm.value,
              "acc_norm_interval": list(tally.acc_norm.interval),
              "correct_norm": tally.correct_norm, "truncated": tally.truncated}
    endings = "/".join(map(str, sorted(tally.endings)))
    chance = f" (chance {1 / tally.n_endings:.2f})" if len(tally.endings) == 1 else ""
    return result, [f"{tally.n:,} records of {endings} endings{chance}",
                    f"{'acc':<10} {tally.acc.describe()}",
                    f"{'acc_norm':<10} {tally.acc_norm.describe()}"]


def last_word_report(tally: LastWordTally) -> tuple[dict[str, Any], list[str]]:
    """A last-word task's JSON fields, and its table's lines (the first completes the header)."""
    result = {"task": "last-word", "passages": tally.n, "acc": tally.acc.value,
              "acc_interval": list(tally.acc.interval), "correct": tally.correct,
              "word_perplexity": tally.word_perplexity, "token_loss": tally.token_loss,
              "word_tokens": tally.tokens, "truncated": tally.truncated}
    return result, [f"{tally.n:,} passages",
                    f"{'acc':<10} {tally.acc.describe()}",
                    f"{'perplexity':<10} {tally.word_perplexity:.2f} per last word "
                    f"({tally.tokens:,} tokens, {tally.token_loss:.4f} nats per token)"]
