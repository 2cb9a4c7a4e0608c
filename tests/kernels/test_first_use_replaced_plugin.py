"""A kernel's first-use verdict holds for the very plugin objects it was earned with
(innerloop/kernels/first_use.py): a plugin registered under the name of one that was removed, or given
as an instance configured otherwise, is never run through a verdict earned by another object; a copy
(a deep-copied layer) is."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from plugin_testing import register_linear_dual_form_kernel

import innerloop
from innerloop import HalfSquaredError, LossPairs
from innerloop.kernels.first_use import KernelCheckWarning
from innerloop.kernels.reference import reference_kernel
from innerloop.plugins.losses.reconstruction import Reconstruction
from innerloop.plugins.models.linear import LinearModel
from innerloop.registry import get_registry

NAME = "replaced_plugin_test"
RECONSTRUCTION_ORIGIN = "builtin:innerloop.plugins.losses.reconstruction"


pytestmark = pytest.mark.usefixtures("fresh_global_registry")  # tests/conftest.py


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

    register_linear_dual_form_kernel(NAME, counting_forward, decode=decode)
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


def _probes_of(layer: innerloop.TTTLayer, x: torch.Tensor, calls: list[int]) -> int:
    """How many kernel calls running ``layer`` on ``x`` made beyond the block itself (2: a probe, on the
    block's data and on seeded random data, since a fresh layer's zero biases test too little)."""
    before = len(calls)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)
    assert layer.last_dispatch[0] == NAME
    return len(calls) - before - 1


def test_a_verdict_holds_for_copies_and_not_for_an_instance_configured_otherwise():
    """A deep copy of a layer (its plugins are copies) and an equal instance of the registered class
    compute what the checked objects do: no new probe. An instance of that class whose attributes
    differ gets its own probe."""
    calls = register_reference_kernel()
    x = torch.randn(1, 8, 16)
    first = twin("auto")
    assert _probes_of(first, x, calls) == 2
    assert _probes_of(copy.deepcopy(first), x, calls) == 0
    torch.manual_seed(0)
    assert (
        _probes_of(innerloop.TTTLayer(16, 2, mini_batch_size=4, inner_loss=Reconstruction()), x, calls) == 0
    )
    configured = Reconstruction()
    configured.note = "another setting"  # an attribute the registered object does not have
    torch.manual_seed(0)
    assert _probes_of(innerloop.TTTLayer(16, 2, mini_batch_size=4, inner_loss=configured), x, calls) == 2


@pytest.mark.slow  # first-use checks of several plugin objects and a garbage collection: ~0.8 s
def test_a_plugin_holding_tensors_is_checked_per_object_never_read_back_and_not_kept_alive(monkeypatch):
    """A loss holding a tensor: its verdict is its own (a copy, whose tensor may live on a GPU, is probed
    anew rather than compared by value, which would read the tensor back at every dispatch), and the
    verdict does not keep it (and its tensor) alive once the layer using it is freed."""
    import gc
    import weakref

    from innerloop.kernels import first_use

    calls = register_reference_kernel()
    x = torch.randn(1, 8, 16)
    holding = Reconstruction()
    holding.weighting = torch.ones(3)  # e.g. a per-feature weighting a third-party loss keeps
    torch.manual_seed(0)
    layer = innerloop.TTTLayer(16, 2, mini_batch_size=4, inner_loss=holding)
    assert _probes_of(layer, x, calls) == 2
    assert _probes_of(layer, x, calls) == 0  # the same objects: the verdict holds
    compared = []
    monkeypatch.setattr(first_use.torch, "equal", lambda a, b: compared.append(1) or True)
    assert _probes_of(copy.deepcopy(layer), x, calls) == 2
    assert compared == []  # the copy's tensor was never compared by value
    monkeypatch.undo()
    freed = weakref.ref(holding)
    del layer, holding
    gc.collect()
    assert freed() is None  # the verdict's key did not keep the loss alive
    first_use._drop_freed()
    assert not any(
        isinstance(p, first_use._Held) and p.ref is not None for k in first_use._VERDICTS for p in k
    )
