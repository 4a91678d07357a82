"""Loss curves as a PNG: train and validation loss against epochs (bottom) and tokens seen (top).

Drawn on matplotlib's Agg canvas through the object-oriented API (`Figure`, not `pyplot`), so it needs
no display, changes no global backend and keeps no figure alive between calls. The file is written to
a temporary name and renamed (`gpt.atomic`), so a viewer (or a kill) never sees half a PNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, FormatStrFormatter
from numpy.typing import ArrayLike

from gpt.atomic import atomic_file


def plot_losses(epochs: Sequence[float], train_losses: Sequence[float], val_losses: Sequence[float],
                path: Path, *, tokens_per_epoch: int, best_index: int | None = None,
                log_scale: bool = False, title: str | None = None) -> Figure:
    """Write the loss curves to `path` (PNG), replacing it atomically; return the figure (to show it
    in a notebook, or inspect it).

    `epochs[i]` is how far training was (in epochs, fractional) when `train_losses[i]` and
    `val_losses[i]` were measured; the top axis shows the same positions in tokens seen, which grow
    by `tokens_per_epoch` per epoch. `best_index` marks the point with the best validation loss.
    """
    fig = Figure(figsize=(8, 4.8))
    # Fixed margins that fit the labels of both x axes and a title: half the time of an automatic
    # ("constrained") layout, which matters when the plot is redrawn at every evaluation.
    fig.subplots_adjust(left=0.08, right=0.97, bottom=0.11, top=0.82)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(epochs, train_losses, marker=".", label="train loss")
    ax.plot(epochs, val_losses, marker=".", linestyle="--", label="validation loss")
    if best_index is not None:
        ax.plot(epochs[best_index], val_losses[best_index], marker="*", markersize=16, color="tab:red",
                linestyle="none", label=f"best validation loss {val_losses[best_index]:.3f}")
    ax.set_xlabel("epochs")
    ax.set_ylabel("cross-entropy loss (log scale)" if log_scale else "cross-entropy loss")
    if log_scale:
        ax.set_yscale("log")
        for axis_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis_formatter(FormatStrFormatter("%g"))  # 4, 5, 6 ... rather than 4×10⁰
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right")
    def to_tokens(epochs: ArrayLike) -> np.ndarray:
        return np.asarray(epochs) * tokens_per_epoch

    def to_epochs(tokens: ArrayLike) -> np.ndarray:
        return np.asarray(tokens) / tokens_per_epoch

    top = ax.secondary_xaxis("top", functions=(to_tokens, to_epochs))
    top.set_xlabel("tokens seen")
    top.xaxis.set_major_formatter(EngFormatter(sep=""))  # 1.2M, not 1200000
    if title:
        ax.set_title(title)
    with atomic_file(Path(path)) as out:
        fig.savefig(out, format="png", dpi=100)
    return fig
