"""Review s48m: the first-use check compares the gradient of the token-index scales ``tau`` too.

A layer's ``tau`` is ``clamp(token_idx + learnable_token_idx, 0)``: a trained parameter. The block probe
compared the gradients of queries, keys, values, learning rates, weights and the inner LayerNorm, but
passed ``tau`` to both paths as it was, not as a leaf of its own: a kernel whose backward got ``dtau``
wrong (a sign, a missing term of the Triton backward's step 4) passed its check and trained
``learnable_token_idx`` on wrong gradients, silently.
"""

from __future__ import annotations

import pytest
import torch
from plugin_testing import DoubledGradient, register_linear_dual_form_kernel

import innerloop
from innerloop.kernels.first_use import KernelCheckWarning
from innerloop.kernels.reference import reference_kernel
from innerloop.plugins.losses.reconstruction import Reconstruction
from innerloop.plugins.models.linear import LinearModel

REFERENCE_FORWARD, _ = reference_kernel(LinearModel(), Reconstruction())
NAME = "wrong_tau_gradient"


pytestmark = pytest.mark.usefixtures("fresh_global_registry")  # tests/conftest.py


def register_ahead_of_every_path(forward) -> None:
    """Register ``forward`` as TTT-Linear's dual-form kernel, chosen before every other path."""
    register_linear_dual_form_kernel(NAME, forward)


def wrong_tau_gradient(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps):
    """The reference's numbers, with twice the gradient of ``tau``."""
    return REFERENCE_FORWARD(xq, xk, xv, lr, DoubledGradient.apply(tau), params, ln_weight, ln_bias, eps)


@pytest.mark.slow  # 1 s warm on a loaded machine: a float64 training call of two layers and the probe
def test_a_kernel_with_a_wrong_tau_gradient_is_refused_and_the_layer_trains_on_the_torch_gradients():
    register_ahead_of_every_path(wrong_tau_gradient)
    torch.manual_seed(0)
    layer = innerloop.TTTLayer(16, 2, inner_model="linear", mini_batch_size=4).double()
    reference = innerloop.TTTLayer(16, 2, inner_model="linear", mini_batch_size=4, kernel="torch").double()
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(1, 8, 16, dtype=torch.float64)
    with pytest.warns(KernelCheckWarning, match=r"the gradient of tau differs"):
        out, _ = layer(x)
    assert layer.last_dispatch[0] != NAME
    out.sum().backward()
    expected, _ = reference(x)
    expected.sum().backward()
    torch.testing.assert_close(layer.learnable_token_idx.grad, reference.learnable_token_idx.grad)


def ignores_tau(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps):
    """The reference with every token scale taken as 1: right only while the layer's are."""
    return REFERENCE_FORWARD(xq, xk, xv, lr, torch.ones_like(tau), params, ln_weight, ln_bias, eps)


def test_a_kernel_that_ignores_the_scales_is_refused_on_one_token_mini_batches_whose_scale_is_one():
    # mini_batch_size=1: tau = [1] until learnable_token_idx moves, and the verdict is kept for the process
    register_ahead_of_every_path(ignores_tau)
    torch.manual_seed(0)
    layer = innerloop.TTTLayer(16, 2, inner_model="linear", mini_batch_size=1)
    with torch.no_grad(), pytest.warns(KernelCheckWarning, match=r"tests too little; on seeded random data"):
        layer(torch.randn(2, 3, 16))
    assert layer.last_dispatch[0] != NAME
