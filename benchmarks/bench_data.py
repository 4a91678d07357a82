"""Data pipeline benchmark: tokenization speed and peak memory, and the dataset's memory per stride.

    python benchmarks/bench_data.py                  # 10 MB, 100 MB and 1 GB of text
    python benchmarks/bench_data.py --sizes 10,100   # a quicker run

Each text is the built-in `default` corpus repeated to the size asked for, written to a temporary
directory (deleted afterwards, with its token cache). Every measurement runs in a fresh subprocess
so its peak RSS (`ru_maxrss`) is its own: the targets are >= 10 MB/s on a 2-core machine and a peak
RSS that stays within +10% from 10 MB to 1 GB, i.e. memory that does not grow with the corpus.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from machine import cpu_name, peak_rss_bytes

MB = 1_000_000


def rss_mb() -> dict[str, float]:
    """Current resident memory of this process (Linux), MB: anonymous (the process's own) and file
    (pages of mapped files, such as a token memmap: shared page cache the kernel can drop)."""
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return {kind: int(fields[f"Rss{kind.capitalize()}"].split()[0]) * 1024 / MB for kind in ("anon",
                                                                                             "file")}


# ---------------------------------------------------------------------------------------------
# Children: one measurement each, reported as one JSON line on stdout.


def child_tokenize(path: Path, data_dir: Path) -> dict[str, Any]:
    from gpt.data.token_cache import load_tokens
    from gpt.model.tokenizer import get_tokenizer

    get_tokenizer()  # built before the clock starts: a one-off cost, not per-megabyte
    baseline = peak_rss_bytes() / MB
    start = time.perf_counter()
    cpu_start = time.process_time()
    tokens = load_tokens(str(path), data_dir=data_dir)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "cpu_seconds": time.process_time() - cpu_start,
            "tokens": len(tokens),
            "baseline_mb": baseline, "peak_mb": peak_rss_bytes() / MB}


def child_dataset(path: Path, tokens: int, context: int, stride: int, batches: int) -> dict[str,
                                                                                            Any]:
    import numpy as np

    from gpt.data.windows import create_dataloader

    ids = np.memmap(path, dtype=np.uint16, mode="r", shape=(tokens,))
    before = rss_mb()
    loader = create_dataloader(ids, batch_size=8, context_length=context, stride=stride,
                               shuffle=True)
    built = rss_mb()
    iterator = iter(loader)  # draws the epoch's shuffled order
    for _ in range(batches):
        next(iterator)
    after = rss_mb()
    return {"windows": len(loader.dataset), "dataset_mb": built["anon"] - before["anon"],
            "loader_mb": after["anon"] - before["anon"], "file_mb": after["file"] - before["file"]}


def run_child(*args: str) -> dict[str, Any]:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    result = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True,
                            text=True,
                            env=env, check=False)
    if result.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# The parent: make the texts, run the children, print markdown.


def make_text(path: Path, size: int) -> int:
    """Write the default corpus repeated to `size` bytes (cut at a newline); returns the bytes
    written."""
    from pydoc_data.topics import topics

    base = "\n\n".join(topics[key] for key in sorted(topics)).encode() + b"\n\n"
    written = 0
    with path.open("wb") as out:
        while written + len(base) <= size:
            out.write(base)
            written += len(base)
        tail = base[:base.rfind(b"\n", 0, size - written) + 1]
        out.write(tail)
    return written + len(tail)


def machine() -> str:
    cpu = cpu_name()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import numpy
    import tiktoken
    import torch
    return (f"{cpu}, {cores} cores, {memory:.0f} GiB RAM; Python {platform.python_version()}, "
            f"torch {torch.__version__}, numpy {numpy.__version__}, tiktoken "
            f"{tiktoken.__version__}")


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,100,1000", help="text sizes in MB, comma separated")
    parser.add_argument("--context", type=int, default=256, help="context length L for the dataset "
                                                                 "rows")
    parser.add_argument("--batches", type=int, default=200, help="batches drawn in each dataset "
                                                                 "run")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "tokenize":
            report = child_tokenize(Path(rest[0]), Path(rest[1]))
        else:
            report = child_dataset(Path(rest[0]), *(int(x) for x in rest[1:]))
        print(json.dumps(report))
        return

    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"# Data pipeline benchmark\n\n{time.strftime('%Y-%m-%d %H:%M %Z')}; {machine()}\n")
    print("| text | tokens | seconds | MB/s | CPU s / wall s | MB per CPU s | peak RSS | "
          "RSS before tokenizing | load avg (1/5/15 min, before) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        for size in sizes:
            text = Path(tmp) / f"text_{size}mb.txt"
            n_bytes = make_text(text, size * MB)
            data_dir = Path(tmp) / f"data_{size}"
            before = load()
            row = run_child("tokenize", str(text), str(data_dir))
            rows.append(row)
            print(f"| {n_bytes / MB:.0f} MB | {row['tokens']:,} | {row['seconds']:.1f} | "
                  f"{n_bytes / MB / row['seconds']:.1f} | "
                  f"{row['cpu_seconds'] / row['seconds']:.2f} | "
                  f"{n_bytes / MB / row['cpu_seconds']:.1f} | "
                  f"{row['peak_mb']:.0f} MB | {row['baseline_mb']:.0f} MB | {before} |", flush=True)
            text.unlink()
            if size != max(sizes):  # keep only the largest cache, for the dataset rows
                for file in (data_dir / "cache").iterdir():
                    file.unlink()
        growth = rows[-1]["peak_mb"] / rows[0]["peak_mb"] - 1
        print(f"\nPeak RSS from {sizes[0]} MB to {sizes[-1]} MB of text: {growth:+.1%}.\n")

        (cache,) = (Path(tmp) / f"data_{max(sizes)}" / "cache").glob("*.bin")
        tokens = cache.stat().st_size // 2
        L = args.context
        print(f"Dataset over the {max(sizes)} MB token cache ({tokens:,} tokens, "
              f"{cache.stat().st_size / MB:.0f} MB on disk), context {L}, batch 8, {args.batches} "
              f"shuffled "
              "batches drawn:\n")
        print("| stride | windows | dataset | dataset + shuffled sampler | token pages mapped "
              "(page cache) | "
              "the book's eager lists of tensors |")
        print("|---:|---:|---:|---:|---:|---:|")
        for stride in (1, L):
            row = run_child("dataset", str(cache), str(tokens), str(L), str(stride),
                            str(args.batches))
            eager = row["windows"] * 2 * L * 8 / MB  # x and y as int64 per window
            print(f"| {stride} | {row['windows']:,} | {row['dataset_mb']:+.1f} MB | "
                  f"{row['loader_mb']:+.1f} MB | {row['file_mb']:+.1f} MB | {eager:,.0f} MB |",
                  flush=True)
        print("\nDataset and sampler columns: growth of anonymous RSS (the process's own memory). "
              "The sampler's shuffled order costs 4 bytes a window.")


if __name__ == "__main__":
    main()
