"""GRPO's speed: sampling tokens/s of its rollouts, and how a training step splits between sampling
and learning.

Random weights of a `--preset` (no download): a random model never says end-of-text, so every
completion is `--rollout-tokens` long and the numbers do not depend on what it learnt. Two measures:

1. sampling: `gpt.objectives.rollouts.decode_rows` of `--prompts` prompts x `--group-size`
   completions as one batch (KV cache, temperature 1), new tokens per second, the best of
   `--repeats`;
2. a step: `--steps` optimizer steps of `python train.py --objective grpo`
(`gpt.training.trainer.train`
   on generated prompt records, reward regex:e), with the seconds the objective logs in metrics.csv:
   sample_seconds (decoding, rewards) and learn_seconds (the forward, backward and AdamW step).

    python benchmarks/bench_grpo.py          # tiny and mini, as recorded in docs/benchmarks.md
    python benchmarks/bench_grpo.py --presets mini --dtypes bfloat16 --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import io
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from machine import cpu_name

from gpt.base.device import autocast
from gpt.checkpoints.checkpoint import save_model
from gpt.model.config import GPTConfig
from gpt.model.model import GPT
from gpt.model.tokenizer import get_tokenizer
from gpt.objectives.rollouts import decode_rows
from gpt.training.settings import TrainConfig
from gpt.training.trainer import train

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def sampling_tokens_per_s(model: GPT, prompts: int, group: int, new_tokens: int, dtype: torch.dtype,
                          repeats: int) -> float:
    """New tokens/s of `decode_rows` on `prompts` x `group` rows of a 16-token prompt, the best of
    `repeats`."""
    rows = prompts * group
    ids = torch.tensor(get_tokenizer().encode("Question: what is the sum of 17 and 25? "
                                              "Answer: ")[:16])
    batch, lengths = ids.repeat(rows, 1), torch.full((rows,), len(ids))
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up
        uniforms = torch.rand(rows, new_tokens)
        started = time.perf_counter()
        with autocast(torch.device("cpu"), dtype):
            _, new = decode_rows(model, batch, lengths, new_tokens, temperature=1.0,
                                 uniforms=uniforms)
        best = min(best, time.perf_counter() - started)
        assert int(new.sum()) == rows * new_tokens  # a random model never stops early
    return rows * new_tokens / best


def step_split(preset: str, prompts: int, group: int, new_tokens: int, dtype: str, steps: int,
               directory: Path) -> tuple[float, float]:
    """(sampling, learning) seconds per step of a GRPO run from `preset`'s random weights."""
    data = directory / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}?"}) + "\n"
                            for i in range(200)))
    init = directory / f"init-{preset}"
    if not init.exists():
        init.mkdir()
        save_model(GPT(GPTConfig.preset(preset, drop_rate=0.0)), init)
    cfg = TrainConfig(data=str(data), init=str(init), objective="grpo", reward=("regex:e",),
                      group_size=group, rollout_tokens=new_tokens, batch_size=prompts,
                      max_steps=steps,
                      eval_freq=steps, eval_iters=1, sample_tokens=0, dtype=dtype, device="cpu",
                      out=str(directory / "runs"), run_name=f"{preset}-{dtype}-{time.time_ns()}")
    with contextlib.redirect_stdout(io.StringIO()):  # the run's own lines: not part of the table
        result = train(cfg)
    with open(result.run_dir / "metrics.csv", newline="") as f:
        last = list(csv.DictReader(f))[-1]
    return float(last["sample_seconds"]) / steps, float(last["learn_seconds"]) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,mini")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--rollout-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]  # on a shared machine the times move with the others' work
    print(f"{datetime.datetime.now():%Y-%m-%d %H:%M}, {cpu_name()}, torch {torch.__version__}, "
          f"{args.threads} threads, load average {load:.1f} at the start; {args.prompts} prompts x "
          f"{args.group_size} completions x {args.rollout_tokens} new tokens per step")
    print("| preset | dtype | sampling tok/s | step s | sampling s | learning s | sampling share |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets.split(","):
            torch.manual_seed(0)
            model = GPT(GPTConfig.preset(preset, drop_rate=0.0)).eval()
            for dtype in args.dtypes.split(","):
                speed = sampling_tokens_per_s(model, args.prompts, args.group_size,
                                              args.rollout_tokens,
                                              DTYPES[dtype], args.repeats)
                sample_s, learn_s = step_split(preset, args.prompts, args.group_size,
                                               args.rollout_tokens,
                                               dtype, args.steps, Path(tmp))
                total = sample_s + learn_s
                print(f"| {preset} | {dtype} | {speed:,.0f} | {total:.2f} | {sample_s:.2f} | "
                      f"{learn_s:.2f} "
                      f"| {sample_s / total:.0%} |", flush=True)


if __name__ == "__main__":
    main()
