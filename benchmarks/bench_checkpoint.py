"""What writing a training checkpoint costs the training loop, per save: blocking against background.

    python benchmarks/bench_checkpoint.py [--presets mini gpt2-small] [--saves 3] [--dir DIR]

For each preset: a model (the book's untied head for gpt2-small, as recipes/book-ch5.toml trains it)
and AdamW state after one real step, so the checkpoint holds what a training run's last/ holds
(weights and both moments). Then `--saves` saves of last/ through `gpt.saver.CheckpointSaver`, each
followed by as much training as fits before the next (the book's run evaluates every 5 steps), timed
as the loop sees them:

    blocking     seconds the save call takes (the whole write: files, fsync, renames)
    background   seconds the save call takes (the CPU copy), plus any wait for the previous save
                 at the next one, i.e. the time training stands still

Prints a Markdown table per preset, with the checkpoint's size and the background mode's saving.
`--dir` puts the checkpoints on another disk (default: a temporary directory).
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from gpt.config import GPTConfig
from gpt.model import GPT
from gpt.optim import build_optimizer
from gpt.saver import CheckpointSaver


def trained(preset: str) -> tuple[GPT, torch.optim.Optimizer]:
    """A model of `preset`'s shape and its optimizer after one step on random tokens."""
    torch.manual_seed(0)
    untied = {"tie_embeddings": False} if preset.startswith("gpt2") else {}
    model = GPT(GPTConfig.preset(preset, context_length=64, **untied))
    optimizer = build_optimizer(model, lr=4e-4, weight_decay=0.1, betas=(0.9, 0.999))
    x = torch.randint(0, model.config.vocab_size, (2, 64))
    model.loss(x, x).backward()
    optimizer.step()
    return model, optimizer


def time_saves(model: GPT, optimizer: torch.optim.Optimizer, directory: Path, *, background: bool,
               saves: int, work_s: float) -> list[float]:
    """Seconds the loop stands still for each of `saves` saves, with `work_s` of compute between."""
    stalls = []
    with CheckpointSaver(background=background) as saver:
        for i in range(saves):
            start = time.perf_counter()
            saver.save(model, {"optimizer": optimizer.state_dict(), "step": i}, [directory / "last"])
            stalls.append(time.perf_counter() - start)
            deadline = time.perf_counter() + work_s  # stands for the training steps between saves
            while time.perf_counter() < deadline:
                torch.mm(torch.ones(256, 256), torch.ones(256, 256))
        start = time.perf_counter()
    stalls[-1] += time.perf_counter() - start  # the last save's wait at the end of training
    return stalls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["mini", "gpt2-small"])
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--work", type=float, default=10.0,
                        help="seconds of training between saves (book run, quiet CPU: ~5 steps)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()
    print(f"# bench_checkpoint: {args.saves} saves, {args.work:g} s of work between; "
          f"{time.strftime('%Y-%m-%d')}; {platform.processor() or platform.machine()}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for preset in args.presets:
        model, optimizer = trained(preset)
        root = Path(tempfile.mkdtemp(prefix="bench_checkpoint_", dir=args.dir))
        try:
            rows = {}
            for mode in ("blocking", "background"):
                rows[mode] = time_saves(model, optimizer, root / mode, background=mode == "background",
                                        saves=args.saves, work_s=args.work)
            size = sum(f.stat().st_size for f in (root / "blocking" / "last").iterdir()) / 2**20
        finally:
            shutil.rmtree(root, ignore_errors=True)
        print(f"\n{preset}: checkpoint {size:,.0f} MiB\n")
        print("| mode | stall per save, s (each) | mean | vs blocking |")
        print("|---|---|---:|---:|")
        base = sum(rows["blocking"]) / len(rows["blocking"])
        for mode, stalls in rows.items():
            mean = sum(stalls) / len(stalls)
            print(f"| {mode} | {', '.join(f'{s:.2f}' for s in stalls)} | {mean:.2f} | {mean / base:.2f}x |")


if __name__ == "__main__":
    main()
