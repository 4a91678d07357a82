"""The book's chapter-5 curve (recipes/book-ch5.toml) over several seeds, and what moves it.

    OMP_NUM_THREADS=1 python benchmarks/book_seeds.py PATH/the-verdict.txt --keep DIR    # 5 seeds
    OMP_NUM_THREADS=1 python benchmarks/book_seeds.py PATH/the-verdict.txt --keep DIR --variant
    decay-all \
        --seeds 123
    python benchmarks/book_seeds.py PATH/the-verdict.txt --keep DIR --table-only    # print, train
                                                                                    nothing

Trains the recipe once per seed (and variant) and prints, per variant, the training loss, the
validation loss and the validation loss on the book's split (below) at steps 20, 25, ..., 85 for
each seed beside the book's printed log, with their mean, min and max over the seeds: the spread of
our recipe. Then, for each variant other than `tokens`, its difference from `tokens` run by run
(same seed), against the spread between seeds.

The two of the book's differences this measures:
    the split  The book cuts the text at 90% of its *characters* and tokenizes each part alone; we
               hold out the last 10% of the *tokens*. The book's training part ends 19 tokens
               earlier (4612 tokens, ours 4631), but both make the same 18 windows of 257 tokens,
               token for token (checked at the start of every run): a run with the book's split
               trains exactly as ours does. Only the validation windows differ (the book's start 20
               tokens earlier), so every run also evaluates the book's validation windows, on the
               same weights, at every evaluation (column `val (book split)`, kept in
               book_split_val.csv).
    decay-all  The book's optimizer, `AdamW(model.parameters(), weight_decay=0.1)`: weight decay on
               every parameter (biases and LayerNorms too), where ours decays matrices only
               (`gpt.training.optim.param_groups`). Variant `tokens` is the recipe as it is.

A run is the recipe with `--data` the given text, `--seed`, `--max-steps` (85: the constant learning
rate makes the steps before it those of the full 90-step run) and no samples (their draws have a
generator of their own: the losses do not change). Checkpoints are not written (each would be 2 GB
of weights and AdamW state every 5 steps); nothing they save feeds back into training. Each run's
metrics.csv is kept under `--keep DIR/<variant>-seed<N>/`, and `--table-only` prints the tables
from those; how long a run takes is in docs/book-curve.md. `--preset mini` trains the recipe's
settings on the 29M mini model instead: a check of the script, not the book's model. Run with
OMP_NUM_THREADS=1 when the machine is shared: the thread count changes what is computed only in its
float rounding, but this recipe is chaotic, so after some 20 steps a change of rounding can move the
curve as far as another seed does.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.util
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from machine import cpu_name

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "book-ch5.toml"
STEPS = list(range(20, 90, 5))
VARIANTS = ("tokens", "decay-all")
BOOK_SPLIT_FILE = "book_split_val.csv"


def book_log() -> dict[int, tuple[float, float]]:
    """The book's printed (train, val) by step, from recipes/book_ch5_table.py."""
    spec = importlib.util.spec_from_file_location("book_ch5_table",
                                                  ROOT / "recipes" / "book_ch5_table.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {step: (train, val) for step, train, val in module.BOOK}


def book_split_windows(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The book's split: `text[:int(0.9 * len(text))]` trains, the rest validates, each tokenized
    alone.

    Raises if its training windows differ from ours (the last 10% of the tokens held out): the
    validation windows are then the only difference a run with the book's split would make."""
    from gpt.data.windows import SlidingWindowDataset, split_tokens
    from gpt.model.tokenizer import get_tokenizer

    text = path.read_text(encoding="utf-8")
    cut = int(0.9 * len(text))
    encoding = get_tokenizer()
    train, val, whole = (np.asarray(encoding.encode_ordinary(part), dtype=np.int64)
                         for part in (text[:cut], text[cut:], text))
    ours = split_tokens(whole, 0.1)[0]
    windows = [SlidingWindowDataset(ids, 256, 256) for ids in (train, ours)]
    same = len(windows[0]) == len(windows[1]) and all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(*windows, strict=True))
    if not same:
        raise SystemExit("the book's split gives other training windows than ours: this "
                         "benchmark's shortcut (evaluating the book's validation windows in our "
                         "runs) does not hold")
    return train, val


def decay_every_parameter(model: torch.nn.Module, *, lr: float, weight_decay: float,
                          betas: tuple[float, float]) -> torch.optim.AdamW:
    """The book's optimizer: `AdamW(model.parameters(), lr, weight_decay)`, every parameter decayed.
    """
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=betas,
                             fused=True)


