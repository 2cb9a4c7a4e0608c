"""Built-in fast paths, registered through the ``register_kernels`` hook like any plugin's.

- ``fused_torch_linear`` / ``fused_torch_mlp``: the pure-torch fused dual form (any device).
- ``compiled_torch_linear`` / ``compiled_torch_mlp``: the same with each mini-batch's training step
  compiled by ``torch.compile`` (opt-in by name: its first call per shape compiles for ~30 s).
- ``cpu_ttt_linear`` / ``cpu_ttt_mlp``: compiled C++ for CPU inference and training (built on first use).
- ``delta_chunk``: the delta rule (the ``matrix`` model under ``dual_form`` at K = 1, no inner norm or
  residual, with or without decay: DeltaNet, Gated DeltaNet) in chunks, pure torch, any device.
- ``triton_ttt_linear`` / ``triton_ttt_mlp``: Triton kernels (CUDA, or CPU under
  ``TRITON_INTERPRET=1``). Triton is an optional extra (``pip install 'innerloop[triton]'``); the
  kernels are registered without it too (registering them does not import triton), and their
  ``verify`` then refuses every input saying that triton is not installed and how to install it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from innerloop.kernels import cpu, delta_chunk, fused_torch, triton
from innerloop.kernels.spec import KernelSpec
from innerloop.plugins.models.linear import LinearModel
from innerloop.plugins.models.mlp import MLPModel
from innerloop.registry import hookimpl


def builtin_kernel_specs() -> list[KernelSpec]:
    """Every built-in kernel registration, made here and nowhere else: the fused torch (plain and
    compiled) and CPU paths for each built-in stack model (from its declared stack), the chunked delta rule, then the Triton
    kernels."""
    stack_models = (LinearModel(), MLPModel())
    return [
        *(fused_torch.kernel_spec(model.name, model.stack) for model in stack_models),
        *(fused_torch.compiled_kernel_spec(model.name, model.stack) for model in stack_models),
        *(cpu.kernel_spec(model.name, model.stack) for model in stack_models),
        delta_chunk.kernel_spec(),
        *triton.KERNELS,
    ]


@hookimpl
def register_kernels(register: Callable[[Any], Any]) -> None:
    for spec in builtin_kernel_specs():
        register(spec)
