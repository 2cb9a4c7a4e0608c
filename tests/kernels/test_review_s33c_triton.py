"""Review s33c (Triton kernels): a kernel call whose tensors are not all on one device is refused before
any launch, naming the tensor.

The host checks compared shapes only: a ``ln_weight`` (or ``tau``, ``lr``, a weight, a pending sum) left on
another device reached the launch, where it fails inside Triton naming only an argument position (a cpu
tensor on a GPU run), or is read as memory of the launch's device (another GPU's). The check runs before
Triton is imported, so this test needs neither a GPU nor the interpreter.
"""

from __future__ import annotations

import re

import pytest
import torch
from kernel_testing import make_inputs

from innerloop.kernels.triton import ttt_linear, ttt_mlp

PACKAGES = {"linear": ttt_linear, "mlp": ttt_mlp}


@pytest.mark.parametrize("model", sorted(PACKAGES))
@pytest.mark.parametrize(
    ("index", "name"), [(1, "xk"), (3, "lr"), (4, "tau"), (5, "params['W1']"), (7, "ln_bias")]
)
def test_a_chunk_call_with_a_tensor_on_another_device_is_refused_naming_it(model, index, name) -> None:
    inputs = list(make_inputs(1, 1, 8, 16, 4, model, seed=0))
    if index == 5:
        inputs[5] = {**inputs[5], "W1": inputs[5]["W1"].to("meta")}
    else:
        inputs[index] = inputs[index].to("meta")
    with pytest.raises(ValueError, match="^" + re.escape(name) + " is on meta, xq on cpu"):
        PACKAGES[model].fused.forward(*inputs)


@pytest.mark.parametrize("model", sorted(PACKAGES))
@pytest.mark.parametrize("name", ["tau_i", "pending['b1']"])
def test_a_decode_call_with_a_tensor_on_another_device_is_refused_naming_it(model, name) -> None:
    xq, xk, xv, lr, _, params, ln_weight, ln_bias = make_inputs(1, 1, 4, 16, 4, model, seed=0)
    pending = {k: torch.zeros_like(v) for k, v in params.items()}
    tau_i = torch.tensor(1.0)
    if name == "tau_i":
        tau_i = tau_i.to("meta")
    else:
        pending["b1"] = pending["b1"].to("meta")
    one = (xq[:, :, 0], xk[:, :, 0], xv[:, :, 0], lr[:, :, 0])
    with (
        torch.no_grad(),
        pytest.raises(ValueError, match="^" + re.escape(name) + " is on meta"),
    ):
        PACKAGES[model].fused.decode(*one, tau_i, params, pending, ln_weight, ln_bias)


# ---------------------------------------------------------------- gradients of gradients


@pytest.mark.triton_interpreter
@pytest.mark.slow  # the interpreter's child process (tests/kernels/test_triton_kernels.py says why)
@pytest.mark.parametrize("model", sorted(PACKAGES))
def test_a_gradient_of_a_gradient_through_the_kernel_is_refused_not_wrong(model) -> None:
    """``@once_differentiable`` cuts the backward's outputs from the graph and hangs a DelayedError on
    fresh leaves: ``torch.autograd.grad(g, inputs)`` never reaches that node, so a second derivative
    through a TTT layer came out silently without the kernel's part (relative error ~1 against the torch
    path) instead of raising as the CPU kernels do."""
    from innerloop import TTTLayer

    torch.manual_seed(0)
    layer = TTTLayer(32, 2, inner_model=model, mini_batch_size=4, kernel=f"triton_ttt_{model}")
    x = torch.randn(1, 8, 32, requires_grad=True)
    y, _ = layer(x)
    assert layer.last_dispatch[0] == f"triton_ttt_{model}"
    with pytest.raises(RuntimeError, match="differentiable once only.*needs_double_backward=True"):
        (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        torch.autograd.grad(g.square().sum(), x)
    # once: unchanged, and equal to the torch path
    reference = TTTLayer(32, 2, inner_model=model, mini_batch_size=4, kernel="torch")
    reference.load_state_dict(layer.state_dict())
    y_ref, _ = reference(x)
    (g_ref,) = torch.autograd.grad(y_ref.square().sum(), x)
    y, _ = layer(x)
    (g,) = torch.autograd.grad(y.square().sum(), x)
    assert ((g - g_ref).norm() / g_ref.norm()).item() <= 1e-4
