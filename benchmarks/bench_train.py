"""Training speed: this project's loop next to Hugging Face GPT-2, and the machine's matmul ceiling.

One run measures, for the same model shape, weights, batch and data:

- `gpt` rows: the real loop (`gpt.training.trainer.setup` + `train_step`: forward, loss, backward,
clip,
  AdamW) in the default settings of `python train.py`, in float32, and with one speed option
  changed at a time (the measurements behind each default);
- `HF` rows: `transformers.GPT2LMHeadModel` with the same weights, in a plain PyTorch loop (its
  logits, `F.cross_entropy`, backward, clip, `torch.optim.AdamW`), float32 and bf16 autocast;
- the ceiling: GFLOP/s of a large float32 and bf16 matmul.

Each case runs in a fresh subprocess, so its peak memory is its own and process-wide settings (the
allocator, torch.compile's caches) do not leak between cases. MFU = model FLOPs / bf16 ceiling (the
best of its measurements before and after every case: a 2-core VM's speed moves), with
model FLOPs per token = 6 N + 12 L T C (N parameters without the position table, L layers, T
context, C width; nanoGPT's estimate: forward + backward of every matmul, attention included).

On a GPU, MFU is against the card's published dense bf16 peak (`GPU_PEAK_TFLOPS`, matched by
name; `--gpu-peak-tflops` for another card), the usual reference for GPU training.
`--grid` prints a second kind of table: the default settings only, for each model size and context
(`GRID`) at the same tokens per step, to show how the cost grows with the work.

    python benchmarks/bench_train.py                              # the CPU bench config
    python benchmarks/bench_train.py --shape gpt2-small-1024 --batch-size 1 --cases "gpt default,HF
    float32" python benchmarks/bench_train.py --grid                       # mini, gpt2-small,
                                                                           gpt2-medium x 256, 1024
    python benchmarks/bench_train.py --shape gpt2-small-1024 --batch-size 16 --device cuda
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from machine import cpu_name, peak_rss_bytes

SHAPES = {
    # The CPU bench config: the `mini` preset's shape (4 layers, 256 wide, 4 heads, context 256).
    "mini": {"preset": "mini", "context_length": 256},
    "gpt2-small-256": {"preset": "gpt2-small", "context_length": 256},
    "gpt2-small-1024": {"preset": "gpt2-small", "context_length": 1024},
    "gpt2-medium-256": {"preset": "gpt2-medium", "context_length": 256},
    "gpt2-medium-1024": {"preset": "gpt2-medium", "context_length": 1024},
}
# --grid: (model, context) -> the shape measured; mini's position table holds 256 positions only.
GRID = {("mini", 256): "mini", ("gpt2-small", 256): "gpt2-small-256", ("gpt2-small",
                                                                       1024): "gpt2-small-1024",
        ("gpt2-medium", 256): "gpt2-medium-256", ("gpt2-medium", 1024): "gpt2-medium-1024"}
# Published dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, matched in this order against
# torch.cuda.get_device_name(): the more specific names first.
GPU_PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
                   ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0), ("RTX 4090",
                                                                                     165.2)]
# Each case: who runs it and the settings that differ from `python train.py`'s defaults (gpt rows
# are named by that flag).
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt default": ("gpt", {}),
    "gpt --dtype float32": ("gpt", {"dtype": "float32"}),
    "gpt --drop-rate 0.1": ("gpt", {"drop_rate": 0.1}),
    "gpt --vocab-pad-multiple 1": ("gpt", {"vocab_pad_multiple": 1}),
    "gpt --loss-chunk 256": ("gpt", {"loss_chunk": 256}),
    "gpt --compile": ("gpt", {"compile": True}),
    "gpt --no-keep-freed-memory": ("gpt", {"keep_freed_memory": False}),
    "HF float32": ("hf", {"dtype": "float32"}),
    "HF bf16 autocast": ("hf", {"dtype": "bfloat16"}),
    # The allocator setting is not ours to keep: it speeds up any PyTorch CPU loop, the peer's too.
    "HF bf16 autocast + keep freed memory": ("hf", {"dtype": "bfloat16",
                                                    "keep_freed_memory": True}),
}
PEER = "HF float32"
LLM_C_H100_TOKENS_PER_S = 450_000  # llm.c's figure for GPT-2 small training on one H100


def matmul_gflops(dtype: torch.dtype, device: torch.device, n: int, repeats: int,
                  rounds: int = 5) -> float:
    """The best of `rounds` timings of `repeats` n x n matmuls: a 2-core VM's single round moves by
    2x."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(2):
        a @ b
    best = math.inf
    for _ in range(rounds):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * repeats / best / 1e9


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def batches(vocab_size: int, batch_size: int, context_length: int, count: int,
            ) -> list[tuple[torch.Tensor, ...]]:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab_size, (count, batch_size, context_length + 1),
                           generator=generator)
    return [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]


