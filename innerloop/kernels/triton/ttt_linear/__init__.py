"""Triton TTT-Linear: fused dual-form chunk forward + backward, and one-token decode.

``forward`` / ``decode`` follow the contract of :mod:`innerloop.kernels.spec`; ``naive`` is the
pure-torch reference they are tested against. See README.md in this folder for the math.
"""

from __future__ import annotations

from ...spec import KernelInputs, KernelSpec
from ..common import verify_common
from . import naive
from .fused import decode, forward, kernels_mode_mismatch

MAX_HEAD_DIM = 128


def verify(inputs: KernelInputs) -> str | None:
    """``None`` when the Triton TTT-Linear kernel can run on ``inputs``, else the reason it cannot."""
    reason = verify_common(inputs, MAX_HEAD_DIM, "triton_ttt_linear")
    if reason is None:
        reason = kernels_mode_mismatch(inputs.device)
    return reason


KERNEL = KernelSpec(
    name="triton_ttt_linear",
    inner_model="linear",
    inner_loss="reconstruction",
    update_rule="dual_form",
    forward=forward,
    verify=verify,
    decode=decode,
    priority=10,
    description="Fused Triton dual form for TTT-Linear: weights on chip, checkpointed recompute backward.",
)

__all__ = ["KERNEL", "decode", "forward", "naive", "verify"]
