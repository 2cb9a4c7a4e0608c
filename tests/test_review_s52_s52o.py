"""Review s52o (mutation audit, part two): wrong numbers and refusals the fast suite let through.

A TTTLayer subclass that forgets (through :meth:`TTTLayer.log_forgetting` or :meth:`TTTLayer.forgetting`)
must never reach the fused torch or compiled CPU kernels, whose forward takes no decay: dispatch's
capability check refuses them by name. With that check gone (review s52e's mutant D2) the fast suite
passed: the first-use check then caught the kernels' TypeError, so the numbers stayed right, but ``auto``
warned and a forced kernel was refused with a failed check instead of what the layer needs.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from innerloop.core.layer import TTTLayer
from innerloop.kernels import KernelCheckError, KernelUnavailableError


class LogForgettingLayer(TTTLayer):
    """Forgets through the log hook: keeps ``exp(-0.5)`` of its weights each token."""

    def log_forgetting(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return torch.full((x.shape[0], self.num_heads, x.shape[1]), -0.5, dtype=self.scan_dtype), None


class ForgettingLayer(TTTLayer):
    """Forgets through the plain hook: a decay of 0.3 each token."""

    def forgetting(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return torch.full((x.shape[0], self.num_heads, x.shape[1]), 0.3, dtype=self.scan_dtype), None


FORGETTING_LAYERS = [LogForgettingLayer, ForgettingLayer]


@pytest.mark.parametrize("layer_class", FORGETTING_LAYERS, ids=lambda c: c.__name__)
def test_auto_runs_a_forgetting_linear_layer_on_the_torch_path_without_trying_a_fused_kernel(layer_class):
    """``auto`` refuses the kernels without decay for what the layer needs (no first-use check run, so no
    KernelCheckWarning), and its output is the forced torch path's, bit for bit."""
    _auto_runs_the_torch_path(layer_class, {}, "fused_torch_linear: does not support decay (forgetting)")


def _auto_runs_the_torch_path(layer_class, options: dict, refusal: str) -> None:
    """``kernel="auto"`` on ``layer_class(16, 2, inner_model="linear", mini_batch_size=4, **options)``
    runs the torch path, having refused the fused kernel for ``refusal`` without trying it (no
    KernelCheckWarning), and gives the forced torch path's output, bit for bit."""
    torch.manual_seed(0)
    auto = layer_class(16, 2, inner_model="linear", mini_batch_size=4, kernel="auto", **options)
    forced = layer_class(16, 2, inner_model="linear", mini_batch_size=4, kernel="torch", **options)
    forced.load_state_dict(auto.state_dict())
    x = torch.randn(1, 8, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a kernel that failed its first-use check would warn
        y, _ = auto(x)
    kernel, reason = auto.dispatches[0]
    assert kernel == "torch", auto.dispatches
    assert refusal in reason, reason
    assert torch.equal(y, forced(x)[0])


@pytest.mark.parametrize("layer_class", FORGETTING_LAYERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("kernel", ["fused_torch_linear", "cpu_ttt_linear"])
def test_forcing_a_kernel_without_decay_on_a_forgetting_layer_is_refused_by_name(layer_class, kernel):
    layer = layer_class(16, 2, inner_model="linear", mini_batch_size=4, kernel=kernel)
    with pytest.raises(KernelUnavailableError) as raised:
        layer(torch.randn(1, 8, 16))
    assert not isinstance(raised.value, KernelCheckError), raised.value  # refused, not tried and failed
    assert str(raised.value) == (
        f"kernel={kernel!r} cannot run here: {kernel}: does not support decay (forgetting)"
    )


@pytest.mark.parametrize("inner_norm,inner_residual", [(True, False), (False, True)])
def test_auto_refuses_the_fused_kernels_by_name_on_a_layer_with_one_of_norm_and_residual_off(
    inner_norm, inner_residual
):
    """The fused kernels fuse both the inner LayerNorm and the residual; with one off (the paper's
    ablation) ``auto`` refuses them for that, without trying them. With the check loosened to 'both off'
    (mutant D4) the fast suite passed: the first-use check caught the wrong numbers, with a warning."""
    _auto_runs_the_torch_path(
        TTTLayer,
        {"inner_norm": inner_norm, "inner_residual": inner_residual},
        "fused_torch_linear: fuses the inner LayerNorm and residual, which need both on",
    )
