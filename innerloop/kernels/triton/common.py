"""Pure-torch pieces shared by the Triton TTT kernels and their naive references.

Nothing in this module imports Triton, so it (and the naive references built on it) can be imported
on any machine. The Triton kernels live in ``_kernels.py`` modules that are imported lazily, on the
first kernel launch, because Triton decides at decoration time whether a kernel runs compiled or
under the CPU interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

# One definition of the shared math, in core: the kernels' references must not drift from the layer's.
from innerloop.core.functional import (  # noqa: F401  (re-exported for the kernels and their tests)
    as_integer,
    gelu_tanh,
    gelu_tanh_derivative,
    is_power_of_two,
    layer_norm,
    layer_norm_backward,
)
from innerloop.core.layer import MAX_NORM_EPS, is_real
from innerloop.kernels.spec import KernelInputs, KernelSpec, double_backward_message

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_MINI_BATCH = 64
INSTALL_HINT = "pip install 'innerloop[triton]'"


def ln_fused_l2_bwd(
    z: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """Gradient w.r.t. ``z`` of ``1/2 || LN(z) - target ||^2`` in the reference's closed form.

    Same formula as ``ln_fused_l2_bwd`` of test-time-training/ttt-lm-pytorch. Differentiable.
    """
    return layer_norm_backward(z, layer_norm(z, weight, bias, eps) - target, weight, eps)


def eta_matrix(lr: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """``eta[..., i, j] = tau_i * lr_j`` for ``j <= i`` else 0.

    Args:
        lr: ``[..., K]`` per-token learning rates of one mini-batch.
        tau: ``[K]`` token-index scales.

    Returns:
        ``[..., K, K]`` lower-triangular (diagonal included).
    """
    return torch.tril(tau[:, None] * lr[..., None, :])


def differentiable_once(kernel_name: str) -> Callable[[Callable], Callable]:
    """Decorate an ``autograd.Function.backward`` that cannot be differentiated: a backward asked to
    build a graph (``create_graph=True``: grad mode is on inside it) raises
    :func:`~innerloop.kernels.spec.double_backward_message`. ``torch.autograd.function.once_differentiable`` is not enough: it
    hangs its error on fresh leaves, which ``torch.autograd.grad(g, inputs)`` never reaches, so a second
    derivative came out silently without the kernel's part (review s33c)."""

    def decorate(backward: Callable) -> Callable:
        @functools.wraps(backward)
        def checked(ctx: object, *grads: torch.Tensor | None) -> object:
            if torch.is_grad_enabled():
                raise RuntimeError(double_backward_message(kernel_name, "its backward is a Triton kernel"))
            return backward(ctx, *grads)

        return checked

    return decorate


