"""A state at a mini-batch boundary has no pending sums (``TTTState``): a layer writes zeros there. A
hand-edited one with nonzero sums (a position moved onto a boundary, sums written by hand) is refused by
the layer on every path, whole call or token by token, as ``TTTState.from_tensors`` refuses it (review
s20: it was read as zeros, silently other numbers than the sequence the sums came from; review s18 had
made the paths agree on that reading). ``ops.scan``, below the layer, still reads them as zero."""

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
def test_nonzero_pending_at_a_boundary_is_refused_whole_or_token_by_token(model, rule, kernel) -> None:
    torch.manual_seed(0)
    options = {"mini_batch_size": 1} if model == "matrix" else {}
    layer = TTTLayer(
        8, 2, inner_model=model, update_rule=rule, kernel=kernel, **{"mini_batch_size": 2, **options}
    )
    layer = layer.double()
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    clean = _boundary_state(layer, x, garbage=False)
    edited = _boundary_state(layer, x, garbage=True)
    whole, _ = layer(x)
    expected, _ = layer(x[:, 2:], clean)  # the state as written: the whole sequence's numbers
    torch.testing.assert_close(expected, whole[:, 2:], rtol=1e-12, atol=1e-12)
    for part in (x[:, 2:], x[:, 2:3]):
        with pytest.raises(
            ValueError, match=r"at a mini-batch boundary .* state.pending \[.*\] are not zero"
        ):
            layer(part, edited)


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
