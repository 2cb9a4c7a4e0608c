"""A tiny TTT language model, the one the precision and compile tests compare against eager float32."""

from __future__ import annotations

import torch

from innerloop.models import build_model
from innerloop.models.config import ModelConfig, TTTConfig


def tiny_ttt_lm(inner_model: str, backbone: str = "transformer") -> torch.nn.Module:
    """Two blocks of width 32, 2 heads, mini-batch 4; the paper's base lr (1 linear, 0.1 MLP)."""
    config = ModelConfig(
        backbone=backbone,
        hidden_size=32,
        num_heads=2,
        intermediate_size=64,
        num_layers=2,
        ttt=TTTConfig(
            inner_model=inner_model, mini_batch_size=4, base_lr=1.0 if inner_model == "linear" else 0.1
        ),
    )
    return build_model(config)
