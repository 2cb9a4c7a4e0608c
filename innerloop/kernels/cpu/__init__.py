"""Compiled CPU kernels: the dual form of TTT-Linear and TTT-MLP for inference on the CPU.

Importing this package compiles nothing; the C++ library is built on first use and cached (see
:mod:`innerloop.kernels.cpu.build`). ``KERNELS`` lists the registrations, made through the
``register_kernels`` hook like any plugin's.
"""

from innerloop.kernels.cpu.stack import kernel_spec
from innerloop.plugins.models.linear import LinearModel
from innerloop.plugins.models.mlp import MLPModel

KERNELS = (kernel_spec("linear", LinearModel().stack), kernel_spec("mlp", MLPModel().stack))

__all__ = ["KERNELS", "kernel_spec"]
