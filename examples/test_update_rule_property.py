"""A hypothesis property test of an update rule: the dual form computes what the primal form does.

The dual form (no per-token weight matrices) and mini-batch gradient descent in the primal form
(through torch.func) must give the same outputs and the same final state for every layer
configuration, in float64, and when the sequence is fed in arbitrary chunks. Run it with

    python -m pytest examples/test_update_rule_property.py

Write the same test for your own update rule by putting its registered name in ``update_rules``.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from innerloop import TTTLayer
from innerloop.testing.strategies import layer_configs, seeds, split_points


@given(
    config=layer_configs(inner_models=("linear", "mlp"), update_rules=("dual_form",)),
    seed=seeds(),
    data=st.data(),
)
@settings(max_examples=15, deadline=None)
def test_dual_form_equals_the_primal_form_on_any_chunking(config, seed, data) -> None:
    length = data.draw(st.integers(1, 3 * config["mini_batch_size"] + 2), label="length")
    cuts = data.draw(split_points(length), label="cuts")
    torch.manual_seed(seed)
    dual = TTTLayer(**config).double()
    primal = TTTLayer(**{**config, "update_rule": "minibatch_gd"}).double()
    primal.load_state_dict(dual.state_dict())
    x = torch.randn(2, length, config["hidden_size"], dtype=torch.float64)

    expected, expected_state = primal(x)
    pieces, state = [], None
    for start, end in zip([0, *cuts], [*cuts, length], strict=True):
        y, state = dual(x[:, start:end], state)
        pieces.append(y)
    torch.testing.assert_close(torch.cat(pieces, dim=1), expected, rtol=1e-9, atol=1e-10)
    for group in ("params", "pending"):  # the weights and the partial mini-batch's gradient sums
        for name, value in getattr(expected_state, group).items():
            torch.testing.assert_close(getattr(state, group)[name], value, rtol=1e-9, atol=1e-10)
