"""Checks that a mutation review found missing: each test fails on a small plausible bug that the rest
of the fast loop let through (the token-index scale of weights returned mid-mini-batch, the clamp of
tau at 0, the state carried between inference chunks, RoPE's real-arithmetic branch, the fused torch
path's numbers and its copy of the caller's weights)."""

from __future__ import annotations

import pytest
import torch

from innerloop import TTTLayer
from innerloop.core.functional import apply_rope_interleaved, rope_cos_sin, rope_inverse_frequencies
from innerloop.core.protocol import AffineLayer
from innerloop.kernels.fused_torch import make_fused_forward
from innerloop.kernels.reference import reference_kernel
from innerloop.ops import scan
from innerloop.registry import get_registry
from innerloop.testing import make_problem


@pytest.mark.parametrize("rule", ["minibatch_gd", "dual_form"])
@pytest.mark.parametrize("model", ["linear", "mlp"])
@pytest.mark.parametrize("decay", [False, True])
def test_the_weights_of_a_state_stopped_mid_mini_batch_are_the_ones_its_last_token_read(rule, model, decay):
    """``current_weights`` (what ``ops.scan`` returns, and what the diagnostics read) after a partial
    mini-batch: the last token's output is the inner model's prediction with exactly those weights,
    for every stopping offset (tau differs per offset, so reading another offset's scale is caught)."""
    registry = get_registry()
    for tokens in (1, 2, 3, 6, 7):  # offsets 1, 2, 3 of a 4-token mini-batch, in the first and second
        problem = make_problem(
            registry.inner_model(model), registry.inner_loss("reconstruction"), tokens=tokens, decay=decay
        )
        problem = problem.for_rule(registry.update_rule(rule))
        out, state = problem.run(registry.update_rule(rule))
        weights = state.current_weights(problem.tau)
        last = problem.views.query[:, :, -1:]
        torch.testing.assert_close(
            problem.task.predict(weights, last), out[:, :, -1:], rtol=1e-12, atol=1e-12
        )


def test_ops_scan_returns_the_weights_the_last_token_of_a_partial_mini_batch_read() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 7, 4, dtype=torch.float64) for _ in range(3))
    lr = torch.rand(2, 2, 7, dtype=torch.float64)
    tau = torch.tensor([1.0, 0.5, 0.25, 0.125], dtype=torch.float64)
    out, weights = scan(
        q, k, v, lr, mini_batch_size=4, token_scale=tau, inner_norm=False, inner_residual=False
    )
    predicted = q[:, :, -1:] @ weights["W1"] + weights["b1"]
    torch.testing.assert_close(predicted, out[:, :, -1:], rtol=1e-12, atol=1e-12)


def test_a_learned_token_index_offset_below_minus_the_index_clamps_tau_to_zero() -> None:
    """tau = max(0, 1/(i+1) + offset_i): an offset far below -1/(i+1) (learning can drive it there)
    takes no step, exactly like tau = 0; unclamped it would step uphill on the inner loss."""
    torch.manual_seed(0)
    layer = TTTLayer(16, 2, mini_batch_size=4, kernel="torch").double()
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    with torch.no_grad():
        layer.learnable_token_idx.copy_(-layer.token_idx)
        at_zero, _ = layer(x)
        layer.learnable_token_idx.fill_(-5.0)
        below_zero, _ = layer(x)
    _, tau = layer.inner_learning_rates(x)
    assert torch.equal(tau, torch.zeros_like(tau))
    assert torch.equal(below_zero, at_zero)


