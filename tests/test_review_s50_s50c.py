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
from lm_testing import untrained_run

from innerloop.cli import main
from innerloop.data.text import DataError
from innerloop.train import compare as compare_module
from innerloop.train.compare import (
    ONE_MODEL_NOTE,
    ComparedModel,
    Comparison,
    LengthProgress,
    LengthResult,
    compare,
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
    figures = []
    real_save = compare_module.save_png
    monkeypatch.setattr(
        compare_module, "save_png", lambda path, fig: (figures.append(fig), real_save(path, fig))[1]
    )
    plot_comparison(tmp_path / "many.png", _comparison(12))
    curves = figures[0].axes[0].get_lines()
    styles = {(str(c.get_color()), c.get_linestyle(), str(c.get_marker())) for c in curves}
    assert len(curves) == 12 and len(styles) == 12  # models 0 and 10 shared colour, line and marker
    differences = figures[0].axes[1].get_lines()[1:]  # after the zero line
    assert len({(str(c.get_color()), c.get_linestyle()) for c in differences}) == 11


SEQ_LEN = 16
_EVALUATE_LENGTH = compare_module._evaluate_length  # as it is, before a test replaces it
TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(120))


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    """Two untrained run folders (a TTT and a sliding-window model) reading the same text."""
    corpus = tmp_path / "corpus.py"
    corpus.write_text(TEXT)
    return [
        untrained_run(tmp_path / name, corpus, mixer, seed, SEQ_LEN, 3, 2)
        for name, mixer, seed in (("ttt", "ttt", 0), ("swa", "swa", 1))
    ]


def _scored_lengths(monkeypatch, fail_at: int | None = None) -> list[int]:
    """The lengths compare scores from now on (``fail_at``: Ctrl-C when it starts scoring that one)."""
    scored: list[int] = []
    real = _EVALUATE_LENGTH

    def evaluate(models, inputs, *args):
        if inputs.shape[1] == fail_at:
            raise KeyboardInterrupt
        scored.append(inputs.shape[1])
        return real(models, inputs, *args)

    monkeypatch.setattr(compare_module, "_evaluate_length", evaluate)
    return scored


@pytest.mark.slow  # ~2 s: a comparison at two lengths, interrupted, then run again
def test_ctrl_c_at_the_second_length_keeps_the_first_and_a_rerun_reuses_it(
    runs, tmp_path, monkeypatch, capsys
) -> None:
    out = tmp_path / "out"
    command = ["compare", *map(str, runs), "--seq-len", "16", "24", "--out", str(out), "--resamples", "50"]
    scored = _scored_lengths(monkeypatch, fail_at=24)
    assert main(command) == 130
    assert scored == [16]
    said = capsys.readouterr().err
    tables = sorted(out.glob("compare-*.md"))
    assert len(tables) == 1 and tables[0].name.endswith("-partial.md")
    assert f"the comparison at T=16 (the lengths finished) is in {tables[0]}" in said
    assert "the scores of 1 finished length are kept in" in said
    kept = tables[0].read_text()
    assert kept.startswith("Partial: the lengths finished before 1 length more, still to come.")
    assert "ppl @16" in kept and "@24" not in kept and "loss - baseline @16" in kept
    assert tables[0].with_suffix(".csv").is_file() and tables[0].with_suffix(".png").is_file()
    assert len(list(out.glob("compare-scores-*.safetensors"))) == 1
    partial_rows = tables[0].with_suffix(".csv").read_text().splitlines()[1:]
    # Run again: T=16 is not scored again, and the whole comparison is what a fresh run writes.
    scored = _scored_lengths(monkeypatch)
    assert main(command) == 0
    assert scored == [24]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) == 3 and not any(n.startswith("compare-scores") for n in files)  # the steps removed
    final = (out / next(n for n in files if n.endswith(".csv"))).read_text().splitlines()
    assert [row for row in final if ",16,6," in row] == partial_rows  # the reused scores, the same numbers
    assert len(final) == 1 + 2 * 2 * 4  # two models, two lengths, four buckets


