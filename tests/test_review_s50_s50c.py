"""Review s50c: ``innerloop compare`` with one model (no empty difference columns in any output), more
models than colours, and results kept length by length (a failure at a later ``--seq-len`` keeps the
finished ones)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import matplotlib.image
import pytest
import torch

from innerloop.train import compare as compare_module
from innerloop.train.compare import (
    ONE_MODEL_NOTE,
    ComparedModel,
    Comparison,
    LengthResult,
    comparison_csv,
    curve_styles,
    format_table,
    plot_comparison,
)


def _comparison(models: int, seq_lens: tuple[int, ...] = (8,), windows: int = 8) -> Comparison:
    """A comparison of ``models`` made-up models (no weights: the outputs never read them) with seeded
    per-window losses at each of ``seq_lens``."""
    compared = [
        ComparedModel(f"m{i}", Path(f"/runs/m{i}/last.safetensors"), None, 100 + i, None, None)  # type: ignore[arg-type]
        for i in range(models)
    ]
    comparison = Comparison(compared, 0, [], {}, 0.95, 200, 0, "made-up windows")
    generator = torch.Generator().manual_seed(0)
    for seq_len in seq_lens:
        buckets = [(0, seq_len // 2), (seq_len // 2, seq_len)]
        counts = torch.full((windows, 2), seq_len / 2, dtype=torch.float64)
        sums = counts * (3 + torch.rand(models, windows, 2, generator=generator, dtype=torch.float64))
        compare_module._add_length(comparison, LengthResult(seq_len, buckets, sums, counts, windows))
    return comparison


def test_one_model_has_no_difference_column_in_the_table() -> None:
    table = format_table(_comparison(1, (8, 16)), with_context=True)
    assert "loss - baseline" not in table  # the header had an empty column per length, "-" in every row
    assert "(baseline)" not in table and "| - |" not in table
    assert ONE_MODEL_NOTE in table
    header = next(line for line in table.splitlines() if line.startswith("| model"))
    assert header == "| model | params | tokens trained | tok/s in training | ppl @8 | ppl @16 |"
    # Two models keep their difference columns and the baseline's mark.
    two = format_table(_comparison(2, (8, 16)))
    assert "loss - baseline @16" in two and "m0 (baseline)" in two and ONE_MODEL_NOTE not in two


def test_one_model_has_no_difference_columns_in_the_csv() -> None:
    rows = list(csv.DictReader(io.StringIO(comparison_csv(_comparison(1, (8, 16))))))
    assert len(rows) == 4  # 2 lengths x 2 buckets
    assert list(rows[0]) == ["model", "checkpoint", "seq_len", "windows", "start", "end", "loss"]
    two = list(csv.DictReader(io.StringIO(comparison_csv(_comparison(2)))))
    assert list(two[0])[-3:] == ["diff", "diff_low", "diff_high"]


@pytest.mark.slow  # ~1 s: two plots
def test_one_model_plot_has_no_empty_difference_panel(tmp_path) -> None:
    one = matplotlib.image.imread(plot_comparison(tmp_path / "one.png", _comparison(1)))
    two = matplotlib.image.imread(plot_comparison(tmp_path / "two.png", _comparison(2)))
    assert two.shape[:2] == (700, 700)
    assert one.shape[:2] == (450, 700)  # the curves alone: no "difference to the baseline" panel


def test_every_curve_has_its_own_style_past_the_colours() -> None:
    for models, colours in ((11, 10), (45, 10), (3, 1), (200, 10)):
        styles = [tuple(sorted(s.items())) for s in curve_styles(models, colours)]
        distinct = min(models, colours * 4 * 8)
        assert len(set(styles)) == distinct, (models, colours)


@pytest.mark.slow  # ~1 s: a plot of 12 models
def test_more_models_than_colours_are_told_apart_in_the_plot(tmp_path, monkeypatch) -> None:
    import matplotlib.pyplot as plt

    figures = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), real_close(fig)))
    plot_comparison(tmp_path / "many.png", _comparison(12))
    curves = figures[0].axes[0].get_lines()
    styles = {(str(c.get_color()), c.get_linestyle(), str(c.get_marker())) for c in curves}
    assert len(curves) == 12 and len(styles) == 12  # models 0 and 10 shared colour, line and marker
    differences = figures[0].axes[1].get_lines()[1:]  # after the zero line
    assert len({(str(c.get_color()), c.get_linestyle()) for c in differences}) == 11
