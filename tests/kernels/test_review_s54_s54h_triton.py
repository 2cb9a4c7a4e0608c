"""Review s54h: the Triton helpers' clamps drop no NaN (``kernels/triton/common_triton.py``).

``gelu_tanh_grad`` and ``gelu_tanh_grad2`` limited their argument with
``tl.minimum(tl.maximum(x, -100), 100)``. Triton's min/max default to ``PropagateNan.NONE``
(``minnumf``/``maxnumf``): ``max(NaN, -100)`` is -100, on a GPU and under the interpreter alike
(``np.fmax``), so a NaN pre-activation gave the finite derivative 0 where the torch path gives NaN --
measured here before the fix: ``gelu_tanh_grad(NaN) = 0.0``, ``gelu_tanh_grad2(NaN) = 0.0``. They now
clamp with :func:`clamp_keeping_nan` (two ``tl.where``), as ``tanh`` did; on finite inputs and +-inf the
helpers' outputs and a TTT-MLP kernel's forward and gradients were compared bitwise before/after (2**16
arguments in [-120, 120] and N(0, 16), +-0, +-inf, +-1e30; B=1, T=10, K=5, f=16): identical.
"""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = [pytest.mark.triton_interpreter, pytest.mark.slow]  # Triton's interpreter, in its child process

triton = pytest.importorskip("triton", reason="the Triton kernels need triton (the test extra installs it)")
tl = pytest.importorskip("triton.language")

from innerloop.kernels.triton.common_triton import (  # noqa: E402
    clamp_keeping_nan,
    gelu_tanh_grad,
    gelu_tanh_grad2,
    tanh,
)


@triton.jit
def _apply(x_ptr, clamped_ptr, t_ptr, g1_ptr, g2_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    x = tl.load(x_ptr + i)
    tl.store(clamped_ptr + i, clamp_keeping_nan(x, -100.0, 100.0))
    tl.store(t_ptr + i, tanh(x))
    tl.store(g1_ptr + i, gelu_tanh_grad(x))
    tl.store(g2_ptr + i, gelu_tanh_grad2(x))


def test_nan_lanes_stay_nan_through_the_clamp_and_the_gelu_derivatives() -> None:
    nan = math.nan
    x = torch.tensor([nan, 1.0, -nan, 200.0, -200.0, nan, 0.5, -math.inf])
    outputs = [torch.empty_like(x) for _ in range(4)]
    _apply[(1,)](x, *outputs, N=len(x))
    is_nan = x.isnan()
    for name, got in zip(("clamp", "tanh", "gelu_tanh_grad", "gelu_tanh_grad2"), outputs, strict=True):
        assert got[is_nan].isnan().all(), (name, got.tolist())
        assert got[~is_nan].isfinite().all(), (name, got.tolist())  # the other lanes are untouched
    clamped = outputs[0]
    assert clamped[~is_nan].tolist() == [1.0, 100.0, -100.0, 0.5, -100.0]
