"""Data-parallel training speed and memory: N ranks under torchrun (DDP, FSDP) against one process.

Each case is a fresh `torchrun --standalone` launch of this script in `--worker` mode, which runs
the project's own `setup` + `train_step` (as `bench_train.py` does for one process) on synthetic
batches of `--batch-size` windows per rank, and reports from rank 0: tokens/s over all ranks, and
every rank's peak memory (CUDA: the allocator's peak; CPU: the process's peak resident memory). The
cases:

    1 process x T threads        the baseline one rank is compared with
    1 process x N*T threads      (CPU only) the same cores given to one process instead of N ranks
    ddp N ranks x T threads      --parallel ddp; scaling efficiency = its tokens/s / (N x the
                                 baseline's)
    fsdp N ranks x T threads     --parallel fsdp: the same global batch, parameters, gradients and
                                 AdamW's
                                 moments sharded (less memory per rank, more communication)

Peak memory on a CPU is the whole process's (the Python interpreter, torch's libraries and the
batches too), so the difference between the rows is what sharding saves; on CUDA it is what torch
allocated on the rank's GPU.

    python benchmarks/bench_ddp.py --nproc 2 --threads 1                      # 2 CPU ranks x 1
                                                                              thread
    python benchmarks/bench_ddp.py --nproc 2 --shape gpt2-medium-1024 --batch-size 4 --device cuda
    python benchmarks/bench_ddp.py --nproc 2 --shape gpt2-medium-256 --batch-size 2 --steps 3   #
                                                                                                CPU,
                                                                                                2
                                                                                                ranks
    python benchmarks/bench_ddp.py --nproc 2 --shape tiny --steps 2 --warmup 1   # a quick check it
                                                                                 runs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_train import SHAPES as TRAIN_SHAPES
from bench_train import batches, time_steps
from machine import cpu_name, peak_rss_bytes

SHAPES: dict[str, dict[str, Any]] = {**TRAIN_SHAPES, "tiny": {"preset": "tiny",
                                                              "context_length": 32},
          "gpt2-medium-1024": {"preset": "gpt2-medium", "context_length": 1024}}
RESULT = "RESULT "  # the line rank 0 prints its measurements on


def worker(args: argparse.Namespace) -> None:
    """One rank of a case (under torchrun): time the steps, then rank 0 prints every rank's numbers.
    """
    import torch.distributed as dist

    from gpt.training.settings import TrainConfig
    from gpt.training.trainer import setup, train_step

    shape = SHAPES[args.shape]
    world = int(os.environ["WORLD_SIZE"])
    cfg = TrainConfig(preset=shape["preset"], context_length=shape["context_length"],
                      dtype=args.dtype,
                      batch_size=args.batch_size, device=args.device, seed=0, sample_tokens=0,
                      out=args.out, run_name="bench", parallel=args.parallel)
    filler = np.zeros(2 * (shape["context_length"] + 1) * args.batch_size * world, dtype=np.uint16)
    run = setup(cfg, token_ids=(filler, filler))  # the loader is not used: the batches below are
    data = batches(run.model.config.vocab_size, args.batch_size, shape["context_length"],
                   args.warmup + args.steps)
    seconds = time_steps(lambda x, y: train_step(run, [(x, y)]), data, args.warmup, run.device)
    peak = (torch.cuda.max_memory_allocated(run.device) if run.device.type == "cuda"
            else peak_rss_bytes())
    peaks: list[int] = [0] * world
    if dist.is_initialized():
        dist.all_gather_object(peaks, peak)
    else:
        peaks = [peak]
    if run.dist.is_main:
        tokens = args.batch_size * world * shape["context_length"]
        print(RESULT + json.dumps({"tokens_per_s": tokens / seconds, "peak_bytes": peaks}),
              flush=True)


def launch(args: argparse.Namespace, nproc: int, threads: int, parallel: str, out: str) -> dict:
    """One case: `nproc` ranks of `threads` threads each, with `--parallel parallel`; the worker's
    result."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}",
               __file__, "--worker", "--parallel", parallel, "--shape", args.shape,
               "--batch-size", str(args.batch_size),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device,
               "--dtype", args.dtype, "--out", out]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in result.stdout.splitlines() if line.startswith(RESULT)]
    if result.returncode != 0 or not lines:
        sys.exit(f"error: {nproc} rank(s) failed (exit "
                 f"{result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix(RESULT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2, help="ranks of the data-parallel case")
    parser.add_argument("--threads", type=int, default=1, help="threads per rank (OMP_NUM_THREADS)")
    parser.add_argument("--shape", choices=SHAPES, default="mini")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per rank per step")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (rank r on cuda:r)")
    parser.add_argument("--dtype", default="float32", help="as train.py's --dtype")
    parser.add_argument("--parallel", default="ddp", help=argparse.SUPPRESS)  # the worker's
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    device = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()
    print(f"{args.shape}, {args.batch_size} windows per rank, {args.dtype}, {args.steps} steps on "
          f"{device}")
    cases = [(f"1 process x {args.threads} threads", 1, args.threads, "ddp")]
    if args.device == "cpu":
        threads = args.nproc * args.threads
        cases.append((f"1 process x {threads} threads", 1, threads, "ddp"))
    cases += [(f"{parallel} {args.nproc} ranks x {args.threads} threads", args.nproc, args.threads,
               parallel)
              for parallel in ("ddp", "fsdp")]
    print(f"{'case':<32} {'tokens/s':>10} {'efficiency':>10}  peak memory per rank (MiB)")
    baseline = None
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, nproc, threads, parallel) in enumerate(cases):
            result = launch(args, nproc, threads, parallel, str(Path(tmp) / str(i)))
            baseline = baseline or result["tokens_per_s"]
            efficiency = result["tokens_per_s"] / (nproc * baseline)
            peaks = ", ".join(f"{peak / 2**20:.0f}" for peak in result["peak_bytes"])
            print(f"{name:<32} {result['tokens_per_s']:>10.0f} {efficiency:>10.2f}  {peaks}")


if __name__ == "__main__":
    main()
