"""Review s32e: a last look at the day's changes (f6da202..). Each test here found something (a
regression test), unless its docstring says it covers a promise no other test covered."""

from __future__ import annotations

import pytest
import torch

from innerloop.core.ops import scan

# --- minibatch_gd's planned primal form (b661ad3) on an empty batch ------------------------------------


@pytest.mark.parametrize("inner_model", ["linear", "mlp"])
def test_minibatch_gd_with_decay_takes_an_empty_batch(inner_model: str) -> None:
    """b661ad3 reshaped each gradient with ``-1`` for its trailing size, which torch cannot infer from
    a batch of 0 sequences: ``scan(update_rule="minibatch_gd", decay=...)`` on ``B = 0`` (which
    ops.scan takes, tests/core/test_review_s17_core_inputs.py) raised 'cannot reshape tensor of 0
    elements' from inside the rule; it ran before."""
    q = torch.randn(0, 2, 12, 8)
    per_token = torch.rand(0, 2, 12)
    outputs, weights = scan(
        q, q, q, per_token, inner_model=inner_model, update_rule="minibatch_gd", decay=per_token
    )
    assert outputs.shape == (0, 2, 12, 8)
    assert weights and all(w.shape[:2] == (0, 2) for w in weights.values())
