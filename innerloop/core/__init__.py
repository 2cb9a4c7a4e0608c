"""The protocol and the generic TTT layer. Imports no concrete plugin."""

from innerloop.core.layer import ModelTooLargeError, NonFiniteRowsError, TTTLayer
from innerloop.core.protocol import (
    GELU_TANH,
    Activation,
    AffineLayer,
    HalfSquaredError,
    InnerLoss,
    InnerModel,
    InnerTask,
    LossPairs,
    StackModel,
    UpdateRule,
    Views,
)
from innerloop.core.state import StateSignature, TTTState

__all__ = [
    "GELU_TANH",
    "Activation",
    "AffineLayer",
    "HalfSquaredError",
    "InnerLoss",
    "InnerModel",
    "InnerTask",
    "LossPairs",
    "ModelTooLargeError",
    "NonFiniteRowsError",
    "StackModel",
    "StateSignature",
    "TTTLayer",
    "TTTState",
    "UpdateRule",
    "Views",
]
