"""Numeric building blocks shared by the layer, the update rules and the kernels' references.

Everything here is plain differentiable torch, written to reproduce the reference implementation
(test-time-training/ttt-lm-pytorch) number for number, including its float32 RoPE tables and its
polynomial for the derivative of tanh-GELU. One difference remains, by choice: the reference
differentiates its forward GELU values (in the outer backward) with torch's exact derivative and uses
the polynomial only for the inner gradient; here GELU's autograd derivative is the polynomial
everywhere (:class:`_GeluTanh`), so that the primal form (autograd) and the dual form agree to float64
precision. Outputs and inner gradients equal the reference's; TTT-MLP's outer gradients differ from it
by about 1e-9 relative in float64 (the polynomial's truncated constant; up to a few 1e-8 on a tensor whose
gradient is small), invisible in float32.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import operator
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, overload

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch._C._functorch import is_functorch_wrapped_tensor
from torch.autograd.function import FunctionCtx

# The reference's constants for the derivative of tanh-GELU (Megatron's fused bias-gelu). They are
# truncated (0.79788456 vs sqrt(2/pi) = 0.7978845608...), which is visible in float64, so we keep them.
_GELU_C = 0.79788456
_GELU_C3 = 0.1070322243
_GELU_FLAT = 100.0  # |x| beyond which tanh-GELU's derivative is exactly 0 or 1 in float32 and float64


def gelu_tanh_derivative(x: torch.Tensor) -> torch.Tensor:
    """d/dx gelu_tanh(x), exactly as the reference computes it for the inner gradient.

    ``x`` is clamped to [-100, 100] first: beyond about 10 the tanh is exactly +-1 (the derivative
    exactly 0 or 1), and the clamp keeps ``x * x`` from overflowing into ``0 * inf = nan`` there.
    """
    x = x.clamp(-_GELU_FLAT, _GELU_FLAT)
    tanh_out = torch.tanh(_GELU_C * x * (1 + 0.044715 * x * x))
    return 0.5 * x * ((1 - tanh_out * tanh_out) * (_GELU_C + _GELU_C3 * x * x)) + 0.5 * (1 + tanh_out)


class _GeluTanh(torch.autograd.Function):
    """tanh-GELU whose autograd derivative is the reference's polynomial.

    The forward is ``F.gelu(x, approximate="tanh")``. The backward uses
    :func:`gelu_tanh_derivative`, written in differentiable torch ops, so gradients of gradients
    (the outer loop through the inner loop) and ``torch.func``'s reverse-mode transforms work through
    it. This makes the generic primal form (autograd) and the dual form (closed form) agree to float64
    precision. :class:`_GeluTanhForwardMode` adds forward mode.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")

    @staticmethod
    def setup_context(ctx: FunctionCtx, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        (x,) = inputs
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)

    @staticmethod
    def backward(ctx: FunctionCtx, grad_output: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad_output * gelu_tanh_derivative(x)


class _GeluTanhForwardMode(_GeluTanh):
    """:class:`_GeluTanh` with a ``jvp`` (the same derivative), for ``torch.func.jvp``, ``jacfwd`` and
    ``hessian``. Eager only: ``torch.compile`` cannot trace an autograd.Function that defines ``jvp``
    (each call would break the graph), so compiled code takes :class:`_GeluTanh`."""

    @staticmethod
    def jvp(ctx: FunctionCtx, x_tangent: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return x_tangent * gelu_tanh_derivative(x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """tanh-approximated GELU with the reference's derivative (see :class:`_GeluTanh`), in forward
    mode too except under ``torch.compile``."""
    if torch.compiler.is_compiling():
        return _GeluTanh.apply(x)
    return _GeluTanhForwardMode.apply(x)


def decay_from_log(log_gate: torch.Tensor) -> torch.Tensor:
    """``decay = 1 - exp(log_gate)``, exact in value and in every derivative, for log gates ``<= 0``.

    The value is ``-expm1(log_gate)`` (``1 - exp`` holds a small decay only to ``eps / decay`` relative). Its
    gradient is ``-exp(log_gate)``, taken from ``1 - exp(log_gate)``: torch's ``expm1`` backward computes
    ``exp`` as ``expm1 + 1``, which in float32 is 0 for ``log_gate < -17`` (a decay of 1 there: the gate's
    whole gradient silently lost) and ``eps / a`` relative for a gate ``a`` (6e-4 at ``a = 1e-4``)."""
    plain = 1 - log_gate.exp()  # the exact derivatives; its value off by up to eps in a decay near 0
    return plain + (-torch.expm1(log_gate) - plain).detach()


def log_segment_sums(logs: torch.Tensor) -> torch.Tensor:
    """``sums[..., i, j] = sum_{r = j+1..i} logs[..., r]`` ``[..., N, N]`` for ``logs [..., N]``: the log of
    the decay from token ``j`` to token ``i`` (0 on the diagonal and above it, where it means nothing).

    Each entry sums its own terms only (a cumulative sum down each column of a table), in ``logs``' dtype.
    ``G_i - G_j`` with ``G = cumsum(logs)`` is the same number but carries the rounding of the whole
    sum ``|G| eps``: a segment of strong gates, or one full reset (a log clamped to -800), put that
    absolute error into every later factor (float64: 2e-12 relative after a few resets, where a
    product of the factors is 2e-16). Differentiable to every order; ``-inf`` gives ``-inf`` (no NaN).
    """
    size = logs.shape[-1]
    strictly_below = torch.ones(size, size, dtype=torch.bool, device=logs.device).tril(-1)
    # row i holds logs_i in the columns j < i; the cumulative sum down column j adds r = j+1..i
    table = torch.where(
        strictly_below, logs[..., :, None], torch.zeros((), dtype=logs.dtype, device=logs.device)
    )
    return table.cumsum(dim=-2)


def gate_sigmoid(logits: torch.Tensor) -> torch.Tensor:
    """``sigmoid(logits)``, its value exactly torch's, its derivatives those of ``exp(logsigmoid(logits))``.

    torch's sigmoid backward takes ``s (1 - s)`` from the rounded output ``s``: in float32 ``1 - s`` keeps
    only ``eps / (1 - s)`` of itself (4.6e-4 relative at a logit of 10) and is 0 from a logit of 17 on,
    so a gate held near 1 (a step ``beta``, a momentum) loses its gradient, silently. ``exp(logsigmoid)``
    takes ``1 - s`` as ``sigmoid(-logits)``: its gradient is exact there (the second derivative, rarely
    needed, is torch's ``log_sigmoid`` double backward, which still rounds at large logits)."""
    precise = F.logsigmoid(logits).exp()  # within an ulp or two of sigmoid's value
    return precise + (torch.sigmoid(logits) - precise).detach()


def overflow_safe_scale(x: torch.Tensor) -> torch.Tensor:
    """A factor per row (``[..., 1]``, detached) that brings rows too large for their squares into a
    range where they cannot overflow: exactly 1 for every ordinary row (whose numbers are unchanged).

    LayerNorm is invariant to scaling its row, so it may be computed on a scaled copy. A row is
    scaled (to a largest |value| of ``2**limit``) when its largest |value| exceeds that, with
    ``limit`` such that ``width * (2 * 2**limit)**2`` stays below the dtype's largest value. The
    variance of such a row (nonzero: at least an ulp of ``2**limit``, squared) dwarfs any ``eps``,
    so ``eps`` need not be rescaled with it; the scaling costs one rounding.
    """
    return (_overflow_bound(x) / _row_peaks(x.detach())).clamp(max=1.0)


def _row_peaks(x: torch.Tensor) -> torch.Tensor:
    """The largest ``|value|`` of each row (last dim) of ``x``, ``[..., 1]``, without a ``|x|`` copy."""
    # torch's CPU aminmax over a dim is not vectorised (nor is vector_norm's inf norm): two reductions
    # there are 6-8x faster
    if x.device.type == "cpu":
        low, high = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    else:  # one pass
        low, high = torch.aminmax(x, dim=-1, keepdim=True)
    return torch.maximum(high.abs(), low.abs())  # (not max(high, -low): a zero row would give -0.0)


def _bit_length(n: int | torch.SymInt) -> int:
    """``n.bit_length()`` of a size ``n >= 0``, found by comparisons: of a symbolic size (``torch.compile``
    with dynamic shapes) they guard the range ``[2**(k - 1), 2**k)`` that holds it, where ``bit_length``
    specialised the graph to its value (a layer of another head dim recompiled). Dynamo traces
    ``isinstance(n, int)`` as true for a symbolic size: one way for both."""
    length = 0
    while n >= 1 << length:
        length += 1
    return length


def _overflow_bound(x: torch.Tensor) -> float:
    """The largest |value| a row of ``x`` may hold before its squares could overflow (see above)."""
    max_exponent = math.frexp(torch.finfo(x.dtype).max)[1]  # 128 for float32: max < 2**128
    return 2.0 ** ((max_exponent - 4 - _bit_length(x.shape[-1])) // 2)


def host_reads_are_free(x: torch.Tensor) -> bool:
    """Whether code may branch on a value of ``x`` at no cost: a CPU tensor (on a GPU a read waits for
    the device), outside ``torch.compile`` (a graph break) and torch.func transforms (no value to read)."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling() and not is_functorch_wrapped_tensor(x)


def _peak_read_on_the_host(x: torch.Tensor) -> float | None:
    """The largest ``|value|`` of a non-empty ``x`` (NaN if it holds one), read on the host in one
    vectorised pass, where :func:`host_reads_are_free`; None elsewhere."""
    if not host_reads_are_free(x):
        return None
    low, high = torch.aminmax(x.detach())  # (over all of x: vectorised on the CPU, unlike |x|.amax)
    return float(torch.maximum(low.abs(), high.abs()))


def overflow_safe_scale_if_needed(x: torch.Tensor) -> torch.Tensor | None:
    """:func:`overflow_safe_scale`, or ``None`` when no row of ``x`` needs scaling, which a CPU tensor
    learns from one reduction (its common case then skips the per-row pass and the multiply) where
    :func:`host_reads_are_free`; elsewhere (CUDA, ``torch.compile``, torch.func transforms) the scale is
    always computed, without a host sync or a data-dependent branch."""
    peak = _peak_read_on_the_host(x) if x.numel() else None
    # a NaN compares False: rows are then checked one by one
    if peak is not None and peak <= _overflow_bound(x):
        return None
    return overflow_safe_scale(x)


def _row_variance(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """The biased variance of each row of ``x`` (``mean`` its rows' means, for an empty ``x``, where
    ``torch.var`` warns that it has no degrees of freedom: a batch of no sequences is no mistake)."""
    return x.var(dim=-1, keepdim=True, unbiased=False) if x.numel() else mean


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim with per-head ``weight``/``bias`` broadcast from the left.

    Written out (rather than ``F.layer_norm``) because the weight carries a head dimension. Rows
    whose squares would overflow are normalised by a scaled copy (:func:`overflow_safe_scale`).
    """
    x = x * overflow_safe_scale(x)
    mean = x.mean(dim=-1, keepdim=True)
    var = _row_variance(x, mean)
    std = torch.sqrt(var + eps)
    return weight * ((x - mean) / std) + bias


def layer_norm_backward(
    x: torch.Tensor, grad_y: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """Gradient of ``layer_norm(x)`` w.r.t. ``x`` given the gradient ``grad_y`` of its output.

    The closed form the reference fuses with the L2 loss (``ln_fused_l2_bwd``), for any upstream
    gradient. Differentiable (the outer loop backpropagates through it). Overflow-safe like
    :func:`layer_norm`: the statistics of a scaled row ``s x`` give ``d/dx = s d/d(s x)``.
    """
    dim = x.shape[-1]
    scale = overflow_safe_scale(x)
    x = x * scale
    mean = x.mean(dim=-1, keepdim=True)
    var = _row_variance(x, mean)
    std = torch.sqrt(var + eps)
    x_hat = (x - mean) / std
    grad_x_hat = grad_y * weight
    return (
        (1.0 / dim)
        * (
            dim * grad_x_hat
            - grad_x_hat.sum(dim=-1, keepdim=True)
            - x_hat * (grad_x_hat * x_hat).sum(dim=-1, keepdim=True)
        )
        / std
        * scale
    )


FLOAT32_MAX = torch.finfo(torch.float32).max
"""The largest float32 number (3.4e38): a model computes in float32, where a larger one is inf. The one
definition: the config's bounds (:mod:`innerloop.models.config`) and :data:`MAX_ROPE_THETA` read it."""

MAX_ROPE_THETA = FLOAT32_MAX
"""The largest RoPE base (3.4e38): :func:`rope_inverse_frequencies` computes ``theta**(2i/head_dim)`` in
float32, where a larger base is inf and every frequency but the first 0 (1e39's are 1.3e-5, ... for
head_dim 16), with no error."""


def rope_inverse_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """RoPE inverse frequencies ``[head_dim // 2]``, in float32 as the reference computes them (``theta``
    at most :data:`MAX_ROPE_THETA`, which the layers check)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return 1.0 / (theta**exponents)


def rope_cos_sin(
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    dtype: torch.dtype,
    angle_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables ``[T, head_dim // 2]`` for integer ``positions [T]``.

    The angles are computed in ``angle_dtype`` and the tables then cast to ``dtype``: float32 by
    default, as the reference does (so float64 runs match it exactly).
    """
    angles = positions.to(angle_dtype)[:, None] * inv_freq.to(device=positions.device, dtype=angle_dtype)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope_interleaved(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, in_place: bool = False
) -> torch.Tensor:
    """Rotate interleaved pairs ``(x[2i], x[2i+1])`` of ``x [..., f]`` by the angles in cos/sin.

    ``cos``/``sin`` (``[..., f/2]``) broadcast against ``x``'s leading dims. Equivalent to the
    reference's permute -> rotate-half -> un-permute round trip. float32/float64 inputs use one
    complex multiplication (the same arithmetic, one pass over memory); with ``in_place`` (only for a
    tensor that no autograd graph needs) that result is written into ``x`` when ``x`` can be viewed as
    complex pairs. Always use the returned tensor: other dtypes and layouts (and code being compiled
    by ``torch.compile``) return a new one, computed with real arithmetic.
    """
    complex_view_ok = (
        not torch.compiler.is_compiling()  # inductor does not generate code for complex numbers
        and x.stride(-1) == 1
        and x.storage_offset() % 2 == 0
        and all(s % 2 == 0 for s in x.stride()[:-1])
    )
    if x.dtype in (torch.float32, torch.float64) and complex_view_ok:
        pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2)))  # [..., f/2] complex
        if in_place:
            pairs.mul_(torch.complex(cos, sin))
            return x
        return torch.view_as_real(pairs * torch.complex(cos, sin)).flatten(-2)
    pairs = x.unflatten(-1, (-1, 2))  # [..., f/2, 2]
    even, odd = pairs[..., 0], pairs[..., 1]
    return torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)


def causal_depthwise_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, history: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise 1-D convolution over time that can be resumed.

    Args:
        x: ``[B, T, C]`` new inputs.
        weight: ``[C, 1, k]`` as in ``nn.Conv1d(C, C, k, groups=C)``.
        bias: ``[C]`` or None.
        history: ``[B, k - 1, C]`` the last ``k - 1`` inputs before ``x`` (zeros at sequence start).

    Returns:
        ``(y [B, T, C], new_history [B, k - 1, C])``: ``y`` in ``x``'s dtype, the history in the
        dtype it was given (a TTT layer keeps its state in float32 also when ``x`` is bfloat16).
    """
    kernel, tokens = weight.shape[-1], x.shape[1]
    padded = torch.cat([history.to(x.dtype), x], dim=1)  # [B, k-1+T, C]
    # One multiply-add per tap over [B, T, C] rows: the output is contiguous in x's layout. F.conv1d
    # on the transposed input returned a [B, C, T] buffer seen as [B, T, C], whose strides made every
    # later elementwise op and its backward read across rows (a DeltaNet layer's training step 20% slower).
    # Low precision accumulates in float32 and rounds once, as the convolution did.
    accumulate = torch.promote_types(x.dtype, torch.float32)
    taps = weight[:, 0, :].t().to(accumulate)  # [k, C]
    y = padded[:, :tokens] * taps[0]
    for j in range(1, kernel):
        y = torch.addcmul(y, padded[:, j : j + tokens], taps[j])
    y = (y if bias is None else y + bias.to(accumulate)).to(x.dtype)
    # a copy (a few rows): a view would keep the whole padded input alive in the state. Contiguous: a
    # copy that preserved the slice's strides kept the call's length in them at batch size 1 (torch.compile
    # guards on strides, of size-1 dims too: the first decoded token recompiled for every prompt length)
    new_history = (
        padded[:, padded.shape[1] - (kernel - 1) :].to(
            history.dtype, memory_format=torch.contiguous_format, copy=True
        )
        if kernel > 1
        else history
    )
    return y, new_history


def owning(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a copy of it when it is a view of a buffer more than twice its size: what a recurrent
    state keeps of a call (a window of keys, a chunk of inputs, a convolution's last inputs) must not
    keep the call's whole input alive (a 10,000-token prompt's keys behind a 31-token window), which
    ``nbytes`` would not show and ``torch.save`` would write. Gradients flow through the copy. Under
    ``torch.compile``, which cannot trace a storage's size, always a copy."""
    if torch.compiler.is_compiling():
        return t.clone()
    try:
        held = t.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):  # tensors without storage (functorch's, sparse): as they are
        return t
    return t.clone() if held > 2 * t.numel() * t.element_size() else t


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` (relative RMS error), as a float."""
    diff = (actual.double() - expected.double()).norm().item()
    scale = expected.double().norm().item()
    if scale == 0.0:
        return diff
    return diff / scale


def integer_targets(logits: torch.Tensor, targets: Any) -> torch.Tensor:
    """``targets`` as int64 for a cross-entropy of ``logits [..., V]``: a tensor of integer ids (int32 ones
    too) shaped as the logits without their last dimension; else one error naming ``targets`` (torch's
    were "expected target dtype to be Long or Byte" for int32 ids and "Expected input batch_size (18) to
    match target batch_size (16)" for a length off by one)."""
    if (
        not isinstance(targets, torch.Tensor)
        or targets.dtype == torch.bool
        or targets.is_floating_point()
        or (targets.is_complex())
    ):
        kind = f"dtype {targets.dtype}" if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise TypeError(f"targets must be a tensor of integer token ids (or the ignore index), got {kind}")
    if tuple(logits.shape[:-1]) != tuple(targets.shape):
        raise ValueError(
            f"logits must be [..., V] and targets [...] (the logits' shape without V), got logits "
            f"{tuple(logits.shape)} and targets {tuple(targets.shape)}"
        )
    return targets.long()


def loss_precision(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` in at least float32, what a cross-entropy reads: bfloat16 or float16 logits (a model
    cast whole, Lightning's ``bf16-true``) are widened, as ``torch.autocast`` widens them for its loss
    (a bfloat16 log-softmax and sum rounded the loss to 3 digits); float32 and float64 stay as they are."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def scored_cross_entropy_sum(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed cross-entropy of ``logits [..., V]`` against ``targets [...]`` (integer ids,
    :func:`integer_targets`) over the targets that are not ``ignore_index``, and how many those are (a
    0-d int64 tensor)."""
    targets = integer_targets(logits, targets).reshape(-1)
    total = F.cross_entropy(
        loss_precision(logits).reshape(-1, logits.shape[-1]),
        targets,
        ignore_index=ignore_index,
        reduction="sum",
    )
    return total, (targets != ignore_index).sum()


def mean_scored_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Mean cross-entropy of ``logits [..., V]`` against ``targets [...]`` (integer ids,
    :func:`integer_targets`) over the targets that are not ``ignore_index``; 0, attached to the graph
    (zero gradients), where none is left to score, not the mean over nothing, NaN, which would fill every
    gradient with NaN."""
    total, scored = scored_cross_entropy_sum(logits, targets, ignore_index)
    return total / scored.clamp_min(1)


