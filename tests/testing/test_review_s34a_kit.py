"""Review s34a: mutants of the built-in losses whose pairs lose their derivatives.

The outer loop trains the query, key and value projections through ``InnerLoss.pairs``; the naive
loop, the rules and the kernels all read the same pairs, so a ``.detach()``, a float32 round trip or a
hand-written backward there (or in the carry handed to the next chunk) trains the projections wrongly
on every path alike. ``check_inner_loss`` compares autograd's derivatives of ``pairs`` with finite
differences (``check_pairs_by_differences``); before, each mutant below passed the kit."""

from __future__ import annotations

import pytest
import torch

from innerloop.core.protocol import LossPairs
from innerloop.plugins.losses.next_token import NextToken
from innerloop.plugins.losses.reconstruction import Reconstruction
from innerloop.testing import check_inner_loss

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


class DoubledBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return 2 * grad


class HandWrittenBackward(Reconstruction):
    name = "hand_written_backward"

    def pairs(self, views, carry):
        return LossPairs(inputs=DoubledBackward.apply(views.key), targets=views.value, valid=None, carry={})


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
