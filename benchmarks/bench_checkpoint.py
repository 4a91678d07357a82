"""What writing a training checkpoint costs the training loop, per save: blocking against
background.

    python benchmarks/bench_checkpoint.py [--presets mini gpt2-small] [--saves 3] [--dir DIR]

For each preset: a model (the book's untied head for gpt2-small, as recipes/book-ch5.toml trains it)
and AdamW state after one real step, so the checkpoint holds what a training run's last/ holds
(weights and both moments). Then `--saves` saves of last/ through
`gpt.checkpoints.saver.CheckpointSaver`, each followed by the same fixed number of real training
steps of that model (batch 2, context 256, as the book's run; as many as take `--work` seconds
alone). What a save costs is the loop's extra time:

    cost per save = (time of saves + steps) - (time of the same steps without saves), / saves

so a background write that slows the steps beside it (both want the same cores and memory
bandwidth) is charged for it, not only for the time the save call blocks. Also printed: the stall,
the seconds the save call itself takes (blocking: the whole write; background: the CPU copy, plus
any wait for the previous save).

Prints a Markdown table per preset, with the checkpoint's size and the background mode's saving.
`--dir` puts the checkpoints on another disk (default: a temporary directory).
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from gpt.checkpoints.saver import CheckpointSaver
from gpt.model.config import GPTConfig
from gpt.model.model import GPT
from gpt.training.optim import build_optimizer


def trained(preset: str) -> tuple[GPT, torch.optim.Optimizer, Callable[[], None]]:
    """A model of `preset`'s shape, its optimizer after one step on random tokens, and that step."""
    torch.manual_seed(0)
    untied = {"tie_embeddings": False} if preset.startswith("gpt2") else {}
    model = GPT(GPTConfig.preset(preset, context_length=256, **untied))
    optimizer = build_optimizer(model, lr=4e-4, weight_decay=0.1, betas=(0.9, 0.999))
    x = torch.randint(0, model.config.vocab_size, (2, 256))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model.loss(x, x).backward()
        optimizer.step()

    step()
    return model, optimizer, step


def time_saves(model: GPT, optimizer: torch.optim.Optimizer, step: Callable[[], None],
               directory: Path, *,
               background: bool | None, saves: int, steps: int) -> tuple[float, list[float]]:
    """(total seconds, seconds each save call stood still) of `saves` rounds of a save followed by
    `steps` training steps; `background=None` runs the rounds without saving."""
    stalls = []
    begin = time.perf_counter()
    with CheckpointSaver(background=bool(background)) as saver:
        for i in range(saves):
            start = time.perf_counter()
            if background is not None:
                saver.save(model, {"optimizer": optimizer.state_dict(), "step": i},
                           [directory / "last"])
            stalls.append(time.perf_counter() - start)
            for _ in range(steps):
                step()
        start = time.perf_counter()
    stalls[-1] += time.perf_counter() - start  # the last save's wait at the end of training
    return time.perf_counter() - begin, stalls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["mini", "gpt2-small"])
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--work", type=float, default=10.0,
                        help="about how many seconds of training steps between saves (the book's "
                             "run evaluates, and saves, every 5 steps)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp "
                                                               "dir)")
    args = parser.parse_args()
    print(f"# bench_checkpoint: {args.saves} saves, {args.work:g} s of work between; "
          f"{time.strftime('%Y-%m-%d')}; {platform.processor() or platform.machine()}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for preset in args.presets:
        model, optimizer, step = trained(preset)
        start = time.perf_counter()
        step()
        steps = max(1, round(args.work / (time.perf_counter() - start)))
        root = Path(tempfile.mkdtemp(prefix="bench_checkpoint_", dir=args.dir))
        try:
            rows = {}
            for mode, background in (("no save", None), ("blocking", False), ("background", True)):
                rows[mode] = time_saves(model, optimizer, step, root / mode, background=background,
                                        saves=args.saves, steps=steps)
            size = sum(f.stat().st_size for f in (root / "blocking" / "last").iterdir()) / 2**20
        finally:
            shutil.rmtree(root, ignore_errors=True)
        print(f"\n{preset}: checkpoint {size:,.0f} MiB; {steps} training steps between saves "
              f"({rows['no save'][0] / args.saves:.1f} s without saving)\n")
        print("| mode | cost per save, s | stall per save, s (each) | cost vs blocking |")
        print("|---|---:|---|---:|")
        base = (rows["blocking"][0] - rows["no save"][0]) / args.saves
        for mode in ("blocking", "background"):
            total, stalls = rows[mode]
            cost = (total - rows["no save"][0]) / args.saves
            print(f"| {mode} | {cost:.2f} | {', '.join(f'{s:.2f}' for s in stalls)} | "
                  f"{cost / base:.2f}x |")

if __name__ == "__main__":
    main()
