"""Review s46a (issues 4 and 5: the Triton TTT kernels and TTT-E2E).

- The Triton kernels' public ``forward`` and ``decode`` refuse an ``eps`` that is not a finite number in
  (0, 1) and a normal float32, naming it: a negative or nan one made every output nan, silently (measured
  under ``TRITON_INTERPRET=1``; the check runs before any launch, so these tests need no interpreter).
- The official TTT-E2E loader's warm-up fix is beside its tests
  (``tests/interop/test_ttt_e2e.py::test_a_warm_up_longer_than_the_run_still_gives_the_official_logits``).
"""

from __future__ import annotations

import math

import pytest
import torch

from innerloop.kernels.triton.ttt_linear import fused as linear
from innerloop.kernels.triton.ttt_mlp import fused as mlp


def _chunk_inputs(model: str) -> tuple:
    B, H, T, f, K = 1, 1, 4, 16, 4
    params = (
        {"W1": torch.zeros(B, H, f, f), "b1": torch.zeros(B, H, 1, f)}
        if model == "linear"
        else {
            "W1": torch.zeros(B, H, f, 4 * f),
            "b1": torch.zeros(B, H, 1, 4 * f),
            "W2": torch.zeros(B, H, 4 * f, f),
            "b2": torch.zeros(B, H, 1, f),
        }
    )
    x = torch.zeros(B, H, T, f)
    return x, x, x, torch.zeros(B, H, T), torch.ones(K), params, torch.ones(H, f), torch.zeros(H, f)


@pytest.mark.parametrize("module", [linear, mlp], ids=["linear", "mlp"])
@pytest.mark.parametrize("eps", [-1.0, 0.0, 1e-45, math.nan, math.inf, 1.0, True])
def test_triton_kernels_refuse_an_eps_outside_zero_one_naming_it(module, eps) -> None:
    model = "linear" if module is linear else "mlp"
    xq, xk, xv, lr, tau, params, ln_weight, ln_bias = _chunk_inputs(model)
    with pytest.raises(ValueError, match=r"eps=.* \(the inner LayerNorm's epsilon\) must be a finite number"):
        module.forward(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps=eps)
    token = xq[:, :, 0]
    pending = {k: torch.zeros_like(v) for k, v in params.items()}
    with torch.no_grad(), pytest.raises(ValueError, match=r"eps=.* must be a finite number in \(0, 1\)"):
        module.decode(token, token, token, lr[:, :, 0], tau[0], params, pending, ln_weight, ln_bias, eps=eps)
