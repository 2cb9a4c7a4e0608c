"""The kit's invariances for the family's members (float64): decay and momentum in every rule that
takes them, the ``matrix`` model, the ``momentum`` rule.

split = whole; prefill + token-by-token decode = whole; dual form = primal form with decay; the
momentum rule without momentum = the dual form with tau = 1; decay 0 and momentum 0 = the plain rule;
gradcheck through decay and momentum; the layer carries momentum and the decay product across calls.
And the kit can fail: a rule that mishandles decay or momentum is caught.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from innerloop import InnerModel, TTTLayer
from innerloop.registry import get_registry
from innerloop.testing import (
    check_inner_model,
    check_update_rule,
    make_problem,
    run_in_chunks,
    run_layer_in_chunks,
)
from innerloop.testing.checks import (
    FLOAT64_TOLERANCE,
    assert_close,
    assert_states_close,
    check_update_rule_gradients,
)
from innerloop.testing.strategies import seeds, split_points

MODELS = ["matrix", "linear", "mlp"]
LOSSES = ["reconstruction", "next_token"]
RULES = ["dual_form", "minibatch_gd", "momentum"]


@settings(max_examples=8, deadline=None)
@given(
    rule=st.sampled_from(RULES),
    model=st.sampled_from(MODELS),
    loss=st.sampled_from(LOSSES),
    mini_batch=st.integers(1, 5),
    tokens=st.integers(1, 11),
    norm=st.booleans(),
    residual=st.booleans(),
    seed=seeds(),
    data=st.data(),
)
@pytest.mark.slow  # ~0.5 s: over the fast loop's 0.4 s per test
def test_rules_equal_the_naive_loop_with_decay_and_momentum_for_any_split(
    rule, model, loss, mini_batch, tokens, norm, residual, seed, data
):
    """check_update_rule: plain, with decay, with momentum, with both (where the rule takes them),
    whole and cut anywhere; decay 0 and momentum 0 give the plain rule."""
    registry = get_registry()
    check_update_rule(
        registry.update_rule(rule),
        registry.inner_model(model),
        registry.inner_loss(loss),
        cut_points=data.draw(split_points(tokens)),
        seed=seed,
        tokens=tokens,
        mini_batch_size=mini_batch,
        norm=norm,
        residual=residual,
    )


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("model", MODELS)
def test_prefill_then_token_by_token_decode_equals_the_whole(rule, model):
    registry = get_registry()
    update_rule = registry.update_rule(rule)
    momentum = update_rule.supports_momentum
    problem = make_problem(
        registry.inner_model(model), registry.inner_loss("next_token"), tokens=9, mini_batch_size=4,
        decay=True, momentum=momentum,
    ).for_rule(update_rule)  # fmt: skip
    whole, whole_state = problem.run(update_rule)
    decoded, decoded_state = run_in_chunks(update_rule, problem, list(range(5, 9)))  # prefill 5, then 1 by 1
    assert_close(decoded, whole, f"{rule} on {model}: prefill + decode vs whole", FLOAT64_TOLERANCE)
    assert_states_close(decoded_state, whole_state, f"{rule} on {model}", FLOAT64_TOLERANCE)


@settings(max_examples=6, deadline=None)
@given(
    model=st.sampled_from(MODELS),
    loss=st.sampled_from(LOSSES),
    mini_batch=st.integers(1, 5),
    tokens=st.integers(1, 11),
    seed=seeds(),
)
def test_dual_equals_primal_with_decay_and_momentum_rule_equals_dual_with_unit_tau(
    model, loss, mini_batch, tokens, seed
):
    registry = get_registry()
    problem = make_problem(
        registry.inner_model(model), registry.inner_loss(loss), tokens=tokens, mini_batch_size=mini_batch,
        seed=seed, decay=True,
    )  # fmt: skip
    dual, dual_state = problem.run(registry.update_rule("dual_form"))
    primal, primal_state = problem.run(registry.update_rule("minibatch_gd"))
    assert_close(dual, primal, f"dual vs primal with decay on {model}", FLOAT64_TOLERANCE)
    assert_states_close(dual_state, primal_state, "dual vs primal with decay", FLOAT64_TOLERANCE)

    unit = problem.__class__(**{**problem.__dict__, "tau": torch.ones_like(problem.tau)})
    with_unit_tau, _ = unit.run(registry.update_rule("dual_form"))
    momentum_rule, _ = problem.for_rule(registry.update_rule("momentum")).run(
        registry.update_rule("momentum")
    )
    assert_close(
        momentum_rule,
        with_unit_tau,
        "momentum rule without momentum vs dual form, tau = 1",
        FLOAT64_TOLERANCE,
    )


@pytest.mark.parametrize(
    ("rule", "model"), [("dual_form", "linear"), ("minibatch_gd", "matrix"), ("momentum", "mlp")]
)
def test_gradcheck_through_decay_and_momentum(rule, model):
    registry = get_registry()
    check_update_rule_gradients(
        registry.update_rule(rule), registry.inner_model(model), registry.inner_loss("reconstruction"),
        batch=1, heads=1, head_dim=3, tokens=4, mini_batch_size=2,
    )  # fmt: skip


class GatedLayer(TTTLayer):
    """A layer whose decay and momentum are gates of its input (causal, per token): the hook a
    family layer (Gated DeltaNet, Titans) overrides."""

    def forgetting(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        gates = torch.sigmoid(x[..., : 2 * self.num_heads].unflatten(-1, (2, self.num_heads)))  # [B, T, 2, H]
        decay, momentum = 0.5 * gates[:, :, 0].transpose(1, 2), gates[:, :, 1].transpose(1, 2)  # [B, H, T]
        return decay, (momentum if self.update_rule.supports_momentum else None)


@pytest.mark.parametrize(
    ("rule", "model"), [("momentum", "matrix"), ("dual_form", "matrix"), ("momentum", "mlp")]
)
def test_the_layer_carries_momentum_and_decay_across_calls(rule, model):
    torch.manual_seed(0)
    layer = GatedLayer(8, 2, inner_model=model, update_rule=rule, mini_batch_size=3, kernel="auto").double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        x = torch.randn(2, 10, 8, dtype=torch.float64)
        whole, state = layer(x)
        split, split_state = run_layer_in_chunks(layer, x, [2, 4, 7, 8, 9])
    assert_close(split, whole, f"{rule} layer cut vs whole", FLOAT64_TOLERANCE)
    assert_states_close(split_state, state, f"{rule} layer", FLOAT64_TOLERANCE)
    assert set(state.momentum) == (set(layer.initial_params) if rule == "momentum" else set())
    assert set(state.decay) == {"product"}  # 10 tokens: inside the fourth mini-batch


def test_the_kit_catches_a_rule_that_ignores_decay():
    dual = get_registry().update_rule("dual_form")

    class Forgetful(type(dual)):
        name = "forgetful"

        def forward(self, state, task, views, lr, tau, decay=None):
            return super().forward(state, task, views, lr, tau)

    with pytest.raises(
        AssertionError, match=r"forgetful \(linear, reconstruction, decay[,)].*relative error"
    ):
        check_update_rule(Forgetful())


def test_the_kit_catches_a_rule_that_ignores_momentum():
    momentum = get_registry().update_rule("momentum")

    class Forgetful(type(momentum)):
        name = "no_momentum"

        def forward(self, state, task, views, lr, tau, decay=None, momentum=None):
            out, new_state = super().forward(state, task, views, lr, tau, decay=decay)
            return out, new_state

    with pytest.raises(AssertionError, match=r"no_momentum \(linear, reconstruction, momentum[,)]"):
        check_update_rule(Forgetful())


class PlainMatrix(InnerModel):
    """``x @ W`` without a declared stack: the momentum rule runs it in the primal form."""

    name = "plain_matrix"

    def param_shapes(self, head_dim: int) -> dict[str, tuple[int, ...]]:
        return {"W": (head_dim, head_dim)}

    def init_params(self, num_heads: int, head_dim: int, generator: torch.Generator | None = None) -> dict:
        return {"W": torch.zeros(num_heads, head_dim, head_dim)}

    def forward(self, params, x: torch.Tensor) -> torch.Tensor:
        return x @ params["W"]


@pytest.mark.slow  # the primal form with decay / momentum against the naive loop: 0.35-0.5 s a case
@pytest.mark.parametrize("rule", ["momentum", "minibatch_gd"])
def test_a_model_without_a_stack_takes_decay_and_momentum_in_the_primal_form(rule):
    registry = get_registry()
    check_update_rule(registry.update_rule(rule), PlainMatrix(), registry.inner_loss("next_token"), tokens=9)


@pytest.mark.slow  # check_inner_model on the matrix model: ~0.4 s
def test_the_matrix_model_conforms():
    """forward = its declared stack, and every rule that takes it = the naive loop."""
    check_inner_model(get_registry().inner_model("matrix"))
