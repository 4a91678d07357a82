"""The run's metrics log, `metrics.csv`: one row per evaluation, appended as training goes.

    step,epoch,tokens_seen,train_loss,val_loss,val_perplexity,lr,grad_norm,tokens_per_s

Those are a pretraining run's columns. An objective (`gpt.training.run.Objective`) lays out its own
with `columns`: its measurements of the validation data in place of val_perplexity, and others at
the end. `MetricsLog` appends rows, reads them back, draws loss.png from them, and, when a run
resumes, drops the rows logged after its checkpoint: those steps are taken again and log again.
`format_row` is a row as the line printed at each evaluation.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.figure import Figure

from gpt.base.atomic import atomic_file, write_errors
from gpt.base.plot import plot_losses

METRICS_FILE = "metrics.csv"
METRICS_COLUMNS = ("step", "epoch", "tokens_seen", "train_loss", "val_loss", "val_perplexity", "lr",
                   "grad_norm", "tokens_per_s")
_INT_COLUMNS = ("step", "tokens_seen")


def columns(val: Sequence[str] = ("val_perplexity",), extra: Sequence[str] = ()) -> tuple[str, ...]:
    """`METRICS_COLUMNS` with `val` in place of val_perplexity and `extra` at the end."""
    return (*METRICS_COLUMNS[:5], *val, *METRICS_COLUMNS[6:], *extra)


class MetricsLog:
    """`metrics.csv` at `path`: `append` a row, `rows()` to read them all, `truncate` on resume,
    `plot` the losses. `columns`: `METRICS_COLUMNS`, or an objective's (`columns`)."""

    def __init__(self, path: Path, columns: tuple[str, ...] = METRICS_COLUMNS, *,
                 loss_name: str = "cross-entropy loss", accuracy: str | None = None,
                 panels: Mapping[str, Sequence[str]] | None = None) -> None:
        self.path = Path(path)
        self.columns = columns
        self.loss_name = loss_name
        """The loss axis of the plot (the objective's `loss_name`)."""
        self.accuracy = accuracy
        """The column the plot draws on a second axis, or None (`Objective.accuracy_column`)."""
        self.panels = dict(panels or {})
        """Columns the plot draws in panels below the losses, by the panel's axis label
        (`Objective.plot_panels`)."""

    def append(self, row: dict[str, float]) -> None:
        """Add one evaluation's row (with the header line first if the file is new)."""
        new = not self.path.exists()
        with write_errors(self.path), open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns)
            if new:
                writer.writeheader()
            writer.writerow(row)

    def rows(self) -> list[dict[str, float]]:
        """Every row, as numbers (step and tokens_seen as ints); none if there is no file yet.

        A last line without its line end is the half-written row of a process killed while
        appending it: it is left out (it was logged before its checkpoint was saved, so a resumed
        run drops it anyway).
        """
        if not self.path.exists():
            return []
        text = self.path.read_text()
        if not text.endswith("\n"):
            text = text[:text.rfind("\n") + 1]
        return [{name: int(value) if name in _INT_COLUMNS else float(value) for name,
                 value in row.items()}
                for row in csv.DictReader(io.StringIO(text, newline=""))]

    def truncate(self, up_to_step: int) -> list[dict[str, float]]:
        """Drop the rows after `up_to_step` (and a half-written last line), from the file too;
        return the rows kept.

        The kept rows go to a new file that replaces the old one in one rename (`gpt.base.atomic`):
        a kill at any moment leaves the old file or the new one, whole, never one without the kept
        rows.
        """
        if not self.path.exists():
            return []
        kept = [row for row in self.rows() if row["step"] <= up_to_step]
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=self.columns)
        writer.writeheader()
        writer.writerows(kept)
        with atomic_file(self.path) as out:
            out.write(text.getvalue().encode())
        return kept

    def plot(self, path: Path, *, tokens_per_epoch: int, best_step: int, log_scale: bool = False,
             title: str | None = None) -> Figure:
        """Draw the train and validation losses of every row to `path`
        (`gpt.base.plot.plot_losses`), marking the row of `best_step`, the `accuracy` column on a
        second axis (named as the column, without val_) and the `panels` below, each curve named by
        its column; return the figure."""
        rows = self.rows()
        best_index = max((i for i, row in enumerate(rows) if row["step"] == best_step),
                         default=None)
        accuracy = self.accuracy
        panels = {name: {column: [row[column] for row in rows] for column in columns}
                  for name, columns in self.panels.items()}
        return plot_losses([row["epoch"] for row in rows], [row["train_loss"] for row in rows],
                           [row["val_loss"] for row in rows], path,
                           tokens_per_epoch=tokens_per_epoch,
                           best_index=best_index, log_scale=log_scale, title=title,
                           loss_name=self.loss_name,
                           accuracy=[row[accuracy] for row in rows] if accuracy else None,
                           accuracy_name=(accuracy or "").removeprefix("val_").replace("_", " "),
                           panels=panels)


def format_row(row: dict[str, float], val_note: str | None = None, train_note: str = "",
               extra: Sequence[str] = ()) -> str:
    """One evaluation's row as the line printed during training: `train_note` after the training
    loss, `val_note` in brackets after the validation loss (by default its perplexity), `extra`
    parts after them."""
    about_val = f"ppl {row['val_perplexity']:.1f}" if val_note is None else val_note
    parts = [f"step {row['step']:>5}", f"epoch {row['epoch']:.2f}", f"tokens "
                                                                    f"{row['tokens_seen']:,}",
             f"train {row['train_loss']:.3f}{train_note}", f"val {row['val_loss']:.3f} "
                                                           f"({about_val})",
             *extra]
    if not math.isnan(row["lr"]):  # the evaluation before the first step has no step to report on
        parts += [f"lr {row['lr']:.2e}", f"grad norm {row['grad_norm']:.2f}",
                  f"{row['tokens_per_s']:,.0f} tok/s"]
    return " | ".join(parts)
