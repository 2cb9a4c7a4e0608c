"""Boundaries found in the thirty-second session's reviews and fixed by hand."""

from __future__ import annotations

import pytest

from innerloop.testing import check_update_rule


@pytest.mark.parametrize(
    ("cut_points", "shape"),
    [([500], {}), ([0, -3], {}), ([4, 9], {"tokens": 4}), ([11], {"tokens": 11, "mini_batch_size": 4})],
)
def test_check_update_rule_refuses_cut_points_that_cut_nothing(cut_points: list[int], shape: dict) -> None:
    """Such a list used to be dropped point by point, so the check compared the whole sequence only:
    a check of splits that could not fail."""
    with pytest.raises(ValueError, match=r"cut_points=.*cut none of the sequences checked"):
        check_update_rule("dual_form", model="linear", loss="reconstruction", cut_points=cut_points, **shape)


def test_check_update_rule_refuses_cut_points_that_are_not_token_indices() -> None:
    with pytest.raises(TypeError, match="cut_points must be a list of token indices"):
        check_update_rule("dual_form", cut_points=[2.5])


@pytest.mark.slow  # check_update_rule at several shapes: ~0.35 s
def test_cut_points_inside_one_of_the_checked_lengths_are_accepted() -> None:
    """50 cuts the 150-token wide shape only: accepted (the 11- and 37-token problems run whole)."""
    check_update_rule(
        "dual_form",
        model="linear",
        loss="reconstruction",
        cut_points=[50],
        gradients=False,
        without_grad=False,
    )