def test_inference_read_in_chunks_equals_the_whole_call() -> None:
    """Without autograd a call longer than ``inference_chunk_size`` is read chunk by chunk with the
    state carried; with autograd it is one chunk. Both give the same outputs and state."""
    torch.manual_seed(0)
    layer = TTTLayer(16, 2, mini_batch_size=4, inference_chunk_size=4, kernel="torch").double()
    x = torch.randn(2, 14, 16, dtype=torch.float64)
    whole, whole_state = layer(x)
    with torch.no_grad():
        chunked, chunked_state = layer(x)
    torch.testing.assert_close(chunked, whole.detach(), rtol=1e-12, atol=1e-12)
    for key, value in whole_state.params.items():
        torch.testing.assert_close(chunked_state.params[key], value.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(
            chunked_state.pending[key], whole_state.pending[key].detach(), rtol=1e-12, atol=1e-12
        )


@pytest.mark.parametrize("layout", ["offset", "bfloat16"])
def test_ropes_real_arithmetic_branch_equals_its_complex_branch(layout) -> None:
    """The real-arithmetic branch (a view at a storage offset, bfloat16, torch.compile) rotates as the
    complex branch does (a contiguous float32 tensor)."""
    torch.manual_seed(0)
    base = torch.randn(2, 5, 3, 9)
    x = base[..., 1:]  # [2, 5, 3, 8], at storage offset 1
    cos, sin = rope_cos_sin(torch.arange(5), rope_inverse_frequencies(8, 10000.0), torch.float32)
    complex_branch = apply_rope_interleaved(x.contiguous(), cos[:, None], sin[:, None])
    if layout == "offset":
        real_branch = apply_rope_interleaved(x, cos[:, None], sin[:, None])
        torch.testing.assert_close(real_branch, complex_branch, rtol=1e-6, atol=1e-6)
    else:
        low = x.contiguous().to(torch.bfloat16)
        real_branch = apply_rope_interleaved(low, cos[:, None].bfloat16(), sin[:, None].bfloat16())
        wanted = apply_rope_interleaved(low.float(), cos[:, None], sin[:, None])
        torch.testing.assert_close(real_branch.float(), wanted, rtol=2e-2, atol=2e-2)


def _kernel_inputs(tokens: int, heads: int = 2, head_dim: int = 4, batch: int = 3):
    generator = torch.Generator().manual_seed(1)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale

    xq, xk, xv = (randn(batch, heads, tokens, head_dim) for _ in range(3))
    lr = torch.rand(batch, heads, tokens, generator=generator, dtype=torch.float64) * 0.5
    tau = 1.0 / torch.arange(1, 5, dtype=torch.float64) + randn(4, scale=0.05)
    ln_weight, ln_bias = 1.0 + randn(heads, head_dim, scale=0.1), randn(heads, head_dim, scale=0.1)
    return xq, xk, xv, lr, tau, ln_weight, ln_bias


@pytest.mark.parametrize("model_name", ["linear", "mlp"])
def test_the_fused_torch_forward_equals_the_torch_dual_form_over_three_mini_batches(model_name) -> None:
    """The fused path against the pure-torch oracle directly, in float64: outputs, final weights and
    every gradient, over three 4-token mini-batches, with weights that differ per sequence. (The
    layer's first-use probe would refuse a wrong fused kernel and fall back quietly, and it reads only
    two mini-batches, so the layer-level tests alone do not pin this path's numbers.)"""
    registry = get_registry()
    model = registry.inner_model(model_name)
    xq, xk, xv, lr, tau, ln_weight, ln_bias = _kernel_inputs(tokens=12)
    generator = torch.Generator().manual_seed(2)
    per_head = model.init_params(2, 4, generator=generator)
    params = {
        k: v.double().unsqueeze(0).expand(3, *v.shape)
        + 0.1 * torch.randn(3, *v.shape, generator=generator, dtype=torch.float64)
        for k, v in per_head.items()
    }
    fused = make_fused_forward(model.stack)
    oracle, _ = reference_kernel(model, registry.inner_loss("reconstruction"))
    results = []
    for forward in (fused, oracle):
        leaves = [t.clone().requires_grad_(True) for t in (xq, xk, xv, lr, tau, ln_weight, ln_bias)]
        leaf_params = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        q, k, v, rates, scales, weight, bias = leaves
        out, new = forward(q, k, v, rates, scales, leaf_params, weight, bias, 1e-6)
        probe = torch.Generator().manual_seed(3)
        total = (out * torch.randn(out.shape, generator=probe, dtype=out.dtype)).sum()
        total = total + sum(
            (w * torch.randn(w.shape, generator=probe, dtype=w.dtype)).sum() for w in new.values()
        )
        grads = torch.autograd.grad(total, [*leaves, *leaf_params.values()])
        results.append((out.detach(), {k: w.detach() for k, w in new.items()}, grads))
    (out, new, grads), (want_out, want_new, want_grads) = results
    torch.testing.assert_close(out, want_out, rtol=1e-10, atol=1e-10)
    assert new.keys() == want_new.keys()
    for key in new:
        torch.testing.assert_close(new[key], want_new[key], rtol=1e-10, atol=1e-10)
    for got, wanted in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, wanted, rtol=1e-9, atol=1e-9)


def test_the_fused_forward_of_a_stack_without_bias_leaves_the_callers_weights_alone() -> None:
    """Without a graph the fused path updates its weights in place: on copies of the caller's, also
    for a stack with no bias (where no bias fold copies them on the way)."""
    fused = make_fused_forward((AffineLayer("W", None, None),))
    xq, xk, xv, lr, tau, ln_weight, ln_bias = _kernel_inputs(tokens=8)
    params = {"W": torch.randn(3, 2, 4, 4, dtype=torch.float64)}
    before = params["W"].clone()
    with torch.no_grad():
        fused(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, 1e-6)
    assert torch.equal(params["W"], before)
