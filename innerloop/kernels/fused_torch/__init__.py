"""The fused pure-torch dual form: whole mini-batches of stack models, on any device, with autograd.

What the training path runs on a CPU (and wherever no other kernel verifies). :func:`kernel_spec` makes
the registration for a stack model (:func:`compiled_kernel_spec`, that of the opt-in path whose training
step ``torch.compile`` compiles, ``compiled.py``); :mod:`innerloop.plugins.kernels` registers them for
each built-in stack model, through the ``register_kernels`` hook like any plugin's. README.md in this folder says what the
path moves out of the scan; the reference it must equal is :mod:`innerloop.kernels.reference`.
"""

from innerloop.kernels.fused_torch.compiled import kernel_spec as compiled_kernel_spec
from innerloop.kernels.fused_torch.forward import (
    DOUBLE_BACKWARD_MESSAGE,
    TrainingEnds,
    TrainingScan,
    kernel_spec,
    make_fused_forward,
    verify,
)

__all__ = [
    "DOUBLE_BACKWARD_MESSAGE",
    "TrainingEnds",
    "TrainingScan",
    "compiled_kernel_spec",
    "kernel_spec",
    "make_fused_forward",
    "verify",
]
