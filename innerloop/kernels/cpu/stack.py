"""The host side of the CPU kernel: checks, the ctypes call, and the kernels' registrations.

The kernel (``ttt_stack.cpp``) runs the dual form for any stack of affine layers whose activations
are the identity or tanh-GELU, with the reconstruction loss, the inner LayerNorm and the residual:
the inner models ``linear`` and ``mlp``. Its chunk function is forward only (no autograd graph; with
one, training runs the fused torch path around the compiled training scans of ``linear_scan.py`` and
``stack_scan.py``), in float32 or float64, and writes its output in the ``[B, T, H, f]`` layout the
layer reshapes to ``[B, T, D]`` for free (it returns a ``[B, H, T, f]`` view of it, as the kernel
contract asks).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterable, Sequence

import torch

from innerloop.core.functional import gelu_tanh, gelu_tanh_derivative
from innerloop.core.protocol import Activation, AffineLayer, Params
from innerloop.kernels.cpu.build import CPUKernelUnavailable, load_library
from innerloop.kernels.cpu.library import (
    ACTIVATION_CODES,
    DTYPE_CODES,
    MAX_LAYERS,
    rows_contiguous,
    run_entry_point,
)
from innerloop.kernels.cpu.linear_scan import compiled_linear_scan
from innerloop.kernels.cpu.scan_ends import CompiledHoist, CompiledOutputNorm
from innerloop.kernels.cpu.stack_scan import compiled_stack_scan
from innerloop.kernels.fused_torch import TrainingEnds, TrainingScan, make_fused_forward
from innerloop.kernels.spec import KernelDecode, KernelForward, KernelInputs, KernelSpec, stack_kernel_spec


def activation_code(activation: Activation | None) -> int | None:
    """The kernel's code for an activation (:data:`ACTIVATION_CODES`): 0 for none (the identity), 1 for
    exactly innerloop's tanh-GELU with the reference's derivative, None for anything else (the kernel cannot run it)."""
    if activation is None:
        return 0
    if activation.fn is gelu_tanh and activation.derivative is gelu_tanh_derivative:
        return 1
    return None


class _StackArgs(ctypes.Structure):
    """Mirror of ``InnerloopStackArgs`` in ttt_stack.cpp (same order, same types)."""

    _fields_ = [
        ("dtype", ctypes.c_int32),
        ("num_threads", ctypes.c_int32),
        ("batch", ctypes.c_int64),
        ("heads", ctypes.c_int64),
        ("tokens", ctypes.c_int64),
        ("mini_batch", ctypes.c_int64),
        ("num_layers", ctypes.c_int32),
        ("dims", ctypes.c_int64 * (MAX_LAYERS + 1)),
        ("activations", ctypes.c_int32 * MAX_LAYERS),
        ("xq", ctypes.c_void_p),
        ("xk", ctypes.c_void_p),
        ("xv", ctypes.c_void_p),
        ("lr", ctypes.c_void_p),
        ("xq_strides", ctypes.c_int64 * 3),
        ("xk_strides", ctypes.c_int64 * 3),
        ("xv_strides", ctypes.c_int64 * 3),
        ("lr_strides", ctypes.c_int64 * 3),
        ("tau", ctypes.c_void_p),
        ("ln_weight", ctypes.c_void_p),
        ("ln_bias", ctypes.c_void_p),
        ("eps", ctypes.c_double),
        ("weights", ctypes.c_void_p * MAX_LAYERS),
        ("biases", ctypes.c_void_p * MAX_LAYERS),
        ("out", ctypes.c_void_p),
        ("out_strides", ctypes.c_int64 * 3),
    ]


class _DecodeArgs(ctypes.Structure):
    """Mirror of ``InnerloopDecodeArgs`` in ttt_stack.cpp (same order, same types).

    Its fields repeat many of ``_StackArgs``' because the C structs do: a ctypes mirror must list
    every field literally, in the C order, so the repetition stays."""

    _fields_ = [
        ("dtype", ctypes.c_int32),
        ("num_threads", ctypes.c_int32),
        ("batch", ctypes.c_int64),
        ("heads", ctypes.c_int64),
        ("num_layers", ctypes.c_int32),
        ("dims", ctypes.c_int64 * (MAX_LAYERS + 1)),
        ("activations", ctypes.c_int32 * MAX_LAYERS),
        ("xq", ctypes.c_void_p),
        ("xk", ctypes.c_void_p),
        ("xv", ctypes.c_void_p),
        ("lr", ctypes.c_void_p),
        ("xq_strides", ctypes.c_int64 * 2),
        ("xk_strides", ctypes.c_int64 * 2),
        ("xv_strides", ctypes.c_int64 * 2),
        ("lr_strides", ctypes.c_int64 * 2),
        ("tau", ctypes.c_double),
        ("is_last", ctypes.c_int32),
        ("ln_weight", ctypes.c_void_p),
        ("ln_bias", ctypes.c_void_p),
        ("eps", ctypes.c_double),
        ("weights", ctypes.c_void_p * MAX_LAYERS),
        ("biases", ctypes.c_void_p * MAX_LAYERS),
        ("pending_weights", ctypes.c_void_p * MAX_LAYERS),
        ("pending_biases", ctypes.c_void_p * MAX_LAYERS),
        ("out", ctypes.c_void_p),
        ("out_strides", ctypes.c_int64 * 2),
    ]


def _fill(
    args: _StackArgs | _DecodeArgs,
    stack: tuple[AffineLayer, ...],
    activations: Sequence[int | None],
    dims: Sequence[int],
    params: Params,
    views: dict,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
) -> None:
    """The fields both entry points share: sizes, the layers, the weights' and views' addresses and
    strides (as many as the struct has: 3 for chunks, 2 for one token), the inner LayerNorm."""
    args.dtype = DTYPE_CODES[views["xq"].dtype]
    args.num_threads = torch.get_num_threads()
    args.batch, args.heads = views["xq"].shape[:2]
    args.num_layers = len(stack)
    args.dims[: len(dims)] = dims
    for index, layer in enumerate(stack):
        args.activations[index] = activations[index]
        args.weights[index] = params[layer.weight].data_ptr()
        args.biases[index] = params[layer.bias].data_ptr() if layer.bias is not None else None
    for name, tensor in views.items():
        setattr(args, name, tensor.data_ptr())
        strides = getattr(args, f"{name}_strides")
        strides[:] = list(tensor.stride()[: len(strides)])
    args.ln_weight, args.ln_bias, args.eps = ln_weight.data_ptr(), ln_bias.data_ptr(), float(eps)


def _refuse_autograd(tensors: Iterable[object]) -> None:
    """The kernel's decoding is forward only: never let it drop a graph silently (verify should have
    refused)."""
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        raise RuntimeError(
            "the CPU TTT kernel decodes without autograd, but an input requires grad; use the torch path"
        )


def _check_shapes(
    stack: tuple[AffineLayer, ...],
    params: Params,
    batch: int,
    heads: int,
    head_dim: int,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    **vectors: tuple[torch.Tensor, tuple[int, ...]],
) -> list[int]:
    """The kernel trusts these shapes for its pointer arithmetic: check them, and return the widths."""
    expected_ln = (heads, head_dim)
    problems = [
        f"{name} {tuple(t.shape)} != {expected_ln}"
        for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias))
        if tuple(t.shape) != expected_ln
    ]
    problems += [
        f"{name} {tuple(t.shape)} != {shape}"
        for name, (t, shape) in vectors.items()
        if tuple(t.shape) != shape
    ]
    dims = [head_dim]
    for layer in stack:
        weight = params[layer.weight]
        if weight.dim() != 4 or tuple(weight.shape[:3]) != (batch, heads, dims[-1]):
            problems.append(
                f"{layer.weight} {tuple(weight.shape)} is not [{batch}, {heads}, {dims[-1]}, width]"
            )
            break
        dims.append(weight.shape[-1])
        if layer.bias is not None and tuple(params[layer.bias].shape) != (batch, heads, 1, dims[-1]):
            problems.append(
                f"{layer.bias} {tuple(params[layer.bias].shape)} != {(batch, heads, 1, dims[-1])}"
            )
    if dims[-1] != head_dim:
        problems.append(f"the last layer's width {dims[-1]} is not the head dim {head_dim}")
    if problems:
        raise ValueError("the CPU TTT kernel got inputs of the wrong shape: " + "; ".join(problems))
    return dims


def _fresh(params: Params, dtype: torch.dtype) -> Params:
    """Contiguous copies the kernel may update in place (they become the new state)."""
    return {k: v.to(dtype).clone(memory_format=torch.contiguous_format) for k, v in params.items()}


def _contiguous(params: Params, dtype: torch.dtype) -> Params:
    """The tensors themselves when contiguous and of ``dtype`` (the kernel only reads them), else copies."""
    return {k: v.to(dtype).contiguous() for k, v in params.items()}


COMPILED_ENDS = TrainingEnds(hoist=CompiledHoist.apply, output=CompiledOutputNorm.apply)
"""The hoisting and the output LayerNorm around the training scans, compiled (``scan_ends.py``)."""


def make_training_scan(stack: tuple[AffineLayer, ...]) -> TrainingScan:
    """The compiled scan, forward and backward, that replaces the fused torch path's recorded one:
    ``linear_scan.py`` for one layer, ``stack_scan.py`` for deeper stacks."""
    if len(stack) == 1:

        def linear(
            both: torch.Tensor,
            left: torch.Tensor,
            shift: torch.Tensor,
            gamma_sq: torch.Tensor,
            eta: torch.Tensor,
            update_scale: torch.Tensor,
            weights: Sequence[torch.Tensor],
            eps: float,
        ) -> tuple[torch.Tensor, list[torch.Tensor]]:
            z, last = compiled_linear_scan(both, left, shift, gamma_sq, weights[0], eps)
            return z, [last]

        return linear
    between = [activation_code(layer.activation) for layer in stack[:-1]]

    def deeper(
        both: torch.Tensor,
        left: torch.Tensor,
        shift: torch.Tensor,
        gamma_sq: torch.Tensor,
        eta: torch.Tensor,
        update_scale: torch.Tensor,
        weights: Sequence[torch.Tensor],
        eps: float,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return compiled_stack_scan(between, both, left, shift, gamma_sq, eta, update_scale, weights, eps)

    return deeper


def make_forward(stack: tuple[AffineLayer, ...]) -> KernelForward:
    """The chunk function (see :mod:`innerloop.kernels.spec`) for a stack model with these layers.

    With an autograd graph to record, it is the fused torch path with its scan compiled, forward and
    backward (``linear_scan.py``, ``stack_scan.py``), and the hoisting and output LayerNorm around it
    (``scan_ends.py``)."""
    activations = [activation_code(layer.activation) for layer in stack]
    training = make_fused_forward(stack, training_scan=make_training_scan(stack), training_ends=COMPILED_ENDS)

    def forward(  # KernelForward's parameters, three lines (make_forward stays under 60)
        xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor, lr: torch.Tensor, tau: torch.Tensor,
        params: Params, ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float,
    ) -> tuple[torch.Tensor, Params]:  # fmt: skip
        batch, heads, tokens, head_dim = xq.shape
        inputs = (xq, xk, xv, lr, tau, ln_weight, ln_bias, *params.values())
        if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
            if xq.dtype not in DTYPE_CODES:
                raise ValueError(f"the CPU TTT kernel takes float32 or float64, got {xq.dtype}")
            # the compiled scans take one dtype: everything in the views' (differentiably), as inference does
            xk, xv, lr, tau, ln_weight, ln_bias = (
                t.to(xq.dtype) for t in (xk, xv, lr, tau, ln_weight, ln_bias)
            )
            params = {k: v.to(xq.dtype) for k, v in params.items()}
            return training(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps)
        _refuse_autograd(inputs)
        shape = (batch, heads, tokens, head_dim)
        dims = _check_shapes(
            stack,
            params,
            batch,
            heads,
            head_dim,
            ln_weight,
            ln_bias,
            xk=(xk, shape),
            xv=(xv, shape),
            lr=(lr, shape[:3]),
        )
        if tau.dim() != 1 or tau.shape[0] < 1 or tokens % tau.shape[0] != 0:
            raise ValueError(f"tau {tuple(tau.shape)} must be [K] with K dividing the {tokens} tokens")
        dtype = xq.dtype
        xq, xk, xv = (rows_contiguous(t.to(dtype)) for t in (xq, xk, xv))
        lr = lr.to(dtype)
        tau, ln_weight, ln_bias = (t.to(dtype).contiguous() for t in (tau, ln_weight, ln_bias))
        # The kernel updates the weights in place: fresh contiguous copies, which become the new state.
        new_params = _fresh(params, dtype)
        # Written in [B, T, H, f] memory order, returned as the [B, H, T, f] view the contract asks for.
        out = xq.new_empty(batch, tokens, heads, head_dim).permute(0, 2, 1, 3)

        args = _StackArgs()
        views = {"xq": xq, "xk": xk, "xv": xv, "lr": lr, "out": out}
        _fill(args, stack, activations, dims, new_params, views, ln_weight, ln_bias, eps)
        args.tokens, args.mini_batch, args.tau = tokens, tau.shape[0], tau.data_ptr()
        run_entry_point("innerloop_stack_forward", args)
        return out, new_params

    return forward


def make_decode(stack: tuple[AffineLayer, ...]) -> KernelDecode:
    """The one-token function (see ``KernelSpec.decode``) for a stack model with these layers."""
    activations = [activation_code(layer.activation) for layer in stack]

    def decode(
        xq: torch.Tensor,
        xk: torch.Tensor,
        xv: torch.Tensor,
        lr: torch.Tensor,
        tau_i: torch.Tensor,
        params: Params,
        pending: Params,
        ln_weight: torch.Tensor,
        ln_bias: torch.Tensor,
        eps: float,
        is_last: bool,
    ) -> tuple[torch.Tensor, Params, Params]:
        batch, heads, head_dim = xq.shape
        _refuse_autograd((xq, xk, xv, lr, tau_i, ln_weight, ln_bias, *params.values(), *pending.values()))
        shape = (batch, heads, head_dim)
        dims = _check_shapes(
            stack,
            params,
            batch,
            heads,
            head_dim,
            ln_weight,
            ln_bias,
            xk=(xk, shape),
            xv=(xv, shape),
            lr=(lr, shape[:2]),
        )
        if set(pending) != set(params):
            raise ValueError(
                f"pending must have the keys of params; differing: {sorted(set(pending) ^ set(params))}"
            )
        mismatched = [k for k in params if tuple(pending[k].shape) != tuple(params[k].shape)]
        if mismatched:
            raise ValueError(f"pending must have the shapes of params; differing: {mismatched}")
        dtype = xq.dtype
        xq, xk, xv = (rows_contiguous(t.to(dtype)) for t in (xq, xk, xv))
        lr = lr.to(dtype)
        ln_weight, ln_bias = (t.to(dtype).contiguous() for t in (ln_weight, ln_bias))
        # The weights change only when the token closes its mini-batch; the pending sums always do.
        new_params = _fresh(params, dtype) if is_last else _contiguous(params, dtype)
        new_pending = _fresh(pending, dtype)
        out = xq.new_empty(batch, heads, head_dim)

        args = _DecodeArgs()
        views = {"xq": xq, "xk": xk, "xv": xv, "lr": lr, "out": out}
        _fill(args, stack, activations, dims, new_params, views, ln_weight, ln_bias, eps)
        for index, layer in enumerate(stack):
            args.pending_weights[index] = new_pending[layer.weight].data_ptr()
            if layer.bias is not None:
                args.pending_biases[index] = new_pending[layer.bias].data_ptr()
        args.tau, args.is_last = float(tau_i), int(bool(is_last))
        run_entry_point("innerloop_stack_decode", args)
        return out, new_params, new_pending

    return decode


def make_verify(stack: tuple[AffineLayer, ...]) -> Callable[[KernelInputs], str | None]:
    """``verify`` for a stack model: the kernel's own limits, then whether the library builds here."""
    unsupported = [layer.activation.name for layer in stack if activation_code(layer.activation) is None]

    def verify(inputs: KernelInputs) -> str | None:
        if inputs.device.type != "cpu":
            return f"runs on the CPU only, the inputs are on {inputs.device}"
        if inputs.dtype not in DTYPE_CODES:
            return f"dtype {inputs.dtype} is not float32 or float64"
        if inputs.requires_grad and inputs.extra.get("decode"):
            return "decodes without autograd: an autograd graph is needed (the torch path trains it)"
        if inputs.requires_grad and inputs.needs_double_backward:
            return "double backward needed: the compiled training scan is differentiable once only"
        if not inputs.extra.get("decode") and inputs.num_tokens % inputs.mini_batch_size != 0:
            return f"num_tokens {inputs.num_tokens} is not a multiple of mini_batch_size {inputs.mini_batch_size}"
        if unsupported:
            return (
                f"activations {unsupported} are not among those the kernel computes {tuple(ACTIVATION_CODES.values())}: "
                "an activation is matched by its functions, not its name (tanh-GELU is exactly "
                "innerloop.GELU_TANH, innerloop.core.functional's gelu_tanh and gelu_tanh_derivative)"
            )
        if len(stack) > MAX_LAYERS:
            return f"{len(stack)} layers, the kernel takes up to {MAX_LAYERS}"
        try:
            load_library()
        except CPUKernelUnavailable as error:
            return str(error)
        return None

    return verify


def kernel_spec(model_name: str, stack: tuple[AffineLayer, ...]) -> KernelSpec:
    """The registration of the CPU kernel for one stack model with the reconstruction loss."""
    return stack_kernel_spec(
        "cpu_ttt",
        model_name,
        forward=make_forward(stack),
        verify=make_verify(stack),
        decode=make_decode(stack),
        priority=5,
        description="compiled C++ dual form, one (batch, head) recurrence per thread (CPU inference and training)",
    )


__all__ = ["kernel_spec", "make_decode", "make_forward", "make_verify"]
