"""Training on the CPU, around the compiled scans: the hoisting before them and the output LayerNorm
after them, compiled (``innerloop_hoist_*`` and ``innerloop_output_norm_*`` in ``ttt_stack.cpp``).

The fused torch path builds the scans' inputs (``fused_torch.forward._hoist``) and the output
``xq + gamma LN(z) + beta`` from a few dozen torch ops, whose autograd replays as many in the backward,
with copies and zero-filled gradients for every slice and concatenation. Here each end is one
``torch.autograd.Function`` whose forward and backward are one pass over a (batch, head) pair's rows per
thread; README.md in this folder derives the backward. The numbers are those of the torch ends (equal
at 1e-10 in float64, tests/kernels/test_cpu_training.py).
"""

from __future__ import annotations

import ctypes

import torch
from torch.autograd.function import FunctionCtx

from innerloop.kernels.cpu.library import DTYPE_CODES, rows_contiguous, run_entry_point, scan_input_problems
from innerloop.kernels.cpu.linear_scan import DOUBLE_BACKWARD_MESSAGE

_VIEWS = ("xq", "xk", "xv", "lr")
_HOISTED = ("both", "left", "shift", "gamma_sq", "eta", "scale")


class _HoistArgs(ctypes.Structure):
    """Mirror of ``InnerloopHoistArgs`` in ttt_stack.cpp (same order, same types)."""

    _fields_ = [
        ("dtype", ctypes.c_int32),
        ("num_threads", ctypes.c_int32),
        *((name, ctypes.c_int64) for name in ("batch", "heads", "tokens", "mini_batch", "width")),
        ("bias", ctypes.c_int32),
        *((name, ctypes.c_void_p) for name in _VIEWS),
        *((f"{name}_strides", ctypes.c_int64 * 3) for name in _VIEWS),
        *((name, ctypes.c_void_p) for name in ("tau", "ln_weight", "ln_bias", *_HOISTED)),
        *((name, ctypes.c_void_p) for name in ("grad_xq", "grad_xk", "grad_xv")),
        *((f"{name}_strides", ctypes.c_int64 * 3) for name in ("grad_xq", "grad_xk", "grad_xv")),
        *((name, ctypes.c_void_p) for name in ("grad_lr", "grad_tau", "grad_ln_weight", "grad_ln_bias")),
    ]


