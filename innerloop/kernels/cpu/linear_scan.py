"""Training TTT-Linear on the CPU: the compiled scan of a one-layer stack and its backward.

The fused torch path (``kernels/fused_torch``) hoists everything that does not depend on the inner
weights out of the scan; what remains is sequential, one mini-batch at a time, and autograd records and
replays it op by op. Here the scan and its backward are compiled (``innerloop_linear_scan_forward`` and
``innerloop_linear_scan_backward`` in ``ttt_stack.cpp``): the forward keeps the weights at the start of
every mini-batch, the backward walks the mini-batches last to first, recomputes each one's key side from
them and carries the weights' gradient back (README.md in this folder derives it). The hoisting before
and the output LayerNorm after are compiled too (``scan_ends.py``).
"""

from __future__ import annotations

import ctypes

import torch
from torch.autograd.function import FunctionCtx

from innerloop.kernels.cpu.buffers import scan_buffer
from innerloop.kernels.cpu.library import DTYPE_CODES, run_entry_point, scan_input_problems, scan_sizes
from innerloop.kernels.spec import double_backward_message

DOUBLE_BACKWARD_MESSAGE = double_backward_message("the CPU kernel's training scan")


class _LinearScanArgs(ctypes.Structure):
    """Mirror of ``InnerloopLinearScanArgs`` in ttt_stack.cpp (same order, same types)."""

    _fields_ = [
        ("dtype", ctypes.c_int32),
        ("num_threads", ctypes.c_int32),
        ("num_mini_batches", ctypes.c_int64),
        ("pairs", ctypes.c_int64),
        ("mini_batch", ctypes.c_int64),
        ("in_", ctypes.c_int64),
        ("width", ctypes.c_int64),
        ("eps", ctypes.c_double),
        *((name, ctypes.c_void_p) for name in ("both", "left", "shift", "gamma_sq", "weight", "starts", "z")),
        *(
            (name, ctypes.c_void_p)
            for name in ("grad_z", "grad_weight", "grad_both", "grad_left", "grad_shift", "grad_gamma_sq")
        ),
    ]


def _check_inputs(
    both: torch.Tensor, left: torch.Tensor, shift: torch.Tensor, gamma_sq: torch.Tensor, weight: torch.Tensor
) -> None:
    """The kernel trusts these shapes and the dtype for its pointer arithmetic: check them first."""
    num_mb, pairs, k, inputs, f = scan_sizes(both, shift)
    expected = {
        "left": (left, (num_mb, pairs, k + inputs, k)),
        "shift": (shift, (num_mb, pairs, k, f)),
        "gamma_sq": (gamma_sq, (pairs, 1, f)),
        "weight": (weight, (pairs, inputs, f)),
    }
    problems = scan_input_problems(both, expected)
    if problems:
        raise ValueError("the CPU training scan got inputs it cannot take: " + "; ".join(problems))


def _args(eps: float, **pointers: torch.Tensor) -> _LinearScanArgs:
    """The struct for one call: sizes from ``both`` and ``shift``, every tensor's address by its field name."""
    both, shift = pointers["both"], pointers["shift"]
    num_mb, pairs, two_k, inputs = both.shape
    args = _LinearScanArgs()
    args.dtype, args.num_threads = DTYPE_CODES[both.dtype], torch.get_num_threads()
    args.num_mini_batches, args.pairs, args.mini_batch = num_mb, pairs, two_k // 2
    args.in_, args.width, args.eps = inputs, shift.shape[-1], float(eps)
    for name, tensor in pointers.items():
        setattr(args, name, tensor.data_ptr())
    return args


class CompiledLinearScan(torch.autograd.Function):
    """The scan of a one-layer stack, compiled, forward and backward.

    Inputs (``fused_torch.forward._hoist``'s): ``both [NB, BH, 2K, in]`` the keys then the queries (a
    column of ones appended with a bias), ``left [NB, BH, K + in, K]``, ``shift [NB, BH, K, f]``,
    ``gamma_sq [BH, 1, f]``, ``weight [BH, in, f]`` the folded starting weights. Returns ``(z [BH, NB, K,
    f]`` the outputs before the output LayerNorm (pair-major: a view of ``[B, H, T, f]``), ``weight``
    after the last mini-batch).
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        both: torch.Tensor,
        left: torch.Tensor,
        shift: torch.Tensor,
        gamma_sq: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _check_inputs(both, left, shift, gamma_sq, weight)
        both, left, shift, gamma_sq = (t.detach().contiguous() for t in (both, left, shift, gamma_sq))
        weight = weight.detach().clone(memory_format=torch.contiguous_format)  # updated in place
        num_mb, pairs, two_k, _ = both.shape
        starts = scan_buffer(num_mb * weight.numel(), weight).view(num_mb, *weight.shape)  # [NB, BH, in, f]
        z = shift.new_empty((pairs, num_mb, two_k // 2, shift.shape[-1]))  # [BH, NB, K, f]
        tensors = {"both": both, "left": left, "shift": shift, "gamma_sq": gamma_sq}
        run_entry_point(
            "innerloop_linear_scan_forward",
            _args(eps, **tensors, weight=weight, starts=starts, z=z),
        )
        ctx.save_for_backward(both, left, shift, gamma_sq, starts)
        ctx.eps = eps
        return z, weight

    @staticmethod
    def backward(
        ctx: FunctionCtx, grad_z: torch.Tensor | None, grad_last: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        if torch.is_grad_enabled():  # a backward with create_graph=True
            raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)
        both, left, shift, gamma_sq, starts = ctx.saved_tensors
        grad_z = shift.new_zeros(shift.transpose(0, 1).shape) if grad_z is None else grad_z.contiguous()
        grad_weight = (  # the kernel turns d loss / d last weights into d loss / d weight in place
            torch.zeros_like(starts[0])
            if grad_last is None
            else grad_last.clone(memory_format=torch.contiguous_format)
        )
        grads = {
            "grad_both": torch.empty_like(both),
            "grad_left": torch.empty_like(left),
            "grad_shift": torch.empty_like(shift),
            "grad_gamma_sq": torch.empty_like(gamma_sq),
        }
        tensors = {"both": both, "left": left, "shift": shift, "gamma_sq": gamma_sq, "starts": starts}
        args = _args(ctx.eps, **tensors, grad_z=grad_z, grad_weight=grad_weight, **grads)
        run_entry_point("innerloop_linear_scan_backward", args)
        return (*grads.values(), grad_weight, None)


def compiled_linear_scan(
    both: torch.Tensor,
    left: torch.Tensor,
    shift: torch.Tensor,
    gamma_sq: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:class:`CompiledLinearScan` applied: ``(z [BH, NB, K, f], weight after the last mini-batch)``."""
    return CompiledLinearScan.apply(both, left, shift, gamma_sq, weight, eps)


__all__ = ["DOUBLE_BACKWARD_MESSAGE", "CompiledLinearScan", "compiled_linear_scan"]
