"""Review s49g: the Triton kernels' ``tanh`` (``kernels/triton/common_triton.py``), behind TTT-MLP's
tanh-GELU and its two derivatives, computed ``exp(2x)``, which overflows for ``x`` above ~44 in float32:
the value saturated correctly (``1 - 2/inf = 1``), but under the interpreter numpy printed
``RuntimeWarning: overflow encountered in exp`` once per call (three per TTT-MLP block), and a run with
``-W error`` failed. The argument is now clamped to [-20, 20] (tanh(20) = 1 - 8.5e-18: exactly 1 in float32
and float64, so no value changes); a NaN still gives NaN."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

pytestmark = [pytest.mark.triton_interpreter, pytest.mark.slow]  # Triton's interpreter, in its child process

triton = pytest.importorskip("triton", reason="the Triton kernels need triton (the test extra installs it)")
tl = pytest.importorskip("triton.language")

from innerloop.kernels.triton.common_triton import gelu_tanh, gelu_tanh_grad, gelu_tanh_grad2, tanh  # noqa: E402


@triton.jit
def apply(x_ptr, t_ptr, g_ptr, g1_ptr, g2_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    x = tl.load(x_ptr + i)
    tl.store(t_ptr + i, tanh(x))
    tl.store(g_ptr + i, gelu_tanh(x))
    tl.store(g1_ptr + i, gelu_tanh_grad(x))
    tl.store(g2_ptr + i, gelu_tanh_grad2(x))


def test_gelu_tanh_and_its_derivatives_saturate_without_an_overflow_warning() -> None:
    values = [
        -1e5,
        -1e4,
        -100.0,
        -45.0,
        -20.0,
        -9.5,
        -1.0,
        0.0,
        0.5,
        3.0,
        9.5,
        20.0,
        45.0,
        100.0,
        1e4,
        math.nan,
    ]
    x = torch.tensor(values)
    outputs = [torch.empty_like(x) for _ in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's RuntimeWarning under the interpreter is an error here
        apply[(1,)](x, *outputs, N=len(values))
    got_tanh, got_gelu = outputs[0], outputs[1]
    finite = ~x.isnan()
    torch.testing.assert_close(got_tanh[finite], torch.tanh(x[finite]), rtol=0, atol=2e-7)
    want_gelu = torch.nn.functional.gelu(x[finite].double(), approximate="tanh").float()
    torch.testing.assert_close(got_gelu[finite], want_gelu, rtol=1e-6, atol=2e-7)
    assert got_tanh[~finite].isnan().all() and got_gelu[~finite].isnan().all()
