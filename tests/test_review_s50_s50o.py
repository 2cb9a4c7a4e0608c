"""Review s50o: did handing the scan its forgetting gate as a log (0ec3b85) make the float32 gate gradients
worse under weak gates (``log a`` near 0)? Measured against float64 layers of the same weights, ec962eb
(before) vs after, seeds 0-9, T 256-4096: no.

- Titans, weak gates (``A_log = log 0.05``, ``dt = 1e-3``: ``log a`` about -5e-5), d/dA_log at T = 1024:
  median 6.2e-5 before, 7.7e-5 after over 10 seeds (each 1.1e-5 to 2.5e-4, better after in 6 of 10); on
  identical scan inputs the log path and the decay path give medians 5.6e-5 and 5.9e-5. Mixed and strong
  gates: 1e-6 to 3e-5 after (strong: 1e-3 to 8e-2 before, the loss 0ec3b85 fixed).
- Where the error is from: not the sum over tokens (sum |terms| / |sum| is 1 to 2 per head), not the
  rounding of the scan's inputs (a float64 scan of float32-rounded inputs: 2e-8 to 1.3e-7), but the float32
  scan with the inner LayerNorm: the same inputs without it give 2e-6 to 4e-6. ``x + LN(x W)`` is invariant
  to the scale of ``W``, so the derivative of every read w.r.t. a decay of ``W`` (``<z, dz>`` per row) is
  0 to 1e-11 relative (sum |z dz| / |<z, dz>| of 4e11 median under weak gates): the gate gradient is what
  remains after that cancellation, computed from float32 weights and adjoints in either gate form.
- Gated DeltaNet (no inner LayerNorm): 2e-7 to 3.4e-6, before and after the same.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from innerloop.core.family_layers import GatedDeltaNetLayer, TitansLayer
from innerloop.ops import scan

FP32_UNIT = 2.0**-24


def _relative(value: torch.Tensor, exact: torch.Tensor) -> float:
    return ((value.double() - exact).norm() / exact.norm()).item()


def _weak_gates(layer: torch.nn.Module) -> None:
    """``log a = -0.05 softplus(a_proj(x) + softplus^-1(1e-3))``: about -5e-5 per token."""
    with torch.no_grad():
        layer.A_log.fill_(math.log(0.05))
        layer.dt_bias.fill_(1e-3 + math.log(-math.expm1(-1e-3)))


def _gate_gradients(layer: torch.nn.Module, tokens: int) -> dict:
    """Relative errors of the float32 gate-parameter gradients against the float64 layer's."""
    layer64 = copy.deepcopy(layer).double()
    x = torch.randn(1, tokens, layer.hidden_size)
    weights = torch.randn(x.shape)
    (layer(x)[0] * weights).sum().backward()
    (layer64(x.double())[0] * weights.double()).sum().backward()
    names = ("A_log", "dt_bias", "a_proj.weight")
    return {n: _relative(layer.get_parameter(n).grad, layer64.get_parameter(n).grad) for n in names}


@pytest.mark.slow  # two Titans and two Gated DeltaNet layers, forward and backward: 0.5 s
def test_weak_gate_gradients_float32() -> None:
    """Weak gates, 256 tokens: Gated DeltaNet's gate gradients within 64 float32 units (measured 1.2e-6 to
    2e-6, 20 to 33 units; the same on ec962eb); Titans' A_log within 1e-4 (measured 1.8e-5 after, 2.0e-5
    on ec962eb: the inner LayerNorm's cancellation, see the module docstring)."""
    torch.manual_seed(0)
    gated_delta = GatedDeltaNetLayer(16, 2)
    _weak_gates(gated_delta)
    for name, error in _gate_gradients(gated_delta, 256).items():
        assert error <= 64 * FP32_UNIT, name
    torch.manual_seed(0)
    titans = TitansLayer(16, 2)
    _weak_gates(titans)
    for name, error in _gate_gradients(titans, 256).items():
        assert error <= 1e-4, name


def _momentum_scan_gate_gradient(problem: tuple, dtype: torch.dtype, inner_norm: bool) -> torch.Tensor:
    q, k, v, lr, log_a, momentum = (t.detach().to(dtype).requires_grad_() for t in problem)
    out, _ = scan(
        q,
        k,
        v,
        lr,
        inner_model="matrix",
        update_rule="momentum",
        mini_batch_size=16,
        inner_norm=inner_norm,
        inner_residual=inner_norm,
        momentum=momentum,
        decay_log=log_a,
    )
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (out * weights.to(dtype)).sum().backward()
    return log_a.grad


@pytest.mark.slow  # four momentum scans of 512 tokens with a backward: 0.6 s
@pytest.mark.parametrize("inner_norm", [False, True])
def test_titans_scan_gate_gradient_under_weak_gates(inner_norm: bool) -> None:
    """The momentum scan itself under weak gates (``log a`` in [-1e-4, -1e-5]), 512 tokens of unit keys:
    d/d log a within 64 float32 units of float64's (measured 8.6e-7 without the inner LayerNorm, 2.2e-6 with
    it; at 1024 tokens and seeds 0-2, 8e-7 to 1.3e-6 and 2.6e-7 to 8.5e-7: on these inputs the memory does
    not grow as the layer's does, and the LayerNorm's cancellation stays small)."""
    generator = torch.Generator().manual_seed(0)
    heads, tokens, width = 2, 512, 16
    q, k, v = (
        torch.randn(1, heads, tokens, width, generator=generator, dtype=torch.float64) for _ in range(3)
    )
    k = k / k.norm(dim=-1, keepdim=True)
    lr = 0.05 + 0.9 * torch.rand(1, heads, tokens, generator=generator, dtype=torch.float64)
    log_a = -1e-5 - 9e-5 * torch.rand(1, heads, tokens, generator=generator, dtype=torch.float64)
    momentum = torch.rand(1, heads, tokens, generator=generator, dtype=torch.float64)
    problem = (q, k, v, lr, log_a, momentum)
    exact = _momentum_scan_gate_gradient(problem, torch.float64, inner_norm)
    got = _momentum_scan_gate_gradient(problem, torch.float32, inner_norm)
    assert _relative(got, exact) <= 64 * FP32_UNIT
