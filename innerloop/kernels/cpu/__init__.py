"""Compiled CPU kernels: the dual form of TTT-Linear and TTT-MLP for inference on the CPU.

Importing this package compiles nothing; the C++ library is built on first use and cached (see
:mod:`innerloop.kernels.cpu.build`). :func:`kernel_spec` makes the registration for a stack model;
:mod:`innerloop.plugins.kernels` registers one per built-in stack model, through the
``register_kernels`` hook like any plugin's.
"""

from innerloop.kernels.cpu.buffers import release_buffers
from innerloop.kernels.cpu.stack import kernel_spec

__all__ = ["kernel_spec", "release_buffers"]
