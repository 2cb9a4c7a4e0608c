"""The fused torch fast path equals the reference dual form, and dispatch can be read and forced."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from innerloop import TTTLayer
from innerloop.testing import FLOAT64_TOLERANCE
from innerloop.testing.checks import assert_layers_train_alike, twin_layers
from innerloop.testing.strategies import PAPER_INNER_WRAPPING, layer_configs, seeds


@pytest.mark.slow  # ~10 s: hypothesis over layer configs with every gradient (the fast loop keeps the rest)
@given(
    config=layer_configs(
        inner_losses=("reconstruction",), update_rules=("dual_form",), inner_wrappings=PAPER_INNER_WRAPPING
    ),
    tokens=st.integers(1, 26),
    seed=seeds(),
)
def test_fused_equals_reference_outputs_states_and_gradients(config, tokens, seed):
    reference, fast = twin_layers(config, seed % 1000, kernel=f"fused_torch_{config['inner_model']}")
    x = torch.randn(2, tokens, config["hidden_size"], dtype=torch.float64, requires_grad=True)
    assert_layers_train_alike(reference, fast, x, FLOAT64_TOLERANCE)
    if tokens >= config["mini_batch_size"]:
        assert f"fused_torch_{config['inner_model']}" in [path for path, _ in fast.dispatches]


@pytest.mark.slow  # gradgradcheck through the layer: ~0.7 s (linear), ~2 s (mlp)
@pytest.mark.parametrize("model", ["linear", "mlp"])
def test_double_backward_is_refused_or_exact(model):
    torch.manual_seed(0)
    fused = TTTLayer(
        4, 2, inner_model=model, mini_batch_size=2, kernel=f"fused_torch_{model}"
    ).double()  # head_dim 2: the fewest perturbations
    x = torch.randn(1, 4, 4, dtype=torch.float64, requires_grad=True)  # two whole mini-batches
    (grad,) = torch.autograd.grad(fused(x)[0].sum(), x, create_graph=False)
    assert fused.last_dispatch[0] == f"fused_torch_{model}"
    with pytest.raises(RuntimeError, match="differentiable once only.*needs_double_backward=True"):
        torch.autograd.grad(fused(x)[0].sum(), x, create_graph=True)

    exact = TTTLayer(4, 2, inner_model=model, mini_batch_size=2, needs_double_backward=True).double()
    exact.load_state_dict(fused.state_dict())
    assert torch.autograd.gradgradcheck(lambda x: exact(x)[0], (x,), eps=1e-6, atol=1e-6, rtol=1e-4)
    assert exact.last_dispatch[0] == "torch" and "double backward" in exact.last_dispatch[1]


def test_dispatch_reason_and_switch():
    forced_torch = TTTLayer(16, 2, mini_batch_size=4, kernel="torch")
    forced_torch(torch.randn(1, 8, 16))
    assert forced_torch.last_dispatch == ("torch", "torch path forced (kernel='torch')")

    forced_fused = TTTLayer(16, 2, mini_batch_size=4, kernel="fused_torch_linear")
    forced_fused(torch.randn(1, 8, 16))
    assert forced_fused.last_dispatch[0] == "fused_torch_linear"

    no_norm = TTTLayer(16, 2, mini_batch_size=4, inner_norm=False)
    no_norm(torch.randn(1, 8, 16))
    assert no_norm.last_dispatch[0] == "torch" and "LayerNorm" in no_norm.last_dispatch[1]

    next_token = TTTLayer(16, 2, mini_batch_size=4, inner_loss="next_token")
    next_token(torch.randn(1, 8, 16))
    assert next_token.last_dispatch == (
        "torch",
        "torch: no kernel registered for (linear, next_token, dual_form)",
    )


def test_forcing_a_kernel_that_cannot_run_is_an_error():
    with pytest.raises(
        ValueError, match="kernel='fused_torch_mlp' is not a kernel for \\(inner_model='linear'"
    ):
        TTTLayer(16, 2, mini_batch_size=4, kernel="fused_torch_mlp")  # registered for mlp only
    layer = TTTLayer(16, 2, mini_batch_size=4)
    with pytest.raises(ValueError, match="kernel='fused_torch_mlp' is not a kernel for"):
        layer.kernel = "fused_torch_mlp"  # set after construction: refused as the constructor refuses it


@pytest.mark.parametrize("model", ["linear", "mlp"])
@pytest.mark.parametrize("path", ["fused_torch", "cpu_ttt"])
def test_inference_never_modifies_the_callers_state(model, path, request):
    """Without autograd the fast paths update weights in place, on their own copies only."""
    if path == "cpu_ttt":
        request.getfixturevalue("cpu_kernels")  # skips, with the reason, where nothing compiles
    torch.manual_seed(0)
    layer = TTTLayer(16, 2, inner_model=model, mini_batch_size=4, kernel=f"{path}_{model}")
    x = torch.randn(2, 12, 16)
    initial = {k: v.detach().clone() for k, v in layer.initial_params.items()}
    with torch.no_grad():
        _, state = layer(x)
        saved = {k: v.clone() for k, v in state.tensors().items()}
        first, _ = layer(x, state)
        second, _ = layer(x, state)
    assert layer.dispatches[0][0] == f"{path}_{model}"
    assert torch.equal(first, second)
    for key, value in state.tensors().items():
        assert torch.equal(value, saved[key]), key
    for name, value in layer.initial_params.items():
        assert torch.equal(value.detach(), initial[name]), name


def test_projection_weight_edits_take_effect_at_once():
    """Whatever way a projection weight changes (in place, through .data, a state_dict), the next call
    reads it: the layer keeps no copy of the weights."""
    torch.manual_seed(0)
    layer = TTTLayer(16, 2, mini_batch_size=4)
    x = torch.randn(1, 8, 16)
    fresh = TTTLayer(16, 2, mini_batch_size=4)
    with torch.no_grad():
        layer(x)
        layer.q_proj.weight.mul_(1.5)  # an in-place edit
        fresh.load_state_dict(layer.state_dict())
        torch.testing.assert_close(layer(x)[0], fresh(x)[0], rtol=0, atol=0)
        layer.learnable_ttt_lr_weight.data.normal_()  # an edit through .data (no version bump)
        layer.v_proj.weight.data.mul_(0.5)
        fresh.load_state_dict(layer.state_dict())
        torch.testing.assert_close(layer(x)[0], fresh(x)[0], rtol=0, atol=0)
        layer.load_state_dict(
            {k: v * 0.9 if k.startswith("k_proj") else v for k, v in layer.state_dict().items()}
        )
        fresh.load_state_dict(layer.state_dict())
        torch.testing.assert_close(layer(x)[0], fresh(x)[0], rtol=0, atol=0)
    with_grad, _ = layer(x)  # gradients reach the projections
    with_grad.sum().backward()
    assert layer.q_proj.weight.grad is not None and layer.k_proj.weight.grad is not None


def test_fused_torch_never_modifies_weights_of_a_layer_without_bias():
    """A bias-less layer's weight is not copied by folding; the in-place update must copy it itself."""
    from innerloop.core.protocol import AffineLayer
    from innerloop.kernels.fused_torch import make_fused_forward

    generator = torch.Generator().manual_seed(0)
    xq, xk, xv = (torch.randn(1, 2, 8, 4, generator=generator) for _ in range(3))
    weight = torch.randn(1, 2, 4, 4, generator=generator)
    before = weight.clone()
    with torch.no_grad():
        _, new = make_fused_forward((AffineLayer("W1", None, None),))(
            xq,
            xk,
            xv,
            torch.full((1, 2, 8), 0.1),
            torch.ones(4),
            {"W1": weight},
            torch.ones(2, 4),
            torch.zeros(2, 4),
            1e-6,
        )
    assert torch.equal(weight, before) and not torch.equal(new["W1"], before)
