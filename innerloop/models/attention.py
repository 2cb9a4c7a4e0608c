"""Baseline mixers: full causal attention and sliding-window attention (torch SDPA, RoPE).

Both keep a key/value cache as their recurrent state, so they decode through the same
``y, state = mixer(x, state)`` call as a TTT layer. Full attention's cache grows with the sequence;
sliding-window attention keeps only the last ``window - 1`` keys, so its memory per token is constant,
and it reads a long input a block of queries at a time (:func:`sliding_window_attention`), so reading
``T`` tokens costs memory and time in proportion to ``T * (window + block)``, not ``T**2``.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch._C._functorch import is_functorch_wrapped_tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from innerloop.core.functional import (
    MAX_ROPE_THETA,
    RMSNorm,
    apply_rope_interleaved,
    integer_or_given,
    is_flag,
    rope_cos_sin,
    rope_inverse_frequencies,
    saved_tensors_hooks_on,
    transformed_or_dual,
)
from innerloop.core.layer import (
    MAX_NORM_EPS,
    check_device_and_dtype,
    check_head_split,
    check_norm_eps,
    check_positive_int,
    check_weights_fit,
    is_real,
    refuse_built_option_change,
)
from innerloop.core.state import cat_rows, check_batch_rows, check_states, same_positions, take_rows


class _Room:
    """Buffers ``[B, H, capacity, f]`` that caches of one sequence are views of, and how far they are
    written (:func:`appended`). Positions below ``filled`` are never written again. ``lock`` makes a
    call's check that it may write the next positions and its claim of them (``filled`` moved past them)
    one step (:func:`_claimed`): two threads continuing one cache at once both wrote them, and each read
    the other's keys (silently wrong logits)."""

    def __init__(self, key: torch.Tensor, value: torch.Tensor, filled: int) -> None:
        self.key, self.value, self.filled = key, value, filled
        self.lock = threading.Lock()

    @classmethod
    def like(cls, key: torch.Tensor, value: torch.Tensor, batch: int, capacity: int) -> _Room:
        """An empty room of ``batch`` sequences and ``capacity`` positions, with ``key``'s and
        ``value``'s heads, head dim, dtype and device."""
        heads, head_dim = key.shape[1], key.shape[3]
        return cls(
            key.new_empty(batch, heads, capacity, head_dim),
            value.new_empty(batch, heads, capacity, head_dim),
            0,
        )


