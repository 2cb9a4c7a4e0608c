"""Review s20 (the kind of the states review's findings, in the functional API): ``ops.scan`` returned
the weights of a call that stopped inside a mini-batch as a plain dict, and passed back as ``initial``
they started a new mini-batch where the whole sequence finishes that one: other numbers, no error (the
docstring said so). They come back marked now (``PartialWeights``) and ``initial`` refuses them."""

from __future__ import annotations

import pytest
import torch

from innerloop.ops import PartialWeights, scan


def _inputs(tokens: int):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, tokens, 8, dtype=torch.float64) for _ in range(3))
    return q, k, v, torch.rand(2, 3, tokens, dtype=torch.float64) * 0.1


@pytest.mark.parametrize("update_rule", ["dual_form", "minibatch_gd"])
def test_weights_from_inside_a_mini_batch_are_refused_as_initial(update_rule) -> None:
    q, k, v, lr = _inputs(10)
    options = dict(mini_batch_size=4, update_rule=update_rule)
    _, weights = scan(q[:, :, :6], k[:, :, :6], v[:, :, :6], lr[:, :, :6], **options)
    assert isinstance(weights, PartialWeights) and weights.tokens_into_mini_batch == 2
    with pytest.raises(ValueError, match=r"stopped 2 tokens into a mini-batch of 4.*TTTLayer"):
        scan(q[:, :, 6:], k[:, :, 6:], v[:, :, 6:], lr[:, :, 6:], initial=weights, **options)
    # at a boundary they are plain weights, and continuing from them is the whole sequence
    whole, _ = scan(q, k, v, lr, **options)
    _, boundary = scan(q[:, :, :8], k[:, :, :8], v[:, :, :8], lr[:, :, :8], **options)
    assert type(boundary) is dict
    rest, _ = scan(q[:, :, 8:], k[:, :, 8:], v[:, :, 8:], lr[:, :, 8:], initial=boundary, **options)
    torch.testing.assert_close(rest, whole[:, :, 8:], rtol=1e-12, atol=1e-12)


def test_a_plain_dict_of_them_passes_where_the_mini_batch_size_does_not_matter() -> None:
    """Linear attention (the bare matrix model under the dot_product loss): any split is exact, so
    ``dict(weights)`` continues the sequence, as the refusal's message says."""
    q, k, v, lr = _inputs(10)
    options = dict(
        inner_model="matrix",
        inner_loss="dot_product",
        mini_batch_size=4,
        inner_norm=False,
        inner_residual=False,
    )
    whole, _ = scan(q, k, v, lr, **options)
    _, weights = scan(q[:, :, :6], k[:, :, :6], v[:, :, :6], lr[:, :, :6], **options)
    rest, _ = scan(q[:, :, 6:], k[:, :, 6:], v[:, :, 6:], lr[:, :, 6:], initial=dict(weights), **options)
    torch.testing.assert_close(rest, whole[:, :, 6:], rtol=1e-12, atol=1e-12)
