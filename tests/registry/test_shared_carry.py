"""A loss whose carry is shared by the batch (a ``[H, f]`` tensor, no batch dim) is a valid loss: the
batch-independence check must not cut it into rows, also where the head count equals the batch size."""

from __future__ import annotations

import pytest
import torch

import innerloop
from innerloop.core.protocol import HalfSquaredError, LossPairs, Views
from innerloop.testing.checks import check_pairs_batch_independent

pytestmark = pytest.mark.usefixtures("fresh_global_registry")  # tests/conftest.py


class SharedScale(HalfSquaredError):
    """Targets ``value * scale`` with one ``scale [H, f]`` for every sequence: nothing mixes them."""

    name = "shared_scale_test"

    def init_carry(self, batch_size, num_heads, head_dim, like):
        scale = 1 + torch.arange(num_heads * head_dim, dtype=like.dtype, device=like.device) / 10
        return {"scale": scale.reshape(num_heads, head_dim)}

    def pairs(self, views, carry):
        scale = carry["scale"]
        return LossPairs(views.key, views.value * scale[None, :, None, :], carry={"scale": scale})


class MixesTheBatch(SharedScale):
    name = "mixes_the_batch_test"

    def pairs(self, views, carry):
        pairs = super().pairs(views, carry)
        return LossPairs(pairs.inputs, pairs.targets - pairs.targets.mean(0, keepdim=True), carry=pairs.carry)


@pytest.mark.parametrize("batch", [2, 3])
def test_a_carry_shared_by_the_batch_passes_when_heads_equal_the_batch(batch):
    views = Views(*(torch.randn(batch, batch, 5, 4, dtype=torch.float64) for _ in range(3)))
    loss = SharedScale()
    check_pairs_batch_independent(loss, views, loss.init_carry(batch, batch, 4, views.key))
    with pytest.raises(AssertionError, match="sequence 0's pairs in a batch"):
        check_pairs_batch_independent(MixesTheBatch(), views, loss.init_carry(batch, batch, 4, views.key))


def test_registration_accepts_it():
    innerloop.register_inner_loss(SharedScale())
