"""Review s52k: fair comparisons -- the bootstrap band of ``innerloop compare`` where a position bucket
holds scored tokens in only some of the windows (padded or partly unscored windows)."""

from __future__ import annotations

import math

import pytest
import torch

from innerloop.train.bootstrap import MIN_BAND_WINDOWS, bootstrap_difference
from innerloop.train.compare import Comparison, LengthResult, _add_length


def _bucket_scored_in(windows: int, holding: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[windows, 2]`` differences and counts: bucket 0 scored in every window, bucket 1 in the first
    ``holding`` windows only (the rest unscored there, as padding leaves them)."""
    generator = torch.Generator().manual_seed(7)
    counts = torch.full((windows, 2), 10.0, dtype=torch.float64)
    counts[holding:, 1] = 0
    differences = torch.randn(windows, 2, generator=generator, dtype=torch.float64) + 0.5
    differences[holding:, 1] = 0
    return differences, counts


def test_a_bucket_scored_in_one_window_gets_no_band_not_one_of_no_width() -> None:
    """A bucket scored in 1 of 20 windows had the band [mean, mean] (every resample holding that window
    gives the same ratio): certainty from one window. It gets no band (NaN), as a comparison of fewer
    than MIN_BAND_WINDOWS windows does; the bucket scored everywhere keeps its band."""
    differences, counts = _bucket_scored_in(20, 1)
    mean, low, high = bootstrap_difference(differences, counts)
    assert math.isclose(float(mean[1]), float(differences[0, 1]) / 10, rel_tol=1e-12)
    assert math.isnan(float(low[1])) and math.isnan(float(high[1]))
    assert float(low[0]) < float(mean[0]) < float(high[0])


def test_the_band_needs_min_band_windows_holding_tokens_of_the_bucket() -> None:
    """The rule 'no band below MIN_BAND_WINDOWS windows' counts the windows that score a token of the
    bucket, not all windows read: 5 of 20 give none, 6 of 20 give one."""
    for holding, banded in ((MIN_BAND_WINDOWS - 1, False), (MIN_BAND_WINDOWS, True)):
        differences, counts = _bucket_scored_in(20, holding)
        mean, low, high = bootstrap_difference(differences, counts)
        assert math.isfinite(float(mean[1]))
        assert math.isfinite(float(low[1])) is banded and math.isfinite(float(high[1])) is banded, holding


@pytest.mark.slow
def test_a_bucket_in_fewer_windows_gets_no_narrower_band_than_its_own_windows() -> None:
    """A bucket scored in 8 of 40 windows holds no more than those 8 windows' worth of evidence: its band
    is at least as wide as theirs alone (to the bootstrap's Monte Carlo error at 5000 resamples; the
    resamples' varying share of those windows widens it a little). Its tail was that of 40 windows:
    a band 11% narrower than the 8 windows' own (0.144 against 0.163), now 0.181."""
    differences, counts = _bucket_scored_in(40, 8)
    _, low, high = bootstrap_difference(differences, counts, resamples=5000)
    _, alone_low, alone_high = bootstrap_difference(differences[:8, 1:], counts[:8, 1:], resamples=5000)
    width, alone_width = float(high[1] - low[1]), float(alone_high[0] - alone_low[0])
    assert width >= 0.97 * alone_width, (width, alone_width)


def test_the_rough_band_note_counts_the_windows_of_the_bucket_with_fewest() -> None:
    """The note that too few resamples lie beyond a band's ends counted every window read (20: 1000
    resamples enough from 12 on), while a bucket scored in 8 of them has its ends at the 8 windows'
    expanded tail, which 1000 resamples leave about 4 beyond: now it names those 8 windows."""
    differences, counts = _bucket_scored_in(20, 8)
    loss_sums = torch.stack([torch.zeros_like(differences), differences])  # [models, windows, buckets]
    result = LengthResult(4, [(0, 2), (2, 4)], loss_sums, counts, windows=20)
    comparison = Comparison([None, None], 0, [], {}, 0.95, 1000, 0, "")  # type: ignore[list-item]
    _add_length(comparison, result)
    assert any("over 8 windows" in note for note in comparison.notes), comparison.notes


def test_equal_losses_give_a_band_of_no_width_and_no_nan() -> None:
    """Two models with equal losses everywhere (ties in every resample): mean, low and high all exactly
    0, never NaN (nanquantile of equal values), per bucket and over whole windows. Held before: pinned."""
    counts = torch.full((12, 3), 5.0, dtype=torch.float64)
    for differences in (torch.zeros(12, 3, dtype=torch.float64), counts.sum(1, keepdim=True) * 0):
        mean, low, high = bootstrap_difference(differences, counts[:, : differences.shape[1]])
        assert torch.equal(torch.stack([mean, low, high]), torch.zeros(3, differences.shape[1]).double())