@dataclass(frozen=True)
class KVCache:
    """Keys and values of the tokens a future query may attend to, and how many tokens were read.

    ``key`` and ``value`` are ``[B, H, S, f]`` with RoPE already applied to ``key``; ``position`` is the
    absolute position of the next token. Without autograd, full attention's caches are views of buffers
    with room to grow (``_room``), so that a decoded token is written in place instead of the whole cache
    being copied; a cache is still a value: the ``key`` and ``value`` it holds are what the next call
    attends to, and appending to an older one copies (see :func:`appended`). The room is not an argument:
    a cache built by hand, or by ``dataclasses.replace``, has none.
    """

    key: torch.Tensor
    value: torch.Tensor
    position: int
    _room: _Room | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # a numpy or 0-d tensor integer held as the int it is (the one integer rule, core.functional); anything
        # else is kept for the state's check to refuse by name
        object.__setattr__(self, "position", integer_or_given(self.position))

    @classmethod
    def in_room(cls, key: torch.Tensor, value: torch.Tensor, position: int, room: _Room | None) -> KVCache:
        """A cache whose ``key`` and ``value`` are views of ``room`` (None: a plain cache)."""
        cache = cls(key, value, position)
        object.__setattr__(cache, "_room", room)
        return cache

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (and deep-copied) without the room: the copy owns its keys and values."""
        return {"key": self.key, "value": self.value, "position": self.position}

    @property
    def batch_size(self) -> int:
        """Sequences held (``key.shape[0]``)."""
        return int(self.key.shape[0])

    def detach(self) -> KVCache:
        """The same cache cut from the autograd graph."""
        return KVCache(self.key.detach(), self.value.detach(), self.position)

    def to(self, *args: Any, **kwargs: Any) -> KVCache:
        """The cache moved or cast like ``Tensor.to`` (keys and values)."""
        return KVCache(self.key.to(*args, **kwargs), self.value.to(*args, **kwargs), self.position)

    def clone(self) -> KVCache:
        """A copy whose keys and values own their memory (gradients flow back through the copy)."""
        return KVCache(self.key.clone(), self.value.clone(), self.position)

    def index_select(self, rows: torch.Tensor) -> KVCache:
        """The cache of the sequences ``rows`` (a 1-D int64 tensor of batch rows, repeats allowed), in
        that order."""
        return self._take_rows(check_batch_rows(rows, self.batch_size))

    def _take_rows(self, rows: torch.Tensor) -> KVCache:
        """:meth:`index_select` with ``rows`` already checked. A cache with room to grow, selected without
        autograd (beam search between two decoded tokens), gets a room of the same capacity, so that the
        next token is written in place rather than the selected rows copied once more."""
        room, length = self._room, self.key.shape[2]
        traced = torch.compiler.is_compiling() or is_functorch_wrapped_tensor(self.key)
        if room is None or torch.is_grad_enabled() or traced or room.key.shape[2] <= length:
            return KVCache(take_rows(self.key, rows), take_rows(self.value, rows), self.position)
        index = rows.to(self.key.device)
        new = _Room.like(self.key, self.value, index.shape[0], room.key.shape[2])
        new.filled = length
        torch.index_select(self.key, 0, index, out=new.key[:, :, :length])
        torch.index_select(self.value, 0, index, out=new.value[:, :, :length])
        return KVCache.in_room(new.key[:, :, :length], new.value[:, :, :length], self.position, new)

    @classmethod
    def cat(cls, caches: Sequence[KVCache]) -> KVCache:
        """One cache holding the sequences of ``caches`` one after the other: caches of one layer at
        one position, in one dtype."""
        caches = check_states(caches, cls, "KVCache")
        same_positions([c.position for c in caches], "KVCache")
        key = cat_rows([c.key for c in caches], "key")
        return KVCache(key, cat_rows([c.value for c in caches], "value"), caches[0].position)


def _is_room_view(tensor: torch.Tensor, buffer: torch.Tensor, length: int) -> bool:
    """``tensor`` is ``buffer[:, :, :length]`` itself: the same memory, shape and strides."""
    return (
        tensor.data_ptr() == buffer.data_ptr()
        and tensor.dtype == buffer.dtype
        and tensor.shape == (*buffer.shape[:2], length, buffer.shape[3])
        and tensor.stride() == buffer.stride()
    )


def _room_fits(room: _Room | None, old_k: torch.Tensor, old_v: torch.Tensor, needed: int) -> bool:
    """Whether ``needed`` positions can be written in place into ``room`` after the cache ``old_k,
    old_v``: both are the room's own views (a cache whose key or value was replaced, or rows selected or
    expanded, is not), nobody has written past them, there is space, and the room may be written here
    (an inference tensor only inside inference mode)."""
    cached = old_k.shape[2]
    return (
        room is not None
        and room.filled == cached  # nobody has written past this cache
        and room.key.shape[2] >= needed
        and _is_room_view(old_k, room.key, cached)
        and _is_room_view(old_v, room.value, cached)
        and not (room.key.is_inference() and not torch.is_inference_mode_enabled())
    )


def appended(
    state: KVCache | None, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, _Room | None]:
    """The keys and values ``[B, H, S + T, f]`` of ``state`` followed by ``k, v [B, H, T, f]``, and the
    room they are views of (None: plain tensors; a first call, without a state, makes none).

    Without autograd (and outside ``torch.compile``) they are written into ``state``'s buffers when the
    next positions there are free: a decoded token costs its own keys, not a copy of the cache. The
    buffers grow by a quarter (at least 256 positions) when full. A state whose next positions another
    call has written already (decoding twice from one cache) gets a copy, so no cache ever changes; so
    does a cache that is not the room's own views (:func:`_room_fits`)."""
    old_k = None if state is None else state.key.to(k.dtype)  # another dtype: used in this call's
    old_v = None if state is None else state.value.to(v.dtype)
    if old_k is None or old_v is None:  # a first call: its keys as they are (a decode step makes room)
        return k, v, None
    traced = torch.compiler.is_compiling() or is_functorch_wrapped_tensor(k)
    if torch.is_grad_enabled() or traced:  # in-place writes would break autograd, compile or vmap
        return torch.cat((old_k, k), dim=2), torch.cat((old_v, v), dim=2), None
    cached, length = old_k.shape[2], k.shape[2]
    needed = cached + length
    room = state._room if state is not None else None
    if room is None or not _claimed(room, old_k, old_v, needed):  # a new room, the cache copied in
        room = _Room.like(k, v, k.shape[0], capacity=needed + max(needed // 4, 256))
        room.key[:, :, :cached], room.value[:, :, :cached] = old_k, old_v
        room.filled = needed  # this call's own room
    room.key[:, :, cached:needed], room.value[:, :, cached:needed] = k, v
    return room.key[:, :, :needed], room.value[:, :, :needed], room


def _claimed(room: _Room, old_k: torch.Tensor, old_v: torch.Tensor, needed: int) -> bool:
    """Whether this call writes its keys in place into ``room`` after the cache ``old_k, old_v``
    (:func:`_room_fits`); if so, the positions up to ``needed`` are claimed (``room.filled``) in the same
    step, under the room's lock, so that another call continuing the same cache, in another thread,
    copies it instead of writing the same positions."""
    with room.lock:
        if not _room_fits(room, old_k, old_v, needed):
            return False
        room.filled = needed
        return True


torch.serialization.add_safe_globals([KVCache])  # torch.load(weights_only=True): tensors and an int


def rotate_with_rope(
    x: torch.Tensor, positions: torch.Tensor, theta: float, float64_angles: bool = False
) -> torch.Tensor:
    """``x [B, H, T, f]`` with RoPE at ``positions [T]``: the TTT layer's rotation (interleaved pairs,
    float32 inverse frequencies), computed in float32, or in float64 for float64 inputs, and cast back to
    ``x``'s dtype. The angles ``position * inv_freq`` are rounded to float32 as the reference (and the
    official TTT-E2E code) computes them, or with ``float64_angles`` taken in float64 (where the device
    has it): rounded to float32, an angle at position p is off by up to p * 6e-8 radians, so attention
    at absolute positions drifts from its translation invariance as a sequence grows (1e-5 relative at
    position 1e4, 1e-2 at 1e7, and positions beyond 2**24 collide), in float64 models too."""
    compute = torch.promote_types(x.dtype, torch.float32)
    inv_freq = rope_inverse_frequencies(x.shape[-1], theta)
    wide = float64_angles and positions.device.type != "mps"  # no float64 on mps
    cos, sin = rope_cos_sin(
        positions, inv_freq, compute, torch.float64 if wide else torch.float32
    )  # [T, f/2]
    return apply_rope_interleaved(x.to(compute), cos, sin).to(x.dtype)


QUERY_BLOCK = 256
"""How many queries sliding-window attention reads at once (:meth:`CausalSelfAttention.forward`)."""

# (q_piece, k_piece, query positions [n], key positions [m], first query position) -> rotated (q, k)
PieceRotation = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]
]


