"""``reconstruction``: the paper's inner task, ``f(XK_t)`` should reconstruct ``XV_t``.

With the layer's residual and LayerNorm, ``f(x) = x + LN(g(x))``, so the per-token loss
``1/2 ||f(XK_t) - XV_t||^2`` is the reference's ``1/2 ||LN(g(XK_t)) - (XV_t - XK_t)||^2``.
(:class:`~innerloop.core.protocol.HalfSquaredError`, the base of the built-in losses, lives in the
public API, ``innerloop.HalfSquaredError``; it is still importable from here.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from innerloop.core.protocol import HalfSquaredError, LossPairs, Views
from innerloop.registry import hookimpl


class Reconstruction(HalfSquaredError):
    """Token t trains the inner model to map its key view to its value view."""

    name = "reconstruction"

    def pairs(self, views: Views, carry: Mapping[str, torch.Tensor]) -> LossPairs:
        """``(XK_t, XV_t)`` for every token (after :meth:`~InnerLoss.check_pairs_arguments`)."""
        self.check_pairs_arguments(views, carry)
        return LossPairs(inputs=views.key, targets=views.value, valid=None, carry={})


@hookimpl
def register_inner_losses(register: Callable[[Any], Any]) -> None:
    register(Reconstruction())
