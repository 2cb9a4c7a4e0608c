"""The inner-loss diagnostics measure what they say."""

from __future__ import annotations

import torch

from innerloop import TTTLayer
from innerloop.core.diagnostics import inner_loss_before_after


def test_before_and_after_of_one_mini_batch_by_hand():
    torch.manual_seed(0)
    layer = TTTLayer(16, 2, mini_batch_size=8).double()
    x = torch.randn(3, 8, 16, dtype=torch.float64)
    before, after = inner_loss_before_after(layer, x)

    state = layer.init_state(3, like=x)
    views, _, _, _ = layer._read(x, state)
    task = layer.inner_task()
    _, end_state = layer(x)

    def loss_at(params):
        return task.loss.token_loss(task.predict(params, views.key), views.value).mean(dim=(1, 2))

    torch.testing.assert_close(before, loss_at(state.params), rtol=1e-12, atol=0)
    torch.testing.assert_close(after, loss_at(end_state.params), rtol=1e-12, atol=0)
    assert (after < before).all()  # a step of gradient descent with a small lr lowers the loss


def test_zero_inner_lr_changes_nothing():
    torch.manual_seed(1)
    layer = TTTLayer(16, 2, mini_batch_size=4, base_lr=0.0, inner_loss="next_token", inner_model="mlp")
    before, after = inner_loss_before_after(layer, torch.randn(2, 13, 16))
    assert torch.equal(before, after)  # lr 0: the weights never move, so the numbers are identical
