"""Review s49h (issue 9, trust): unusual but valid input.

A correct kernel must not be refused for the whole process because the first block it met was data on
which no comparison can tell a right kernel from a wrong one, though nothing flags it as weak: targets
that the starting inner weights already fit exactly (the inner loss is 0, so the gradient of every
learning rate is rounding noise on both paths, and their relative difference is of order one).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from innerloop.kernels.first_use import KernelCheckWarning
from innerloop.ops import scan
from innerloop.registry import isolated_registry


def _already_fitted_block(seed: int) -> tuple[torch.Tensor, ...]:
    """q, k, v, lr and starting weights where v = k + LN(k W + b): the inner model fits every pair."""
    generator = torch.Generator().manual_seed(seed)
    batch, heads, tokens, features = 2, 2, 8, 8
    q, k = (torch.randn(batch, heads, tokens, features, generator=generator) for _ in range(2))
    weight = torch.randn(batch, heads, features, features, generator=generator) / features**0.5
    bias = torch.randn(batch, heads, 1, features, generator=generator)
    v = k + torch.nn.functional.layer_norm(k @ weight + bias, (features,), eps=1e-6)
    lr = (0.1 * torch.rand(batch, heads, tokens, generator=generator)).requires_grad_()
    return q.requires_grad_(), k, v, lr, weight, bias


@pytest.mark.slow  # 1.2 s: four probes of two mini-batches with gradients, one of them in float64
@pytest.mark.usefixtures("cpu_kernels")
def test_a_right_kernel_is_not_refused_on_data_its_starting_weights_already_fit():
    with isolated_registry(), warnings.catch_warnings():
        warnings.simplefilter("error", KernelCheckWarning)  # failed before: "cpu_ttt_linear: failed its
        # first-use check ... the gradient of lr differs by a relative RMS error of 1.23"
        q, k, v, lr, weight, bias = _already_fitted_block(0)
        fitted: list[tuple[str, str]] = []
        out, _ = scan(q, k, v, lr, mini_batch_size=4, initial={"W1": weight, "b1": bias}, dispatches=fitted)
        out.sum().backward()
        assert fitted[0][0] == "torch" and "deferred" in fitted[0][1].lower(), fitted
        # the next, ordinary block of the same kind runs the kernel
        q, k, v, lr, weight, bias = _already_fitted_block(1)
        v = torch.randn_like(v)
        later: list[tuple[str, str]] = []
        out, _ = scan(q, k, v, lr, mini_batch_size=4, initial={"W1": weight, "b1": bias}, dispatches=later)
        assert later[0][0] != "torch", later


def test_a_layer_built_under_a_float64_default_keeps_its_token_index_in_float64():
    # The reference makes token_idx as 1.0 / torch.arange(1, K + 1): in the default dtype. innerloop made
    # it in float32 always, so a model built under torch.set_default_dtype(torch.float64) scaled its
    # inner gradients by 1/3 rounded to float32 (3e-8 relative), silently, and a .to() kept that.
    from innerloop import TTTLayer

    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        layer = TTTLayer(8, 2, mini_batch_size=3)
    finally:
        torch.set_default_dtype(before)
    exact = 1.0 / torch.arange(1, 4, dtype=torch.float64)
    assert layer.token_idx.dtype == torch.float64 and torch.equal(layer.token_idx, exact)
    moved = layer.to("cpu")  # a cast under the float32 default keeps the values the buffer held
    assert torch.equal(moved.token_idx, exact)
    # a float32 layer cast to float64 holds float32's 1/3 widened, as the reference's .double() does
    assert torch.equal(TTTLayer(8, 2, mini_batch_size=3).double().token_idx, exact.float().double())
