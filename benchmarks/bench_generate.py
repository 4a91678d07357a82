"""Decoding speed: new tokens/s of `gpt.model.sampling.generate` next to Hugging Face `generate`,
same weights.

GPT-2 small shapes (or another `--preset`) with random weights (no download), a 32-token prompt,
top-k 50 sampling, batch 1, with and without the KV cache, and with the cache with both compiled
the same way (`compile_for_decoding`: inductor with frozen weights; for HF, its `forward`), compile
times shown, in each dtype and thread count. Both
implementations get the same weights (converted with
`gpt.checkpoints.weights.gpt_to_hf_state_dict`), dtype and threads, in one process, timed
alternately; each figure is the best of `--repeats` runs. On a shared machine the absolute numbers
move with the load, and with 2+ threads so does the ratio. A second table shows what bounds a cached
step: the memory's read bandwidth against the speed of the weight products alone (see
`memory_floor`). A third times our decoding with each weight format of `gpt.model.quantize` (bf16 as
loaded, prepacked, int8 with and without the LM head) against HF's bf16, and its share of the read
floor. With `--perplexity-checkpoint`, a fourth compares the perplexity of a trained checkpoint in
each format (`perplexity_table`).

    python benchmarks/bench_generate.py --threads 2,1     # the full table (recorded in
                                                          docs/benchmarks.md)
    python benchmarks/bench_generate.py --new-tokens 20 --dtypes float32 --no-uncached
    python benchmarks/bench_generate.py --only formats --threads 2          # the weight formats
                                                                            only
    python benchmarks/bench_generate.py --only perplexity --perplexity-checkpoint runs/NAME
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import transformers
from machine import cpu_name
from transformers import GPT2Config, GPT2LMHeadModel

from gpt.checkpoints.key_map import gpt_to_hf_state_dict
from gpt.checkpoints.weights import hf_config
from gpt.model.config import GPTConfig
from gpt.model.model import GPT
from gpt.model.quantize import Int8Linear, PackedLinear, can_prepack, prepare_for_decoding
from gpt.model.sampling import compile_for_decoding, generate

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_models(preset: str, seed: int) -> tuple[GPT, GPT2LMHeadModel]:
    torch.manual_seed(seed)
    ours = GPT(GPTConfig.preset(preset, drop_rate=0.0)).eval()
    hf = GPT2LMHeadModel(GPT2Config(**hf_config(ours.config))).eval()
    # Not strict: a tied head is stored once, as wte, which HF's head shares.
    hf.load_state_dict(gpt_to_hf_state_dict(ours.state_dict(), ours.config), strict=False)
    return ours, hf


def measure(ours: GPT, hf: GPT2LMHeadModel, dtype: torch.dtype, use_cache: bool, compiled: bool,
            prompt_tokens: int, new_tokens: int, repeats: int) -> tuple[float, float, float, float]:
    """(ours, HF) new tokens/s for one setting, each the best of `repeats` runs, and (ours, HF)
    seconds of warm-up (where a compiled model compiles).

    The two are timed alternately, so a burst of load from other processes hits both, not one.
    """
    ours, hf = ours.to(dtype), hf.to(dtype)
    if compiled:  # both, the same way: inductor with frozen weights (a process-wide setting)
        torch._dynamo.reset()  # compile afresh for this dtype: the warm-ups below pay for it
        ours = compile_for_decoding(ours)
        hf.forward = torch.compile(hf.forward)
    try:
        return _time_alternately(ours, hf, use_cache, prompt_tokens, new_tokens, repeats)
    finally:
        if compiled:
            del hf.forward  # back to the class's own forward


def _time_alternately(ours: GPT, hf: GPT2LMHeadModel, use_cache: bool, prompt_tokens: int,
                      new_tokens: int, repeats: int) -> tuple[float, float, float, float]:
    prompt = torch.randint(0, ours.config.vocab_size, (1, prompt_tokens))
    generator = torch.Generator().manual_seed(0)

    def run_ours(n: int) -> torch.Tensor:
        return generate(ours, prompt, n, temperature=1.0, top_k=50, use_cache=use_cache,
                        generator=generator)

    def run_hf(n: int) -> torch.Tensor:
        # eos_token_id=None: random weights may well produce token 50256, and HF would stop there.
        with torch.inference_mode():
            return hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=True, top_k=50,
                               top_p=1.0, temperature=1.0, use_cache=use_cache, eos_token_id=None,
                               pad_token_id=0, attention_mask=torch.ones_like(prompt))

    best = {run_ours: float("inf"), run_hf: float("inf")}
    warm_up = {}
    for run in best:
        start = time.perf_counter()
        run(4)  # warm-up: first-call allocations, kernel selection, compilation
        warm_up[run] = time.perf_counter() - start
    for _ in range(repeats):
        for run in best:
            start = time.perf_counter()
            out = run(new_tokens)
            best[run] = min(best[run], time.perf_counter() - start)
            made = out.size(1) - prompt_tokens
            assert made == new_tokens, f"{run.__name__} made {made} tokens, not {new_tokens}"
    return (new_tokens / best[run_ours], new_tokens / best[run_hf], warm_up[run_ours],
            warm_up[run_hf])


def best_seconds(work: Callable[[], object], repeats: int) -> float:
    work()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


class Floor(NamedTuple):
    """What bounds a cached decode step, in GB/s except `weight_bytes` and `int8_ms`."""
    read: float  # the memory's read bandwidth
    products: float  # the model's weight products, eager, as a decode step runs them
    split: float  # the same, each split into two row blocks of one torch.bmm (a probe)
    frozen: float  # the same products compiled with frozen (pre-packed) weights (nan: not run)
    # the same through `gpt.model.quantize.PackedLinear` (nan: not bf16 on such a CPU)
    prepacked: float
    int8_ms: float  # ms per token of the same products through `Int8Linear` (nan: not bf16)
    weight_bytes: int


class WeightProducts(torch.nn.Module):
    """Every linear layer of a model (the same modules, not copies) applied to one token's vector.
    """

    def __init__(self, layers: list[torch.nn.Module]) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)

    def forward(self, inputs: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        return [layer(inputs[layer.in_features]) for layer in self.layers]


def read_bandwidth(dtype: torch.dtype, repeats: int) -> float:
    """GB/s of a sum over 512 MiB, more than any cache: how fast the memory gives data to a core."""
    big = torch.ones(2**32 // torch.finfo(dtype).bits, dtype=dtype)
    return big.numel() * big.element_size() / best_seconds(big.sum, repeats) / 1e9


def memory_floor(ours: GPT, dtype: torch.dtype, repeats: int, compiled: bool) -> Floor:
    """A cached step multiplies one token's vector by every weight matrix once, so it must read all
    of them from memory: the read bandwidth (a sum over 512 MiB, more than any cache) bounds it.

    The weight products are timed as a decode step runs them, each matrix once, in turn: eager; with
    each matrix's rows split into two blocks multiplied by one `torch.bmm`, a probe of what a kernel
    using both cores for one product would gain (not what the model does); compiled with frozen
    weights, as `compile_for_decoding` compiles the model (if `compiled`); and through the layers
    `gpt.model.quantize` makes: prepacked bf16 and int8 (bf16 only).
    """
    read = read_bandwidth(dtype, repeats)
    layers = [m for m in ours.to(dtype).modules() if isinstance(m, torch.nn.Linear)]
    inputs = {m.in_features: torch.randn(1, m.in_features, dtype=dtype) for m in layers}
    weight_bytes = sum(m.weight.numel() * m.weight.element_size() for m in layers)
    products = WeightProducts(layers).eval()

    rows = [m.weight[: m.weight.size(0) // 2 * 2] for m in layers]  # an even number of rows
    blocks = [(w.view(2, w.size(0) // 2, w.size(1)).transpose(1, 2), inputs[w.size(1)].expand(2, 1,
                                                                                              -1))
              for w in rows]

    def split_products() -> None:
        for weight, x in blocks:
            torch.bmm(x, weight)  # (2, 1, in) @ (2, in, out/2)

    def gb_per_s(module: torch.nn.Module, nbytes: int) -> float:
        return nbytes / best_seconds(lambda: module(inputs), repeats) / 1e9

    nan = float("nan")
    split_bytes = sum(w.numel() * w.element_size() for w in rows)
    with torch.inference_mode():
        floor = Floor(read=read, products=gb_per_s(products, weight_bytes),
                      split=split_bytes / best_seconds(split_products, repeats) / 1e9,
                      frozen=nan, prepacked=nan, int8_ms=nan, weight_bytes=weight_bytes)
        if dtype == torch.bfloat16:
            int8 = WeightProducts([Int8Linear.from_linear(m) for m in layers])
            floor = floor._replace(int8_ms=best_seconds(lambda: int8(inputs), repeats) * 1000)
            if can_prepack(ours):
                packed = WeightProducts([PackedLinear(m) for m in layers])
                floor = floor._replace(prepacked=gb_per_s(packed, weight_bytes))
    if compiled:
        torch._dynamo.reset()
        frozen = compile_for_decoding(products)
        with torch.inference_mode():
            floor = floor._replace(frozen=gb_per_s(frozen, weight_bytes))
    return floor


FORMATS = {  # name: (gpt.model.quantize scheme, prepack the bf16 layers left)
    "bf16 as loaded": ("none", False),
    "bf16 prepacked": ("none", True),
    "int8 (head included)": ("int8", True),
    "int8-no-head (head prepacked bf16)": ("int8-no-head", True),
}


def read_bytes_per_token(model: GPT) -> int:
    """Bytes of weights a cached step reads: every linear layer's matrix (and int8 scales) once."""
    total = 0
    for m in model.modules():
        if isinstance(m, Int8Linear):
            total += m.weight.numel() + m.scales.numel() * m.scales.element_size()
        elif isinstance(m, (torch.nn.Linear, PackedLinear)):
            total += m.in_features * m.out_features * model.tok_emb.weight.element_size()
    return total


