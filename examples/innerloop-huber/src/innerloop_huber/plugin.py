"""The ``huber`` inner loss: the paper's reconstruction task scored with a Huber loss.

Token t trains the inner model to map its key view to its value view, as ``reconstruction`` does,
but the loss of each coordinate is quadratic only up to ``delta`` and linear beyond, so a token whose
value is far from what the inner model predicts moves the fast weights by a bounded step:

    loss(p, y) = sum_i  1/2 (p_i - y_i)^2                 if |p_i - y_i| <= delta
                        delta (|p_i - y_i| - delta / 2)     otherwise
    d loss / d p = clamp(p - y, -delta, delta)

With a large ``delta`` it is the built-in ``reconstruction`` loss.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import torch

from innerloop.core.protocol import InnerLoss, LossPairs, Views
from innerloop.registry import hookimpl


class HuberReconstruction(InnerLoss):
    """Reconstruct the value view from the key view under a Huber loss with threshold ``delta``."""

    name = "huber"

    def __init__(self, delta: float = 1.0):
        # a real number (not a bool, a str or a tensor), finite and > 0: with delta = inf or nan the
        # unselected branch of torch.where is inf * -inf, and its NaN reaches the gradients
        if not isinstance(delta, numbers.Real) or isinstance(delta, bool):
            raise TypeError(
                f"HuberReconstruction: delta must be a real number; got {type(delta).__name__} {delta!r}"
            )
        if not (math.isfinite(delta) and delta > 0):
            raise ValueError(f"HuberReconstruction: delta must be finite and > 0; got {delta!r}")
        self.delta = float(delta)

    def pairs(self, views: Views, carry: Mapping[str, torch.Tensor]) -> LossPairs:
        return LossPairs(inputs=views.key, targets=views.value, valid=None, carry={})

    def token_loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        error = (prediction - target).abs()
        quadratic = 0.5 * error.pow(2)
        linear = self.delta * (error - 0.5 * self.delta)
        return torch.where(error <= self.delta, quadratic, linear).sum(dim=-1)

    def token_loss_grad(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (prediction - target).clamp(-self.delta, self.delta)


@hookimpl
def register_inner_losses(register) -> None:
    register(HuberReconstruction())
