"""GPU smoke test: train, evaluate, resume, generate and export on a GPU, in each dtype it may train
in.

For each device (cuda and mps where present, or the one `--device` names) and each dtype (CUDA: bf16
and float16, the two `--dtype auto` chooses between, both forced whatever this GPU has, and float32;
MPS: float32 and, from macOS 14, bf16; CPU: float32 and bf16) it trains a small model a few steps
and checks the invariants the CPU tests check:

    train      the losses are finite and fall
    resume     a run stopped by Ctrl-C halfway and resumed logs the same step losses as a straight
               run
    fp16 resume  (bfloat16 rows) a bf16 run stopped halfway resumes with --dtype float16, its loss
               scaler starting afresh (a bf16 run saves none): finite losses for the remaining steps
    evaluate   the loss of the saved weights on this device, in this dtype, with --loss-chunk, is
               the
               CPU float32 loss
    chunked    the chunked LM head's gradient (--loss-chunk) under a float16-style loss scale of
               2**16:
               no more all-zero head rows than unchunked, and as close to the float32 gradient
    generate   greedy decoding with the KV cache gives the tokens decoding without it gives
    export     the Hugging Face export computes our float32 logits (skipped without transformers)

What is exact where. On the CPU in float32 a resumed run repeats the straight run's losses bit for
bit, and that is required here. On a GPU only within a tolerance: the attention backward kernels
accumulate with atomics, so two identical runs differ in the last bits, and mixed precision rounds
those differences up. Greedy tokens may part at a near-tie of the two best logits (reported, not a
failure). The export is compared in full float32 precision (TF32 off for the check).

    python benchmarks/gpu_smoke.py                   # every GPU kind present, a few minutes
    python benchmarks/gpu_smoke.py --device cpu --preset tiny --context-length 16 --steps 4

Prints a PASS/FAIL/SKIP table; exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt.base.device import autocast, pick_device
from gpt.base.errors import describe
from gpt.checkpoints.checkpoint import load_checkpoint
from gpt.checkpoints.weights import save_hf
from gpt.data.windows import create_dataloader
from gpt.eval.perplexity import evaluate_loss
from gpt.model.loss import head_loss
from gpt.model.model import GPT
from gpt.model.sampling import generate

# ---- the project's API: every call into `gpt` is in this section, to retarget after a refactor ---
from gpt.training import trainer
from gpt.training.settings import TrainConfig


def train_run(out: Path, name: str, device: str, dtype: str, args: argparse.Namespace,
              tokens: tuple[np.ndarray, np.ndarray], *, stop_after: int = 0, resume: bool = False,
              ) -> dict[int, float]:
    """Train (or resume) run `out/name` as `train.py` would; its step losses. `stop_after` presses
    Ctrl-C (a real SIGINT, handled by the trainer) after that step."""
    cfg = TrainConfig(
        preset=args.preset, context_length=args.context_length, batch_size=args.batch_size,
        drop_rate=0.1, max_steps=args.steps, epochs=1000, eval_freq=max(1, args.steps // 2),
        eval_iters=2,
        warmup_steps=1, sample_tokens=0, loss_chunk=args.loss_chunk, dtype=dtype, device=device,
        out=str(out), run_name=name, seed=123)
    original = trainer.train_step

    def step_then_interrupt(run: Any, batches: Any) -> Any:
        stats = original(run, batches)
        if run.state.step == stop_after:
            signal.raise_signal(signal.SIGINT)
        return stats

    if stop_after:
        trainer.train_step = step_then_interrupt
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the trainer's own log: not this table
            result = trainer.train(cfg, resume=out / name if resume else None, token_ids=tokens)
    finally:
        trainer.train_step = original
    return result.step_losses


def saved_model(out: Path, name: str, device: torch.device) -> GPT:
    """The float32 weights the run saved last."""
    return load_checkpoint(out / name / "last", device).eval()


def eval_loss(model: GPT, ids: np.ndarray, args: argparse.Namespace, dtype: torch.dtype) -> float:
    loader = create_dataloader(ids, args.batch_size, args.context_length, args.context_length,
                               shuffle=False, drop_last=False)
    return evaluate_loss(model, loader, max_batches=4, dtype=dtype, chunk_size=args.loss_chunk)


def chunked_head_grad(model: GPT, x: torch.Tensor, y: torch.Tensor, chunk: int, dtype: torch.dtype,
                      scale: float) -> torch.Tensor:
    """The LM head's gradient through `head_loss` (chunk 0: unchunked) under autocast, with the loss
    multiplied by `scale` as a GradScaler does, and divided again after."""
    with torch.no_grad():
        hidden = model.hidden_states(x)
    hidden, weight = (hidden.detach().requires_grad_(),
                      model.lm_head.weight.detach().clone().requires_grad_())
    with autocast(x.device, dtype):
        loss = head_loss(hidden, weight, y, chunk, model.config.vocab_size)
    (loss * scale).backward()
    assert weight.grad is not None
    return weight.grad[:model.config.vocab_size].float() / scale


def greedy(model: GPT, prompt: torch.Tensor, new_tokens: int, use_cache: bool) -> torch.Tensor:
    return generate(model, prompt, new_tokens, temperature=0.0, use_cache=use_cache)


def export_hf(model: GPT, directory: Path) -> None:
    save_hf(model, directory)


# ---- the checks ----------------------------------------------------------------------------------

TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 3e-2, torch.float16: 1e-2}
"""Relative differences allowed where a GPU or a lower precision makes results inexact (float32:
room for TF32 and for non-deterministic kernels)."""
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LOSS_SCALE = 2.0**16  # GradScaler's initial scale


def pattern_tokens(n: int, offset: int = 0) -> np.ndarray:
    """A deterministic, learnable token stream: a cycle through 61 ids spread over the vocabulary.
    """
    return ((np.arange(offset, offset + n) * 17) % 61 * 811).astype(np.uint16)


def default_dtypes(device: torch.device) -> list[str]:
    if device.type == "cuda":
        return ["bfloat16", "float16", "float32"]
    if device.type == "mps":
        return ["float32", "bfloat16"] if torch.backends.mps.is_macos_or_newer(14,
                                                                               0) else ["float32"]
    return ["float32", "bfloat16"]


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def check_dtype(device: torch.device, dtype_name: str, args: argparse.Namespace, out: Path,
                report: Callable[[str, str, str], None]) -> None:
    """Every check for one (device, dtype); each reports its row through `report`."""
    dtype, tol = DTYPE_NAMES[dtype_name], TOLERANCE[DTYPE_NAMES[dtype_name]]
    windows = (args.steps + 1) * args.batch_size
    tokens = (pattern_tokens(windows * args.context_length + 1),
              pattern_tokens(4 * args.batch_size * args.context_length + 1, offset=5000))
    name = f"{device.type}-{dtype_name}"

    straight = train_run(out, f"{name}-straight", str(device), dtype_name, args, tokens)
    losses = [straight[step] for step in sorted(straight)]
    ok = len(losses) == args.steps and all(map(math.isfinite, losses)) and losses[-1] < losses[0]
    report("train", "PASS" if ok else "FAIL",
           f"{len(losses)} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}")

    half = args.steps // 2
    train_run(out, f"{name}-resumed", str(device), dtype_name, args, tokens, stop_after=half)
    # whatever ran in between, the resumed run must restore its own generators
    torch.manual_seed(999)
    resumed = train_run(out, f"{name}-resumed", str(device), dtype_name, args, tokens, resume=True)
    expected = {step: loss for step, loss in straight.items() if step > half}
    if resumed == expected:
        report("resume", "PASS", f"steps {half + 1}-{args.steps} exact")
    else:
        exact_required = device.type == "cpu" and dtype == torch.float32
        worst = max((rel_diff(resumed.get(s, math.nan), v) for s, v in expected.items()),
                    default=math.nan)
        ok = resumed.keys() == expected.keys() and worst <= tol and not exact_required
        report("resume", "PASS" if ok else "FAIL", f"max relative difference {worst:.2e} "
                                                   f"(tolerance "
               f"{'0: exact on the CPU' if exact_required else f'{tol:g}'})")

    if dtype == torch.bfloat16:
        check_float16_resume(device, args, out, tokens, report)

    model = saved_model(out, f"{name}-straight", device)
    here = eval_loss(model, tokens[1], args, dtype)
    reference = eval_loss(saved_model(out, f"{name}-straight", torch.device("cpu")), tokens[1],
                          args,
                          torch.float32)
    diff = rel_diff(here, reference)
    report("evaluate", "PASS" if diff <= tol else "FAIL",
           f"{here:.5f} here, {reference:.5f} CPU float32: relative difference {diff:.2e}")

    x = torch.as_tensor(tokens[1][:args.batch_size * args.context_length].astype(np.int64),
                        device=device)
    x = x.view(args.batch_size, args.context_length)
    y = torch.roll(x, -1)  # any targets will do: the gradient's precision is what is measured
    full = chunked_head_grad(model, x, y, 0, torch.float32, LOSS_SCALE)
    (zero_whole, err_whole), (zero_chunked, err_chunked) = (
        (float((g == 0).all(dim=1).float().mean()), float((g - full).norm() / full.norm()))
        for g in (chunked_head_grad(model, x, y, chunk, dtype, LOSS_SCALE)
                  for chunk in (0, max(1, args.loss_chunk))))
    ok = zero_chunked <= zero_whole + 0.01 and err_chunked <= 2 * err_whole + 1e-5
    report("chunked", "PASS" if ok else "FAIL", f"all-zero head rows {zero_chunked:.1%} chunked, "
           f"{zero_whole:.1%} whole; error vs float32 {err_chunked:.1e} chunked, {err_whole:.1e} "
           f"whole")

    decoder = saved_model(out, f"{name}-straight", device).to(dtype)
    prompt, new = x[:1, :4], min(24, args.context_length - 4)
    cached, uncached = (greedy(decoder, prompt, new, use_cache) for use_cache in (True, False))
    if torch.equal(cached, uncached):
        report("generate", "PASS", f"{new} greedy tokens, cached == uncached")
    else:
        at = int((cached != uncached).nonzero()[0, 1])
        with torch.no_grad():
            top2 = decoder(uncached[:, :at])[0, -1].float().topk(2).values
        gap = float(top2[0] - top2[1])
        ok = gap <= tol * max(1.0, float(top2[0].abs()))
        report("generate", "PASS" if ok else "FAIL",
               f"cached and uncached part at token {at - prompt.size(1) + 1} of {new}; the two "
               f"best logits there differ by {gap:.2e} ({'a near-tie' if ok else 'not a tie'})")

    try:
        from transformers import GPT2LMHeadModel
        from transformers.utils import logging as hf_logging
    except ImportError:
        report("export", "SKIP", "transformers is not installed")
        return
    hf_logging.disable_progress_bar()
    export_hf(saved_model(out, f"{name}-straight", torch.device("cpu")), out / f"{name}-hf")
    hf: Any = GPT2LMHeadModel.from_pretrained(out / f"{name}-hf")
    hf = hf.to(device).eval()
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.no_grad():
            ours, theirs = model(x), hf(x).logits
    finally:
        torch.set_float32_matmul_precision(precision)
    worst = float((ours - theirs).abs().max())
    bound = 1e-4 * max(1.0, float(ours.abs().max()))
    report("export", "PASS" if worst <= bound else "FAIL", f"HF logits within {worst:.1e} of ours")


def check_float16_resume(device: torch.device, args: argparse.Namespace, out: Path,
                         tokens: tuple[np.ndarray, np.ndarray],
                         report: Callable[[str, str, str], None]) -> None:
    """A bf16 run stopped halfway, resumed with --dtype float16 (the scaler's state it saved is
    empty)."""
    if device.type != "cuda":
        report("fp16 resume", "SKIP", "float16 trains on CUDA only")
        return
    name, half = f"{device.type}-bfloat16-to-float16", args.steps // 2
    train_run(out, name, str(device), "bfloat16", args, tokens, stop_after=half)
    resumed = train_run(out, name, str(device), "float16", args, tokens, resume=True)
    steps = list(range(half + 1, args.steps + 1))
    ok = sorted(resumed) == steps and all(map(math.isfinite, resumed.values()))
    report("fp16 resume", "PASS" if ok else "FAIL", f"steps {half + 1}-{args.steps} in float16: "
           + ", ".join(f"{loss:.3f}" for loss in resumed.values()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", action="append",
                        help="cuda, cuda:N, mps or cpu (repeatable); default: cuda and mps, where "
                             "present")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPE_NAMES),
                        help="default: each dtype the device may train in (see the module "
                             "docstring)")
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--context-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps of each run (>= 2)")
    parser.add_argument("--loss-chunk", type=int, default=256,
                        help="--loss-chunk of the training runs and of the chunked check")
    parser.add_argument("--out", type=Path, help="keep the runs here (default: a temporary "
                                                 "directory)")
    args = parser.parse_args(argv)
    names = args.device or [kind for kind, present in (("cuda", torch.cuda.is_available()),
                                                      ("mps",
                                                       torch.backends.mps.is_available())) if present]  # noqa: E501
    if not names:
        print("error: no GPU here (neither cuda nor mps); run with --device cpu to check the CPU",
              file=sys.stderr)
        return 2
    rows: list[tuple[str, ...]] = []
    print("device | dtype | check | result | detail")
    with contextlib.ExitStack() as stack:
        out = args.out or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu_smoke-")))  # noqa: E501
        for device in map(pick_device, names):
            label = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
            for dtype_name in args.dtypes or default_dtypes(device):
                def report(check: str, result: str, detail: str) -> None:
                    rows.append((label, dtype_name, check, result, detail))  # noqa: B023 (at once)
                    print(" | ".join(rows[-1]), flush=True)

                try:
                    check_dtype(device, dtype_name, args, out, report)
                except Exception as exc:  # one dtype failing must not hide the others' results
                    report("(stopped)", "FAIL", describe(exc))
    failed = sum(row[3] == "FAIL" for row in rows)
    print(f"\n{len(rows)} checks: {len(rows) - failed} passed or skipped, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
