"""Review s17 (mutation testing, round 4), the checkers: each check of innerloop.testing.checks is
shown to catch the wrong plugin it exists for. A rule that detaches its returned weights (C15), one
whose returned pending sums are in its own layout (C1), states differing only in position (C3), a
rule wrong only where a chunk ends exactly on a mini-batch boundary (C4), a loss whose carry mixes
the sequences of a batch (C9), a loss right only from the initial carry (C11), a Huber loss whose
closed-form gradient is wrong in its large-error piece (C17), a rule off by a few 1e-9 (C14), and a
loss right for one-token chunks only (C10). The mutants are in /work/notes/review_s17_mutation4.md."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from plugin_testing import GradientByAutograd, ScaledWithoutGrad

from innerloop.core.protocol import HalfSquaredError, InnerLoss, LossPairs
from innerloop.plugins.losses.reconstruction import Reconstruction
from innerloop.plugins.models.linear import LinearModel
from innerloop.plugins.optimizers.dual_form import DualForm
from innerloop.testing import check_inner_loss, check_update_rule
from innerloop.testing.checks import (
    FLOAT64_TOLERANCE,
    _check_rule_on_model_problem,
    assert_close,
    assert_states_close,
    check_pairs_batch_independent,
    default_cuts,
    make_problem,
)

#: A cheap check_update_rule: one model, loss and wrapping, a short call.
ONE_CASE = {"model": "linear", "loss": Reconstruction(), "norm": True, "residual": True}

#: A small shape for check_inner_loss (one shape, not PLUGIN_CHECK_SHAPES).
SMALL = {"batch": 2, "heads": 2, "head_dim": 3, "tokens": 8, "mini_batch_size": 4}


def _problem(tokens: int = 6):
    return make_problem(LinearModel(), Reconstruction(), tokens=tokens, mini_batch_size=4)


# ---- C15: the gradient through the returned weights -------------------------------------------------


class DetachesItsWeights(DualForm):
    """Right values, but the weights it returns are cut from the graph: chunked training (TBPTT)
    would get no gradient through the state carried across chunks."""

    name = "s17_detaches_its_weights"

    def forward(self, state, task, views, lr, tau, decay=None):
        out, new = super().forward(state, task, views, lr, tau, decay)
        return out, replace(new, params={k: v.detach() for k, v in new.params.items()})


def test_a_rule_whose_returned_weights_are_detached_fails_the_gradient_check():
    with pytest.raises(AssertionError, match=r"s17_detaches_its_weights .*gradient w\.r\.t\."):
        check_update_rule(DetachesItsWeights(), **ONE_CASE, tokens=8, mini_batch_size=4, without_grad=False)


# ---- C1: the pending sums of the final state ---------------------------------------------------------


class PendingInItsOwnLayout(DualForm):
    """Returns its pending sums doubled and halves them when it reads a state back: its own numbers
    agree, but another path continuing from its state (torch decoding, a kernel) reads them wrong."""

    name = "s17_pending_in_its_own_layout"

    def forward(self, state, task, views, lr, tau, decay=None):
        state = replace(state, pending={k: v / 2 for k, v in state.pending.items()})
        out, new = super().forward(state, task, views, lr, tau, decay)
        return out, replace(new, pending={k: v * 2 for k, v in new.pending.items()})


def test_a_rule_whose_returned_pending_sums_are_wrong_fails_the_check():
    with pytest.raises(AssertionError, match=r"s17_pending_in_its_own_layout .*state\.pending\["):
        check_update_rule(
            PendingInItsOwnLayout(),
            **ONE_CASE,
            tokens=6,
            mini_batch_size=4,
            gradients=False,
            without_grad=False,
        )


def test_states_differing_only_in_their_pending_sums_are_not_close():
    _, state = _problem().naive()  # 6 tokens, mini-batches of 4: pending sums of two tokens
    assert any(bool(v.abs().sum() > 0) for v in state.pending.values())
    doubled = replace(state, pending={k: v * 2 for k, v in state.pending.items()})
    with pytest.raises(AssertionError, match=r"state\.pending\["):
        assert_states_close(doubled, state, "state", FLOAT64_TOLERANCE)


# ---- C3: the position of the final state -------------------------------------------------------------


def test_states_differing_only_in_position_are_not_close():
    _, state = _problem(tokens=8).naive()  # at a boundary: no pending sums to tell the positions apart
    moved = replace(state, position=state.position + 4)
    with pytest.raises(AssertionError, match=r"position 12 != 8"):
        assert_states_close(moved, state, "state", FLOAT64_TOLERANCE)


# ---- C4: a cut exactly on a mini-batch boundary ------------------------------------------------------


class ForgetsToFoldAtAChunkEnd(DualForm):
    """Wrong only where a chunk ends exactly on a mini-batch boundary: returns the weights the chunk
    started with instead of folding the mini-batch's gradient sums in."""

    name = "s17_forgets_to_fold_at_a_chunk_end"

    def forward(self, state, task, views, lr, tau, decay=None):
        out, new = super().forward(state, task, views, lr, tau, decay)
        if new.position % task.mini_batch_size == 0:
            return out, replace(new, params=dict(state.params))
        return out, new


