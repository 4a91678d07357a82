import pytest
from matplotlib.image import imread

from gpt.plot import plot_losses

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
    fig = plot_losses(EPOCHS, TRAIN, VAL, tmp_path / "loss.png", tokens_per_epoch=1000, log_scale=True)
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
