"""Review s52r: s52i (plugin checks blame the plugin) and s52k (bootstrap bands per position bucket).

s52k counted, per bucket, the windows that score a token of it; these tests hold its siblings to the same
rule: science.py growth's band over the two halves of the positions, and compare's warning."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from benchmark_testing import benchmark_script

from innerloop.core.protocol import LossPairs, Views
from innerloop.plugins.losses.reconstruction import Reconstruction
from innerloop.testing import check_update_rule
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


def test_compare_does_not_tell_to_score_more_windows_for_positions_no_window_scores(caplog) -> None:
    """Positions no window scores (the recall task scores only its answers, at the end of a window) have
    no difference at all: more windows of the same kind would not give them a band, so the warning of
    the test above is not given for them (it was, from 8-15 of a second half scored in 0 of 20 windows)."""
    comparison = Comparison([None, None], 0, [], {}, 0.95, 200, 0, "")  # type: ignore[list-item]
    with caplog.at_level(logging.WARNING, logger=compare_module.log.name):
        _add_length(comparison, _second_half_scored_in(20, 0))
    assert not [r.getMessage() for r in caplog.records if "positions" in r.getMessage()]


class _Float32ClosedForm(Reconstruction):
    """A reconstruction loss whose closed form is computed in float32 (relative error ~5e-8 against
    autograd): registration (tolerance 1e-6) takes it, and a caller checks rules with it at 1e-5."""

    name = "float32_closed_form"

    def token_loss_grad(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (prediction.float() - target.float()).to(prediction.dtype)


class _EvenHeadDimOnly(Reconstruction):
    """A loss defined for an even head dim only: its targets swap each pair of features (registration
    checks head dim 4)."""

    name = "even_head_dim_only"

    def pairs(self, views: Views, carry: Mapping[str, torch.Tensor]) -> LossPairs:
        value = views.value
        swapped = value.unflatten(-1, (value.shape[-1] // 2, 2)).flip(-1).flatten(-2)
        return LossPairs(inputs=views.key, targets=swapped, valid=None, carry={})


#: A small problem of check_update_rule: the values of one wrapping, no gradients (about 1 s)
SMALL = dict(batch=2, heads=1, tokens=5, mini_batch_size=2, norm=False, residual=False)


@pytest.mark.slow  # reason: check_update_rule of a small problem, ~1 s
def test_the_given_loss_is_checked_at_the_callers_tolerance() -> None:
    """s52i's check of a given loss compared its closed form with autograd at 1e-10 whatever tolerance
    the caller gave check_update_rule: a loss within 5e-8 (registered at 1e-6), checked with
    tolerance=1e-5, passed before s52i and was then refused ('relative error 4.7e-08 > 1.0e-10')."""
    loss = _Float32ClosedForm()
    check_update_rule(
        "dual_form", "linear", loss, tolerance=1e-5, head_dim=4, gradients=False, without_grad=False, **SMALL
    )
    with pytest.raises(AssertionError, match="float32_closed_form: token_loss_grad vs autograd"):
        check_update_rule("dual_form", "linear", loss, head_dim=4, gradients=False, **SMALL)  # at 1e-10


@pytest.mark.slow  # reason: check_update_rule of a small problem, ~1 s
def test_the_given_loss_is_checked_at_the_callers_head_dim_given_as_a_numpy_integer() -> None:
    """check_update_rule takes numpy integers for its sizes (review s32e), but s52i's check of a given
    loss read head_dim only when a Python int: head_dim=np.int64(4) checked a loss defined for even head
    dims at head dim 3, a torch error from the loss. Now at 4; a head_dim that is no size still falls
    back to the default (make_problem names it)."""
    check_update_rule(
        "dual_form",
        "linear",
        _EvenHeadDimOnly(),
        head_dim=np.int64(4),
        gradients=False,
        without_grad=False,
        **SMALL,
    )
    from innerloop.testing.checks import _given_size

    assert _given_size(np.int64(4), 3) == 4 and _given_size(torch.tensor(2), 3) == 2
    assert [_given_size(v, 3) for v in (-1, 0, True, 4.0, "4", None)] == [3] * 6
