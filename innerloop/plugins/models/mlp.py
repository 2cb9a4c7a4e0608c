"""``mlp``: the inner model of TTT-MLP, ``g(x) = gelu_tanh(x @ W1 + b1) @ W2 + b2`` with hidden 4f."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from innerloop.core.protocol import GELU_TANH, AffineLayer, Params, StackModel
from innerloop.registry import hookimpl


class MLPModel(StackModel):
    """Two affine maps with tanh-GELU between them; hidden width ``expansion * f`` (4 in the paper)."""

    name = "mlp"
    init_std = 0.02
    expansion = 4

    @property
    def stack(self) -> tuple[AffineLayer, ...]:
        return (AffineLayer("W1", "b1", GELU_TANH), AffineLayer("W2", "b2", None))

    def param_shapes(self, head_dim: int) -> dict[str, tuple[int, ...]]:
        hidden = self.expansion * head_dim
        return {"W1": (head_dim, hidden), "b1": (1, hidden), "W2": (hidden, head_dim), "b2": (1, head_dim)}

    def init_params(self, num_heads: int, head_dim: int, generator: torch.Generator | None = None) -> Params:
        hidden = self.expansion * head_dim
        return {
            "W1": torch.randn(num_heads, head_dim, hidden, generator=generator) * self.init_std,
            "b1": torch.zeros(num_heads, 1, hidden),
            "W2": torch.randn(num_heads, hidden, head_dim, generator=generator) * self.init_std,
            "b2": torch.zeros(num_heads, 1, head_dim),
        }


@hookimpl
def register_inner_models(register: Callable[[Any], Any]) -> None:
    register(MLPModel())
