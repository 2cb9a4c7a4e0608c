"""Review s47h: the user stories walked end to end by a newcomer (plugin, property tests, long context,
comparison against attention, the README's commands)."""

from __future__ import annotations

import pytest

from innerloop.testing import check_update_rule, make_problem, naive_token_loop

#: A shape and seed of ``problems(inner_models=("linear", "mlp"))`` (CONTRIBUTING's hypothesis pattern)
#: on which make_problem's inner learning rates of up to 0.5, with no inner LayerNorm, made the naive
#: token loop itself diverge to NaN: check_update_rule then failed every rule, the built-ins too.
DIVERGING_SHAPE = {"batch": 2, "heads": 1, "head_dim": 8, "tokens": 30, "mini_batch_size": 1}
DIVERGING_SEED = 802467


def test_make_problem_without_the_inner_norm_does_not_diverge() -> None:
    for residual in (False, True):
        problem = make_problem(
            "mlp", "reconstruction", seed=DIVERGING_SEED, norm=False, residual=residual, **DIVERGING_SHAPE
        )
        out, state = naive_token_loop(problem.state, problem.task, problem.views, problem.lr, problem.tau)
        assert out.isfinite().all(), f"the naive loop diverges (residual={residual})"
        assert all(value.isfinite().all() for value in state.params.values())


@pytest.mark.slow  # reason: check_update_rule's cuts of a 30-token problem, ~1 s
def test_check_update_rule_passes_the_builtin_dual_form_on_a_drawn_mlp_problem() -> None:
    check_update_rule(
        "dual_form",
        model="mlp",
        loss="reconstruction",
        seed=DIVERGING_SEED,
        gradients=False,
        without_grad=False,
        norm=False,
        residual=False,
        **DIVERGING_SHAPE,
    )
