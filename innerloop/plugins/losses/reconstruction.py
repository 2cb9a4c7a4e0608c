"""``reconstruction``: the paper's inner task, ``f(XK_t)`` should reconstruct ``XV_t``.

With the layer's residual and LayerNorm, ``f(x) = x + LN(g(x))``, so the per-token loss
``1/2 ||f(XK_t) - XV_t||^2`` is the reference's ``1/2 ||LN(g(XK_t)) - (XV_t - XK_t)||^2``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from innerloop.core.protocol import InnerLoss, LossPairs, Views
from innerloop.registry import hookimpl


class HalfSquaredError(InnerLoss):
    """Shared by the built-in losses: ``1/2 ||prediction - target||^2`` with its closed-form gradient."""

    def token_loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 0.5 * (prediction - target).pow(2).sum(dim=-1)

    def token_loss_grad(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return prediction - target


class Reconstruction(HalfSquaredError):
    """Token t trains the inner model to map its key view to its value view."""

    name = "reconstruction"

    def pairs(self, views: Views, carry: Mapping[str, torch.Tensor]) -> LossPairs:
        return LossPairs(inputs=views.key, targets=views.value, valid=None, carry={})


@hookimpl
def register_inner_losses(register) -> None:
    register(Reconstruction())
