"""Losses as PNG pictures: the training curves (`plot_losses`) and a text coloured by loss per
token.

Drawn on matplotlib's Agg canvas through the object-oriented API (`Figure`, not `pyplot`), so it
needs no display, changes no global backend and keeps no figure alive between calls. The file is
written to a temporary name and renamed (`gpt.base.atomic`), so a viewer (or a kill) never sees half
a PNG.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import EngFormatter, FormatStrFormatter
from numpy.typing import ArrayLike

from gpt.base.atomic import atomic_file


def plot_losses(epochs: Sequence[float], train_losses: Sequence[float], val_losses: Sequence[float],
                path: Path, *, tokens_per_epoch: int, best_index: int | None = None,
                log_scale: bool = False, title: str | None = None, loss_name: str = "cross-entropy "
                                                                                    "loss",
                accuracy: Sequence[float] | None = None, accuracy_name: str = "reward accuracy",
                panels: Mapping[str, Mapping[str, Sequence[float]]] | None = None) -> Figure:
    """Write the loss curves to `path` (PNG), replacing it atomically; return the figure (to show it
    in a notebook, or inspect it).

    `epochs[i]` is how far training was (in epochs, fractional) when `train_losses[i]` and
    `val_losses[i]` were measured; the top axis shows the same positions in tokens seen, which grow
    by `tokens_per_epoch` per epoch. `best_index` marks the point with the best validation loss.
    `loss_name` labels the loss axis; `accuracy` (a share in [0, 1]: a DPO run's reward accuracy, a
    fine-tuning run's exact match), called `accuracy_name`, is drawn against a second axis on the
    right. `panels` are drawn below the losses, on the same epochs: {axis label: {curve label:
    values}} (a DPO run's log-probabilities of the chosen and the rejected responses).
    """
    panels = panels or {}
    height = 4.8 + PANEL_HEIGHT * len(panels)
    fig = Figure(figsize=(8, height))
    # Fixed margins (in inches, as a 4.8-inch plot's) that fit the labels of both x axes and a
    # title: half the time of an automatic ("constrained") layout, which matters when the plot is
    # redrawn at every evaluation.
    fig.subplots_adjust(left=0.1 if panels else 0.08, right=0.97 if accuracy is None else 0.91,
                        bottom=0.53 / height, top=1 - 0.86 / height, hspace=0.12 * (1
                                                                                    + len(panels)))
    FigureCanvasAgg(fig)
    ax, *below = fig.subplots(1 + len(panels), 1, sharex=True, squeeze=False,
                              height_ratios=[3.41] + [PANEL_HEIGHT - 0.6] * len(panels))[:, 0]
    ax.plot(epochs, train_losses, marker=".", label="train loss")
    ax.plot(epochs, val_losses, marker=".", linestyle="--", label="validation loss")
    if best_index is not None:
        ax.plot(epochs[best_index], val_losses[best_index], marker="*", markersize=16,
                color="tab:red",
                linestyle="none", label=f"best validation loss {val_losses[best_index]:.3f}")
    (below[-1] if below else ax).set_xlabel("epochs")
    _draw_panels(below, epochs, panels)
    ax.set_ylabel(f"{loss_name} (log scale)" if log_scale else loss_name)
    if log_scale:
        ax.set_yscale("log")
        for axis_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis_formatter(FormatStrFormatter("%g"))  # 4, 5, 6 ... rather than 4×10⁰
    ax.grid(True, alpha=0.3)
    handles = ax.get_legend_handles_labels()[0]
    if accuracy is not None:
        right = ax.twinx()
        handles += right.plot(epochs, accuracy, marker=".", linestyle=":", color="tab:green",
                              label=f"validation {accuracy_name}")
        right.set_ylim(-0.03, 1.03)
        right.set_ylabel(accuracy_name)
    ax.legend(handles=handles, loc="upper right")
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


PANEL_HEIGHT = 2.2
"""Inches a panel under the losses adds to `plot_losses`' picture."""


def _draw_panels(axes: Sequence[Axes], epochs: Sequence[float],
                 panels: Mapping[str, Mapping[str, Sequence[float]]]) -> None:
    """Each of `panels` ({axis label: {curve label: values}}) on its own axes, below the losses."""
    for panel_ax, (name, curves) in zip(axes, panels.items(), strict=True):
        for label, values in curves.items():
            panel_ax.plot(epochs, values, marker=".", label=label)
        panel_ax.set_ylabel(name)
        panel_ax.grid(True, alpha=0.3)
        panel_ax.legend(loc="best", fontsize="small")


COLUMNS = 80
"""Characters per line of `plot_token_losses`' text; a longer token is cut short with an ellipsis.
"""
FONT_SIZE = 11
# inches: the advance of a DejaVu Sans Mono character (0.602 em)
CHAR_WIDTH = 0.602 * FONT_SIZE / 72
LINE_HEIGHT = 1.6 * FONT_SIZE / 72  # inches


def plot_token_losses(tokens: Sequence[str], losses: Sequence[float], path: Path, *,
                      title: str | None = None) -> Figure:
    """Write `tokens` to `path` (PNG) as text, each token on a background coloured by its loss, with
    a colour bar; return the figure.

    `losses[i]` is the loss of predicting `tokens[i + 1]` (so there is one loss fewer than tokens):
    the first token, which nothing predicts, has a white background. The text is set in a monospaced
    font on a grid of `COLUMNS` characters, so each token's box is exactly as wide as its
    characters; a newline is drawn as ↵ and starts a new line, a tab as →.
    """
    if len(losses) != len(tokens) - 1:
        raise ValueError(f"plot_token_losses: {len(tokens)} tokens take {len(tokens) - 1} losses, "
                         f"got {len(losses)}")
    cells = _layout(tokens)
    lines = 1 + max(row for row, _, _ in cells)
    cmap, norm = colormaps["YlOrRd"], Normalize(vmin=0.0, vmax=max(max(losses, default=0.0), 1e-9))
    text_height, bar_height, title_height = lines * LINE_HEIGHT, 0.9, 0.4 if title else 0.1
    width, height = COLUMNS * CHAR_WIDTH + 0.4, text_height + bar_height + title_height
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.2 / width, bar_height / height, COLUMNS * CHAR_WIDTH / width,
                       text_height / height))
    ax.set_xlim(0, COLUMNS)
    ax.set_ylim(lines, 0)  # line 0 at the top
    ax.set_axis_off()
    for i, (row, column, text) in enumerate(cells):
        color = cmap(norm(losses[i - 1])) if i else (1.0, 1.0, 1.0, 1.0)
        # A thin white edge shows where one token ends and the next begins, even in the same colour.
        ax.add_patch(Rectangle((column, row + 0.05), len(text), 0.9, facecolor=color,
                               edgecolor="white",
                               linewidth=0.8))
        dark = i > 0 and norm(losses[i - 1]) > 0.6  # dark red: white letters stay readable
        ax.text(column, row + 0.5, text, fontsize=FONT_SIZE, family="DejaVu Sans Mono", va="center",
                ha="left", color="white" if dark else "black")
    bar_ax = fig.add_axes((0.2 / width, 0.45 / height, COLUMNS * CHAR_WIDTH / width, 0.15 / height))
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=bar_ax, orientation="horizontal",
                 label="loss of the token = -log p(token | the text before it), nats; the first "
                       "token is white: nothing before it predicts it")
    if title:
        fig.suptitle(title, y=1 - 0.1 / height, va="top")
    with atomic_file(Path(path)) as out:
        fig.savefig(out, format="png", dpi=100)
    return fig


def _layout(tokens: Sequence[str]) -> list[tuple[int, int, str]]:
    """(line, column, text shown) of each token, in order, on lines of `COLUMNS` characters: a token
    that does not fit its line starts the next one, and a newline in a token ends the line."""
    cells, row, column = [], 0, 0
    for token in tokens:
        shown = token.replace("\n", "↵").replace("\t", "→")
        if len(shown) > COLUMNS:
            shown = shown[:COLUMNS - 1] + "…"
        if column + len(shown) > COLUMNS:
            row, column = row + 1, 0
        cells.append((row, column, shown))
        column += len(shown)
        if "\n" in token:
            row, column = row + token.count("\n"), 0
    return cells
