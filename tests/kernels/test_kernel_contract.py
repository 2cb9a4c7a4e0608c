"""A registered kernel is held to its contract when it runs: a verify() that raises or returns anything
but None or a reason, and outputs of other shapes than the contract's, are errors naming the kernel,
never a confusing error of whichever layer asked, nor outputs passed on."""

from __future__ import annotations

import pytest
import torch
from plugin_testing import register_linear_dual_form_kernel

import innerloop


def _register(name, verify, forward=None):
    def wrong_shapes(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps):
        return xq[..., :2], {k: v for k, v in params.items() if k != "b1"}

    register_linear_dual_form_kernel(name, forward or wrong_shapes, verify=verify)


@pytest.mark.parametrize(
    ("verify", "message"),
    [
        (lambda inputs: True, r"kernel 'broken_verify_test': verify\(\) must return None .* got True"),
        (lambda inputs: 1 / 0, r"kernel 'broken_verify_test': its verify\(\) raised ZeroDivisionError"),
    ],
)
def test_a_verify_that_breaks_its_contract_is_named(fresh_global_registry, verify, message):
    _register("broken_verify_test", verify)
    layer = innerloop.TTTLayer(16, 2, inner_model="linear", mini_batch_size=4)
    with pytest.raises((TypeError, RuntimeError), match=message):
        layer(torch.randn(1, 8, 16))


def test_outputs_of_other_shapes_than_the_contract_are_an_error_naming_the_kernel(fresh_global_registry):
    _register("wrong_shapes_test", lambda inputs: None)
    layer = innerloop.TTTLayer(16, 2, inner_model="linear", mini_batch_size=4)
    with (
        torch.no_grad(),
        pytest.raises(RuntimeError, match=r"kernel 'wrong_shapes_test' returned outputs \(1, 2, 8, 2\)"),
    ):
        layer(torch.randn(1, 8, 16))


def test_a_named_kernel_without_a_decode_step_says_so_for_decoded_tokens():
    layer = innerloop.TTTLayer(16, 2, inner_model="linear", mini_batch_size=4, kernel="fused_torch_linear")
    with torch.no_grad():
        _, state = layer(torch.randn(1, 4, 16))
        layer(torch.randn(1, 1, 16), state)
    assert layer.dispatches == [
        (
            "torch",
            "torch: kernel='fused_torch_linear' has no decode step (one token at a time): tokens decode on torch",
        )
    ]