def formats_table(ours: GPT, hf: GPT2LMHeadModel, threads: int, prompt_tokens: int, new_tokens: int,
                  repeats: int) -> list[str]:
    """Rows: our cached bf16 decoding with each weight format of `FORMATS`, timed alternately with
    HF's bf16 eager `generate`, and each one's share of the floor its bytes set at the read
    bandwidth."""
    dtype = torch.bfloat16
    read = read_bandwidth(dtype, repeats=5)
    baseline = None
    rows = []
    for name, (scheme, pack) in FORMATS.items():
        model = prepare_for_decoding(copy.deepcopy(ours).to(dtype), scheme, pack=pack)
        if pack and not can_prepack(model):
            continue  # not a CPU with native bf16: prepacking is not available
        mine, theirs, _, _ = measure(model, hf, dtype, True, False, prompt_tokens, new_tokens,
                                     repeats)
        baseline = baseline or mine
        nbytes = read_bytes_per_token(model)
        floor_ms = nbytes / read / 1e6
        rows.append(f"| {threads} | {name} | {nbytes / 1e6:.0f} MB | {mine:.1f} | "
                    f"{1000 / mine:.2f} ms | "
                    f"{mine / baseline:.2f}x | {mine / theirs:.2f}x | {floor_ms:.2f} ms | "
                    f"{floor_ms * mine / 1000:.0%} |")
        print(rows[-1], flush=True)
    return rows