def block_bounds(start: int, stop: int, size: int) -> list[int]:
    """The bounds of the blocks that split positions ``[start, stop)`` at the multiples of ``size``:
    ``[start, <multiples of size in between>, stop]``, or ``[start]`` (no block) when empty."""
    if stop <= start:
        return [start]
    return [start, *range(start - start % size + size, stop, size), stop]


def _enabled_backends() -> list[SDPBackend]:
    """The SDPA backends torch may pick now (``sdpa_kernel`` narrows them). OVERRIDEABLE too (the fused
    kernel of XPU and other out-of-tree devices; torch reads its flag only privately): ``sdpa_kernel``
    turns off every backend its list leaves out, so without it the function ran those devices' attention
    on the math kernel, as SDPA called directly does not."""
    flags = {
        SDPBackend.FLASH_ATTENTION: torch.backends.cuda.flash_sdp_enabled,  # also CPU's fused kernel
        SDPBackend.EFFICIENT_ATTENTION: torch.backends.cuda.mem_efficient_sdp_enabled,
        SDPBackend.CUDNN_ATTENTION: torch.backends.cuda.cudnn_sdp_enabled,
        SDPBackend.MATH: torch.backends.cuda.math_sdp_enabled,
    }
    overrideable = getattr(SDPBackend, "OVERRIDEABLE", None)  # torch >= 2.5
    if overrideable is not None and hasattr(torch._C, "_get_overrideable_sdp_enabled"):
        flags[overrideable] = torch._C._get_overrideable_sdp_enabled
    return [backend for backend, enabled in flags.items() if enabled()]


class _TwiceDifferentiableAttention(torch.autograd.Function):
    """SDPA on whichever kernel torch picks, with a backward that is itself differentiable.

    The fused kernels (CPU's, flash, memory-efficient, cuDNN) have no double backward. This function
    runs the kernel torch picks and keeps its graph; a first-order backward is that kernel's own
    (the same numbers as calling SDPA directly), and a ``create_graph=True`` backward recomputes the
    attention on the math kernel, made of differentiable ops, so that its gradients have a backward.

    Under saved-tensor hooks (``torch.utils.checkpoint``, ``save_on_cpu``) it saves q, k and v alone,
    through the hooks, and its backward recomputes the kernel's forward: the kernel's graph holds its
    inputs and output outside the hooks, which so kept a checkpointed attention's q, k, v and output
    alive until the backward (8 checkpointed layers held 448 MB where SDPA's own held 64 MB).
    """

    @staticmethod
    def forward(
        ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: dict, backends: list[SDPBackend]
    ) -> torch.Tensor:
        ctx.options, ctx.backends = options, backends
        ctx.save_for_backward(q, k, v)
        # the caller's backends and autocast are in force here, and attend cast the inputs already: SDPA
        # as it is (a backward runs later, under other settings: its recomputations set them)
        if saved_tensors_hooks_on():  # the graph is made again in the backward
            ctx.graph = None
            return F.scaled_dot_product_attention(q, k, v, **options)
        ctx.graph = _attention_graph(q, k, v, options)
        return ctx.graph[0].detach()

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        inputs = ctx.saved_tensors
        wanted = [i for i in range(3) if ctx.needs_input_grad[i]]
        if torch.is_grad_enabled():  # create_graph=True: a backward with a backward of its own
            with sdpa_kernel([SDPBackend.MATH]), _without_autocast(inputs[0].device.type):
                out = F.scaled_dot_product_attention(*inputs, **ctx.options)
            grads = torch.autograd.grad(out, [inputs[i] for i in wanted], grad_out, create_graph=True)
        else:  # the picked kernel's backward; again (retain_graph=True) from a recomputed forward
            out, detached = ctx.graph or _attention_graph(*inputs, ctx.options, ctx.backends)
            ctx.graph = None  # its buffers go now, as SDPA's own backward frees them
            grads = torch.autograd.grad(out, [detached[i] for i in wanted], grad_out)
        by_input = dict(zip(wanted, grads, strict=True))
        return by_input.get(0), by_input.get(1), by_input.get(2), None, None