@pytest.mark.slow  # ~0.5 s: two models loaded
def test_a_length_the_text_is_too_short_for_fails_before_any_model_is_scored(runs, monkeypatch) -> None:
    scored = _scored_lengths(monkeypatch)
    with pytest.raises(
        DataError, match="one window of seq_lens=100000, which needs 100001"
    ):  # from Python (s51a)
        compare(runs, seq_lens=[16, 100000])
    assert scored == []  # T=16 was scored first, then thrown away


def test_damaged_or_misshapen_kept_scores_are_scored_again(tmp_path, caplog) -> None:
    from safetensors.torch import save_file

    progress = LengthProgress(tmp_path)
    inputs = torch.zeros(6, 8, dtype=torch.long)
    progress.scores_path("damaged").write_bytes(b"not a safetensors file")
    assert progress.reused("damaged", 2, inputs, 2) is None
    assert "cannot be read" in caplog.text
    save_file({"loss_sums": torch.zeros(3, 6, 2), "counts": torch.ones(6, 2)}, progress.scores_path("other"))
    assert progress.reused("other", 2, inputs, 2) is None  # three models' scores, two models compared
    assert "of another shape" in caplog.text
    save_file({"loss_sums": torch.ones(2, 6, 2), "counts": torch.ones(6, 2)}, progress.scores_path("fits"))
    result = progress.reused("fits", 2, inputs, 2)
    assert result is not None and result.loss_sums.dtype == torch.float64 and result.windows == 6
    progress.finish()
    assert not progress.scores_path("fits").exists()  # superseded once the comparison is written
    assert progress.scores_path("other").exists()  # not this comparison's: left alone


@pytest.mark.slow  # ~0.5 s: two models loaded
def test_the_scores_key_changes_with_what_the_scores_depend_on(runs, monkeypatch) -> None:
    models = [compare_module.load_compared_model(r / "last.safetensors", r.name, False) for r in runs]
    inputs = torch.arange(48).reshape(3, 16) % 7
    key = compare_module.length_key(models, inputs, inputs, 3, 4)
    assert key == compare_module.length_key(models, inputs.clone(), inputs.clone(), 3, 4)
    others = [
        compare_module.length_key(models[::-1], inputs, inputs, 3, 4),  # another order
        compare_module.length_key(models, inputs + 1, inputs, 3, 4),  # other tokens
        compare_module.length_key(models, inputs, inputs, 1, 4),  # another batch size
        compare_module.length_key(models, inputs, inputs, 3, 2),  # other buckets
    ]
    models[0].no_ttt = True
    others.append(compare_module.length_key(models, inputs, inputs, 3, 4))
    models[0].no_ttt = False
    assert compare_module.length_key(models, inputs, inputs, 3, 4) == key
    monkeypatch.setattr(torch, "__version__", "0.0.1")  # another torch installed since
    others.append(compare_module.length_key(models, inputs, inputs, 3, 4))
    assert len({key, *others}) == 7


def test_a_name_with_a_pipe_keeps_the_table_s_columns() -> None:
    comparison = _comparison(2)
    comparison.models[1].name = "exp|ttt"  # a run folder's name may hold '|', Markdown's cell separator
    rows = [
        line for line in format_table(comparison).splitlines() if line.startswith("| m0") or "ttt" in line
    ]
    cells = [len(row.replace("\\|", "").split("|")) for row in rows]
    assert len(rows) == 2 and cells[0] == cells[1], rows


@pytest.mark.slow  # ~1.5 s: a comparison at one length, stopped while writing its files, then run again
def test_ctrl_c_while_the_files_are_written_keeps_the_scores(runs, tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "out"
    command = ["compare", *map(str, runs), "--out", str(out), "--resamples", "50"]
    scored = _scored_lengths(monkeypatch)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(compare_module, "write_comparison", interrupted)
        assert main(command) == 130
    assert scored == [16]
    said = capsys.readouterr()
    assert "ppl @16" in said.out  # the table was printed
    assert f"the scores of 1 finished length are kept in {out}" in said.err
    assert main(command) == 0
    assert scored == [16]  # not scored again
    assert len(list(out.iterdir())) == 3
