"""Invariances of TTT layers, in float64, under hypothesis.

dual form = primal form = naive token loop; any split with the state carried = the whole; prefill
then token-by-token decode = the whole; TTT-Linear reduces to causal linear attention; outer
gradients through the inner loop pass gradcheck.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from innerloop import TTTLayer
from innerloop.core.protocol import AffineLayer, InnerTask, StackModel, Views
from innerloop.core.state import StateSignature, TTTState
from innerloop.registry import get_registry
from innerloop.testing import (
    FLOAT64_TOLERANCE,
    causal_linear_attention,
    check_inner_loss,
    check_inner_model,
    check_update_rule,
    make_problem,
    naive_token_loop,
    run_in_chunks,
    run_layer_in_chunks,
)
from innerloop.testing.checks import LONG_CHECK_SHAPE, PLUGIN_CHECK_SHAPE, assert_close, assert_states_close
from innerloop.testing.strategies import layer_configs, seeds, split_points, views

MODELS = ["linear", "mlp"]
LOSSES = ["reconstruction", "next_token"]
RULES = ["dual_form", "minibatch_gd"]


def perturbed_layer(config: dict, seed: int) -> TTTLayer:
    """A float64 layer whose every parameter is moved off its init, so each one matters."""
    torch.manual_seed(seed)
    layer = TTTLayer(**config, kernel="torch").double()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.1)
    return layer


# ---- the update rules against the naive loop (the plugin checks of innerloop.testing) -----------


# The checks' default shapes (PLUGIN_CHECK_SHAPES), one test each: the 37-token one in the fast loop, the
# 150-token one with five heads (~0.25 s of the ~0.35 s each model or loss takes) with the slow tests.
DEFAULT_CHECK_SHAPES = [
    pytest.param(PLUGIN_CHECK_SHAPE, id="37_tokens"),
    pytest.param(LONG_CHECK_SHAPE, id="150_tokens", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("shape", DEFAULT_CHECK_SHAPES)
@pytest.mark.parametrize("model", MODELS)
def test_models_conform(model, shape):
    check_inner_model(get_registry().inner_model(model), **shape)


@pytest.mark.parametrize("shape", DEFAULT_CHECK_SHAPES)
@pytest.mark.parametrize("loss", LOSSES)
def test_losses_conform(loss, shape):
    check_inner_loss(get_registry().inner_loss(loss), **shape)


@given(
    rule=st.sampled_from(RULES),
    model=st.sampled_from(MODELS),
    loss=st.sampled_from(LOSSES),
    mini_batch=st.integers(1, 6),
    tokens=st.integers(1, 14),
    norm=st.booleans(),
    residual=st.booleans(),
    seed=seeds(),
    data=st.data(),
)
@pytest.mark.slow  # ~1.6 s: over the fast loop's 0.4 s per test
def test_rule_equals_naive_loop_for_any_split(
    rule, model, loss, mini_batch, tokens, norm, residual, seed, data
):
    registry = get_registry()
    cuts = data.draw(split_points(tokens))
    check_update_rule(
        registry.update_rule(rule),
        registry.inner_model(model),
        registry.inner_loss(loss),
        cut_points=cuts,
        seed=seed,
        tokens=tokens,
        mini_batch_size=mini_batch,
        norm=norm,
        residual=residual,
    )


def test_a_wrong_rule_is_caught():
    """The checks can fail: a rule that drops the token-index scale is rejected."""
    registry = get_registry()
    dual = registry.update_rule("dual_form")

    class Broken(type(dual)):
        name = "broken"

        def forward(self, state, task, views, lr, tau):
            return super().forward(state, task, views, lr, torch.ones_like(tau))

    with pytest.raises(AssertionError, match="relative error"):
        check_update_rule(Broken())


# ---- the whole layer ----------------------------------------------------------------------------


@given(config=layer_configs(), tokens=st.integers(1, 20), seed=seeds(), data=st.data())
def test_layer_any_split_equals_whole(config, tokens, seed, data):
    layer = perturbed_layer(config, seed % 1000)
    x = torch.randn(
        2, tokens, config["hidden_size"], dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
    )
    whole, whole_state = layer(x)
    split, split_state = run_layer_in_chunks(layer, x, data.draw(split_points(tokens)))
    assert_close(split, whole, "split vs whole", FLOAT64_TOLERANCE)
    assert_states_close(split_state, whole_state, "split vs whole", FLOAT64_TOLERANCE)
    for key in whole_state.conv_history:
        assert_close(
            split_state.conv_history[key], whole_state.conv_history[key], "conv history", FLOAT64_TOLERANCE
        )


@pytest.mark.slow  # ~0.45 s: 12 examples; the chunk plan is checked fast below
@given(
    config=layer_configs(),
    chunk=st.integers(1, 9),
    start=st.integers(0, 7),
    tokens=st.integers(1, 30),
    kernel=st.sampled_from(["auto", "torch"]),
    seed=seeds(),
)
def test_chunked_inference_equals_the_whole_call(config, chunk, start, tokens, kernel, seed):
    """Without autograd a long call is read in chunks (state carried), from any starting position:
    the same numbers as the whole call with autograd on, which neither chunks nor rotates in place."""
    reference = perturbed_layer(config, seed % 1000)
    chunked = TTTLayer(**{**config, "kernel": kernel}, inference_chunk_size=chunk).double()
    chunked.load_state_dict(reference.state_dict())
    x = torch.randn(2, start + tokens, config["hidden_size"], dtype=torch.float64)
    _, state = reference(x[:, :start]) if start else (None, None)
    whole, whole_state = reference(x[:, start:], state)  # parameters require grad: one call
    assert len(reference.dispatches) <= 3  # an unaligned head, whole mini-batches, an unaligned tail
    with torch.no_grad():
        split, split_state = chunked(x[:, start:], state)
    assert_close(split, whole, "chunked vs whole", FLOAT64_TOLERANCE)
    assert_states_close(split_state, whole_state, "chunked vs whole", FLOAT64_TOLERANCE)


def test_inference_chunks_end_on_mini_batch_boundaries_and_only_without_autograd():
    layer = TTTLayer(8, 2, mini_batch_size=4, inference_chunk_size=10)  # chunks of 8 tokens
    x = torch.randn(1, 20, 8)
    _, state = layer(x[:, :3])  # position 3: one token short of a mini-batch boundary
    with torch.no_grad():
        assert layer._inference_chunks(x, state) == [(0, 5), (5, 13), (13, 20)]
        assert layer._inference_chunks(x[:, :10], layer.init_state(1)) == [(0, 10)]  # not longer than 10
    assert layer._inference_chunks(x, state) == [(0, 20)]  # the parameters need gradients


@pytest.mark.slow  # ~0.45 s: 12 examples; test_generate.py decodes against a full forward in the fast loop
@given(config=layer_configs(), prefill=st.integers(0, 12), decode=st.integers(1, 10), seed=seeds())
def test_prefill_then_decode_equals_whole(config, prefill, decode, seed):
    layer = perturbed_layer(config, seed % 1000)
    x = torch.randn(1, prefill + decode, config["hidden_size"], dtype=torch.float64)
    whole, _ = layer(x)
    cuts = ([prefill] if prefill else []) + list(range(prefill + 1, prefill + decode))
    stepped, _ = run_layer_in_chunks(layer, x, cuts)
    assert_close(stepped, whole, "prefill + decode vs whole", FLOAT64_TOLERANCE)


@given(config=layer_configs(update_rules=("dual_form",)), tokens=st.integers(1, 12), seed=seeds())
def test_layer_dual_equals_primal(config, tokens, seed):
    dual = perturbed_layer(config, seed % 1000)
    primal = perturbed_layer({**config, "update_rule": "minibatch_gd"}, seed % 1000)
    x = torch.randn(2, tokens, config["hidden_size"], dtype=torch.float64)
    assert_close(dual(x)[0], primal(x)[0], "dual vs primal layer", FLOAT64_TOLERANCE)


# ---- theory: TTT-Linear with W0 = 0, no LN, no residual is causal linear attention ---------------


class LinearNoBias(StackModel):
    name = "linear_no_bias"

    @property
    def stack(self):
        return (AffineLayer("W", None, None),)

    def param_shapes(self, head_dim):
        return {"W": (head_dim, head_dim)}

    def init_params(self, num_heads, head_dim, generator=None):
        return {"W": torch.zeros(num_heads, head_dim, head_dim)}


@pytest.mark.parametrize("rule", RULES)
def test_linear_ttt_is_causal_linear_attention(rule):
    registry = get_registry()
    batch, heads, tokens, head_dim, lr_value, tau_value = 2, 3, 9, 5, 0.3, 0.7
    generator = torch.Generator().manual_seed(0)
    views = Views(
        *(
            torch.randn(batch, heads, tokens, head_dim, dtype=torch.float64, generator=generator)
            for _ in range(3)
        )
    )
    params = {"W": torch.zeros(batch, heads, head_dim, head_dim, dtype=torch.float64)}
    state = TTTState(
        params=params,
        pending={"W": torch.zeros_like(params["W"])},
        position=0,
        signature=StateSignature(batch, heads, head_dim, tokens, "linear_no_bias", "reconstruction"),
    )
    task = InnerTask(
        model=LinearNoBias(),
        loss=registry.inner_loss("reconstruction"),
        mini_batch_size=tokens,  # one mini-batch spans the sequence
        norm_weight=None,
        norm_bias=None,
        residual=False,
        kernel="torch",
    )
    lr = torch.full((batch, heads, tokens), lr_value, dtype=torch.float64)
    tau = torch.full((tokens,), tau_value, dtype=torch.float64)
    out, _ = registry.update_rule(rule).forward(state, task, views, lr, tau)
    # grad of 1/2||x W - v||^2 at W = 0 is -x^T v, so W_i = tau * lr * sum_{j<=i} k_j^T v_j.
    expected = tau_value * lr_value * causal_linear_attention(views.query, views.key, views.value)
    assert_close(out, expected, f"{rule} vs causal linear attention", FLOAT64_TOLERANCE)


# ---- outer gradients through the inner loop -----------------------------------------------------


# Element by element (one pair of calls per element of every input) for the linear dual form, the fast
# loop's case; the other three in fast mode (as tests/core/test_review_s23_gradcheck.py and innerloop.testing's
# own checks: the finite difference along a random direction of every input, projected on a random vector
# of the outputs): 7.7 s of CPU became 0.6 s. A detach or a missing term fails fast mode; a rule's gradient
# 1% off in one element of lr passes it, and fails test_rule_equals_naive_loop_for_any_split (every gradient
# of the rule against the naive loop's, element-wise). The primal rule's element-by-element gradcheck took
# ~2-4 s per model (a vmapped token loop per perturbation), the MLP's dual form ~1 s: hence their slow marks.
@pytest.mark.parametrize("rule", ["dual_form", pytest.param("minibatch_gd", marks=pytest.mark.slow)])
@pytest.mark.parametrize("model", ["linear", pytest.param("mlp", marks=pytest.mark.slow)])
def test_outer_gradients_pass_gradcheck(rule, model):
    layer = perturbed_layer(
        dict(
            hidden_size=4, num_heads=2, inner_model=model, update_rule=rule, mini_batch_size=2, use_gate=True
        ),
        seed=3,
    )
    x = torch.randn(1, 5, 4, dtype=torch.float64, requires_grad=True)
    names = [
        "initial_params.W1",
        "learnable_ttt_lr_weight",
        "learnable_token_idx",
        "ttt_norm_weight",
        "q_proj.weight",
    ]
    params = dict(layer.named_parameters())
    leaves = [params[n].detach().clone().requires_grad_(True) for n in names]

    def run(x, *values):
        overrides = dict(zip(names, values, strict=True))
        return torch.func.functional_call(layer, overrides, (x,))[0]

    fast_mode = (rule, model) != ("dual_form", "linear")
    assert torch.autograd.gradcheck(run, (x, *leaves), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=fast_mode)


def test_naive_loop_carries_state_across_calls():
    registry = get_registry()
    problem = make_problem(registry.inner_model("mlp"), registry.inner_loss("next_token"), tokens=10)
    whole, whole_state = naive_token_loop(problem.state, problem.task, problem.views, problem.lr, problem.tau)
    out, state = run_in_chunks(registry.update_rule("minibatch_gd"), problem, [3, 7])
    assert_close(out, whole, "chunks", FLOAT64_TOLERANCE)
    assert_states_close(state, whole_state, "chunks", FLOAT64_TOLERANCE)


@given(views=views(), loss=st.sampled_from(LOSSES), data=st.data())
def test_loss_pairs_of_chunks_equal_pairs_of_the_whole(views, loss, data):
    inner_loss = get_registry().inner_loss(loss)
    batch, heads, tokens, head_dim = views.query.shape
    carry = inner_loss.init_carry(batch, heads, head_dim, views.key)
    whole = inner_loss.pairs(views, carry)
    bounds = [0, *data.draw(split_points(tokens)), tokens]
    inputs, targets = [], []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        pairs = inner_loss.pairs(views.slice_tokens(start, end), carry)
        carry = pairs.carry
        inputs.append(pairs.inputs)
        targets.append(pairs.targets)
    assert torch.equal(torch.cat(inputs, dim=2), whole.inputs)
    assert torch.equal(torch.cat(targets, dim=2), whole.targets)
