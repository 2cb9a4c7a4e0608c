"""Review s55m: check_update_rule's default cases against deliberately wrong rules, each a built-in rule
(dual_form, minibatch_gd, momentum) broken in one way only. The product promise: a wrong rule fails the
default check. Rules wrong only at rates above make_problem's old [0, 0.5) (a layer's rate is up to
base_lr / head_dim, a family member's up to base_lr) or only at decay gates near 0 or 1 (log gates near
-1e-6 or -30) passed it."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from innerloop.plugins.optimizers.dual_form import DualForm
from innerloop.plugins.optimizers.minibatch_gd import MiniBatchGD
from innerloop.plugins.optimizers.momentum import Momentum
from innerloop.testing import check_update_rule, make_problem
from innerloop.testing.checks import LARGE_RATES_BOUND


class _RatesClampedAtHalf(DualForm):
    """The dual form with each token's rate clamped at 0.5 (s55e's finding)."""

    def forward(self, state, task, views, lr, tau, decay=None, decay_log=None):  # noqa: ANN001, ANN201, D102
        return super().forward(state, task, views, lr.clamp(max=0.5), tau, decay, decay_log)


class _StepShortAboveOne(MiniBatchGD):
    """Mini-batch GD whose rates above 1 step 10% short."""

    def forward(self, state, task, views, lr, tau, **gates):  # noqa: ANN001, ANN003, ANN201, D102
        return super().forward(state, task, views, torch.where(lr > 1, 0.9 * lr, lr), tau, **gates)


class _MomentumStepShortAboveOne(Momentum):
    """The momentum rule whose rates above 1 step 10% short."""

    def forward(self, state, task, views, lr, tau, **gates):  # noqa: ANN001, ANN003, ANN201, D102
        return super().forward(state, task, views, torch.where(lr > 1, 0.9 * lr, lr), tau, **gates)


class _RateGradientCutAboveOne(DualForm):
    """The dual form with the right values, but no gradient w.r.t. a rate above 1 (detached there)."""

    def forward(self, state, task, views, lr, tau, decay=None, decay_log=None):  # noqa: ANN001, ANN201, D102
        return super().forward(
            state, task, views, torch.where(lr > 1, lr.detach(), lr), tau, decay, decay_log
        )


class _GateNearOneClamped(DualForm):
    """The dual form with a log gate below -10 (finite) clamped at -10: keeps 4.5e-5 of a state it should
    keep 1e-13 of; the full reset (-inf, decay 1) is kept exact."""

    def forward(self, state, task, views, lr, tau, decay=None, decay_log=None):  # noqa: ANN001, ANN201, D102
        floor = -10.0
        if decay_log is not None:
            decay_log = torch.where(torch.isinf(decay_log), decay_log, decay_log.clamp(min=floor))
        if decay is not None:
            most = 1.0 - math.exp(floor)
            decay = torch.where((decay > most) & (decay < 1.0), torch.full_like(decay, most), decay)
        return super().forward(state, task, views, lr, tau, decay, decay_log)


class _GateNearZeroSkipped(DualForm):
    """The dual form that skips a decay below 1e-4 (a log gate above -1e-4): no decay at all there."""

    def forward(self, state, task, views, lr, tau, decay=None, decay_log=None):  # noqa: ANN001, ANN201, D102
        if decay_log is not None:
            decay_log = torch.where(decay_log > -1e-4, torch.zeros_like(decay_log), decay_log)
        if decay is not None:
            decay = torch.where(decay < 1e-4, torch.zeros_like(decay), decay)
        return super().forward(state, task, views, lr, tau, decay, decay_log)


@pytest.mark.slow  # each runs check_update_rule up to the case that meets it: 0.5-3 s on a loaded CPU
@pytest.mark.parametrize(
    ("wrong_rule", "message"),
    [
        (_RatesClampedAtHalf, "rates in"),
        (_StepShortAboveOne, "rates in"),
        (_MomentumStepShortAboveOne, "rates in"),
        (_RateGradientCutAboveOne, "gradient w.r.t. lr"),
        (_GateNearOneClamped, "decay"),
        (_GateNearZeroSkipped, "decay"),
    ],
)
def test_the_default_check_fails_a_rule_wrong_only_at_extremes(wrong_rule: type, message: str) -> None:
    """Each rule passed check_update_rule's defaults before: make_problem drew rates in [0, 0.5) and decays
    in [0, 0.5) with one full reset (1); now the defaults also meet rates up to LARGE_RATES_BOUND and gates
    of log -30 and -2e-6."""
    with pytest.raises(AssertionError, match=message):
        check_update_rule(wrong_rule())


def test_make_problem_draws_decay_gates_near_zero_and_one_beside_the_full_reset() -> None:
    """A decay problem holds a full reset (decay 1, log -inf), a gate of log -30 (decay 1 - 9.4e-14) and
    one of log -2e-6, each at its own token; other tokens keep their draws in [0, 0.5)."""
    for seed, tokens in ((0, 11), (1, 3), (2, 37)):
        decay = make_problem("linear", "reconstruction", tokens=tokens, seed=seed, decay=True).decay
        log_gate = torch.log1p(-decay)
        assert int(torch.isinf(log_gate).sum()) == 1
        assert int(torch.isclose(log_gate, torch.tensor(-30.0, dtype=torch.float64), rtol=1e-3).sum()) == 1
        assert int(torch.isclose(log_gate, torch.tensor(-2e-6, dtype=torch.float64), rtol=1e-6).sum()) == 1
        assert int((decay < 0.5).sum()) == decay.numel() - 2


def test_make_problem_takes_max_lr_and_names_a_wrong_one() -> None:
    """``max_lr`` bounds the drawn rates (uniform in [0, max_lr)); a negative or non-finite one is refused
    naming the parameter."""
    problem = make_problem("linear", "reconstruction", max_lr=LARGE_RATES_BOUND, tokens=40)
    assert float(problem.lr.max()) < LARGE_RATES_BOUND
    assert float(problem.lr.max()) > 1.0
    default = make_problem("linear", "reconstruction", tokens=40)
    torch.testing.assert_close(problem.lr, default.lr * (LARGE_RATES_BOUND / 0.5), rtol=1e-15, atol=0)
    for wrong in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"max_lr"):
            make_problem("linear", "reconstruction", max_lr=wrong)
    unchanged = replace(default)
    assert unchanged.lr.max() < 0.5