def train_one(text: Path, variant: str, seed: int, keep: Path, max_steps: int, book_val: np.ndarray,
              preset: str | None) -> None:
    """One run of the recipe (see the module docstring), kept in `keep`/<variant>-seed<seed>/."""
    from gpt.data.windows import build_loaders
    from gpt.eval.perplexity import evaluate_loss
    from gpt.objectives.lm import LanguageModeling
    from gpt.training import trainer
    from gpt.training.flags import read_toml
    from gpt.training.settings import TrainConfig

    name = f"{variant}-seed{seed}"
    cfg = TrainConfig.from_dict({**read_toml(RECIPE), "data": str(text), "seed": seed,
                                 "max_steps": max_steps,
                                 "sample_tokens": 0, "async_save": False, "out": str(keep),
                                 "run_name": name,
                                 "data_dir": str(keep / "data"), **({"preset": preset} if preset
                                                                    else {})})
    # The recipe's evaluation batches of the book's validation windows (the "train" ones are
    # unused).
    book_loader = build_loaders(book_val, book_val, batch_size=cfg.batch_size, context_length=256,
                                stride=256,
                                eval_batches=cfg.eval_iters, seed=seed)[1]["val"]
    rows: list[tuple[int, float]] = []
    evaluate = LanguageModeling.evaluate

    def also_book_split(objective: LanguageModeling, run: trainer.Run) -> dict[str, float]:
        rows.append((run.state.step, evaluate_loss(run.model, book_loader, dtype=run.dtype)))
        return evaluate(objective, run)

    saved, built = trainer.save_checkpoints, trainer.build_optimizer
    trainer.save_checkpoints = lambda *args, **kwargs: None  # type: ignore[assignment]
    LanguageModeling.evaluate = also_book_split  # type: ignore[method-assign]
    if variant == "decay-all":
        trainer.build_optimizer = decay_every_parameter  # type: ignore[assignment]
    try:
        started = time.perf_counter()
        trainer.train(cfg)
        print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
    finally:
        trainer.save_checkpoints, trainer.build_optimizer = saved, built
        LanguageModeling.evaluate = evaluate  # type: ignore[method-assign]
    with open(keep / name / BOOK_SPLIT_FILE, "w", newline="") as file:
        csv.writer(file).writerows([("step", "val_loss"), *rows])


def read_run(directory: Path) -> dict[int, tuple[float, float, float]]:
    """(train, val, val on the book's split) by step; the last is NaN where not measured."""
    with open(directory / "metrics.csv", newline="") as file:
        rows = {int(row["step"]): (float(row["train_loss"]), float(row["val_loss"]))
                for row in csv.DictReader(file)}
    book: dict[int, float] = {}
    if (directory / BOOK_SPLIT_FILE).is_file():
        with open(directory / BOOK_SPLIT_FILE, newline="") as file:
            book = {int(row["step"]): float(row["val_loss"]) for row in csv.DictReader(file)}
    return {step: (train, val, book.get(step, math.nan)) for step, (train, val) in rows.items()}


Run = dict[int, tuple[float, float, float]]
"""(train, val, val on the book's split) by step, as `read_run` gives them."""
KINDS = ("train loss", "val loss", "val loss on the book's split")


def cell(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f}"


def spread_table(variant: str, runs: dict[int, Run], which: int) -> None:
    """Loss `which` (an index of `KINDS`) of each seed's run by step, the book's, and mean/min/max.
    """
    book = book_log()
    seeds = sorted(runs)
    if all(math.isnan(row[which]) for run in runs.values() for row in run.values()):
        return  # not measured (runs before the book's split was evaluated)
    print(f"\n{variant}: {KINDS[which]}")
    print("| step | book | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | min | max |")
    print("|---:|---:|" + "---:|" * (len(seeds) + 3))
    for step in STEPS:
        values = [runs[s].get(step, (math.nan,) * 3)[which] for s in seeds]
        known = [v for v in values if not math.isnan(v)]
        stats = (f"{statistics.fmean(known):.3f} | {min(known):.3f} | {max(known):.3f}" if known
                 else "- | - | -")
        book_loss = book[step][min(which, 1)]
        print(f"| {step} | {book_loss:.3f} | " + " | ".join(map(cell, values)) + f" | {stats} |")


