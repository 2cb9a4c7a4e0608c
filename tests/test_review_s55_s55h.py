"""Review s55h: the docs walk (README.md, CONTRIBUTING.md, docs/) -- claims held to the code."""

from __future__ import annotations

import pytest
import torch

from innerloop import TTTLayer
from innerloop.core.state import TTTState


def _state_with_a_carry() -> tuple[TTTLayer, TTTState]:
    layer = TTTLayer(8, 2, mini_batch_size=4, inner_loss="next_token")
    with torch.no_grad():
        _, state = layer(torch.randn(2, 6, 8))
    return layer, state


@pytest.mark.parametrize("given", ["next_token", 3])
def test_a_state_given_its_loss_by_name_says_what_was_given_not_none(given) -> None:
    """docs/architecture.md: a TTTState with a carry takes ``inner_loss=`` (the layer's). Given the loss's
    registered name, as a TTTLayer takes it, index_select and cat said "inner_loss is None, but the state
    was written by inner loss 'next_token'": the name it was given, read as None."""
    _, state = _state_with_a_carry()
    rows = torch.tensor([1, 0])
    with pytest.raises(TypeError, match=rf"layer\.inner_loss\), got {given!r} \({type(given).__name__}\)"):
        state.index_select(rows, inner_loss=given)
    with pytest.raises(TypeError, match=rf"layer\.inner_loss\), got {given!r} \({type(given).__name__}\)"):
        TTTState.cat([state, state], inner_loss=given)


def test_a_state_given_its_layers_loss_still_selects_and_joins_rows() -> None:
    layer, state = _state_with_a_carry()
    assert state.index_select(torch.tensor([1, 1, 0]), inner_loss=layer.inner_loss).batch_size == 3
    assert TTTState.cat([state, state], inner_loss=layer.inner_loss).batch_size == 4