def chunk_mean_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int,
    ignore_index: int,
    skip_target_id: int | None = None,
) -> torch.Tensor:
    """The official TTT-E2E training loss: the mean over sequences of the mean over chunks of each chunk's
    mean cross-entropy over its scored targets.

    ``logits [B, T, V]``, ``targets [B, T]``; target ``t`` belongs to chunk ``t // chunk_size`` (the last
    chunk may be shorter). A target equal to ``ignore_index`` or ``skip_target_id`` is not scored (the
    official loss mask). A chunk with no scored target counts as 0 in its sequence's mean, as the official
    ``sum / max(count, 1e-10)`` makes it. A row with no scored target at all is padding, not a sequence:
    it is left out of the mean over sequences (the official pipeline never pads; innerloop's validation
    shards do), and a batch with nothing scored gives 0 attached to the graph. With every target scored
    and ``T`` a multiple of ``chunk_size`` this is :func:`mean_scored_cross_entropy`.
    """
    chunk_size = check_positive_int("chunk_size", chunk_size)
    if not isinstance(targets, torch.Tensor) or targets.dim() != 2 or logits.shape[:-1] != targets.shape:
        shape = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ValueError(
            f"logits must be [B, T, V] and targets [B, T], got logits {tuple(logits.shape)} and targets {shape}"
        )
    targets = integer_targets(logits, targets)
    batch, tokens = targets.shape
    scored = targets != ignore_index
    if skip_target_id is not None:
        scored = scored & (targets != skip_target_id)
    targets = targets.masked_fill(~scored, ignore_index)  # an unscored target's loss is exactly 0
    per_token = F.cross_entropy(
        loss_precision(logits).reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=ignore_index,
        reduction="none",
    ).view(batch, tokens)
    num_chunks = -(-tokens // chunk_size)
    width = chunk_size if num_chunks > 1 else tokens  # one chunk: the sequence (memory never grows with C)
    missing = num_chunks * width - tokens  # the last chunk's missing tail, padded as unscored
    per_token, scored = F.pad(per_token, (0, missing)), F.pad(scored, (0, missing))
    chunk_sums = per_token.view(batch, num_chunks, width).sum(-1)  # [B, N]
    chunk_counts = scored.view(batch, num_chunks, width).sum(-1).clamp_min(1)  # [B, N]
    sequences = scored.any(dim=1).sum().clamp_min(1)  # rows that score something; 0 / 1 for no tokens
    return (chunk_sums / chunk_counts).sum() / (sequences * max(num_chunks, 1))  # T = 0: 0, as nothing scored


TORCH_SEEDS = range(-(2**63), 2**64)
"""The seeds of torch's generator (``torch.Generator.manual_seed`` raised 'Overflow when unpacking long long'
outside them): the one range of every seed that seeds one (``compare``'s, the testing kit's, the CLI's
``--seed``), written :data:`TORCH_SEEDS_TEXT` in their messages."""

TORCH_SEEDS_TEXT = "[-2**63, 2**64)"
""":data:`TORCH_SEEDS` as the error messages write it."""


def is_integer(value: Any) -> bool:
    """Whether ``value`` is an integer by the library's one rule, :func:`as_integer`'s (this is
    ``as_integer(value) is not None``, for a check that needs only the answer): a Python int, a numpy
    integer or a 0-d integer tensor; not a bool (True is no size), a float (4.0 neither: a float where an
    integer is meant is refused, not truncated) or a string."""
    return as_integer(value) is not None


def integer_or_given(value: Any) -> Any:
    """``value`` as the Python int it holds if it is an integer (:func:`as_integer`), else ``value``
    itself, for a check to refuse by name: what the state and cache objects do with their positions
    (a numpy or 0-d tensor position is held as an int, so that arithmetic on it neither wraps at int64
    nor turns the next state's position into a tensor). A Python int (or a torch.SymInt, a position
    torch.compile traces symbolically) is returned as it is: reading it through ``operator.index`` would
    make the compiler specialise on its value and recompile at every decoding step."""
    if isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool):
        return value
    integer = as_integer(value)
    return value if integer is None else integer


