"""Loss by position: CSV and PNG (matplotlib, Agg backend), both written atomically (a leading ``~`` in
a path is the home folder, :func:`~innerloop.core.functional.user_path`)."""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from innerloop.core.functional import check_path_argument, user_path
from innerloop.data.atomic import atomic_write, atomic_write_text


def write_loss_by_position_csv(
    path: str | os.PathLike[str], buckets: Sequence[tuple[int, int]], losses: Sequence[float]
) -> Path:
    """Rows ``start,end,loss`` (positions ``[start, end)``; loss in nats per token)."""
    if len(buckets) != len(losses):
        raise ValueError(f"{len(buckets)} buckets but {len(losses)} losses")
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["start", "end", "loss"])
    for (start, end), loss in zip(buckets, losses, strict=True):
        writer.writerow([start, end, f"{loss:.6f}"])
    return atomic_write_text(user_path(path), text.getvalue())  # '~' is the home folder, not ./~


def read_loss_by_position_csv(path: str | os.PathLike[str]) -> tuple[list[tuple[int, int]], list[float]]:
    """Inverse of :func:`write_loss_by_position_csv`."""
    check_path_argument(path)  # open(3) reads, then closes, file descriptor 3
    with open(user_path(path), newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [(int(r["start"]), int(r["end"])) for r in rows], [float(r["loss"]) for r in rows]


def plot_loss_by_position(
    path: str | os.PathLike[str],
    buckets: Sequence[tuple[int, int]],
    losses: Sequence[float],
    title: str = "Validation loss by position in the context",
    label: str | None = None,
) -> Path:
    """Plot the mean loss of each position bucket (x: the bucket's middle position) to a PNG."""
    middles = [(start + end - 1) / 2 for start, end in buckets]
    points = [(x, y) for x, y in zip(middles, losses, strict=True) if not math.isnan(y)]
    fig, ax = new_figure((6, 4))
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xlabel("position in the context (bucket middle)")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if label:
        ax.legend()
    return save_png(user_path(path), fig)


def new_figure(figsize: tuple[float, float], rows: int = 1, **subplots: Any) -> tuple[Any, Any]:
    """A matplotlib ``Figure`` on its own Agg canvas and its axes (``Figure.subplots(rows, 1,
    **subplots)``). Not pyplot's: the process's backend and its open figures (a notebook's) are left
    as they were, where ``matplotlib.use("Agg")`` switched the backend and closed every open figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100, layout="none")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, 1, **subplots)


def save_png(path: Path, fig: Any) -> Path:
    """Lay ``fig`` out (``tight_layout``) and write it to ``path`` as a 100-dpi PNG, atomically, drawing
    it once: ``tight_layout`` leaves a placeholder layout engine that made ``savefig`` draw the whole
    figure a second time (text layout and ticks, without pixels) before the real draw."""
    import matplotlib

    fig.tight_layout()
    with matplotlib.rc_context({"figure.autolayout": False, "figure.constrained_layout.use": False}):
        fig.set_layout_engine(None)  # no engine at all (None reads these two rcParams): one draw
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
