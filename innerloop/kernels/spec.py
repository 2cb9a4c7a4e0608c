"""The contract between update rules and fast paths (kernels).

A kernel computes the same numbers as a pure-torch reference for one combination of
(inner model, inner loss, update rule), on whole mini-batches that start at a mini-batch
boundary with no pending gradients. The update rule asks the registry for the best kernel whose
``verify`` accepts the inputs and falls back to torch otherwise; the reason a kernel was refused is
kept so that users can read why (``TTTLayer.last_dispatch``).

Tensor conventions for a chunk kernel (``forward``), per batch ``B``, head ``H``, length ``T``
(a multiple of the mini-batch size ``K``) and head dim ``f``:

- ``xq, xk, xv``: ``[B, H, T, f]`` the views (RoPE already applied to ``xq``, ``xk``);
- ``lr``: ``[B, H, T]`` the per-token inner learning rate (``base_lr * sigmoid(gate) / f``, masked);
- ``tau``: ``[K]`` the token-index scale, already clamped at 0;
- ``params``: dict of the inner model's weights with batch dims, e.g. ``W1 [B, H, f, f]``,
  ``b1 [B, H, 1, f]`` (and ``W2``, ``b2`` for the MLP);
- ``ln_weight, ln_bias``: ``[H, f]`` the inner LayerNorm; ``eps`` its epsilon.

It returns ``(out [B, H, T, f], new_params)`` where ``out = xq + LN(g(xq; W_i))`` per token and
``new_params`` are the weights after the last mini-batch.

The call signatures are the Protocols :class:`KernelForward` and :class:`KernelDecode`: a kernel's
functions take exactly these parameter names, in this order (dispatch passes them by keyword), and any
further parameter of theirs has a default. :class:`KernelSpec` checks this when it is built.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from innerloop.core.functional import as_integer
from innerloop.core.protocol import AffineLayer, Params


class KernelForward(Protocol):
    """A chunk kernel: whole mini-batches from a boundary, no pending gradients (module docstring)."""

    def __call__(
        self,
        xq: torch.Tensor,  # [B, H, T, f]
        xk: torch.Tensor,  # [B, H, T, f]
        xv: torch.Tensor,  # [B, H, T, f]
        lr: torch.Tensor,  # [B, H, T]
        tau: torch.Tensor,  # [K]
        params: Params,  # the weights at the first mini-batch's start, with batch dims
        ln_weight: torch.Tensor,  # [H, f]
        ln_bias: torch.Tensor,  # [H, f]
        eps: float,
    ) -> tuple[torch.Tensor, Params]:  # (out [B, H, T, f], weights after the last mini-batch)
        ...


class KernelDecode(Protocol):
    """One token per sequence with the pending-gradient state (see :class:`KernelSpec`)."""

    def __call__(
        self,
        xq: torch.Tensor,  # [B, H, f]
        xk: torch.Tensor,  # [B, H, f]
        xv: torch.Tensor,  # [B, H, f]
        lr: torch.Tensor,  # [B, H]
        tau_i: torch.Tensor,  # 0-d: this token's scale
        params: Params,  # the mini-batch's starting weights
        pending: Params,  # the lr-weighted gradient sums of the mini-batch so far
        ln_weight: torch.Tensor,  # [H, f]
        ln_bias: torch.Tensor,  # [H, f]
        eps: float,
        is_last: bool,  # the token closes its mini-batch: commit the weights, reset the sums
    ) -> tuple[torch.Tensor, Params, Params]:  # (out [B, H, f], params, pending)
        ...


def protocol_parameters(protocol: type) -> tuple[str, ...]:
    """The parameter names of a call Protocol's ``__call__``, in order (without ``self``)."""
    return tuple(inspect.signature(protocol.__call__).parameters)[1:]


