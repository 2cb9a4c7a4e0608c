"""Review s47i: the testing kit (innerloop.testing) under every grad mode, and its reference's divergence."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from innerloop.testing import make_problem, naive_token_loop


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode, torch.enable_grad])
def test_naive_token_loop_runs_under_every_grad_mode(mode):
    """Its docstring promises UpdateRule.forward's contract, which holds under inference_mode: it raised
    'element 0 of tensors does not require grad' there (autograd.grad under inference mode)."""
    problem = make_problem("mlp", "reconstruction", tokens=5)
    expected, _ = problem.naive()
    with mode():
        outputs, state = problem.naive()
    assert torch.equal(outputs, expected)
    assert not outputs.requires_grad


def test_naive_token_loop_takes_inference_tensors():
    """A problem made under inference_mode (inference tensors) ran nowhere: 'Setting requires_grad=True
    on inference tensor outside InferenceMode is not allowed'."""
    expected, _ = make_problem("mlp", "reconstruction", tokens=5).naive()
    with torch.inference_mode():
        problem = make_problem("mlp", "reconstruction", tokens=5)
        inside, _ = problem.naive()
    outside, _ = problem.naive()
    assert torch.equal(inside, expected) and torch.equal(outside, expected)


def test_naive_token_loop_names_inference_tensors_in_a_recorded_call():
    """Inference tensors where an outer graph is recorded: a clear error naming them."""
    with torch.inference_mode():
        problem = make_problem("linear", "reconstruction", tokens=3)
    lr = problem.lr.clone().requires_grad_(True)
    with pytest.raises(ValueError, match=r"naive_token_loop: .*views\.query.* inference tensors"):
        naive_token_loop(problem.state, problem.task, problem.views, lr, problem.tau)


def _momentum_rule():
    from innerloop.registry import get_registry

    return get_registry().update_rule("momentum")


def test_momentum_rule_problem_without_norm_stays_finite_at_150_tokens():
    """Without the LayerNorm, make_problem's momentum-rule problems (no token scale: each of a mini-batch's
    K tokens steps the weights, and a momentum m multiplies a step by up to 1 / (1 - m)) diverged to NaN in
    the naive loop itself (50 of 100 drawn MLP problems of 150 tokens; this one from token 130), so
    check_update_rule failed a correct rule with 'relative error nan'."""
    shape = dict(batch=2, heads=4, head_dim=4, mini_batch_size=5, seed=2, tokens=150)
    problem = make_problem("mlp", "reconstruction", norm=False, residual=True, momentum=True, **shape)
    with torch.no_grad():
        outputs, state = problem.for_rule(_momentum_rule()).naive()
    assert torch.isfinite(outputs).all()
    assert all(torch.isfinite(w).all() for w in state.params.values())


def test_a_diverged_reference_is_named_not_blamed_on_the_rule():
    """A problem whose reference itself gives NaN: the check said 'relative error nan' of the (correct)
    rule; it now raises ReferenceDivergedError naming the problem."""
    from dataclasses import replace

    from innerloop.testing.checks import ReferenceDivergedError, check_update_rule_without_grad

    rule = _momentum_rule()
    problem = make_problem("linear", "reconstruction", norm=False, tokens=40, mini_batch_size=4).for_rule(
        rule
    )
    problem = replace(problem, lr=problem.lr * 1e100)  # each mini-batch multiplies the weights by ~1e100: inf
    with pytest.raises(
        ReferenceDivergedError, match=r"naive token loop itself diverged .* on make_problem\('linear'"
    ):
        check_update_rule_without_grad(rule, problem)


@pytest.mark.slow
@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_gradient_checks_under_a_callers_no_grad_pass_a_correct_rule(mode):
    """Called under the caller's no_grad / inference_mode, the gradchecks saw no graph and failed a correct
    rule: 'differ from finite differences ... (a .detach() or a term left out?)'."""
    from innerloop.testing import check_update_rule_gradients

    with mode():
        check_update_rule_gradients(
            "minibatch_gd", "linear", "reconstruction", batch=2, heads=1, head_dim=1, tokens=2
        )


@pytest.mark.slow
@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_plugin_checks_under_a_callers_no_grad_pass_correct_plugins(mode):
    """The same for check_inner_model and check_inner_loss (their autograd-by-differences checks). At one
    small shape (0.17 s for both, not 1.45 s at every shape of PLUGIN_CHECK_SHAPES): without with_autograd
    both fail under inference_mode at this shape as at every default one (seen), the mode not the size."""
    from innerloop.testing import check_inner_loss, check_inner_model

    shape = dict(batch=2, heads=1, head_dim=3, tokens=5, mini_batch_size=2)
    with mode():
        check_inner_model("linear", **shape)
        check_inner_loss("reconstruction", **shape)


@pytest.mark.slow
def test_gradcheck_on_a_diverged_problem_names_the_problem(monkeypatch):
    """check_update_rule_gradients on a problem whose numbers overflow: gradcheck of NaNs blamed the rule
    ('a .detach() or a term left out?'); it now says the reference itself diverged there."""
    from dataclasses import replace

    import innerloop.testing.checks as checks

    @functools.wraps(make_problem)  # the check reads make_problem's signature for its options
    def overflowing(*args, **kwargs):
        problem = make_problem(*args, **kwargs)
        overflowed = {
            k: v * math.inf for k, v in problem.state.params.items()
        }  # weights past float64's range
        return replace(problem, state=replace(problem.state, params=overflowed))

    monkeypatch.setattr(checks, "make_problem", overflowing)
    with pytest.raises(checks.ReferenceDivergedError, match=r"itself diverged .* make_problem\('linear'"):
        checks.check_update_rule_gradients(
            "minibatch_gd", "linear", "reconstruction", heads=1, head_dim=1, tokens=2, mini_batch_size=1
        )
