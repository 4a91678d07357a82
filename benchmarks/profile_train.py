"""Where a training step's time goes: the real step under torch.profiler, its ops summed by kind.

Runs `gpt.training.trainer.setup` + `train_step` (forward, loss, backward, clip, fused AdamW) in the
defaults of `python train.py` for each shape, a few untimed steps first, then profiles `--steps`
steps and prints the share of each kind of work: matmul, attention, the LM head's
softmax/cross-entropy, casts, LayerNorm/GELU, dropout, optimizer (with the gradient-norm clip),
embedding, the rest.

    python benchmarks/profile_train.py                  # mini (8 x 256) and gpt2-small (1 x 1024)
    python benchmarks/profile_train.py --shapes gpt2-small --steps 2 --top 30
    python benchmarks/profile_train.py --drop-rate 0    # the same shapes without dropout

Then the bound the matmuls set: every matrix product of one step (`mm`, `addmm`, `bmm`, with their
shapes, strides and dtypes, recorded as the step runs) is replayed alone, on fresh operands, best of
`--bound-repeats`. If nothing but those products took any time, the step would take that long, so
model FLOPs over that time is the highest MFU this machine's matmul kernels allow at these shapes.
It leaves out SDPA's fused kernels (attention without dropout), so it is a bound from above.

How an op is counted: each profiled op's own time (its children's excluded) goes to the first kind
in `KINDS` that matches its name or the name of any op or autograd node it runs inside. So a cast
inside a matmul is a cast, and everything inside SDPA (its matmuls and, in its math kernel, its
dropout) is attention. Attention written out (`reference_attention`, which the model trains through
with attention dropout off CUDA) and its backward are plain ops, matched by name: batched matmuls
and softmax are attention (nothing else in the model uses them), the causal mask's in-place add is
other (`aten::add_`, also the gradients' accumulation), and dropout is dropout: off CUDA every
dropout (attention's, and `gpt.model.model.Dropout` on the embeddings and the residual stream) draws
its mask with `dropout_keep_mask` (random_, lt), applies it as a product (`mul`, with the cast of
the mask inside it; a few small products elsewhere, such as q's scale, count here too) and scales by
1/(1-p) with a `div` (also the division of the loss by the micro-batch count, a scalar), forward and
backward; on CUDA, `F.dropout`'s `native_dropout` and its backward. The LM head's loss (`HeadLoss`)
is matmuls and, named `cross_entropy_blocks`, its blockwise softmax.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from collections import defaultdict
from typing import Any

import numpy as np
import torch
from bench_train import batches, machine, matmul_gflops, synchronize
from torch.autograd.profiler_util import FunctionEvent
from torch.utils._python_dispatch import TorchDispatchMode

# (kind, name fragments): the first kind with a fragment in the op's or an enclosing op's name wins
# (so LogSoftmaxBackward is the LM head's before SoftmaxBackward can make it attention).
KINDS: list[tuple[str, tuple[str, ...]]] = [
    ("optimizer", ("Optimizer.", "_fused_adam", "_foreach_norm", "_foreach_mul", "clip_grad")),
    ("LM-head softmax/CE", ("cross_entropy", "log_softmax", "nll_loss", "LogSoftmaxBackward",
                            "NllLossBackward", "logsumexp")),
    ("attention", ("scaled_dot_product", "ScaledDotProduct", "flash_attention", "aten::bmm",
                   "BmmBackward", "aten::_softmax", "SoftmaxBackward")),
    ("dropout", ("dropout", "aten::random_", "aten::lt", "aten::mul", "MulBackward", "aten::div",
                 "DivBackward")),
    ("LayerNorm/GELU", ("layer_norm", "LayerNormBackward", "gelu", "GeluBackward")),
    ("casts", ("aten::to", "aten::_to_copy", "ToCopyBackward")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::matmul", "aten::linear", "MmBackward",
                "AddmmBackward", "mkldnn")),
    ("embedding", ("embedding", "EmbeddingBackward")),
]
OTHER = "other"
SHAPES = {
    # python train.py's default: mini, batch 8 x 256, no dropout.
    "mini": {"preset": "mini", "context_length": 256, "batch_size": 8},
    # The real GPT-2 shape as the issue measures it: gpt2-small, batch 1 x 1024, the preset's
    # dropout 0.1.
    "gpt2-small": {"preset": "gpt2-small", "context_length": 1024, "batch_size": 1},
}


def kind_of(event: FunctionEvent) -> str:
    """The kind of work an op is, from its own name and those of the ops it runs inside."""
    names = []
    node: FunctionEvent | None = event
    while node is not None:
        names.append(node.name)
        node = node.cpu_parent
    for kind, fragments in KINDS:
        if any(fragment in name for name in names for fragment in fragments):
            return kind
    return OTHER


MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}
OUT_VARIANTS = {torch.ops.aten.mm.out: torch.ops.aten.mm.default}  # replayed without their `out=`


class RecordMatmuls(TorchDispatchMode):
    """Records every matrix product that runs under it: (op, [(shape, stride, dtype) of each tensor
    argument, or the argument itself]), to replay them alone (`replay_seconds`)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, list[Any]]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        if func in MATMULS or func in OUT_VARIANTS:
            specs = [(a.shape, a.stride(), a.dtype) if isinstance(a, torch.Tensor) else a
                     for a in args]
            self.calls.append((OUT_VARIANTS.get(func, func), specs))
        return func(*args, **(kwargs or {}))


