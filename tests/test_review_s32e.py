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


# --- the chunked delta rule's non-finite path (b266abc) and what TTTLayer's docstring says of it --------


def test_delta_chunk_nan_reaches_no_earlier_output_and_the_layer_docstring_says_so() -> None:
    """b266abc made ``delta_chunk`` run its token loop on a NaN input, so the NaN no longer reaches its
    64-token chunk's earlier outputs (ops.scan's docstring and delta_chunk/README.md were updated); the
    ``non_finite`` entry of ``TTTLayer``'s docstring still said it spread to 'a chunked
    kernel's whole chunk: delta_chunk's 64 tokens'."""
    from innerloop import TTTLayer

    torch.manual_seed(0)
    options = {"inner_model": "matrix", "mini_batch_size": 1, "inner_norm": False, "inner_residual": False}
    layer = TTTLayer(hidden_size=16, num_heads=2, kernel="delta_chunk", non_finite="ignore", **options)
    x = torch.randn(1, 100, 16)
    x[0, 70] = float("nan")
    with torch.no_grad():
        y, _ = layer(x)
    assert layer.last_dispatch[0] == "delta_chunk"
    finite = torch.isfinite(y[0]).all(-1)
    assert finite[:70].all() and not finite[70:].any()
    doc = " ".join((TTTLayer.__doc__ or "").split())
    assert "64 tokens" not in doc and "whole chunk" not in doc
    assert "on every path (the chunked ``delta_chunk`` kernel runs its token loop then)" in doc
