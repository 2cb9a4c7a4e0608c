"""A hypothesis property test of an update rule: the dual form computes what the primal form does.

The dual form (no per-token weight matrices) and mini-batch gradient descent in the primal form
(through torch.func) must give the same outputs, the same final state and the same gradients of
every parameter for every layer configuration (the inner LayerNorm and residual on and off
included), in float64, and when the sequence is fed in arbitrary chunks. Run it with

    python -m pytest examples/test_update_rule_property.py

Write the same test for your own update rule by putting its registered name in ``update_rules``
(and ``RULE``). The shapes vary where plugins go wrong: batches of up to 4 sequences and up to 4
heads; the second test also draws odd head dims and 1, and calls of up to 40 tokens (longer than a
rule's internal blocks of 16 or 32), through ``check_update_rule``
(:func:`innerloop.testing.strategies.problems`).
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from innerloop import TTTLayer, get_registry
from innerloop.testing import check_update_rule
from innerloop.testing.strategies import layer_configs, problems, seeds, split_points

RULE = "dual_form"

#: The layers the first test draws: every built-in loss and every LayerNorm / residual wrapping (the
#: default), so that a rule right for one only is caught.
CONFIGS = layer_configs(
    inner_models=("linear", "mlp"),
    inner_losses=(
        "reconstruction",
        "next_token",
        "dot_product",
    ),  # layer_configs' default leaves out the last
    update_rules=(RULE,),
)


@given(
    config=CONFIGS,
    seed=seeds(),
    data=st.data(),
)
@settings(max_examples=15, deadline=None)
def test_dual_form_equals_the_primal_form_on_any_chunking(config, seed, data) -> None:
    length = data.draw(st.integers(1, 3 * config["mini_batch_size"] + 2), label="length")
    batch = data.draw(st.integers(1, 4), label="batch")
    cuts = data.draw(split_points(length), label="cuts")
    torch.manual_seed(seed)
    dual = TTTLayer(**config).double()
    primal = TTTLayer(**{**config, "update_rule": "minibatch_gd"}).double()
    primal.load_state_dict(dual.state_dict())
    x = torch.randn(batch, length, config["hidden_size"], dtype=torch.float64)

    expected, expected_state = primal(x)
    pieces, state = [], None
    for start, end in zip([0, *cuts], [*cuts, length], strict=True):
        y, state = dual(x[:, start:end], state)
        pieces.append(y)
    got = torch.cat(pieces, dim=1)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)
    for group in ("params", "pending"):  # the weights and the partial mini-batch's gradient sums
        for name, value in getattr(expected_state, group).items():
            torch.testing.assert_close(getattr(state, group)[name], value, rtol=1e-9, atol=1e-10)
    # the gradients too: a rule that detaches the lr or the initial weights has the right outputs
    probe = torch.randn(expected.shape, dtype=torch.float64)
    names = [name for name, _ in primal.named_parameters()]
    wanted = torch.autograd.grad((expected * probe).sum(), list(primal.parameters()), allow_unused=True)
    grads = torch.autograd.grad((got * probe).sum(), list(dual.parameters()), allow_unused=True)
    for name, grad, want in zip(names, grads, wanted, strict=True):
        if want is not None:
            assert grad is not None, f"{name} gets no gradient through the rule"
            torch.testing.assert_close(grad, want, rtol=1e-8, atol=1e-9, msg=f"gradient of {name}")


@given(shape=problems(), seed=seeds())
@settings(max_examples=15, deadline=None)
def test_the_rule_equals_the_naive_token_loop_at_any_shape(shape, seed) -> None:
    """The rule against the naive token loop, whole and cut, for the reconstruction loss (the values;
    ``check_update_rule`` with no loss and ``gradients=True`` checks every built-in loss, the
    wrappings and the gradients, at a fixed shape)."""
    registry = get_registry()
    check_update_rule(
        registry.update_rule(RULE),
        loss=registry.inner_loss("reconstruction"),
        seed=seed,
        gradients=False,
        norm=True,
        residual=True,
        **shape,
    )
