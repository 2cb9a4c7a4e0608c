"""``dot_product``: linear attention's inner loss, ``l_t(P) = -<f(k_t; P), v_t>``.

The "linear" regression loss of test-time regression (docs/family.md): its gradient ``-k_t^T v_t``
does not depend on the weights, so with the ``matrix`` model and ``lr = 1`` any mini-batch size gives
``W_t = W_0 + sum_{s<=t} k_s^T v_s``, linear attention's state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from innerloop.core.protocol import InnerLoss, LossPairs, Views
from innerloop.registry import hookimpl


class DotProduct(InnerLoss):
    """``l_t(P) = -<f(k_t; P), v_t>``: linear attention's inner loss (the "linear" regression loss of
    test-time regression). Its gradient ``-k_t^T v_t`` does not depend on the weights, so with the
    matrix model and ``lr = 1`` any mini-batch size gives ``W_t = W_0 + sum_{s<=t} k_s^T v_s``."""

    name = "dot_product"

    def pairs(self, views: Views, carry: Mapping[str, torch.Tensor]) -> LossPairs:
        """``(k_t, v_t)`` for every token (after :meth:`~InnerLoss.check_pairs_arguments`)."""
        self.check_pairs_arguments(views, carry)
        return LossPairs(inputs=views.key, targets=views.value, valid=None, carry={})

    def token_loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``-<prediction, target>`` of each token, after :meth:`~InnerLoss.check_token_loss_arguments`."""
        self.check_token_loss_arguments(prediction, target)
        return -(prediction * target).sum(dim=-1)

    def token_loss_grad(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``-target``, after :meth:`~InnerLoss.check_token_loss_arguments`."""
        self.check_token_loss_arguments(prediction, target, "token_loss_grad")
        return -target.expand_as(prediction)


@hookimpl
def register_inner_losses(register: Callable[[Any], Any]) -> None:
    register(DotProduct())
