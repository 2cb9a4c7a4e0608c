"""Review s61, mutation testing of the core math: each test here kills a mutant that the fast tests of its
module let through (the table of mutants and which test caught each: the session's report).

Every test passes on the code as it is and fails on the mutant named in its docstring."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from innerloop.ops import scan
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


def test_next_token_pairs_each_token_with_the_previous_key_and_none_at_a_sequence_start() -> None:
    """ops.scan with the next_token loss equals the reconstruction loss on the pairs it documents, built
    here by hand: token t's input is key t - 1, and the first token of a sequence, which has no
    previous key, takes no step (lr 0). Dropping that zeroing (mutant NT2: the first token trained
    g(0) -> v_0) passed tests/core/test_invariances.py and tests/family/test_scan.py, which compare
    paths that all read the same pairs."""
    generator = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 2, 7, 4, generator=generator, dtype=torch.float64) for _ in range(3))
    lr = 0.3 * torch.rand(2, 2, 7, generator=generator, dtype=torch.float64)
    options = {"mini_batch_size": 3, "token_scale": torch.tensor([1.0, 0.6, 0.4], dtype=torch.float64)}
    got, weights = scan(q, k, v, lr, inner_loss="next_token", **options)
    previous = torch.cat([torch.zeros_like(k[:, :, :1]), k[:, :, :-1]], dim=2)
    first_free = torch.cat([torch.zeros_like(lr[..., :1]), lr[..., 1:]], dim=-1)
    want, want_weights = scan(q, previous, v, first_free, inner_loss="reconstruction", **options)
    _assert_close(got, want, "next_token outputs")
    for key in ("W1", "b1"):
        _assert_close(weights[key], want_weights[key], f"next_token weights[{key!r}]")


@pytest.mark.parametrize("name", ["linear", "mlp"])
def test_the_inner_models_start_from_the_papers_initialisation(name: str) -> None:
    """TTT-Linear's and TTT-MLP's inner weights start as the paper's (their docstrings): each weight
    matrix normal(0, 0.02), each bias zero. Nothing checked the scale: 0.03 (mutant MD1) passed
    tests/core/test_invariances.py and test_layer_trust.py."""
    params = get_registry().inner_model(name).init_params(8, 64, generator=torch.Generator().manual_seed(7))
    for key, value in params.items():
        if key.startswith("b"):
            assert torch.equal(value, torch.zeros_like(value)), key
        else:  # at least 32,768 draws: the sample's std is within 1.5% of 0.02 (about 4 standard errors)
            assert abs(value.mean().item()) < 1e-3, key
            assert abs(value.std().item() / 0.02 - 1) < 0.015, (key, value.std().item())
