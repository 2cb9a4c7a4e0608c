"""Built-in fast paths, registered through the ``register_kernels`` hook like any plugin's.

- ``fused_torch_linear`` / ``fused_torch_mlp``: the pure-torch fused dual form (any device).
- ``cpu_ttt_linear`` / ``cpu_ttt_mlp``: compiled C++ for CPU inference (built on first use).
- ``triton_ttt_linear`` / ``triton_ttt_mlp``: Triton kernels (CUDA, or CPU under
  ``TRITON_INTERPRET=1``). Triton is an optional extra (``pip install 'innerloop[triton]'``); the
  kernels are registered without it too (registering them does not import triton), and their
  ``verify`` then refuses every input saying that triton is not installed and how to install it.
"""

from __future__ import annotations

from innerloop.kernels.fused_torch import kernel_spec
from innerloop.plugins.models.linear import LinearModel
from innerloop.plugins.models.mlp import MLPModel
from innerloop.registry import hookimpl


@hookimpl
def register_kernels(register) -> None:
    register(kernel_spec("linear", LinearModel().stack))
    register(kernel_spec("mlp", MLPModel().stack))
    from innerloop.kernels.cpu import KERNELS as CPU_KERNELS

    for spec in CPU_KERNELS:
        register(spec)
    from innerloop.kernels.triton import KERNELS as TRITON_KERNELS

    for spec in TRITON_KERNELS:
        register(spec)
