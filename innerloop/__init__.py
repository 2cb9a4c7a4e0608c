"""innerloop: test-time-training (TTT) sequence layers for PyTorch.

>>> import torch, innerloop
>>> layer = innerloop.TTTLayer(hidden_size=64, num_heads=4)
>>> y, state = layer(torch.randn(2, 40, 64))
"""

from innerloop.core import (
    InnerLoss,
    InnerModel,
    InnerTask,
    StackModel,
    TTTLayer,
    TTTState,
    UpdateRule,
    Views,
)
from innerloop.registry import PluginError, available, get_registry, hookimpl, register

# The package version, written only here: pyproject.toml reads it (`[tool.setuptools.dynamic]`).
__version__ = "0.1.0"

__all__ = [
    "InnerLoss",
    "InnerModel",
    "InnerTask",
    "PluginError",
    "StackModel",
    "TTTLayer",
    "TTTState",
    "UpdateRule",
    "Views",
    "available",
    "get_registry",
    "hookimpl",
    "register",
]
