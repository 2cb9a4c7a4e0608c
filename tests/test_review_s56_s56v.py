"""Review s56v: ``check_kernel`` gave a kernel no per-token rate above 1.

Its layers rated tokens ``base_lr * sigmoid(gate) / head_dim`` with ``base_lr`` 1 (TTTLayer: below 1/4),
2.5 / 40 in the wide case, and 1.0 exactly (FamilyLayer), while real layers go higher (DeltaNet's beta up to
2, ``base_lr`` 10 at head dim 4: up to 2.5). A kernel that clamps the rate at 1 passed the whole check.
Its large-rates case now runs rates up to ``LARGE_RATES_BOUND`` (2.5), first.
"""

from __future__ import annotations

import dataclasses

import pytest

import innerloop
from innerloop.registry import get_registry
from innerloop.testing import check_kernel

pytestmark = pytest.mark.usefixtures("fresh_global_registry")


def _register_rates_clamped_at_one() -> str:
    """``fused_torch_linear`` with every per-token rate clamped at 1 before the call."""
    spec = get_registry().get("kernel", "fused_torch_linear")
    correct = spec.forward

    def clamped(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps):  # noqa: ANN001, ANN202
        return correct(xq, xk, xv, lr.clamp(max=1.0), tau, params, ln_weight, ln_bias, eps)

    name = "s56v_rates_clamped_at_one"
    innerloop.register_kernel(dataclasses.replace(spec, name=name, forward=clamped, priority=10**6))
    return name


@pytest.mark.slow  # the registry's build, then the large-rates case fails it (~1 s); before, the whole check passed (~28 s)
@pytest.mark.parametrize("head_dims", [(4, 5), (5,)])  # a TTTLayer's rates up to 2.5, a FamilyLayer's 2.5
def test_check_kernel_fails_a_kernel_that_clamps_rates_at_one(head_dims: tuple[int, ...]) -> None:
    name = _register_rates_clamped_at_one()
    with pytest.raises(
        AssertionError, match=r"the large-rates case: per-token rates up to 2.5\), .*: output"
    ):
        check_kernel(name, head_dims=head_dims)


def test_the_large_rates_case_is_skipped_saying_so_where_base_lr_is_given() -> None:
    from innerloop.testing import kernel_checks

    spec = get_registry().get("kernel", "fused_torch_linear")
    config = kernel_checks._layer_config(spec, None, None, None, {"base_lr": 0.5})
    report = kernel_checks.KernelCheckReport(spec.name)
    kernel_checks._check_large_rates_case(spec, config, 4, *_float64_on_cpu(), report)
    assert report.skipped == {
        "head_dim 4, the large-rates case": "base_lr=0.5 given: the case runs base_lr 10, rates up to 2.5"
    }


def _float64_on_cpu() -> tuple:
    import torch

    return torch.float64, torch.device("cpu"), 0, 1e-10


def _register_decays_clamped_below_one() -> str:
    """``delta_chunk`` with every decay clamped at 0.99 (its log gate at -4.6) before the call: a kernel
    that never lets a head forget all of its state."""
    spec = get_registry().get("kernel", "delta_chunk")
    correct = spec.forward

    def clamped(
        xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps, decay=None, chunk_size=64, decay_log=None
    ):  # noqa: ANN001, ANN202
        decay = None if decay is None else decay.clamp(max=0.99)
        decay_log = None if decay_log is None else decay_log.clamp(min=-4.6)
        return correct(
            xq,
            xk,
            xv,
            lr,
            tau,
            params,
            ln_weight,
            ln_bias,
            eps,
            decay=decay,
            chunk_size=chunk_size,
            decay_log=decay_log,
        )

    name = "s56v_decays_clamped_below_one"
    innerloop.register_kernel(dataclasses.replace(spec, name=name, forward=clamped, priority=10**6))
    return name


@pytest.mark.slow  # the registry's build, then the first decaying case fails it (~2 s); before, all 174 cases passed
def test_check_kernel_fails_a_kernel_that_clamps_decays_below_one() -> None:
    # s56v: ForgettingLayer's decays were all ~0.04-0.80 (one bias, -1), so a clamp at 0.99 never bit;
    # Gated DeltaNet's gates reach ~1 (a full reset). One head's gate now starts at 0.999.
    name = _register_decays_clamped_below_one()
    with pytest.raises(AssertionError, match=r"ForgettingLayer, with decay"):
        check_kernel(name, mini_batch_size=1)