def _autocast_knows(device_type: str) -> bool:
    """Whether autocast knows ``device_type`` (not meta: asking it raised "unknown device type for
    autocast"); where torch has no ``torch.amp.is_autocast_available``, every type but meta."""
    available = getattr(torch.amp, "is_autocast_available", None)
    return available(device_type) if available is not None else device_type != "meta"


def _without_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast off on ``device_type`` (nothing to turn off on a device autocast does not know: meta)."""
    if _autocast_knows(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _attention_graph(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: dict, backends: list[SDPBackend] | None = None
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """``(out, (q, k, v) detached)``: SDPA with its graph from the detached inputs, in their dtype
    (:func:`attend` casts them as autocast would). Under the caller's backends and autocast (the
    function's forward), or, for a recomputation in a backward, which runs later under other settings,
    on ``backends`` with autocast off (an autocast region a backward runs in must not cast it again)."""
    detached = tuple(t.detach().requires_grad_(t.requires_grad) for t in (q, k, v))
    with torch.enable_grad(), contextlib.ExitStack() as settings:
        if backends is not None:
            settings.enter_context(sdpa_kernel(backends))
            settings.enter_context(_without_autocast(q.device.type))
        return F.scaled_dot_product_attention(*detached, **options), detached


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **options: Any) -> torch.Tensor:
    """``F.scaled_dot_product_attention``, differentiable to any order.

    Under forward-mode AD or a torch.func transform it runs on torch's math kernel: CPU's fused kernel
    has no forward derivative (torch raised a bare NotImplementedError from jvp, jacfwd or a dual
    tensor). Under autograd with a fused kernel allowed it runs through
    :class:`_TwiceDifferentiableAttention`, whose ``create_graph=True`` backward is differentiable (the
    fused kernels' is not: torch raised "derivative for ..._backward is not implemented" in the second
    backward); under ``torch.autocast`` it is given q, k, v (and a float mask) cast as autocast casts
    SDPA's, so that every backward, the recomputing ones too, computes in the forward's dtype. While
    compiling (dynamo reads neither flag), with ``dropout_p > 0`` (each recomputation would draw another
    dropout mask) or with a mask that requires grad (the function differentiates q, k and v only): SDPA
    as it is.

    NaN and inf are kept wherever the math kernel (the definition) gives a row NaN or inf: on a CPU a call
    whose q or own keys (the last ``T`` of ``k``) are not finite runs on the math kernel
    (:func:`_fused_cpu_would_drop_non_finite`); while compiling, such rows are made NaN after SDPA
    (:func:`_non_finite_rows_kept`); a cached key is finite or NaN (:func:`finite_or_nan_positions`)."""
    if torch.compiler.is_compiling():
        return _non_finite_rows_kept(F.scaled_dot_product_attention(q, k, v, **options), q, k)
    if transformed_or_dual((q, k, v)) or _fused_cpu_would_drop_non_finite(q, k):
        mask = options.get("attn_mask")
        if options == {"is_causal": True} and q.shape[-2] == k.shape[-2]:  # as many queries as keys
            length = q.shape[-2]
            mask = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
            return _masked_math_attention(q, k, v, mask)
        if set(options) == {"attn_mask"} and isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
            return _masked_math_attention(q, k, v, mask)
        with sdpa_kernel([SDPBackend.MATH]):
            return F.scaled_dot_product_attention(q, k, v, **options)
    learned_mask = any(isinstance(o, torch.Tensor) and o.requires_grad for o in options.values())
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)) and not learned_mask:
        backends = _enabled_backends()
        cast = _cast_as_autocast_would(q.device.type)
        # the math kernel alone is differentiable to any order already
        if backends != [SDPBackend.MATH] and cast is not None and not options.get("dropout_p"):
            q, k, v = (cast(t) for t in (q, k, v))
            options = {name: cast(value) for name, value in options.items()}
            return _TwiceDifferentiableAttention.apply(q, k, v, options, backends)
    return F.scaled_dot_product_attention(q, k, v, **options)


def _masked_math_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """SDPA's math kernel with the boolean ``mask`` (True: the query sees the key), except that a key or
    value a query does not see never reaches its row: the math kernel adds ``-inf`` to a masked score,
    and a NaN score stays NaN, so a NaN or inf key made every query NaN, those before it and those past
    its window too (the whole sequence then differed from the same tokens read one at a time). A row is
    NaN where its query is not finite or it sees a non-finite value; a row whose every visible score is
    -inf weighs nothing, as the math kernel's safe softmax."""
    scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)  # [B, H, T, K]
    scores = scores.masked_fill(~mask, float("-inf"))
    # as the math kernel's safe softmax: a row whose every score is -inf weighs nothing (0), not NaN
    probs = torch.softmax(scores, dim=-1).masked_fill(scores.amax(dim=-1, keepdim=True) == float("-inf"), 0.0)
    finite_v = torch.isfinite(v).all(dim=-1)  # [B, H, K]
    out = probs @ torch.where(finite_v[..., None], v, 0.0)  # [B, H, T, f]
    sees_bad_value = (mask & ~finite_v[..., None, :]).any(dim=-1, keepdim=True)  # [B, H, T, 1]
    bad_query = ~torch.isfinite(q).all(dim=-1, keepdim=True)  # [B, H, T, 1]: NaN whatever it weighs
    return out.masked_fill(sees_bad_value | bad_query, float("nan"))


