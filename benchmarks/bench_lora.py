"""Fine-tuning memory and speed: full against LoRA, with and without activation checkpointing.

    python benchmarks/bench_lora.py [--sizes gpt2-medium gpt2-large] [--steps 3] [--work DIR]

For each size, a random base of that shape (GPT-2's weights cannot be downloaded here; the memory
and time of a step do not depend on the values) is saved once, then fine-tuned on question/answer
records of ~510 tokens (context 512, batch 1; answers are passages of Python's own help topics, so
the run works offline) through the real loop (`gpt.training.trainer.train`, its defaults otherwise:
bf16 autocast where the CPU has it), for `--steps` optimizer steps, in four configurations:

    full        every weight trained: AdamW's two moments and a gradient for each
    lora        --lora-rank 8 (the default targets: every linear layer of the blocks)
    lora+ac     --lora-rank 8 --activation-checkpointing
    full+ac     --activation-checkpointing

Each configuration runs in a fresh process; the parent imports no torch, so a child's peak resident
memory (`ru_maxrss`, which counts the touched pages of the memory-mapped base too) is its own. It
includes the evaluations at step 0 and at the end and the final checkpoint write (`--no-async-save`,
so no second copy of the state is taken). s/step is the median wall time of the timed steps after
the first, CPU s/step the median CPU time of the process in them (all its threads): on a shared
machine other processes' work lengthens a step's wall time, much less its CPU time. "load" is the
machine's 1-minute load average when the configuration ended.
The checkpoint size is that of the run's last/ directory. A child watches its own resident memory
and stops when it would leave less than `--headroom` GiB of the machine's available memory to
others: such a configuration is reported as not fitting, with the memory it had reached.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from machine import cpu_name, peak_rss_bytes

CONFIGS = {"full": [], "lora": ["--lora-rank", "8"],
           "lora+ac": ["--lora-rank", "8", "--activation-checkpointing"],
           "full+ac": ["--activation-checkpointing"]}
LAPTOP_GIB = 14.0
"""What a 16 GB laptop leaves a training process, its system and desktop taking ~2 GB."""
GIB = 2**30
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
"""The children's environment: this checkout's `gpt`."""


def meminfo(field: str) -> int:
    """A /proc/meminfo field in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def make_base(size: str, directory: Path) -> None:
    """A random model of `size`'s shape saved as a checkpoint (every configuration's --init)."""
    from gpt.checkpoints.checkpoint import save_model
    from gpt.model.config import GPTConfig
    from gpt.model.model import GPT

    directory.mkdir(parents=True)
    save_model(GPT(GPTConfig.preset(size)), directory)


