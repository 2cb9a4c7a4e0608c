"""``TTTLayer``: the generic test-time-training layer.

Data through one call (``B`` batch, ``T`` tokens, ``D`` hidden, ``H`` heads, ``f = D / H``)::

    x [B, T, D]
      -> views XQ, XK, XV [B, H, T, f]   (projections; share_qk: one projection + two causal convs;
                                          RoPE on XQ, XK at position t mod K, interleaved pairs)
      -> inner lr [B, H, T]              (base_lr * sigmoid(x . w_h + c_h) / f)
         tau [K]                         (max(0, 1 / (i + 1) + delta_i))
      -> update rule: inner outputs f(XQ_t; W_t) [B, H, T, f] and the new state
      -> post-norm (LayerNorm(D)), optional gate gelu_tanh(g_proj(x)), o_proj -> y [B, T, D]

The inner model, inner loss and update rule are plugins resolved by name through the registry
(or passed as instances). Defaults and parameter layout equal the reference implementation
(test-time-training/ttt-lm-pytorch), so its weights load one to one (``innerloop.interop``).
"""

from __future__ import annotations

import inspect
import math
import numbers
import os
import threading
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch._C._functorch import is_functorch_wrapped_tensor

from innerloop.core.callers import warning_stacklevel
from innerloop.core.eager import run_eagerly
from innerloop.core.functional import (
    MAX_ROPE_THETA,
    LayerNorm,
    apply_rope_interleaved,
    causal_depthwise_conv,
    check_positive_int,
    decay_from_log,
    gate_sigmoid,
    is_flag,
    is_integer,
    rope_cos_sin,
    rope_inverse_frequencies,
)
from innerloop.core.identity import identity_label, registered_mismatch
from innerloop.core.protocol import (
    InnerLoss,
    InnerModel,
    InnerTask,
    UpdateRule,
    Views,
    check_stack_on_random_weights,
    no_kernel_reason,
)
from innerloop.core.scan import model_refusal, run_scan, run_scan_without_autocast
from innerloop.core.state import StateSignature, TTTState, inner_output_label
from innerloop.core.wording import a_type

NON_FINITE_POLICIES = ("raise", "ignore")
# Inputs this large (|x|) may overflow a float32 inner scan through the projections and the inner
# model's products; below it, with the inner weights moderate, a non-finite output is blamed on the
# plugins, not on overflow.
LARGE_INPUT = 1e4
LOW_PRECISION = (torch.float16, torch.bfloat16)
# A non-finite output's diagnosis rereads the call in at most this many pieces (TTTLayer._check_output).
DIAGNOSIS_PIECES = 16
# Inner weights that grew by more than this factor (over the larger of 1 and their size at the start
# of the call) before a non-finite output diverged there: the diagnosis says so, below the overflow.
DIVERGED_GROWTH = 1e6
# The layer builds [K, K] matrices per head and mini-batch (the dual form's causal products) and
# [K] tables (tau, RoPE positions): beyond this they are too large to be a mini-batch size.
MAX_MINI_BATCH_SIZE = 65536
BUILT_IN_PATHS = ("auto", "torch")

# Under torch.compile the inner scan runs eagerly, outside the compiled graph: it is a Python loop
# over mini-batches (dynamo would unroll it, compiling for minutes at T / K = 128 and again for every
# length), its paths are already fused (the fused torch dual form, the compiled CPU kernel, Triton),
# and the CPU kernel is a ctypes call dynamo cannot trace. The projections, norms and gates around it
# compile (TTTLayer._run_scan_recorded). The argument and finiteness checks run eagerly too: they read
# tensor values to decide.

_CALLS_IN_PROGRESS = threading.local()
"""Per thread, ``by_layer``: ``{id(layer): the dispatch record of that layer's call in progress}``, so
that a call another thread makes meanwhile records into its own list (:attr:`TTTLayer.dispatches`)."""


def _calls_in_progress() -> dict[int, list[tuple[str, str]]]:
    calls = getattr(_CALLS_IN_PROGRESS, "by_layer", None)
    if calls is None:
        calls = _CALLS_IN_PROGRESS.by_layer = {}
    return calls


def _resolve(kind: str, value: Any, expected: type) -> Any:
    """A plugin instance from a registered name, or the instance itself."""
    if isinstance(value, expected):
        return value
    if isinstance(value, str):
        from innerloop.registry import get_registry  # late import: core must not depend on registry

        return get_registry().get(kind, value)
    given = (
        f"the class {value.__name__} itself; pass an instance, {value.__name__}()"
        if isinstance(value, type)
        else type(value).__name__
    )
    raise TypeError(
        f"{kind}: expected a registered name (str) or an {expected.__name__} instance, got {given}"
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """A finite real argument: an int, a float or any other ``numbers.Real`` (``numpy.float32``), not a
    bool (nor ``numpy.bool_``, which is no ``numbers.Real``) and not a tensor."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float (10**400)
        return False


def _tensor_hint(value: Any) -> str:
    """What an error about a real option adds when it was given a tensor (``tensor(0.5)`` would otherwise
    read as a valid number refused): that a tensor is not taken, and what to pass."""
    return " (a tensor: pass a Python number, float(t))" if isinstance(value, torch.Tensor) else ""


MAX_CONV_KERNEL = 1024
"""The largest ``conv_kernel`` a layer takes (its convolutions are short: 4 by default)."""

DEFAULT_CONV_KERNEL = 4
"""``conv_kernel``'s default (the reference's): another value without ``share_qk`` is warned of."""


class ModelTooLargeError(ValueError):
    """A model or layer whose weights alone cannot fit in this machine's memory (:func:`check_weights_fit`)."""


CGROUP_MEMORY_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")
"""Where a container's memory limit is read (cgroup v2, then v1); ``max`` or a huge number: none."""


def memory_size(count_bytes: float) -> str:
    """``count_bytes`` for a message, in the largest unit that keeps a digit before the point: GiB, MiB,
    KiB, or bytes (``'1.5 GiB'``, ``'12.0 MiB'``, ``'900 bytes'``); never ``'0.0 GiB'`` for a small amount."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count_bytes >= size:
            return f"{count_bytes / size:,.1f} {unit}"
    return f"{int(count_bytes):,} bytes"


def machine_memory_bytes() -> int | None:
    """The memory this process may use, in bytes: ``/proc/meminfo``'s MemTotal + SwapTotal (else the
    physical pages), or the container's cgroup limit where that is lower; None where none can be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            kib = dict(line.split(":", 1) for line in meminfo if ":" in line)
        total = sum(int(kib[k].split()[0]) * 1024 for k in ("MemTotal", "SwapTotal") if k in kib)
    except (OSError, ValueError):
        try:
            total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            return None
    limits = [total]
    for path in CGROUP_MEMORY_LIMITS:
        try:
            with open(path, encoding="ascii") as limit:
                limits.append(int(limit.read().strip()) + _cgroup_swap_bytes(path))
        except (OSError, ValueError):  # absent, or 'max'
            continue
    return min(limits)


def device_memory_bytes(device: torch.device) -> int | None:
    """The memory a run on ``device`` may use: RAM and swap (or the container's limit) on the CPU, the
    card's memory on CUDA; None where it cannot be told."""
    if device.type == "cpu":
        return machine_memory_bytes()
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return None


def _cgroup_swap_bytes(limit_path: str) -> int:
    """The swap a cgroup v2 group may use beside its ``memory.max`` (``memory.swap.max`` in the same
    folder; 0 for v1, whose limit file is not ``memory.max``, or where none is readable): swap counts in
    MemTotal + SwapTotal, so leaving it out of the container's bound refused a model that fits there.
    ``max`` (unlimited) is the host's swap, which that total counts already: no bound from the cgroup."""
    if os.path.basename(limit_path) != "memory.max":
        return 0
    try:
        with open(os.path.join(os.path.dirname(limit_path), "memory.swap.max"), encoding="ascii") as swap:
            text = swap.read().strip()
    except OSError:
        return 0
    return 2**63 if text == "max" else int(text)


def check_weights_fit(
    count: int, what: str, device: torch.device | None = None, dtype: torch.dtype | None = None
) -> None:
    """Raise :class:`ModelTooLargeError` naming ``what`` when ``count`` weights (a lower bound of a
    model's or layer's parameters) of ``dtype`` on ``device`` (default: torch's default device and
    dtype) need more than this machine's memory (RAM and swap): built on the CPU, such a model
    allocated until the allocator or the out-of-memory killer stopped it. On another device (the meta
    device allocates nothing; CUDA's allocator refuses at once) nothing is checked."""
    device = torch.get_default_device() if device is None else torch.device(device)
    dtype = torch.get_default_dtype() if dtype is None else dtype
    memory = machine_memory_bytes() if device.type == "cpu" else None
    width = torch.empty((), dtype=dtype, device="meta").element_size()
    if memory is None or count * width <= memory:
        return
    name = str(dtype).removeprefix("torch.")
    raise ModelTooLargeError(
        f"{what} has at least {count:,} parameters: {memory_size(count * width)} of {name} weights "
        f"alone, more than this machine's {memory_size(memory)} of memory (RAM and swap); give smaller "
        "sizes (innerloop params counts a config's parameters without building it)"
    )


@run_eagerly("innerloop: the input checks read tensor flags")  # as the layer's input checks
def check_input_recordable(tensor: torch.Tensor, module: nn.Module, name: str, owner: str) -> None:
    """Refuse, naming ``name``, an input of ``module`` (the ``owner``: "layer", "model") made under
    ``torch.inference_mode`` in a call that records a graph (grad enabled, some parameter of ``module``
    requires grad): torch cannot save it for backward, and says so in a bare RuntimeError from deep
    inside the call. ``module`` is what reads the input itself (a model's embedding: with it frozen,
    nothing saves the ids, and such a call trains the rest). Reads no value: no device sync."""
    if (
        torch.is_grad_enabled()
        and tensor.is_inference()
        and any(p.requires_grad for p in module.parameters())
    ):
        raise ValueError(_unrecordable_message(name, owner))


def raise_if_unrecordable(err: RuntimeError, tensor: torch.Tensor, name: str, owner: str) -> None:
    """Raise the ``ValueError`` of :func:`check_input_recordable` from torch's bare ``err`` when it says
    that ``tensor``, an inference tensor, could not be saved for backward: used where which parameters
    read the input cannot be told before the call (a layer's projections, gates, plugins' modules), so
    that a call whose parameters that read it are all frozen is not refused."""
    if tensor.is_inference() and "Inference tensors cannot be saved for backward" in str(err):
        raise ValueError(_unrecordable_message(name, owner)) from err


def _unrecordable_message(name: str, owner: str) -> str:
    return (
        f"{name} is an inference tensor (made under torch.inference_mode), which autograd cannot save for "
        f"backward, and this call records a graph (grad is enabled and the {owner}'s parameters require "
        f"grad): run the call under torch.no_grad() or torch.inference_mode(), or pass {name}.clone() "
        "called outside inference mode (a copy that is a normal tensor)"
    )


def check_head_split(hidden_size: int, num_heads: int, *, rotary: bool) -> None:
    """``num_heads`` must divide ``hidden_size`` into heads, of an even width where the layer applies RoPE
    (``rotary``: it rotates pairs of channels); the error lists the head counts the layer takes."""
    head_dim, rest = divmod(hidden_size, num_heads)
    if rest == 0 and not (rotary and head_dim % 2):
        return
    if rest:
        problem = f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})"
    else:
        problem = f"head_dim = hidden_size / num_heads = {head_dim} must be even (RoPE rotates pairs)"
    if hidden_size > _HEAD_COUNTS_UP_TO:  # listing them would take seconds; no machine holds such a layer
        raise ValueError(
            f"{problem}; num_heads must divide it" + (" into heads of an even width" if rotary else "")
        )
    valid = head_counts(hidden_size, rotary=rotary)
    if not valid:  # an odd width has no even head width
        raise ValueError(f"{problem}; no num_heads splits an odd hidden_size into heads of an even width")
    listed = ", ".join(map(str, valid[:_HEAD_COUNTS_LISTED])) + (
        ", ..." if len(valid) > _HEAD_COUNTS_LISTED else ""
    )
    raise ValueError(f"{problem}; valid num_heads for this width: [{listed}]")