def as_integer(value: Any) -> int | None:
    """The rule of what an integer argument is, and its value: ``value`` as a Python int if it is an
    integer (a Python int, a numpy integer, a 0-d integer tensor), else None, for a check that goes on to
    use the int (:func:`is_integer` and :func:`integer_or_given` are this rule's other two forms): not a bool (nor a bool tensor, which ``operator.index`` reads as 0 or 1), a float (a float
    tensor has ``__index__`` too, which raises) or a string, nor a tensor of one element that is not 0-d
    (torch's ``__index__`` reads ``tensor([[3]])`` as 3; numpy refuses ``array([3])``)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, torch.Tensor) and (value.dtype == torch.bool or value.dim() != 0):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


@overload
def check_positive_int(
    name: str, value: Any, none_allowed: Literal[False] = False, most: int | None = None
) -> int: ...


@overload
def check_positive_int(name: str, value: Any, none_allowed: bool, most: int | None = None) -> int | None: ...


def check_positive_int(
    name: str, value: Any, none_allowed: bool = False, most: int | None = None
) -> int | None:
    """``value`` as a Python int (None stays None, where ``none_allowed``); raise naming ``name`` unless it
    is an integer >= 1 by :func:`is_integer`'s rule (a numpy integer or a 0-d integer tensor is read as
    its int). ``most``: the largest valid value, named in the message so that it states the whole range
    (the caller checks it, with its reason)."""
    if none_allowed and value is None:
        return None
    integer = as_integer(value)
    if integer is None or integer < 1:
        valid = "a positive integer" + ("" if most is None else f" <= {most}")
        valid += " or None" if none_allowed else ""
        raise ValueError(f"{name} must be {valid}, got {value!r}")
    return integer


def check_path_argument(path: Any, name: str = "path") -> None:
    """A TypeError naming ``name`` unless ``path`` is a str or an ``os.PathLike`` (``Path(None)`` fails
    inside pathlib naming no argument, and ``open(3)`` reads, then closes, file descriptor 3)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name}={path!r} ({type(path).__name__}) must be a path (a str or os.PathLike)")


