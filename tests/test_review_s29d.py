"""Review s29d: a third-party plugin author's journey (a loss, a model, an update rule and kernels of
their own, registered, checked with innerloop.testing, trained, saved, exported, compiled), and the
mistakes such an author makes. Each test is one finding (the commit that fixes it names it)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import innerloop
from innerloop.core.protocol import UpdateRule
from innerloop.registry import PluginError, get_registry, isolated_registry
from innerloop.testing import check_update_rule


class WritesStateWithoutGrad(UpdateRule):
    """Right values, but without autograd (evaluation, generation) it writes its new weights into the
    state it was given, to save an allocation: a TTTState is immutable."""

    name = "s29d_writes_state_without_grad"

    def forward(self, state, task, views, lr, tau):
        out, new = get_registry().update_rule("minibatch_gd").forward(state, task, views, lr, tau)
        if not torch.is_grad_enabled():
            for group in ("params", "pending"):
                for key, value in getattr(state, group).items():
                    value.copy_(getattr(new, group)[key])
            new = dataclasses.replace(new, params=state.params, pending=state.pending)
        return out, new


WRITES_INTO_STATE = (
    r"s29d_writes_state_without_grad .*under torch.no_grad\(\).*wrote into the state it was given"
)


def test_check_update_rule_names_a_write_into_the_state_without_grad() -> None:
    """The write was caught only as 'relative error 4.4e-01 > 1e-10' (the next run started from the
    overwritten state), where the same write with autograd on is named as what it is."""
    with pytest.raises(AssertionError, match=WRITES_INTO_STATE):
        check_update_rule(WritesStateWithoutGrad(), "linear", "reconstruction", gradients=False)


def test_registration_names_a_write_into_the_state_without_grad() -> None:
    with isolated_registry(), pytest.raises(PluginError, match=WRITES_INTO_STATE):
        innerloop.register_update_rule(WritesStateWithoutGrad())
