"""s52i: a newcomer's inner loss plugin, end to end, and the checks a buggy one meets."""

from __future__ import annotations

import pytest
import torch

from innerloop.core.protocol import InnerLoss, LossPairs, Views
from innerloop.registry import PluginError, isolated_registry, register_inner_loss


class _Reconstruction(InnerLoss):
    """XK -> XV under 1/2 ||p - t||^2, written out (the base of the buggy losses below)."""

    def pairs(self, views: Views, carry: dict) -> LossPairs:
        return LossPairs(inputs=views.key, targets=views.value, valid=None, carry={})

    def token_loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 0.5 * (prediction - target).pow(2).sum(-1)


class _GradSubtractsInPlace(_Reconstruction):
    """The closed form computed into the prediction: ``prediction.sub_(target)``."""

    name = "s52i_grad_sub_in_place"

    def token_loss_grad(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return prediction.sub_(target)


class _LossSubtractsInPlace(_Reconstruction):
    """``prediction -= target`` in ``token_loss`` (autograd's gradient, no closed form)."""

    name = "s52i_loss_sub_in_place"

    def token_loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        prediction -= target
        return 0.5 * prediction.pow(2).sum(-1)


class _GradScalesTargetInPlace(_Reconstruction):
    """Writes into the target inside the closed form."""

    name = "s52i_grad_target_in_place"

    def token_loss_grad(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return prediction - target.mul_(1.0 + 1e-3)


@pytest.mark.parametrize(
    ("loss", "method", "tensor"),
    [
        (_GradSubtractsInPlace(), "token_loss_grad", "the prediction"),
        (_LossSubtractsInPlace(), "token_loss", "the prediction"),
        (_GradScalesTargetInPlace(), "token_loss_grad", "the target"),
    ],
)
def test_a_loss_writing_into_its_prediction_is_refused_naming_the_write(
    loss: InnerLoss, method: str, tensor: str
) -> None:
    """A loss that computes in place into what it is given was refused with torch's 'a leaf Variable
    that requires grad is being used in an in-place operation' (and for a token_loss, a hint about
    .item() and numpy): nothing said which method wrote into what. Now the registrar names both."""
    with isolated_registry(), pytest.raises(PluginError) as refused:
        register_inner_loss(loss)
    message = str(refused.value)
    assert f"{method} wrote into {tensor}" in message, message
    assert "leaf Variable" not in message and ".item()" not in message, message