def user_path(path: str | os.PathLike[str]) -> Path:
    """A path argument as a ``Path`` with a leading ``~`` read as the home folder, as a shell reads an
    unquoted one: the one reading of a user's path, so that a reader of a file finds the one its writer
    (or another reader of it) used (``pathlib`` leaves ``~`` as a folder named ``~``). By
    :func:`os.path.expanduser`'s rule: a ``~USER`` of no known user, and ``./~x`` (a name starting with
    ``~`` in a folder), stay as given, where pathlib's ``expanduser`` raised ``RuntimeError('Could not
    determine home directory.')`` (it reads ``./~x`` as ``~x``)."""
    return Path(os.path.expanduser(os.fspath(path)))


def first_non_finite(named: Iterable[tuple[str, Any]]) -> tuple[str, int, int] | None:
    """The first floating-point tensor of ``named`` (``(name, value)`` pairs; other values and meta
    tensors are skipped) that holds a NaN or an infinity, as ``(name, how many, of how many)``; None
    when there is none. The loaders' refusal of non-finite weights reads it."""
    for name, tensor in named:
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.device.type != "meta":
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                return name, bad, tensor.numel()
    return None


def is_flag(value: Any) -> bool:
    """Whether ``value`` is a bool, Python's or numpy's (``np.True_``: what numpy's comparisons and
    arrays' items give); not a string such as 'false' (which would be true), a tensor or an int."""
    kind = type(value)
    # numpy's bool is named 'bool' too: its module tells it from Python's
    return isinstance(value, bool) or (kind.__module__ == "numpy" and kind.__name__ in ("bool", "bool_"))


