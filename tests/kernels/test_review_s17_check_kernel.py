"""Review s17 (mutation testing, round 4), ``check_kernel``: the gradient through the final state's
weights is compared, not only that through the outputs (KC4), and the cases that start from a state
the torch path carried from a first call are needed (KC1). Each wrong kernel is ``fused_torch_linear``
changed in one way, wrong only on blocks of more mini-batches than dispatch's first-use probe reads
(two), so that ``check_kernel``'s own comparisons, not the probe, must catch it; the registry is reset
after each test, which removes it. The mutants are in /work/notes/review_s17_mutation4.md."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import innerloop
from innerloop.kernels import fused_torch
from innerloop.plugins.models.linear import LinearModel
from innerloop.registry import get_registry
from innerloop.testing import check_kernel

FORWARD = fused_torch.kernel_spec("linear", LinearModel().stack).forward


pytestmark = pytest.mark.usefixtures("fresh_global_registry")  # tests/conftest.py


def register_changed(name: str, forward) -> str:
    """``fused_torch_linear``'s spec under ``name`` with ``forward`` in place of its own."""
    base = fused_torch.kernel_spec("linear", get_registry().inner_model("linear").stack)
    innerloop.register_kernel(dataclasses.replace(base, name=name, priority=100, forward=forward))
    return name


def mini_batches(xq, tau) -> int:
    """How many mini-batches a kernel's block holds (``xq [B, H, T, f]``, ``tau [K]``)."""
    return xq.shape[2] // tau.shape[0]


def detaches_weights_of_long_blocks(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps):
    """Right values; on a block of four mini-batches or more, the weights it returns are cut from the
    graph (a backward that drops the gradient through them)."""
    out, new = FORWARD(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps)
    if mini_batches(xq, tau) >= 4:
        new = {k: v.detach() for k, v in new.items()}
    return out, new


def reads_row_0_on_long_blocks(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps):
    """On a block of three mini-batches or more, starts every sequence from sequence 0's incoming
    weights: right where they are the same in every row (a fresh layer's), wrong from a carried state."""
    if mini_batches(xq, tau) >= 3:
        params = {k: v[:1].expand_as(v) for k, v in params.items()}
    return FORWARD(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps)


def test_a_kernel_whose_returned_weights_are_detached_fails_on_their_gradient():
    # mini-batches of 2: the 8-token call is four whole mini-batches, all in the kernel's block, so
    # no output reads the weights it returns: only the final state's gradient shows the detach
    name = register_changed("s17_detached_weights", detaches_weights_of_long_blocks)
    with pytest.raises(
        AssertionError,
        match=r"check_kernel\('s17_detached_weights'\): head_dim 4 .*8 tokens from a fresh state, in one call, "
        r"grad: gradient of",
    ):
        check_kernel(name, head_dims=(4,), mini_batch_size=2)


def test_a_kernel_that_ignores_the_weights_of_a_carried_state_fails_naming_the_carried_case():
    # from a fresh state the kernel's three-mini-batch block starts from the same weights in every
    # row; only the call from a carried state gives it a long block with each row's own weights
    name = register_changed("s17_reads_row_0", reads_row_0_on_long_blocks)
    with pytest.raises(
        AssertionError,
        match=r"check_kernel\('s17_reads_row_0'\): head_dim 4 .*15 tokens from a state carried from a first "
        r"call, in one call, grad: output",
    ):
        check_kernel(name, head_dims=(4,))


def halves_lr_on_one_mini_batch(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps):
    """Right on blocks of two mini-batches or more; ``lr`` halved on a block of exactly one (what a call
    that starts and ends inside mini-batches, as a chat turn does, hands the kernel)."""
    if mini_batches(xq, tau) == 1:
        lr = lr * 0.5
    return FORWARD(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps)


def ignores_the_inner_norms_affine_on_long_blocks(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps):
    """On a block of three mini-batches or more, the inner LayerNorm's affine at its initial values
    (weight 1, bias 0) with the gradient right there: right on a fresh layer, wrong on a trained one."""
    if mini_batches(xq, tau) >= 3:
        ln_weight = torch.ones_like(ln_weight) + (ln_weight - ln_weight.detach())
        ln_bias = ln_bias - ln_bias.detach()
    return FORWARD(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps)


def test_a_kernel_wrong_on_a_block_of_one_mini_batch_fails_naming_the_split():
    # mutation round 5, KC2: only the split at k + k // 2 + 1 hands the kernel a one-mini-batch block
    name = register_changed("s17_one_mini_batch", halves_lr_on_one_mini_batch)
    with pytest.raises(
        AssertionError, match=r"check_kernel\('s17_one_mini_batch'\): head_dim 4 .*split at \[1, 7, 12\]"
    ):
        check_kernel(name, head_dims=(4,))


def test_a_kernel_that_ignores_the_inner_norms_affine_fails_at_an_odd_head_dim():
    # mutation round 5, KC7: the odd-head-dim twins must be moved away from their initial weights too
    name = register_changed("s17_no_norm_affine", ignores_the_inner_norms_affine_on_long_blocks)
    with pytest.raises(AssertionError, match=r"check_kernel\('s17_no_norm_affine'\): head_dim 5"):
        check_kernel(name, head_dims=(5,))
