"""Property tests of the ``huber`` inner loss, built on innerloop.testing."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from innerloop_huber import HuberReconstruction

import innerloop
from innerloop.testing import check_inner_loss
from innerloop.testing.strategies import seeds


def test_the_entry_point_registers_the_loss() -> None:
    assert "huber" in innerloop.available("inner_loss")


@given(seed=seeds())
@settings(max_examples=5, deadline=None)
def test_it_passes_innerloops_inner_loss_checks(seed: int) -> None:
    # shapes, causality, chunk invariance, gradient, agreement with the naive token loop
    check_inner_loss(HuberReconstruction(), seed=seed)


@given(seed=seeds(), delta=st.floats(0.05, 5.0))
@settings(max_examples=20, deadline=None)
def test_the_closed_form_gradient_equals_autograd(seed: int, delta: float) -> None:
    g = torch.Generator().manual_seed(seed)
    prediction = torch.randn(3, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(3, 5, 8, generator=g, dtype=torch.float64)
    loss = HuberReconstruction(delta)
    (autograd,) = torch.autograd.grad(loss.token_loss(prediction, target).sum(), prediction)
    torch.testing.assert_close(loss.token_loss_grad(prediction, target), autograd, rtol=0, atol=1e-12)


@given(seed=seeds())
@settings(max_examples=10, deadline=None)
def test_small_errors_score_like_the_builtin_reconstruction_loss(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(4, 8, generator=g, dtype=torch.float64)
    prediction = target + 0.1 * torch.rand(4, 8, generator=g, dtype=torch.float64)  # |error| < delta
    builtin = innerloop.get_registry().inner_loss("reconstruction")
    torch.testing.assert_close(
        HuberReconstruction(1.0).token_loss(prediction, target), builtin.token_loss(prediction, target)
    )


def test_a_layer_with_the_huber_loss_streams_exactly() -> None:
    torch.manual_seed(0)
    layer = innerloop.TTTLayer(16, 2, inner_loss="huber", mini_batch_size=4).double()
    x = torch.randn(2, 19, 16, dtype=torch.float64)
    whole, _ = layer(x)
    first, state = layer(x[:, :7])
    second, _ = layer(x[:, 7:], state)
    torch.testing.assert_close(torch.cat((first, second), dim=1), whole, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("delta", "error"),
    [
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        (0.0, ValueError),
        (-1.0, ValueError),
        (True, TypeError),
        ("1", TypeError),
    ],
)
def test_a_bad_delta_is_refused_naming_it(delta: object, error: type) -> None:
    # nan and inf would make NaN gradients (inf * -inf in the branch torch.where does not select)
    with pytest.raises(error, match="delta"):
        HuberReconstruction(delta)
