"""Calling the compiled library: its dtype codes, its status codes, and one function that calls an
entry point with its argument struct (a ``ctypes.Structure`` mirroring the C one)."""

from __future__ import annotations

import ctypes

import torch

from innerloop.kernels.cpu.build import library_in_use

DTYPE_CODES = {torch.float32: 0, torch.float64: 1}
ACTIVATION_CODES = {0: "identity", 1: "gelu_tanh"}  # enum Activation in ttt_stack.cpp
MAX_LAYERS = 8  # kMaxLayers in ttt_stack.cpp
ERRORS = {1: "unsupported dtype", 2: "invalid sizes", 3: "a C++ exception (out of memory?)"}


def scan_sizes(both: torch.Tensor, shift: torch.Tensor) -> tuple[int, int, int, int, int]:
    """``(NB, P, K, in, f)`` of a training scan's ``both [NB, P, 2K, in]`` and ``shift [NB, P, K, f]``."""
    if both.dim() != 4 or shift.dim() != 4 or both.shape[2] % 2:
        raise ValueError(
            f"both {tuple(both.shape)} must be [NB, BH, 2K, in] and shift {tuple(shift.shape)} [NB, BH, K, f]"
        )
    num_mb, pairs, two_k, inputs = both.shape
    return num_mb, pairs, two_k // 2, inputs, shift.shape[-1]


def scan_input_problems(
    both: torch.Tensor, expected: dict[str, tuple[torch.Tensor, tuple | None]], first: str = "both"
) -> list[str]:
    """What is wrong with a training scan's inputs, which the kernel trusts for its pointer arithmetic:
    each named tensor's shape (None: not checked here), dtype (that of ``both``, named ``first`` in the
    messages) and device (the CPU)."""
    problems = [
        f"{name} {tuple(t.shape)} != {shape}"
        for name, (t, shape) in expected.items()
        if shape is not None and tuple(t.shape) != shape
    ]
    problems += [
        f"{name} is {t.dtype}, {first} is {both.dtype}"
        for name, (t, _) in expected.items()
        if t.dtype != both.dtype
    ]
    if both.dtype not in DTYPE_CODES:
        problems.append(f"dtype {both.dtype} is not float32 or float64")
    tensors = {first: both, **{name: t for name, (t, _) in expected.items()}}
    problems += [
        f"{name} is on {t.device}, the kernel runs on the CPU"
        for name, t in tensors.items()
        if t.device.type != "cpu"
    ]
    return problems


def rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dim is contiguous (the kernels read every other dim through its
    stride), else a copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def run_entry_point(entry_point: str, args: ctypes.Structure) -> None:
    """Call one of the library's entry points with its argument struct; a nonzero status raises. Under
    ``torch.profiler`` the call is an event named after the entry point (e.g. ``innerloop_stack_scan_forward``),
    so that a profile tells the kernels' time apart from the torch ops around them."""
    # verify chose the kernel (INNERLOOP_DISABLE_CPU_KERNELS is read there); a backward finishes on it
    function = getattr(library_in_use(), entry_point)  # built on first use
    if function.argtypes is None:  # declared once, from the struct it takes
        function.argtypes, function.restype = [ctypes.POINTER(type(args))], ctypes.c_int
    if torch._C._autograd._profiler_enabled():  # a profiler's trace names the entry point (5 us when on)
        with torch.profiler.record_function(entry_point):
            status = function(ctypes.byref(args))
    else:
        status = function(ctypes.byref(args))
    if status != 0:
        raise RuntimeError(
            f"the CPU TTT kernel ({entry_point}) failed: {ERRORS.get(status, f'status {status}')}"
        )


__all__ = [
    "ACTIVATION_CODES",
    "DTYPE_CODES",
    "ERRORS",
    "MAX_LAYERS",
    "rows_contiguous",
    "run_entry_point",
    "scan_input_problems",
    "scan_sizes",
]
