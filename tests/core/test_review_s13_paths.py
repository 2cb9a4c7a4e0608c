"""Review s13 (paths, journey L5): refusals of the fast paths that were raised where they need not be,
or named the wrong path, and a plugin's initial weights in another dtype than the layer's.

- L1: a layer built with ``needs_double_backward=True`` runs a named once-differentiable kernel on the
  blocks that record no graph (``torch.no_grad``, inference mode): nothing is differentiated there.
- L2: what only a kernel's ``verify`` knows (``delta_chunk``'s mini-batch size, a once-differentiable
  kernel under ``needs_double_backward``) is refused at the first call, naming the kernel and why.
- L3: a gradient of a gradient through ``cpu_ttt_*`` or ``compiled_torch_*`` names that path, not the
  fused torch path they run through.
- journey L5: ``init_params`` in float64 gives a float32 layer float32 initial weights.
- docs/architecture.md: a plugin's stack model gets the stack fast paths once it registers them.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import innerloop
import innerloop.kernels.fused_torch.compiled as compiled
from innerloop import StackModel, TTTLayer
from innerloop.core.family_layers import FamilyLayer
from innerloop.core.protocol import AffineLayer
from innerloop.kernels import fused_torch
from innerloop.kernels.dispatch import KernelUnavailableError
from innerloop.kernels.fused_torch.forward import _Scan
from innerloop.kernels.spec import KernelInputs

HIDDEN, HEADS, K = 16, 2, 4


def twin(kernel: str, **options) -> tuple[TTTLayer, TTTLayer]:
    """The torch path and a layer naming ``kernel``, with the same weights, in float64."""
    reference = TTTLayer(HIDDEN, HEADS, mini_batch_size=K, kernel="torch", **options).double()
    candidate = TTTLayer(HIDDEN, HEADS, mini_batch_size=K, kernel=kernel, **options).double()
    candidate.load_state_dict(reference.state_dict())
    return reference, candidate


# ---- L1: no graph, nothing to differentiate twice --------------------------------------------------


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_a_double_backward_layer_runs_the_fused_kernel_where_no_graph_is_recorded(mode):
    torch.manual_seed(0)
    reference, layer = twin("fused_torch_linear", needs_double_backward=True)
    x = torch.randn(2, 2 * K, HIDDEN, dtype=torch.float64)
    with mode():
        y, state = layer(x)
        y_torch, state_torch = reference(x)
    assert layer.dispatches == [("fused_torch_linear", "kernel 'fused_torch_linear' forced")]
    torch.testing.assert_close(y, y_torch, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state.params["W1"], state_torch.params["W1"], rtol=1e-12, atol=1e-12)


def test_a_double_backward_layer_still_refuses_the_fused_kernel_where_a_graph_is_recorded():
    layer = TTTLayer(
        HIDDEN, HEADS, mini_batch_size=K, kernel="fused_torch_linear", needs_double_backward=True
    )
    with pytest.raises(KernelUnavailableError, match="fused_torch_linear.*double backward needed"):
        layer(torch.randn(1, 2 * K, HIDDEN, requires_grad=True))


def _block(requires_grad: bool) -> KernelInputs:
    return KernelInputs(
        device=torch.device("cpu"),
        dtype=torch.float32,
        head_dim=16,
        mini_batch_size=K,
        num_tokens=2 * K,
        requires_grad=requires_grad,
        needs_double_backward=True,
    )


def test_the_fused_verify_refuses_double_backward_only_for_a_block_with_a_graph():
    assert fused_torch.verify(_block(requires_grad=False)) is None
    assert "double backward needed" in fused_torch.verify(_block(requires_grad=True))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_the_triton_verify_refuses_double_backward_only_for_a_block_with_a_graph(monkeypatch):
    from innerloop.kernels.triton import ttt_linear, ttt_mlp

    # verify reads the variable when asked; no kernel is defined (nor run) here
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for package in (ttt_linear, ttt_mlp):
        assert package.verify(_block(requires_grad=False)) is None
        assert "double backward needed" in package.verify(_block(requires_grad=True))


# A needs_double_backward layer named to the Triton kernel runs it without a graph: in
# tests/kernels/test_layer_dispatch.py (the interpreter's one child process; it was a child of its own here).


# ---- L2: what only verify knows is refused at the first call, naming the kernel -------------------


@pytest.mark.parametrize("kernel", ["fused_torch_linear", "cpu_ttt_linear", "compiled_torch_linear"])
def test_a_once_differentiable_kernel_named_for_double_backward_is_refused_at_the_first_graph(kernel):
    layer = TTTLayer(HIDDEN, HEADS, mini_batch_size=K, kernel=kernel, needs_double_backward=True)
    with pytest.raises(KernelUnavailableError, match=f"kernel='{kernel}' cannot run here: .*double backward"):
        layer(torch.randn(1, 2 * K, HIDDEN, requires_grad=True))


def test_delta_chunk_named_with_mini_batches_is_refused_at_construction_naming_the_size():
    # refused at the first call (KernelUnavailableError) before s56c; the size is known at construction
    with pytest.raises(
        ValueError, match=r"kernel='delta_chunk' cannot run mini_batch_size=3: .*mini_batch_size=1, got 3"
    ):
        FamilyLayer(24, 2, mini_batch_size=3, kernel="delta_chunk")


def test_the_kernel_name_check_says_what_it_leaves_to_the_first_call():
    from innerloop.core.layer import _check_kernel_name

    doc = " ".join(_check_kernel_name.__doc__.split())
    assert "What only the kernel's ``verify`` knows is not checked here" in doc
    assert "first call" in doc


# ---- L3: gradients of gradients name the path that ran --------------------------------------------


def _second_order(layer: TTTLayer) -> None:
    x = torch.randn(2, 2 * K, HIDDEN, dtype=torch.float64, requires_grad=True)
    y, _ = layer(x)
    (grad,) = torch.autograd.grad(y.pow(3).sum(), x, create_graph=True)  # the paths refuse here
    torch.autograd.grad(grad.square().sum(), x)


@pytest.mark.parametrize("model", ["linear", "mlp"])
def test_a_second_order_gradient_through_the_cpu_kernel_names_the_cpu_kernel(model):
    layer = TTTLayer(HIDDEN, HEADS, inner_model=model, mini_batch_size=K, kernel=f"cpu_ttt_{model}").double()
    with pytest.raises(RuntimeError, match="differentiable once only") as raised:
        _second_order(layer)
    assert layer.dispatches[0][0] == f"cpu_ttt_{model}"
    assert "the CPU kernel's training scan" in str(raised.value)
    assert "fused_torch" not in str(raised.value)


def test_a_second_order_gradient_through_the_fused_kernel_names_it():
    layer = TTTLayer(HIDDEN, HEADS, mini_batch_size=K, kernel="fused_torch_linear").double()
    with pytest.raises(RuntimeError, match="kernel 'fused_torch_linear' is differentiable once only"):
        _second_order(layer)


def test_a_second_order_gradient_through_the_compiled_kernel_names_it(monkeypatch):
    # the step left uncompiled (a backend name whose "compiled" step is the eager one): the message
    # is made by the path around the step, which is what this checks
    monkeypatch.setitem(compiled._compiled, "eager step for the test", _Scan.mini_batch)
    monkeypatch.setattr(compiled, "BACKEND", "eager step for the test")
    layer = TTTLayer(HIDDEN, HEADS, mini_batch_size=K, kernel="compiled_torch_linear").double()
    with pytest.raises(RuntimeError, match="kernel 'compiled_torch_linear' is differentiable once only"):
        _second_order(layer)
    assert layer.dispatches[0][0] == "compiled_torch_linear"


def test_the_fused_forward_without_a_kernel_name_keeps_its_message():
    stack = innerloop.get_registry().get("inner_model", "linear").stack
    forward = fused_torch.make_fused_forward(stack)
    batch, heads, tokens, dim = 1, 2, 8, 4
    generator = torch.Generator().manual_seed(0)

    def draw(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    xq, xk, xv = (draw(batch, heads, tokens, dim) for _ in range(3))
    xq.requires_grad_(True)
    lr, tau = draw(batch, heads, tokens).sigmoid() / dim, 1 / torch.arange(1, K + 1, dtype=torch.float64)
    params = {"W1": draw(batch, heads, dim, dim) * 0.1, "b1": draw(batch, heads, 1, dim) * 0.1}
    lnw, lnb = 1 + 0.1 * draw(heads, dim), 0.1 * draw(heads, dim)
    out, _ = forward(xq, xk, xv, lr, tau, params, lnw, lnb, 1e-6)
    with pytest.raises(RuntimeError, match="the fused_torch fast path is differentiable once only"):
        torch.autograd.grad(out.pow(3).sum(), xq, create_graph=True)  # the guard refuses to record


# ---- journey L5 and docs/architecture.md: a plugin's stack model -----------------------------------


class FixedDtypeInit(StackModel):
    """One affine map whose ``init_params`` returns tensors of a fixed dtype (float64: as numpy-made
    weights are), whatever torch's default dtype."""

    name = "fixed_dtype_init_s13"

    def __init__(self, dtype: torch.dtype = torch.float64):
        self.dtype = dtype

    @property
    def stack(self):
        return (AffineLayer("W", "b", None),)

    def param_shapes(self, head_dim):
        return {"W": (head_dim, head_dim), "b": (1, head_dim)}

    def init_params(self, num_heads, head_dim, generator=None):
        # deterministic values, none of them a float32 number, so that a cast shows
        weight = 0.02 * torch.arange(num_heads * head_dim * head_dim, dtype=self.dtype).sin()
        return {
            "W": weight.reshape(num_heads, head_dim, head_dim),
            "b": torch.zeros(num_heads, 1, head_dim, dtype=self.dtype),
        }


