"""Review s37c (docs, plugins and the house): the plugin testing kit's own inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import innerloop
from innerloop.testing import make_problem, run_in_chunks, run_layer_in_chunks


@pytest.fixture(scope="module")
def layer_and_input():
    torch.manual_seed(0)
    return innerloop.TTTLayer(8, 2, mini_batch_size=4), torch.randn(1, 6, 8)


@pytest.mark.parametrize("cut_points", [None, 5, torch.tensor(3), {3: 1}, "35"], ids=repr)
def test_cut_points_that_are_not_a_list_are_one_line_naming_them(layer_and_input, cut_points) -> None:
    """run_layer_in_chunks / run_in_chunks with None or one int gave Python's bare "'NoneType' object
    is not iterable" (or "iteration over a 0-d tensor"), and a dict was read as its keys."""
    layer, x = layer_and_input
    expected = r"run_layer_in_chunks: cut_points must be a list of token indices .* got "
    with pytest.raises(TypeError, match=expected):
        run_layer_in_chunks(layer, x, cut_points)
    registry = innerloop.get_registry()
    problem = make_problem(registry.inner_model("linear"), registry.inner_loss("reconstruction"), tokens=6)
    with pytest.raises(TypeError, match=r"run_in_chunks: cut_points must be a list of token indices"):
        run_in_chunks(registry.update_rule("dual_form"), problem, cut_points)


@pytest.mark.parametrize(
    "cut_points", [[2, 4], (2, 4), range(2, 5, 2), torch.tensor([2, 4]), np.array([2, 4])], ids=repr
)
def test_cut_points_in_any_sequence_still_cut(layer_and_input, cut_points) -> None:
    layer, x = layer_and_input
    with torch.no_grad():
        whole, _ = layer(x)
        pieces, _ = run_layer_in_chunks(layer, x, cut_points)
    torch.testing.assert_close(pieces, whole, rtol=1e-5, atol=1e-6)
