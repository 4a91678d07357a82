"""The table of docs/book.md (reproducing the book): the book's chapter-5 losses beside a run's
metrics.csv.

    python recipes/book_ch5_table.py runs/<run-name>/metrics.csv

The book's numbers are its printed training log (train_model_simple, eval_freq=5, eval_iter=5),
every one of the 18 lines, checked against published transcripts of that log; its step k is logged
after k + 1 updates, ours after k.
"""

import csv
import sys

BOOK = [(0, 9.781, 9.933), (5, 8.111, 8.339), (10, 6.661, 7.048), (15, 5.961, 6.616), (20, 5.726,
                                                                                       6.600),
        (25, 5.201, 6.348), (30, 4.417, 6.278), (35, 4.069, 6.226), (40, 3.732, 6.160), (45, 2.850,
                                                                                         6.179),
        (50, 2.427, 6.141), (55, 2.104, 6.134), (60, 1.882, 6.233), (65, 1.320, 6.238), (70, 0.985,
                                                                                         6.242),
        (75, 0.717, 6.293), (80, 0.541, 6.393), (85, 0.391, 6.452)]
BOOK_BEST_STEP = 55
STEPS_PER_EPOCH = 9


def main() -> None:
    with open(sys.argv[1], newline="") as file:
        ours = {int(row["step"]): row for row in csv.DictReader(file)}
    print("| book step (updates) | epoch | book train | book val | our step | our train | our val "
          "|")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for step, train, val in BOOK:
        row = ours.get(step)
        mine = (f"{float(row['train_loss']):.3f} | {float(row['val_loss']):.3f}" if row
                else "not reached | not reached")
        best = " (best)" if step == BOOK_BEST_STEP else ""
        print(f"| {step} ({step + 1}) | {step // STEPS_PER_EPOCH + 1} | {train:.3f} | "
              f"{val:.3f}{best} | "
              f"{step} | {mine} |")
    last = max(ours)
    if last > BOOK[-1][0]:
        row = ours[last]
        print(f"| | | | | {last} | {float(row['train_loss']):.3f} | {float(row['val_loss']):.3f} |")


if __name__ == "__main__":
    main()
