"""Review s57d: non-finite numbers -- finite numbers never called NaN or inf, NaN or inf never passed
on silently (every mixer, the E2E model's inner-loop check, norms, metrics)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from innerloop.models import build_model
from innerloop.models.e2e import _row_sums
from tests.models.test_e2e_review_s13 import VOCAB, tiny_config  # the tiny E2E config (one copy)


@pytest.mark.slow  # four calls of a tiny E2E model with their inner steps: ~1 s on a loaded 2-core CPU
def test_finite_float32_fast_weights_whose_row_sums_pass_float32s_range_are_not_called_non_finite() -> None:
    """A float32 E2E model given a state whose fast weights are finite (2e37, the same sign) but whose
    row sums pass 3.4e38: its inner-loop check summed them in float32, got inf, and raised
    NonFiniteInnerStepError ("made fast weight (none: the losses) NaN or inf") where
    ``non_finite='ignore'`` gives finite logits and fast weights. Now summed in float64."""
    ids = torch.randint(VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    results = []
    for policy in ("ignore", "raise"):
        torch.manual_seed(0)
        model = build_model(tiny_config(non_finite=policy)).float().eval()
        with torch.no_grad():
            _, state = model(ids[:, :8])
            fast = {k: v.abs() * 2e37 if "down_proj" in k else v for k, v in state.fast.items()}
            assert all(torch.isfinite(v).all() for v in fast.values())
            assert max(float(v.sum((1, 2)).max()) for v in fast.values()) == float("inf")  # in float32
            results.append(model(ids[:, 8:], dataclasses.replace(state, fast=fast)))  # raised before
    (expected, expected_state), (logits, new_state) = results
    assert torch.isfinite(expected).all() and all(
        torch.isfinite(v).all() for v in expected_state.fast.values()
    )
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_the_inner_loop_checks_row_sums_are_finite_iff_every_value_is(dtype: torch.dtype) -> None:
    """Rows of the dtype's largest finite value (of either sign, 4096 a row) stay finite; one NaN, inf
    or -inf in a row makes that row's sum non-finite and no other's."""
    big = torch.finfo(dtype).max
    rows = torch.full((5, 64, 64), big, dtype=dtype)
    rows[1] = -big
    rows[2, 3, 7], rows[3, 0, 0], rows[4, 63, 63] = float("nan"), float("inf"), float("-inf")
    finite = torch.isfinite(_row_sums(rows))
    assert finite.tolist() == [True, True, False, False, False], (dtype, _row_sums(rows))
    assert torch.isfinite(_row_sums(rows[:2, 0, 0])).all()  # a [B] tensor (the losses) too