def product_flops(specs: list[Any]) -> int:
    """2 m k n (times the batch for bmm) of one recorded product; addmm's first operand is the bias.
    """
    left, right = specs[-2][0], specs[-1][0]
    return 2 * left.numel() * right[-1]


def replay_seconds(calls: list[tuple[Any, list[Any]]], device: torch.device, repeats: int) -> float:
    """The best of `repeats` timings of all `calls`, one after another, on fresh operands laid out
    as recorded (same strides: a transposed operand stays transposed)."""
    operands = [[torch.empty_strided(spec[0], spec[1], dtype=spec[2], device=device).normal_()
                 if isinstance(spec, tuple) else spec
                 for spec in specs] for _, specs in calls]
    best = float("inf")
    for _ in range(repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        for (func, _), args in zip(calls, operands, strict=True):
            func(*args)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def build(shape: str, device: str, drop_rate: float | None, out: str, count: int) -> tuple[Any,
                                                                                           list[Any]]:
    """`setup` in `python train.py`'s defaults for `shape`, and `count` random batches for it."""
    from gpt.training.settings import TrainConfig
    from gpt.training.trainer import setup

    settings = SHAPES[shape]
    extra = {} if drop_rate is None else {"drop_rate": drop_rate}
    cfg = TrainConfig(preset=settings["preset"], context_length=settings["context_length"],
                      batch_size=settings["batch_size"], device=device, seed=0, out=out,
                      run_name="profile", sample_tokens=0, **extra)
    filler = np.zeros(2 * (settings["context_length"] + 1) * settings["batch_size"],
                      dtype=np.uint16)
    run = setup(cfg, token_ids=(filler, filler))  # the loader is not used: the batches below are
    data = batches(run.model.config.vocab_size, settings["batch_size"], settings["context_length"],
                   count)
    return run, data


def matmul_bound(shape: str, device: str, drop_rate: float | None, repeats: int) -> dict[str,
                                                                                         float]:
    """A step's matrix products replayed alone: their seconds, their own FLOPs, and model
    FLOPs/step."""
    from gpt.training.trainer import train_step

    with tempfile.TemporaryDirectory() as out:
        run, data = build(shape, device, drop_rate, out, count=8)
        train_step(run, [data[0]])  # the first step may differ (optimizer state, caches)
        recorder = RecordMatmuls()
        with recorder:
            train_step(run, [data[1]])
        seconds = replay_seconds(recorder.calls, run.device, repeats)
        step = float("inf")
        for x, y in data[2:]:  # the real step, unprofiled, best of six
            start = time.perf_counter()
            train_step(run, [(x, y)])
            synchronize(run.device)
            step = min(step, time.perf_counter() - start)
        cfg, tokens = run.model.config, data[1][0].numel()
        params = run.model.num_parameters() - run.model.pos_emb.weight.numel()
    return {"seconds": seconds, "step": step, "products": len(recorder.calls),
            "flops": sum(product_flops(specs) for _, specs in recorder.calls),
            "model_flops": (6 * params
                            + 12 * cfg.n_layers * cfg.context_length * cfg.emb_dim) * tokens}


def profile_steps(shape: str, steps: int, warmup: int, device: str, drop_rate: float | None,
                  ) -> tuple[dict[str, float], dict[str, float], float]:
    """(microseconds by kind, microseconds by op name, wall seconds per step) for `steps` steps."""
    from gpt.training.trainer import train_step

    with tempfile.TemporaryDirectory() as out:
        run, data = build(shape, device, drop_rate, out, count=warmup + steps)
        for x, y in data[:warmup]:
            train_step(run, [(x, y)])
        activities = [torch.profiler.ProfilerActivity.CPU]
        if run.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for x, y in data[warmup:]:
                train_step(run, [(x, y)])
            synchronize(run.device)
    by_kind: dict[str, float] = defaultdict(float)
    by_op: dict[str, float] = defaultdict(float)
    on_gpu = run.device.type == "cuda"
    for event in prof.events():
        own = event.self_device_time_total if on_gpu else event.self_cpu_time_total
        by_kind[kind_of(event)] += own
        by_op[event.name] += own
    wall = (max(e.time_range.end for e in prof.events()) - min(e.time_range.start
                                                               for e in prof.events()))
    return by_kind, by_op, wall / 1e6 / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES),
                        help="comma-separated, of: " + ", ".join(SHAPES))
    parser.add_argument("--steps", type=int, default=3, help="profiled steps per shape")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--drop-rate", type=float, default=None,
                        help="override the presets' dropout (mini 0, gpt2-small 0.1)")
    parser.add_argument("--top", type=int, default=15, help="also list the ops with the most own "
                                                            "time")
    parser.add_argument("--bound-repeats", type=int, default=5, help="replays of the matmuls, best "
                                                                     "kept")
    parser.add_argument("--bound-only", action="store_true", help="only the matmul bound, no "
                                                                  "profile")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this machine has no CUDA GPU (or this torch build has no "
                     "CUDA)")
    print(f"# profile_train: {datetime.date.today()}; {machine(torch.device(args.device))}; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; {args.steps} profiled steps "
          f"after {args.warmup}" + ("" if args.drop_rate is None else f"; --drop-rate "
                                                                      f"{args.drop_rate}"))
    if args.device == "cpu":
        # A 2-core VM's speed moves by 2x within minutes: the ceiling is the best of several
        # measurements, taken around the replays.
        ceilings = [matmul_gflops(torch.bfloat16, torch.device("cpu"), 2048, repeats=10)]
        bounds = {}
        for shape in args.shapes.split(","):
            bounds[shape] = matmul_bound(shape, args.device, args.drop_rate, args.bound_repeats)
            ceilings.append(matmul_gflops(torch.bfloat16, torch.device("cpu"), 2048, repeats=10))
        print(f"# bf16 matmul ceiling (2048^3, best of 5 rounds) measured {len(ceilings)} times: "
              f"{', '.join(f'{c:.0f}' for c in ceilings)} GFLOP/s; the best is used")
        for shape, bound in bounds.items():
            print_bound(shape, bound, max(ceilings))
    if args.bound_only:
        return
    for shape in args.shapes.split(","):
        by_kind, by_op, wall = profile_steps(shape, args.steps, args.warmup, args.device,
                                             args.drop_rate)
        total = sum(by_kind.values())
        settings = SHAPES[shape]
        print(f"\n## {shape}: batch {settings['batch_size']} x {settings['context_length']}, "
              f"{wall * 1000:.0f} ms/step under the profiler\n")
        print("| kind | ms/step | share |")
        print("|---|---:|---:|")
        for kind in [k for k, _ in KINDS] + [OTHER]:
            print(f"| {kind} | {by_kind[kind] / 1000 / args.steps:.1f} | "
                  f"{by_kind[kind] / total:.1%} |")
        print(f"\nops with the most own time ({shape}):\n")
        print("| op | ms/step | share |")
        print("|---|---:|---:|")
        for name, micros in sorted(by_op.items(), key=lambda item: -item[1])[:args.top]:
            print(f"| {name} | {micros / 1000 / args.steps:.1f} | {micros / total:.1%} |")
        sys.stdout.flush()


def print_bound(shape: str, bound: dict[str, float], ceiling: float) -> None:
    """The matmul bound of one shape against the real step and the ceiling."""
    model_gflop = bound["model_flops"] / 1e9
    print(f"\n## {shape}: the step's {bound['products']} matrix products alone\n")
    print(f"- {bound['flops'] / 1e9:.0f} GFLOP/step in the products, {model_gflop:.0f} by the "
          f"model formula "
          f"(6 N + 12 L T C)")
    achieved = bound["flops"] / bound["seconds"] / 1e9
    print(f"- replayed alone: {bound['seconds'] * 1000:.0f} ms/step, {achieved:.0f} GFLOP/s, "
          f"{achieved / ceiling:.0%} of the ceiling")
    print(f"- the real step: {bound['step'] * 1000:.0f} ms/step (best of 6); the products are "
          f"{bound['seconds'] / bound['step']:.0%} of it")
    print(f"- MFU: the step {model_gflop / bound['step'] / ceiling:.1%}; the most these products "
          f"allow {model_gflop / bound['seconds'] / ceiling:.1%}")


if __name__ == "__main__":
    main()