def _fused_cpu_would_drop_non_finite(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether ``q`` or ``k``, on a CPU, may hold NaN or inf: torch's fused CPU kernel (torch 2.13) returns
    finite numbers for a query holding NaN or inf and for the queries seeing a NaN key (a decoded token,
    blocks of 8 queries; at 64 of width 16 it propagates them), where the math kernel, as the definition,
    gives NaN. Then the math kernel runs (also on finite values whose sum overflows: the same numbers).
    Two sums and one read per call on a CPU, where a read does not stall a queue (CUDA's kernels are not
    asked: not measured there). Of the keys, only the last ``T`` (this call's queries' own: every caller
    appends them to its cache, and a block of a sliding window ends at its queries' keys) are summed, each
    key having been summed in the call that added it, and cached as NaN if it was not finite
    (:func:`finite_or_nan_positions`), which the kernel propagates: a whole 32k-token cache summed at each
    decoded token cost 2.3 ms against SDPA's 11 ms (width 768, 2 threads)."""
    if q.device.type != "cpu" or k.device.type != "cpu":
        return False
    own_keys = k[..., -q.shape[-2] :, :] if q.shape[-2] else k[..., :0, :]  # [B, H, T, f]
    return not bool(torch.isfinite(q.sum(dtype=torch.float32) + own_keys.sum(dtype=torch.float32)))


def _non_finite_rows_kept(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``out`` with NaN in each row whose query holds NaN or inf, and in every row of a head whose own
    keys (the last ``T``, as :func:`_fused_cpu_would_drop_non_finite` reads them) do: on a CPU while
    ``torch.compile`` traces, where the math kernel cannot be chosen by a branch on the values (a graph
    break), and inductor runs aten's fused CPU kernel, which drops them as eagerly. No branch: a
    ``where`` on each row, so a finite output is returned bit for bit; a row the math kernel keeps
    finite (a key of +-inf its query weighs 0) may come out NaN. Elsewhere ``out`` as it is."""
    if q.device.type != "cpu" or k.device.type != "cpu":
        return out
    own_keys = k[..., k.shape[-2] - q.shape[-2] :, :]  # [B, H, T, f]
    return torch.where(_all_finite(q, (-1,)) & _all_finite(own_keys, (-2, -1)), out, float("nan"))


def _all_finite(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Whether ``x`` over ``dims`` (kept, size 1) holds no NaN or inf, exactly: the float32 sum of ``x``
    times 2**-64 (a power of two: NaN and inf stay, a finite value stays finite or goes to 0, and fewer
    than 2**64 values of at most 3.4e38 cannot overflow the sum). One fused reduction under inductor:
    ``isfinite(x).all()`` cost ~20x as much there (23 ms against SDPA's ~450 ms at T=2048, width 768), and
    a sum of ``x * 0`` inductor folds to 0."""
    return torch.isfinite((x * 2.0**-64).sum(dim=dims, keepdim=True, dtype=torch.float32))


def finite_or_nan_positions(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``k, v [B, H, T, f]`` with NaN in the key and the value of each position whose key or value holds
    NaN or inf (on a CPU; elsewhere as they are), as an attention mixer caches them. torch's fused CPU
    kernel (torch 2.13, bfloat16 and float16) weighed a cached key of +-inf as finite for later queries
    whose math-kernel output is NaN; a cached NaN key (at 2 keys or more) and a NaN value it keeps NaN
    (measured). A later call then needs no read of the cache: rows seeing such a position are NaN, where
    the math kernel gives NaN on the rows that weigh the infinite key and not 0. Finite positions are
    returned bit for bit: eagerly as they are when two float32 sums are finite (one read), else and while
    compiling through a ``where`` (no branch on values: traces under ``torch.compile``)."""
    if k.device.type != "cpu" or v.device.type != "cpu":
        return k, v
    if not torch.compiler.is_compiling() and math.isfinite(
        (k.sum(dtype=torch.float32) + v.sum(dtype=torch.float32)).item()
    ):
        return k, v
    good = _all_finite(k, (-1,)) & _all_finite(v, (-1,))  # [B, H, T, 1]
    return torch.where(good, k, float("nan")), torch.where(good, v, float("nan"))


def _cast_as_autocast_would(device_type: str) -> Callable[[Any], Any] | None:
    """How autocast casts SDPA's tensors now on ``device_type``: on CPU and CUDA SDPA is on its
    lower-precision list (a floating tensor other than float64 is cast to the autocast dtype); the
    identity outside autocast; None under autocast on another device, whose rule is not mirrored here.

    :class:`_TwiceDifferentiableAttention` is given the tensors cast already, so that the inputs it
    saves are the ones SDPA's graph saves (not float32 copies besides), and a recomputation in its
    backward, which runs outside the forward's autocast region, computes in the forward's dtype."""
    if not (_autocast_knows(device_type) and torch.is_autocast_enabled(device_type)):
        return lambda value: value  # (meta tensors: autocast knows no such device)
    if device_type not in ("cpu", "cuda"):
        return None
    dtype = torch.get_autocast_dtype(device_type)

    def cast(value: Any) -> Any:
        eligible = (
            isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64
        )
        return value.to(dtype) if eligible else value

    return cast


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    bounds: list[int],
    rotate: PieceRotation | None = None,
) -> torch.Tensor:
    """Causal attention of queries ``q [B, H, T, f]`` at absolute positions ``bounds[0] .. bounds[-1] - 1``
    over keys and values ``k, v [B, H, K, f]`` at the ``K >= T`` positions that end at ``bounds[-1] - 1``,
    each query seeing the last ``window`` positions (itself included). Returns ``[B, H, T, f]``.

    The queries are read one block ``[bounds[i], bounds[i + 1])`` at a time, each against only the keys
    it can see (from ``window - 1`` before the block to its end) with a ``[n, m]`` mask, so the memory and
    time are in proportion to ``T * (window + block)``; the result is the full ``[T, K]`` mask's.
    ``rotate``, if given, applies RoPE to each block's queries and keys.
    """
    start, stop = bounds[0], bounds[-1]
    first_key = stop - k.shape[2]  # absolute position of k[:, :, 0]
    # A block's keys start window - 1 before its queries, which attend checks only for its own: with a
    # non-finite query or key anywhere (on a CPU), every block runs on the masked definition, so that a
    # NaN key reaches only the queries that see it. A single query (a decoding step) sees every key of
    # the call (the cache holds window - 1, kept NaN where not finite): attend's check is enough there,
    # and reading the whole window's cache at each decoded token is what finite_or_nan_positions avoids.
    non_finite = q.device.type == "cpu" and q.shape[2] > 1 and not torch.compiler.is_compiling()
    non_finite = non_finite and not bool(
        torch.isfinite(q.sum(dtype=torch.float32) + k.sum(dtype=torch.float32))
    )
    pieces = []
    for begin, end in pairwise(bounds):
        lowest = max(begin - window + 1, first_key)  # the earliest key a query of the block sees
        query_pos = torch.arange(begin, end, device=q.device)  # [n] absolute
        key_pos = torch.arange(lowest, end, device=q.device)  # [m] absolute
        q_piece = q[:, :, begin - start : end - start]
        k_piece = k[:, :, lowest - first_key : end - first_key]
        v_piece = v[:, :, lowest - first_key : end - first_key]
        if rotate is not None:
            q_piece, k_piece = rotate(q_piece, k_piece, query_pos, key_pos, begin)
        mask = (key_pos[None, :] <= query_pos[:, None]) & (key_pos[None, :] > query_pos[:, None] - window)
        if non_finite and not transformed_or_dual((q, k, v)):
            pieces.append(_masked_math_attention(q_piece, k_piece, v_piece, mask))
        else:
            pieces.append(attend(q_piece, k_piece, v_piece, attn_mask=mask))
    if len(pieces) == 1:  # a decoding step or a short input: no copy
        return pieces[0]
    return torch.cat(pieces, dim=2) if pieces else q


def check_not_narrower(name: str, tensor: torch.Tensor, weights: torch.Tensor) -> None:
    """A state tensor (a KV cache, a pre-conv history) narrower than float64 weights is refused, naming
    it: its rounding would enter the float64 result silently (autocast leaves float64 alone, so no
    float64 layer writes one). Float32 weights take a bfloat16/float16 state written under autocast."""
    if weights.dtype == torch.float64 and tensor.dtype != torch.float64:
        raise TypeError(
            f"{name} is {tensor.dtype}, narrower than this layer's {weights.dtype} weights: its rounding "
            f"would enter the {weights.dtype} result; pass the state the model returned, or cast it with "
            f"state.to(torch.float64)"
        )


def check_hidden_states(x: Any, hidden_size: int, weights: torch.Tensor, name: str = "x") -> None:
    """``x`` is a floating-point ``[B, T, hidden_size]`` tensor on ``weights``' device, in their dtype
    (another one only under ``torch.autocast``); each error names the argument (``name``), what it is and
    what is valid. Shapes and dtypes only: no value is read (no device sync; traces under
    ``torch.compile``), so a NaN in ``x`` is not refused here: it comes out as NaN."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [B, T, hidden_size], got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != 3 or x.shape[-1] != hidden_size:
        raise ValueError(f"{name} must have shape [B, T, hidden_size={hidden_size}], got {tuple(x.shape)}")
    check_device_and_dtype(x, weights, name)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with RoPE, full or with a sliding window.

    Args:
        hidden_size: model width ``D``.
        num_heads: number of heads ``H``; ``D`` must be divisible by ``H``.
        window: if given, a query sees only the last ``window`` tokens (itself included).
        rope_theta: RoPE base.
        qk_norm: RMS-normalise each head's queries and keys (learned scale) before RoPE, as TTT-E2E does.
        norm_eps: epsilon of the QK-norm, in (0, 1).

    The shape and what a cache holds (:attr:`built_options`) cannot be changed on a built layer (an
    ``AttributeError`` naming the option): a cache's keys are rotated with ``rope_theta`` and cut to
    ``window``, and ``rope_theta = 0`` made the RoPE tables NaN, which SDPA turned into zero attention.
    """

    built_options: tuple[str, ...] = ("hidden_size", "num_heads", "head_dim", "window", "rope_theta")
    """The options the layer and its cache are made from, fixed once it is built."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        window: int | None = None,
        rope_theta: float = 1e4,
        qk_norm: bool = False,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        check_positive_int("hidden_size", hidden_size)
        check_positive_int("num_heads", num_heads)
        check_positive_int("window", window, none_allowed=True)  # None: full attention
        hidden_size, num_heads = int(hidden_size), int(num_heads)
        window = None if window is None else int(window)
        check_weights_fit(4 * hidden_size * hidden_size, f"an attention layer of hidden_size={hidden_size}")
        check_head_split(hidden_size, num_heads, rotary=True)
        # rope_theta <= 0 makes the RoPE tables NaN (which SDPA turns into silently zero attention), and
        # one below 1 frequencies above 1 whose angles overflow: the base is >= 1, its frequencies <= 1
        # one above MAX_ROPE_THETA is inf in the float32 frequencies: all but the first 0, with no error
        if not is_real(rope_theta) or not 1 <= rope_theta <= MAX_ROPE_THETA:
            raise ValueError(
                f"rope_theta={rope_theta!r} must be a finite number >= 1 and <= {MAX_ROPE_THETA!r} (the RoPE base)"
            )
        if not is_real(norm_eps) or norm_eps <= 0:
            raise ValueError(f"norm_eps={norm_eps!r} must be a finite number in (0, {MAX_NORM_EPS:g})")
        check_norm_eps(norm_eps, torch.promote_types(torch.get_default_dtype(), torch.float32))
        if not is_flag(qk_norm):
            raise TypeError(f"qk_norm must be True or False, got {qk_norm!r}")
        qk_norm = bool(qk_norm)
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.window = window
        self.rope_theta = float(rope_theta)
        self.qkv_proj = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, eps=float(norm_eps)) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, eps=float(norm_eps)) if qk_norm else None
        # RoPE angles in float64 (rotate_with_rope): a long sequence's far positions stay exact. TTT-E2E's
        # blocks turn it off, to compute as the official code does (their positions are chunk-relative).
        self.float64_rope_angles = True
        self._options_built = True  # from now on __setattr__ refuses a change of the built_options

    def __setattr__(self, name: str, value: Any) -> None:
        """``nn.Module``'s, refusing a change of one of :attr:`built_options` once the layer is built."""
        if name in self.built_options and self.__dict__.get("_options_built", False):
            value = refuse_built_option_change(self, name, value)
        super().__setattr__(name, value)

    def check_input(self, x: Any) -> None:
        """``x`` is a floating-point ``[B, T, hidden_size]`` tensor in the weights' dtype and on their
        device (:func:`check_hidden_states`)."""
        check_hidden_states(x, self.hidden_size, self.qkv_proj.weight)

    def forward(self, x: torch.Tensor, state: KVCache | None = None) -> tuple[torch.Tensor, KVCache]:
        """Attend over ``x [B, T, D]`` after the cached tokens; return ``y [B, T, D]`` and the new cache."""
        self.check_input(x)
        batch, length, hidden = x.shape
        if state is not None:
            self.check_state(state, batch)
        start = 0 if state is None else state.position
        q, k, v = self.qkv_proj(x).view(batch, length, 3, self.num_heads, self.head_dim).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # each [B, H, T, f]
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        positions = torch.arange(start, start + length, device=x.device)  # [T]
        q, k = (
            rotate_with_rope(q, positions, self.rope_theta, self.float64_rope_angles),
            rotate_with_rope(k, positions, self.rope_theta, self.float64_rope_angles),
        )

        k, v = finite_or_nan_positions(k, v)  # a cached inf key is NaN: no call reads the cache for it
        room = None
        if self.window is None:  # the whole cache is kept: grown in place where it can be (appended)
            k, v, room = appended(state, k, v)  # [B, H, S + T, f]
        elif state is not None:  # a cache of another dtype is used in the one this call computes in
            k = torch.cat((state.key.to(k.dtype), k), dim=2)  # [B, H, S + T, f] (S < window)
            v = torch.cat((state.value.to(v.dtype), v), dim=2)
        num_keys = k.shape[2]

        if self.window is not None:  # block by block: O(T * (window + block)), not a [T, S + T] mask
            # blocks counted from this call's first query, so the graph torch.compile traces for a
            # decoding step does not depend on the position
            bounds = [start + offset for offset in range(0, length, QUERY_BLOCK)] + [start + length]
            y = sliding_window_attention(q, k, v, self.window, bounds)
        elif state is None:
            y = attend(q, k, v, is_causal=True)
        else:
            # Query i sits at absolute position start + i; key j at start + length - num_keys + j.
            query_pos = torch.arange(start, start + length, device=x.device)[:, None]  # [T, 1]
            key_pos = torch.arange(start + length - num_keys, start + length, device=x.device)[None, :]
            y = attend(q, k, v, attn_mask=key_pos <= query_pos)  # mask [T, S + T]
        y = y.transpose(1, 2).reshape(batch, length, hidden)

        keep = num_keys if self.window is None else min(num_keys, self.window - 1)
        kept_k, kept_v = k[:, :, num_keys - keep :], v[:, :, num_keys - keep :]
        # The keys a window keeps own their memory, not the whole call's: a view of this call's qkv
        # projection (no state) or of a concatenation more than twice as long is copied. Decided from
        # shapes (torch.compile traces it): a decoded token's window is most of its concatenation.
        if room is None and (state is None or 2 * keep < num_keys):
            kept_k, kept_v = kept_k.clone(), kept_v.clone()
        cache = KVCache.in_room(kept_k, kept_v, start + length, room)
        return self.o_proj(y), cache

    def check_state(self, state: Any, batch: int, name: str = "state") -> None:
        """``state`` is a :class:`KVCache` a layer of this shape returned for ``batch`` sequences (shapes
        and the position only: no value is read, so the check costs no device sync and traces under
        ``torch.compile``)."""
        if not isinstance(state, KVCache):
            raise TypeError(
                f"{name} must be the KVCache this attention layer returned (or None), got {type(state).__name__}"
            )
        position = state.position
        if not isinstance(position, int) or isinstance(position, bool) or position < 0:
            raise ValueError(f"{name}.position must be an integer >= 0, got {position!r}")
        wanted = (batch, self.num_heads, self.head_dim)
        longest = position if self.window is None else min(position, self.window - 1)
        for part in ("key", "value"):
            tensor = getattr(state, part)
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            if not isinstance(shape, tuple) or len(shape) != 4 or (shape[0], shape[1], shape[3]) != wanted:
                raise ValueError(
                    f"{name}.{part} must be [batch, heads, cached, head_dim] with (batch, heads, head_dim) = "
                    f"{wanted}, got {shape}: the cache was made for another batch size or by a layer of "
                    "another shape; pass the state made for this input, or None"
                )
            self.check_cache_tensor(f"{name}.{part}", tensor)
            if shape[2] != longest or shape[2] != state.key.shape[2]:
                raise ValueError(
                    f"{name} caches {state.key.shape[2]} keys and {state.value.shape[2]} values, but at "
                    f"position {position} this layer (window={self.window}) keeps {longest} of each: the "
                    "cache was made by another layer; pass the state this layer returned, or None"
                )

    def check_cache_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """A cached key or value is floating-point, on the weights' device. Its float dtype may differ
        from the weights' (a cache written under ``torch.autocast`` holds the autocast dtype): it is
        used in the dtype the call computes in. An integer cache would truncate the keys, and a cache
        narrower than float64 weights would put its rounding silently into their result: both refused."""
        weights = self.qkv_proj.weight
        if not tensor.is_floating_point():
            raise TypeError(
                f"{name} is {tensor.dtype} but a key/value cache holds floating-point keys and values "
                f"(this layer's: {weights.dtype}): pass the state this layer returned, or None"
            )
        check_not_narrower(name, tensor, weights)
        if tensor.device != weights.device:
            raise ValueError(
                f"{name} is on {tensor.device}, the layer on {weights.device}: move the cache with "
                f"state.to({str(weights.device)!r})"
            )
