"""Review s36c: the plugin testing kit (``innerloop.testing``) on deliberately broken plugins.

Each test builds a plugin broken in one way and calls the kit's check that must fail it, directly on a
tiny problem (not the whole ``check_*``, which runs every shape and loss: seconds per call), and reads
the message: it must say what is wrong, not only that two numbers differ."""

from __future__ import annotations

import pytest
import torch

from innerloop.plugins.optimizers.minibatch_gd import MiniBatchGD
from innerloop.testing import make_problem, run_in_chunks
from innerloop.testing.checks import RaisedWithoutGradError, StateWrittenError, check_update_rule_without_grad


class _HalvesPendingInPlace(MiniBatchGD):
    """minibatch_gd that, after its step, halves the pending sums of the state it was given, in place:
    invisible on a sequence's first state (pending sums of zero), wrong on every carried one."""

    name = "halves_pending_in_place"

    def forward(self, state, task, views, lr, tau, **options):
        result = super().forward(state, task, views, lr, tau, **options)
        with torch.no_grad():
            for pending in state.pending.values():
                pending.mul_(0.5)
        return result


def test_run_in_chunks_refuses_a_rule_that_writes_into_a_carried_state():
    """Only the first chunk's state was compared before and after the call; its pending sums are zeros,
    so a rule that scales them in place (a decay applied in place, say) passed check_update_rule."""
    problem = make_problem("linear", "reconstruction", batch=1, heads=1, head_dim=3, tokens=4)
    rule = _HalvesPendingInPlace()
    with pytest.raises(
        AssertionError,
        match=r"halves_pending_in_place: the rule, given the state carried to token 1, wrote into the state.*pending\['W1'\]",
    ):
        run_in_chunks(rule, problem, [1])


def test_a_write_into_a_carried_state_without_grad_is_named_as_such():
    """Under no_grad the write is named as a write into the state (with the case), not as 'forward
    raised' (RaisedWithoutGradError, the message for a rule that cannot run without autograd)."""
    problem = make_problem("linear", "reconstruction", batch=1, heads=1, head_dim=3, tokens=4)
    with pytest.raises(
        StateWrittenError, match=r"under torch.no_grad\(\).*cut at \[1\]: the rule, given the state carried"
    ) as caught:
        check_update_rule_without_grad(_HalvesPendingInPlace(), problem, cut_points=[1])
    assert not isinstance(caught.value, RaisedWithoutGradError)