def type_name(value: Any) -> str:
    """The name of ``value``'s type for a message: a builtin's bare (``int``), any other with its module
    (``numpy.bool``, ``numpy.int64``, ``torch.Tensor``): numpy's bool is named ``bool`` too, so that
    'must be bool, got bool' named no difference."""
    kind = type(value)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def plain_conversion(value: Any) -> str | None:
    """``bool``, ``int`` or ``float``: the Python type ``value`` converts to without loss when it is a
    number of another library (numpy's bool, a numpy or 0-d torch integer, a numpy float, a Fraction),
    the one a message tells to convert it with; None for a Python number or anything else."""
    if isinstance(value, (bool, int, float)):
        return None
    if is_flag(value):
        return "bool"
    if as_integer(value) is not None:
        return "int"
    return "float" if isinstance(value, numbers.Real) else None


def check_flag(name: str, value: Any) -> None:
    """A TypeError naming ``name`` unless ``value`` is a bool, Python's or numpy's (a string such as
    'false' would be true, and so would a tensor or a list of one False)."""
    if not is_flag(value):
        raise TypeError(f"{name}={value!r} ({type_name(value)}) must be True or False (a bool)")


def is_power_of_two(n: int) -> bool:
    """True for 1, 2, 4, 8, ..."""
    return n > 0 and (n & (n - 1)) == 0


