"""Triton TTT-Linear: fused dual-form chunk forward + backward, and one-token decode.

``forward`` / ``decode`` follow the contract of :mod:`innerloop.kernels.spec`; ``naive`` is the
pure-torch reference they are tested against. See README.md in this folder for the math.
"""

from __future__ import annotations

from ..common import triton_kernel_spec
from . import fused, naive
from .fused import MAX_HEAD_DIM, decode, forward

KERNEL = triton_kernel_spec("linear", "TTT-Linear", fused)
verify = KERNEL.verify

__all__ = ["KERNEL", "MAX_HEAD_DIM", "decode", "forward", "naive", "verify"]
