"""Peak memory of loading a GPT-2 medium-shaped checkpoint: `load_pretrained` against the
alternatives.

    python benchmarks/bench_load.py [--preset gpt2-medium]

Writes a random checkpoint of the preset's shape with `save_hf` into a temporary directory, then
loads it in a fresh subprocess per method and reads the subprocess's peak resident set size
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`, which counts the pages of memory-mapped files that
were touched) after loading, and again after one forward pass, which reads every weight. Prints a
Markdown table; the ratio is peak RSS over the checkpoint file's size, imports (torch) included.

Linux keeps a process's peak RSS across `exec`, so the parent stays plain Python (no torch) and the
checkpoint is written by a subprocess too: otherwise every child would start at the parent's peak.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_name, peak_rss_bytes

METHODS = {
    "load_pretrained (mmap, transposes as views)": "lazy",
    "load_pretrained, then a contiguous copy of each transposed weight": "copy",
    "naive: read the whole file, build the model, copy the weights in": "naive",
}


def make(preset: str, directory: Path) -> None:
    """Write a random checkpoint of `preset`'s shape to `directory`; print torch's version."""
    import torch

    from gpt.checkpoints.weights import save_hf
    from gpt.model.config import GPTConfig
    from gpt.model.model import GPT

    save_hf(GPT(GPTConfig.preset(preset)), directory)
    print(torch.__version__)


def child(method: str, directory: Path) -> None:
    """Load `directory` by `method`; print peak RSS after imports, after loading, after a forward
    pass."""
    import torch
    from safetensors.torch import load_file

    from gpt.checkpoints.key_map import to_gpt_state_dict
    from gpt.checkpoints.weights import config_from_hf, load_pretrained
    from gpt.model.model import GPT

    imports = peak_rss_bytes() / 2**20
    start = time.perf_counter()
    if method == "naive":
        import json

        cfg = config_from_hf(json.loads((directory / "config.json").read_text()))
        model = GPT(cfg)
        state = to_gpt_state_dict(load_file(directory / "model.safetensors"), cfg)
        model.load_state_dict(state, strict=False)  # a tied head is stored once, as tok_emb.weight
    else:
        model = load_pretrained(directory)
        if method == "copy":
            for param in model.parameters():  # one tensor at a time, as a copying loader would
                param.data = param.data.contiguous()
    seconds = time.perf_counter() - start
    loaded = peak_rss_bytes() / 2**20
    with torch.no_grad():
        model(torch.zeros(1, 1, dtype=torch.long))
    print(imports, loaded, peak_rss_bytes() / 2**20, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2-medium")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--make", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]))
        return
    if args.make:
        make(args.preset, Path(args.make))
        return

    def run(*flags: str) -> list[str]:
        return subprocess.run([sys.executable, __file__, "--preset", args.preset, *flags],
                              check=True, capture_output=True, text=True).stdout.split()

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "hf"
        (torch_version,) = run("--make", str(directory))
        size_mib = (directory / "model.safetensors").stat().st_size / 2**20
        print(f"{args.preset}, model.safetensors {size_mib:.0f} MiB; torch {torch_version}, "
              f"{cpu_name()}, Python {platform.python_version()}\n")
        print("| method | RSS after imports | peak RSS, loaded | peak RSS, after forward | ratio | "
              "time |")
        print("|---|---|---|---|---|---|")
        for label, method in METHODS.items():
            out = run("--child", method, str(directory))
            imports, loaded, forward, seconds = map(float, out)
            print(f"| {label} | {imports:.0f} MiB | {loaded:.0f} MiB | {forward:.0f} MiB | "
                  f"{max(loaded, forward) / size_mib:.2f}x | {seconds:.2f} s |")


if __name__ == "__main__":
    main()
