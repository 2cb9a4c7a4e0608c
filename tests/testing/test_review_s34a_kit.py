"""Review s34a: mutants of the built-in losses whose pairs lose their derivatives.

The outer loop trains the query, key and value projections through ``InnerLoss.pairs``; the naive
loop, the rules and the kernels all read the same pairs, so a ``.detach()``, a float32 round trip or a
hand-written backward there (or in the carry handed to the next chunk) trains the projections wrongly
on every path alike. ``check_inner_loss`` compares autograd's derivatives of ``pairs`` with finite
differences (``check_pairs_by_differences``); before, each mutant below passed the kit."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from plugin_testing import DoubledGradient

from innerloop.core.protocol import LossPairs, Views
from innerloop.plugins.losses.next_token import NextToken
from innerloop.plugins.losses.reconstruction import Reconstruction
from innerloop.plugins.optimizers.minibatch_gd import MiniBatchGD
from innerloop.testing import check_inner_loss, check_update_rule, naive_token_loop

SHAPE = {"batch": 2, "heads": 2, "head_dim": 3, "tokens": 6, "mini_batch_size": 4}


class DetachedKeys(Reconstruction):
    name = "detached_keys"

    def pairs(self, views, carry):
        return LossPairs(inputs=views.key.detach(), targets=views.value, valid=None, carry={})


class Float32RoundTrip(Reconstruction):
    name = "float32_round_trip"

    def pairs(self, views, carry):
        key, value = (t.float().to(t.dtype) for t in (views.key, views.value))
        return LossPairs(inputs=key, targets=value, valid=None, carry={})


class HandWrittenBackward(Reconstruction):
    name = "hand_written_backward"

    def pairs(self, views, carry):
        return LossPairs(inputs=DoubledGradient.apply(views.key), targets=views.value, valid=None, carry={})


class DetachedCarry(NextToken):
    """next_token whose carried key leaves the graph: the next chunk's first pair trains no projection."""

    name = "detached_carry"

    def pairs(self, views, carry):
        got = super().pairs(views, carry)
        return LossPairs(
            got.inputs,
            got.targets,
            got.valid,
            {**got.carry, "previous_key": got.carry["previous_key"].detach()},
        )


@pytest.mark.parametrize("loss", [DetachedKeys(), Float32RoundTrip(), HandWrittenBackward(), DetachedCarry()])
def test_check_inner_loss_names_pairs_whose_derivatives_are_wrong(loss) -> None:
    with pytest.raises(
        AssertionError, match=rf"{loss.name}: pairs \(inputs, targets, valid and carry.*finite"
    ):
        check_inner_loss(loss, **SHAPE)


@pytest.mark.parametrize("name", ["reconstruction", "next_token", "dot_product"])
def test_the_built_in_losses_pairs_pass_the_derivative_check(name) -> None:
    from innerloop.registry import get_registry
    from innerloop.testing.checks import check_pairs_by_differences, make_problem, warm_carry

    loss = get_registry().inner_loss(name)
    problem = make_problem(get_registry().inner_model("linear"), loss, **SHAPE)
    views, carry = problem.views, problem.state.loss_carry
    check_pairs_by_differences(loss, views, warm_carry(loss, views, carry))


class DetachedLearningRate(MiniBatchGD):
    """minibatch_gd with the lr detached, in forward and in the reference it declares alike."""

    name = "detached_learning_rate"

    def forward(self, state, task, views, lr, tau, *args, **kwargs):
        return super().forward(state, task, views, lr.detach(), tau, *args, **kwargs)

    def reference(self, state, task, views, lr, tau, **options):
        return naive_token_loop(state, task, views, lr.detach(), tau, **options)


class DetachedKey(MiniBatchGD):
    """minibatch_gd with the key view detached, in forward and in the reference it declares alike."""

    name = "detached_key"

    def forward(self, state, task, views, lr, tau, *args, **kwargs):
        views = Views(views.query, views.key.detach(), views.value)
        return super().forward(state, task, views, lr, tau, *args, **kwargs)

    def reference(self, state, task, views, lr, tau, **options):
        views = Views(views.query, views.key.detach(), views.value)
        return naive_token_loop(state, task, views, lr, tau, **options)


TINY_RULE_PROBLEM = {
    "batch": 1,
    "heads": 1,
    "head_dim": 3,
    "tokens": 4,
    "mini_batch_size": 2,
    "dtype": torch.float64,
}


