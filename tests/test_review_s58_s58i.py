"""Review s58i: per-run costs of the loss-by-position plot and of ``innerloop generate``."""

from __future__ import annotations

import matplotlib
import matplotlib.pyplot as plt

from innerloop.train.plots import plot_loss_by_position


# review s58i (MED, fixed): plot_loss_by_position (every train/eval, in-process too) called
# matplotlib.use("Agg"), which switched a notebook's backend and closed every figure it had open
def test_a_plot_leaves_the_backend_and_the_open_figures_alone(tmp_path):
    before = matplotlib.get_backend()
    try:
        plt.switch_backend("svg")
        mine = plt.figure()
        png = plot_loss_by_position(tmp_path / "loss.png", [(0, 4), (4, 8)], [2.0, 1.5])
        assert png.read_bytes().startswith(b"\x89PNG")
        assert matplotlib.get_backend() == "svg"
        assert plt.fignum_exists(mine.number)
    finally:
        plt.close("all")
        plt.switch_backend(before)


def test_the_plot_draws_the_figure_once(tmp_path, monkeypatch):
    """tight_layout left a placeholder layout engine that made savefig draw the figure twice."""
    from matplotlib.figure import Figure

    draws = []
    real = Figure.draw
    monkeypatch.setattr(Figure, "draw", lambda self, renderer: (draws.append(1), real(self, renderer))[1])
    plot_loss_by_position(tmp_path / "loss.png", [(0, 4), (4, 8)], [2.0, 1.5])
    assert len(draws) == 1
