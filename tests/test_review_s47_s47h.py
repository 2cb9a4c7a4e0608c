"""Review s47h: the user stories walked end to end by a newcomer (plugin, property tests, long context,
comparison against attention, the README's commands)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from innerloop.testing import check_update_rule, make_problem, naive_token_loop

#: A shape and seed of ``problems(inner_models=("linear", "mlp"))`` (CONTRIBUTING's hypothesis pattern)
#: on which make_problem's inner learning rates of up to 0.5, with no inner LayerNorm, made the naive
#: token loop itself diverge to NaN: check_update_rule then failed every rule, the built-ins too.
DIVERGING_SHAPE = {"batch": 2, "heads": 1, "head_dim": 8, "tokens": 30, "mini_batch_size": 1}
DIVERGING_SEED = 802467
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


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


@pytest.mark.slow  # reason: imports the example and lets hypothesis search its strategy, ~1 s
def test_the_property_example_draws_every_builtin_loss() -> None:
    """examples/test_update_rule_property.py says its layers draw every loss; layer_configs' default
    losses are reconstruction and next_token, so a rule wrong for dot_product alone passed it."""
    from hypothesis import find, settings

    from innerloop.testing.checks import BUILTIN_LOSSES

    spec = importlib.util.spec_from_file_location(
        "update_rule_property", EXAMPLES / "test_update_rule_property.py"
    )
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    for loss in BUILTIN_LOSSES:
        found = find(
            example.CONFIGS,
            lambda config, loss=loss: config["inner_loss"] == loss,
            settings=settings(database=None),
        )
        assert found["inner_loss"] == loss
