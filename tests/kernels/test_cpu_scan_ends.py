"""The compiled ends of the CPU training scans (``kernels/cpu/scan_ends.py``): the hoisting equals the
fused torch path's ``_hoist`` and the output LayerNorm its torch ops, in values and every gradient, at
1e-10 in float64 (the whole kernel against the reference: test_cpu_training.py)."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from kernel_testing import hoisted_tensors

from innerloop.core.functional import overflow_safe_scale_if_needed
from innerloop.kernels.cpu.linear_scan import DOUBLE_BACKWARD_MESSAGE
from innerloop.kernels.cpu.scan_ends import CompiledHoist, CompiledOutputNorm
from innerloop.kernels.fused_torch.forward import _hoist

pytestmark = pytest.mark.usefixtures("cpu_kernels")  # skips, with the reason, where nothing compiles


def _inputs(batch: int, heads: int, tokens: int, width: int, mini_batch: int, seed: int):
    """Leaves, and the views a layer passes: q, k, v strided out of one [B, T, 3, H, f] projection, lr a
    transposed gate [B, H, T]."""
    generator = torch.Generator().manual_seed(seed)

    def leaf(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_()

    leaves = {
        "projection": leaf(batch, tokens, 3, heads, width),
        "gate": leaf(batch, tokens, heads),
        "tau": leaf(mini_batch),
        "ln_weight": leaf(heads, width),
        "ln_bias": leaf(heads, width),
    }

    def views():
        q, k, v = (t.transpose(1, 2) for t in leaves["projection"].unbind(2))
        return (
            q,
            k,
            v,
            leaves["gate"].transpose(1, 2).sigmoid(),
            leaves["tau"],
            leaves["ln_weight"],
            leaves["ln_bias"],
        )

    return leaves, views


def _weighted_sum(outputs, seed: int) -> torch.Tensor:
    """A random linear function of the outputs, some read through a transpose (non-contiguous gradients)."""
    generator = torch.Generator().manual_seed(seed)
    total = 0
    for index, t in enumerate(outputs):
        t = t.transpose(-1, -2) if index % 2 and t.dim() >= 2 else t
        total = total + (t * torch.randn(t.shape, generator=generator, dtype=t.dtype)).sum()
    return total


@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    width=st.integers(1, 9),
    mini_batch=st.integers(1, 5),
    num_mini_batches=st.integers(1, 3),
    has_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_the_hoisting_equals_the_torch_paths(
    batch, heads, width, mini_batch, num_mini_batches, has_bias, seed
):
    leaves, views = _inputs(batch, heads, mini_batch * num_mini_batches, width, mini_batch, seed)
    expected = hoisted_tensors(_hoist(*views(), has_bias))
    got = CompiledHoist.apply(has_bias, *views())
    for name, a, b in zip(("both", "left", "shift", "gamma_sq", "eta", "scale"), got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")
    wanted = torch.autograd.grad(_weighted_sum(expected, seed), list(leaves.values()))
    grads = torch.autograd.grad(_weighted_sum(got, seed), list(leaves.values()))
    for name, a, b in zip(leaves, grads, wanted, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"grad {name}: {m}")


def _torch_output(eps, z, xq, ln_weight, ln_bias):
    scale = overflow_safe_scale_if_needed(z)
    normed = torch.nn.functional.layer_norm(z if scale is None else z * scale, [z.shape[-1]], eps=eps)
    return torch.addcmul(xq + ln_bias[None, :, None, :], normed, ln_weight[None, :, None, :])


@pytest.mark.parametrize("huge_row", [False, True], ids=["ordinary", "a row whose squares overflow"])
@pytest.mark.parametrize("width", [1, 5, 64])
def test_the_output_norm_equals_the_torch_paths(width, huge_row):
    leaves, views = _inputs(2, 3, 6, width, 2, seed=width)
    generator = torch.Generator().manual_seed(1)
    z_values = torch.randn(2, 3, 6, width, generator=generator, dtype=torch.float64)
    if huge_row:
        z_values[1, 2, 4] *= 1e200
    z = z_values.requires_grad_()
    xq, *_, ln_weight, ln_bias = views()
    expected = _torch_output(1e-6, z, xq, ln_weight, ln_bias)
    xq, *_, ln_weight, ln_bias = views()
    got = CompiledOutputNorm.apply(1e-6, z, xq, ln_weight, ln_bias)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert got.transpose(1, 2).is_contiguous()  # [B, T, H, f] memory: the layer's [B, T, D] for free
    inputs = [z, *leaves.values()]
    wanted = torch.autograd.grad(_weighted_sum([expected], 3), inputs, allow_unused=True)
    grads = torch.autograd.grad(_weighted_sum([got], 3), inputs, allow_unused=True)
    for a, b in zip(grads, wanted, strict=True):
        if b is None:
            assert a is None or a.abs().max() == 0
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_a_double_backward_is_refused_and_wrong_shapes_are_named():
    _, views = _inputs(1, 2, 4, 3, 2, seed=0)
    hoisted = CompiledHoist.apply(True, *views())
    with pytest.raises(RuntimeError, match=re.escape(DOUBLE_BACKWARD_MESSAGE)):
        torch.autograd.grad(hoisted[1].sum(), views()[-1], create_graph=True)
    xq, xk, xv, lr, tau, ln_weight, ln_bias = views()
    with pytest.raises(
        ValueError, match=r"training ends got inputs they cannot take: lr \(1, 2, 3\) != \(1, 2, 4\)"
    ):
        CompiledHoist.apply(True, xq, xk, xv, lr[..., :3], tau, ln_weight, ln_bias)
    with pytest.raises(ValueError, match=r"tau \(3,\) must be \[K\] with K dividing the 4 tokens"):
        CompiledHoist.apply(True, xq, xk, xv, lr, torch.ones(3, dtype=torch.float64), ln_weight, ln_bias)
    with pytest.raises(ValueError, match="z and xq"):
        CompiledOutputNorm.apply(1e-6, xq[..., :2], xq, ln_weight, ln_bias)


@pytest.mark.parametrize("model", ["linear", "mlp"])
def test_a_step_on_the_inner_norms_bias_between_forward_and_backward_is_fine(model):
    # as on the torch path, whose backward reads the bias only through beta - xv + xk computed in the
    # forward (an optimizer step between two forwards and their backward, review s18); the weight is
    # read by both paths' backwards, and a step on it raises on both
    from innerloop import TTTLayer

    grads = {}
    for kernel in ("torch", "auto"):
        torch.manual_seed(0)
        layer = TTTLayer(24, 2, inner_model=model, mini_batch_size=4, kernel=kernel).double()
        x = torch.randn(2, 8, 24, dtype=torch.float64, requires_grad=True)
        y, _ = layer(x)
        with torch.no_grad():
            layer.ttt_norm_bias.add_(0.3)
        grads[kernel] = torch.autograd.grad(y.square().sum(), [x, *layer.parameters()])
    for a, b in zip(grads["auto"], grads["torch"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _output_leaves():
    """A projection (xq is a strided view of it), a small-variance z (eps matters), the norm's affine."""
    generator = torch.Generator().manual_seed(0)

    def leaf(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=generator, dtype=torch.float64)).requires_grad_()

    return leaf(2, 6, 3, 3, 5), leaf(2, 3, 6, 5, scale=0.05), leaf(3, 5), leaf(3, 5)


