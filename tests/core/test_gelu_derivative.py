"""The MLP inner model's activation derivative, checked against an independent oracle.

The dual form, the kernels and the autograd backward of our tanh-GELU all use
:func:`gelu_tanh_derivative`, so the checks that compare those paths with one another cannot see an error
in it. Torch's own autograd of ``F.gelu(approximate="tanh")`` can: it differs from the reference's
truncated constants by ~3e-10 in float64, and an error in a constant's fifth digit by ~1e-5.
"""

import torch
import torch.nn.functional as F

from innerloop.core.functional import gelu_tanh, gelu_tanh_derivative


def _torch_gelu_tanh_slope(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    (slope,) = torch.autograd.grad(F.gelu(x, approximate="tanh").sum(), x)
    return slope


def test_the_derivative_is_torchs_own_gelu_slope_up_to_the_truncated_constants() -> None:
    x = torch.linspace(-12.0, 12.0, 4097, dtype=torch.float64)
    gap = (gelu_tanh_derivative(x) - _torch_gelu_tanh_slope(x)).abs().max().item()
    assert gap <= 3e-9, f"gelu_tanh_derivative is {gap:.2e} off torch's slope of tanh-GELU"


def test_our_gelus_backward_is_torchs_own_gelu_slope() -> None:
    x = torch.linspace(-12.0, 12.0, 4097, dtype=torch.float64, requires_grad=True)
    (slope,) = torch.autograd.grad(gelu_tanh(x).sum(), x)
    gap = (slope - _torch_gelu_tanh_slope(x)).abs().max().item()
    assert gap <= 3e-9, f"gelu_tanh's backward is {gap:.2e} off torch's slope of tanh-GELU"
