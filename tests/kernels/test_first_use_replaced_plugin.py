"""A kernel's first-use verdict holds for the very plugin objects it was earned with
(innerloop/kernels/first_use.py): a plugin registered under the name of one that was removed, or given
as another instance, is never run through a verdict earned by another object."""

from __future__ import annotations

import warnings

import pytest
import torch

import innerloop
from innerloop import HalfSquaredError, LossPairs
from innerloop.kernels.first_use import KernelCheckWarning
from innerloop.kernels.reference import reference_kernel
from innerloop.kernels.spec import KernelSpec
from innerloop.plugins.losses.reconstruction import Reconstruction
from innerloop.plugins.models.linear import LinearModel
from innerloop.registry import get_registry, reset_registry

NAME = "replaced_plugin_test"
RECONSTRUCTION_ORIGIN = "builtin:innerloop.plugins.losses.reconstruction"


@pytest.fixture(autouse=True)
def fresh_global_registry():
    reset_registry()
    yield
    reset_registry()


class SquaredError(HalfSquaredError):
    """Another loss under the built-in's name: the squared error, not half of it (the review's repro)."""

    name = "reconstruction"

    def pairs(self, views, carry):
        return LossPairs(views.value, views.key)

    def token_loss(self, prediction, target):
        return (prediction - target).pow(2).sum(-1)

    def token_loss_grad(self, prediction, target):
        return 2 * (prediction - target)


def register_reference_kernel() -> list[int]:
    """A kernel right for the built-in (linear, reconstruction, dual_form) only, in place of the
    built-in kernels (whose probes would cost seconds); returns the list its forward appends to at
    each call."""
    get_registry().remove_plugin("builtin:innerloop.plugins.kernels")
    forward, decode = reference_kernel(LinearModel(), Reconstruction())
    calls = []

    def counting_forward(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps):
        calls.append(1)
        return forward(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps)

    innerloop.register_kernel(
        KernelSpec(
            name=NAME,
            inner_model="linear",
            inner_loss="reconstruction",
            update_rule="dual_form",
            forward=counting_forward,
            decode=decode,
            verify=lambda inputs: None,
            priority=10**6,
        )
    )
    return calls


def twin(kernel: str) -> innerloop.TTTLayer:
    torch.manual_seed(0)
    return innerloop.TTTLayer(16, 2, mini_batch_size=4, kernel=kernel)


def test_a_loss_registered_under_a_removed_ones_name_is_checked_again():
    register_reference_kernel()
    x = torch.randn(2, 12, 16)
    with torch.no_grad():
        first = twin("auto")
        first(x)
    assert first.last_dispatch[0] == NAME  # right for the built-in loss: verdict "passed" kept

    get_registry().remove_plugin(RECONSTRUCTION_ORIGIN)
    innerloop.register_inner_loss(SquaredError())
    layer, reference = twin("auto"), twin("torch")
    with torch.no_grad(), pytest.warns(KernelCheckWarning, match=rf"{NAME}: failed its first-use check"):
        out, state = layer(x)
    assert layer.last_dispatch[0] != NAME
    with torch.no_grad():
        expected, expected_state = reference(x)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(state.params["W1"], expected_state.params["W1"])


def test_a_verdict_is_not_shared_by_another_instance_that_passes_as_the_registered_one():
    """Another instance of the registered class (the name checks accept it) gets its own probe."""
    calls = register_reference_kernel()
    x = torch.randn(1, 8, 16)
    with torch.no_grad():
        twin("auto")(x)
        assert len(calls) == 2  # its probe, then the block
        torch.manual_seed(0)
        layer = innerloop.TTTLayer(16, 2, mini_batch_size=4, inner_loss=Reconstruction())
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            layer(x)
    assert layer.last_dispatch[0] == NAME
    assert len(calls) == 4  # its probe on the new instance, then the block itself
