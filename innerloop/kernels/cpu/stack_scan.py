"""Training deeper stacks (TTT-MLP) on the CPU: the compiled scan of an L-layer stack and its backward.

The one-layer scan (``linear_scan.py``) generalised: layer 0 takes the fused torch path's hoisted left
matrix, and each later layer builds its own from its key and query inputs, which depend on the inner
weights (``innerloop_stack_scan_forward`` and ``innerloop_stack_scan_backward`` in ``ttt_stack.cpp``;
README.md in this folder derives the backward). The forward keeps every layer's weights at the start of
every mini-batch and each mini-batch's products (its record); the backward restores a mini-batch from
them and carries the weights' gradients back.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch
from torch.autograd.function import FunctionCtx

from innerloop.kernels.cpu.buffers import scan_buffer
from innerloop.kernels.cpu.library import (
    ACTIVATION_CODES,
    DTYPE_CODES,
    MAX_LAYERS,
    run_entry_point,
    scan_input_problems,
    scan_sizes,
)
from innerloop.kernels.cpu.linear_scan import DOUBLE_BACKWARD_MESSAGE


class _StackScanArgs(ctypes.Structure):
    """Mirror of ``InnerloopStackScanArgs`` in ttt_stack.cpp (same order, same types). Its first fields
    repeat ``_LinearScanArgs``' because the C structs do: a ctypes mirror lists every field in C order."""

    _fields_ = [
        ("dtype", ctypes.c_int32),
        ("num_threads", ctypes.c_int32),
        ("num_mini_batches", ctypes.c_int64),
        ("pairs", ctypes.c_int64),
        ("mini_batch", ctypes.c_int64),
        ("num_layers", ctypes.c_int32),
        ("in_dims", ctypes.c_int64 * MAX_LAYERS),
        ("out_dims", ctypes.c_int64 * MAX_LAYERS),
        ("has_bias", ctypes.c_int32 * MAX_LAYERS),
        ("activations", ctypes.c_int32 * MAX_LAYERS),
        ("eps", ctypes.c_double),
        *((name, ctypes.c_void_p) for name in ("both", "left", "shift", "gamma_sq", "eta", "scale")),
        ("weights", ctypes.c_void_p * MAX_LAYERS),
        ("starts", ctypes.c_void_p * MAX_LAYERS),
        ("z", ctypes.c_void_p),
        ("grad_z", ctypes.c_void_p),
        ("grad_weights", ctypes.c_void_p * MAX_LAYERS),
        *(
            (name, ctypes.c_void_p)
            for name in ("grad_both", "grad_left", "grad_shift", "grad_gamma_sq", "grad_eta", "grad_scale")
        ),
        ("record_size", ctypes.c_int64),
        ("records", ctypes.c_void_p),
    ]


def record_size(mini_batch: int, widths: Sequence[int]) -> int:
    """Elements the forward keeps per (mini-batch, pair) for the backward (``stack_record_size`` in
    ttt_stack.cpp): each layer's key pre-activations ``[K, width]``, every layer's but the last's query
    pre-activations ``[K, width]``, and for each layer after the first ``G W^T [K, previous width]`` and
    the query-key similarities ``[K, K]``. ``widths``: each layer's output width."""
    size = 0
    for index, width in enumerate(widths):
        size += mini_batch * width * (2 if index + 1 < len(widths) else 1)
        if index > 0:
            size += mini_batch * (widths[index - 1] + mini_batch)
    return size


def _check_inputs(
    activations: Sequence[int],
    both: torch.Tensor,
    left: torch.Tensor,
    shift: torch.Tensor,
    gamma_sq: torch.Tensor,
    eta: torch.Tensor,
    scale: torch.Tensor,
    weights: Sequence[torch.Tensor],
) -> None:
    """The kernel trusts these shapes and the dtype for its pointer arithmetic: check them first."""
    num_mb, pairs, k, inputs, f = scan_sizes(both, shift)
    problems = []
    if not 2 <= len(weights) <= MAX_LAYERS:
        problems.append(f"{len(weights)} weights, the scan takes 2 to {MAX_LAYERS} layers")
    if len(activations) != len(weights) - 1:
        problems.append(f"{len(activations)} activations for {len(weights)} layers (one between each two)")
    problems += [
        f"activations[{index}] is {code!r}, not one of the kernel's codes {sorted(ACTIVATION_CODES)}"
        for index, code in enumerate(activations)
        if code not in ACTIVATION_CODES
    ]
    rows = inputs  # each layer's input rows: the previous one's width, plus 1 with a bias
    for index, weight in enumerate(weights):
        if weight.dim() != 3 or weight.shape[0] != pairs or weight.shape[1] not in (rows, rows + 1):
            problems.append(
                f"weights[{index}] {tuple(weight.shape)} is not [{pairs}, {rows} (+1 with a bias), width]"
            )
        elif index == 0 and weight.shape[1] != inputs:
            problems.append(f"weights[0] {tuple(weight.shape)} does not take both's {inputs} inputs")
        rows = weight.shape[-1]
    if rows != f:
        problems.append(f"the last layer's width {rows} is not shift's {f}")
    expected = {
        "left": (left, (num_mb, pairs, k + inputs, k)),
        "shift": (shift, (num_mb, pairs, k, f)),
        "gamma_sq": (gamma_sq, (pairs, 1, f)),
        "eta": (eta, (num_mb, pairs, k, k)),
        "scale": (scale, (num_mb, pairs, k, 1)),
        **{f"weights[{index}]": (weight, None) for index, weight in enumerate(weights)},
    }
    problems += scan_input_problems(both, expected)
    if problems:
        raise ValueError("the CPU training scan got inputs it cannot take: " + "; ".join(problems))


