"""Review s51j: a plugin author's journey off the recipe -- the update-rule checks must fail on a rule
whose gradients are wrong only through a state carried from an earlier chunk."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar

import pytest
import torch

from innerloop.core.protocol import InnerTask, UpdateRule, Views
from innerloop.core.state import TTTState
from innerloop.registry import PluginError, get_registry, isolated_registry, register_update_rule
from innerloop.testing import make_problem
from innerloop.testing.checks import check_update_rule_gradients_match_naive


class DetachesCarriedState(UpdateRule):
    """A broken plugin: the built-in rule ``base``, except that a chunk continuing a sequence (position > 0)
    detaches the state groups ``groups`` it is given. Its values are right everywhere, and so are its
    gradients over a whole sequence in one call; only the gradients through a carried state are cut, so
    training through a state carried between calls (a prompt, streaming) silently learns wrongly."""

    name = "detaches_carried_state"
    base: ClassVar[str] = "minibatch_gd"
    groups: ClassVar[tuple[str, ...]] = ("params",)

    def forward(
        self, state: TTTState, task: InnerTask, views: Views, lr: torch.Tensor, tau: Any, **options: Any
    ) -> tuple[torch.Tensor, TTTState]:
        if state.position > 0:
            cut = {group: {k: t.detach() for k, t in getattr(state, group).items()} for group in self.groups}
            state = replace(state, **cut)
        return get_registry().update_rule(self.base).forward(state, task, views, lr, tau, **options)


def _detaching(group: str, base: str = "minibatch_gd", **flags: bool) -> UpdateRule:
    """A :class:`DetachesCarriedState` over ``base`` detaching ``group``, with ``base``'s capability flags."""
    builtin = type(get_registry().update_rule(base))
    attributes = {
        "name": f"detaches_carried_{group}",
        "base": base,
        "groups": (group,),
        "supports_decay": builtin.supports_decay,
        "supports_momentum": builtin.supports_momentum,
        "uses_token_scale": builtin.uses_token_scale,
    }
    return type(f"Detaches_{group}", (DetachesCarriedState,), attributes)()


@pytest.mark.slow  # 0.1-0.4 s each warm (4 s for the first torch.func call of a process)
@pytest.mark.parametrize(
    ("group", "base", "loss", "options"),
    [
        ("params", "minibatch_gd", "reconstruction", {}),
        ("pending", "minibatch_gd", "reconstruction", {}),
        ("loss_carry", "minibatch_gd", "next_token", {}),
        ("momentum", "momentum", "reconstruction", {"momentum": True}),
        ("decay", "minibatch_gd", "reconstruction", {"decay": True}),
    ],
)
def test_gradient_check_fails_a_rule_that_detaches_a_carried_state(
    group: str, base: str, loss: str, options: dict[str, bool]
) -> None:
    """Seen failing before the fix: the gradients were compared over the whole sequence in one call only,
    so each of these broken rules passed check_update_rule (and registration), at every model and loss."""
    rule = _detaching(group, base)
    problem = make_problem(
        "linear", loss, batch=1, heads=1, head_dim=2, tokens=7, mini_batch_size=3, **options
    )
    with pytest.raises(AssertionError, match=r"cut at \[.*\].*gradient w\.r\.t\."):
        check_update_rule_gradients_match_naive(rule, problem.for_rule(rule))


def test_gradient_check_passes_the_same_rule_without_the_detach() -> None:
    """The check still passes the built-in rule it wraps, cut at the same points (no false alarm)."""
    rule = _detaching("params")
    rule.groups = ()  # an instance attribute of a local object: nothing shared changes
    problem = make_problem("linear", "next_token", batch=1, heads=1, head_dim=2, tokens=7, mini_batch_size=3)
    check_update_rule_gradients_match_naive(rule, problem.for_rule(rule))


@pytest.mark.slow
def test_registration_refuses_a_rule_that_detaches_the_carried_weights() -> None:
    """Registration compares gradients through ``check_update_rule``: it refused nothing here before."""
    with isolated_registry(), pytest.raises(PluginError, match="detaches_carried_params.*cut at"):
        register_update_rule(_detaching("params"))


@pytest.mark.slow  # ~0.5 s: two float64 gradchecks
def test_gradcheck_fails_a_rule_that_detaches_the_carried_weights() -> None:
    """``check_update_rule_gradients`` (the plugin's own gradcheck) ran the rule over the whole sequence in
    one call only: seen passing this broken rule before the fix."""
    from innerloop.testing import check_update_rule_gradients

    rule = _detaching("params")
    with pytest.raises(AssertionError, match=r"cut at \[.*\].*finite differences"):
        check_update_rule_gradients(
            rule, "linear", "reconstruction", batch=1, heads=1, head_dim=1, tokens=3, mini_batch_size=1
        )
