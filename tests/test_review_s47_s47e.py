"""Regression tests of review s47e: the test-time-regression family (linear attention, DeltaNet, Gated
DeltaNet, Titans) as plugins, against FLA's references and ../shared/ZOO.md.

- ``innerloop.testing``'s rule checks drew every decay in [0, 0.5) and every momentum in [0, 1), never
  a gate at its end: a third-party rule whose decay products are ratios of cumulative products, or
  differences of cumulated log gates (FLA's form), passed ``check_update_rule`` and then returned NaN
  on the first full reset (``decay = 1``, which ``ops.scan`` and the Titans layer give).
  ``make_problem`` now sets one token of the first row's decay to 1 and one token of its momentum to 0
  (``check_update_rule_gradients`` holds that reset 1e-5 inside [0, 1], where its finite differences
  stay in the range a rule may check).
- ``check_kernel`` ran every case on layers without forgetting, so a kernel that declares
  ``supports_decay`` was never given a decay by it: one that forgot on the first two tokens of a call
  only (where dispatch's first-use probe looks at ``K = 1``) passed, and ``kernel="auto"`` then ran it in a
  Gated DeltaNet layer 28% off the torch path. A kernel that supports decay now runs each case again on
  a ``ForgettingLayer``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import innerloop
import innerloop.core.scan as scan_module
from innerloop.kernels.delta_chunk import delta_rule_kernel_forward
from innerloop.kernels.delta_chunk import kernel_spec as delta_chunk_spec
from innerloop.plugins.optimizers.dual_form import DualForm
from innerloop.registry import get_registry, isolated_registry
from innerloop.testing import check_kernel, check_update_rule, make_problem
from innerloop.testing.checks import check_update_rule_gradients


def _ratio_products(factors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``running_products`` as ratios of cumulative products: exact for factors away from 0, NaN (0 / 0)
    after a factor of 0."""
    cumulative = torch.cumprod(factors, dim=-1)
    return (cumulative[..., :, None] / cumulative[..., None, :]).tril(), cumulative


def _log_space_products(factors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``running_products`` from cumulated logs, as FLA's chunked kernels build their gates: exact for
    factors away from 0, NaN (-inf - -inf) after a factor of 0."""
    logs = torch.log(factors).cumsum(dim=-1)
    return torch.exp(logs[..., :, None] - logs[..., None, :]).tril(), logs.exp()


@pytest.mark.parametrize("products", [_ratio_products, _log_space_products])
@pytest.mark.parametrize(
    "rule",
    [
        "dual_form",
        pytest.param(
            "minibatch_gd",
            marks=pytest.mark.slow,  # ~3 s: the primal form's first call in a process
        ),
    ],
)
def test_the_rule_kit_catches_decay_products_that_fail_at_a_full_reset(monkeypatch, rule, products) -> None:
    registry = get_registry()
    monkeypatch.setattr(scan_module, "running_products", products)
    with pytest.raises(AssertionError, match="decay"):
        check_update_rule(
            registry.update_rule(rule),
            registry.inner_model("matrix"),
            registry.inner_loss("reconstruction"),
            gradients=False,
            without_grad=False,
            batch=1,
            heads=2,
            head_dim=2,
            tokens=6,
            mini_batch_size=4,
            norm=False,
            residual=False,
        )


class _DualFormInItsRange(DualForm):
    """dual_form that refuses a decay outside [0, 1], as ``ops.scan`` and the delta kernel do."""

    def forward(self, state, task, views, lr, tau, decay=None):
        if decay is not None and not bool(((decay >= 0) & (decay <= 1)).all()):
            raise ValueError("decay must lie in [0, 1]")
        return super().forward(state, task, views, lr, tau, decay=decay)


def test_the_gradient_kit_keeps_its_finite_differences_inside_the_decay_range() -> None:
    """Finite differences about the full reset step off it by 1e-6; at decay = 1 they would step outside
    [0, 1], which a rule may refuse: check_update_rule_gradients holds the reset 1e-5 inside."""
    registry = get_registry()
    check_update_rule_gradients(
        _DualFormInItsRange(),
        registry.inner_model("matrix"),
        registry.inner_loss("reconstruction"),
        batch=1,
        heads=1,
        head_dim=1,
        tokens=3,
        mini_batch_size=2,
    )


def test_the_kits_problems_hold_a_full_reset_and_a_momentum_restart() -> None:
    problem = make_problem("matrix", "reconstruction", tokens=7, decay=True, momentum=True)
    assert problem.decay is not None and problem.momentum is not None
    assert bool((problem.decay[0, 0] == 1).any()), "no full reset (decay = 1) in the first row"
    assert bool((problem.momentum[0, 0] == 0).any()), "no momentum restart (momentum = 0) in the first row"
    assert bool((problem.decay[1:] < 0.5).all()), "the other rows keep their ordinary decays"
    assert bool(((problem.decay >= 0) & (problem.decay <= 1)).all())


# ---- check_kernel and a kernel that declares supports_decay -------------------------------------------


def _forgets_two_tokens_only(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps, decay=None, chunk_size=64):
    """``delta_chunk``'s forward that forgets on the first two tokens of a call only: right where
    dispatch's first-use probe looks (two mini-batches of one token), wrong after."""
    if decay is not None:
        decay = torch.cat([decay[:, :, :2], torch.zeros_like(decay[:, :, 2:])], dim=2)
    return delta_rule_kernel_forward(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps, decay, chunk_size)


@pytest.mark.slow  # ~2 s: the check's first cases, on a small layer, until the decaying one fails
def test_check_kernel_compares_a_kernel_that_supports_decay_with_decay() -> None:
    """check_kernel's layers had no forgetting, so a kernel declaring supports_decay was never given a
    decay by it: one that forgets on the first two tokens of a call only passed every case."""
    spec = dataclasses.replace(
        delta_chunk_spec(), name="forgets_two_tokens_only", priority=100, forward=_forgets_two_tokens_only
    )
    with isolated_registry():
        innerloop.register_kernel(spec)
        with pytest.raises(AssertionError, match=r"forgets_two_tokens_only.*with decay"):
            check_kernel("forgets_two_tokens_only", head_dims=(3,), mini_batch_size=1)
