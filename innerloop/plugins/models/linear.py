"""``linear``: the inner model of TTT-Linear, ``g(x) = x @ W1 + b1``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from innerloop.core.protocol import AffineLayer, Params, StackModel
from innerloop.registry import hookimpl


class LinearModel(StackModel):
    """One affine map per head: ``W1 [f, f]`` ~ normal(0, 0.02), ``b1 [1, f]`` = 0 (the paper's init)."""

    name = "linear"
    init_std = 0.02

    @property
    def stack(self) -> tuple[AffineLayer, ...]:
        return (AffineLayer("W1", "b1", None),)

    def param_shapes(self, head_dim: int) -> dict[str, tuple[int, ...]]:
        return {"W1": (head_dim, head_dim), "b1": (1, head_dim)}

    def init_params(self, num_heads: int, head_dim: int, generator: torch.Generator | None = None) -> Params:
        return {
            "W1": torch.randn(num_heads, head_dim, head_dim, generator=generator) * self.init_std,
            "b1": torch.zeros(num_heads, 1, head_dim),
        }


@hookimpl
def register_inner_models(register: Callable[[Any], Any]) -> None:
    register(LinearModel())
