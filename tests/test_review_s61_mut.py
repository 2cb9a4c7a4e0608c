"""Review s61, mutation testing of the core math: each test here kills a mutant that the fast tests of its
module let through (the table of mutants and which test caught each: the session's report).

Every test passes on the code as it is and fails on the mutant named in its docstring."""

from __future__ import annotations

from dataclasses import replace

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


@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("rule", ["dual_form", "minibatch_gd"])
def test_run_scan_reads_a_hand_made_states_pending_sums_at_a_boundary_as_zero(rule: str, tokens: int) -> None:
    """run_scan's promise (its comment; tests/core/test_pending_at_a_boundary.py's docstring: "ops.scan,
    below the layer, still reads them as zero"): at a mini-batch boundary the pending sums are zero by
    definition, whatever a hand-made state holds, on a whole call and on one decoded token alike. The
    layer refuses such a state before the scan, so no test reached the scan with one: dropping the
    zeroing (mutant S14) let a decoded token add the noise to its weights, silently."""
    registry = get_registry()
    problem = make_problem("linear", "reconstruction", tokens=tokens, mini_batch_size=3, seed=4)
    assert problem.state.position % 3 == 0
    generator = torch.Generator().manual_seed(5)
    noise = {
        k: torch.randn(v.shape, generator=generator, dtype=v.dtype) for k, v in problem.state.pending.items()
    }
    edited = replace(problem, state=replace(problem.state, pending=noise))
    want, want_state = problem.run(registry.update_rule(rule))
    got, state = edited.run(registry.update_rule(rule))
    _assert_close(got, want, f"{rule}, {tokens} token(s): outputs")
    for key, value in want_state.params.items():
        _assert_close(state.params[key], value, f"{rule}, {tokens} token(s): params[{key!r}]")
