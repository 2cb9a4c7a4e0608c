"""The band of ``innerloop compare`` covers about as often as it says with few windows too (expanded
percentile bootstrap, none below MIN_BAND_WINDOWS); the table gives each model's whole-window
difference with its band; a model of another size or training is named."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from innerloop.train.bootstrap import (
    MIN_BAND_WINDOWS,
    bootstrap_difference,
    expanded_tail,
    regularized_incomplete_beta,
    student_t_cdf,
    student_t_quantile,
)
from innerloop.train.compare import (
    ComparedModel,
    Comparison,
    LengthResult,
    _add_length,
    _shown,
    format_table,
    size_notes,
)

# Student's t quantiles from published tables (to the digits scipy.stats.t.ppf gives)
T_TABLE = [
    (0.975, 1, 12.706204736174694),
    (0.975, 2, 4.302652729749462),
    (0.975, 5, 2.5705818356363146),
    (0.975, 10, 2.228138851986274),
    (0.975, 30, 2.0422724563012378),
    (0.95, 10, 1.8124611228116756),
    (0.995, 3, 5.840909309733355),
    (0.6, 4, 0.2707222947075976),
]


@pytest.mark.parametrize(("probability", "dof", "expected"), T_TABLE)
def test_student_t_quantiles_equal_the_tables(probability, dof, expected) -> None:
    assert student_t_quantile(probability, dof) == pytest.approx(expected, rel=1e-10)
    assert student_t_quantile(1 - probability, dof) == pytest.approx(-expected, rel=1e-10)
    assert student_t_cdf(expected, dof) == pytest.approx(probability, abs=1e-13)


def test_the_incomplete_beta_function_at_closed_forms() -> None:
    for x in (0.0, 0.1, 0.37, 0.5, 0.9, 1.0):
        assert regularized_incomplete_beta(x, 1.0, 1.0) == pytest.approx(x, abs=1e-14)  # uniform
        assert regularized_incomplete_beta(x, 2.0, 1.0) == pytest.approx(x**2, abs=1e-14)
        assert regularized_incomplete_beta(x, 1.0, 3.0) == pytest.approx(1 - (1 - x) ** 3, abs=1e-14)
    # I_x(1/2, 1/2) = (2 / pi) asin(sqrt(x)), the arcsine distribution
    for x in (0.01, 0.3, 0.8, 0.99):
        assert regularized_incomplete_beta(x, 0.5, 0.5) == pytest.approx(
            2 / math.pi * math.asin(math.sqrt(x)), abs=1e-13
        )


def test_the_expanded_tail_is_the_plain_one_for_many_windows_and_narrower_for_few() -> None:
    assert expanded_tail(100_000, 0.95) == pytest.approx(0.025, rel=1e-3)
    assert expanded_tail(6, 0.95) < expanded_tail(30, 0.95) < 0.025
    with pytest.raises(ValueError, match="windows=1 must be an integer >= 2"):
        expanded_tail(1, 0.95)


@pytest.mark.slow  # many bootstrap draws: ~0.3 s a case
@pytest.mark.parametrize("windows", [MIN_BAND_WINDOWS, 8])
def test_a_band_over_few_windows_covers_about_as_often_as_it_says(windows) -> None:
    """The plain percentile band over 6 windows covered a true difference in about 80% of trials for
    90%; the expanded one in about 90%."""
    rng = np.random.default_rng(windows)
    trials, covered = 400, 0
    for trial in range(trials):
        per_window = 0.2 + rng.normal(0, 1.0, size=(windows, 1))
        _, low, high = bootstrap_difference(
            torch.tensor(per_window), torch.ones(windows, 1), 400, 0.9, seed=trial
        )
        covered += bool(low[0] <= 0.2 <= high[0])
    assert 0.85 <= covered / trials <= 0.95


def _model(name: str, parameters: int, tokens: int | None) -> ComparedModel:
    return ComparedModel(name, Path(f"{name}.safetensors"), None, parameters, tokens, None)  # type: ignore[arg-type]


def _comparison(windows: int, caplog) -> Comparison:
    models = [_model("base", 1000, 64), _model("other", 1000, 64)]
    # 1000 resamples: over 20 windows the band's ends (1.59% quantiles) have 15.9 beyond each (500 left 7.9,
    # which few_resamples_note warns of)
    comparison = Comparison(models, 0, [], {}, 0.95, 1000, 0, "test windows")
    generator = torch.Generator().manual_seed(0)
    base = torch.rand(windows, 2, generator=generator, dtype=torch.float64) * 8
    other = base - 0.5 + 0.1 * torch.randn(windows, 2, generator=generator, dtype=torch.float64)
    counts = torch.full((windows, 2), 4.0, dtype=torch.float64)
    result = LengthResult(8, [(0, 4), (4, 8)], torch.stack([base, other]), counts, windows)
    with caplog.at_level(logging.WARNING, logger="innerloop.train.compare"):
        _add_length(comparison, result)
    return comparison


def test_the_table_gives_the_whole_window_difference_with_its_band(caplog) -> None:
    comparison = _comparison(20, caplog)
    assert caplog.records == []
    mean, low, high = comparison.overall[8][1]
    assert low < mean < high < 0  # the other model's loss is 0.5 nats per window lower: 0.0625 per token
    assert mean == pytest.approx(
        float(comparison.lengths[0].loss_sums[1].sum() - comparison.lengths[0].loss_sums[0].sum()) / 160
    )
    table = format_table(comparison)
    assert "| loss - baseline @8 |" in table.splitlines()[0]
    assert f"| {mean:+.4f} ({low:+.4f} to {high:+.4f}) |" in table
    assert "| base (baseline) | 1,000 | 64 | ? | " in table and table.count(" | - |") == 1


def test_too_few_windows_are_warned_about_and_get_no_band(caplog) -> None:
    comparison = _comparison(MIN_BAND_WINDOWS - 1, caplog)
    assert [r.getMessage() for r in caplog.records] == [
        f"T=8: {MIN_BAND_WINDOWS - 1} windows, fewer than the {MIN_BAND_WINDOWS} a 95% band needs to cover "
        "as often as it says: the differences to the baseline have no band (NaN in the CSV); score more "
        "windows (batches, which scores batches x batch_size windows, or more text with paths)"
    ]
    mean, low, high = comparison.overall[8][1]
    assert math.isnan(low) and math.isnan(high) and not math.isnan(mean)
    assert f"| {mean:+.4f} (no band) |" in format_table(comparison)


def test_a_model_of_another_size_or_training_is_named() -> None:
    models = [
        _model("ttt", 118_760, 128),
        _model("attn", 302_720, 384),
        _model("swa", 120_000, 128),
        _model("small", 112_000, 128),
    ]
    assert size_notes(models, 0) == [
        "attn has 302,720 parameters, 2.55x the baseline ttt's 118,760: its difference is also one of size",
        "attn trained on 384 tokens, the baseline ttt on 128: its difference is also one of training",
        "small has 112,000 parameters; the baseline ttt has 6.04% more, 118,760: its difference is also one "
        "of size",  # a share of the smaller count, as the 5% tolerance is (review s48f)
    ]  # swa: 1% more parameters, the same tokens
    assert size_notes([_model("a", 100, None), _model("b", 104, 50)], 0) == []  # within 5%, tokens unknown
    # 5.1% more than the smaller: named whichever of the two is the baseline (review s22 compare LOW)
    pair = [_model("a", 1000, None), _model("b", 1051, None)]
    assert len(size_notes(pair, 0)) == len(size_notes(pair, 1)) == 1


def test_a_note_names_the_default_corpus() -> None:
    """A run without data.paths trained on the default corpus; a note said ``data.paths=[]``."""
    assert _shown("paths", {"name": "text", "paths": []}) == "[] (the default corpus)"
    assert _shown("paths", {"name": "text", "paths": ["a.txt"]}) == "['a.txt']"
    assert _shown("paths", {"name": "hf", "paths": []}) == "[]"  # a Hugging Face dataset: no corpus
    assert _shown("val_fraction", {"name": "text", "paths": [], "val_fraction": 0.1}) == "0.1"


def test_a_bucket_some_windows_do_not_score_still_gets_a_band() -> None:
    """A resample of only the windows without a token of the bucket is 0 / 0: left out of the quantiles
    (torch.quantile gave the whole band NaN). The bucket is scored in 6 of 40 windows, the fewest that get
    a band (s52k: a band needs 6 windows that score the bucket): about 1 resample in 670 draws none of
    them (0.85^40), some 15 of the 10,000 here."""
    counts = torch.zeros(40, 1, dtype=torch.float64)
    counts[:6] = 1  # 34 of the 40 windows score no token of the bucket
    differences = torch.linspace(-1, 1, 40, dtype=torch.float64)[:, None] * counts
    mean, low, high = bootstrap_difference(differences, counts, resamples=10_000)
    assert low.item() < mean.item() < high.item()


def test_a_loss_that_is_not_finite_gets_no_band_in_its_bucket() -> None:
    differences = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    differences[3, 0] = math.inf
    mean, low, high = bootstrap_difference(differences, torch.ones(8, 2), resamples=200)
    assert mean[0].item() == math.inf and math.isnan(low[0]) and math.isnan(high[0])
    assert low[1].item() < high[1].item()  # the other bucket's band is unchanged


@pytest.mark.parametrize("dof", [1e5, 1e6, 3e6, 1e9, 1e20, math.inf])
def test_students_t_for_many_degrees_of_freedom_tends_to_the_normal(dof) -> None:
    """dof / (dof + t^2) rounded to 1: the quantile at 1e20 was 90.5, at inf 4.5e-13 (1.96 both)."""
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.975)
    expected = z + (z**3 + z) / (4 * dof)  # Cornish-Fisher to first order: the rest is below 1e-9 here
    assert student_t_quantile(0.975, dof) == pytest.approx(expected, rel=1e-9)
    assert student_t_cdf(expected, dof) == pytest.approx(0.975, abs=1e-10)


def test_a_tiny_tail_probability_is_not_rounded_to_one() -> None:
    # P(T < -t) = 1e-17 at dof 3: t = 10^(17/3) (3 sqrt 3 / (2 pi))^(1/3) to first order (Cauchy-like tail)
    quantile = student_t_quantile(1e-17, 3)
    assert quantile < -1e5 and student_t_cdf(quantile, 3) == pytest.approx(1e-17, rel=1e-6)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: student_t_quantile(0.975, 0), r"dof=0 must be a number > 0"),
        (lambda: student_t_quantile(0.975, True), r"dof=True must be a number > 0"),
        (lambda: student_t_quantile(1.0, 3), r"probability=1.0 must be a number in \(0, 1\)"),
        (lambda: student_t_quantile(0.975, 0.001), r"past 1e150"),
        (lambda: student_t_cdf(1.0, -2), r"dof=-2 must be a number > 0"),
        (lambda: student_t_cdf(math.nan, 3), r"t=nan must be a number"),
        (lambda: regularized_incomplete_beta(1.5, 1, 1), r"x=1.5 must be a number in \[0, 1\]"),
        (lambda: regularized_incomplete_beta(0.5, -0.5, 1), r"a=-0.5 must be a finite number > 0"),
        (lambda: regularized_incomplete_beta(0.5, 1, math.inf), r"b=inf must be a finite number > 0"),
        (lambda: bootstrap_difference(torch.ones(8, 1), -torch.ones(8, 1)), r"counts must be finite"),
        (lambda: bootstrap_difference(torch.ones(8, 1), torch.ones(8, 1), resamples=2.0), r"resamples=2.0"),
        (
            lambda: bootstrap_difference(torch.ones(8, 1), torch.ones(8, 1), confidence=True),
            r"confidence=True",
        ),
        (lambda: bootstrap_difference(torch.ones(8, 1), torch.ones(8, 1), seed=0.5), r"seed=0.5"),
    ],
)
def test_inputs_out_of_range_are_refused_naming_them(call, match) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_a_bucket_without_tokens_has_a_nan_mean() -> None:
    counts = torch.ones(8, 2)
    counts[:, 1] = 0
    mean, low, high = bootstrap_difference(torch.ones(8, 2), counts)
    assert mean[0].item() == pytest.approx(1.0) and math.isnan(mean[1]) and math.isnan(low[1])


@pytest.mark.parametrize(
    ("arguments", "match"),
    [
        ({"runs_or_checkpoints": "runs/a"}, "a list of one or more run folders"),
        ({"seq_lens": 16}, r"seq_lens must be one or more integers >= 1, got 16"),
        ({"seq_lens": [16.5]}, r"got \[16.5\]"),
        ({"seq_lens": [True]}, r"got \[True\]"),
        ({"baseline": 1}, r"baseline must be a model's name or path, got 1"),
        ({"resamples": 0}, r"resamples must be an integer >= 1, got 0"),
        ({"confidence": 1.5}, r"confidence must be a number in \(0, 1\), got 1.5"),
        ({"seed": "0"}, r"seed must be an integer, got '0'"),
    ],
)
def test_compare_checks_its_arguments_before_loading_anything(arguments, match) -> None:
    from innerloop.config import ConfigError
    from innerloop.train.compare import compare

    call = {"runs_or_checkpoints": ["/nonexistent/run"], **arguments}
    with pytest.raises(ConfigError, match=match):
        compare(**call)


def test_a_baseline_without_parameters_is_no_division_by_zero() -> None:
    assert size_notes([_model("empty", 0, 1), _model("ttt", 100, 1)], 0) == [
        "ttt has 100 parameters, the baseline empty 0: its difference is also one of size"
    ]


def test_the_band_draws_its_resamples_in_chunks_as_one_draw_would() -> None:
    """The picks are drawn 1000 resamples at a time (all at once they took R * W * 8 bytes: 10 GB for
    20,000,000 resamples of 64 windows, a bare allocation error): the band is that of one [R, W] draw from
    the seeded generator, at a count of resamples that is no multiple of 1000; above MAX_RESAMPLES
    (whose means alone would not fit in memory) the count is refused by name."""
    from innerloop.train.bootstrap import MAX_RESAMPLES, bootstrap_difference, expanded_tail

    generator = torch.Generator().manual_seed(5)
    differences = torch.randn(7, 3, dtype=torch.float64, generator=generator)
    counts = torch.randint(1, 5, (7, 3), generator=generator).double()
    mean, low, high = bootstrap_difference(differences, counts, resamples=2500, seed=3)
    picks = torch.randint(7, (2500, 7), generator=torch.Generator().manual_seed(3))
    resampled = differences[picks].sum(1) / counts[picks].sum(1)  # [R, K]
    tail = expanded_tail(7, 0.95)
    want = torch.quantile(resampled, torch.tensor([tail, 1 - tail], dtype=torch.float64), dim=0)
    torch.testing.assert_close(torch.stack([low, high]), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(mean, differences.sum(0) / counts.sum(0), rtol=0, atol=1e-12)
    with pytest.raises(
        ValueError, match=rf"resamples={MAX_RESAMPLES + 1} must be an integer in \[1, {MAX_RESAMPLES}\]"
    ):
        bootstrap_difference(differences, counts, resamples=MAX_RESAMPLES + 1)
