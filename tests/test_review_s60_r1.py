"""Session 60, review r1: TTT layers across kernel paths, shapes and dtypes."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from innerloop import TTTLayer
from innerloop.core.protocol import Views
from innerloop.core.scan import check_rule_returns
from innerloop.ops import scan


@pytest.mark.parametrize("kernel", ["torch", "fused_torch_mlp", "cpu_ttt_mlp"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_a_state_keeps_its_weights_in_one_order_on_every_path(kernel: str, grad: bool) -> None:
    """A state's weights come back in the order of the state given (the layer's initial_params), whatever
    path ran and whether autograd was on: the stack kernels returned TTT-MLP's in the stack's order (W1, b1,
    W2, b2) where the torch path keeps the layer's (W1, W2, b1, b2), so `state.params.values()`, flattened
    or zipped with another state's, changed meaning with the kernel and the grad mode, silently. The op
    keeps the order of the state it builds, the model's (W1, b1, W2, b2)."""
    torch.manual_seed(0)
    layer = TTTLayer(16, 2, inner_model="mlp", mini_batch_size=4, kernel=kernel)
    order = list(layer.initial_params)
    x = torch.randn(2, 11, 16)
    with torch.set_grad_enabled(grad):
        _, whole = layer(x[:, :8])  # whole mini-batches: the kernel
        _, inside = layer(x[:, 8:10], whole)  # inside a mini-batch: the pending sums
        _, decoded = layer(x[:, 10:], inside)  # a decoded token
    for state in (whole, inside, decoded):
        assert list(state.params) == order
        assert list(state.pending) == order
    weights = {k: v.detach() for k, v in layer.init_state(2).params.items()}
    q, k, v = torch.randn(3, 2, 2, 8, 8).unbind(0)
    lr = torch.full((2, 2, 8), 0.1)
    with torch.set_grad_enabled(grad):
        _, final = scan(q, k, v, lr, inner_model="mlp", mini_batch_size=4, initial=weights, kernel=kernel)
    assert list(final) == list(layer.inner_model.param_shapes(8))  # the op's own order, the model's


def test_a_rule_returning_its_groups_in_another_order_is_put_in_the_given_order() -> None:
    """The order is restored where every rule's result passes (``check_rule_returns``), for each group a
    rule writes: a plugin's rule (or kernel) returning its pending sums or momentum in its own order is
    read in the state's order too."""
    layer = TTTLayer(16, 2, inner_model="mlp", mini_batch_size=4)
    state = layer.init_state(2)
    views = Views(*torch.randn(3, 2, 2, 3, 8).unbind(0))

    def backwards(group: dict) -> dict:
        return dict(reversed(group.items()))

    returned = replace(
        state,
        position=3,
        params=backwards(state.params),
        pending=backwards(state.pending),
        momentum=backwards(state.pending),
    )
    _, new_state = check_rule_returns(layer.update_rule, (views.query, returned), state, views)
    order = list(state.params)
    assert [list(new_state.params), list(new_state.pending), list(new_state.momentum)] == [order] * 3
