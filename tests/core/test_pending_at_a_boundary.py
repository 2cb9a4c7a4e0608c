"""A state at a mini-batch boundary has no pending sums (``TTTState``): a layer writes zeros there. A
hand-edited one with nonzero sums is read as zeros on every path, so that a whole call, the same call
token by token and every update rule agree; ``TTTState.from_tensors`` refuses one (review s18, gradients)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from innerloop import TTTLayer
from innerloop.core.state import TTTState

RULES = [("linear", "dual_form"), ("linear", "minibatch_gd"), ("mlp", "dual_form"), ("matrix", "dual_form")]


def _boundary_state(layer: TTTLayer, x: torch.Tensor, garbage: bool) -> TTTState:
    """The state after the first mini-batch of ``x`` (position 2), its pending sums replaced by noise."""
    _, state = layer(x[:, :2])
    if garbage:
        state = replace(state, pending={k: torch.randn_like(v) for k, v in state.pending.items()})
    return state


@pytest.mark.parametrize(("model", "rule"), RULES, ids=lambda v: v)
@pytest.mark.parametrize("kernel", ["torch", "auto"])
def test_nonzero_pending_at_a_boundary_is_read_as_zero_whole_or_token_by_token(model, rule, kernel) -> None:
    torch.manual_seed(0)
    options = {"mini_batch_size": 1} if model == "matrix" else {}
    layer = TTTLayer(
        8, 2, inner_model=model, update_rule=rule, kernel=kernel, **{"mini_batch_size": 2, **options}
    )
    layer = layer.double()
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    clean = _boundary_state(layer, x, garbage=False)
    edited = _boundary_state(layer, x, garbage=True)
    expected, expected_state = layer(x[:, 2:], clean)
    whole, whole_state = layer(x[:, 2:], edited)
    pieces, state = [], edited
    for t in range(2, 7):
        y, state = layer(x[:, t : t + 1], state)
        pieces.append(y)
    for out, final in ((whole, whole_state), (torch.cat(pieces, dim=1), state)):
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        for name, tensor in expected_state.tensors().items():
            torch.testing.assert_close(final.tensors()[name], tensor, rtol=1e-12, atol=1e-12)


def test_from_tensors_refuses_nonzero_pending_at_a_boundary() -> None:
    torch.manual_seed(0)
    layer = TTTLayer(8, 2, mini_batch_size=2).double()
    x = torch.randn(1, 4, 8, dtype=torch.float64)
    state = _boundary_state(layer, x, garbage=False)
    loaded = TTTState.from_tensors(state.tensors(), state.metadata())  # a layer's own state loads
    torch.testing.assert_close(layer(x[:, 2:], loaded)[0], layer(x[:, 2:], state)[0], rtol=0, atol=0)
    edited = _boundary_state(layer, x, garbage=True)
    with pytest.raises(ValueError, match=r"pending\.W1 .* nonzero at a mini-batch boundary \(position 2"):
        TTTState.from_tensors(edited.tensors(), edited.metadata())
    _, inside = layer(x[:, :3])  # inside a mini-batch the sums are the state: they load
    assert TTTState.from_tensors(inside.tensors(), inside.metadata()).offset == 1


def test_a_boundary_state_on_the_meta_device_loads_without_reading_values() -> None:
    layer = TTTLayer(8, 2, mini_batch_size=2).double()
    _, state = layer(torch.randn(1, 2, 8, dtype=torch.float64))
    tensors = {name: t.to("meta") for name, t in state.tensors().items()}  # shapes only (tracing)
    assert TTTState.from_tensors(tensors, state.metadata()).offset == 0