def test_the_output_norm_uses_the_eps_it_is_given():
    # mutation review s18, P05: every other test used 1e-6
    projection, z, ln_weight, ln_bias = _output_leaves()
    xq = projection[:, :, 0].transpose(1, 2)
    for eps in (1e-2, 1e-5):
        got = CompiledOutputNorm.apply(eps, z, xq, ln_weight, ln_bias)
        torch.testing.assert_close(got, _torch_output(eps, z, xq, ln_weight, ln_bias), rtol=1e-10, atol=1e-12)


def test_the_output_norms_backward_takes_any_gradient_layout():
    # a gradient read through a transpose, and an expanded one (out.sum()): mutation review s18, P04
    projection, z, ln_weight, ln_bias = _output_leaves()
    xq = projection[:, :, 0].transpose(1, 2)
    weights = torch.randn(2, 3, 5, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    inputs = [z, ln_weight, ln_bias, projection]
    for loss in (lambda out: (out.transpose(-1, -2) * weights).sum(), lambda out: out.sum()):
        got = torch.autograd.grad(loss(CompiledOutputNorm.apply(1e-6, z, xq, ln_weight, ln_bias)), inputs)
        wanted = torch.autograd.grad(loss(_torch_output(1e-6, z, xq, ln_weight, ln_bias)), inputs)
        for a, b in zip(got, wanted, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _node_names(root) -> set[str]:
    seen, stack, names = set(), [root], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize("model", ["linear", "mlp"])
def test_training_through_the_cpu_kernel_runs_the_compiled_ends(model):
    # the ends are a speed path, equal to the torch ops: only the graph shows that they run (P08)
    from innerloop import TTTLayer

    torch.manual_seed(0)
    layer = TTTLayer(8, 2, inner_model=model, mini_batch_size=2, kernel=f"cpu_ttt_{model}").double()
    y, _ = layer(torch.randn(1, 4, 8, dtype=torch.float64, requires_grad=True))
    assert {"CompiledHoistBackward", "CompiledOutputNormBackward"} <= _node_names(y.grad_fn)
