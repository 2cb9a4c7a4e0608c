"""Review s61, mutation testing of the core math: each test here kills a mutant that the fast tests of its
module let through (the table of mutants and which test caught each: the session's report).

Every test passes on the code as it is and fails on the mutant named in its docstring."""

from __future__ import annotations

import pytest
import torch

from innerloop.registry import get_registry
from innerloop.testing import make_problem

FLOAT64 = 1e-10


def _assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    scale = want.abs().max().item()
    assert scale > 0, f"{what}: the reference is all zeros, the comparison would be vacuous"
    error = (got - want).abs().max().item() / scale
    assert error <= FLOAT64, f"{what}: max error {error:.3g} relative to {scale:.3g}"


@pytest.mark.parametrize("model", ["linear", "mlp"])
@pytest.mark.parametrize("rule", ["dual_form", "minibatch_gd"])
def test_mini_batch_rules_with_decay_equal_the_naive_token_loop(rule: str, model: str) -> None:
    """The mini-batch rules with decay (forgetting) over whole and partial mini-batches of 3 tokens, with a
    token-index scale tau that is not 1 at the mini-batch's end, against the naive token loop
    (innerloop.testing, float64): outputs and every weight after the call. The fast tests compared the
    decaying paths only with each other (prefill + decode vs whole, dual vs primal), which share
    close_planned: committing a mini-batch as ``A W_b - P`` instead of ``A W_b - tau_last P`` (mutant S9)
    passed them all. The naive-loop test that catches it is marked slow."""
    registry = get_registry()
    problem = make_problem(model, "reconstruction", tokens=8, mini_batch_size=3, decay=True, seed=3)
    assert abs(problem.tau[-1].item() - 1.0) > 0.1  # a tau_last of 1 would hide a dropped scale
    got, state = problem.run(registry.update_rule(rule))
    want, want_state = problem.naive()
    _assert_close(got, want, f"{rule} on {model}: outputs")
    for key, value in want_state.params.items():
        _assert_close(state.params[key], value, f"{rule} on {model}: params[{key!r}]")