def _args(
    activations: Sequence[int],
    eps: float,
    tensors: dict[str, torch.Tensor],
    per_layer: dict[str, Sequence[torch.Tensor]],
) -> _StackScanArgs:
    """The struct for one call: sizes from ``both`` and the weights (``per_layer["weights"]`` or
    ``["starts"]``), every tensor's address by its field name."""
    both = tensors["both"]
    num_mb, pairs, two_k, _ = both.shape
    shapes = [w.shape[-2:] for w in per_layer.get("weights", per_layer.get("starts"))]
    args = _StackScanArgs()
    args.dtype, args.num_threads = DTYPE_CODES[both.dtype], torch.get_num_threads()
    args.num_mini_batches, args.pairs, args.mini_batch = num_mb, pairs, two_k // 2
    args.num_layers, args.eps = len(shapes), float(eps)
    for index, (rows, width) in enumerate(shapes):
        args.in_dims[index], args.out_dims[index] = rows, width
        args.has_bias[index] = int(index > 0 and rows == shapes[index - 1][1] + 1)
    args.activations[: len(activations)] = list(activations)
    args.record_size = record_size(two_k // 2, [width for _, width in shapes])
    for name, tensor in tensors.items():
        setattr(args, name, tensor.data_ptr())
    for name, tensor_list in per_layer.items():
        getattr(args, name)[: len(tensor_list)] = [t.data_ptr() for t in tensor_list]
    return args


class CompiledStackScan(torch.autograd.Function):
    """The scan of an L-layer stack (L >= 2), compiled, forward and backward.

    Inputs: ``activations`` (the kernel's code of each activation between two layers), ``eps``, then
    ``fused_torch.forward._Hoisted``'s tensors ``both [NB, BH, 2K, in1]``, ``left [NB, BH, K + in1, K]``,
    ``shift [NB, BH, K, f]``, ``gamma_sq [BH, 1, f]``, ``eta [NB, BH, K, K]``, ``scale [NB, BH, K, 1]``,
    and each layer's folded weight ``[BH, in, out]`` (a bias as its last input row). Returns ``(z [BH, NB,
    K, f]`` the outputs before the output LayerNorm (pair-major: a view of ``[B, H, T, f]``), then each
    layer's weight after the last mini-batch).
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        activations: tuple[int, ...],
        eps: float,
        both: torch.Tensor,
        left: torch.Tensor,
        shift: torch.Tensor,
        gamma_sq: torch.Tensor,
        eta: torch.Tensor,
        scale: torch.Tensor,
        *weights: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        _check_inputs(activations, both, left, shift, gamma_sq, eta, scale, weights)
        tensors = {
            name: t.detach().contiguous()
            for name, t in zip(("both", "left", "shift", "gamma_sq", "eta", "scale"),
                               (both, left, shift, gamma_sq, eta, scale), strict=True)
        }  # fmt: skip
        weights = [
            w.detach().clone(memory_format=torch.contiguous_format) for w in weights
        ]  # updated in place
        num_mb, pairs, two_k, _ = both.shape
        record = record_size(two_k // 2, [w.shape[-1] for w in weights])
        sizes = [num_mb * w.numel() for w in weights] + [num_mb * pairs * record]
        *starts, records = scan_buffer(sum(sizes), weights[0]).split(sizes)
        starts = [
            start.view(num_mb, *w.shape) for start, w in zip(starts, weights, strict=True)
        ]  # [NB, BH, in, out]
        records = records.view(num_mb, pairs, record)
        z = shift.new_empty((pairs, num_mb, two_k // 2, shift.shape[-1]))  # [BH, NB, K, f]
        args = _args(
            activations, eps, tensors | {"z": z, "records": records}, {"weights": weights, "starts": starts}
        )
        run_entry_point("innerloop_stack_scan_forward", args)
        ctx.save_for_backward(*tensors.values(), records, *starts)
        ctx.activations, ctx.eps = activations, eps
        return (z, *weights)

    @staticmethod
    def backward(
        ctx: FunctionCtx, grad_z: torch.Tensor | None, *grad_last: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        if torch.is_grad_enabled():  # a backward with create_graph=True
            raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)
        both, left, shift, gamma_sq, eta, scale, records, *starts = ctx.saved_tensors
        grad_z = shift.new_zeros(shift.transpose(0, 1).shape) if grad_z is None else grad_z.contiguous()
        grad_weights = [  # the kernel turns d loss / d last weights into d loss / d weights in place
            torch.zeros_like(start[0]) if grad is None else grad.clone(memory_format=torch.contiguous_format)
            for start, grad in zip(starts, grad_last, strict=True)
        ]
        saved = {"both": both, "left": left, "shift": shift, "gamma_sq": gamma_sq, "eta": eta, "scale": scale}
        grads = {f"grad_{name}": torch.empty_like(t) for name, t in saved.items()}
        tensors = saved | grads | {"grad_z": grad_z, "records": records}
        args = _args(ctx.activations, ctx.eps, tensors, {"starts": starts, "grad_weights": grad_weights})
        run_entry_point("innerloop_stack_scan_backward", args)
        return (None, None, *grads.values(), *grad_weights)


def compiled_stack_scan(
    activations: Sequence[int],
    both: torch.Tensor,
    left: torch.Tensor,
    shift: torch.Tensor,
    gamma_sq: torch.Tensor,
    eta: torch.Tensor,
    scale: torch.Tensor,
    weights: Sequence[torch.Tensor],
    eps: float,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """:class:`CompiledStackScan` applied: ``(z [BH, NB, K, f], each layer's weight after the last
    mini-batch)``."""
    z, *last = CompiledStackScan.apply(
        tuple(activations), eps, both, left, shift, gamma_sq, eta, scale, *weights
    )
    return z, last


__all__ = ["CompiledStackScan", "compiled_stack_scan"]
