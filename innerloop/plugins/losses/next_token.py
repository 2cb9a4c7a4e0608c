"""``next_token``: token t trains the inner model to map the previous key ``XK_{t-1}`` to ``XV_t``.

Causal: the pair of token t uses only tokens t-1 and t. The first token of a sequence has no
previous key, so its pair is invalid (zero learning rate). The last key of a chunk is carried to
the next chunk, so any split of a sequence gives the same pairs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from innerloop.core.arguments import check_tensor
from innerloop.core.protocol import LossPairs, Views
from innerloop.plugins.losses.reconstruction import HalfSquaredError
from innerloop.registry import hookimpl


class NextToken(HalfSquaredError):
    """Predict the next token's value view from the current key view."""

    name = "next_token"

    def init_carry(self, batch_size: int, num_heads: int, head_dim: int, like: torch.Tensor) -> dict:
        # previous_key [B, H, 1, f]; has_previous [] (0. at sequence start, 1. afterwards)
        return {
            "previous_key": like.new_zeros(batch_size, num_heads, 1, head_dim),
            "has_previous": like.new_zeros(()),
        }

    def pairs(self, views: Views, carry: Mapping[str, torch.Tensor]) -> LossPairs:
        """``(XK_{t-1}, XV_t)`` for every token, the first one's key from ``carry`` (checked first)."""
        self._check_arguments(views, carry)
        key = views.key
        previous_key = carry["previous_key"].to(key.dtype)
        inputs = torch.cat([previous_key, key[:, :, :-1]], dim=2)  # [B, H, T, f]
        valid = torch.ones(key.shape[2], dtype=key.dtype, device=key.device)
        valid[0] = carry["has_previous"]
        # a copy: a view would keep the whole projection buffer of this call alive inside the state
        new_carry = {"previous_key": key[:, :, -1:].clone(), "has_previous": key.new_ones(())}
        return LossPairs(inputs=inputs, targets=views.value, valid=valid, carry=new_carry)

    def _check_arguments(self, views: Views, carry: Mapping[str, torch.Tensor]) -> None:
        """:meth:`~InnerLoss.check_pairs_arguments`, ``T >= 1`` and a carry of :meth:`init_carry`'s form
        for these views: ``previous_key [B, H, 1, f]`` on the views' device, ``has_previous []``."""
        self.check_pairs_arguments(views, carry)
        where = f"inner loss {self.name!r}: pairs"
        batch, heads, tokens, head_dim = views.key.shape
        if tokens < 1:
            raise ValueError(f"{where}: views must hold at least one token, got T = 0")
        missing = sorted({"previous_key", "has_previous"} - set(carry))
        if missing:
            raise ValueError(f"{where}: carry is missing {missing} (start a sequence with init_carry)")
        what = f"[B, H, 1, f] (the views' B, H, f; init_carry({batch}, {heads}, {head_dim}, ...))"
        previous = carry["previous_key"]
        check_tensor(where, "carry['previous_key']", previous, (batch, heads, 1, head_dim), what, None)
        check_tensor(where, "carry['has_previous']", carry["has_previous"], (), "[] (0-d)", None)
        for name in ("previous_key", "has_previous"):
            if carry[name].device != views.key.device:
                raise ValueError(
                    f"{where}: carry[{name!r}] must be on views.key's device {views.key.device}, "
                    f"got {carry[name].device}"
                )

    def batched_carry_keys(self, num_heads: int, head_dim: int, like: torch.Tensor) -> frozenset[str]:
        """``previous_key`` is per sequence; ``has_previous`` (0-d) is shared by the batch."""
        return frozenset({"previous_key"})


@hookimpl
def register_inner_losses(register: Callable[[Any], Any]) -> None:
    register(NextToken())