class _OutputNormArgs(ctypes.Structure):
    """Mirror of ``InnerloopOutputNormArgs`` in ttt_stack.cpp (same order, same types)."""

    _fields_ = [
        ("dtype", ctypes.c_int32),
        ("num_threads", ctypes.c_int32),
        *((name, ctypes.c_int64) for name in ("batch", "heads", "tokens", "width")),
        ("eps", ctypes.c_double),
        ("z", ctypes.c_void_p),
        ("xq", ctypes.c_void_p),
        ("xq_strides", ctypes.c_int64 * 3),
        ("ln_weight", ctypes.c_void_p),
        ("ln_bias", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("out_strides", ctypes.c_int64 * 3),
        ("grad_out", ctypes.c_void_p),
        ("grad_out_strides", ctypes.c_int64 * 3),
        *((name, ctypes.c_void_p) for name in ("grad_z", "grad_ln_weight", "grad_ln_bias")),
    ]


def _set(args: ctypes.Structure, **tensors: torch.Tensor | None) -> None:
    """Each tensor's address into the field of its name, and its first three strides into
    ``<name>_strides`` where the struct has that field (None: a null pointer)."""
    names = {name for name, _ in args._fields_}
    for name, tensor in tensors.items():
        setattr(args, name, None if tensor is None else tensor.data_ptr())
        if tensor is not None and f"{name}_strides" in names:
            getattr(args, f"{name}_strides")[:] = list(tensor.stride()[:3])


def _views_in_bhtf_layout(like: torch.Tensor) -> torch.Tensor:
    """An empty ``[B, H, T, f]`` tensor in ``[B, T, H, f]`` memory: the layout of the projections'
    views, so that gradients and outputs reshape to ``[B, T, D]`` without a copy."""
    batch, heads, tokens, width = like.shape
    return like.new_empty(batch, tokens, heads, width).permute(0, 2, 1, 3)


def _check(
    views: dict[str, torch.Tensor], tau: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor
) -> None:
    """The kernel trusts these shapes, the dtype and the device for its pointer arithmetic."""
    xq = views["xq"]
    _, heads, tokens, width = xq.shape
    expected = {
        "xk": (views["xk"], tuple(xq.shape)),
        "xv": (views["xv"], tuple(xq.shape)),
        "lr": (views["lr"], tuple(xq.shape[:3])),
        "tau": (tau, None),
        "ln_weight": (ln_weight, (heads, width)),
        "ln_bias": (ln_bias, (heads, width)),
    }
    problems = scan_input_problems(xq, expected, first="xq")
    if tau.dim() != 1 or tau.shape[0] < 1 or tokens % tau.shape[0]:
        problems.append(f"tau {tuple(tau.shape)} must be [K] with K dividing the {tokens} tokens")
    if problems:
        raise ValueError("the CPU kernel's training ends got inputs they cannot take: " + "; ".join(problems))


class CompiledHoist(torch.autograd.Function):
    """``fused_torch.forward._hoist`` compiled: from the views ``xq, xk, xv [B, H, T, f]`` (strided, the
    last dim contiguous), ``lr [B, H, T]``, ``tau [K]`` and the inner LayerNorm's ``ln_weight, ln_bias
    [H, f]``, the scans' inputs ``(both [NB, BH, 2K, in], left [NB, BH, K + in, K], shift [NB, BH, K, f],
    gamma_sq [BH, 1, f], eta [NB, BH, K, K], scale [NB, BH, K, 1])`` with ``in = f + has_bias``."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        has_bias: bool,
        xq: torch.Tensor,
        xk: torch.Tensor,
        xv: torch.Tensor,
        lr: torch.Tensor,
        tau: torch.Tensor,
        ln_weight: torch.Tensor,
        ln_bias: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        views = {name: rows_contiguous(t.detach()) for name, t in zip(_VIEWS, (xq, xk, xv, lr), strict=True)}
        tau, ln_weight, ln_bias = (t.detach().contiguous() for t in (tau, ln_weight, ln_bias))
        _check(views, tau, ln_weight, ln_bias)
        batch, heads, tokens, width = xq.shape
        k, pairs, num_mb, inputs = tau.shape[0], batch * heads, tokens // tau.shape[0], width + int(has_bias)
        hoisted = {
            "both": xq.new_empty(num_mb, pairs, 2 * k, inputs),
            "left": xq.new_empty(num_mb, pairs, k + inputs, k),
            "shift": xq.new_empty(num_mb, pairs, k, width),
            "gamma_sq": xq.new_empty(pairs, 1, width),
            "eta": xq.new_empty(num_mb, pairs, k, k),
            "scale": xq.new_empty(num_mb, pairs, k, 1),
        }
        args = _hoist_args(views, tau, ln_weight, ln_bias, has_bias)
        _set(args, **hoisted)
        run_entry_point("innerloop_hoist_forward", args)
        # the backward reads beta only in d gamma's term gamma * (beta - xv + xk): a copy of its own, so that
        # a step of the optimizer on the bias between forward and backward (as the torch path allows) is fine
        ctx.save_for_backward(*views.values(), tau, ln_weight)
        ctx.ln_bias = ln_bias.clone()
        ctx.has_bias = has_bias
        return tuple(hoisted.values())

    @staticmethod
    def backward(ctx: FunctionCtx, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if torch.is_grad_enabled():  # a backward with create_graph=True
            raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)
        xq, xk, xv, lr, tau, ln_weight = ctx.saved_tensors
        ln_bias = ctx.ln_bias
        views = {"xq": xq, "xk": xk, "xv": xv, "lr": lr}
        batch, heads, tokens, width = xq.shape
        pairs = batch * heads
        args = _hoist_args(views, tau, ln_weight, ln_bias, ctx.has_bias)
        hoisted_grads = {
            name: g.contiguous() for name, g in zip(_HOISTED, grads, strict=True)
        }  # alive for the call
        _set(args, **hoisted_grads)
        grad_views = {f"grad_{name}": _views_in_bhtf_layout(xq) for name in ("xq", "xk", "xv")}
        partial = {
            "grad_lr": xq.new_empty(batch, heads, tokens),
            "grad_tau": xq.new_empty(pairs, tau.shape[0]),
            "grad_ln_weight": xq.new_empty(pairs, width),
            "grad_ln_bias": xq.new_empty(pairs, width),
        }
        _set(args, **grad_views, **partial)
        run_entry_point("innerloop_hoist_backward", args)
        by_head = (batch, heads, width)
        return (
            None,
            *grad_views.values(),
            partial["grad_lr"],
            partial["grad_tau"].sum(0),
            partial["grad_ln_weight"].view(by_head).sum(0),
            partial["grad_ln_bias"].view(by_head).sum(0),
        )


def _hoist_args(
    views: dict[str, torch.Tensor],
    tau: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    has_bias: bool,
) -> _HoistArgs:
    """The struct's sizes and inputs (the outputs or gradients are set by the caller)."""
    xq = views["xq"]
    args = _HoistArgs()
    args.dtype, args.num_threads = DTYPE_CODES[xq.dtype], torch.get_num_threads()
    args.batch, args.heads, args.tokens, args.width = xq.shape
    args.mini_batch, args.bias = tau.shape[0], int(has_bias)
    _set(args, **views, tau=tau, ln_weight=ln_weight, ln_bias=ln_bias)
    return args


class CompiledOutputNorm(torch.autograd.Function):
    """The output LayerNorm and residual compiled: ``xq + ln_weight * LN(z) + ln_bias`` per row, for the
    scans' ``z [B, H, T, f]`` (contiguous), the view ``xq``, the inner LayerNorm's ``ln_weight, ln_bias
    [H, f]``. Returns ``[B, H, T, f]`` in ``[B, T, H, f]`` memory (the layer reshapes it to ``[B, T, D]``
    for free)."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        eps: float,
        z: torch.Tensor,
        xq: torch.Tensor,
        ln_weight: torch.Tensor,
        ln_bias: torch.Tensor,
    ) -> torch.Tensor:
        z, ln_weight, ln_bias = (t.detach().contiguous() for t in (z, ln_weight, ln_bias))
        xq = rows_contiguous(xq.detach())
        if (
            z.shape != xq.shape
            or ln_weight.shape != (xq.shape[1], xq.shape[3])
            or ln_bias.shape != ln_weight.shape
        ):
            raise ValueError(
                f"the CPU output norm takes z and xq [B, H, T, f] and ln_weight, ln_bias [H, f], got "
                f"{tuple(z.shape)}, {tuple(xq.shape)}, {tuple(ln_weight.shape)}, {tuple(ln_bias.shape)}"
            )
        out = _views_in_bhtf_layout(xq)
        args = _output_norm_args(eps, z, ln_weight, ln_bias)
        _set(args, xq=xq, out=out)
        run_entry_point("innerloop_output_norm_forward", args)
        ctx.save_for_backward(z, ln_weight)  # the backward does not read the bias
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx: FunctionCtx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if torch.is_grad_enabled():  # a backward with create_graph=True
            raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)
        z, ln_weight = ctx.saved_tensors
        grad_out = rows_contiguous(grad_out)
        batch, heads, _, width = z.shape
        grads = {
            "grad_z": torch.empty_like(z),
            "grad_ln_weight": z.new_empty(batch * heads, width),
            "grad_ln_bias": z.new_empty(batch * heads, width),
        }
        args = _output_norm_args(ctx.eps, z, ln_weight, ln_bias=None)
        _set(args, grad_out=grad_out, **grads)
        run_entry_point("innerloop_output_norm_backward", args)
        by_head = (batch, heads, width)
        return (
            None,
            grads["grad_z"],
            grad_out,  # the residual
            grads["grad_ln_weight"].view(by_head).sum(0),
            grads["grad_ln_bias"].view(by_head).sum(0),
        )


def _output_norm_args(
    eps: float, z: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor | None
) -> _OutputNormArgs:
    args = _OutputNormArgs()
    args.dtype, args.num_threads = DTYPE_CODES[z.dtype], torch.get_num_threads()
    args.batch, args.heads, args.tokens, args.width = z.shape
    args.eps = float(eps)
    _set(args, z=z, ln_weight=ln_weight, ln_bias=ln_bias)
    return args


__all__ = ["CompiledHoist", "CompiledOutputNorm"]
