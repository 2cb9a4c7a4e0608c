"""Review s29b: the Hugging Face integration, the family layers and the CLI, probed through the public
API. Each test is one finding (the commit that fixes it names it)."""

from __future__ import annotations

import pytest
import torch

from innerloop.ops import scan

MATRIX = dict(inner_model="matrix", inner_norm=False, inner_residual=False)


def _qkv_lr(tokens: int = 5) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, tokens, 3, dtype=torch.float64) for _ in range(3))
    return q, k, v, torch.rand(1, 2, tokens, dtype=torch.float64)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_scan_refuses_a_non_finite_lr_by_name(bad: float) -> None:
    """A NaN or infinite learning rate ran silently (all outputs and weights NaN), where a non-finite
    decay or momentum is refused by name."""
    q, k, v, lr = _qkv_lr()
    lr[0, 1, 2] = bad
    with pytest.raises(ValueError, match="lr must be finite"):
        scan(q, k, v, lr, **MATRIX)


def test_scan_refuses_a_non_finite_token_scale_by_name() -> None:
    q, k, v, lr = _qkv_lr()
    tau = torch.tensor([1.0, float("nan")], dtype=torch.float64)
    with pytest.raises(ValueError, match="token_scale must be finite"):
        scan(q, k, v, lr, mini_batch_size=2, token_scale=tau, **MATRIX)