def time_steps(step: Any, data: list[tuple[torch.Tensor, ...]], warmup: int,
               device: torch.device) -> float:
    """Seconds per step over data[warmup:], after `warmup` untimed steps."""
    for x, y in data[:warmup]:
        step(x, y)
    synchronize(device)
    start = time.perf_counter()
    for x, y in data[warmup:]:
        step(x, y)
    synchronize(device)
    return (time.perf_counter() - start) / (len(data) - warmup)


def train_config(args: argparse.Namespace, out: Path, **settings: Any) -> Any:
    """`python train.py`'s settings for this shape and batch, bar `settings` (a `TrainConfig`)."""
    from gpt.training.settings import TrainConfig

    shape = SHAPES[args.shape]
    return TrainConfig(preset=shape["preset"], context_length=shape["context_length"],
                       batch_size=args.batch_size, device=args.device, seed=0, out=str(out),
                       run_name="gpt",
                       sample_tokens=0, **settings)


def run_gpt(settings: dict[str, Any], args: argparse.Namespace, out: Path) -> tuple[float, int]:
    """The project's own loop with `python train.py`'s defaults, bar `settings`."""
    from gpt.training.trainer import setup, train_step

    shape, cfg = SHAPES[args.shape], train_config(args, out, **settings)
    filler = np.zeros(2 * (shape["context_length"] + 1) * args.batch_size, dtype=np.uint16)
    run = setup(cfg, token_ids=(filler, filler))  # the loader is not used: the batches below are
    data = batches(run.model.config.vocab_size, args.batch_size, shape["context_length"],
                   args.warmup + args.steps)
    seconds = time_steps(lambda x, y: train_step(run, [(x, y)]), data, args.warmup, run.device)
    return seconds, run.model.num_parameters() - run.model.pos_emb.weight.numel()