def make_records(path: Path, count: int = 40, tokens: int = 490) -> None:
    """`count` question/answer records, their answers `tokens`-token passages of Python's help."""
    from pydoc_data.topics import topics

    from gpt.model.tokenizer import get_tokenizer

    ids = get_tokenizer().encode(" ".join(topics[name] for name in sorted(topics)))
    tokenizer = get_tokenizer()
    rows = [{"question": f"What does passage {i} of Python's help say?",
             "answer": tokenizer.decode(ids[i * tokens:(i + 1) * tokens]).strip()}
            for i in range(count)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def watch_memory(budget: int) -> None:
    """Stop this process (exit 3, after printing its result) once its resident memory passes
    `budget` bytes: on a shared machine a configuration that does not fit must not push others
    out."""
    page = os.sysconf("SC_PAGE_SIZE")
    while True:
        resident = int(Path("/proc/self/statm").read_text().split()[1]) * page
        if resident > budget:
            print(json.dumps({"fit": False, "peak_gib": resident / GIB}), flush=True)
            os._exit(3)
        time.sleep(0.02)


def child(config: str, base: Path, records: Path, out: Path, steps: int, budget: int) -> None:
    """Fine-tune `base` on `records` in `config` for `steps` steps; print a JSON line of results."""
    threading.Thread(target=watch_memory, args=(budget,), daemon=True).start()
    import torch

    from gpt.base.errors import run_cli
    from gpt.cli.train import main
    from gpt.training import trainer

    times: list[tuple[float, float]] = []  # (wall, CPU) seconds of each step
    original = trainer.train_step

    def timed(run, batches):  # type: ignore[no-untyped-def]
        wall, cpu = time.perf_counter(), time.process_time()
        stats = original(run, batches)
        times.append((time.perf_counter() - wall, time.process_time() - cpu))
        return stats

    trainer.train_step = timed
    argv = ["--init", str(base), "--data", str(records), "--context-length", "512", "--batch-size",
            "1", "--max-steps", str(steps), "--eval-freq", "1000", "--eval-iters", "1",
            "--eval-answers", "0", "--sample-tokens", "0", "--patience", "0", "--no-async-save",
            "--out", str(out), "--run-name", config, *CONFIGS[config]]
    run_cli(lambda: main(argv))
    last = out / config / "last"
    timed_steps = times[1:] or times
    size = sum(p.stat().st_size for p in last.rglob("*") if p.is_file())
    print(json.dumps({"fit": True, "peak_gib": peak_rss_bytes() / GIB,
                      "s_per_step": statistics.median(wall for wall, _ in timed_steps),
                      "cpu_s_per_step": statistics.median(cpu for _, cpu in timed_steps),
                      "steps": len(times), "checkpoint_mib": size / 2**20,
                      "torch": torch.__version__}), flush=True)


def run_child(args: list[str], timeout: float) -> dict:
    """A child's JSON line (`child`), or why there is none."""
    try:
        done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                              timeout=timeout, env=ENV)
    except subprocess.TimeoutExpired:
        return {"fit": False, "error": f"over {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if lines:
        return json.loads(lines[-1])
    return {"fit": False, "error": (done.stderr.strip().splitlines() or ["no output"])[-1]}


def table_row(size: str, config: str, result: dict, budget: int) -> str:
    """One configuration's row of the printed table."""
    load = f"{os.getloadavg()[0]:.1f}"
    if not result["fit"]:
        reached = f"> {result['peak_gib']:.1f} GiB" if "peak_gib" in result else result["error"]
        return (f"| {size} | {config} | {reached} (stopped: {budget / GIB:.1f} GiB were free) "
                f"| - | - | - | no | {load} |")
    laptop = "yes" if result["peak_gib"] <= LAPTOP_GIB else "no"
    return (f"| {size} | {config} | {result['peak_gib']:.1f} GiB | {result['s_per_step']:.1f} | "
            f"{result['cpu_s_per_step']:.1f} | {result['checkpoint_mib']:,.1f} MiB | {laptop} "
            f"| {load} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["gpt2-medium", "gpt2-large"])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--headroom", type=float, default=2.0,
                        help="GiB of the available memory a child leaves to the machine")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per configuration")
    parser.add_argument("--work", type=Path, default=None, help="where the bases and runs go "
                        "(default: a temporary directory, removed at the end)")
    parser.add_argument("--child", nargs=6,
                        metavar=("CONFIG", "BASE", "RECORDS", "OUT", "STEPS", "BUDGET"))
    parser.add_argument("--make", nargs=2, metavar=("SIZE", "DIR"))
    args = parser.parse_args()
    if args.child:
        config, base, records, out, steps, budget = args.child
        child(config, Path(base), Path(records), Path(out), int(steps), int(budget))
        return
    if args.make:
        make_base(args.make[0], Path(args.make[1]))
        make_records(Path(args.make[1]).parent / "records.jsonl")
        return
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        print(f"# bench_lora: context 512, batch 1, {args.steps} steps; "
              f"{time.strftime('%Y-%m-%d %H:%M')}")
        print(f"# {cpu_name()}, {os.cpu_count()} cores, {meminfo('MemTotal') / GIB:.1f} GiB RAM; "
              f"a 16 GB laptop: peak <= {LAPTOP_GIB:g} GiB")
        print("\n| model | config | peak RSS | s/step | CPU s/step | checkpoint (last/) "
              "| fits a 16 GB laptop | load |")
        print("|---|---|---:|---:|---:|---:|---|---:|")
        for size in args.sizes:
            base = Path(work) / size / "base"
            made = subprocess.run([sys.executable, __file__, "--make", size, str(base)],
                                  timeout=args.timeout, env=ENV)
            if made.returncode:
                sys.exit(f"could not write the {size} base")
            for config in args.configs:
                budget = int(meminfo("MemAvailable") - args.headroom * GIB)
                records, runs = base.parent / "records.jsonl", base.parent / "runs"
                result = run_child(["--child", config, str(base), str(records), str(runs),
                                    str(args.steps), str(budget)], args.timeout)
                print(table_row(size, config, result, budget), flush=True)
                shutil.rmtree(base.parent / "runs" / config, ignore_errors=True)
            shutil.rmtree(base.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
