"""TensorBoard event files for a run: `tensorboard --logdir runs` shows its curves live.

Optional: it needs the `tensorboard` package (`pip install -e ".[tb]"`), imported only when a run
asks for it. The events are written next to metrics.csv in the run directory, which stays the record
(loss.png is still drawn from it); TensorBoard is a second view of the same rows.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from gpt.base.errors import UserError


def require_tensorboard() -> Any:
    """torch's `SummaryWriter`, or a `UserError` saying which extra to install (checked before a run
    starts, so a missing package never stops one halfway)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package; install it with "
                        'pip install -e ".[tb]"') from None
    return SummaryWriter


class TensorBoardLog:
    """One scalar per metric per evaluation, tagged with the metric's metrics.csv column name."""

    def __init__(self, run_dir: Path, purge_step: int | None = None) -> None:
        """`purge_step`: when a resumed run continues from step T, pass T + 1; events the earlier
        process logged from step T + 1 on (now to be taken again) are dropped, as metrics.csv drops
        its rows."""
        self.writer = require_tensorboard()(log_dir=str(run_dir), purge_step=purge_step)

    def log(self, step: int, row: dict[str, float]) -> None:
        """Write every value of `row` but the step itself at `step`, and flush, so a running
        TensorBoard sees it now. NaN values (no learning rate before the first step) are left
        out."""
        for name, value in row.items():
            if name != "step" and not math.isnan(value):
                self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def __enter__(self) -> TensorBoardLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close on leaving a `with` block, however it is left (the end, Ctrl-C, an error)."""
        self.close()