@pytest.mark.parametrize(("rule", "input_index"), [(DetachedLearningRate(), 3), (DetachedKey(), 1)])
def test_check_update_rule_gradchecks_a_declared_reference(rule, input_index) -> None:
    with pytest.raises(AssertionError, match=rf"{rule.name}: its declared reference .*input {input_index}\b"):
        check_update_rule(
            rule,
            "linear",
            "reconstruction",
            norm=False,
            residual=False,
            without_grad=False,
            **TINY_RULE_PROBLEM,
        )


def test_a_right_declared_reference_passes_its_gradcheck() -> None:
    class Declared(MiniBatchGD):
        name = "declared"

        def reference(self, state, task, views, lr, tau, **options):
            return naive_token_loop(state, task, views, lr, tau, **options)

    check_update_rule(
        Declared(),
        "linear",
        "reconstruction",
        norm=False,
        residual=False,
        without_grad=False,
        **TINY_RULE_PROBLEM,
    )


class NoGradPathDropsTheCarry(MiniBatchGD):
    """minibatch_gd whose path without autograd (evaluation, generation) hands back the carry it was given."""

    name = "no_grad_path_drops_the_carry"

    def forward(self, state, task, views, lr, tau, *args, **kwargs):
        out, new_state = super().forward(state, task, views, lr, tau, *args, **kwargs)
        if torch.is_grad_enabled():
            return out, new_state
        return out, dataclasses.replace(new_state, loss_carry=state.loss_carry)


class NoGradPathWithoutResidualIsOff(MiniBatchGD):
    """minibatch_gd whose path without autograd is wrong only when the inner residual is off."""

    name = "no_grad_path_without_residual_is_off"

    def forward(self, state, task, views, lr, tau, *args, **kwargs):
        out, new_state = super().forward(state, task, views, lr, tau, *args, **kwargs)
        if torch.is_grad_enabled() or task.residual:
            return out, new_state
        return out * (1 + 1e-6), new_state


class NoGradPathIgnoresDecay(MiniBatchGD):
    """minibatch_gd whose path without autograd leaves out the decay."""

    name = "no_grad_path_ignores_decay"

    def forward(self, state, task, views, lr, tau, decay=None):
        if not torch.is_grad_enabled():
            decay = None
        return super().forward(state, task, views, lr, tau, decay=decay)


SHAPE_WITHOUT_GRAD = {
    "batch": 2,
    "heads": 1,
    "head_dim": 3,
    "tokens": 5,
    "mini_batch_size": 2,
    "dtype": torch.float64,
}


@pytest.mark.slow  # 0.3 s alone, ~2 s on a loaded machine: check_update_rule's every loss and wrapping, the point of the test
def test_check_update_rule_runs_every_loss_without_autograd() -> None:
    with pytest.raises(
        AssertionError, match=r"next_token, norm=True, residual=True\) under torch.no_grad\(\).*loss_carry"
    ):
        check_update_rule(NoGradPathDropsTheCarry(), "linear", gradients=False, **SHAPE_WITHOUT_GRAD)


@pytest.mark.slow  # 0.3 s alone, ~2 s on a loaded machine: check_update_rule's mixed wrappings, the point of the test
def test_check_update_rule_runs_the_mixed_wrappings_without_autograd() -> None:
    with pytest.raises(AssertionError, match=r"residual=False\) under torch.no_grad\(\)"):
        check_update_rule(
            NoGradPathWithoutResidualIsOff(),
            "linear",
            "reconstruction",
            gradients=False,
            **SHAPE_WITHOUT_GRAD,
        )


def test_check_update_rule_runs_the_decay_without_autograd() -> None:
    with pytest.raises(AssertionError, match=r"residual=True, decay\) under torch.no_grad\(\)"):
        check_update_rule(
            NoGradPathIgnoresDecay(), "linear", "reconstruction", norm=True, residual=True, gradients=False,
            **SHAPE_WITHOUT_GRAD,
        )  # fmt: skip


class Float16ForNextToken(MiniBatchGD):
    """minibatch_gd whose float32 outputs are rounded through float16, with the next_token loss only."""

    name = "float16_for_next_token"

    def forward(self, state, task, views, lr, tau, *args, **kwargs):
        out, new_state = super().forward(state, task, views, lr, tau, *args, **kwargs)
        if out.dtype == torch.float32 and task.loss.name == "next_token":
            return out.half().float(), new_state
        return out, new_state


@pytest.mark.slow  # ~1.5 s (3 s with the warm-up): the whole check_update_rule over its losses is the point
# review s34a (fixed): float32 was checked with the first loss only
def test_check_update_rule_checks_float32_with_every_loss() -> None:
    with pytest.raises(AssertionError, match="next_token"):
        check_update_rule(
            Float16ForNextToken(),
            "linear",
            gradients=False,
            batch=2,
            heads=1,
            head_dim=3,
            tokens=5,
            mini_batch_size=2,
        )