def run_hf(settings: dict[str, Any], args: argparse.Namespace, out: Path) -> tuple[float, int]:
    """transformers' GPT2LMHeadModel with the weights `gpt` starts from, in a plain PyTorch loop."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from gpt.base.device import keep_freed_memory
    from gpt.base.rng import seed_everything
    from gpt.checkpoints.key_map import gpt_to_hf_state_dict
    from gpt.checkpoints.weights import hf_config
    from gpt.training.trainer import build_model

    shape, defaults = SHAPES[args.shape], train_config(args, out)
    if settings.get("keep_freed_memory"):
        keep_freed_memory()
    # then the model `setup` builds for the gpt rows: the same weights
    seed_everything(defaults.seed)
    ours = build_model(defaults)
    hf = GPT2LMHeadModel(GPT2Config(**hf_config(ours.config)))
    # Not strict: a tied head is stored once, as wte, which HF's head shares.
    hf.load_state_dict(gpt_to_hf_state_dict(ours.state_dict(), ours.config), strict=False)
    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    hf.to(device).train()
    optimizer = torch.optim.AdamW(hf.parameters(), lr=defaults.lr, betas=defaults.betas,
                                  weight_decay=defaults.weight_decay)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[settings["dtype"]]

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = hf(input_ids=x).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), defaults.grad_clip)
        optimizer.step()

    data = batches(ours.config.vocab_size, args.batch_size, shape["context_length"], args.warmup
                   + args.steps)
    return (time_steps(step, data, args.warmup, device),
            ours.num_parameters() - ours.pos_emb.weight.numel())


def worker(case: str, args: argparse.Namespace) -> None:
    who, settings = CASES[case]
    with tempfile.TemporaryDirectory() as out:
        run = run_gpt if who == "gpt" else run_hf
        seconds, params = run(settings, args, Path(out))
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = peak_rss_bytes() / 2**20
    print(json.dumps({"seconds": seconds, "params": params, "peak_mib": peak}))


def measure(case: str, args: argparse.Namespace) -> dict[str, float]:
    command = [sys.executable, __file__, "--worker", case, "--shape", args.shape, "--batch-size",
               str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--device",
               args.device]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{case} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="mini")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile "
                                                              "happens here)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of the "
                                                                 "cases")
    parser.add_argument("--grid", action="store_true",
                        help="instead: `gpt default` for every model size and context in GRID")
    parser.add_argument("--grid-tokens", type=int, default=2048,
                        help="tokens per step in --grid (batch = this / context)")
    parser.add_argument("--grid-models", default="mini,gpt2-small,gpt2-medium",
                        help="comma-separated")
    parser.add_argument("--gpu-peak-tflops", type=float, default=None,
                        help="the GPU's dense bf16 peak, for a card not in GPU_PEAK_TFLOPS")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this machine has no CUDA GPU (or this torch build has no "
                     "CUDA)")
    if args.worker:
        worker(args.worker, args)
        return

    device = torch.device(args.device)
    n = 4096 if device.type == "cuda" else 2048
    repeats = 50 if device.type == "cuda" else 10
    float32_ceiling = matmul_gflops(torch.float32, device, n, repeats)
    ceilings = [matmul_gflops(torch.bfloat16, device, n, repeats)]

    def measure_case(case: str, setting: argparse.Namespace) -> dict[str, float]:
        """One case, then the bf16 ceiling again: a 2-core VM's speed moves by 2x within minutes,
        so MFU is of the best ceiling seen in the run, not of one taken at its start."""
        result = measure(case, setting)
        ceilings.append(matmul_gflops(torch.bfloat16, device, n, repeats))
        return result

    if args.grid:
        rows = grid(args, measure_case)
    else:
        results = {case: measure_case(case, args) for case in args.cases.split(",")}
    peak, peak_name = max(ceilings), "the best bf16 ceiling"  # GFLOP/s that MFU is a fraction of
    if device.type == "cuda":
        peak = 1000 * (args.gpu_peak_tflops or gpu_peak_tflops(torch.cuda.get_device_name())
                       or math.nan)
        peak_name = "the GPU's bf16 peak"
    print(f"# {machine(device)}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{datetime.date.today()}")
    print(f"# matmul ceiling measured ({n}^3, best of 5 rounds): float32 {float32_ceiling:.0f} "
          f"GFLOP/s; bfloat16 before and after each case {', '.join(f'{c:.0f}' for c in ceilings)} "
          f"GFLOP/s")
    print(f"# MFU is of {peak_name}, {peak:.0f} GFLOP/s\n")
    if args.grid:
        print_grid(args, rows, peak)
        return
    shape = SHAPES[args.shape]
    print(f"# bench_train: {args.shape}, batch {args.batch_size} x {shape['context_length']} "
          f"tokens, {args.steps} timed steps after {args.warmup}\n")
    print(f"| case | ms/step | tokens/s | vs {PEER} | model TFLOP/s | MFU | peak memory |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    peer = results.get(PEER)
    for case, r in results.items():
        tokens_per_s, achieved = throughput(r, args.shape, args.batch_size)
        ratio = f"{peer['seconds'] / r['seconds']:.2f}x" if peer else "-"
        print(f"| {case} | {r['seconds'] * 1000:.0f} | {tokens_per_s:,.0f} | {ratio} | "
              f"{achieved / 1000:.3f} | {achieved / peak:.1%} | {r['peak_mib']:,.0f} MiB |")
    if device.type == "cuda" and "gpt default" in results:
        tokens_per_s = throughput(results["gpt default"], args.shape, args.batch_size)[0]
        print(f"\ngpt default: {tokens_per_s / LLM_C_H100_TOKENS_PER_S:.0%} of llm.c's "
              f"{LLM_C_H100_TOKENS_PER_S:,} tokens/s on one H100 (gpt2-small, context 1024)")


def throughput(result: dict[str, float], shape: str, batch_size: int) -> tuple[float, float]:
    """(tokens/s, model GFLOP/s) of a measured case: 6 N + 12 L T C FLOPs per token."""
    from gpt.model.config import GPTConfig

    cfg, context = GPTConfig.preset(SHAPES[shape]["preset"]), SHAPES[shape]["context_length"]
    tokens_per_s = batch_size * context / result["seconds"]
    flops_per_token = 6 * result["params"] + 12 * cfg.n_layers * context * cfg.emb_dim
    return tokens_per_s, flops_per_token * tokens_per_s / 1e9


def grid(args: argparse.Namespace, measure_case: Any) -> list[tuple[str, int, str, int, dict[str,
                                                                                             float]]]:
    """`gpt default` for each (model, context) of GRID, `--grid-tokens` tokens per step."""
    rows = []
    for (model, context), shape in GRID.items():
        if model in args.grid_models.split(","):
            batch_size = max(1, args.grid_tokens // context)
            setting = argparse.Namespace(**{**vars(args), "shape": shape, "batch_size": batch_size})
            rows.append((model, context, shape, batch_size, measure_case("gpt default", setting)))
    return rows


def print_grid(args: argparse.Namespace, rows: list[tuple[str, int, str, int, dict[str, float]]],
               peak: float) -> None:
    print(f"# bench_train --grid: gpt default, {args.grid_tokens} tokens per step, "
          f"{args.steps} timed steps after {args.warmup}\n")
    print("| model | parameters | context | batch | ms/step | tokens/s | model TFLOP/s | MFU | "
          "peak memory |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for model, context, shape, batch_size, r in rows:
        tokens_per_s, achieved = throughput(r, shape, batch_size)
        print(f"| {model} | {r['params'] / 1e6:.0f}M | {context} | {batch_size} | "
              f"{r['seconds'] * 1000:.0f} | {tokens_per_s:,.0f} | {achieved / 1000:.3f} | "
              f"{achieved / peak:.1%} | {r['peak_mib']:,.0f} MiB |")


def gpu_peak_tflops(name: str) -> float | None:
    """The published dense bf16 peak of the GPU called `name`, or None if it is not in the table."""
    return next((tflops for key, tflops in GPU_PEAK_TFLOPS if key in name), None)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name()
    capability = torch.backends.cpu.get_cpu_capability()
    return f"{cpu_name()}, {os.cpu_count()} cores, torch CPU capability {capability}"


if __name__ == "__main__":
    main()