def overflow_safe_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` with each row (last dim) whose largest ``|entry|`` is so large that the sum of the row's
    squares (or the cubes of a norm's backward) could overflow multiplied by the power of two that brings
    it below that (2**29 for rows of 768 in float32); other rows are multiplied by 1 (exactly themselves).

    RMSNorm and LayerNorm are scale-invariant up to their eps, and an eps is negligible beside the mean
    square of such a row, so normalising the scaled row gives the norm of the row itself, where torch's
    norms square the row as it is: a finite row whose mean square overflows to inf is normalised to 0
    (an RMSNorm's output) or to its bias (a LayerNorm's), silently. The threshold is that of the
    precision the norm computes in (float32 for bfloat16 and float16, whose norms torch computes in
    float32), and the scale is detached (it is a constant of the row, as an exact power of two).

    On the CPU, outside ``torch.compile`` and torch.func transforms, one read of ``x`` finds whether any
    row needs it, and ``x`` itself is returned when none does (the common case: no per-row pass, no
    multiply in the graph). Elsewhere the scale is always applied (no data-dependent branch, no sync).
    """
    if not x.dim() or not x.numel():  # nothing to scale (a batch of no rows, rows of no entries)
        return x
    compute = torch.promote_types(x.dtype, torch.float32)
    # a row's entries below 2**e with e a quarter of the exponent range: the backward's cubes stay finite
    safe_exponent = int((math.log2(torch.finfo(compute).max) - math.log2(x.shape[-1])) / 4)
    peak = _peak_read_on_the_host(x)
    # a NaN compares False: rows are then scaled one by one
    if peak is not None and peak < 2.0**safe_exponent:
        return x
    _, exponent = torch.frexp(_row_peaks(x.detach()).to(compute))  # each row's peak < 2**exponent
    shift = (exponent - safe_exponent).clamp_min(0)
    return x * torch.exp2(-shift.to(compute)).to(x.dtype)


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` that normalises a finite row whose squares overflow (entries beyond about
    1e19 in float32) to its true value instead of to 0 (:func:`overflow_safe_rows`); every other row is
    normalised exactly as ``torch.nn.RMSNorm`` does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(overflow_safe_rows(x))


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` that normalises a finite row whose squares overflow to its true value
    instead of to its bias (:func:`overflow_safe_rows`); every other row exactly as torch does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(overflow_safe_rows(x))


def transformed_or_dual(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether a torch.func transform (grad, vmap, jvp, jacfwd, ...) wraps any of ``tensors`` or
    ``torch.autograd.forward_ad`` made one dual: paths without a forward derivative or a batching rule
    (fused kernels, autograd.Functions without ``jvp``) step aside for torch's own ops there. Outside a
    dual level (the usual case) it reads one flag and one int per tensor."""
    tensors = list(tensors)
    if any(is_functorch_wrapped_tensor(t) for t in tensors):
        return True
    if getattr(forward_ad, "_current_level", 0) < 0:  # private; if torch drops it, every tensor is asked
        return False
    return any(forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def saved_tensors_hooks_on() -> bool:
    """Whether saved-tensor hooks are on (``torch.autograd.graph.saved_tensors_hooks``, which
    ``torch.utils.checkpoint`` and ``save_on_cpu`` set); torch exposes the question only privately (the
    stack :func:`saved_tensors_hooks_suspended` pops), so False where that function is missing."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(False) is not None


@contextlib.contextmanager
def saved_tensors_hooks_suspended() -> Iterator[None]:
    """No saved-tensor hooks inside the block; the enclosing ones (an activation checkpoint's,
    ``save_on_cpu``'s) are back after it, in their order.

    ``torch.func``'s ``grad`` / ``vjp`` refuse to run under any hooks ("don't yet support saved tensor
    hooks"): the primal form's per-token gradients, an inner loss's default gradient and the registry's
    plugin checks run them, and a layer inside ``torch.utils.checkpoint(..., use_reentrant=False)`` would
    fail there. Inside the block tensors are saved as without a checkpoint (kept, not recomputed; in the
    checkpoint's recomputation too, so the two passes save alike). torch has no public way to suspend
    hooks: these are the stack functions ``torch.autograd.graph.saved_tensors_hooks`` itself calls. Where
    hooks are disabled (under vmap) none applies and nothing is changed.
    """
    autograd = torch._C._autograd
    suspended = []
    if autograd._saved_tensors_hooks_is_enabled():
        while (top := autograd._top_saved_tensors_default_hooks(False)) is not None:
            suspended.append(top)
            autograd._pop_saved_tensors_default_hooks()
    try:
        yield
    finally:
        for pack, unpack in reversed(suspended):
            autograd._push_saved_tensors_default_hooks(pack, unpack)


__all__ = [
    "apply_rope_interleaved",
    "as_integer",
    "causal_depthwise_conv",
    "check_flag",
    "is_flag",
    "loss_precision",
    "log_segment_sums",
    "check_positive_int",
    "decay_from_log",
    "first_non_finite",
    "chunk_mean_cross_entropy",
    "gate_sigmoid",
    "gelu_tanh",
    "gelu_tanh_derivative",
    "host_reads_are_free",
    "is_integer",
    "integer_or_given",
    "is_power_of_two",
    "transformed_or_dual",
    "mean_scored_cross_entropy",
    "scored_cross_entropy_sum",
    "layer_norm",
    "LayerNorm",
    "overflow_safe_rows",
    "overflow_safe_scale",
    "overflow_safe_scale_if_needed",
    "layer_norm_backward",
    "relative_error",
    "RMSNorm",
    "rope_cos_sin",
    "rope_inverse_frequencies",
    "saved_tensors_hooks_on",
    "saved_tensors_hooks_suspended",
]