def perplexity_table(checkpoint: Path, data: str, batch_size: int) -> None:
    """Print the validation perplexity of a trained checkpoint in float32, bf16 and each weight
    format, over the non-overlapping windows of `data`'s validation split (as `python train.py`
    splits it)."""
    from torch.utils.data import DataLoader

    from gpt.checkpoints.checkpoint import find_model_checkpoint, load_checkpoint
    from gpt.data.windows import SlidingWindowDataset, prepare_data
    from gpt.eval.perplexity import evaluate_loss, perplexity

    found = find_model_checkpoint(checkpoint)
    if found is None:
        raise SystemExit(f"--perplexity-checkpoint {checkpoint}: no checkpoint there")
    context = load_checkpoint(found).config.context_length
    _, val_ids = prepare_data(data, context_length=context)
    loader = DataLoader(SlidingWindowDataset(val_ids, context, context), batch_size=batch_size)
    losses = {}
    for name, (scheme, pack) in {"float32": ("none", False), **FORMATS}.items():
        model = load_checkpoint(found).eval()
        if name != "float32":
            model = prepare_for_decoding(model.to(torch.bfloat16), scheme, pack=pack)
        losses[name] = evaluate_loss(model, loader)  # in the model's own dtype: no autocast
    bf16 = perplexity(losses["bf16 as loaded"])
    for name, loss in losses.items():
        print(f"| {name} | {loss:.4f} | {perplexity(loss):.2f} | "
              f"{perplexity(loss) / bf16 - 1:+.2%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2-small", help="model shape (a GPTConfig preset)")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=200, help="tokens per run with the KV "
                                                                    "cache")
    parser.add_argument("--uncached-new-tokens", type=int, default=20,
                        help="tokens per run without the cache (each costs a forward over the "
                             "whole sequence; HF in bfloat16 on a CPU without native bf16 needs "
                             "seconds each)")
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        help="comma-separated, of: " + ", ".join(DTYPES))
    parser.add_argument("--no-uncached", action="store_true", help="skip the runs without cache")
    parser.add_argument("--no-compiled", action="store_true",
                        help="skip the runs with both models compiled with frozen weights (~1 min "
                             "each)")
    parser.add_argument("--threads", default=str(torch.get_num_threads()),
                        help="comma-separated torch thread counts, each used by both (default: "
                             "torch's)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", choices=["peers", "formats", "perplexity"], default=None,
                        help="one table only: gpt next to HF (with the floor), the weight formats, "
                             "or the perplexities")
    parser.add_argument("--perplexity-checkpoint", type=Path, default=None, metavar="RUN_DIR",
                        help="a trained run (or checkpoint) whose perplexity to compare in each "
                             "format")
    parser.add_argument("--perplexity-data", default="default",
                        help="the text it was trained on (its validation split is used)")
    args = parser.parse_args()
    tables = ["peers", "formats", "perplexity"] if args.only is None else [args.only]

    ours, hf = build_models(args.preset, seed=0)
    rows = ["| threads | dtype | KV cache | compiled (warm-up gpt, HF) | new tokens | gpt tokens/s "
            "| HF tokens/s | gpt / HF |",
            "|---:|---|---|---|---:|---:|---:|---:|"]
    floor_rows = ["| threads | dtype | weights read per token | memory read GB/s | weight products "
                  "GB/s | products' time per token | floor at read bandwidth | split in two "
                  "(probe) GB/s | compiled, frozen weights GB/s | prepacked GB/s | int8 products' "
                  "time per token |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    format_rows = ["| threads | weights | read per token | gpt tokens/s | ms/token | vs bf16 as "
                   "loaded | vs HF bf16 eager | floor at read bandwidth | share of the floor |",
                   "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    settings = [(True, False, args.new_tokens)]
    settings += [] if args.no_compiled else [(True, True, args.new_tokens)]
    settings += [] if args.no_uncached else [(False, False, args.uncached_new_tokens)]
    for threads in map(int, args.threads.split(",")):
        torch.set_num_threads(threads)
        for name in args.dtypes.split(",") if "peers" in tables else []:
            for use_cache, compiled, new_tokens in settings:
                mine, theirs, warm_ours, warm_hf = measure(ours, hf, DTYPES[name], use_cache,
                                                           compiled,
                                                           args.prompt_tokens, new_tokens,
                                                           args.repeats)
                how = f"both ({warm_ours:.0f} s, {warm_hf:.0f} s)" if compiled else "no"
                rows.append(f"| {threads} | {name} | {'on' if use_cache else 'off'} | {how} | "
                            f"{new_tokens} | "
                            f"{mine:.1f} | {theirs:.1f} | {mine / theirs:.2f}x |")
                print(rows[-1], flush=True)
            floor = memory_floor(ours, DTYPES[name], repeats=5, compiled=not args.no_compiled)
            floor_rows.append(
                f"| {threads} | {name} | {floor.weight_bytes / 1e6:.0f} MB | {floor.read:.1f} | "
                f"{floor.products:.1f} | {floor.weight_bytes / floor.products / 1e6:.1f} ms | "
                f"{floor.weight_bytes / floor.read / 1e6:.1f} ms | {floor.split:.1f} | "
                f"{floor.frozen:.1f} | "
                f"{floor.prepacked:.1f} | {floor.int8_ms:.1f} ms |")
            print(floor_rows[-1], flush=True)
        if "formats" in tables:
            format_rows += formats_table(ours, hf, threads, args.prompt_tokens, args.new_tokens,
                                         args.repeats)
    print(
        f"\n# {datetime.date.today()}, {cpu_name()}, {os.cpu_count()} cores, torch CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}; torch {torch.__version__}, transformers "
        f"{transformers.__version__}; preset {args.preset} ({ours.num_parameters() / 1e6:.0f}M "
        f"parameters), random weights, batch 1, {args.prompt_tokens}-token prompt, top-k 50, "
        f"temperature 1, best of {args.repeats}\n")
    if "peers" in tables:
        print("\n".join(rows))
        print("\nWhat bounds a cached step: every weight read once per token (the LM head "
              "included)\n")
        print("\n".join(floor_rows))
    if "formats" in tables:
        print("\nWeight formats (gpt.model.quantize), bf16 activations, KV cache on, each timed "
              "alternately with HF bf16 eager\n")
        print("\n".join(format_rows))
    if "perplexity" in tables and args.perplexity_checkpoint is not None:
        print(f"\nPerplexity of {args.perplexity_checkpoint} on the validation split of "
              f"{args.perplexity_data!r}, non-overlapping windows\n")
        print("| weights | loss | perplexity | vs bf16 as loaded |\n|---|---:|---:|---:|")
        perplexity_table(args.perplexity_checkpoint, args.perplexity_data, batch_size=8)


if __name__ == "__main__":
    main()
