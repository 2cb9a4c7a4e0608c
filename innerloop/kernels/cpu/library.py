"""Calling the compiled library: its dtype codes, its status codes, and one function that calls an
entry point with its argument struct (a ``ctypes.Structure`` mirroring the C one)."""

from __future__ import annotations

import ctypes

import torch

from innerloop.kernels.cpu.build import load_library

DTYPE_CODES = {torch.float32: 0, torch.float64: 1}
ACTIVATION_CODES = {0: "identity", 1: "gelu_tanh"}  # enum Activation in ttt_stack.cpp
MAX_LAYERS = 8  # kMaxLayers in ttt_stack.cpp
ERRORS = {1: "unsupported dtype", 2: "invalid sizes", 3: "a C++ exception (out of memory?)"}


def run_entry_point(entry_point: str, args: ctypes.Structure) -> None:
    """Call one of the library's entry points with its argument struct; a nonzero status raises."""
    function = getattr(load_library(), entry_point)  # built on first use
    if function.argtypes is None:  # declared once, from the struct it takes
        function.argtypes, function.restype = [ctypes.POINTER(type(args))], ctypes.c_int
    status = function(ctypes.byref(args))
    if status != 0:
        raise RuntimeError(
            f"the CPU TTT kernel ({entry_point}) failed: {ERRORS.get(status, f'status {status}')}"
        )


__all__ = ["ACTIVATION_CODES", "DTYPE_CODES", "ERRORS", "MAX_LAYERS", "run_entry_point"]