def split_table(runs: dict[str, dict[int, Run]]) -> None:
    """The book's split against ours: validation loss on the book's windows minus ours, same
    weights."""
    names = [(variant, seed) for variant in VARIANTS for seed in sorted(runs[variant])
             if any(not math.isnan(row[2]) for row in runs[variant][seed].values())]
    if not names:
        return
    print("\nval loss on the book's split minus on ours, same run and step")
    print("| step | " + " | ".join(f"{v} seed {s}" for v, s in names) + " |")
    print("|---:|" + "---:|" * len(names))
    for step in STEPS:
        rows = [runs[v][s].get(step, (math.nan,) * 3) for v, s in names]
        print(f"| {step} | " + " | ".join(f"{row[2] - row[1]:+.3f}" if not math.isnan(row[2])
                                          else "-"
                                         for row in rows) + " |")


def difference_table(variant: str, base: dict[int, Run], other: dict[int, Run]) -> None:
    """`variant` minus `tokens`, seed by seed (train / val), and the seeds' range under `tokens`."""
    seeds = sorted(set(base) & set(other))
    if not seeds:
        return
    print(f"\n{variant} minus tokens, same seed: train / val (seed range: max - min over the "
          f"tokens seeds)")
    print("| step | " + " | ".join(f"seed {s}" for s in seeds) + " | seed range train / val |")
    print("|---:|" + "---:|" * (len(seeds) + 1))
    for step in STEPS:
        cells = [f"{other[s][step][0] - base[s][step][0]:+.3f} / "
                 f"{other[s][step][1] - base[s][step][1]:+.3f}"
                 if step in base[s] and step in other[s] else "-" for s in seeds]
        rows = [base[s][step] for s in base if step in base[s]]
        span = (f"{max(r[0] for r in rows) - min(r[0] for r in rows):.3f} / "
                f"{max(r[1] for r in rows) - min(r[1] for r in rows):.3f}" if rows else "-")
        print(f"| {step} | " + " | ".join(cells) + f" | {span} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("text", type=Path, help="the-verdict.txt (the book's text; not in this "
                                                "repository)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[123, 1, 2, 3, 4])
    parser.add_argument("--variant", choices=VARIANTS, nargs="+", default=["tokens"])
    parser.add_argument("--keep", type=Path, required=True, help="directory for the runs' "
                                                                 "metrics.csv")
    parser.add_argument("--max-steps", type=int, default=85)
    parser.add_argument("--preset", help="another model size than the recipe's gpt2-small (mini: a "
                                         "quick "
                        "check of this script, not the book's model); give it its own --keep")
    parser.add_argument("--table-only", action="store_true", help="train nothing: tables of the "
                                                                  "kept runs")
    args = parser.parse_args()
    if not args.text.is_file():
        parser.error(f"{args.text} is not a file; give the path of the-verdict.txt")
    keep = args.keep.resolve()
    if keep.is_relative_to(ROOT):
        parser.error("--keep must be outside the repository (the token cache holds the book's "
                     "text)")
    if args.table_only:
        print(f"# the runs kept in {keep}")
    else:
        print(f"# {cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
              f"{datetime.date.today()}; recipe {RECIPE}", flush=True)
    if not args.table_only:
        book_val = book_split_windows(args.text)[1]
        for variant in args.variant:
            for seed in args.seeds:
                train_one(args.text, variant, seed, keep, args.max_steps, book_val, args.preset)
    runs = {variant: {int(path.parent.name.rsplit("seed", 1)[1]): read_run(path.parent)
                      for path in sorted(keep.glob(f"{variant}-seed*/metrics.csv"))}
            for variant in VARIANTS}
    for variant in VARIANTS:
        for which in range(len(KINDS)):
            if runs[variant]:
                spread_table(variant, runs[variant], which)
    split_table(runs)
    for variant in VARIANTS[1:]:
        difference_table(variant, runs["tokens"], runs[variant])


if __name__ == "__main__":
    main()
