"""An objective defined only here, in a test file, trains through `train()`: the plug-in point is
real.

It is cross-entropy plus PaLM's z-loss (Chowdhery et al. 2022), coefficient * logsumexp(logits)^2
per token, which keeps the softmax's normaliser near 1. Nothing in gpt/ knows it: it is registered,
trained, evaluated, logged, printed and summarised through `gpt.training.run.Objective` alone.
"""

import csv
from collections.abc import Iterable, Sequence

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_runs import TOKENS, tiny
from torch import Tensor

from gpt.eval.perplexity import evaluate_loss
from gpt.model.loss import count_targets
from gpt.model.model import GPT
from gpt.training import metrics
from gpt.training.distributed import Dist
from gpt.training.record_data import text_loaders
from gpt.training.run import OBJECTIVES, Prepared, Run, register
from gpt.training.settings import TrainConfig
from gpt.training.trainer import setup, train

COEFFICIENT = 0.1


def z_loss(model: GPT, idx: Tensor, targets: Tensor, *, chunk_size: int = 0) -> Tensor:
    """Cross-entropy + COEFFICIENT * mean logsumexp(logits)^2: the formula, written out."""
    logits = model(idx).float().flatten(0, 1)
    return F.cross_entropy(logits,
                           targets.flatten()) + COEFFICIENT * logits.logsumexp(-1).pow(2).mean()


class ZLoss:
    name = "zloss"
    loss_name = "z-loss"

    def check(self, cfg: TrainConfig) -> None:
        pass

    def check_unused(self, cfg: TrainConfig) -> None:
        pass

    def prepare(self, cfg: TrainConfig, model: GPT, context_length: int,
                token_ids: tuple[np.ndarray, np.ndarray] | None, *, dist: Dist, dtype: torch.dtype,
                compile: bool) -> Prepared:
        loaders = text_loaders(cfg, context_length, token_ids, dist=dist)
        return Prepared(*loaders, None, lambda idx, targets, *, chunk_size=0: z_loss(model, idx,
                                                                                     targets))

    def count(self, batches: Iterable[Sequence[Tensor]]) -> int:
        return count_targets(batches)

    def columns(self, cfg, records) -> tuple[str, ...]:
        return metrics.columns(val=("val_log_z",))

    def evaluate(self, run: Run) -> dict[str, float]:
        train_loss, val_loss = (evaluate_loss(run.model, run.eval_loaders[name], loss=run.loss)
                                for name in ("train", "val"))
        x, _ = next(iter(run.eval_loaders["val"]))
        with torch.no_grad():
            log_z = float(run.model(x).float().logsumexp(-1).mean())
        return {"train_loss": train_loss, "val_loss": val_loss, "val_log_z": log_z}

    def accuracy_column(self, columns: Sequence[str]) -> str | None:
        return None

    def describe_row(self, row: dict[str, float]) -> str:
        return metrics.format_row(row, val_note=f"log Z {row['val_log_z']:.2f}")

    def best_line(self, best: float) -> str:
        return f"z-loss {best:.4f}"


@pytest.fixture
def zloss():
    objective = register(ZLoss())
    yield objective
    del OBJECTIVES[objective.name]


def test_an_objective_defined_in_a_test_file_trains_through_train(tmp_path, zloss, capsys) -> None:
    cfg = tiny(tmp_path, objective="zloss", max_steps=8, drop_rate=0.0)
    run = setup(cfg, token_ids=TOKENS)
    x, y = next(iter(run.eval_loaders["train"]))
    with torch.no_grad():  # the step calls the objective's loss: the formula above
        assert float(run.loss(x, y)) == pytest.approx(float(z_loss(run.model, x, y)), rel=1e-6)
    run.lock.release()
    result = train(cfg, token_ids=TOKENS)
    with open(result.run_dir / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == [*metrics.METRICS_COLUMNS[:5], "val_log_z",
                                 *metrics.METRICS_COLUMNS[6:]]
    assert [int(row["step"]) for row in rows] == [0, 4, 8]
    # The z-loss term pulls log Z towards 0 while cross-entropy falls: both move, by a margin.
    assert abs(float(rows[-1]["val_log_z"])) < abs(float(rows[0]["val_log_z"])) - 0.5
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"]) - 0.5
    out = capsys.readouterr().out
    assert "(log Z " in out and f"best validation z-loss {result.best_val_loss:.4f} at step" in out


def test_an_unregistered_objective_is_refused_naming_the_choices(tmp_path) -> None:
    with pytest.raises(ValueError, match="--objective must be one of lm, dpo, grpo, got 'zloss'"):
        setup(tiny(tmp_path, objective="zloss"), token_ids=TOKENS)
    assert not (tmp_path / "run").exists()
