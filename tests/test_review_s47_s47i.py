"""Review s47i: the testing kit (innerloop.testing) under every grad mode, and its reference's divergence."""

from __future__ import annotations

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
