"""The run's metrics log, `metrics.csv`: one row per evaluation, appended as training goes.

    step,epoch,tokens_seen,train_loss,val_loss,val_perplexity,lr,grad_norm,tokens_per_s

The losses are plain cross-entropy whatever the run trains with, so runs stay comparable; a run with
another objective (`gpt.objectives.lm.Objective`) has one more column, `train_objective`, at the end. A DPO
run (`gpt.objectives.dpo`) is the exception: its losses are DPO losses, and `DPO_COLUMNS` replace val_perplexity.
`MetricsLog` appends rows, reads them back, draws loss.png from them, and, when a run resumes, drops
the rows logged after its checkpoint: those steps are taken again and log again.
`format_row` is the same row as the line printed at each evaluation.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import TYPE_CHECKING

from matplotlib.figure import Figure

from gpt.base.atomic import atomic_file, write_errors
from gpt.base.plot import plot_losses

if TYPE_CHECKING:
    from gpt.training.settings import TrainConfig

METRICS_FILE = "metrics.csv"
METRICS_COLUMNS = ("step", "epoch", "tokens_seen", "train_loss", "val_loss", "val_perplexity", "lr",
                   "grad_norm", "tokens_per_s")
ANSWER_COLUMN = "val_exact_match"
"""The extra column of a fine-tuning run: the share of validation answers that were exactly right."""
OBJECTIVE_COLUMN = "train_objective"
"""The training objective on the same batches as train_loss; only in runs whose objective is not plain
cross-entropy (a pretraining run's metrics.csv keeps the columns above)."""
DPO_COLUMNS = ("val_reward_accuracy", "val_reward_margin", "val_chosen_logp", "val_rejected_logp")
"""A DPO run's columns in place of val_perplexity, all of the validation pairs: the share whose chosen
response has the higher implicit reward, the mean reward margin (chosen minus rejected), and the
mean log-probabilities of the chosen and of the rejected responses."""
_INT_COLUMNS = ("step", "tokens_seen")


def run_columns(cfg: TrainConfig, records: bool) -> tuple[str, ...]:
    """The columns of a run's metrics.csv: `METRICS_COLUMNS`, with `ANSWER_COLUMN` for a run on
    `records` that answers, `OBJECTIVE_COLUMN` for a variant of cross-entropy, or `DPO_COLUMNS` in
    place of val_perplexity for DPO."""
    objective = cfg.training_objective
    if objective.name == "dpo":
        return METRICS_COLUMNS[:5] + DPO_COLUMNS + METRICS_COLUMNS[6:]
    return (METRICS_COLUMNS + ((ANSWER_COLUMN,) if records and cfg.eval_answers else ())
            + (() if objective.is_cross_entropy else (OBJECTIVE_COLUMN,)))


class MetricsLog:
    """`metrics.csv` at `path`: `append` a row, `rows()` to read them all, `truncate` on resume,
    `plot` the losses. `columns`: `METRICS_COLUMNS`, and `ANSWER_COLUMN` for a fine-tuning run."""

    def __init__(self, path: Path, columns: tuple[str, ...] = METRICS_COLUMNS) -> None:
        self.path = Path(path)
        self.columns = columns

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
        return [{name: int(value) if name in _INT_COLUMNS else float(value) for name, value in row.items()}
                for row in csv.DictReader(io.StringIO(text, newline=""))]

    def truncate(self, up_to_step: int) -> list[dict[str, float]]:
        """Drop the rows after `up_to_step` (and a half-written last line), from the file too; return
        the rows kept.

        The kept rows go to a new file that replaces the old one in one rename (`gpt.base.atomic`): a kill
        at any moment leaves the old file or the new one, whole, never one without the kept rows.
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
        """Draw the train and validation losses of every row to `path` (`gpt.base.plot.plot_losses`),
        marking the row of `best_step`, and a DPO run's reward accuracy on a second axis; return the
        figure."""
        rows = self.rows()
        best_index = max((i for i, row in enumerate(rows) if row["step"] == best_step), default=None)
        dpo = DPO_COLUMNS[0] in self.columns
        return plot_losses([row["epoch"] for row in rows], [row["train_loss"] for row in rows],
                           [row["val_loss"] for row in rows], path, tokens_per_epoch=tokens_per_epoch,
                           best_index=best_index, log_scale=log_scale, title=title,
                           loss_name="DPO loss" if dpo else "cross-entropy loss",
                           accuracy=[row[DPO_COLUMNS[0]] for row in rows] if dpo else None)


def format_row(row: dict[str, float]) -> str:
    """One evaluation's row as the line printed during training."""
    objective = f" (objective {row[OBJECTIVE_COLUMN]:.3f})" if OBJECTIVE_COLUMN in row else ""
    accuracy, margin, chosen, rejected = DPO_COLUMNS
    about_val = (f"reward accuracy {row[accuracy]:.0%}, margin {row[margin]:.3f}, log p chosen "
                 f"{row[chosen]:.2f}, rejected {row[rejected]:.2f}" if accuracy in row else
                 f"ppl {row['val_perplexity']:.1f}")
    parts = [f"step {row['step']:>5}", f"epoch {row['epoch']:.2f}", f"tokens {row['tokens_seen']:,}",
             f"train {row['train_loss']:.3f}{objective}", f"val {row['val_loss']:.3f} ({about_val})"]
    if not math.isnan(row["lr"]):  # the evaluation before the first step has no step to report on
        parts += [f"lr {row['lr']:.2e}", f"grad norm {row['grad_norm']:.2f}",
                  f"{row['tokens_per_s']:,.0f} tok/s"]
    if ANSWER_COLUMN in row:
        parts.insert(5, f"exact {row[ANSWER_COLUMN]:.0%}")
    return " | ".join(parts)
