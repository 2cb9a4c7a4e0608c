"""``matrix``: a bias-free linear map per head, ``g(x) = x @ W`` (the state of linear attention and
DeltaNet: FLA's ``S [d_k, d_v]`` with ``o = q S`` is ``W`` as is)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from innerloop.core.protocol import AffineLayer, Params, StackModel
from innerloop.registry import hookimpl


class MatrixModel(StackModel):
    """``W [f, f]``, initialised to zero (linear attention's and DeltaNet's empty memory)."""

    name = "matrix"

    @property
    def stack(self) -> tuple[AffineLayer, ...]:
        return (AffineLayer("W", None, None),)

    def param_shapes(self, head_dim: int) -> dict[str, tuple[int, ...]]:
        return {"W": (head_dim, head_dim)}

    def init_params(self, num_heads: int, head_dim: int, generator: torch.Generator | None = None) -> Params:
        return {"W": torch.zeros(num_heads, head_dim, head_dim)}


@hookimpl
def register_inner_models(register: Callable[[Any], Any]) -> None:
    register(MatrixModel())