def launch_device(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Where a kernel reading ``tensor`` is launched: its CUDA device made current (Triton launches on the
    current device, and a tensor on ``cuda:1`` read from ``cuda:0`` fails or races), nothing on CPU. A new
    context per call: a cache keyed by the tensor kept every input of every launch alive (review s20)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


@functools.cache
def triton_missing() -> str | None:
    """Why the Triton kernels cannot run in this environment (triton not installed), or ``None``.

    Triton is an optional extra: a CPU install goes without it. Asked once per process (the search of
    the import path cost 0.15 ms, a tenth of a decoded token's layer call); the answer does not import
    triton.
    """
    if importlib.util.find_spec("triton") is None:
        return f"triton is not installed; install it with {INSTALL_HINT} (the Triton kernels need CUDA)"
    return None


def interpreter_requested() -> bool:
    """True when ``TRITON_INTERPRET=1`` is set in the environment (Triton's CPU interpreter)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_chunk_inputs(
    xq: torch.Tensor,
    xk: torch.Tensor,
    xv: torch.Tensor,
    lr: torch.Tensor,
    tau: torch.Tensor,
    params: dict,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    param_shapes: dict,
) -> None:
    """Raise ``ValueError`` naming the parameter when a chunk call's tensors do not fit together.

    ``param_shapes`` maps each required params key to its expected shape.
    """
    if xq.dim() != 4:
        raise ValueError(f"xq must be [B, H, T, f], got shape {tuple(xq.shape)}")
    B, H, T, f = xq.shape
    for name, t in (("xk", xk), ("xv", xv)):
        if t.shape != xq.shape:
            raise ValueError(f"{name} must have the shape of xq {tuple(xq.shape)}, got {tuple(t.shape)}")
    if lr.shape != (B, H, T):
        raise ValueError(f"lr must be [B, H, T] = {(B, H, T)}, got {tuple(lr.shape)}")
    if tau.dim() != 1 or tau.shape[0] < 1:
        raise ValueError(f"tau must be [K] with K >= 1, got shape {tuple(tau.shape)}")
    K = tau.shape[0]
    if T % K != 0:
        raise ValueError(f"T = {T} must be a multiple of the mini-batch size K = len(tau) = {K}")
    for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if t.shape != (H, f):
            raise ValueError(f"{name} must be [H, f] = {(H, f)}, got {tuple(t.shape)}")
    check_params(params, param_shapes)
    check_same_device(xq, {"xk": xk, "xv": xv, "lr": lr, "tau": tau, "ln_weight": ln_weight,
                           "ln_bias": ln_bias, **{f"params['{k}']": v for k, v in params.items()}})  # fmt: skip


def check_same_device(xq: torch.Tensor, others: dict) -> None:
    """Raise ``ValueError`` naming the first tensor of ``others`` (name -> tensor) that is not on ``xq``'s
    device: a kernel reads every pointer on the device it is launched on (a cpu tensor fails deep in
    Triton naming only an argument position; another GPU's memory is no input of this launch)."""
    for name, t in others.items():
        if t.device != xq.device:
            raise ValueError(
                f"{name} is on {t.device}, xq on {xq.device}: every tensor of a kernel call must be on one "
                "device (move them with .to(xq.device))"
            )


def check_params(params: dict, param_shapes: dict, name: str = "params") -> None:
    """Raise ``ValueError`` when ``params`` lacks a key or a tensor has the wrong shape."""
    missing = sorted(set(param_shapes) - set(params))
    extra = sorted(set(params) - set(param_shapes))
    if missing or extra:
        raise ValueError(
            f"{name} must have exactly the keys {sorted(param_shapes)}, missing {missing}, unexpected {extra}"
        )
    for key, shape in param_shapes.items():
        if tuple(params[key].shape) != tuple(shape):
            raise ValueError(
                f"{name}['{key}'] must have shape {tuple(shape)}, got {tuple(params[key].shape)}"
            )


def check_decode_inputs(
    xq: torch.Tensor,
    xk: torch.Tensor,
    xv: torch.Tensor,
    lr: torch.Tensor,
    tau_i: torch.Tensor,
    params: dict,
    pending: dict,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    param_shapes: dict,
) -> None:
    """Raise ``ValueError`` naming the parameter when one-token decode inputs do not fit together.

    ``param_shapes`` maps each required key of ``params`` (and of ``pending``) to its expected shape.
    """
    if xq.dim() != 3:
        raise ValueError(f"xq must be [B, H, f] (one token), got shape {tuple(xq.shape)}")
    B, H, f = xq.shape
    for name, t in (("xk", xk), ("xv", xv)):
        if t.shape != xq.shape:
            raise ValueError(f"{name} must have the shape of xq {tuple(xq.shape)}, got {tuple(t.shape)}")
    if lr.shape != (B, H):
        raise ValueError(f"lr must be [B, H] = {(B, H)}, got {tuple(lr.shape)}")
    if not torch.is_tensor(tau_i) or tau_i.dim() != 0:
        raise ValueError(f"tau_i must be a 0-d tensor, got {tau_i!r}")
    for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if t.shape != (H, f):
            raise ValueError(f"{name} must be [H, f] = {(H, f)}, got {tuple(t.shape)}")
    check_params(params, param_shapes)
    check_params(pending, param_shapes, name="pending")
    check_same_device(xq, {"xk": xk, "xv": xv, "lr": lr, "tau_i": tau_i, "ln_weight": ln_weight,
                           "ln_bias": ln_bias, **{f"params['{k}']": v for k, v in params.items()},
                           **{f"pending['{k}']": v for k, v in pending.items()}})  # fmt: skip


def concat_tokens(outputs: list[torch.Tensor], xq: torch.Tensor) -> torch.Tensor:
    """The mini-batches' outputs ``[B, H, K, f]`` joined along the tokens: ``[B, H, T, f]``.

    A chunk of no tokens (``T = 0``, a multiple of every ``K``) has no mini-batch; its output is empty,
    ``xq``'s shape and dtype (``torch.cat`` of no tensors raised, naming nothing of the call: s56t).
    """
    return torch.cat(outputs, dim=2) if outputs else xq.clone()


def _floating(value: object) -> list[torch.Tensor]:
    """The floating-point tensors of an argument: itself, or a weights dict's values."""
    tensors = list(value.values()) if isinstance(value, dict) else [value]
    return [t for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _cast(value: object, dtype: torch.dtype) -> object:
    """An argument's floating-point tensors (a weights dict's values too) in ``dtype``."""
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    return value


def given_dtypes(reference: Callable) -> Callable:
    """A naive reference's one dtype rule, the fused kernels' (at every ``T``, ``T = 0`` too): it computes
    in the promoted dtype of its floating-point inputs and returns ``out`` in ``xq``'s dtype and the new
    weights (and pending sums) in the given ones' dtypes. Without it a mix (bfloat16 views, float32
    LayerNorm) returned the promoted dtype at ``T > 0`` but ``xq``'s at ``T = 0``, and most mixes raised
    torch's unnamed ``expected scalar type`` error from a matmul."""
    signature = inspect.signature(reference)

    @functools.wraps(reference)
    def run(*args: object, **kwargs: object) -> tuple:
        bound = signature.bind(*args, **kwargs)
        floats = [t for value in bound.arguments.values() for t in _floating(value)]
        if not floats:  # no floating input: the reference's own checks name what is wrong
            return reference(*args, **kwargs)
        dtype = functools.reduce(torch.promote_types, (t.dtype for t in floats), floats[0].dtype)
        given = dict(bound.arguments)
        bound.arguments.update({k: _cast(v, dtype) for k, v in given.items()})
        out, *weights = reference(*bound.args, **bound.kwargs)
        xq = given["xq"]
        cast = [out.to(xq.dtype) if isinstance(xq, torch.Tensor) else out]
        for new, old in zip(weights, (given["params"], given.get("pending"))[: len(weights)], strict=True):
            cast.append({k: v.to(old[k].dtype) for k, v in new.items()})
        return tuple(cast)

    return run


def head_view(t: torch.Tensor) -> torch.Tensor:
    """``[H, f] -> [1, H, 1, f]`` so a per-head LayerNorm parameter broadcasts over ``[B, H, K, f]``."""
    return t[None, :, None, :]


def verify_common(inputs: KernelInputs, max_head_dim: int, kernel_name: str) -> str | None:
    """The checks both Triton TTT kernels share; returns a reason string or None."""
    missing = triton_missing()
    if missing is not None:
        return f"{kernel_name}: {missing}"
    device = torch.device(inputs.device)
    if device.type != "cuda":
        if not (device.type == "cpu" and interpreter_requested()):
            return (
                f"{kernel_name}: device is {device.type!r}; needs 'cuda', or 'cpu' with TRITON_INTERPRET=1 "
                "set before the kernels are first used"
            )
    try:
        import triton  # noqa: F401
    except ImportError as exc:  # pragma: no cover - installed but broken
        return f"{kernel_name}: triton is installed but does not import ({exc})"
    if inputs.dtype not in SUPPORTED_DTYPES:
        return f"{kernel_name}: dtype {inputs.dtype} unsupported; supported: float32, float16, bfloat16"
    decode = bool(inputs.extra.get("decode"))
    # a decoded token is one row whatever the layer's mini-batch size (the decode kernel takes its scale
    # tau_i, not the mini-batch: its host checks launch it with K = 1)
    reason = shape_problem(inputs.head_dim, 1 if decode else inputs.mini_batch_size, max_head_dim)
    if reason is not None:
        return f"{kernel_name}: {reason}"
    K = inputs.mini_batch_size
    if decode:
        if inputs.requires_grad:
            return f"{kernel_name}: the decode kernel is inference-only, but gradients are required"
    elif inputs.num_tokens % K != 0:
        return f"{kernel_name}: num_tokens {inputs.num_tokens} is not a multiple of mini_batch_size {K}"
    # a block without a graph (torch.no_grad, inference mode) is never differentiated, twice or once
    if inputs.requires_grad and inputs.needs_double_backward:
        return f"{kernel_name}: double backward needed, but the kernel's backward is not differentiable"
    return None


def shape_problem(f: int, K: int, max_head_dim: int) -> str | None:
    """Why head dim ``f`` or mini-batch size ``K`` is outside what the kernels are built for, or None."""
    if not is_power_of_two(f) or not 16 <= f <= max_head_dim:
        return f"head_dim {f} must be a power of two in [16, {max_head_dim}]"
    if not 1 <= K <= MAX_MINI_BATCH:
        return f"mini_batch_size {K} (len(tau)) unsupported; must be in [1, {MAX_MINI_BATCH}]"
    return None


def block_rows(K: int) -> int:
    """Rows of a mini-batch tile: ``K`` padded to a power of two, at least 16 (``tl.dot``'s minimum)."""
    return max(16, 1 << (K - 1).bit_length())


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: exact float32 ("ieee") for float32 inputs, tf32 for half inputs."""
    return "ieee" if dtype == torch.float32 else "tf32"


def mode_mismatch(kernels_module_name: str, device: torch.device | str, kernel_name: str) -> str | None:
    """Reason why already-built kernels cannot serve ``device``, or None.

    Triton fixes compiled vs interpreted when a kernel is defined; if the kernels module was imported
    in one mode, tensors of the other kind of device cannot be served by it.
    """
    import sys

    module = sys.modules.get(kernels_module_name)
    if module is None:
        return None
    device = torch.device(device)
    if device.type == "cpu" and not module.INTERPRETED:
        return (
            f"{kernel_name}: the kernels were built compiled (TRITON_INTERPRET was not 1 when they were "
            "first used), so they cannot run on cpu tensors in this process"
        )
    if device.type == "cuda" and module.INTERPRETED:
        return f"{kernel_name}: the kernels were built for the CPU interpreter (TRITON_INTERPRET=1)"
    return None


def check_runnable(t: torch.Tensor, kernel_name: str) -> None:
    """Raise a clear error when a kernel is launched on a device/dtype it cannot serve."""
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{kernel_name}: dtype {t.dtype} unsupported; use float32, float16 or bfloat16")
    if t.device.type == "cpu" and not interpreter_requested():
        raise RuntimeError(
            f"{kernel_name}: got cpu tensors but TRITON_INTERPRET=1 is not set; Triton needs a cuda device"
        )
    if t.device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"{kernel_name}: device {t.device.type!r} unsupported; use cuda")


@dataclass(frozen=True)
class HostChecks:
    """The argument checks every Triton TTT kernel's host functions make before a launch.

    ``name`` is the kernel's name (used in every message), ``kernels_module`` the dotted name of its
    lazily imported ``_kernels`` module, ``max_head_dim`` the largest head dim its kernels are built
    for, ``param_shapes(B, H, f)`` the shapes of its weights.
    """

    name: str
    kernels_module: str
    max_head_dim: int
    param_shapes: Callable[[int, int, int], dict]

    def kernels(self) -> ModuleType:
        """The Triton kernels module, imported on first use (see the module docstring for why)."""
        return importlib.import_module(self.kernels_module)

    def mode_mismatch(self, device: torch.device | str) -> str | None:
        """Why the already-built kernels cannot serve ``device`` (compiled vs interpreted), or None."""
        return mode_mismatch(self.kernels_module, device, self.name)

    def check_launchable(self, t: torch.Tensor, f: int, K: int) -> None:
        """Raise a clear error when the kernels cannot run on ``t``'s device and dtype, or on f and K."""
        reason = shape_problem(f, K, self.max_head_dim)
        if reason is not None:
            raise ValueError(f"{self.name}: {reason}")
        check_runnable(t, self.name)
        self.kernels()
        reason = self.mode_mismatch(t.device)
        if reason is not None:
            raise RuntimeError(reason)

    def check_forward(
        self,
        xq: torch.Tensor,
        xk: torch.Tensor,
        xv: torch.Tensor,
        lr: torch.Tensor,
        tau: torch.Tensor,
        params: dict,
        ln_weight: torch.Tensor,
        ln_bias: torch.Tensor,
        checkpoint_every: int,
        eps: float = 1e-6,
    ) -> int:
        """Every check of a chunk forward's arguments (``ValueError`` / ``RuntimeError`` naming them), the
        arguments' before the device's; returns ``checkpoint_every`` as an int (a numpy integer is one)."""
        if xq.dim() != 4:
            raise ValueError(f"xq must be [B, H, T, f], got shape {tuple(xq.shape)}")
        B, H, _, f = xq.shape
        check_chunk_inputs(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, self.param_shapes(B, H, f))
        check_eps(eps, self.name)
        every = as_integer(checkpoint_every)
        if every is None or every < 1:
            raise ValueError(f"checkpoint_every must be a positive integer, got {checkpoint_every!r}")
        self.check_launchable(xq, f, tau.shape[0])
        return every

    def check_decode(
        self,
        xq: torch.Tensor,
        xk: torch.Tensor,
        xv: torch.Tensor,
        lr: torch.Tensor,
        tau_i: torch.Tensor,
        params: dict,
        pending: dict,
        ln_weight: torch.Tensor,
        ln_bias: torch.Tensor,
        eps: float = 1e-6,
    ) -> None:
        """Every check of a one-token decode's arguments; decode is inference-only."""
        if xq.dim() != 3:
            raise ValueError(f"xq must be [B, H, f] (one token), got shape {tuple(xq.shape)}")
        B, H, f = xq.shape
        check_decode_inputs(
            xq, xk, xv, lr, tau_i, params, pending, ln_weight, ln_bias, self.param_shapes(B, H, f)
        )
        check_eps(eps, self.name)
        self.check_launchable(xq, f, 1)
        tensors = (xq, xk, xv, lr, tau_i, *params.values(), *pending.values(), ln_weight, ln_bias)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            raise RuntimeError(f"{self.name}.decode is inference-only; call it under torch.no_grad()")


def check_eps(eps: float, kernel_name: str) -> None:
    """Raise ``ValueError`` unless ``eps`` (the inner LayerNorm's epsilon) is a finite number in
    ``(0, MAX_NORM_EPS)`` and a normal float32 (the kernels' LayerNorm runs in float32), as the layer's
    ``norm_eps`` must be: a negative or nan one made every output nan, silently (the kernels take it as
    it is), and one that is 0 in float32 makes a constant row's LayerNorm 0 / 0."""
    smallest = torch.finfo(torch.float32).tiny
    if not is_real(eps) or not smallest <= eps < MAX_NORM_EPS:
        raise ValueError(
            f"{kernel_name}: eps={eps!r} (the inner LayerNorm's epsilon) must be a finite number in "
            f"(0, {MAX_NORM_EPS:g}), at least float32's smallest normal {smallest:.3g}; the default is 1e-6"
        )


def empty_output(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, poison: bool
) -> torch.Tensor:
    """An output buffer; ``poison`` fills it with NaN so that memory a kernel forgot to write shows."""
    if poison:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def triton_kernel_spec(inner_model: str, label: str, fused: ModuleType) -> KernelSpec:
    """The registration of one Triton TTT kernel package (its ``fused`` host module).

    ``verify`` combines the checks every Triton TTT kernel shares with the package's own check that
    its kernels were built in the Triton mode (compiled or interpreted) the device needs.
    """
    name = f"triton_ttt_{inner_model}"

    def verify(inputs: KernelInputs) -> str | None:
        reason = verify_common(inputs, fused.MAX_HEAD_DIM, name)
        return reason if reason is not None else fused.CHECKS.mode_mismatch(inputs.device)

    verify.__doc__ = (
        f"``None`` when the Triton {label} kernel can run on ``inputs``, else the reason it cannot."
    )
    return KernelSpec(
        name=name,
        inner_model=inner_model,
        inner_loss="reconstruction",
        update_rule="dual_form",
        forward=fused.forward,
        verify=verify,
        decode=fused.decode,
        priority=10,
        description=f"Fused Triton dual form for {label}: weights on chip, checkpointed recompute backward.",
    )
