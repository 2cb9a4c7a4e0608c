"""Review s53j: innerloop.testing against wrong plugins nobody tried (see the report of s53j)."""

from __future__ import annotations

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


@pytest.mark.slow  # reason: the naive loop at two shapes, cut at every default cut (~1-3 s)
def test_check_update_rule_default_shapes_catch_a_one_token_path_that_mixes_heads():
    """check_update_rule's values at its default shapes of one-token mini-batches (what it runs with no
    shape given; here in one wrapping, linear model and reconstruction, to stay within seconds) name
    the rule at K=1. Before, the only such shape was UNIT_CHECK_SHAPE (one head): DID NOT RAISE."""
    from innerloop.registry import get_registry

    registry = get_registry()
    model, loss = registry.inner_model("linear"), registry.inner_loss("reconstruction")
    check = checks._RuleCheck(OneTokenFastPathMixingHeads(), None, 0, checks.FLOAT64_TOLERANCE)
    wrapping = {"norm": True, "residual": True}
    with pytest.raises(AssertionError, match=r"one_token_fast_path_mixing_heads .*K=1"):
        for shape, each_wrapping in checks._default_check_shapes(wrapping, {}):
            if shape["mini_batch_size"] == 1 and shape["heads"] > 1:
                checks._check_rule_on(check, model, loss, {**shape, **each_wrapping})


class LearningRatesAsShares(MiniBatchGD):
    """A rule that handles each call's learning rates as shares of their mean (``lr / mean * mean``):
    exact for any rate above 0, NaN where a call's rates are all 0 (``base_lr=0``, which turns a
    family member's test-time training off; a stretch of invalid tokens)."""

    name = "learning_rates_as_shares"

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
        mean = lr.mean(dim=-1, keepdim=True)
        shares = lr / mean
        return super().forward(state, task, views, shares * mean, tau, decay=decay, decay_log=decay_log)


def test_zero_learning_rates_give_the_naive_loop_numbers():
    """No problem of check_update_rule had a learning rate of 0 (1402 calls of a default check
    recorded): a rule that is NaN at lr = 0 (base_lr=0) passed. check_zero_learning_rate names it, and
    check_update_rule runs it for every model, loss and wrapping."""
    with pytest.raises(
        AssertionError, match=r"learning_rates_as_shares \(linear, reconstruction\) with lr 0"
    ):
        checks.check_zero_learning_rate(LearningRatesAsShares(), "linear", "reconstruction")


@pytest.mark.slow  # reason: three rules and their naive loops, cut at every default cut (~0.2 s each)
def test_the_builtin_rules_pass_with_zero_learning_rates():
    for rule in ("dual_form", "minibatch_gd", "momentum"):
        gates = {"decay": True, "momentum": rule == "momentum"}
        checks.check_zero_learning_rate(rule, "linear", "next_token", tokens=6, mini_batch_size=2, **gates)


class PrefillFastPathWrongPastSixteenTokens(MiniBatchGD):
    """A rule with a fast path without autograd (evaluation, generation's prefill) that is wrong on a
    call of more than 16 tokens (a block boundary of an inference-only chunked form)."""

    name = "prefill_fast_path_wrong_past_16_tokens"

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
        if not torch.is_grad_enabled() and views.query.shape[2] > 16:
            out = torch.cat([out[:, :, :16], 1.001 * out[:, :, 16:]], dim=2)
        return out, new_state


@pytest.mark.slow  # reason: the no-grad modes at the default shapes, 150 tokens among them (~1-3 s)
def test_check_update_rule_runs_without_grad_at_its_default_shapes():
    """The values without autograd were checked at make_problem's shape only (11 tokens, K=4, head dim
    4: 480 no-grad calls of a default check recorded), so a no-grad fast path wrong past 16 tokens, more
    heads or another head dim passed. check_update_rule now runs them at its default shapes too."""
    from innerloop.registry import get_registry

    registry = get_registry()
    model, loss = registry.inner_model("linear"), registry.inner_loss("reconstruction")
    check = checks._RuleCheck(PrefillFastPathWrongPastSixteenTokens(), None, 0, checks.FLOAT64_TOLERANCE)
    with pytest.raises(
        AssertionError, match=r"prefill_fast_path_wrong_past_16_tokens .* under torch.no_grad"
    ):
        checks._check_default_shapes(check, model, loss, {}, {"norm": True, "residual": True}, {}, True)


def test_an_in_place_write_that_keeps_the_values_is_named_as_one():
    """A forward that writes into x in place without changing it (x.mul_(1.0), a clamp_ not met) left the
    values alike, so check_leaves_its_inputs passed it, and gradcheck's torch error (a leaf Variable ... in
    an in-place operation) was reported as 'differ from finite differences (a hand-written backward, or
    a term left out of it?)'. The message now says it wrote in place into what it was given."""

    def forward(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x.mul_(1.0)
        return x @ weight

    inputs = {"weight": torch.randn(3, 3, dtype=torch.float64), "x": torch.randn(2, 3, dtype=torch.float64)}
    with pytest.raises(AssertionError, match=r"toy: forward wrote in place into a tensor it was given"):
        checks.check_autograd_by_differences(forward, inputs, "toy: forward")