def check_inner_norm_width(
    hidden_size: int, num_heads: int, inner_norm: bool, *, rotary: bool, prefix: str = ""
) -> None:
    """Heads of one feature cannot take the inner LayerNorm: a LayerNorm over one feature outputs its bias
    whatever the inner model holds, so the memory would never be read and its inner gradient would be 0 (a
    layer that silently does no test-time training). The error lists the head counts that give heads of
    2 or more features (``prefix``: how the caller names the two sizes, ``"model."`` for a config)."""
    if not inner_norm or hidden_size // num_heads != 1:
        return
    valid = [h for h in head_counts(hidden_size, rotary=rotary) if hidden_size // h >= 2]
    choice = f"use a {prefix}hidden_size of 2 or more"
    if valid:
        choice = f"valid num_heads for this width: {valid[:_HEAD_COUNTS_LISTED]}"
    raise ValueError(
        f"an inner LayerNorm (inner_norm=True, and always in Titans) needs heads of 2 or more features, got "
        f"{prefix}hidden_size / {prefix}num_heads = {hidden_size} / {num_heads} = 1: a LayerNorm over one "
        f"feature outputs its bias whatever the inner model holds (the memory is never read and gets no inner "
        f"gradient); {choice}"
    )


_HEAD_COUNTS_LISTED = 24
"""How many of the valid head counts an error lists, smallest first (a width of 2**31 - 1 has few, one of
720720 has 240)."""

_HEAD_COUNTS_UP_TO = 2**40
"""The widest ``hidden_size`` whose head counts an error lists (2**20 steps to find them)."""


def head_counts(hidden_size: int, *, rotary: bool) -> list[int]:
    """Every ``num_heads`` that splits ``hidden_size`` into heads, of an even width where ``rotary`` (RoPE
    rotates pairs), smallest first: the width's divisors, found in O(sqrt(hidden_size)) steps (a loop to
    ``hidden_size`` took minutes for a width of 2**31 - 1, and for longer ones never ended)."""
    small = [d for d in range(1, math.isqrt(hidden_size) + 1) if hidden_size % d == 0]
    divisors = small + [hidden_size // d for d in reversed(small) if d * d != hidden_size]
    return [h for h in divisors if not (rotary and (hidden_size // h) % 2)]


CALL_OPTIONS = ("base_lr", "non_finite", "inference_chunk_size", "needs_double_backward", "kernel")
"""The constructor options a layer reads at every call, which may be changed on a built layer: a new
value is checked as the constructor checks it (:func:`checked_call_option`)."""


def checked_call_option(name: str, value: Any) -> Any:
    """``value`` of the call option ``name`` (:data:`CALL_OPTIONS`) as the layer keeps it, after the
    constructor's check: one error naming the option, the value and what is valid."""
    if name == "base_lr":
        if not is_real(value) or value < 0:
            raise ValueError(f"base_lr must be a finite number >= 0, got {value!r}{_tensor_hint(value)}")
        return float(value)
    if name == "non_finite":
        if not isinstance(value, str) or value not in NON_FINITE_POLICIES:
            raise ValueError(f"non_finite must be one of {NON_FINITE_POLICIES}, got {value!r}")
        return value
    if name == "inference_chunk_size":
        check_positive_int("inference_chunk_size", value, none_allowed=True)
        return None if value is None else int(value)
    if name == "needs_double_backward":
        if not is_flag(value):
            raise TypeError(f"needs_double_backward must be True or False, got {value!r}")
        return bool(value)
    if not isinstance(value, str):  # kernel: a registered name is checked at dispatch, as at construction
        raise ValueError(f"kernel must be 'auto', 'torch' or a registered kernel name, got {value!r}")
    return value


PLUGIN_OPTIONS = ("inner_model", "inner_loss", "update_rule")
"""A TTT layer's options that hold the plugin objects it resolved (named in messages by their names)."""


def refuse_built_option_change(module: nn.Module, name: str, value: Any, plugins: Sequence[str] = ()) -> Any:
    """``AttributeError`` naming ``module``'s option ``name``, read only when it was built (its modules,
    parameters and tables are made from it), unless ``value`` is what it holds already (see
    :func:`_holds_already`; for one of ``plugins``, that very object or a name registered for it), for
    which the value held is returned, to keep: set, another value would be ignored, half applied or fail at the next call. An
    option the module does not hold yet (a subclass's, set after its parent is built) is returned as
    given. For a module's ``__setattr__`` once it is built."""
    now = getattr(module, name, _NOT_HELD)
    if now is _NOT_HELD:
        return value
    if value is now or (name not in plugins and _holds_already(value, now)):
        return now
    if name in plugins and _names_plugin(name, value, now):
        return now
    cls, shown = type(module).__name__, now.name if name in plugins else now
    raise AttributeError(
        f"{cls}.{name} is fixed when the layer is built (its modules, parameters and tables are made "
        f"from it; now {shown!r}): set to {value!r} it would be ignored, half applied or fail at the next "
        f"call. Build a new layer, {cls}(..., {name}={value!r}), and load this one's state_dict where "
        "the shapes agree"
    )


_NOT_HELD = object()


def _names_plugin(kind: str, value: Any, plugin: Any) -> bool:
    """Whether ``value`` is a registered name of ``kind`` under which ``plugin`` itself is registered
    (``layer.inner_model = "linear"`` on a layer holding the registered ``linear``: nothing to change)."""
    if not isinstance(value, str):
        return False
    from innerloop.registry import get_registry  # late import: core must not depend on registry

    try:
        return get_registry().get(kind, value) is plugin
    except ValueError:  # an unknown or clashing name: the refusal names the option
        return False


def _holds_already(value: Any, now: Any) -> bool:
    """Whether ``value`` is the option value ``now``, as the constructor would keep it: for an int held,
    an equal integer (numpy's too; not a float, which the constructor refuses), for a float held an
    equal real number (``rope_theta = 10000`` where it holds ``10000.0``), else an equal value of its
    type (a str), for a bool held an equal flag (numpy's too, which the constructor takes)."""
    if isinstance(now, bool):
        return is_flag(value) and bool(value) == now
    if not isinstance(now, (int, float)):
        return type(value) is type(now) and value == now
    kind = numbers.Integral if isinstance(now, int) else numbers.Real
    return isinstance(value, kind) and not isinstance(value, bool) and value == now


def _check_arguments(args: dict[str, Any], *, rotary: bool = True, conv_needs_share_qk: bool = True) -> None:
    """One clear error per bad constructor argument: its name, the value given, what is valid
    (``rotary``: the layer applies RoPE, which needs an even head size; ``conv_needs_share_qk``: its only
    convolutions are those of ``share_qk``)."""
    hidden_size = check_positive_int("hidden_size", args["hidden_size"])
    num_heads = check_positive_int("num_heads", args["num_heads"])
    check_positive_int("conv_kernel", args["conv_kernel"], most=MAX_CONV_KERNEL)
    mini_batch_size = check_positive_int("mini_batch_size", args["mini_batch_size"], most=MAX_MINI_BATCH_SIZE)
    # its projections: q and k (one when shared), v and o, each [hidden_size, hidden_size]; first, so that
    # the head split's error lists the head counts of a width that can be built
    check_weights_fit(3 * hidden_size * hidden_size, f"a layer of hidden_size={hidden_size}")
    check_head_split(hidden_size, num_heads, rotary=rotary)
    if mini_batch_size > MAX_MINI_BATCH_SIZE:
        raise ValueError(
            f"mini_batch_size must be a positive integer <= {MAX_MINI_BATCH_SIZE} (the layer builds [K, K] matrices per "
            f"head and mini-batch), got {mini_batch_size}; the paper uses 16"
        )
    for name in ("use_gate", "share_qk", "inner_norm", "inner_residual"):
        if not is_flag(args[name]):
            raise TypeError(f"{name} must be True or False, got {args[name]!r}")
    check_inner_norm_width(int(hidden_size), int(num_heads), args["inner_norm"], rotary=rotary)
    checked_call_option("needs_double_backward", args["needs_double_backward"])
    checked_call_option("base_lr", args["base_lr"])
    if args["conv_kernel"] > MAX_CONV_KERNEL:
        raise ValueError(
            f"conv_kernel must be a positive integer <= {MAX_CONV_KERNEL} (a short causal convolution; its state keeps "
            f"conv_kernel - 1 inputs of every sequence), got {args['conv_kernel']!r}"
        )
    if conv_needs_share_qk and not args["share_qk"] and args["conv_kernel"] != DEFAULT_CONV_KERNEL:
        warnings.warn(
            f"conv_kernel={args['conv_kernel']} has no effect: the layer's convolutions are those of "
            "share_qk=True (one Q/K projection, then a causal conv for each); without it there are none",
            UserWarning,
            stacklevel=warning_stacklevel(),
        )
    if not is_real(args["rope_theta"]) or not 1 <= args["rope_theta"] <= MAX_ROPE_THETA:
        raise ValueError(
            f"rope_theta must be a finite number >= 1, got {args['rope_theta']!r}"
            f"{_tensor_hint(args['rope_theta'])} (the RoPE base: its frequencies theta^(-2i/head_dim) stay <= 1, so that every angle is finite; "
            f"at most {MAX_ROPE_THETA!r}, float32's largest number, in which they are computed; the paper's is 10000)"
        )
    if not is_real(args["norm_eps"]) or args["norm_eps"] <= 0:
        raise ValueError(
            f"norm_eps must be a finite number in (0, {MAX_NORM_EPS:g}), got {args['norm_eps']!r}"
            f"{_tensor_hint(args['norm_eps'])}"
        )
    check_norm_eps(args["norm_eps"], torch.promote_types(torch.get_default_dtype(), torch.float32))
    for name in ("non_finite", "inference_chunk_size", "kernel"):
        checked_call_option(name, args[name])


MAX_NORM_EPS = 1.0
"""The bound (exclusive) of every norm's epsilon (``norm_eps``, ``model.norm_eps``): it is added to the
mean square (or variance) of the input, and one of 1 or more outweighs that of activations of unit
scale, so the norm no longer normalizes: ``norm_eps=1e30`` scaled every output by 1e-15, silently (the
models' activations start far smaller, ``init_std``). Models use 1e-12 to 1e-5; the default is 1e-6."""

NORM_EPS_BOUND_WHY = "added to the input's mean square, an epsilon of 1 or more outweighs it: no normalizing"


def check_norm_eps(norm_eps: float, scan_dtype: torch.dtype) -> None:
    """Raise naming ``norm_eps`` unless ``norm_eps`` is below :data:`MAX_NORM_EPS` and a normal number of
    ``scan_dtype`` (the dtype of the inner LayerNorm): one that rounds to 0 or to a subnormal there
    leaves the LayerNorm of a constant row dividing 0 by 0, and every output NaN."""
    if float(norm_eps) >= MAX_NORM_EPS:
        raise ValueError(
            f"norm_eps={norm_eps!r} must be < {MAX_NORM_EPS:g} ({NORM_EPS_BOUND_WHY}); the default is 1e-6"
        )
    smallest = torch.finfo(scan_dtype).tiny
    if float(norm_eps) < smallest:
        name = str(scan_dtype).removeprefix("torch.")
        raise ValueError(
            f"norm_eps={norm_eps!r} rounds to 0 or to a subnormal in {name}, the layer's scan dtype (the inner "
            f"LayerNorm of a constant row would divide 0 by 0); valid: a finite number >= {smallest:.2e} in "
            f"{name} (>= {torch.finfo(torch.float64).tiny:.2e} for a float64 layer, built under "
            "torch.set_default_dtype(torch.float64)); the default is 1e-6"
        )


def _check_kernel_name(
    kernel: str,
    model: InnerModel,
    loss: InnerLoss,
    rule: UpdateRule,
    head_dim: int,
    wrapping: tuple[bool, bool],
    mini_batch_size: int | None = None,
) -> None:
    """A kernel named explicitly must exist for this (model, loss, rule), compute its inner wrapping
    ``(inner_norm, inner_residual)`` (its ``check_wrapping``: ``delta_chunk`` runs both off only), run
    ``mini_batch_size`` (its ``check_mini_batch_size``, when both are given: ``delta_chunk`` runs ``K = 1`` only), and the plugins must be the registered ones it was written for;
    the rule must send its blocks to a kernel at all (``no_kernel_reason`` None: a kernel registered for
    ``momentum`` would be refused every block, one for ``minibatch_gd`` never asked): say so at
    construction, not at the first mini-batch (or never).

    What only the kernel's ``verify`` knows is not checked here: a :class:`KernelSpec` does not say
    which mini-batch sizes, devices, dtypes or head dims it takes, nor whether it is twice
    differentiable (``fused_torch_*``, ``cpu_ttt_*``,
    ``compiled_torch_*`` and ``triton_ttt_*`` refuse the blocks that record a graph of a layer built
    with ``needs_double_backward=True``). The first call that sends the kernel such a block raises
    ``KernelUnavailableError`` naming the kernel and its reason."""
    if kernel in BUILT_IN_PATHS:
        return
    from innerloop.registry import get_registry  # late import: core must not depend on registry

    registry = get_registry()
    specs = {k.name: k for k in registry.kernels_for(model.name, loss.name, rule.name)}
    clash = registry.clash_error("kernel", kernel) if isinstance(kernel, str) else None
    if clash is not None:  # two installed plugins provide it: neither is used
        raise clash
    refusal = no_kernel_reason(rule)
    if refusal is not None:  # its blocks never reach a kernel: one registered for it never runs
        raise ValueError(
            f"kernel={kernel!r} cannot run update_rule={rule.name!r}: {refusal}; "
            f"{_kernels_running(model, loss)}; use kernel='auto' or 'torch' with update_rule={rule.name!r}"
        )
    if kernel not in specs:
        raise ValueError(
            f"kernel={kernel!r} is not a kernel for (inner_model={model.name!r}, inner_loss={loss.name!r}, "
            f"update_rule={rule.name!r}); valid values: {[*BUILT_IN_PATHS, *specs]}"
        )
    check_kernel_takes_layer(specs[kernel], wrapping, mini_batch_size)
    for kind, obj in (("inner_model", model), ("inner_loss", loss), ("update_rule", rule)):
        reason = registered_mismatch(kind, obj, head_dim if kind == "inner_model" else None)
        if reason is not None:
            raise ValueError(
                f"kernel={kernel!r} cannot run this layer: {reason}; use kernel='auto' or 'torch'"
            )


def check_kernel_takes_layer(spec: Any, wrapping: tuple[bool, bool], mini_batch_size: int | None) -> None:
    """The kernel ``spec`` computes the inner ``wrapping`` (``fuses_inner_norm``: both on; else its
    ``check_wrapping``) and runs ``mini_batch_size`` (its ``check_mini_batch_size``), or a ValueError."""
    kernel = spec.name
    if spec.fuses_inner_norm and not all(wrapping):
        raise ValueError(
            f"kernel={kernel!r} fuses the inner LayerNorm and residual, which need both on; this layer has "
            f"inner_norm={wrapping[0]}, inner_residual={wrapping[1]}; use kernel='auto' or 'torch'"
        )
    size_check = getattr(spec, "check_mini_batch_size", None)
    refusal = None if size_check is None or mini_batch_size is None else size_check(mini_batch_size)
    if refusal is not None:
        raise ValueError(f"kernel={kernel!r} cannot run mini_batch_size={mini_batch_size}: {refusal}")
    wrapping_check = getattr(spec, "check_wrapping", None)
    refusal = None if wrapping_check is None else wrapping_check(*wrapping)
    if refusal is not None:
        raise ValueError(
            f"kernel={kernel!r} cannot run inner_norm={wrapping[0]}, inner_residual={wrapping[1]}: {refusal}"
        )


def _kernels_running(model: InnerModel, loss: InnerLoss) -> str:
    """Which registered kernels run ``model`` under ``loss``, by update rule (those of rules that send
    their blocks to a kernel), as a clause of a refusal."""
    from innerloop.registry import get_registry  # late import: core must not depend on registry

    registry = get_registry()
    by_rule = {
        name: [spec.name for spec in registry.kernels_for(model.name, loss.name, name)]
        for name in registry.names("update_rule")
        if no_kernel_reason(registry.update_rule(name)) is None
    }
    running = {name: kernels for name, kernels in by_rule.items() if kernels}
    if not running:
        return (
            f"no registered kernel runs (inner_model={model.name!r}, inner_loss={loss.name!r}) under any rule"
        )
    listed = "; ".join(f"update_rule={name!r}: {kernels}" for name, kernels in running.items())
    return f"the kernels that run (inner_model={model.name!r}, inner_loss={loss.name!r}) are {listed}"


def registered_entry(kind: str, obj: Any) -> Any:
    """The registry's entry whose object is ``obj`` itself, else one of ``obj``'s class and name (a copy
    of it: ``copy.deepcopy`` of a layer, ``torch.load`` of a pickled one); None: not registered."""
    from innerloop.registry import get_registry  # late import: core must not depend on registry

    entries = get_registry().entries(kind)
    same = next((e for e in entries if e.obj is obj), None)
    if same is not None:
        return same
    name = getattr(obj, "name", None)
    return next(
        (e for e in entries if type(e.obj) is type(obj) and getattr(e.obj, "name", None) == name), None
    )


def is_built_in(kind: str, obj: Any) -> bool:
    """Whether ``obj`` is one of innerloop's own plugins, registered as such (origin ``builtin:...``)."""
    from innerloop.registry.manager import BUILTIN_PREFIX  # late import: core must not depend on registry

    entry = registered_entry(kind, obj)
    return entry is not None and entry.origin.startswith(BUILTIN_PREFIX)


def plugin_label(kind: str, obj: Any) -> str:
    """``obj`` in words for an error: its kind, name and origin (the plugin that registered it, as
    ``innerloop plugins`` shows it), or its class when it is not the registered object."""
    from innerloop.registry import get_registry  # late import: core must not depend on registry

    entry = registered_entry(kind, obj)
    cls = type(obj)
    if entry is None:
        origin = f"not registered: {cls.__module__}.{cls.__qualname__}"
    else:  # as loaded: -p MODULE for what a -p module's import registered
        origin = f"origin {get_registry().loaded_by(entry.origin)!r}"
    return f"{kind.replace('_', ' ')} {getattr(obj, 'name', '?')!r} ({origin})"


def _check_unregistered_model(model: InnerModel, head_dim: int) -> None:
    """A model instance that is not the registered object itself was not checked by the registrar:
    its ``forward`` must compute its declared ``stack``, or the answer would depend on the update
    rule (the dual form and the stack kernels run the stack, the primal form runs ``forward``)."""
    from innerloop.registry import get_registry  # late import: core must not depend on registry

    registry = get_registry()
    if model.name in registry.names("inner_model") and registry.get("inner_model", model.name) is model:
        return
    try:
        mismatch = check_stack_on_random_weights(model, head_dim)
    except Exception:  # a forward that fails outright: the registrar's checks, next, say how
        return
    if mismatch is not None:
        raise ValueError(
            f"inner_model {model.name!r} ({type(model).__module__}.{type(model).__qualname__}) does not "
            f"compute its declared stack ({mismatch}); make forward return apply_stack(self.stack, params, x) "
            "or declare no stack (subclass InnerModel, not StackModel, and use update_rule='minibatch_gd')"
        )


def _check_model_shape(model: InnerModel, head_dim: int) -> None:
    """``model.forward`` keeps the shape ``[heads, N, f]`` at this layer's head dim (the registrar checks
    one small head dim), and float32's dtype: a model right there only is named here, not by a torch error
    in the scan (or its rule blamed for the dtype of what it returns)."""
    try:
        # zeros of the declared shapes: init_params could draw from the global generator, moving the seed
        params = {k: torch.zeros(1, *shape) for k, shape in model.param_shapes(head_dim).items()}
        x = torch.zeros(1, 2, head_dim)
        with torch.no_grad(), torch.autocast("cpu", enabled=False):  # a layer built under autocast too
            out = model.forward(params, x)
    except Exception:  # a model that fails outright: its first call says how
        return
    if isinstance(out, torch.Tensor) and out.shape != x.shape:
        raise ValueError(
            f"inner_model {model.name!r} ({type(model).__module__}.{type(model).__qualname__}): at this layer's "
            f"head_dim {head_dim}, forward maps [heads, N, f] = {list(x.shape)} to {list(out.shape)}; it must "
            "return the same shape (g maps head_dim features to head_dim features, at every head_dim)"
        )
    if isinstance(out, torch.Tensor) and out.dtype != x.dtype:
        raise ValueError(
            f"inner_model {model.name!r} ({type(model).__module__}.{type(model).__qualname__}): forward returns "
            f"{out.dtype} for {str(x.dtype).removeprefix('torch.')} input and weights; it must compute in its input's dtype (a constant in "
            "forward is made in x's dtype: x.new_tensor(c), or a plain Python number)"
        )


def resolve_plugins(
    inner_model: str | InnerModel,
    inner_loss: str | InnerLoss,
    update_rule: str | UpdateRule,
    kernel: str,
    head_dim: int,
    wrapping: tuple[bool, bool] = (True, True),
    mini_batch_size: int | None = None,
) -> tuple[InnerModel, InnerLoss, UpdateRule]:
    """The plugin instances named, checked to work together and with the kernel named (if any), which
    must compute the inner ``wrapping`` ``(inner_norm, inner_residual)`` and run ``mini_batch_size``
    (None: not asked)."""
    model: InnerModel = _resolve("inner_model", inner_model, InnerModel)
    loss: InnerLoss = _resolve("inner_loss", inner_loss, InnerLoss)
    rule: UpdateRule = _resolve("update_rule", update_rule, UpdateRule)
    _check_unregistered_model(model, head_dim)  # its stack at this layer's head_dim, the clearest message
    from innerloop.registry import check_instance  # late import: core must not depend on registry

    for kind, instance in (("inner_model", model), ("inner_loss", loss), ("update_rule", rule)):
        check_instance(kind, instance)  # a plugin given as an instance meets the registrar's checks
    _check_model_shape(model, head_dim)
    reason = model_refusal(rule, model)
    if reason is not None:
        raise ValueError(f"update_rule={rule.name!r} cannot run inner_model={model.name!r}: {reason}")
    _check_kernel_name(kernel, model, loss, rule, head_dim, wrapping, mini_batch_size)
    return model, loss, rule


def check_layer_arguments(hidden_size: int, num_heads: int, **options: Any) -> None:
    """Raise the error ``TTTLayer(hidden_size, num_heads, **options)`` would raise for its arguments
    (values, plugin names, plugin combinations, kernel name), without building the layer."""
    bound = inspect.signature(TTTLayer.__init__).bind(None, hidden_size, num_heads, **options)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    del arguments["self"]
    _check_arguments(arguments)
    resolve_plugins(
        arguments["inner_model"],
        arguments["inner_loss"],
        arguments["update_rule"],
        arguments["kernel"],
        int(hidden_size) // int(num_heads),
        (bool(arguments["inner_norm"]), bool(arguments["inner_residual"])),
        int(arguments["mini_batch_size"]),
    )


_AUTOCAST_INPUTS = (torch.float32, torch.bfloat16, torch.float16)
"""The dtypes of ``x`` a float32 layer takes under ``torch.autocast`` (which casts float32 and leaves
float64 as it is)."""


def check_device_and_dtype(x: torch.Tensor, weights: torch.Tensor, name: str = "x") -> None:
    """A layer's input ``x`` is on its ``weights``' device and in their dtype (another dtype only under
    ``torch.autocast``); each error names the argument (``name``), what it is and what to do."""
    if x.device != weights.device:
        raise ValueError(
            f"{name} is on {x.device} but the layer's weights are on {weights.device}: move one to the other"
        )
    if x.dtype != weights.dtype and not autocasting(x.device.type):
        raise TypeError(
            f"{name} is {x.dtype} but the layer's weights are {weights.dtype}: cast {name} "
            f"({name}.to({weights.dtype})) or the layer (layer.to({x.dtype})), or run under torch.autocast "
            "for mixed precision"
        )


def _listed(indices: list[int], most: int = 8) -> str:
    """``indices`` as a short list for a message: the first ``most``, then how many more."""
    shown = ", ".join(str(i) for i in indices[:most])
    return shown + (f" and {len(indices) - most} more" if len(indices) > most else "")


class NonFiniteRowsError(ValueError):
    """A call's check found NaN or inf (``non_finite="raise"``): ``rows``, the batch rows (sequences) that
    went non-finite, and ``finite_rows``, those that stayed finite (None where not told). Each row is
    computed on its own and the state given to the call is left as it was, so a caller may run
    ``finite_rows`` again from ``state.index_select(torch.tensor(finite_rows))`` and drop the others
    (a bare :class:`~innerloop.core.state.TTTState` whose ``loss_carry`` is not empty also takes
    ``inner_loss=layer.inner_loss``; a call from ``state=None`` runs them from None again): the message
    says which, as :func:`rerun_recipe`."""

    rows: list[int] | None = None
    finite_rows: list[int] | None = None


def non_finite_rows(batch: int, tensors: Iterable[torch.Tensor]) -> list[int]:
    """The rows (first dimension, of size ``batch``) in which any of ``tensors`` holds NaN or inf;
    tensors of another first size (shared by every row) are left out. Reads the device: for an error."""
    broken = torch.zeros(batch, dtype=torch.bool)
    for tensor in tensors:
        if tensor.dim() and tensor.shape[0] == batch and tensor.numel() and tensor.is_floating_point():
            broken |= ~torch.isfinite(tensor.detach()).reshape(batch, -1).all(1).cpu()
    return broken.nonzero().flatten().tolist()


def rerun_recipe(given_state: object) -> str:
    """How a caller runs a batch's finite rows again after a :class:`NonFiniteRowsError`, from the state
    ``given_state`` it gave the call that raised (None, a layer's or a model's state)."""
    inputs = "their inputs (rows error.finite_rows of the call's input)"
    if given_state is None:
        return f"{inputs} from state=None"
    select = "state.index_select(torch.tensor(error.finite_rows)"
    if getattr(given_state, "loss_carry", None):  # a TTTState whose inner loss carries per-row values
        return (
            f"{inputs} from {select}, inner_loss=layer.inner_loss) (the loss that wrote its loss_carry; a "
            "language model's state passes it itself: state.index_select(rows))"
        )
    return f"{inputs} from {select})"


def with_rows(error: ValueError, batch: int, rows: list[int], given_state: object) -> NonFiniteRowsError:
    """``error`` (a :class:`NonFiniteRowsError`, or a ValueError made one) with ``rows``, the batch rows
    that went non-finite, and the others as ``finite_rows``, named at the end of its message with how to
    run them again from ``given_state``, the state given to the call (:func:`rerun_recipe`)."""
    error = error if isinstance(error, NonFiniteRowsError) else NonFiniteRowsError(*error.args)
    broken = set(rows)
    finite = [row for row in range(batch) if row not in broken]
    error.rows, error.finite_rows = rows, (finite if rows else None)  # None: not told
    if not rows:
        said = (
            "which batch rows went non-finite could not be told: no value of one row alone holds NaN or inf"
        )
    elif finite:
        said = (
            f"batch rows [{_listed(rows)}] of {batch} went non-finite, rows [{_listed(finite)}] stayed "
            "finite: each row is computed on its own and the state given to this call is unchanged, so "
            f"they can run again: {rerun_recipe(given_state)}"
        )
    else:
        said = f"batch rows [{_listed(rows)}] of {batch} went non-finite (every row)"
    error.args = (f"{error.args[0]} [{said}]", *error.args[1:])
    return error


def autocasting(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)``, False for meta tensors (which autocast does not
    know: the query raises "unknown device type for autocast")."""
    return device_type != "meta" and torch.is_autocast_enabled(device_type)


def holds_values(x: torch.Tensor) -> bool:
    """Whether ``x``'s values can be read (checked): not a meta tensor (shapes only) nor a tensor
    inside a torch.func transform (vmap, grad), where reading a value is data-dependent control flow."""
    return x.device.type != "meta" and not is_functorch_wrapped_tensor(x)


def _wide_sum(t: torch.Tensor) -> torch.Tensor:
    """``t``'s sum, a half-precision one in float32 (whose range its own sum would soon leave: 65504 in
    float16). The cheap finiteness test of the layer's checks: a sum is finite iff every element is,
    barring the overflow of huge finite values, which an exact check then settles."""
    return t.sum(dtype=torch.float32) if t.is_floating_point() and t.element_size() < 4 else t.sum()


def _sums_are_finite(state: TTTState) -> torch.Tensor | None:
    """A 0-d bool tensor, True when every tensor of ``state`` has a finite :func:`_wide_sum` (a False may
    also be finite values whose sum overflows, which :meth:`TTTState.finite_flag` settles), not read back
    from the device; None for a state without tensors. One sum per tensor: a tenth of the cost of
    ``isfinite(t).all()`` on a decoded token's state."""
    sums = [_wide_sum(t) for t in state.tensors().values()]
    if not sums:
        return None
    if len({s.dtype for s in sums}) > 1:  # states of mixed dtypes: no single stack of the sums
        return torch.stack([torch.isfinite(s) for s in sums]).all()
    return torch.isfinite(torch.stack(sums)).all()


def _largest_magnitude(state: TTTState) -> float:
    """The largest |value| of a state's inner weights (``params`` and ``pending``), NaN left out and
    inf counted: 0.0 when every value is NaN."""
    largest = 0.0
    for tensor in (*state.params.values(), *state.pending.values()):
        magnitudes = tensor.detach().abs()
        magnitudes = torch.where(torch.isnan(magnitudes), 0.0, magnitudes)
        if magnitudes.numel():
            largest = max(largest, float(magnitudes.max()))
    return largest


def _output_is_scratch(module: nn.Module) -> bool:
    """Whether ``module(x)`` is a fresh tensor nobody else holds: a plain ``nn.Linear`` (not a
    subclass or a wrapper, which may return cached or input tensors) with no forward hooks, local or
    global, that could have kept its output."""
    global_hooks = nn.modules.module._global_forward_hooks
    return type(module) is nn.Linear and not module._forward_hooks and not global_hooks


def _without_token_scale(lr: torch.Tensor, tau: torch.Tensor | None) -> torch.Tensor:
    """``lr`` for an update rule that reads no token scale (``uses_token_scale = False``: momentum), tied
    to ``tau`` with weight 0 where ``tau`` needs a gradient: the same numbers (``x + 0.0 == x``), and the
    parameters ``tau`` is made of (``learnable_token_idx``) get a zero gradient rather than none. DDP
    refuses a trainable parameter no loss reaches ('parameters that were not used in producing the
    loss'); freezing it instead would change the optimizer's parameter groups, which a checkpoint
    written before could then not resume into. A NaN or inf among the unread offsets is tied as 0 (``0.0 *
    inf`` is NaN): it made every output NaN under autograd, where the same layer without autograd, which
    does not tie, gave the finite outputs of a rule that does not read them."""
    if tau is None or not (torch.is_grad_enabled() and tau.requires_grad):
        return lr
    return lr + 0.0 * torch.nan_to_num(tau.sum(), nan=0.0, posinf=0.0, neginf=0.0).to(lr.dtype)


def _log_forgetting_reaches_scan(layer_class: type) -> bool:
    """Whether the scan takes ``layer_class``'s :meth:`TTTLayer.log_forgetting` (its gates with the decay
    as a log) before its :meth:`TTTLayer.forgetting`: yes unless ``forgetting`` is overridden in a class
    below the one that defines ``log_forgetting`` (then that override reaches the scan). Read at each
    call (:meth:`TTTLayer.scan_gates`), so a hook set on a class after it is made
    (``monkeypatch.setattr(MyLayer, "forgetting", f)``) counts as one defined there."""
    order = layer_class.__mro__

    def depth(name: str) -> int:  # the position of the class that defines ``name``
        return next(i for i, cls in enumerate(order) if name in vars(cls))

    return depth("log_forgetting") <= depth("forgetting")


#: What the layer's hooks return (:func:`hook_pair`): ``inner_learning_rates``, ``forgetting``, ``log_forgetting``.
RATE_ENTRIES = ("lr [B, H, T]", "tau [mini_batch_size] or None")
GATE_ENTRIES = ("decay [B, H, T] or None", "momentum [B, H, T] or None")
LOG_GATE_ENTRIES = ("log_a [B, H, T] or None", "momentum [B, H, T] or None")


def layer_hook(layer: nn.Module, name: str) -> Callable[[torch.Tensor], Any]:
    """``layer``'s hook ``name`` (``inner_learning_rates``, ``forgetting``, ``log_forgetting``), refused
    naming it where it is not a function (``layer.forgetting = None`` failed "'NoneType' object is not
    callable")."""
    function = getattr(layer, name)
    if not callable(function):
        raise TypeError(
            f"{type(layer).__name__}.{name} is {'None' if function is None else a_type(function)}, not a "
            f"function of x: set a function on the layer, or delete the attribute (del layer.{name}) to use "
            "its class's"
        )
    return function


def hook_pair(layer: nn.Module, hook: str, entries: tuple[str, str], value: Any) -> tuple[Any, Any]:
    """``value``, what ``layer``'s ``hook`` returned (a gate hook, or ``inner_learning_rates``), as its two
    entries after checking that it is a pair of them: ``entries`` says each (``"lr [B, H, T]"``; ``"... or
    None"`` where None is valid). A float, a bare tensor (unpacked along its batch) or a triple is refused
    naming the hook, not met later as an ``AttributeError``, a shape or an unpacking error inside the layer."""
    what = f"{type(layer).__name__}.{hook}(x) must return a pair ({entries[0]}, {entries[1]})"
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        got = (
            f"a {type(value).__name__} of {len(value)}" if isinstance(value, (tuple, list)) else a_type(value)
        )
        raise TypeError(f"{what}, got {got}")
    for entry, given in zip(entries, value, strict=True):
        if not isinstance(given, torch.Tensor) and not (given is None and entry.endswith(" or None")):
            raise TypeError(f"{what}, got {entry.split()[0]} = {a_type(given)}")
    return value[0], value[1]


def _check_gate_range(layer: nn.Module, decay: torch.Tensor | None, decay_log: torch.Tensor | None) -> None:
    """Refuse a forgetting gate outside its range, as :func:`~innerloop.ops.scan` does: ``decay`` in ``[0,
    1]``, ``decay_log <= 0`` (``-inf``, a full reset, is in range). A layer's own hooks give them in range
    by construction; one of a subclass (or set on the layer) that gives ``decay = 1.5`` or ``log a = 0.3``
    would otherwise run, on the torch paths, a memory that flips sign or grows at every token, silently.
    NaN is let through (from a NaN input under ``non_finite="ignore"`` it spreads, as on every path; from
    finite input the layer's output check diagnoses it). One sync where a gate is the user's code; none
    for innerloop's own gates (in range by construction) or where values cannot be read."""
    if (decay is None and decay_log is None) or _gates_are_innerloops(layer):
        return  # no gate (most layers: no look at the class either), or innerloop's own
    for name, gate, hook, outside in (
        ("decay", decay, "forgetting", lambda g: (g < 0) | (g > 1)),
        ("log_a", decay_log, "log_forgetting", lambda g: g > 0),
    ):
        if gate is None or not holds_values(gate):
            continue
        bad = outside(gate.detach())
        if bool(bad.any()):
            raise ValueError(
                f"{type(layer).__name__}.{hook}(x) gave {name} outside "
                f"{'[0, 1]' if name == 'decay' else '(-inf, 0]'} (the gate a_t = "
                f"{'1 - decay' if name == 'decay' else 'exp(log a)'} must lie in [0, 1]): "
                f"{int(bad.sum())} values, e.g. {gate.detach()[bad][0].item()}"
            )


#: What computes a layer's gates: :data:`GATE_HOOKS` and the family's gate factors.
_GATE_CODE = ("forgetting", "log_forgetting", "scan_gates", "log_decay_factor", "decay_factor")
_OWN_GATE_MODULES = ("innerloop.core.layer", "innerloop.core.family_layers")


def _gates_are_innerloops(layer: nn.Module) -> bool:
    """Whether every function that computes ``layer``'s gates is innerloop's own layers' (none set on the
    layer, none overridden in a class of another module): their gates lie in range by construction."""
    for name in _GATE_CODE:
        if _hook_set_on(layer, name):
            return False
        function = getattr(type(layer), name, None)
        if function is not None and getattr(function, "__module__", None) not in _OWN_GATE_MODULES:
            return False
    return True


def _log_forgetting_reaches_layers_scan(layer: nn.Module) -> bool:
    """:func:`_log_forgetting_reaches_scan` for ``layer``, where a hook set on the layer itself
    (``layer.forgetting = f``) is below every class: it reaches the scan (both set: the log)."""
    forgetting, log_forgetting = (_hook_set_on(layer, name) for name in ("forgetting", "log_forgetting"))
    if forgetting or log_forgetting:
        return log_forgetting
    return _log_forgetting_reaches_scan(type(layer))


GATE_HOOKS = ("forgetting", "log_forgetting", "scan_gates")
"""The methods that give a layer's gates to its scan (:meth:`TTTLayer.scan_gates`)."""


def gates_declared_by(layer: nn.Module, cls: type) -> bool:
    """Whether ``layer``'s gates are those the class ``cls`` computes: none of :data:`GATE_HOOKS` is
    overridden below ``cls`` or set on the layer itself, so ``cls`` can tell which gates it has from its
    settings (:meth:`TTTLayer.declared_gates`) without running them."""
    return all(
        getattr(type(layer), name) is getattr(cls, name) and not _hook_set_on(layer, name)
        for name in GATE_HOOKS
    )


def _hook_set_on(layer: nn.Module, name: str) -> bool:
    """Whether the attribute ``name`` of ``layer`` itself (not its class's) is a hook of its own: not
    the class's method bound to the layer (which ``monkeypatch`` puts back on undoing ``setattr``)."""
    hook = vars(layer).get(name)
    if hook is None:
        return False
    return getattr(hook, "__self__", None) is not layer or hook.__func__ is not getattr(type(layer), name)


def inner_norm_initial_values(num_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-head inner LayerNorm as built (weight 1, bias 0, ``[H, f]`` each)."""
    return torch.ones(num_heads, head_dim), torch.zeros(num_heads, head_dim)


def remake_meta_derived_buffers(layer: TTTLayer, incompatible_keys: Any = None) -> None:
    """The load post-hook of every :class:`TTTLayer`: its derived buffers (:meth:`TTTLayer.derived_buffers`:
    token index, RoPE frequencies, tau) still on the meta device once its parameters are real, as after
    ``load_state_dict(..., assign=True)`` into a layer or model built under ``torch.device("meta")``,
    are made again on the parameters' device: no state dict holds them (non-persistent), and a meta
    table failed the first forward far from its cause ("Tensor on device cpu is not on the expected
    device meta!"). Made as :meth:`TTTLayer._apply` makes them off the meta device (in torch's default
    dtype), cast to the buffer's dtype, at least float32."""
    device = next((p.device for p in layer.parameters() if not p.is_meta), None)
    if device is None:  # nothing real yet (a load with assign=False, or of no weights)
        return
    tables = layer.derived_buffers()
    with torch.no_grad():
        for name, table in tables.items():
            current = layer._buffers.get(name)
            if current is not None and current.is_meta:
                wide = torch.promote_types(current.dtype, torch.float32)
                layer.register_buffer(name, table.to(device=device, dtype=wide), persistent=False)


class TTTLayer(nn.Module):
    """A TTT sequence layer (TTT-Linear, TTT-MLP, or any registered inner model / loss / rule).

    Args:
        hidden_size: model width ``D``.
        num_heads: number of heads ``H``; ``D`` must be divisible by it.
        inner_model: registered name or :class:`InnerModel` (``"linear"``, ``"mlp"``, ...).
        inner_loss: registered name or :class:`InnerLoss` (``"reconstruction"``, ``"next_token"``).
        update_rule: registered name or :class:`UpdateRule` (``"dual_form"``, ``"minibatch_gd"``).
        mini_batch_size: ``K``, tokens per inner gradient step.
        base_lr: the inner learning rate's scale (1.0 for TTT-Linear, 0.1 for TTT-MLP in the paper).
        use_gate: multiply the output by ``gelu_tanh(g_proj(x))`` (Mamba backbone).
        share_qk: one projection for Q and K followed by two causal depthwise convs (Mamba backbone).
        conv_kernel: kernel size of those convs (only with ``share_qk``: another value without it is
            warned of).
        rope_theta: RoPE base.
        inner_norm: per-head LayerNorm on the inner model's output (paper: on). Over a head size of 2
            it is ill-conditioned: float32 states are then 1e-4 to 1e-2 off float64 on every path.
        inner_residual: residual around the inner model (paper: on).
        norm_eps: epsilon of the inner LayerNorm and the post-norm; a normal number of
            :attr:`scan_dtype` (>= 1.18e-38 in float32, checked at construction and at each call) below 1
            (:data:`MAX_NORM_EPS`).
        kernel: fast-path choice, ``"auto"`` (default), ``"torch"`` or a registered kernel name. A
            named kernel is checked at construction against the plugins and ``inner_norm`` /
            ``inner_residual``, and refused for an update rule that sends no block to a kernel
            (``minibatch_gd``, ``momentum``: its ``no_kernel_reason``); what its ``verify`` decides
            (device, dtype, mini-batch size, gradients of gradients) is checked at the first call that
            sends it a block.
        non_finite: ``"raise"`` (default) rejects NaN/inf inputs with an error before they reach
            the state, and raises if finite input gave non-finite outputs or state (the inner model
            overflowed); ``"ignore"`` skips both checks (faster; NaNs then propagate to outputs and state).
            Under ``"ignore"`` a NaN or inf token spreads to the outputs of its whole mini-batch, earlier
            tokens included (under ``update_rule="minibatch_gd"``, the primal form, from the token on),
            and to all later ones of its sequence (the batch's other sequences stay finite and right), on
            every path (the chunked ``delta_chunk`` kernel then runs its token loop for the whole batch, so
            the other sequences' numbers differ from a call without the NaN by rounding, ~1e-16
            relative in float64, not bit for bit): the outputs before it
            then depend on where the sequence was split between calls (a call that ends before it
            returns them finite).
        needs_double_backward: tell kernels that gradients of gradients will be taken.
        inference_chunk_size: without autograd, a call longer than this reads the sequence in chunks
            of about this many tokens (whole mini-batches), carrying the state between them: the
            same numbers, with working memory bounded by the chunk instead of the sequence.
            ``None`` reads every call at once.

    Call ``y, state = layer(x, state=None)`` with ``x [B, T, D]``; ``state`` continues a sequence
    from any split point (see :class:`innerloop.core.state.TTTState`). A state made under
    ``torch.inference_mode`` continues only in a call that records no graph (``torch.no_grad``), or
    after ``state.clone()`` outside inference mode. ``x`` is in the weights'
    dtype (under ``torch.autocast`` a float32 layer also takes bfloat16 and float16 ``x``); the inner
    scan (state, inner LayerNorm statistics, gradient sums) and the state are in :attr:`scan_dtype`, the weights' dtype but at least float32:
    under autocast or with the layer in bfloat16 / float16 only the projections run in low precision.
    Every argument is checked at construction or call, with an error naming it and what is valid.
    The options the layer is built from (:attr:`built_options`) cannot be changed on a built layer (an
    ``AttributeError`` naming the option); those read at every call (:data:`CALL_OPTIONS`: ``base_lr``,
    ``kernel``, ``non_finite``, ``inference_chunk_size``, ``needs_double_backward``) can, each new value
    checked as the constructor checks it.
    """

    uses_rope: bool = True
    """Whether Q and K are rotated (RoPE, which needs an even head size); subclasses that read
    positions otherwise set it False."""

    conv_kernel_needs_share_qk: bool = True
    """Whether ``conv_kernel`` is the kernel of ``share_qk``'s convolutions only (another value without
    ``share_qk`` is warned of); subclasses with convolutions of their own set it False."""

    built_options: tuple[str, ...] = (
        "inner_model",
        "inner_loss",
        "update_rule",
        "hidden_size",
        "num_heads",
        "head_dim",
        "mini_batch_size",
        "use_gate",
        "share_qk",
        "conv_kernel",
        "rope_theta",
        "inner_norm",
        "inner_residual",
        "norm_eps",
    )
    """The options read only when the layer is built (its modules, parameters and tables are made from
    them, and the plugins it resolved): setting one on a built layer raises an ``AttributeError`` naming
    it, where it would be ignored
    (``rope_theta``: until a ``.to()`` remade the RoPE tables from it), half applied (``norm_eps``: the
    inner LayerNorm, not the post-norm) or fail later. The others (``base_lr``, ``kernel``,
    ``non_finite``, ``inference_chunk_size``, ...) are read at every call and may be changed."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        inner_model: str | InnerModel = "linear",
        inner_loss: str | InnerLoss = "reconstruction",
        update_rule: str | UpdateRule = "dual_form",
        mini_batch_size: int = 16,
        base_lr: float = 1.0,
        use_gate: bool = False,
        share_qk: bool = False,
        conv_kernel: int = DEFAULT_CONV_KERNEL,
        rope_theta: float = 10000.0,
        inner_norm: bool = True,
        inner_residual: bool = True,
        norm_eps: float = 1e-6,
        kernel: str = "auto",
        non_finite: str = "raise",
        needs_double_backward: bool = False,
        inference_chunk_size: int | None = 2048,
    ) -> None:
        super().__init__()
        self.register_load_state_dict_post_hook(remake_meta_derived_buffers)
        # every argument, by name
        _check_arguments(locals(), rotary=self.uses_rope, conv_needs_share_qk=self.conv_kernel_needs_share_qk)
        head_dim = int(hidden_size) // int(num_heads)
        # The flags as Python bools (the checks accept numpy's too)
        use_gate, share_qk, inner_norm, inner_residual = map(
            bool, (use_gate, share_qk, inner_norm, inner_residual)
        )
        plugins = (inner_model, inner_loss, update_rule)
        self._resolve_plugins(*plugins, kernel, head_dim, (inner_norm, inner_residual), int(mini_batch_size))

        # The numbers as Python ints and floats (the checks accept numpy's scalars too).
        self.hidden_size = int(hidden_size)
        self.num_heads = int(num_heads)
        self.head_dim = head_dim
        self.mini_batch_size = int(mini_batch_size)
        self.base_lr = float(base_lr)
        self.use_gate = use_gate
        self.share_qk = share_qk
        self.conv_kernel = int(conv_kernel)
        self.rope_theta = float(rope_theta)
        self.inner_norm = inner_norm
        self.inner_residual = inner_residual
        self.norm_eps = float(norm_eps)
        self.kernel = kernel
        self.non_finite = non_finite
        self.needs_double_backward = bool(needs_double_backward)
        self.inference_chunk_size = None if inference_chunk_size is None else int(inference_chunk_size)
        # Fast-path decisions of the last call: (path, reason) per run of whole mini-batches or token
        # (each call records into its own list, published here when it returns: see _begin_record).
        self.dispatches: list[tuple[str, str]] = []

        # The order of these two calls is the order of the parameters (and of the random draws).
        self._build_projections()
        self._build_inner_parameters()
        self._options_built = True  # from now on __setattr__ refuses the built_options

    def __setattr__(self, name: str, value: Any) -> None:
        """``nn.Module``'s, refusing a change of one of :attr:`built_options` once the layer is built, and
        checking a new value of one of :data:`CALL_OPTIONS` as the constructor does."""
        if self.__dict__.get("_options_built", False):
            if name in CALL_OPTIONS:
                value = checked_call_option(name, value)
                if name == "kernel":  # a named kernel must be one of this layer's, as at construction
                    wrapping = (self.inner_norm, self.inner_residual)
                    plugins = (self.inner_model, self.inner_loss, self.update_rule)
                    _check_kernel_name(value, *plugins, self.head_dim, wrapping, self.mini_batch_size)
            elif name in type(self).built_options:
                value = refuse_built_option_change(self, name, value, plugins=PLUGIN_OPTIONS)
        super().__setattr__(name, value)

    def _resolve_plugins(
        self,
        inner_model: str | InnerModel,
        inner_loss: str | InnerLoss,
        update_rule: str | UpdateRule,
        kernel: str,
        head_dim: int,
        wrapping: tuple[bool, bool],
        mini_batch_size: int,
    ) -> None:
        """The plugin instances, checked to work together and with the kernel named (if any), which must
        compute the inner ``wrapping`` ``(inner_norm, inner_residual)`` and run ``mini_batch_size``."""
        self.inner_model, self.inner_loss, self.update_rule = resolve_plugins(
            inner_model, inner_loss, update_rule, kernel, head_dim, wrapping, mini_batch_size
        )
        # What the state records about the model, loss and rule: their names, qualified by their class
        # when they are not the registered plugins of those names (see innerloop.core.identity).
        self._state_labels = (
            identity_label("inner_model", self.inner_model, head_dim),
            identity_label("inner_loss", self.inner_loss),
            identity_label("update_rule", self.update_rule),
        )

    def _build_projections(self) -> None:
        """The views' projections (Q, K, V, output, and the gate and the shared-QK convs when on).

        Reference names, so reference state_dicts load one to one.
        """
        hidden_size, share_qk, conv_kernel = self.hidden_size, self.share_qk, self.conv_kernel
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        if not share_qk:
            self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        if share_qk:
            self.conv_q = nn.Conv1d(hidden_size, hidden_size, conv_kernel, groups=hidden_size, bias=True)
            self.conv_k = nn.Conv1d(hidden_size, hidden_size, conv_kernel, groups=hidden_size, bias=True)
        if self.use_gate:
            self.g_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def _build_inner_parameters(self) -> None:
        """The inner loop's learnable parts: the inner learning rate's gate and token offsets, the
        RoPE and token-index tables, the inner LayerNorm, the initial inner weights, the post-norm."""
        hidden_size, num_heads, head_dim = self.hidden_size, self.num_heads, self.head_dim
        mini_batch_size = self.mini_batch_size
        # Inner learning rate: a gate per head, and the learnable token-index offsets delta.
        lr_gate = self._lr_gate_draws(num_heads, hidden_size, mini_batch_size)
        self.learnable_ttt_lr_weight, self.learnable_ttt_lr_bias, self.learnable_token_idx = map(
            nn.Parameter, lr_gate
        )
        for name, table in self.derived_buffers().items():  # token_idx, rope_inv_freq
            self.register_buffer(name, table, persistent=False)

        # The inner LayerNorm (per head) and the learnable initial inner weights.
        if self.inner_norm:
            self.ttt_norm_weight, self.ttt_norm_bias = map(
                nn.Parameter, inner_norm_initial_values(num_heads, head_dim)
            )
        self.initial_params = nn.ParameterDict(
            {k: nn.Parameter(v) for k, v in self._checked_init_params(num_heads, head_dim).items()}
        )
        self.post_norm = LayerNorm(hidden_size, eps=self.norm_eps)

    @staticmethod
    def _lr_gate_draws(num_heads: int, hidden_size: int, mini_batch_size: int) -> tuple[torch.Tensor, ...]:
        """The inner learning rate's gate as built: its weight ``[H, 1, D]`` drawn from N(0, 0.02^2), its
        bias ``[H, 1]`` and the token-index offsets ``[K]`` zero (the built and the reset layer alike)."""
        weight = torch.randn(num_heads, 1, hidden_size) * 0.02
        return weight, torch.zeros(num_heads, 1), torch.zeros(mini_batch_size)

    def reset_parameters(self) -> None:
        """Initialise this layer's own parameters again as its constructor does (the inner lr gate and
        token offsets, the inner LayerNorm, the initial inner weights from the inner model's
        ``init_params``), in place, and make its derived tables again: what ``to_empty`` left as garbage is
        the freshly built layer's (``model.apply(lambda m: m.reset_parameters())`` resets the projections
        and norms, its children, as PyTorch's modules do theirs)."""
        with torch.no_grad():
            if hasattr(self, "learnable_ttt_lr_weight"):
                lr_gate = self._lr_gate_draws(self.num_heads, self.hidden_size, self.mini_batch_size)
                parameters = (
                    self.learnable_ttt_lr_weight,
                    self.learnable_ttt_lr_bias,
                    self.learnable_token_idx,
                )
                for parameter, value in zip(parameters, lr_gate, strict=True):
                    parameter.copy_(value)
            self._reset_inner_weights()

    def _reset_inner_weights(self) -> None:
        """The inner LayerNorm, the initial inner weights and the derived tables as the constructor makes them."""
        if self.inner_norm:
            for parameter, value in zip(
                (self.ttt_norm_weight, self.ttt_norm_bias),
                inner_norm_initial_values(self.num_heads, self.head_dim),
                strict=True,
            ):
                parameter.copy_(value)
        for name, value in self._checked_init_params(self.num_heads, self.head_dim).items():
            self.initial_params[name].copy_(value)
        for name, table in self.derived_buffers().items():
            current = self._buffers[name]
            self.register_buffer(name, table.to(device=current.device, dtype=current.dtype), persistent=False)

    def _checked_init_params(self, num_heads: int, head_dim: int) -> dict[str, torch.Tensor]:
        """``inner_model.init_params(num_heads, head_dim)``, checked against its ``param_shapes`` at this
        layer's own shape (the registrar checked one small shape: a model that hard-codes the heads or
        the head dim fails here, naming it, not at the first forward with a bare torch error), in the
        layer's dtype.

        The layer's dtype is torch's default dtype, as for all its other parameters (``.to()``,
        ``.double()``, ... change it later). ``init_params`` takes no dtype, so a plugin cannot know the
        layer's, and the dtype of what it returns says nothing of the precision the user chose: weights
        in another floating dtype (float64 from numpy, say) are cast to the layer's, so that a float32
        layer holds float32 weights only, rounded as any of its parameters is (the registrar has
        refused non-floating weights). Each is the layer's own contiguous copy."""
        model = self.inner_model
        dtype = torch.get_default_dtype()
        # each weight a fresh, contiguous copy of its own: one the plugin returns as a view (``expand``:
        # every head one memory, which the optimizer's in-place step refuses) or keeps and returns again
        # (a cached init: every layer built from it would train one tensor) becomes this layer's alone
        params = {
            k: v.detach().to(dtype).clone(memory_format=torch.contiguous_format)
            if isinstance(v, torch.Tensor) and v.is_floating_point()
            else v
            for k, v in model.init_params(num_heads, head_dim).items()
        }
        wanted = {k: (num_heads, *shape) for k, shape in model.param_shapes(head_dim).items()}
        got = {
            k: tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__ for k, v in params.items()
        }
        if got != wanted:
            wrong = sorted(k for k in set(got) | set(wanted) if got.get(k) != wanted.get(k))
            detail = "; ".join(
                f"init_params({num_heads}, {head_dim})[{k!r}] has shape {got.get(k, 'missing')}, "
                f"expected {wanted.get(k, 'no such weight')}"
                for k in wrong
            )
            raise ValueError(
                f"{plugin_label('inner_model', model)}: {detail} (param_shapes({head_dim}) with num_heads "
                f"first); does it hard-code the number of heads or the head dim?"
            )
        return params

    def derived_buffers(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The buffers made from the layer's options, not learned and not saved (non-persistent), as
        the reference makes them (the module's casts then apply to them, but never below float32:
        :meth:`_apply`): ``token_idx`` ``1 / (i + 1)`` in ``dtype`` (None: torch's default dtype, at
        least float32: a layer built under ``torch.set_default_dtype(torch.float64)`` holds 1/3 in
        float64) and the RoPE inverse frequencies in float32."""
        index_dtype = torch.promote_types(dtype or torch.get_default_dtype(), torch.float32)
        return {
            "token_idx": 1.0 / torch.arange(1, self.mini_batch_size + 1, dtype=index_dtype),
            "rope_inv_freq": rope_inverse_frequencies(self.head_dim, self.rope_theta),
        }

    def _apply(self, fn: Any, recurse: bool = True) -> TTTLayer:
        """``nn.Module._apply`` (behind ``.to``, ``.double()``, ``.cuda()``, ``to_empty``), then the
        :meth:`derived_buffers` cast to their new device and dtype, but at least float32 (the scan's dtype:
        a bfloat16 or float16 layer keeps float32 tables, as it is under autocast), from the values they held in float32
        or float64 (a float64 token index stays exact, a float32 one is widened as the reference's
        ``.double()`` widens it), else made again: ``to_empty`` (after building on the meta device)
        leaves them uninitialised, a bfloat16 cast rounded them, and ``load_state_dict`` does not fill
        them."""
        held = dict(self._buffers)
        super()._apply(fn, recurse)
        with torch.no_grad():
            for name, table in self.derived_buffers().items():
                current, before = self._buffers.get(name), held.get(name)
                if current is None:
                    continue
                kept = (
                    before is not None
                    and not before.is_meta
                    and before.dtype in (torch.float32, torch.float64)
                )
                source = before if kept else table
                # at least float32, as the scan that reads them: a bfloat16 cast rounded 1/3 to 0.3340
                # and the RoPE frequencies to 3 digits, which autocast (float32 tables) does not
                wide = torch.promote_types(current.dtype, torch.float32)
                self._buffers[name] = source.to(device=current.device, dtype=wide)
        return self

    # ------------------------------------------------------------------------------------------
    # State
    # ------------------------------------------------------------------------------------------

    def signature_for(self, batch_size: int) -> StateSignature:
        """What a state of this layer for ``batch_size`` sequences must agree on: the shapes, the
        plugins (inner model, inner loss, update rule), the layer's class, which decides how the
        state's weights read ``x`` (a DeltaNet state is no Gated DeltaNet state, nor a TTT one), and
        the inner LayerNorm and residual, whose gradients its pending sums hold."""
        return StateSignature(
            batch_size=batch_size,
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            mini_batch_size=self.mini_batch_size,
            inner_model=self._state_labels[0],
            inner_loss=self._state_labels[1],
            update_rule=self._state_labels[2],
            layer=self.state_layer_label(),
            inner_output=inner_output_label(self.inner_norm, self.inner_residual),
        )

    def state_layer_label(self) -> str:
        """The layer in a state's signature: its class (a subclass that reads ``x`` into keys and values
        in ways its options choose names those options too, :class:`~innerloop.core.family_layers.FamilyLayer`)."""
        return type(self).__qualname__

    @property
    def scan_dtype(self) -> torch.dtype:
        """The dtype of the inner scan and of the state: the weights' dtype, but at least float32.

        A layer in bfloat16 or float16 (``layer.to(torch.bfloat16)``), like one under
        ``torch.autocast``, runs its projections in that dtype and its inner scan (inner weights,
        inner LayerNorm statistics, inner gradient sums) in float32: a low-precision state would
        lose every update smaller than its rounding step.
        """
        return torch.promote_types(self.post_norm.weight.dtype, torch.float32)

    def state_reference(self, batch_size: Any, like: torch.Tensor | None) -> tuple[int, torch.Tensor]:
        """``(batch_size, reference)`` for :meth:`init_state`, each checked: ``batch_size`` an integer
        >= 0 (0: an empty batch), ``like`` None or a floating-point tensor (the state's device; None: the
        weights'). The reference is an empty tensor of :attr:`scan_dtype` on that device: a state is
        always in the scan's dtype, which is all :meth:`forward` takes (a bfloat16 ``like`` of a
        bfloat16 layer's input gives a float32 state)."""
        if not is_integer(batch_size) or batch_size < 0:
            raise ValueError(f"batch_size must be an integer >= 0, got {batch_size!r}")
        if like is None:
            return int(batch_size), self.post_norm.weight.new_empty((), dtype=self.scan_dtype)
        if not isinstance(like, torch.Tensor) or not like.is_floating_point():
            given = f"dtype {like.dtype}" if isinstance(like, torch.Tensor) else type(like).__name__
            raise TypeError(
                f"like must be a floating-point torch.Tensor (the state's dtype and device; the layer keeps "
                f"its state in {self.scan_dtype}) or None, got {given}"
            )
        return int(batch_size), like.new_empty((), dtype=self.scan_dtype)

    def init_state(self, batch_size: int, like: torch.Tensor | None = None) -> TTTState:
        """The state at the start of a sequence, in :attr:`scan_dtype`, on ``like``'s device (None: the
        weights'): every sequence starts from the learnable init. ``batch_size``: an integer >= 0;
        ``like``: None or a floating-point tensor."""
        batch_size, reference = self.state_reference(batch_size, like)
        # copy=True: one differentiable copy of the init, shared by the batch rows. A view would tie the
        # state to the nn.Parameter until its first mini-batch closes: an optimizer step or a
        # load_state_dict would then change a state the caller holds.
        params = {
            k: v.to(reference.device, reference.dtype, copy=True).unsqueeze(0).expand(batch_size, *v.shape)
            for k, v in self.initial_params.items()
        }
        pending = {k: torch.zeros_like(v) for k, v in params.items()}
        conv_history = {}
        if self.share_qk:
            zeros = reference.new_zeros(batch_size, self.conv_kernel - 1, self.hidden_size)
            conv_history = {"shared_qk": zeros}
        carry = self.inner_loss.init_carry(batch_size, self.num_heads, self.head_dim, reference)
        return TTTState(
            params=params,
            pending=pending,
            position=0,
            signature=self.signature_for(batch_size),
            loss_carry=carry,
            conv_history=conv_history,
        )

    # ------------------------------------------------------------------------------------------
    # Forward
    # ------------------------------------------------------------------------------------------

    @run_eagerly("innerloop: the input checks read values")  # see _run_scan_recorded
    def _check_input(self, x: torch.Tensor, state: TTTState | None) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor [B, T, hidden_size], got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(
                f"x must have shape [B, T, hidden_size={self.hidden_size}], got {tuple(x.shape)}"
            )
        # A sum is finite iff every element is (NaN and inf propagate), barring overflow of huge finite
        # values, which the exact check below then settles: one cheap pass in the common case.
        checked = self.non_finite == "raise" and holds_values(x)
        if checked and not torch.isfinite(_wide_sum(x)) and not torch.isfinite(x).all():
            bad_tokens = (~torch.isfinite(x)).any(dim=-1).nonzero()  # [N, 2]: (sequence, token) pairs
            sequences = bad_tokens[:, 0].unique().tolist()  # sorted
            sequence, token = bad_tokens[0].tolist()
            error = NonFiniteRowsError(
                f"x contains NaN or inf (first at x[{sequence}, {token}]; sequences {_listed(sequences)} of "
                f"the batch); a TTT layer would write them into its state. Clean the input (or leave those "
                "sequences out: each sequence is computed on its own), or construct the layer with "
                "non_finite='ignore' to let them propagate"
            )
            error.rows, error.finite_rows = sequences, sorted(set(range(x.shape[0])) - set(sequences))
            raise error
        weights = self.post_norm.weight
        check_device_and_dtype(x, weights)
        if x.dtype != weights.dtype and (weights.dtype != torch.float32 or x.dtype not in _AUTOCAST_INPUTS):
            raise TypeError(
                f"x is {x.dtype} but the layer's weights are {weights.dtype}: under torch.autocast a layer "
                "takes x of another dtype only with float32 weights and x in float32, bfloat16 or float16 "
                "(autocast leaves other dtypes as they are); cast x or the layer to one dtype"
            )
        if self.base_lr > torch.finfo(self.scan_dtype).max:
            raise ValueError(
                f"base_lr={self.base_lr!r} overflows {str(self.scan_dtype).removeprefix('torch.')}, the layer's "
                f"scan dtype; valid: a finite number >= 0 up to {torch.finfo(self.scan_dtype).max:.2e}"
            )
        check_norm_eps(self.norm_eps, self.scan_dtype)  # a layer cast to a narrower dtype (.float())
        if state is not None:
            self._check_state(state, x.shape[0])
            self._check_state_is_recordable(state, x)

    def _check_state(self, state: TTTState, batch_size: int) -> None:
        """The state must come from a layer like this one, for this batch, in the scan's dtype."""
        if not isinstance(state, TTTState):
            raise TypeError(f"state must be a TTTState (or None), got {type(state).__name__}")
        expected = self.signature_for(batch_size)
        if state.signature != expected:
            differing = {
                field: (getattr(state.signature, field), getattr(expected, field))
                for field in expected.__dataclass_fields__
                if getattr(state.signature, field) != getattr(expected, field)
            }
            unrecorded = sorted(field for field, (given, _) in differing.items() if given is None)
            hint = (
                f"; the state does not record {unrecorded}: it was not written by a layer (or by an older "
                "innerloop), start from state=None or from the state this layer returned"
                if unrecorded
                else ""
            )
            raise ValueError(
                f"state does not belong to this layer and input: (state's, expected) differ in {differing}{hint}"
            )
        if not _is_int(state.position) or state.position < 0:
            raise ValueError(f"state.position must be an integer >= 0, got {state.position!r}")
        shapes = self.inner_model.param_shapes(self.head_dim)
        for group in ("params", "pending"):
            given = {k: tuple(v.shape) for k, v in getattr(state, group).items()}
            wanted = {k: (batch_size, self.num_heads, *shape) for k, shape in shapes.items()}
            if given != wanted:
                raise ValueError(f"state.{group} must have the shapes {wanted}, got {given}")
        self._check_rule_state(state, batch_size, shapes)
        self._check_conv_history(state, batch_size)
        self._check_state_tensors(state)
        self._check_no_pending_at_a_boundary(state)

    def _check_no_pending_at_a_boundary(self, state: TTTState) -> None:
        """At a mini-batch boundary a state's pending sums are zero (every layer writes them so, and
        :meth:`TTTState.from_tensors` refuses others): nonzero ones there mean a position edited by hand,
        whose sums the scan would read as zero."""
        if state.offset or not all(holds_values(t) for t in state.pending.values()):
            return
        nonzero = sorted(k for k, v in state.pending.items() if bool(v.any()))
        if nonzero:
            raise ValueError(
                f"state.position {state.position} is at a mini-batch boundary (mini_batch_size "
                f"{self.mini_batch_size}), but state.pending {nonzero} are not zero: the state was edited "
                "(a position moved?); pass the state this layer returned, or None"
            )

    def _check_state_tensors(self, state: TTTState) -> None:
        """Every state tensor is on the weights' device and in the dtype this layer keeps it in: the scan
        dtype, or for a loss carry entry the dtype its inner loss starts it in (an integer state would
        truncate the weights, another float dtype round them)."""
        weights, scan_dtype = self.post_norm.weight, self.scan_dtype
        expected = {}
        if state.loss_carry:
            reference = weights.new_empty((), dtype=scan_dtype)
            carry = self.inner_loss.init_carry(state.batch_size, self.num_heads, self.head_dim, reference)
            expected = {f"loss_carry.{key}": value.dtype for key, value in carry.items()}
            given = {key: tuple(value.shape) for key, value in state.loss_carry.items()}
            wanted = {key: tuple(value.shape) for key, value in carry.items()}
            if given != wanted:
                raise ValueError(
                    f"state.loss_carry must hold what inner loss {self.inner_loss.name!r} keeps for this batch, "
                    f"{wanted}; got {given}: pass the state this layer returned, or None"
                )
        for name, tensor in state.tensors().items():
            if tensor.device != weights.device:
                raise ValueError(
                    f"state tensor {name} is on {tensor.device}, the layer on {weights.device}: "
                    f"move the state with state.to({str(weights.device)!r})"
                )
            wanted = expected.get(name, scan_dtype)
            if tensor.dtype != wanted:
                raise TypeError(
                    f"state tensor {name} is {tensor.dtype} but the layer keeps its state in {wanted}: pass "
                    f"the state the layer returned, or cast it with state.to({scan_dtype})"
                )

    def _check_state_is_recordable(self, state: TTTState, x: torch.Tensor) -> None:
        """A state made under ``torch.inference_mode`` cannot enter a call that records an autograd
        graph: torch refuses to save its tensors for backward, on some paths and not others (a kernel
        may copy the state first). Refused here on every path, naming the remedies."""
        if not torch.is_grad_enabled():
            return
        inference = sorted(name for name, t in state.tensors().items() if t.is_inference())
        if not inference:
            return
        records_graph = x.requires_grad or any(p.requires_grad for p in self.parameters())
        if records_graph:
            raise ValueError(
                f"state holds inference tensors ({', '.join(inference)}: made under torch.inference_mode), "
                "which autograd cannot save for backward, and this call records a graph (grad is enabled and "
                "the layer's parameters or x require grad): run the continuation under torch.no_grad() "
                "(or torch.inference_mode()), or pass state.clone() called outside inference mode (a copy "
                "of normal tensors), or make the state under torch.no_grad() instead of inference_mode"
            )

    def _check_conv_history(self, state: TTTState, batch_size: int) -> None:
        """The state's conv history is the one this layer keeps (the shared-QK convs', or none)."""
        history = state.conv_history.get("shared_qk")
        wanted_history = (batch_size, self.conv_kernel - 1, self.hidden_size)
        if self.share_qk and (history is None or tuple(history.shape) != wanted_history):
            given = None if history is None else tuple(history.shape)
            raise ValueError(
                f"state.conv_history['shared_qk'] must be {wanted_history} for this share_qk layer "
                f"(conv_kernel={self.conv_kernel}), got {given}: pass the state this layer returned, or None"
            )
        if not self.share_qk and state.conv_history:
            raise ValueError(
                f"state has a conv history {sorted(state.conv_history)} but this layer has share_qk=False: "
                "it was written by another layer"
            )

    def _check_rule_state(self, state: TTTState, batch_size: int, shapes: dict[str, tuple[int, ...]]) -> None:
        """The momentum ``S`` and the decay product of a state have the shapes of this layer's."""
        wanted = {k: (batch_size, self.num_heads, *shapes[k]) for k in state.momentum if k in shapes}
        given = {k: tuple(v.shape) for k, v in state.momentum.items()}
        if given != wanted:
            raise ValueError(f"state.momentum must hold weights of the shapes {wanted}, got {given}")
        unknown = sorted(set(state.decay) - {"product"})
        product = state.decay.get("product")
        if unknown or (product is not None and tuple(product.shape) != (batch_size, self.num_heads)):
            shape = None if product is None else tuple(product.shape)
            raise ValueError(
                f"state.decay may hold only 'product' [B, H] = {(batch_size, self.num_heads)}; "
                f"got keys {sorted(state.decay)} (product {shape})"
            )

    def _check_rule_state_fits_gates(self, state: TTTState, decays: bool, has_momentum: bool) -> None:
        """A state's decay product and momentum are the ones this layer's gates write: a product inside a
        mini-batch exactly when the layer forgets (none at a boundary), and after the first token a
        momentum for every weight exactly when it has momentum gates (:meth:`forgetting`). A group left
        out or added by hand would be read as a product of 1, a zero momentum, or applied where the
        layer has no such gate."""
        wants_product = decays and state.offset > 0
        if ("product" in state.decay) != wants_product:
            where = f"at mini-batch offset {state.offset}" + (
                "" if decays else " of a layer that does not forget"
            )
            raise ValueError(
                f"state.decay must {'hold' if wants_product else 'not hold'} a 'product' {where}, got keys "
                f"{sorted(state.decay)}: pass the state this layer returned, or None"
            )
        wanted = sorted(state.params) if has_momentum and state.position > 0 else []
        if state.momentum and not has_momentum or (wanted and sorted(state.momentum) != wanted):
            raise ValueError(
                f"state.momentum must hold {wanted or 'nothing'} for this layer "
                f"({'momentum gates' if has_momentum else 'no momentum gates'}, position {state.position}), got "
                f"{sorted(state.momentum)}: pass the state this layer returned, or None"
            )

    def _read(self, x: torch.Tensor, state: TTTState) -> tuple[Views, torch.Tensor, torch.Tensor, dict]:
        """What the update rule reads: ``(views, lr [B, H, T], tau [K], new conv history)``.

        The views are strided views (last dim contiguous) of the projections, not copies: the
        kernels take strides, and the torch paths copy only what they need.
        """
        batch, tokens, _ = x.shape
        heads, head_dim = self.num_heads, self.head_dim
        # the position modulo K first: a Python int of any size, where adding it to an int64 range could wrap
        start = state.position % self.mini_batch_size
        positions = (start + torch.arange(tokens, device=x.device)) % self.mini_batch_size
        if autocasting(x.device.type) and x.dtype == torch.float32:
            x = x.to(torch.get_autocast_dtype(x.device.type))  # cast once, not once per projection
        conv_history = dict(state.conv_history)
        if self.share_qk:
            shared = self.q_proj(x)  # [B, T, D]
            history = conv_history["shared_qk"]
            query, _ = causal_depthwise_conv(shared, self.conv_q.weight, self.conv_q.bias, history)
            key, conv_history["shared_qk"] = causal_depthwise_conv(
                shared, self.conv_k.weight, self.conv_k.bias, history
            )
            owned = (True, True)  # our own functions' fresh outputs
        else:
            query, key = self.q_proj(x), self.k_proj(x)  # [B, T, D] each
            owned = (_output_is_scratch(self.q_proj), _output_is_scratch(self.k_proj))
        value = self.v_proj(x)
        lr, tau = hook_pair(
            self, "inner_learning_rates", RATE_ENTRIES, layer_hook(self, "inner_learning_rates")(x)
        )
        if query.dtype != self.scan_dtype:  # low-precision projections: the views in the scan's dtype
            query, key, value = (t.to(self.scan_dtype) for t in (query, key, value))
            owned = (True, True)  # fresh copies: RoPE below rotates them in place (without autograd)
        cos, sin = rope_cos_sin(positions, self.rope_inv_freq, query.dtype)  # [T, f/2]

        def heads_view(t: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, H, T, f] (a view)
            return t.reshape(batch, tokens, heads, head_dim).transpose(1, 2)

        # RoPE on Q and K, by [T, 1, f/2] tables. Without autograd, a projection that is our own scratch
        # (a plain nn.Linear's fresh output that no hook has seen) is rotated where it lies.
        rotated = []
        for t, scratch in zip((query, key), owned, strict=True):
            in_place = scratch and not (torch.is_grad_enabled() and t.requires_grad)
            t = t.reshape(batch, tokens, heads, head_dim)
            rotated.append(
                apply_rope_interleaved(t, cos[:, None], sin[:, None], in_place=in_place).transpose(1, 2)
            )
        return Views(rotated[0], rotated[1], heads_view(value)), lr, tau, conv_history

    def inner_learning_rates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``lr [B, H, T]`` (per token) and ``tau [K]`` (per position in a mini-batch)."""
        # The projection in the weights' (or autocast's) dtype, the gate after it in the scan's dtype: a
        # bfloat16 layer computes the sigmoid and tau in float32, as the same layer does under autocast.
        scan_dtype = self.scan_dtype
        gate = F.linear(x, self.learnable_ttt_lr_weight[:, 0]).transpose(1, 2).to(scan_dtype)  # [B, H, T]
        gate = gate + self.learnable_ttt_lr_bias.to(scan_dtype).reshape(1, self.num_heads, 1)
        # gate_sigmoid: sigmoid's values, its gradient kept when saturated
        lr = self.base_lr * gate_sigmoid(gate) / self.head_dim
        tau = torch.clamp_min(self.token_idx.to(scan_dtype) + self.learnable_token_idx.to(scan_dtype), 0.0)
        return lr, tau

    def log_forgetting(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
        """The forgetting gates with the decay given as the log of its retention: ``(log a, momentum)``
        ``[B, H, T]`` for ``x [B, T, D]``, ``log a = log(1 - decay) <= 0`` (``-inf``: a full reset), or None
        (here): the layer gives its gates through :meth:`forgetting` alone.

        The hook for a layer that computes its forgetting gate as a log (Gated DeltaNet, Titans): the scan
        takes it as ``decay_log`` and its decay products in log space, where ``1 - decay`` of a float32
        ``decay`` near 1 would hold a small retention ``a`` only to ``eps / a`` relative; :meth:`forgetting`
        derives ``decay = 1 - exp(log a)`` from it. A subclass that overrides :meth:`forgetting` below the
        class that defines this hook has its own gates reach the scan instead (as ``decay``)."""
        return None

    def forgetting(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(decay, momentum)`` ``[B, H, T]`` of the scan for ``x [B, T, D]`` (see
        :func:`innerloop.core.scan.run_scan`): :meth:`log_forgetting`'s gates with ``decay = 1 - exp(log
        a)`` (:func:`~innerloop.core.functional.decay_from_log`), None each where that gives none (this
        layer: it has no gates for them). A layer that forgets overrides this (or :meth:`log_forgetting`)."""
        gates = layer_hook(self, "log_forgetting")(x)
        if gates is None:
            return None, None
        log_retention, momentum = gates
        return (None if log_retention is None else decay_from_log(log_retention)), momentum

    def declared_gates(self) -> tuple[bool, bool] | None:
        """``(decay, momentum)``: whether :meth:`scan_gates` gives this layer's blocks a forgetting gate
        and the momentum rule's state, told from its class and settings without running any of its
        modules (whose forward hooks would fire, and whose random gates would draw); None where a gate
        hook is overridden below the class that declares it, or set on the layer (its own code: only
        running it tells). This layer has neither gate."""
        return (False, False) if gates_declared_by(self, TTTLayer) else None

    def scan_gates(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """``(decay, momentum, decay_log)`` ``[B, H, T]`` as the scan takes them: :meth:`log_forgetting`'s
        gates (``decay`` None, ``decay_log = log a``) where it gives them, :meth:`forgetting`'s otherwise
        (``decay_log`` None), and :meth:`forgetting`'s too where a subclass overrides it below the class
        that defines :meth:`log_forgetting` (so that the override reaches the scan), or on the layer
        itself (``layer.forgetting = f``: below every class; the rule is read at each call). What each call's
        scan is given, and what :func:`~innerloop.core.diagnostics.inner_loss_before_after` gives its own
        scans; a layer's gates are changed through the two hooks, not here."""
        gates = layer_hook(self, "log_forgetting")(x) if _log_forgetting_reaches_layers_scan(self) else None
        if gates is None:
            decay, momentum = hook_pair(self, "forgetting", GATE_ENTRIES, layer_hook(self, "forgetting")(x))
            return decay, momentum, None
        log_retention, momentum = hook_pair(self, "log_forgetting", LOG_GATE_ENTRIES, gates)
        return None, momentum, log_retention

    def inner_task(self) -> InnerTask:
        """The inner model, loss and wrapping as the update rule sees them."""

        def record(path: str, reason: str) -> None:
            self._dispatch_record().append((path, reason))

        return InnerTask(
            model=self.inner_model,
            loss=self.inner_loss,
            mini_batch_size=self.mini_batch_size,
            norm_weight=self.ttt_norm_weight.to(self.scan_dtype) if self.inner_norm else None,
            norm_bias=self.ttt_norm_bias.to(self.scan_dtype) if self.inner_norm else None,
            norm_eps=self.norm_eps,
            residual=self.inner_residual,
            kernel=self.kernel,
            needs_double_backward=self.needs_double_backward,
            on_dispatch=record,
        )

    def forward(self, x: torch.Tensor, state: TTTState | None = None) -> tuple[torch.Tensor, TTTState]:
        """Read ``x [B, T, D]`` from ``state`` (None: a new sequence); return ``(y [B, T, D], state)``."""
        self._check_input(x, state)
        record, outer = self._begin_record()
        try:
            return self._forward_recorded(x, state)
        except RuntimeError as err:  # an inference-mode x read by a parameter that requires grad
            raise_if_unrecordable(err, x, "x", "layer")
            raise
        finally:
            self._end_record(record, outer)

    @run_eagerly("innerloop: the dispatch record is per thread")
    def _begin_record(self) -> tuple[list[tuple[str, str]], list[tuple[str, str]] | None]:
        """Start this thread's record of a call: ``(its list, the record of a call of this layer it is
        nested in, or None)``. The list is :attr:`dispatches` from now on, and again when the call ends
        (another thread's call may have replaced it meanwhile)."""
        record: list[tuple[str, str]] = []
        calls = _calls_in_progress()
        outer = calls.get(id(self))
        calls[id(self)] = self.dispatches = record
        return record, outer

    @run_eagerly("innerloop: the dispatch record is per thread")
    def _end_record(self, record: list[tuple[str, str]], outer: list[tuple[str, str]] | None) -> None:
        calls = _calls_in_progress()
        if outer is None:
            calls.pop(id(self), None)
        else:
            calls[id(self)] = outer
        self.dispatches = record

    def _dispatch_record(self) -> list[tuple[str, str]]:
        """The record of this thread's call of the layer in progress (outside one, :attr:`dispatches`)."""
        return _calls_in_progress().get(id(self), self.dispatches)

    def _forward_recorded(self, x: torch.Tensor, state: TTTState | None) -> tuple[torch.Tensor, TTTState]:
        given_state = state
        if state is None:
            state = self.init_state(x.shape[0])  # in the weights' dtype, also under autocast
        if x.shape[1] == 0:  # an empty piece of a sequence: no token read, the state goes on unchanged
            return self._empty_output(x), state
        bounds = self._inference_chunks(x, state)
        if len(bounds) == 1:
            y, state = self._forward_chunk(x, state)
        else:
            y = None
            for start, end in bounds:
                part, state = self._forward_chunk(x[:, start:end], state)
                if y is None:  # the output's dtype is the chunks' (under autocast it need not be x's)
                    y = part.new_empty(x.shape[0], x.shape[1], self.hidden_size)
                y[:, start:end] = part
        if self.non_finite == "raise":
            self._check_output(x, given_state, y, state)
        return y, state

    def _empty_output(self, x: torch.Tensor) -> torch.Tensor:
        """``y [B, 0, D]`` for an input of no token, through the output path (post-norm, gate,
        o_proj), so its dtype and its graph (to ``x`` and the output weights) are a real call's."""
        inner_out = self.post_norm.weight.new_zeros(x.shape[0], self.num_heads, 0, self.head_dim)
        return self._output(x, inner_out)

    @run_eagerly("innerloop: the output checks read values")  # see _run_scan_recorded
    def _check_output(
        self, x: torch.Tensor, given_state: TTTState | None, y: torch.Tensor, new_state: TTTState
    ) -> None:
        """Finite input (checked before) must give finite output and state: never silently wrong numbers.

        Same cheap test as the input's (a sum is finite iff every element is, barring overflow of
        huge finite values, which the exact check settles); the state's inner weights are checked too,
        since the last mini-batch's update can overflow after the output was read.
        """
        if not holds_values(y):  # meta tensors, torch.func transforms: no values to check
            return
        # one read of the device for the output's sum and every state tensor (a host sync on a GPU);
        # only when it fails are the exact checks below run
        state_finite = _sums_are_finite(new_state)
        output_sum_finite = torch.isfinite(_wide_sum(y))
        if bool(output_sum_finite if state_finite is None else output_sum_finite & state_finite.to(y.device)):
            return
        output_finite = bool(output_sum_finite) or bool(torch.isfinite(y).all())
        if output_finite and new_state.is_finite():
            return
        what = "non-finite outputs" if not output_finite else "a non-finite state"
        batch = x.shape[0]
        rows = non_finite_rows(batch, (y, *new_state.tensors().values()))
        if given_state is not None and not given_state.is_finite():
            raise with_rows(
                ValueError(
                    f"{type(self).__name__} produced {what}: the state passed in already holds NaN or inf; "
                    "start from state=None, or construct the layer with non_finite='ignore' to let them "
                    "propagate"
                ),
                batch,
                rows,
                given_state,
            )
        caller_state = given_state  # the whole batch's, for the error's recipe
        x, given_state, new_state = self._broken_rows_only(rows, x, given_state, new_state)
        record = self._dispatch_record()
        saved_dispatches = list(record)  # the diagnosis below reruns parts of the call
        try:
            with torch.no_grad():
                cause = self._non_finite_cause(x, given_state, new_state)
        finally:
            record[:] = saved_dispatches
        message = f"{type(self).__name__} produced {what} from finite input{cause}; non_finite='ignore' returns them as they are"
        raise with_rows(ValueError(message), batch, rows, caller_state)

    def _broken_rows_only(
        self, rows: list[int], x: torch.Tensor, given_state: TTTState | None, new_state: TTTState
    ) -> tuple[torch.Tensor, TTTState | None, TTTState]:
        """``x`` and the states of the batch ``rows`` that went non-finite only, for the diagnosis (all
        of them when every row did, or none is told): a finite row's large input or inner weights must
        not be blamed for another row's NaN."""
        if not 0 < len(rows) < x.shape[0]:
            return x, given_state, new_state
        picked = torch.tensor(rows, dtype=torch.long, device=x.device)
        given = None if given_state is None else given_state.index_select(picked, self.inner_loss)
        return x.index_select(0, picked), given, new_state.index_select(picked, self.inner_loss)

    def _non_finite_cause(self, x: torch.Tensor, given_state: TTTState | None, new_state: TTTState) -> str:
        """Why finite input gave non-finite outputs or state, in words, after "from finite input" (for
        :meth:`_check_output`): the first that explains it of the layer's parameters, its projections
        or inner learning rate, its low-precision output, its inner weights, a huge input, and last
        its plugins."""
        largest = float(x.detach().abs().max()) if x.numel() else 0.0
        size = f" (largest |input| {largest:.1e})"
        broken = [name for name, p in self.named_parameters() if not bool(torch.isfinite(p).all())]
        if broken:
            return (
                f"{size}: the layer's parameters {broken} hold NaN or inf (a diverged optimizer step?); "
                "reload finite weights"
            )
        state = given_state if given_state is not None else self.init_state(x.shape[0])
        reading = self._read_overflow(x, state)
        if reading is not None:
            return size + reading
        scan_dtype = str(self.scan_dtype).removeprefix("torch.")
        low = self._projection_dtype(x)
        if low in LOW_PRECISION and new_state.is_finite():
            low_name = str(low).removeprefix("torch.")
            return (
                f"{size}: the inner scan's {scan_dtype} state stayed finite, so the post-norm, gate or o_proj "
                f"overflowed {low_name} (largest finite {low_name} {torch.finfo(low).max:.1e}); "
                f"{self._wider_dtype_advice(x)}, or look for huge post-norm, gate or o_proj weights"
            )
        (weights, weights_broke), start = self._largest_inner_weight(x, state), _largest_magnitude(state)
        if weights > math.sqrt(torch.finfo(self.scan_dtype).max):
            return size + self._inner_weights_overflow(weights, largest, start)
        widen = "" if self.scan_dtype == torch.float64 else " or run in float64 (layer.double())"
        if largest >= LARGE_INPUT:
            return f"{size}: the inner model overflowed {scan_dtype}; normalise the input{widen}"
        if weights > DIVERGED_GROWTH * max(start, 1.0):  # from input of ordinary size: the loop diverged
            return size + self._inner_weights_overflow(weights, largest, start)
        if weights_broke:  # moderate weights turned NaN or inf at once: one update step was not finite
            return f" of moderate size{size[:-1]}, far from overflowing {scan_dtype}), but {self._step_broke(start)}"
        return (
            f" of moderate size (largest |input| {largest:.1e}, far from overflowing {scan_dtype}), and the "
            f"inner weights stayed moderate (largest |W| {weights:.1e}): {self._plugin_suspects()}"
        )

    def _inner_weights_overflow(self, weights: float, largest_input: float, start: float) -> str:
        """The cause in words when the inner weights grew to ``weights`` (beyond the square root of the
        scan dtype's largest value, where their products overflow, or more than :data:`DIVERGED_GROWTH`
        times from ``start``, their size when the call began: the inner loop diverged), with what to do."""
        scan_dtype = str(self.scan_dtype).removeprefix("torch.")
        limit = math.sqrt(torch.finfo(self.scan_dtype).max)
        projections = [getattr(self, name, None) for name in ("q_proj", "k_proj", "v_proj")]  # share_qk: no k
        projection = max(float(m.weight.detach().abs().max()) for m in projections if m is not None)
        remedies = [
            f"lower base_lr (now {self.base_lr:g})",
            self._lr_gate_advice(),
            f"check the q, k and v projections' weights (largest |weight| {projection:.1e}) if they were trained",
        ]
        if largest_input >= LARGE_INPUT:  # the input first: it is out of the ordinary
            remedies.insert(0, "normalise the input")
        if self.scan_dtype != torch.float64:
            remedies.append("run in float64 (layer.double())")
        if weights > limit:
            cause = (
                f"overflowed {scan_dtype} (largest |W| {weights:.1e} up to the first non-finite piece, beyond "
                f"{limit:.1e}, the square root of {scan_dtype}'s largest value)"
            )
        else:
            cause = (
                f"diverged: they grew from largest |W| {start:.1e} to {weights:.1e} up to the first non-finite "
                "piece (the inner learning rate is too large for this input)"
            )
        return f": the inner weights {cause}; {', '.join(remedies[:-1])} or {remedies[-1]}"

    def _step_broke(self, start: float) -> str:
        """The cause in words when the inner weights turned NaN or inf in one update from moderate
        weights (largest |W| ``start``): a plugin's NaN gradient, or a step (learning rate times
        gradient) too large for the scan dtype -- plugins not built in named first, as likelier."""
        remedy = f"lower base_lr (now {self.base_lr:g}) or {self._lr_gate_advice()}"
        broke = f"the inner weights turned NaN or inf in one update from largest |W| {start:.1e} without growing first"
        if all(
            is_built_in(kind, getattr(self, kind)) for kind in ("inner_model", "inner_loss", "update_rule")
        ):
            overflowed = "the step (inner learning rate times gradient) overflowed"
            return f"{broke}: {overflowed}; {remedy}; if those are ordinary, {self._plugin_suspects()}"
        # a plugin's NaN gradient is the likelier cause: not called an overflow, which it may not be
        return f"{broke}: {self.plugin_nan_diagnosis()}"

    def plugin_nan_diagnosis(self, base_lr_name: str = "base_lr", configured: float | None = None) -> str:
        """The diagnosis of a NaN or inf from moderate input and weights of a layer whose plugins are not
        all built in, in words: the plugins not built in as the likely source, unless one inner step
        (learning rate times gradient) was too large, with its remedy (``base_lr_name``: how the caller
        names ``base_lr``, ``model.ttt.base_lr`` in a run's config). The one text of that diagnosis:
        the layer's own error and training's :class:`~innerloop.train.module.NonFiniteLayerOutputError`
        both say it. ``configured``: the rate the caller's config sets, said beside the current ``base_lr``
        where they differ (a warm-up's current value, ``optim.ttt_base_lr_warmup``, is not what to lower)."""
        now = (
            f"now {self.base_lr:g}"
            if configured is None or configured == self.base_lr
            else f"configured {configured:g}; {self.base_lr:g} now, in its warm-up"
        )
        remedy = f"lower {base_lr_name} ({now}) or {self._lr_gate_advice()}"
        return f"{self._plugin_suspects()}; unless the step (inner learning rate times gradient) was too large: {remedy}"

    def _lr_gate_advice(self) -> str:
        """What to check of the inner learning rate's gate, by its parameters' names where known."""
        if hasattr(self, "learnable_ttt_lr_weight"):
            return (
                "check the inner learning rate's gate (learnable_ttt_lr_weight and _bias) if it was trained"
            )
        return "check the inner learning rate's gates if they were trained"

    def _autocast_decides(self, x: torch.Tensor) -> bool:
        """Whether autocast chose the dtype of the projections, post-norm and o_proj (it casts the
        weights unless they are float64)."""
        return autocasting(x.device.type) and self.post_norm.weight.dtype != torch.float64

    def _projection_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype the projections, post-norm and o_proj run in: the autocast dtype under autocast,
        else the weights'."""
        if self._autocast_decides(x):
            return torch.get_autocast_dtype(x.device.type)
        return self.post_norm.weight.dtype

    def _wider_dtype_advice(self, x: torch.Tensor) -> str | None:
        """How to run the projections and output in a dtype of wider range, in words; None for float64.
        Under autocast that is the autocast's dtype, not the weights' (``layer.float()`` changes nothing
        there); float32 has bfloat16's range, so a bfloat16 overflow needs float64."""
        dtype = self._projection_dtype(x)
        if self._autocast_decides(x) and dtype == torch.float16:
            return "run the layer without float16 autocast, or under bfloat16 autocast (float32's range)"
        if self._autocast_decides(x):
            name = str(dtype).removeprefix("torch.")
            return f"run the layer without {name} autocast, in float64 (layer.double())"
        if dtype == torch.float16:
            return "keep the weights in float32 (layer.float()) or bfloat16 instead of float16"
        return "run in float64 (layer.double())" if dtype != torch.float64 else None

    def _overflowed_reading(self, x: torch.Tensor, dtype_name: str) -> str:
        """What overflowed ``dtype_name`` of the reading of ``x`` into Q, K, V, in words: the projections,
        or (when those stayed finite) the layer's feature map, else what follows the projections."""
        if autocasting(x.device.type) and x.dtype == torch.float32:
            x = x.to(torch.get_autocast_dtype(x.device.type))  # as _read casts it
        projections = [getattr(self, name, None) for name in ("q_proj", "k_proj", "v_proj")]  # share_qk: no k
        if not all(bool(torch.isfinite(m(x)).all()) for m in projections if m is not None):
            return f"the projections Q, K, V overflowed {dtype_name}"
        feature_map = getattr(self, "feature_map", "identity")  # the family's layers
        if feature_map != "identity":
            return (
                f"the feature map {feature_map!r} on Q and K overflowed {dtype_name}, from finite projections"
            )
        return f"Q, K, V overflowed {dtype_name} after the projections, which stayed finite"

    def _read_overflow(self, x: torch.Tensor, state: TTTState) -> str | None:
        """The cause, in words, when the projections (Q, K, V) or the inner learning rate of ``x``
        are not finite; None when they are."""
        views, lr, _, _ = self._read(x, state)
        if not all(bool(torch.isfinite(v).all()) for v in (views.query, views.key, views.value)):
            dtype = self._projection_dtype(x)
            wider = self._wider_dtype_advice(x)
            advice = "normalise the input" + (f", or {wider}" if wider else "")
            largest_finite = torch.finfo(dtype).max
            what = self._overflowed_reading(x, str(dtype).removeprefix("torch."))
            return f": {what} (largest finite {largest_finite:.1e}); {advice}"
        if not bool(torch.isfinite(lr).all()):
            return (
                f": the inner learning rate is not finite in {str(lr.dtype).removeprefix('torch.')}; lower "
                f"base_lr (now {self.base_lr:g}) or {self._lr_gate_advice()}"
            )
        return None

    def _largest_inner_weight(self, x: torch.Tensor, state: TTTState) -> tuple[float, bool]:
        """The largest |inner weight| (``params`` and ``pending``, NaN left out, inf counted) of
        ``state`` and of the states after each piece of ``x`` read from it (whole mini-batches, at most
        :data:`DIAGNOSIS_PIECES` pieces, so that the diagnosis costs about one more call), up to the
        first piece whose output or state is not finite: how large the weights grew before it failed;
        and whether the state itself turned non-finite there (not only the output)."""
        largest = _largest_magnitude(state)
        tokens, size = x.shape[1], self.mini_batch_size
        step = size * max(1, math.ceil(math.ceil(tokens / size) / DIAGNOSIS_PIECES))
        first = size - state.position % size  # the first piece closes the current mini-batch
        ends = [*range(first, tokens, step), tokens]
        for start, end in zip([0, *ends[:-1]], ends, strict=True):
            y, state = self._forward_chunk(x[:, start:end], state)
            largest = max(largest, _largest_magnitude(state))
            if not state.is_finite():
                return largest, True
            if not bool(torch.isfinite(y).all()):
                break
        return largest, False

    def _plugin_suspects(self) -> str:
        """The layer's plugins as the suspects of a NaN: those not built in; the built-in ones are
        tested on such inputs and unlikely the cause."""
        external, built_in = [], []
        for kind in ("inner_model", "inner_loss", "update_rule"):
            obj = getattr(self, kind)
            (built_in if is_built_in(kind, obj) else external).append(plugin_label(kind, obj))
        if external:
            also = f"; the built-in {', '.join(built_in)} are unlikely the cause" if built_in else ""
            return (
                f"the likely source is a NaN or inf computed by the layer's plugins that are not built in, "
                f"{', '.join(external)} (e.g. a sqrt, log or division at 0 in a loss or its gradient, where a "
                f"prediction equals its target){also}"
            )
        return (
            f"its plugins are all built in ({', '.join(built_in)}) and unlikely the cause; check the layer's "
            f"parameters for huge values and norm_eps (now {self.norm_eps:g}), and please report the case "
            "with its input if they look ordinary"
        )

    def _inference_chunks(self, x: torch.Tensor, state: TTTState) -> list[tuple[int, int]]:
        """Token ranges to read one after the other: the whole call, unless it runs without autograd
        and is longer than ``inference_chunk_size`` (then chunks that end on mini-batch boundaries)."""
        tokens = x.shape[1]
        limit = self.inference_chunk_size
        if limit is None or tokens <= limit:  # the common case (and every decoded token): no scan of tensors
            return [(0, tokens)]
        grad_needed = torch.is_grad_enabled() and (
            x.requires_grad
            or any(p.requires_grad for p in self.parameters())
            or any(t.requires_grad for t in state.tensors().values())
        )
        if grad_needed:
            return [(0, tokens)]
        size = max(self.mini_batch_size, limit - limit % self.mini_batch_size)
        first = size - state.position % self.mini_batch_size  # the first chunk closes its mini-batch
        ends = [*range(first, tokens, size), tokens]
        return list(zip([0, *ends[:-1]], ends, strict=True))

    def _forward_chunk(self, x: torch.Tensor, state: TTTState) -> tuple[torch.Tensor, TTTState]:
        views, lr, tau, conv_history = self._read(x, state)
        # Under autocast, or with the layer in bfloat16 / float16, the projections ran in low
        # precision; the inner scan (state, inner LayerNorm statistics, gradient sums) runs in
        # ``scan_dtype`` (at least float32) with autocast off, and its outputs go back to the weights'
        # dtype for the post-norm and o_proj (under autocast those choose their own dtype).
        decay, momentum, decay_log = self.scan_gates(x)
        if not self.update_rule.uses_token_scale:
            lr, tau = _without_token_scale(lr, tau), None
        views, gates = self.in_scan_dtype(views, lr, tau, decay, momentum, decay_log)
        inner_out, new_state = run_scan_without_autocast(
            x.device.type, self._run_scan_recorded, state, views, *gates
        )
        new_state = replace(new_state, conv_history=conv_history)
        # Back to the weights' dtype (a no-op for float32 and float64 layers, under autocast or not): a
        # bfloat16 layer's post-norm takes bfloat16, also under autocast.
        inner_out = inner_out.to(self.post_norm.weight.dtype)
        return self._output(x, inner_out), new_state

    @run_eagerly("innerloop: the inner scan runs eagerly")  # see the note above _CALLS_IN_PROGRESS
    def _run_scan_recorded(self, state: TTTState, views: Views, *scan_inputs: torch.Tensor | None) -> tuple:
        """:func:`~innerloop.core.scan.run_scan` of this layer's rule and task on ``views`` and ``(lr,
        tau, decay, momentum, decay_log)``; a rule that dispatches nothing (a plugin's own loop) is recorded too."""
        # the state check reads the state's ints (its mini-batch offset), eagerly: traced, dynamo failed on
        # comparing a bool with the symbolic offset of a decoded token ("BooleanAtom not allowed")
        decay, momentum, decay_log = scan_inputs[2:]
        _check_gate_range(self, decay, decay_log)
        forgets = decay is not None or decay_log is not None
        self._check_rule_state_fits_gates(state, forgets, momentum is not None)
        record = self._dispatch_record()
        recorded = len(record)
        out = run_scan(
            self.update_rule, state, self.inner_task(), views, *scan_inputs[:4], decay_log=decay_log
        )
        if len(record) == recorded:
            label = plugin_label("update_rule", self.update_rule)
            record.append(("torch", f"{label} runs its own forward: no kernel dispatch"))
        return out

    def in_scan_dtype(
        self, views: Views, *tensors: torch.Tensor | None
    ) -> tuple[Views, tuple[torch.Tensor | None, ...]]:
        """``views`` and ``tensors`` (lr, tau, gates; None stays None) cast to :attr:`scan_dtype`,
        what the inner scan reads (a no-op where they are in it already)."""
        dtype = self.scan_dtype
        views = Views(*(v.to(dtype) for v in (views.query, views.key, views.value)))
        return views, tuple(None if t is None else t.to(dtype) for t in tensors)

    def _output(self, x: torch.Tensor, inner_out: torch.Tensor) -> torch.Tensor:
        """``y [B, T, D]`` from the inner outputs ``[B, H, T, f]``: post-norm, optional gate, o_proj."""
        batch, tokens, _ = x.shape
        out = inner_out.transpose(1, 2).reshape(batch, tokens, self.hidden_size)  # [B, T, D]
        out = self.post_norm(out)
        if self.use_gate:
            out = F.gelu(self.g_proj(x), approximate="tanh") * out
        return self.o_proj(out)

    @property
    def last_dispatch(self) -> tuple[str, str] | None:
        """``(path, reason)`` of the last fast-path decision (None before any), see ``dispatches``."""
        return self.dispatches[-1] if self.dispatches else None

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, inner_model={self.inner_model.name!r}, "
            f"inner_loss={self.inner_loss.name!r}, update_rule={self.update_rule.name!r}, "
            f"mini_batch_size={self.mini_batch_size}, base_lr={self.base_lr}, use_gate={self.use_gate}, "
            f"share_qk={self.share_qk}, kernel={self.kernel!r}"
        )


__all__ = [
    "CALL_OPTIONS",
    "MAX_MINI_BATCH_SIZE",
    "ModelTooLargeError",
    "NonFiniteRowsError",
    "TTTLayer",
    "check_head_split",
    "check_inner_norm_width",
    "head_counts",
    "check_layer_arguments",
    "check_norm_eps",
    "check_positive_int",
    "checked_call_option",
    "refuse_built_option_change",
    "is_built_in",
    "is_real",
    "resolve_plugins",
]
