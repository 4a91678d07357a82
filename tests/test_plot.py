import pytest
from matplotlib import colormaps
from matplotlib.colors import to_rgba
from matplotlib.image import imread

from gpt.base.plot import plot_losses, plot_token_losses

EPOCHS = [0.0, 0.5, 1.0, 1.5, 2.0]
TRAIN = [10.9, 7.0, 5.5, 4.6, 4.0]
VAL = [10.9, 7.2, 6.0, 5.8, 5.9]


def test_writes_a_png_with_both_curves_both_axes_and_the_best_point(tmp_path) -> None:
    path = tmp_path / "loss.png"
    fig = plot_losses(EPOCHS, TRAIN, VAL, path, tokens_per_epoch=1000, best_index=3, title="run")
    assert imread(path).shape[:2] == (480, 800)
    assert [p.name for p in tmp_path.iterdir()] == ["loss.png"]  # no temporary file left behind
    ax = fig.axes[0]
    assert ax.get_xlabel() == "epochs" and "loss" in ax.get_ylabel() and ax.get_yscale() == "linear"
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert labels == ["train loss", "validation loss", "best validation loss 5.800"]
    star = ax.get_lines()[2]
    assert (list(star.get_xdata()), list(star.get_ydata())) == ([1.5], [5.8])
    top = next(child for child in ax.child_axes if child.get_xlabel() == "tokens seen")
    # The top axis is the bottom one in tokens: 1.5 epochs of 1000 tokens = 1500 tokens.
    assert top.get_xlim() == pytest.approx(tuple(x * 1000 for x in ax.get_xlim()))


def test_log_scale(tmp_path) -> None:
    fig = plot_losses(EPOCHS, TRAIN, VAL, tmp_path / "loss.png", tokens_per_epoch=1000,
                      log_scale=True)
    assert fig.axes[0].get_yscale() == "log"
    assert len(fig.axes[0].get_lines()) == 2  # no best point asked for


def test_a_failed_write_keeps_the_previous_png(tmp_path, monkeypatch) -> None:
    path = tmp_path / "loss.png"
    plot_losses(EPOCHS, TRAIN, VAL, path, tokens_per_epoch=1000)
    before = path.read_bytes()

    def crash(self, out, **kwargs):  # killed halfway through writing the PNG
        out.write(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr("matplotlib.figure.Figure.savefig", crash)
    with pytest.raises(KeyboardInterrupt):
        plot_losses(EPOCHS, TRAIN, [v - 1 for v in VAL], path, tokens_per_epoch=1000)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["loss.png"]


def test_token_plot_colours_each_token_by_its_loss_on_the_colour_bar_scale(tmp_path) -> None:
    tokens, losses = ["Every", " effort", " moves", " you", ".\n", "Next"], [9.0, 0.5, 3.0, 6.0,
                                                                             1.5]
    fig = plot_token_losses(tokens, losses, tmp_path / "tokens.png", title="mean 4.0")
    assert imread(tmp_path / "tokens.png").shape[2] in (3, 4)
    assert [p.name for p in tmp_path.iterdir()] == ["tokens.png"]
    ax, bar = fig.axes[0], fig.axes[1]
    assert [t.get_text() for t in ax.texts] == ["Every", " effort", " moves", " you", ".↵", "Next"]
    boxes = ax.patches
    assert to_rgba(boxes[0].get_facecolor()) == to_rgba("white")  # nothing predicts the first token
    assert bar.get_xlim() == (0.0, 9.0)  # the colour bar runs from 0 to the highest loss
    assert "the first token is white: nothing before it predicts it" in bar.get_xlabel()
    for box, loss in zip(boxes[1:], losses, strict=True):
        assert box.get_facecolor() == pytest.approx(colormaps["YlOrRd"](loss / 9.0))
    # Each box is as wide as its token, side by side; the newline starts the next line.
    assert [(b.get_x(), b.get_width()) for b in boxes[:5]] == [(0, 5), (5, 7), (12, 6), (18, 4),
                                                               (22, 2)]
    assert boxes[5].get_x() == 0 and boxes[5].get_y() > boxes[4].get_y()
    assert "loss" in bar.get_xlabel()


def test_token_plot_wraps_long_text_at_the_line_width(tmp_path) -> None:
    tokens = [" word"] * 40  # 200 characters: three lines of 80
    fig = plot_token_losses(tokens, [1.0] * 39, tmp_path / "tokens.png")
    rows = sorted({box.get_y() for box in fig.axes[0].patches})
    assert len(rows) == 3
    assert max(box.get_x() + box.get_width() for box in fig.axes[0].patches) <= 80
