"""``next_token``: token t trains the inner model to map the previous key ``XK_{t-1}`` to ``XV_t``.

Causal: the pair of token t uses only tokens t-1 and t. The first token of a sequence has no
previous key, so its pair is invalid (zero learning rate). The last key of a chunk is carried to
the next chunk, so any split of a sequence gives the same pairs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

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
        key = views.key
        previous_key = carry["previous_key"].to(key.dtype)
        inputs = torch.cat([previous_key, key[:, :, :-1]], dim=2)  # [B, H, T, f]
        valid = torch.ones(key.shape[2], dtype=key.dtype, device=key.device)
        valid[0] = carry["has_previous"]
        # a copy: a view would keep the whole projection buffer of this call alive inside the state
        new_carry = {"previous_key": key[:, :, -1:].clone(), "has_previous": key.new_ones(())}
        return LossPairs(inputs=inputs, targets=views.value, valid=valid, carry=new_carry)

    def batched_carry_keys(self, num_heads: int, head_dim: int, like: torch.Tensor) -> frozenset[str]:
        """``previous_key`` is per sequence; ``has_previous`` (0-d) is shared by the batch."""
        return frozenset({"previous_key"})


@hookimpl
def register_inner_losses(register: Callable[[Any], Any]) -> None:
    register(NextToken())
