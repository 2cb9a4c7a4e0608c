"""Review s53j: innerloop.testing against wrong plugins nobody tried (see the report of s53j)."""

from __future__ import annotations

import time

import pytest
import torch

from innerloop.core.protocol import InnerTask, Views
from innerloop.core.state import TTTState
from innerloop.plugins.optimizers.minibatch_gd import MiniBatchGD
from innerloop.testing import checks


class OneTokenFastPathMixingHeads(MiniBatchGD):
    """A rule with a fast path for one-token mini-batches (DeltaNet's K) that reads head 0's outputs
    into every head's: right whenever one head is run, or the mini-batches are longer."""

    name = "one_token_fast_path_mixing_heads"

    def forward(
        self,
        state: TTTState,
        task: InnerTask,
        views: Views,
        lr: torch.Tensor,
        tau: torch.Tensor,
        decay: torch.Tensor | None = None,
        decay_log: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, TTTState]:
        out, new_state = super().forward(state, task, views, lr, tau, decay=decay, decay_log=decay_log)
        if task.mini_batch_size == 1:
            out = out + 1e-3 * (out[:, :1] - out)  # nothing at one head
        return out, new_state


def test_default_shapes_run_one_token_mini_batches_at_several_sequences_heads_and_features():
    """check_update_rule met K = 1 (DeltaNet's, the docs' worked example's) only at UNIT_CHECK_SHAPE, where
    batch, heads and head dim are all 1: a K = 1 path that mixes sequences, heads or features passed."""
    shapes = [shape for shape, _ in checks._default_check_shapes({"norm": True, "residual": True}, {})]
    one_token = [s for s in shapes if s["mini_batch_size"] == 1]
    assert any(s["batch"] > 1 and s["heads"] > 1 and s["head_dim"] > 2 for s in one_token), one_token


@pytest.mark.slow
def test_check_update_rule_default_shapes_catch_a_one_token_path_that_mixes_heads():
    """check_update_rule's values at its default shapes of one-token mini-batches (what it runs with no
    shape given; here in one wrapping, linear model and reconstruction, to stay within seconds) name
    the rule at K=1. Before, the only such shape was UNIT_CHECK_SHAPE (one head): DID NOT RAISE."""
    from innerloop.registry import get_registry

    registry = get_registry()
    model, loss = registry.inner_model("linear"), registry.inner_loss("reconstruction")
    check = checks._RuleCheck(OneTokenFastPathMixingHeads(), None, 0, checks.FLOAT64_TOLERANCE)
    wrapping = {"norm": True, "residual": True}
    start = time.perf_counter()
    with pytest.raises(AssertionError, match=r"one_token_fast_path_mixing_heads .*K=1"):
        for shape, each_wrapping in checks._default_check_shapes(wrapping, {}):
            if shape["mini_batch_size"] == 1:
                checks._check_rule_on(check, model, loss, {**shape, **each_wrapping})
    assert time.perf_counter() - start < 5.0