def test_float64_initial_weights_are_cast_to_a_float32_layers_dtype(fresh_global_registry):
    plugin = innerloop.register_inner_model(FixedDtypeInit(torch.float64), origin="dtypeplug")
    layer = TTTLayer(HIDDEN, HEADS, inner_model="fixed_dtype_init_s13", mini_batch_size=K)
    assert {p.dtype for p in layer.parameters()} == {torch.float32}
    given = plugin.init_params(HEADS, HIDDEN // HEADS)
    assert torch.equal(layer.initial_params["W"].data, given["W"].float())  # rounded to float32, no more
    y, state = layer(torch.randn(1, 2 * K, HIDDEN))
    assert y.dtype == torch.float32 and state.params["W"].dtype == torch.float32


def test_float32_initial_weights_follow_a_float64_default_dtype(fresh_global_registry):
    innerloop.register_inner_model(FixedDtypeInit(torch.float32), origin="dtypeplug")
    torch.set_default_dtype(torch.float64)  # restored by tests/conftest.py
    layer = TTTLayer(HIDDEN, HEADS, inner_model="fixed_dtype_init_s13", mini_batch_size=K)
    assert {p.dtype for p in layer.parameters()} == {torch.float64}


def test_a_plugin_stack_model_runs_on_torch_until_its_plugin_registers_the_stack_paths(
    fresh_global_registry,
):
    model = innerloop.register_inner_model(FixedDtypeInit(), origin="dtypeplug")
    layer = TTTLayer(HIDDEN, HEADS, inner_model=model.name, mini_batch_size=K)
    layer(torch.randn(1, 2 * K, HIDDEN))
    assert layer.last_dispatch[0] == "torch"
    innerloop.register_kernel(fused_torch.kernel_spec(model.name, model.stack), origin="dtypeplug.kernels")
    layer(torch.randn(1, 2 * K, HIDDEN))
    assert layer.last_dispatch[0] == f"fused_torch_{model.name}"
