"""innerloop: test-time-training (TTT) sequence layers for PyTorch.

>>> import torch, innerloop
>>> layer = innerloop.TTTLayer(hidden_size=64, num_heads=4)
>>> y, state = layer(torch.randn(2, 40, 64))
"""

from innerloop import ops
from innerloop.core import (
    GELU_TANH,
    Activation,
    AffineLayer,
    HalfSquaredError,
    InnerLoss,
    InnerModel,
    InnerTask,
    LossPairs,
    StackModel,
    TTTLayer,
    TTTState,
    UpdateRule,
    Views,
)
from innerloop.core.model_inner import ModelInnerLoss, ModelUpdateRule
from innerloop.registry import (
    PluginError,
    PluginLoadWarning,
    PluginWarning,
    available,
    get_registry,
    hookimpl,
    register,
    register_inner_loss,
    register_inner_model,
    register_kernel,
    register_model_inner_loss,
    register_model_update_rule,
    register_update_rule,
)

# The package version, written only here: pyproject.toml reads it (`[tool.setuptools.dynamic]`).
__version__ = "0.1.0"

__all__ = [
    "GELU_TANH",
    "Activation",
    "AffineLayer",
    "HalfSquaredError",
    "InnerLoss",
    "InnerModel",
    "InnerTask",
    "LossPairs",
    "ModelInnerLoss",
    "ModelUpdateRule",
    "PluginError",
    "PluginLoadWarning",
    "PluginWarning",
    "StackModel",
    "TTTLayer",
    "TTTState",
    "UpdateRule",
    "Views",
    "available",
    "get_registry",
    "hookimpl",
    "ops",
    "register",
    "register_inner_loss",
    "register_inner_model",
    "register_kernel",
    "register_model_inner_loss",
    "register_model_update_rule",
    "register_update_rule",
]

# Hugging Face: register InnerloopConfig / InnerloopForCausalLM with transformers' Auto classes when
# (and only when) those are loaded; this import does not import transformers (innerloop/hf/hook.py).
from innerloop.hf import hook as _hf_hook  # noqa: E402

_hf_hook.install()
