"""Review s53c: the reasons the dispatcher gives before a run (named kernels refused on every device, the
layer's own inner_norm / inner_residual) and what ``verify`` is told about a block's length."""

from __future__ import annotations

import pytest
import torch

from innerloop import TTTLayer
from innerloop.core.scan import ChunkInputs
from innerloop.kernels.dispatch import kernel_inputs, named_kernel_refusal, refused_named_kernels

CPU, META = torch.device("cpu"), torch.device("meta")


def _refusal(layer: TTTLayer) -> str | None:
    return named_kernel_refusal(
        layer.update_rule,
        layer.inner_task(),
        device=CPU,
        dtype=torch.float32,
        head_dim=layer.head_dim,
        requires_grad=True,
    )


@pytest.mark.parametrize("devices", [[CPU, META], [META, CPU]], ids=["cpu-first", "meta-first"])
def test_a_named_kernel_that_runs_on_one_of_the_devices_is_not_refused(devices) -> None:
    # refused_named_kernels lists a kernel that runs on NONE of the devices: cpu_ttt_linear runs on the
    # cpu, not on meta (no values), so over both it is not refused, whichever comes first
    model = torch.nn.Sequential(TTTLayer(32, 2, mini_batch_size=4, kernel="cpu_ttt_linear"))
    assert refused_named_kernels(model, devices, requires_grad=True) == {}
    refused = refused_named_kernels(model, [META], requires_grad=True)
    assert list(refused) == ["cpu_ttt_linear"] and "meta" in refused["cpu_ttt_linear"], refused


def test_named_kernel_refusal_asks_with_the_layers_own_inner_norm_and_residual() -> None:
    # delta_chunk computes out = q W, without the inner LayerNorm and residual: a layer with both off runs
    # it, one with either on is refused, the reason naming the layer's own settings
    def layer(norm: bool, residual: bool) -> TTTLayer:
        return TTTLayer(
            32, 2, inner_model="matrix", mini_batch_size=1, inner_norm=norm, inner_residual=residual,
            kernel="delta_chunk",
        )  # fmt: skip

    assert _refusal(layer(False, False)) is None
    for norm, residual in ((True, False), (False, True), (True, True)):
        # refused at construction since s56r (KernelSpec.check_wrapping), naming the layer's own settings
        with pytest.raises(ValueError, match=rf"\(inner_norm={norm}, inner_residual={residual}\)"):
            layer(norm, residual)


@pytest.mark.parametrize("mini_batches", [1, 3])
def test_kernel_inputs_reports_the_blocks_own_number_of_tokens(mini_batches) -> None:
    # KernelInputs.num_tokens is the block's length T (a kernel's verify may refuse by it), not the
    # layer's mini-batch size; a decoded token is one token (KernelSpec's docstring)
    layer = TTTLayer(32, 2, mini_batch_size=4)
    task = layer.inner_task()
    B, H, f = 1, 2, 16

    def chunk(T: int) -> ChunkInputs:
        x = torch.zeros(B, H, T, f)
        return ChunkInputs(x, x, x, torch.zeros(B, H, T))

    params = {"W1": torch.zeros(B, H, f, f), "b1": torch.zeros(B, H, 1, f)}
    T = 4 * mini_batches + (1 if mini_batches == 3 else 0)  # a ragged block too: 13 tokens
    assert kernel_inputs(task, chunk(T), params).num_tokens == T
    assert kernel_inputs(task, chunk(1), params, decode=True).num_tokens == 1


@pytest.mark.usefixtures("fresh_global_registry")
def test_a_named_kernel_that_failed_its_first_use_check_is_refused_before_the_next_run() -> None:
    # named_kernel_refusal's reasons include "a first-use check it failed" (its docstring): the verdict a
    # layer's block earned must be found for the blocks it asks about. It asked with fewer flags in
    # KernelInputs.extra (no momentum / functorch / empty) than a block has, so it never found the
    # verdict: a run (or a checkpoint load) refused nothing and failed at its first step instead
    from plugin_testing import register_linear_dual_form_kernel

    from innerloop.kernels.dispatch import KernelCheckError
    from innerloop.kernels.reference import reference_kernel
    from innerloop.plugins.losses.reconstruction import Reconstruction
    from innerloop.plugins.models.linear import LinearModel

    reference, _ = reference_kernel(LinearModel(), Reconstruction())

    def wrong_weights(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps):
        out, new = reference(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps)
        return out, {k: v * 1.01 for k, v in new.items()}

    name = register_linear_dual_form_kernel("s53c_wrong_weights", wrong_weights)
    layer = TTTLayer(16, 2, inner_model="linear", mini_batch_size=4, kernel=name)
    assert _refusal(layer) is None  # not checked yet
    with pytest.raises(KernelCheckError, match="failed its first-use check"):
        layer(torch.randn(2, 12, 16))
    reason = _refusal(layer)
    assert reason is not None and "failed its first-use check" in reason, reason
    refused = refused_named_kernels(torch.nn.Sequential(layer), [CPU], requires_grad=True)
    assert list(refused) == [name], refused


def test_a_named_kernel_is_refused_when_any_layer_naming_it_cannot_run_it() -> None:
    # two layers name delta_chunk: the first (inner LayerNorm and residual off) runs it, the second (inner
    # LayerNorm on, which delta_chunk does not compute) cannot; only the first layer was asked, so the
    # kernel passed and the second layer failed at its first step (a run started, a checkpoint kept it)
    def layer(norm: bool) -> TTTLayer:
        return TTTLayer(
            32, 2, inner_model="matrix", mini_batch_size=1, inner_norm=norm, inner_residual=False,
            kernel="delta_chunk",
        )  # fmt: skip

    # since s56r the second layer is refused at its own construction (KernelSpec.check_wrapping), before
    # any run could start; refused_named_kernels asking every layer is kept by the device test above
    with pytest.raises(ValueError, match=r"kernel='delta_chunk' cannot run inner_norm=True"):
        layer(True)
    assert (
        refused_named_kernels(torch.nn.Sequential(layer(False), layer(False)), [CPU], requires_grad=True)
        == {}
    )
