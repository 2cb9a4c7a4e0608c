"""Review s52e (mutation audit): wrong numbers the fast suite let through.

The fast suite checked the fused torch path's numbers on TTT-Linear only (its MLP equality test is
slow): a mutant adding instead of subtracting the second layer's dual-form correction, one dropping
the second layer's weight update, one dropping its lr scale, and one reading the activation's
derivative at ``|z|`` all passed it. These tests check both stacks' outputs and final weights
against the primal-form oracle, several mini-batches long (a wrong update shows only after the first).
"""

from __future__ import annotations

import pytest
import torch
from kernel_testing import make_inputs, primal_forward

from innerloop.core.functional import relative_error
from innerloop.kernels.fused_torch import make_fused_forward
from innerloop.kernels.reference import reference_kernel
from innerloop.plugins.losses.reconstruction import Reconstruction
from innerloop.plugins.models.linear import LinearModel
from innerloop.plugins.models.mlp import MLPModel

STACKS = {"linear": LinearModel().stack, "mlp": MLPModel().stack}
FLOAT64_EXACT = 1e-10
REFERENCE = {
    name: reference_kernel(model, Reconstruction())[0]
    for name, model in (("linear", LinearModel()), ("mlp", MLPModel()))
}


@pytest.mark.parametrize("model", ["linear", "mlp"])
@pytest.mark.parametrize("grad", [False, True])
def test_the_fused_path_equals_the_primal_oracle_over_several_mini_batches(model, grad):
    """Two (batch, head) pairs of different weights, two mini-batches of 3 tokens, float64; with
    ``grad`` the recorded (out-of-place) scan runs, without it the in-place one."""
    xq, xk, xv, lr, tau, params, ln_weight, ln_bias = make_inputs(
        2, 2, 6, 4, 3, model, dtype=torch.float64, seed=5, requires_grad=grad
    )
    with torch.no_grad():
        lr.mul_(8.0)  # larger steps than make_inputs' (lr ~ 1/f): the weights move visibly per mini-batch
    expected_out, expected_weights = primal_forward(model, xq, xk, xv, lr, tau, params, ln_weight, ln_bias)
    forward = make_fused_forward(STACKS[model])
    out, weights = forward(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, 1e-6)
    assert relative_error(out, expected_out) <= FLOAT64_EXACT
    for key, expected in expected_weights.items():
        moved = relative_error(expected, params[key])
        assert moved > 1e-3, f"{key} barely moves ({moved:.1e}): the test could not see a lost update"
        assert relative_error(weights[key], expected) <= FLOAT64_EXACT, key


@pytest.mark.parametrize("model", ["linear", "mlp"])
def test_the_fused_path_has_the_torch_dual_forms_gradients(model):
    """Every input's gradient (the initial inner weights' too, which reach the outputs through each
    mini-batch's key and query sides) equals the torch dual form's, in float64."""
    inputs = make_inputs(1, 2, 6, 4, 3, model, dtype=torch.float64, seed=7, requires_grad=True)
    xq, xk, xv, lr, tau, params, ln_weight, ln_bias = inputs
    leaves = [xq, xk, xv, lr, tau, *params.values(), ln_weight, ln_bias]
    grads = []
    for forward in (REFERENCE[model], make_fused_forward(STACKS[model])):
        out, weights = forward(*inputs, 1e-6)
        probe = (out * torch.linspace(-1, 1, 4, dtype=torch.float64)).sum() + sum(
            w.sum() for w in weights.values()
        )
        grads.append(torch.autograd.grad(probe, leaves))
    names = ["xq", "xk", "xv", "lr", "tau", *params, "ln_weight", "ln_bias"]
    for name, expected, got in zip(names, *grads, strict=True):
        assert relative_error(got, expected) <= FLOAT64_EXACT, name
