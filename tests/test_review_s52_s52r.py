"""Review s52r: s52i (plugin checks blame the plugin) and s52k (bootstrap bands per position bucket).

s52k counted, per bucket, the windows that score a token of it; these tests hold its siblings to the same
rule: science.py growth's band over the two halves of the positions, and compare's warning."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import torch
from benchmark_testing import benchmark_script

from innerloop.train import compare as compare_module
from innerloop.train.compare import ComparedModel, Comparison, LengthResult, _add_length


def _second_half_scored_in(windows: int, holding: int) -> LengthResult:
    """Two models on ``windows`` windows of 16 positions in 4 buckets; the second half (buckets 2, 3) is
    scored in the first ``holding`` windows only (the rest unscored there, as padding leaves them)."""
    generator = torch.Generator().manual_seed(3)
    counts = torch.full((windows, 4), 4.0, dtype=torch.float64)
    counts[holding:, 2:] = 0
    sums = torch.rand(2, windows, 4, generator=generator, dtype=torch.float64) * counts
    return LengthResult(16, [(0, 4), (4, 8), (8, 12), (12, 16)], sums, counts, windows)


def _growth(monkeypatch, result: LengthResult) -> str:
    models = [ComparedModel(n, Path(n), None, 1, None, None) for n in ("ttt", "swa")]  # type: ignore[arg-type]
    fake = Comparison(models, 1, [result], {}, 0.95, 1000, 0, "test windows")
    monkeypatch.setattr(compare_module, "compare", lambda *args, **kwargs: fake)
    return benchmark_script("science").advantage_growth("ttt", "swa", None, resamples=400)


def test_growth_claims_no_band_for_a_half_scored_in_too_few_windows(monkeypatch) -> None:
    """science.py growth counted every window read (20) for its MIN_BAND_WINDOWS rule and its expanded
    tail, as compare did before s52k: a second half scored in 3 of 20 windows got a band, and the resamples
    that drew none of those 3 (0 / 0, NaN) made torch.quantile print '[+nan, +nan]'. Now the windows that
    score each half are counted: no band below MIN_BAND_WINDOWS of them."""
    line = _growth(monkeypatch, _second_half_scored_in(20, 3))
    assert "nan" not in line, line
    assert "no band: the second half is scored in 3 windows" in line, line


def test_growth_bands_a_half_scored_in_enough_windows_at_their_tail(monkeypatch) -> None:
    """A second half scored in 8 of 20 windows gets a finite band (nanquantile: a resample holding none of
    the 8 is left out, not NaN for the whole band), its rough-band note counting those 8 windows."""
    line = _growth(monkeypatch, _second_half_scored_in(20, 8))
    band = re.search(r"\[([+-][0-9.]+), ([+-][0-9.]+)\]", line)
    assert band is not None and "nan" not in line, line
    assert "over 8 windows" in line, line


def test_compare_warns_of_a_bucket_without_a_band_though_the_length_has_windows_enough(caplog) -> None:
    """docs/training.md: below 6 windows (counted per position bucket) no band is claimed, 'NaN in the
    CSV ... and a warning saying how to score more windows'. s52k made a bucket scored in 3 of 20 windows
    NaN, but the warning looked at the 20 windows read: the CSV's NaN came with no word why."""
    result = _second_half_scored_in(20, 3)
    comparison = Comparison([None, None], 0, [], {}, 0.95, 200, 0, "")  # type: ignore[list-item]
    with caplog.at_level(logging.WARNING, logger=compare_module.log.name):
        _add_length(comparison, result)
    assert math.isnan(float(comparison.bands[16][1][1][2]))  # the bucket has no band (NaN) ...
    warned = [r.getMessage() for r in caplog.records]
    assert any(
        "positions 8-15" in m and "no band" in m and "as few as 3 of the 20 windows" in m for m in warned
    ), warned
