"""Review s53c: the Triton kernels on inputs walled in by NaN, at shapes the other tests do not draw.

Under the interpreter an out-of-bounds load is not caught: it reads whatever lies beside the tensor, and
the padded rows it feeds are then multiplied by a zero learning rate, so finite garbage leaves no trace
on CPU while on a GPU the same read may be NaN (or fault). Here every input, weight and incoming gradient
is a contiguous view in the middle of a larger buffer filled with NaN (``storage_offset`` > 0, NaN on
both sides, wider than a padded tile can reach), and every output buffer starts as NaN
(``POISON_OUTPUTS``): an unmasked read anywhere poisons the results, an unwritten output stays NaN.
Dropping the mask of ``load_rows`` was measured to turn every output and gradient NaN here.

Shapes: batch 3 (programs past the first), mini-batch 1 (T = 1), 5 (padded to 16, the last
mini-batch's padded rows past the end of T) and 3 with head dim 128 (TTT-Linear's largest, with 8 warps;
the hypothesis test draws head dims up to 64), TTT-Linear's last checkpoint group cut short (3
mini-batches in groups of 2). Tolerance: the float32 one of test_triton_kernels.py.
"""

from __future__ import annotations

import pytest
import torch
from kernel_testing import make_inputs

from innerloop.core.functional import relative_error
from innerloop.kernels.triton import ttt_linear, ttt_mlp

pytestmark = [pytest.mark.triton_interpreter, pytest.mark.slow]

TOL = 1e-4  # float32 kernels vs the float32 reference (as test_triton_kernels.py)
PACKAGES = {"linear": (ttt_linear, ("W1", "b1")), "mlp": (ttt_mlp, ("W1", "b1", "W2", "b2"))}
NAMES = ("xq", "xk", "xv", "lr", "tau")


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    for package, _ in PACKAGES.values():
        monkeypatch.setattr(package.fused, "POISON_OUTPUTS", True)


def walled(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values in a contiguous view of a larger NaN-filled buffer, NaN on both sides."""
    n = t.numel()
    pad = max(4096, n)  # beyond the farthest a padded tile (64 rows of 4 * 128) reaches past a program
    buffer = torch.full((n + 2 * pad,), float("nan"), dtype=t.dtype)
    view = buffer[pad : pad + n].view(t.shape)
    with torch.no_grad():
        view.copy_(t)
    assert view.is_contiguous() and view.storage_offset() == pad
    return view.requires_grad_(t.requires_grad)


def _leaves(keys, inputs):
    xq, xk, xv, lr, tau, params, ln_weight, ln_bias = inputs
    return [xq, xk, xv, lr, tau, *(params[k] for k in keys), ln_weight, ln_bias]


@pytest.mark.parametrize(
    "model,B,H,K,n_mb,f",
    [
        ("linear", 3, 1, 1, 1, 16),
        ("mlp", 3, 1, 1, 1, 16),
        ("linear", 1, 2, 5, 3, 16),
        ("mlp", 1, 1, 5, 1, 16),  # one mini-batch: ~2.3 s interpreted per TTT-MLP mini-batch
        ("linear", 2, 1, 3, 3, 128),
    ],
)
def test_walled_inputs_forward_weights_and_every_gradient_match_the_reference(model, B, H, K, n_mb, f):
    package, keys = PACKAGES[model]
    given = make_inputs(B, H, K * n_mb, f, K, model, seed=K + f, requires_grad=True)
    xq, xk, xv, lr, tau, params, ln_weight, ln_bias = given
    inputs = (
        *(walled(t) for t in (xq, xk, xv, lr, tau)),
        {k: walled(v) for k, v in params.items()},
        walled(ln_weight),
        walled(ln_bias),
    )
    out, new = package.fused.forward(*inputs, checkpoint_every=2)
    out_ref, new_ref = package.naive.forward(*given)
    assert relative_error(out, out_ref) <= TOL
    for key in keys:
        assert relative_error(new[key], new_ref[key]) <= TOL, key
    gen = torch.Generator().manual_seed(K)
    cotangents = [
        torch.randn(out.shape, generator=gen),
        *(torch.randn(new[k].shape, generator=gen) for k in keys),
    ]
    grads = torch.autograd.grad(
        [out, *(new[k] for k in keys)], _leaves(keys, inputs), [walled(c) for c in cotangents]
    )
    grads_ref = torch.autograd.grad([out_ref, *(new_ref[k] for k in keys)], _leaves(keys, given), cotangents)
    for name, grad, grad_ref in zip((*NAMES, *keys, "ln_weight", "ln_bias"), grads, grads_ref, strict=True):
        assert relative_error(grad, grad_ref) <= TOL, name


@pytest.mark.parametrize(
    "model,B,H,K,f", [("linear", 3, 1, 2, 16), ("mlp", 3, 1, 2, 16), ("linear", 1, 1, 2, 128)]
)
def test_walled_decode_output_weights_and_pending_sums_match_the_reference(model, B, H, K, f):
    # K + 1 tokens: a mini-batch closed (weights committed, sums reset) and one token into the next
    package, keys = PACKAGES[model]
    xq, xk, xv, lr, tau, params, ln_weight, ln_bias = make_inputs(B, H, K + 1, f, K, model, seed=f)
    pending = {k: torch.zeros_like(v) for k, v in params.items()}
    state, state_ref = (params, pending), (params, pending)
    with torch.no_grad():
        for t in range(K + 1):
            token = (xq[:, :, t], xk[:, :, t], xv[:, :, t], lr[:, :, t], tau[t % K])
            walls = [{k: walled(v) for k, v in part.items()} for part in state]
            last = t % K == K - 1
            out, *state = package.fused.decode(
                *(walled(x) for x in token), *walls, walled(ln_weight), walled(ln_bias), 1e-6, last
            )
            out_ref, *state_ref = package.naive.decode(*token, *state_ref, ln_weight, ln_bias, 1e-6, last)
            assert relative_error(out, out_ref) <= TOL, t
            for part, part_ref in zip(state, state_ref, strict=True):
                for key in keys:
                    assert relative_error(part[key], part_ref[key]) <= TOL, (t, key)
