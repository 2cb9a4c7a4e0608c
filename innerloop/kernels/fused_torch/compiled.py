"""``compiled_torch_<model>``: the fused torch path with its per-mini-batch training step compiled.

The fused path's scan is a Python loop over mini-batches; for TTT-MLP each mini-batch is some 80
small torch operations forward and twice that backward, so training spends most of its time in
per-operation overhead. Here the step of one mini-batch (:meth:`_Scan.mini_batch`) goes through
``torch.compile`` (inductor by default), which fuses it, forward and backward, into a few kernels;
the loop stays in Python, so the compiled graph is one mini-batch long whatever the sequence length.

It is opt-in (``TTTLayer(kernel="compiled_torch_mlp")``, priority 0, below ``fused_torch_*``'s 1, whose limits
:func:`verify` shares: ``kernel="auto"`` reaches it only for blocks where ``fused_torch_*`` failed its first-use
check),
because the first call for each new shape compiles for about half a minute on 2 CPU cores (inductor
caches the result on disk for later processes). It is registered ``training_only``: a layer that names
it trains on it, and its blocks without an autograd graph (inference, prefill, decoding) go where
``kernel="auto"`` sends them; called directly without a graph, it runs the fused path's in-place scan
uncompiled. Numbers equal the fused path's to float rounding: compiled code fuses and reorders
floating-point operations.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import shutil
import sys
from collections.abc import Iterator
from typing import Any

import torch

from innerloop.core.protocol import AffineLayer
from innerloop.kernels.fused_torch.forward import _Scan, make_fused_forward, refusing_identity
from innerloop.kernels.fused_torch.forward import verify as fused_verify
from innerloop.kernels.spec import KernelInputs, KernelSpec, stack_kernel_spec

BACKEND = "inductor"
"""``torch.compile``'s backend for the step; the tests use ``"aot_eager"`` (the same graph capture and
autograd, without inductor's code generation)."""

_compiled: dict[Any, Any] = {}  # backend -> the compiled step, made on first use


@contextlib.contextmanager
def compile_backend(backend: Any) -> Iterator[None]:
    """Compile the step with ``backend`` (a name or a ``torch.compile`` backend) inside the block."""
    global BACKEND
    previous, BACKEND = BACKEND, backend
    try:
        yield
    finally:
        BACKEND = previous


def retained_graph_message(kernel_name: str) -> str:
    """The error of a second backward through a graph the compiled step recorded."""
    return (
        f"kernel {kernel_name!r} runs its backward once only: torch.compile's AOTAutograd frees the "
        "compiled step's saved tensors after one use (donated buffers), so backward(retain_graph=True), "
        "a second autograd.grad through the same forward or gradcheck cannot run through it; use "
        "kernel='auto' (or a fused_torch_* kernel) for that"
    )


def _keeps_its_graph() -> bool:
    """Whether the backward running now keeps its graph (``retain_graph=True``) without building one
    (``create_graph=True`` also keeps it: the fused path's own guard names that case); False where
    torch does not say."""
    keeps = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return keeps is not None and bool(keeps()) and not torch.is_grad_enabled()


def _backward_once(t: torch.Tensor, message: str) -> torch.Tensor:
    """``t``, whose backward refuses a retained graph with ``message``, before torch's own error
    ("compiled with non-empty donated buffers ...") would come."""
    return refusing_identity(t, message, _keeps_its_graph)


def compiled_mini_batch(
    scan: _Scan, *tensors: torch.Tensor, kernel_name: str = "compiled_torch"
) -> torch.Tensor:
    """:meth:`_Scan.mini_batch`, compiled with :data:`BACKEND` (once per process and backend; dynamo
    recompiles it for new shapes, dtypes and stacks up to its recompile limit, past which the step runs
    eagerly: the fused path's numbers, at its speed). Not ``fullgraph=True``: that turns the limit into
    an error; the tests check instead that the step compiles without a graph break.

    Its outputs (the pre-LN outputs and the moved weights) refuse a backward that keeps the graph, with
    :func:`retained_graph_message` naming ``kernel_name``."""
    step = _compiled.get(BACKEND)
    if step is None:
        step = _compiled[BACKEND] = torch.compile(_Scan.mini_batch, backend=BACKEND)
    message = retained_graph_message(kernel_name)
    z = step(scan, *tensors)
    scan.weights = [_backward_once(w, message) for w in scan.weights]
    return _backward_once(z, message)


def verify(inputs: KernelInputs) -> str | None:
    """The fused path's limits, and what ``torch.compile`` needs on the inputs' device."""
    reason = fused_verify(inputs)
    if reason is not None:
        return reason
    if BACKEND == "inductor":
        compiler = os.environ.get("CXX", "clang++" if sys.platform == "darwin" else "g++")  # inductor's
        if inputs.device.type == "cpu" and shutil.which(compiler) is None:
            return f"torch.compile's inductor backend needs a C++ compiler on CPU: {compiler!r} (CXX) is not on PATH"
        if inputs.device.type == "cuda" and importlib.util.find_spec("triton") is None:
            return "torch.compile's inductor backend needs triton on CUDA; it is not installed"
    return None


def kernel_spec(model_name: str, stack: tuple[AffineLayer, ...]) -> KernelSpec:
    """The registration of the compiled-step path for one stack model with the reconstruction loss."""
    return stack_kernel_spec(
        "compiled_torch",
        model_name,
        forward=make_fused_forward(
            stack,
            training_step=functools.partial(compiled_mini_batch, kernel_name=f"compiled_torch_{model_name}"),
            kernel_name=f"compiled_torch_{model_name}",
        ),
        verify=verify,
        priority=0,
        training_only=True,
        description="the fused torch dual form with each mini-batch's training step compiled by "
        "torch.compile (opt-in: the first call per shape compiles for ~30 s; training only)",
    )


__all__ = [
    "BACKEND",
    "compile_backend",
    "compiled_mini_batch",
    "kernel_spec",
    "retained_graph_message",
    "verify",
]