def test_the_default_cuts_include_the_mini_batch_boundary():
    problem = _problem(tokens=11)
    assert problem.task.mini_batch_size in default_cuts(problem)


def test_a_rule_wrong_only_when_a_chunk_ends_on_a_boundary_fails_the_check():
    # 11 tokens: the whole call ends mid-mini-batch, so only the default cut at 4 ends a chunk on one
    with pytest.raises(AssertionError, match=r"s17_forgets_to_fold_at_a_chunk_end .*cut at \[1, 3, 4, "):
        check_update_rule(
            ForgetsToFoldAtAChunkEnd(),
            **ONE_CASE,
            tokens=11,
            mini_batch_size=4,
            gradients=False,
            without_grad=False,
        )


# ---- C14: the float64 tolerance ----------------------------------------------------------------------


class OffByAFewE9(DualForm):
    """Outputs off by a relative 2e-9 (a dropped small correction): wrong, though by little."""

    name = "s17_off_by_a_few_e9"

    def forward(self, state, task, views, lr, tau, decay=None):
        out, new = super().forward(state, task, views, lr, tau, decay)
        return out * (1 + 2e-9), new


def test_assert_close_holds_the_float64_tolerance():
    x = torch.randn(50, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert_close(x * (1 + 1e-11), x, "w", FLOAT64_TOLERANCE)
    with pytest.raises(AssertionError, match=r"w: relative error 1\.0\d*e-09 > 1\.0e-10"):
        assert_close(x * (1 + 1e-9), x, "w", FLOAT64_TOLERANCE)


def test_a_rule_off_by_a_relative_2e_9_fails_the_check():
    with pytest.raises(AssertionError, match=r"s17_off_by_a_few_e9 .*relative error 2\.0\d*e-09"):
        check_update_rule(
            OffByAFewE9(), **ONE_CASE, tokens=6, mini_batch_size=4, gradients=False, without_grad=False
        )


# ---- the wrong losses --------------------------------------------------------------------------------


class BatchMeanInTheCarry(HalfSquaredError):
    """Targets are the value plus the carry (zero at a sequence start); the carry it passes on is the
    last key averaged over the batch: the next chunk of each sequence reads the other sequences."""

    name = "s17_batch_mean_in_the_carry"

    def init_carry(self, batch_size, num_heads, head_dim, like):
        return {"last": like.new_zeros(batch_size, num_heads, head_dim)}

    def pairs(self, views, carry):
        last = views.key[:, :, -1].mean(0, keepdim=True).expand_as(carry["last"])
        targets = views.value + carry["last"][:, :, None]
        return LossPairs(inputs=views.key, targets=targets, valid=None, carry={"last": last})


def test_a_loss_whose_carry_mixes_the_batch_fails_the_batch_independence_check():
    problem = make_problem(LinearModel(), BatchMeanInTheCarry(), **SMALL)
    views, carry = problem.views, problem.state.loss_carry
    with pytest.raises(AssertionError, match=r"sequence 0's pairs .*\(carry\['last'\]\)"):
        check_pairs_batch_independent(BatchMeanInTheCarry(), views, carry)


class PreviousKey(HalfSquaredError):
    """Token t's target is its value plus the key of token t - 1 (the carry: the last key read)."""

    name = "s17_previous_key"

    #: Chunks of at least this many tokens take a "fast path" that forgets the carry.
    fast_path_from: int | None = None

    def init_carry(self, batch_size, num_heads, head_dim, like):
        return {"last": like.new_zeros(batch_size, num_heads, 1, head_dim)}

    def pairs(self, views, carry):
        last = carry["last"]
        if self.fast_path_from is not None and views.key.shape[2] >= self.fast_path_from:
            last = torch.zeros_like(last)  # the bug: right only where the carry is the initial zero
        previous = torch.cat([last, views.key[:, :, :-1]], dim=2)
        return LossPairs(views.key, views.value + previous, None, {"last": views.key[:, :, -1:]})


class ForgetsTheCarryOnLongChunks(PreviousKey):
    name = "s17_forgets_the_carry_on_long_chunks"
    fast_path_from = SMALL["tokens"]


def test_a_loss_right_only_from_the_initial_carry_fails_check_inner_loss():
    check_inner_loss(PreviousKey(), **SMALL)  # the right one passes
    # from the zero carry, only the whole call (8 tokens) takes the fast path, where forgetting the
    # zero carry changes nothing; from a carried one, it drops the previous chunk's key
    with pytest.raises(AssertionError, match=r"s17_forgets_the_carry_on_long_chunks: targets chunked at 1"):
        check_inner_loss(ForgetsTheCarryOnLongChunks(), **SMALL)


class Huber(InnerLoss):
    """The Huber loss of the error (quadratic up to ``delta``, linear beyond) with a closed-form
    gradient: ``wrong`` returns the quadratic piece's gradient (the error) beyond ``delta`` too."""

    name = "s17_huber"
    delta = 10.0  # beyond the errors of a unit scale: met only at the check's larger error scales
    wrong = False

    def pairs(self, views, carry):
        return LossPairs(views.key, views.value, None, {})

    def token_loss(self, prediction, target):
        error = (prediction - target).abs()
        quadratic = 0.5 * error.square()
        linear = self.delta * (error - 0.5 * self.delta)
        return torch.where(error <= self.delta, quadratic, linear).sum(-1)

    def token_loss_grad(self, prediction, target):
        error = prediction - target
        return error if self.wrong else error.clamp(-self.delta, self.delta)


class HuberWrongBeyondDelta(Huber):
    name = "s17_huber_wrong_beyond_delta"
    wrong = True


def test_a_huber_loss_with_a_wrong_gradient_beyond_delta_fails_check_inner_loss():
    check_inner_loss(Huber(), **SMALL)  # the right one passes
    with pytest.raises(AssertionError, match=r"s17_huber_wrong_beyond_delta: token_loss_grad vs autograd"):
        check_inner_loss(HuberWrongBeyondDelta(), **SMALL)


class TwoBack(HalfSquaredError):
    """Token t's target is its value plus the key of token t - 2 (the carry: the last two keys read)."""

    name = "s17_two_back"
    wrong = False

    def init_carry(self, batch_size, num_heads, head_dim, like):
        return {"keys": like.new_zeros(batch_size, num_heads, 2, head_dim)}

    def pairs(self, views, carry):
        keys = torch.cat([carry["keys"], views.key], dim=2)
        last_two = keys[:, :, -2:]
        if self.wrong and views.key.shape[2] >= 2:
            last_two = views.key[:, :, -2:].flip(2)  # the bug: a long chunk's two keys kept swapped
        return LossPairs(views.key, views.value + keys[:, :, :-2], None, {"keys": last_two})


class SwapsTheCarryOfALongChunk(TwoBack):
    name = "s17_swaps_the_carry_of_a_long_chunk"
    wrong = True


def test_a_loss_right_for_one_token_chunks_only_fails_check_inner_loss():
    check_inner_loss(TwoBack(), **SMALL)  # the right one passes
    with pytest.raises(AssertionError, match=r"s17_swaps_the_carry_of_a_long_chunk: targets chunked at 2"):
        check_inner_loss(SwapsTheCarryOfALongChunk(), **SMALL)


def test_a_loss_that_breaks_without_autograd_fails_the_kit():
    """Review s64: a layer runs its loss and model under ``torch.no_grad`` and ``torch.inference_mode`` in
    evaluation and generation, but check_inner_loss / check_inner_model (whose rule comparisons are
    ``_check_rule_on_model_problem``, called here on one small problem to stay fast) compared values with
    autograd on only: the loss that raises there and the one wrong only there passed the kit (and registered)."""
    cases = [
        (GradientByAutograd(), r"inference_mode\(\).*forward raised"),
        (ScaledWithoutGrad(), r"under torch.no_grad\(\)"),
    ]
    model = LinearModel()
    for loss, message in cases:
        problem = make_problem(model, loss, seed=0, **SMALL)
        with pytest.raises(AssertionError, match=message):
            _check_rule_on_model_problem(problem, DualForm(), model, 0)