def signature_mismatch(function: Callable, protocol: type) -> str | None:
    """Why ``function`` does not take ``protocol``'s parameters, or None when it does.

    It must accept ``protocol``'s parameters by these names and in this order (by position or by
    keyword), and give every further parameter of its own a default.
    """
    expected = protocol_parameters(protocol)
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):  # a builtin without a readable signature: cannot be checked here
        return None
    by_position = (inspect.Parameter.POSITIONAL_OR_KEYWORD,)
    names = [p.name for p in parameters[: len(expected)] if p.kind in by_position]
    if tuple(names) != expected:
        got = ", ".join(p.name for p in parameters)
        return f"takes ({got}); expected the parameters ({', '.join(expected)}) first, in this order"
    without_default = [
        p.name
        for p in parameters[len(expected) :]
        if p.default is inspect.Parameter.empty
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    if without_default:
        return f"has further parameters without a default: {without_default}"
    return None


def takes_keyword(function: Callable, name: str) -> bool:
    """Whether ``function`` accepts the keyword argument ``name`` (True when its signature is unreadable)."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return True
    by_name = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return any(
        p.kind is inspect.Parameter.VAR_KEYWORD or (p.name == name and p.kind in by_name) for p in parameters
    )


def names_parameter(function: Callable, name: str) -> bool:
    """Whether ``function``'s signature names the parameter ``name`` itself (not through ``**kwargs``);
    False when its signature is unreadable. For optional arguments only the functions written for them get."""
    try:
        return name in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


def double_backward_message(path: str, why: str | None = None) -> str:
    """The error of a ``create_graph=True`` backward through ``path`` (a kernel's name, or words for it),
    which is differentiable once only (``why``: the reason, when worth saying); the way out is the same
    on every path."""
    because = f" ({why})" if why else ""
    return (
        f"{path} is differentiable once only{because}; pass needs_double_backward=True to the TTTLayer or "
        "ops.scan (or kernel='torch') to take gradients of gradients (in a language model, on each TTT "
        "layer: `for block in model.blocks: block.mixer.needs_double_backward = True`, or "
        "model.ttt.kernel=torch)"
    )


@dataclass(frozen=True)
class KernelInputs:
    """What a kernel's ``verify`` may look at to decide whether it can run."""

    device: torch.device
    dtype: torch.dtype
    head_dim: int
    mini_batch_size: int
    num_tokens: int
    requires_grad: bool
    needs_double_backward: bool = False
    extra: dict = field(default_factory=dict)


#: Kernel names a plugin may not take: ``TTTLayer(kernel=...)`` reads them as its own paths (the
#: same names as ``innerloop.core.layer.BUILT_IN_PATHS``).
RESERVED_KERNEL_NAMES: tuple[str, ...] = ("auto", "torch")


@dataclass(frozen=True)
class KernelSpec:
    """A registered fast path.

    ``verify(inputs) -> str | None`` returns ``None`` when the kernel can run on these inputs,
    otherwise a human-readable reason why not. Higher ``priority`` wins among kernels that verify.
    ``forward`` is a :class:`KernelForward`. ``decode`` (optional, a :class:`KernelDecode`) handles
    one token with the pending-gradient state, returning ``(out [B, H, f], params, pending)``; it is
    asked for with ``inputs.extra["decode"] = True`` and ``num_tokens = 1``. Building a spec whose
    functions do not take the Protocols' parameters raises ``TypeError``.

    ``supports_decay``: ``forward`` also takes ``decay`` (``[B, H, T]``, each token's forgetting
    ``1 - a_t``, as in :func:`innerloop.core.scan.run_scan`), passed by keyword only when a block
    decays (building a spec with it whose ``forward`` takes no ``decay`` raises ``TypeError``);
    dispatch refuses a decaying block to a kernel without it, and to every ``decode``.
    No kernel contract carries the ``momentum`` rule's state: dispatch refuses its blocks to every kernel.

    ``fuses_inner_norm``: the kernel computes the wrapped inner model ``f(x) = x + LN(g(x))``, so
    dispatch refuses it to layers that turn the inner residual or LayerNorm off. A kernel of the bare
    ``g`` (the delta rule's ``x W``) sets it False and says which wrappings it takes in
    ``check_wrapping``.

    ``check_wrapping(inner_norm, inner_residual) -> str | None`` (optional): None when the kernel computes
    a layer with that inner wrapping, else why not (``delta_chunk``: both off only). Like
    ``check_mini_batch_size``, a layer naming the kernel asks it at construction (and at
    ``layer.kernel = ...``, ``innerloop.ops.scan``); the kernel's ``verify`` should give the same answer.

    ``check_mini_batch_size(K) -> str | None`` (optional): None when the kernel runs mini-batches of ``K``
    tokens, else why not (``delta_chunk``: ``K = 1`` only). A layer naming the kernel asks it at
    construction (and at ``layer.kernel = ...``, ``innerloop.ops.scan``), refusing the layer with that
    reason, rather than at its first step; the kernel's ``verify`` should give the same answer.

    ``training_only``: a path that only speeds up training (``compiled_torch_*``). A layer that forces
    it by name uses it for blocks that record an autograd graph; blocks that do not (inference, prefill,
    decoding) are dispatched as under ``kernel="auto"``, and the reason says so. ``kernel="auto"`` may
    choose it (by priority) for blocks that record a graph, never for the others. Its ``forward`` must
    still run without a graph, for a caller that calls it directly.

    The name must be a non-empty str and may not be ``"auto"`` or ``"torch"``
    (:data:`RESERVED_KERNEL_NAMES`), and ``priority`` must be an int: building a spec that breaks
    either raises.
    """

    name: str
    inner_model: str
    inner_loss: str
    update_rule: str
    forward: KernelForward
    verify: Callable[[KernelInputs], str | None]
    decode: KernelDecode | None = None
    priority: int = 0
    description: str = ""
    supports_decay: bool = False
    fuses_inner_norm: bool = True
    training_only: bool = False
    check_mini_batch_size: Callable[[int], str | None] | None = None
    check_wrapping: Callable[[bool, bool], str | None] | None = None

    def __post_init__(self) -> None:
        self._check_fields()
        checks = [("forward", self.forward, KernelForward)]
        if self.decode is not None:
            checks.append(("decode", self.decode, KernelDecode))
        for field_name, function, protocol in checks:
            if not callable(function):
                raise TypeError(f"KernelSpec {self.name!r}: {field_name} must be callable, got {function!r}")
            reason = signature_mismatch(function, protocol)
            if reason is not None:
                raise TypeError(
                    f"KernelSpec {self.name!r}: {field_name} {reason} (see {protocol.__name__} in "
                    "innerloop/kernels/spec.py)"
                )
        if self.supports_decay and not takes_keyword(self.forward, "decay"):
            raise TypeError(
                f"KernelSpec {self.name!r}: supports_decay=True, but forward takes no 'decay' argument; dispatch "
                "passes decay=[B, H, T] by keyword to a kernel that supports decay"
            )

    def _check_fields(self) -> None:
        """The name is a non-empty str, not one of the layer's own paths; ``priority`` is an integer (kept
        as an int); the flags are bools."""
        if not isinstance(self.name, str) or not self.name.strip():
            raise TypeError(
                f"KernelSpec name must be a non-empty str (what kernel=... asks for it by); got {self.name!r}"
            )
        if self.name in RESERVED_KERNEL_NAMES:
            raise ValueError(
                f"KernelSpec name {self.name!r} is reserved: kernel={self.name!r} selects the layer's own path "
                f"(reserved: {list(RESERVED_KERNEL_NAMES)}), so this kernel could never be asked for by name; "
                "choose another name"
            )
        for field_name in ("inner_model", "inner_loss", "update_rule"):
            value = getattr(self, field_name)
            if not isinstance(value, str) or not value:
                raise TypeError(
                    f"KernelSpec {self.name!r}: {field_name} must be the registered name (a non-empty str) of "
                    f"the {field_name.replace('_', ' ')} it computes; got {value!r}"
                )
        priority = as_integer(self.priority)
        if priority is None:
            raise TypeError(
                f"KernelSpec {self.name!r}: priority must be an int (higher wins among kernels that verify); "
                f"got {type(self.priority).__name__} {self.priority!r}"
            )
        object.__setattr__(self, "priority", priority)  # a numpy integer is kept as the int it is
        for field_name in ("supports_decay", "fuses_inner_norm", "training_only"):
            if not isinstance(getattr(self, field_name), bool):
                raise TypeError(
                    f"KernelSpec {self.name!r}: {field_name} must be a bool; got {getattr(self, field_name)!r}"
                )


def check_kernel_output(
    kernel: KernelSpec, xq: torch.Tensor, params: Params, out: torch.Tensor, new_params: Params
) -> None:
    """A kernel's outputs have the contract's shapes, dtypes and device (``out`` as ``xq``, the same
    weights as ``params``; for ``decode``, ``xq`` is the token's ``[B, H, f]`` and ``params`` holds the
    pending sums too): no values read, so a broken plugin fails here, naming itself and what it returned,
    not later in a raw torch error or silently."""
    if not isinstance(out, torch.Tensor) or out.shape != xq.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise RuntimeError(
            f"kernel {kernel.name!r} returned outputs {got}; the contract is xq's shape {tuple(xq.shape)}"
        )
    expected = {k: tuple(v.shape) for k, v in params.items()}
    got_params = (
        {
            k: tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            for k, v in new_params.items()
        }
        if isinstance(new_params, dict)
        else type(new_params).__name__
    )
    if got_params != expected:
        raise RuntimeError(
            f"kernel {kernel.name!r} returned weights {got_params}; the contract is the weights it was given, {expected}"
        )
    returned = {"outputs": (out, xq), **{f"weights[{k!r}]": (new_params[k], v) for k, v in params.items()}}
    for what, (got, given) in returned.items():
        if got.dtype != given.dtype or got.device != given.device:
            raise RuntimeError(
                f"kernel {kernel.name!r} returned {what} as {got.dtype} on {got.device}; the contract is the "
                f"dtype and device of what it was given, {given.dtype} on {given.device}"
            )


def check_stack_kernel_inputs(
    kernel_name: str,
    stack: tuple[AffineLayer, ...],
    xq: torch.Tensor,
    xk: torch.Tensor,
    xv: torch.Tensor,
    lr: torch.Tensor,
    tau: torch.Tensor,
    params: Params,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
) -> None:
    """A :class:`KernelForward`'s arguments for a stack model of ``stack`` have the contract's shapes:
    ``xq``, ``xk``, ``xv`` ``[B, H, T, f]``, ``lr`` ``[B, H, T]``, ``tau`` ``[K]`` with ``K`` dividing ``T``,
    ``ln_weight`` / ``ln_bias`` ``[H, f]``, each layer's weight ``[B, H, in, out]`` (from ``f`` to ``f``) and
    bias ``[B, H, 1, out]``; else a ValueError naming ``kernel_name``, the argument, what it got and what
    is valid (for a caller of the kernel's forward itself: dispatch passes only such blocks)."""

    def refuse(name: str, got: torch.Tensor, valid: str) -> None:
        raise ValueError(f"kernel {kernel_name!r}: {name} must be {valid}, got shape {list(got.shape)}")

    if xq.dim() != 4:
        refuse("xq", xq, "[B, H, T, f]")
    batch, heads, tokens, dim = xq.shape
    for name, tensor, shape in (("xk", xk, xq.shape), ("xv", xv, xq.shape), ("lr", lr, xq.shape[:3])):
        if tensor.shape != shape:
            refuse(name, tensor, f"{list(shape)} (from xq)")
    if tau.dim() != 1 or tau.shape[0] == 0 or tokens % tau.shape[0] != 0:
        refuse("tau", tau, f"[K] with K (the mini-batch size) dividing xq's {tokens} tokens")
    for name, tensor in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if tensor.shape != (heads, dim):
            refuse(name, tensor, f"[H, f] = {[heads, dim]} (from xq)")
    width = dim
    for layer in stack:
        weight = params[layer.weight]
        if weight.dim() != 4 or weight.shape[:3] != (batch, heads, width):
            refuse(
                f"params[{layer.weight!r}]",
                weight,
                f"[B, H, in, out] with [B, H, in] = {[batch, heads, width]}",
            )
        width = weight.shape[-1]
        if layer.bias is not None and params[layer.bias].shape != (batch, heads, 1, width):
            refuse(
                f"params[{layer.bias!r}]", params[layer.bias], f"[B, H, 1, out] = {[batch, heads, 1, width]}"
            )
    if width != dim:
        refuse(
            f"params[{stack[-1].weight!r}]", params[stack[-1].weight], f"[B, H, in, f] with f = {dim}, xq's"
        )


def stack_kernel_spec(path: str, model_name: str, **fields: Any) -> KernelSpec:
    """The registration of a fast path for a stack inner model under the reconstruction loss and the
    dual form, named ``<path>_<model_name>`` (as the built-in stack paths are); ``fields`` are the
    rest of :class:`KernelSpec`'s (``forward``, ``verify``, ``priority``, ...)."""
    return KernelSpec(
        name=f"{path}_{model_name}",
        inner_model=model_name,
        inner_loss="reconstruction",
        update_rule="dual_form",
        **fields,
    )


__all__ = [
    "KernelDecode",
    "KernelForward",
    "KernelInputs",
    "RESERVED_KERNEL_NAMES",
    "KernelSpec",
    "check_kernel_output",
    "check_stack_kernel_inputs",
    "double_backward_message",
    "protocol_parameters",
    "signature_mismatch",
    "stack_kernel_spec",
    "names_parameter",
    "takes_keyword",
]
