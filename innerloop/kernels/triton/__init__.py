"""Triton fast paths for TTT-Linear and TTT-MLP (dual form, reconstruction loss).

Importing this package does not import Triton; the kernels are built on first use. ``KERNELS`` lists
the :class:`~innerloop.kernels.spec.KernelSpec` objects for registration.
"""

from .ttt_linear import KERNEL as TTT_LINEAR_KERNEL
from .ttt_mlp import KERNEL as TTT_MLP_KERNEL

KERNELS = (TTT_LINEAR_KERNEL, TTT_MLP_KERNEL)

__all__ = ["KERNELS", "TTT_LINEAR_KERNEL", "TTT_MLP_KERNEL"]
