"""TTT-E2E: a sliding-window Transformer whose last blocks' "prime" MLPs keep learning at test time.

The network (``docs/e2e.md``) is a Transformer with sliding-window attention,
QK-norm, RMSNorm before *and* after every sub-layer, SwiGLU MLPs, RoPE and a tied LM head. The last
quarter of the blocks (the *suffix*) have an extra SwiGLU MLP, the prime MLP, before the regular one::

    h = h + PostNorm(SWA(PreNorm(h)))
    h = h + PostNorm'(MLP'(PreNorm'(h)))      # suffix blocks only; MLP' weights are the fast weights
    h = h + PostNorm(MLP(PreNorm(h)))

The inner loop is the same in training and inference. The prefix blocks run once over the input;
then, chunk by chunk, the suffix blocks, the final norm and the head *score* the chunk with the
current fast weights, the registered model inner loss (``next_token``) gives each sequence's loss on
the chunk's tokens and their next tokens, and the registered update rule (``score_first_sgd``:
gradient, global-norm clip, one SGD step) gives the fast weights of the next chunk. The suffix
blocks' key/value caches carry over from chunk to chunk. Outer training differentiates the mean of
the scored (pre-update) losses through the inner steps: to second order by default, to first order
with ``first_order=True``.

By default the model computes what the official TTT-E2E code computes (``docs/e2e.md`` lists the
choices and the ``E2EConfig`` options that select the paper's reading instead): a chunk's loss
includes its last token, whose target is the next chunk's first; the chunked blocks rotate queries
and keys at positions relative to the window before the chunk (:func:`chunk_relative_attention`).

``logits, state = model(ids, state)`` continues a sequence from ``state``, for any split of it: a
chunk that cannot be trained on yet is scored now and kept in the state (its suffix inputs, at most
``chunk_size`` tokens) until its last target arrives and it is trained on. :meth:`E2ELM.stream`
reads an arbitrarily long sequence piece by piece in constant memory.
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch._C._functorch import peek_interpreter_stack
from torch.nn.attention import SDPBackend, sdpa_kernel

from innerloop.core.callers import warning_stacklevel
from innerloop.core.eager import run_eagerly
from innerloop.core.functional import (
    RMSNorm,
    as_integer,
    chunk_mean_cross_entropy,
    integer_or_given,
    mean_scored_cross_entropy,
    owning,
    saved_tensors_hooks_suspended,
)
from innerloop.core.layer import (
    NonFiniteRowsError,
    holds_values,
    is_built_in,
    plugin_label,
    raise_if_unrecordable,
    with_rows,
)
from innerloop.core.model_inner import FastWeights, ModelInnerLoss, ModelUpdateRule
from innerloop.core.state import cat_rows, check_batch_rows, check_states, same_positions, take_rows
from innerloop.core.wording import a_type
from innerloop.models.attention import (
    CausalSelfAttention,
    KVCache,
    block_bounds,
    finite_or_nan_positions,
    rotate_with_rope,
    sliding_window_attention,
)
from innerloop.models.blocks import SwiGLU
from innerloop.models.config import (
    E2E,
    E2E_CHECKPOINTING_REFUSED,
    E2EConfig,
    ModelConfig,
    changed_built_field,
    check_fits_in_memory,
    config_value,
    require_model_config,
    validate_e2e_options,
    validate_model_config,
)
from innerloop.models.lm import (
    MaterialisableLM,
    _tensors,
    check_same_device,
    check_token_ids,
    check_weights_under_autocast,
    init_embedding,
)
from innerloop.registry import get_registry

# --------------------------------------------------------------------------------------------------
# Configuration helpers
# --------------------------------------------------------------------------------------------------


def num_suffix_blocks(config: ModelConfig) -> int:
    """Blocks with a prime MLP: ``round(suffix_fraction * num_layers)``, at least 1 (3 of 12).

    Python's ``round`` rounds a tie to the even number: with ``suffix_fraction=0.25``, 10 layers give 2
    suffix blocks (2.5 -> 2) and 14 layers give 4 (3.5 -> 4).
    """
    return max(1, round(config.e2e.suffix_fraction * config.num_layers))


_MADE_FROM: dict[str, str] = {
    "vocab_size": "embedding and head",
    "hidden_size": "blocks",
    "num_layers": "blocks",
    "num_heads": "attention",
    "intermediate_size": "MLPs",
    "window": "attention",
    "rope_theta": "attention",
    "norm_eps": "norms",
    "tie_embeddings": "head",
    "padding_id": "embedding",
    "e2e.suffix_fraction": "blocks",
    "e2e.prime_intermediate_size": "prime MLPs",
    "e2e.inner_loss": "inner loss (resolved from the registry)",
    "e2e.update_rule": "update rule (resolved from the registry)",
}
"""What of a built :class:`E2ELM` each of :data:`BUILT_FIELDS` made."""

BUILT_FIELDS: tuple[str, ...] = tuple(_MADE_FROM)
"""``ModelConfig`` fields an :class:`E2ELM` reads only when it is built (its shapes, its attention's
window and RoPE base, its norms' epsilon, which blocks have a prime MLP, its inner loss and update
rule): changing one on a built model is refused at the next forward. Ignored, the model went on
computing with the old value while its config, which checkpoints and exports record, said the new one
(a model given another ``e2e.update_rule`` kept stepping with the first)."""


class OneChunkTrainingWarning(UserWarning):
    """A TTT-E2E model is trained on sequences of at most one chunk: no inner step reaches the outer
    loss, so training is the sliding-window baseline's (:meth:`E2ELM.forward`)."""


# --------------------------------------------------------------------------------------------------
# Chunked attention with RoPE relative to the window before the chunk (the official code's)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkKVCache:
    """The keys and values of the last ``window - 1`` tokens, for :func:`chunk_relative_attention`.

    Unlike :class:`~innerloop.models.attention.KVCache`, ``key [B, H, S, f]`` is stored after the
    QK-norm and *before* RoPE: each chunk rotates it at positions relative to itself. ``position`` is
    the absolute position of the next token.
    """

    key: torch.Tensor
    value: torch.Tensor
    position: int

    def __post_init__(self) -> None:
        # a numpy or 0-d tensor integer held as the int it is (the one integer rule, core.functional); anything
        # else is kept for the state's check to refuse by name
        object.__setattr__(self, "position", integer_or_given(self.position))

    def detach(self) -> ChunkKVCache:
        """The same cache cut from the autograd graph."""
        return ChunkKVCache(self.key.detach(), self.value.detach(), self.position)

    def to(self, *args: Any, **kwargs: Any) -> ChunkKVCache:
        """The cache moved or cast like ``Tensor.to`` (keys and values)."""
        return ChunkKVCache(self.key.to(*args, **kwargs), self.value.to(*args, **kwargs), self.position)

    def clone(self) -> ChunkKVCache:
        """A copy whose keys and values own their memory (gradients flow back through the copy)."""
        return ChunkKVCache(self.key.clone(), self.value.clone(), self.position)

    @property
    def batch_size(self) -> int:
        """Sequences held (``key.shape[0]``)."""
        return int(self.key.shape[0])

    def index_select(self, rows: torch.Tensor) -> ChunkKVCache:
        """The cache of the sequences ``rows`` (a 1-D int64 tensor of batch rows, repeats allowed), in
        that order."""
        return self._take_rows(check_batch_rows(rows, self.batch_size))

    def _take_rows(self, rows: torch.Tensor) -> ChunkKVCache:
        """:meth:`index_select` with ``rows`` already checked."""
        return ChunkKVCache(take_rows(self.key, rows), take_rows(self.value, rows), self.position)

    @classmethod
    def cat(cls, caches: Sequence[ChunkKVCache]) -> ChunkKVCache:
        """One cache holding the sequences of ``caches`` one after the other: caches of one block at one
        position, in one dtype."""
        caches = check_states(caches, cls, "ChunkKVCache")
        same_positions([c.position for c in caches], "ChunkKVCache")
        key = cat_rows([c.key for c in caches], "key")
        return ChunkKVCache(key, cat_rows([c.value for c in caches], "value"), caches[0].position)


def chunk_relative_attention(
    attn: CausalSelfAttention, x: torch.Tensor, cache: ChunkKVCache | None, chunk_size: int
) -> tuple[torch.Tensor, ChunkKVCache]:
    """Sliding-window attention of ``x [B, T, D]`` after ``cache``, chunk by chunk, as the official
    TTT-E2E code computes it: for the chunk starting at absolute position ``s``, a token at ``t`` is
    rotated at position ``window + t - s`` (so the window before the chunk sits at ``0 .. window - 1``
    and the chunk's queries at ``window .. window + C - 1``). Chunks start at multiples of
    ``chunk_size``; ``x`` may start and end anywhere, the result does not depend on the split.

    Returns ``y [B, T, D]`` and the cache after ``x``.
    """
    batch, length, hidden = x.shape
    heads, head_dim, window = attn.num_heads, attn.head_dim, attn.window
    assert window is not None, "chunk_relative_attention needs a sliding window"
    start = 0 if cache is None else cache.position
    q, k, v = attn.qkv_proj(x).view(batch, length, 3, heads, head_dim).unbind(2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # each [B, H, T, f]
    if attn.q_norm is not None and attn.k_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    k, v = finite_or_nan_positions(k, v)  # as CausalSelfAttention caches them (no call reads the cache)
    if cache is not None:  # a cache of another dtype is used in the one this call computes in
        k = torch.cat((cache.key.to(k.dtype), k), dim=2)  # [B, H, S + T, f]
        v = torch.cat((cache.value.to(v.dtype), v), dim=2)

    def rotate(
        q_piece: torch.Tensor,
        k_piece: torch.Tensor,
        query_pos: torch.Tensor,
        key_pos: torch.Tensor,
        begin: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        offset = window - (begin - begin % chunk_size)  # absolute -> rotation position in this chunk
        return (
            rotate_with_rope(q_piece, query_pos + offset, attn.rope_theta),
            rotate_with_rope(k_piece, key_pos + offset, attn.rope_theta),
        )

    # One block per chunk the queries touch.
    bounds = block_bounds(start, start + length, chunk_size)
    y = sliding_window_attention(q, k, v, window, bounds, rotate)  # [B, H, T, f]
    y = y.transpose(1, 2).reshape(batch, length, hidden)
    keep = min(k.shape[2], window - 1)
    kept = slice(k.shape[2] - keep, k.shape[2])
    return attn.o_proj(y), ChunkKVCache(owning(k[:, :, kept]), owning(v[:, :, kept]), start + length)


def _check_chunk_cache(cache: ChunkKVCache, attn: CausalSelfAttention, batch: int, name: str) -> None:
    """``cache`` is one ``attn`` made for ``batch`` sequences: its shapes, and the ``min(position,
    window - 1)`` keys a cache at its position holds (no value is read)."""
    position = cache.position
    if not isinstance(position, int) or isinstance(position, bool) or position < 0:
        raise ValueError(f"{name}.position must be an integer >= 0, got {position!r}")
    assert attn.window is not None
    wanted = [batch, attn.num_heads, min(position, attn.window - 1), attn.head_dim]
    for part in ("key", "value"):
        got = list(getattr(cache, part).shape)
        if got != wanted:
            raise ValueError(
                f"{name}.{part} is {got}; at position {position} this block (window={attn.window}) keeps "
                f"[batch, heads, cached, head_dim] = {wanted}: the cache was made by another model or for "
                "another batch; pass the state this model returned, or None"
            )
        attn.check_cache_tensor(f"{name}.{part}", getattr(cache, part))


class FloatRMSNorm(RMSNorm):
    """RMSNorm computed in (at least) its weight's precision and returned in the input's dtype, as the
    official code does under a bf16 ``compute_dtype``; float32 and float64 inputs are unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute = torch.promote_types(x.dtype, self.weight.dtype)
        return super().forward(x.to(compute)).to(x.dtype)


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 if it is in a lower precision (logits under a bf16 ``compute_dtype``)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


AnyCache = KVCache | ChunkKVCache
"""A block's attention cache: RoPE applied (absolute positions) or not (chunk-relative positions)."""


# --------------------------------------------------------------------------------------------------
# The block
# --------------------------------------------------------------------------------------------------


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """SwiGLU with per-sequence weights: ``x [B, T, D]``, ``gate, up [B, F, D]``, ``down [B, D, F]``
    (fast weights kept in a higher precision than ``x`` are used in ``x``'s)."""
    gate, up, down = (w.to(x.dtype) for w in (gate, up, down))
    return (F.silu(x @ gate.mT) * (x @ up.mT)) @ down.mT  # [B, T, D]


PRIME_WEIGHTS: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
"""The prime MLP's weights, in the order :func:`swiglu` takes them."""


class E2EBlock(nn.Module):
    """One block: SWA and SwiGLU MLP, each between a pre- and a post-RMSNorm; suffix blocks also have
    the prime MLP (same norms around it) before the regular MLP.

    Args:
        config: the model's configuration (``mixer == "e2e"``).
        prime: give this block a prime MLP (the suffix blocks).
    """

    def __init__(self, config: ModelConfig, prime: bool) -> None:
        super().__init__()
        D, eps = config.hidden_size, config.norm_eps
        self.attn_pre_norm = FloatRMSNorm(D, eps=eps)
        self.attn = CausalSelfAttention(
            D, config.num_heads, config.window, config.rope_theta, qk_norm=True, norm_eps=eps
        )
        self.attn.q_norm = FloatRMSNorm(
            self.attn.head_dim, eps=eps
        )  # the same parameter, computed in float32
        self.attn.k_norm = FloatRMSNorm(self.attn.head_dim, eps=eps)
        self.attn.float64_rope_angles = False  # float32 angles, as the official code computes them
        self.attn_post_norm = FloatRMSNorm(D, eps=eps)
        self.prime: SwiGLU | None = None
        if prime:
            self.prime_pre_norm = FloatRMSNorm(D, eps=eps)
            self.prime = SwiGLU(D, config.e2e.prime_intermediate_size or config.intermediate_size)
            self.prime_post_norm = FloatRMSNorm(D, eps=eps)
        self.mlp_pre_norm = FloatRMSNorm(D, eps=eps)
        self.mlp = SwiGLU(D, config.intermediate_size)
        self.mlp_post_norm = FloatRMSNorm(D, eps=eps)

    def forward(
        self,
        h: torch.Tensor,
        cache: AnyCache | None = None,
        fast: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        chunk_size: int | None = None,
    ) -> tuple[torch.Tensor, AnyCache]:
        """``h [B, T, D]`` after the tokens in ``cache`` → ``h [B, T, D]`` and the new cache.

        ``fast``: the prime MLP's (gate, up, down) weights per sequence, ``[B, ...]``; None uses the
        block's own (initial) prime weights. ``chunk_size``: attend chunk by chunk with RoPE relative
        to each chunk (:func:`chunk_relative_attention`, a :class:`ChunkKVCache`); None: absolute
        positions (a :class:`KVCache`).
        """
        x = self.attn_pre_norm(h)
        if chunk_size is None:
            assert cache is None or isinstance(cache, KVCache)
            mixed, cache = self.attn(x, cache)
        else:
            assert cache is None or isinstance(cache, ChunkKVCache)
            mixed, cache = chunk_relative_attention(self.attn, x, cache, chunk_size)
        h = h + self.attn_post_norm(mixed)
        if self.prime is not None:
            x = self.prime_pre_norm(h)
            h = h + self.prime_post_norm(self.prime(x) if fast is None else swiglu(x, *fast))
        h = h + self.mlp_post_norm(self.mlp(self.mlp_pre_norm(h)))
        return h, cache


# --------------------------------------------------------------------------------------------------
# The state
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class E2EState:
    """What :class:`E2ELM` carries between calls.

    Attributes:
        caches: one SWA key/value cache per block (None before the first token):
            :class:`ChunkKVCache` for the blocks that attend chunk by chunk with relative RoPE,
            :class:`KVCache` for the others. The prefix blocks' caches are up to date; the suffix
            blocks' are as of the start of the current chunk.
        fast: the fast weights for the current chunk, by parameter name, each ``[B, ...]``
            (empty when ``test_time_training`` is off).
        pending: suffix-block inputs of the current chunk's tokens read so far, ``[B, p, D]``:
            ``p < chunk_size``, or ``p == chunk_size`` for a complete chunk that waits for the next
            token, its last target (``chunk_targets="next_token"``).
        pending_ids: their token ids, ``[B, p]``.
        position: number of tokens read.
        chunk_size: the ``e2e.chunk_size`` of the model that made the state (its chunks' boundaries);
            None for a state made before the field existed.
        scored: the suffix blocks' caches after the pending tokens (None for the prefix blocks), as
            they were scored with the current fast weights: the next token of the chunk is scored from
            them, so that a decoded token's cost does not grow with its place in the chunk (the one
            that trains the chunk re-scores it and takes the inner step). None when no token is
            pending (or for a state made before the field existed: the pending tokens are scored again).
        chunk_targets: the ``e2e.chunk_targets`` the state's chunks were trained under (whether a full
            chunk waits for its next token); None for a state without test-time training, or made
            before the field existed.
    """

    caches: tuple[AnyCache | None, ...]
    fast: dict[str, torch.Tensor]
    pending: torch.Tensor
    pending_ids: torch.Tensor
    position: int
    chunk_size: int | None = None
    scored: tuple[AnyCache | None, ...] | None = None
    chunk_targets: str | None = None

    def __post_init__(self) -> None:
        # a numpy or 0-d tensor integer held as the int it is (the one integer rule, core.functional); anything
        # else is kept for the state's check to refuse by name
        object.__setattr__(self, "position", integer_or_given(self.position))
        object.__setattr__(self, "chunk_size", integer_or_given(self.chunk_size))

    def detach(self) -> E2EState:
        """The same state cut from the autograd graph."""
        return E2EState(
            tuple(None if c is None else c.detach() for c in self.caches),
            {k: v.detach() for k, v in self.fast.items()},
            self.pending.detach(),
            self.pending_ids,
            self.position,
            self.chunk_size,
            None if self.scored is None else _detached(self.scored),
            self.chunk_targets,
        )

    def _map(
        self, fn: Callable[[torch.Tensor], torch.Tensor], ids: Callable[[torch.Tensor], torch.Tensor]
    ) -> E2EState:
        """The state with ``fn`` applied to every tensor but the token ids, and ``ids`` to those."""
        return E2EState(
            _each_cache(self.caches, lambda c: type(c)(fn(c.key), fn(c.value), c.position)),
            {k: fn(v) for k, v in self.fast.items()},
            fn(self.pending),
            ids(self.pending_ids),
            self.position,
            self.chunk_size,
            None
            if self.scored is None
            else _each_cache(self.scored, lambda c: type(c)(fn(c.key), fn(c.value), c.position)),
            self.chunk_targets,
        )

    def to(self, *args: Any, **kwargs: Any) -> E2EState:
        """The state moved or cast like ``Tensor.to``: the caches, fast weights and pending inputs; the
        pending token ids keep their integer dtype and follow to the device."""
        device = self.pending.to(*args, **kwargs).device
        return self._map(lambda t: t.to(*args, **kwargs), lambda ids: ids.to(device))

    def clone(self) -> E2EState:
        """A copy whose tensors own their memory (gradients flow back through the copy)."""
        return self._map(torch.clone, torch.clone)

    @property
    def batch_size(self) -> int:
        """Sequences held (the rows of ``pending``, which has them even when no input is pending)."""
        return int(self.pending.shape[0])

    def index_select(self, rows: torch.Tensor) -> E2EState:
        """The state of the sequences ``rows`` in that order: a 1-D int64 tensor of batch rows, repeats
        allowed (reorder beams, keep some sequences of a batch, repeat one prompt's state). Each row
        continues exactly as that sequence alone would."""
        rows = check_batch_rows(rows, self.batch_size)
        return self._map(lambda t: take_rows(t, rows), lambda ids: take_rows(ids, rows))

    @classmethod
    def cat(cls, states: Sequence[E2EState]) -> E2EState:
        """One state holding the sequences of ``states`` one after the other: states of one model that
        have read the same number of tokens, in one dtype. Anything else is refused, naming what
        differs."""
        states = check_states(states, cls, "E2EState")
        same_positions([s.position for s in states], "E2EState")
        _check_same_e2e_layout(states)
        first = states[0]
        fast = {k: cat_rows([s.fast[k] for s in states], f"fast[{k!r}]") for k in first.fast}
        scored = None if first.scored is None else _cat_caches([s.scored or () for s in states], "scored")
        return E2EState(
            _cat_caches([s.caches for s in states], "caches"),
            fast,
            cat_rows([s.pending for s in states], "pending"),
            cat_rows([s.pending_ids for s in states], "pending_ids"),
            first.position,
            first.chunk_size,
            scored,
            first.chunk_targets,
        )

    def nbytes(self) -> int:
        """Bytes held by the state's tensors (bounded: window, chunk and fast weights, not length)."""
        return sum(t.numel() * t.element_size() for t in _tensors(self))


@dataclass
class Scored:
    """The first ``tokens`` of a chunk were scored by an earlier call; ``caches`` are the blocks' caches
    after them (:attr:`E2EState.scored`)."""

    tokens: int
    caches: list[AnyCache | None]


InnerLoopResult = tuple[
    torch.Tensor,
    list[AnyCache | None],
    FastWeights,
    torch.Tensor,
    torch.Tensor,
    tuple[AnyCache | None, ...] | None,
]
"""What :meth:`E2ELM._inner_loop` returns: logits, caches, fast weights, pending inputs and ids, and
the caches after the pending tokens."""


def _check_not_under_func_transform() -> None:
    """Refuse test-time training inside a ``torch.func`` transform (grad, vjp, jacrev, jacfwd, jvp,
    hessian, vmap): the inner step differentiates with ``torch.autograd`` inside the forward, which
    those transforms do not support (torch's bare ``requires_grad_()`` error otherwise)."""
    if peek_interpreter_stack() is not None:
        raise TypeError(
            "TTT-E2E's test-time training takes gradients with torch.autograd inside the forward (its inner "
            "step), which torch.func transforms (grad, vjp, jacrev, jacfwd, jvp, hessian, vmap) cannot run; "
            "differentiate with torch.autograd.grad or loss.backward() (torch.autograd.forward_ad for forward "
            "mode), or call the model outside the transform"
        )


def _detached(caches: tuple[AnyCache | None, ...]) -> tuple[AnyCache | None, ...]:
    return tuple(None if c is None else c.detach() for c in caches)


def _each_cache(
    caches: tuple[AnyCache | None, ...], fn: Callable[[AnyCache], AnyCache]
) -> tuple[AnyCache | None, ...]:
    return tuple(None if c is None else fn(c) for c in caches)


def _check_same_e2e_layout(states: list[E2EState]) -> None:
    """The states were made by one model: chunk size and chunk targets, number of caches, fast weights,
    scored caches."""

    def layout(state: E2EState) -> tuple[Any, ...]:
        return (
            state.chunk_size,
            state.chunk_targets,
            len(state.caches),
            sorted(state.fast),
            state.scored is None,
        )

    wanted = layout(states[0])
    for i, state in enumerate(states):
        if layout(state) != wanted:
            raise ValueError(
                "cannot concatenate the E2EStates: (chunk_size, chunk_targets, caches, fast weights, no scored "
                f"caches) is {layout(state)} in states[{i}] and {wanted} in states[0]; concatenate states of "
                "one model at one position"
            )


def _cat_caches(per_state: Sequence[tuple[AnyCache | None, ...]], name: str) -> tuple[AnyCache | None, ...]:
    """The caches of several states joined block by block (all None, or all of one kind, per block)."""
    joined: list[AnyCache | None] = []
    for block, caches in enumerate(zip(*per_state, strict=True)):
        kinds = {type(c) for c in caches}
        if kinds == {type(None)}:
            joined.append(None)
        elif len(kinds) == 1:
            cache_type = kinds.pop()
            joined.append(cache_type.cat(list(caches)))
        else:
            names = sorted(k.__name__ for k in kinds)
            raise ValueError(
                f"cannot concatenate {name}[{block}]: caches of kinds {names}; states of other models"
            )
    return tuple(joined)


torch.serialization.add_safe_globals([ChunkKVCache, E2EState])  # torch.load(weights_only=True)


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


def _check_chunk_losses(loss: ModelInnerLoss, losses: object, logits: torch.Tensor) -> None:
    """A model inner loss's ``chunk_loss`` gave one floating-point loss per sequence, ``[B]``: a plugin
    right at the registrar's small shapes but not at this chunk's is named here, not summed over
    silently by the update rule."""
    batch = logits.shape[0]
    if isinstance(losses, torch.Tensor) and tuple(losses.shape) == (batch,) and losses.is_floating_point():
        return
    got = (
        f"{tuple(losses.shape)} {losses.dtype}" if isinstance(losses, torch.Tensor) else type(losses).__name__
    )
    cls = type(loss)
    raise ValueError(
        f"model inner loss {getattr(loss, 'name', '?')!r} ({cls.__module__}.{cls.__qualname__}): chunk_loss(logits "
        f"{tuple(logits.shape)}, ids) must return one floating-point loss per sequence, [B] = ({batch},); got {got}"
    )


def _checked_step(rule: ModelUpdateRule, before: FastWeights, after: object) -> FastWeights:
    """``after``, what a model update rule's ``step`` returned for the fast weights ``before``: the same
    names, each of the same shape, dtype and device (a plugin right at the registrar's small problem but
    not at this call's batch or model is named here, not carried on: weights rounded to bfloat16 would score
    the next chunks without a word, a missing or reshaped one fail there with a bare KeyError or torch's)."""
    got = after if isinstance(after, Mapping) else {}
    for name, given in before.items():
        new = got.get(name)
        same = isinstance(new, torch.Tensor) and (new.shape, new.dtype, new.device) == (
            given.shape,
            given.dtype,
            given.device,
        )
        if isinstance(after, Mapping) and same:
            continue
        what = (
            f"{new.dtype} {list(new.shape)} on {new.device}"
            if isinstance(new, torch.Tensor)
            else ("missing" if isinstance(after, Mapping) else f"{a_type(after)}, not a dict")
        )
        cls = type(rule)
        raise ValueError(
            f"model update rule {getattr(rule, 'name', '?')!r} ({cls.__module__}.{cls.__qualname__}): step must "
            f"return the new fast weights with the names, shapes, dtypes and devices of those given; got "
            f"{name!r}: {what}, given {given.dtype} {list(given.shape)} on {given.device}"
        )
    return dict(got)


def _step_sums(
    before: FastWeights, logits: torch.Tensor, losses: torch.Tensor, after: FastWeights
) -> torch.Tensor:
    """The sums, batch row by batch row, of one inner step's fast weights given, its chunk's logits, its
    losses and the fast weights the step returned, ``[2 len(before) + 2, B]``, not read back from the
    device (for :func:`_raise_if_a_plugin_went_non_finite`; by row, so an error names the rows that went
    non-finite): each :func:`_row_sums`, finite iff every element of the row is, at any finite values. One
    reduction per tensor, no read-back: a few ops a step."""
    wide = torch.float64 if logits.device.type != "mps" else torch.float32  # MPS has no float64
    with torch.no_grad():
        names = sorted(before)  # one order for every step (a rule may return its weights in another)
        given = (*(before[n] for n in names), logits, losses, *(after[n] for n in names))
        return torch.stack([_row_sums(t).to(wide) for t in given])


#: What :func:`_row_sums` scales by before summing: no sum of fewer than 2**64 finite values then
#: overflows, in float32 or float64.
_SUM_SCALE = 2.0**-64


def _row_sums(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor [B, ...]``'s sum in each batch row, ``[B]``, of its values times 2**-64, in float32 or its
    own dtype where wider (a broadcast row read in place): finite iff every value of the row is (a finite
    value stays finite, NaN and inf stay so, whatever underflows to 0). An unscaled float32 sum of finite
    fast weights of 2e37 overflowed and raised NonFiniteInnerStepError on finite numbers; a float64 sum
    instead costs 4 times the scaled one on a CPU (logits [4, 64, 32000], one thread: 114 ms against
    26 ms, an unscaled float32 sum 7 ms), and an overflow-only fallback would take both sums or a
    read-back per step."""
    dtype = torch.promote_types(tensor.dtype, torch.float32)
    scaled = tensor.detach() * _SUM_SCALE
    if tensor.dim() == 1:  # sum(dim=()) would sum every element
        return scaled.to(dtype)
    return scaled.sum(dim=tuple(range(1, tensor.dim())), dtype=dtype)


def _scored_only_check(h_chunk: torch.Tensor, fast: FastWeights, logits: torch.Tensor) -> torch.Tensor:
    """The check of a chunk only scored (the trailing one, not yet trained on): a trained step's
    :func:`_step_sums` (finite losses, the fast weights unchanged: no plugin ran to blame) and
    :func:`_step_scales`, then one more element, which marks it as only scored (not read back)."""
    losses = logits.new_zeros(logits.shape[0])
    marker = torch.ones(
        1,
        logits.shape[0],
        dtype=torch.float64 if logits.device.type != "mps" else torch.float32,
        device=logits.device,
    )
    return torch.cat((_step_sums(fast, logits, losses, fast), _step_scales(h_chunk, fast), marker))


def _step_scales(h_chunk: torch.Tensor, before: FastWeights) -> torch.Tensor:
    """The largest magnitudes of one inner step's input hidden states and of each fast weight given, batch
    row by batch row, ``[1 + len(before), B]``, not read back (for :func:`_raise_if_the_inner_loop_went_non_finite`): a
    maximum is finite iff every element is and never overflows, so it tells how far the inner steps grew
    the fast weights. One reduction per tensor (an E2E forward, T=2048: see the commit measuring it)."""
    wide = torch.float64 if h_chunk.device.type != "mps" else torch.float32
    with torch.no_grad():
        tensors = (h_chunk, *(before[name] for name in sorted(before)))
        # A tensor with no element (an empty batch) has no magnitude to take (amax of none raises): 0, finite.
        return torch.stack(
            [
                t.detach().abs().amax(dim=tuple(range(1, t.dim()))).to(wide)
                if t.numel()
                else t.new_zeros(t.shape[:1], dtype=wide)
                for t in tensors
            ]
        )


#: How many times its magnitude at a call's start a fast weight must have grown through the inner steps
#: for non-finite logits from finite hidden states to be blamed on the inner learning rate (as
#: :data:`~innerloop.core.layer.LARGE_INPUT`: the built-in rule with its default clip moves a fast weight
#: by at most ``inner_lr`` a step, far less than this at any sane rate).
INNER_GROWTH_BLAMED = 1e4

#: The least magnitude, as a share of the largest of the model's fast weights, a fast weight's growth is
#: measured from (:func:`_non_finite_logits_cause`): one held at 0 is not read as grown without bound.
RELATIVE_SCALE_FLOOR = 1e-3


def _inner_rate_advice(config: E2EConfig, inner_lr: float) -> str:
    """Which settings to lower when the inner update overflowed: model.e2e.inner_lr (the configured value,
    and the warm-up's current one where it differs) and its clip."""
    now = "" if inner_lr == config.inner_lr else f"; {inner_lr:g} now, in its warm-up"
    clip = config.inner_grad_clip
    clipped = (
        f"model.e2e.inner_grad_clip (now {clip:g})"
        if clip > 0
        else "set model.e2e.inner_grad_clip (now 0: off)"
    )
    return f"lower model.e2e.inner_lr (configured {config.inner_lr:g}{now}) or {clipped}"


def _fast_weight_growth(largest: torch.Tensor, initial: torch.Tensor, names: list[str]) -> tuple[float, str]:
    """How many times the fast weight grown most (``largest``: each fast weight's largest magnitude, of
    ``names``) is its size in the model's weights (``initial``: theirs), and that in words."""
    # a weight the model holds at or near 0 (a zero-initialised projection) is measured against the
    # fast weights' own scale, else any ordinary step would read as grown 1e36 times
    initial = initial.double()
    floor = max(float(initial.max()) * RELATIVE_SCALE_FLOOR, torch.finfo(torch.float32).tiny)
    growth = largest.double() / initial.clamp_min(floor)
    grown = int(growth.argmax())
    size = (
        f"largest |w| {float(largest[grown]):.3g} in {names[grown]}, "
        f"{float(growth[grown]):.3g} x its size in the model's weights"
    )
    return float(growth[grown]), size


def _non_finite_logits_cause(
    largest: torch.Tensor, initial: torch.Tensor, step: int, names: list[str], advice: str
) -> str:
    """Why inner step ``step``'s logits are NaN or inf from finite hidden states and fast weights
    (``largest``: the :func:`_step_scales` of the call's steps): the inner rate if the inner steps grew a
    fast weight :data:`INNER_GROWTH_BLAMED` times or more from the model's own (``initial``: their largest
    magnitudes; not the call's start, which a state from earlier calls may hold grown), else the model's
    weights."""
    growth, size = _fast_weight_growth(largest[step, 1:], initial, names)
    if growth >= INNER_GROWTH_BLAMED:
        return (
            f"its logits are NaN or inf from finite hidden states and the fast weights the inner steps grew "
            f"({size}): the inner learning rate is likely too large: {advice}"
        )
    return (
        f"its logits are NaN or inf from finite hidden states and fast weights the inner steps did not grow "
        f"much ({size}): the model's own weights likely diverged (lower optim.lr), not model.e2e.inner_lr"
    )


def _raise_if_the_inner_loop_went_non_finite(
    config: E2EConfig,
    inner_lr: Callable[[], float],
    names: list[str],
    table: torch.Tensor,
    largest: torch.Tensor,
    initial: Callable[[], torch.Tensor],
    only_scored: list[bool] | None = None,
) -> None:
    """Raise a :class:`NonFiniteInnerStepError` at the first chunk trained on in this call whose hidden
    states, fast weights, logits or updated fast weights (``table``: a :func:`_step_sums` row, ``largest``:
    a :func:`_step_scales` row, one each per chunk, of the fast weights ``names``) hold NaN or inf, saying which
    chunk and what is likely the cause: the hidden states entering the suffix (the model's weights or its
    input: not the inner rate), the inner update (``model.e2e.inner_lr`` or its clip), or the model's
    weights. ``table`` ``[steps, 2 W + 2]`` and ``largest`` ``[steps, 1 + W]`` are already read back (the
    call's one read-back); ``inner_lr`` and ``initial`` are read only to word an error. Called after
    :func:`_raise_if_a_plugin_went_non_finite` (a plugin's own NaN). ``only_scored``: which checks are of
    a chunk only scored (:func:`_scored_only_check`: the call's trailing chunk), named so."""
    if table.shape[0] == 0:
        return
    count = len(names)
    broken = ~torch.isfinite(table).all(1) | ~torch.isfinite(largest).all(1)
    if not bool(broken.any()):
        return
    step = int(broken.nonzero()[0])
    where = f"TTT-E2E inner step {step + 1} of this call (chunk {step + 1} trained on in it)"
    if only_scored is not None and only_scored[step]:
        where = f"TTT-E2E chunk {step + 1} of this call (only scored: not yet trained on)"
    advice = _inner_rate_advice(config, inner_lr())
    if not math.isfinite(float(largest[step, 0])):
        cause = (
            "the hidden states entering the suffix blocks are NaN or inf: they come from the embedding and "
            "the prefix blocks, so the model's weights or its input diverged (lower the outer learning rate, "
            "optim.lr), not the inner update's model.e2e.inner_lr"
        )
    elif not bool(torch.isfinite(largest[step, 1:]).all()):
        cause = "the fast weights it was given (carried in the state from an earlier call) are NaN or inf"
    elif math.isfinite(float(table[step, count])):  # finite logits: the losses or the update went
        returned = ~torch.isfinite(table[step, count + 2 :])
        first = names[int(returned.nonzero()[0])] if bool(returned.any()) else "(none: the losses)"
        cause = f"the inner update made fast weight {first} NaN or inf from finite ones: {advice}"
    else:
        cause = _non_finite_logits_cause(largest, initial().cpu(), step, names, advice)
    raise NonFiniteInnerStepError(
        f"{where}: {cause}; model.e2e.non_finite='ignore' lets NaN and inf propagate"
    )


class NonFiniteInnerStepError(NonFiniteRowsError):
    """A TTT-E2E call's inner loop went NaN or inf (``model.e2e.non_finite="raise"``): a plugin's NaN or inf
    from finite inputs (:func:`_raise_if_a_plugin_went_non_finite`) or another cause
    (:func:`_raise_if_the_inner_loop_went_non_finite`); training stops on it as on a divergence. A
    ``ValueError``; ``rows`` and ``finite_rows`` name the batch rows that went non-finite and those that
    stayed finite (:class:`~innerloop.core.layer.NonFiniteRowsError`)."""


def _raise_if_a_plugin_went_non_finite(
    loss: ModelInnerLoss, rule: ModelUpdateRule, sums: torch.Tensor
) -> None:
    """Raise a :class:`NonFiniteInnerStepError` (a ``ValueError``) naming the plugin if, at a chunk trained on (``sums``: one
    :func:`_step_sums` each, read back here at once), the inner loss returned non-finite losses from
    finite fast weights and logits, or the update rule non-finite fast weights from finite fast weights
    and losses (``model.e2e.non_finite="raise"``, as a TTT layer's check of its plugins). ``sums``
    ``[steps, 2 W + 2]`` (or ``[steps, 2 W + 2, B]``, by batch row: summed here) is already read back
    from the device."""
    sums = sums.sum(-1) if sums.dim() == 3 else sums
    if sums.shape[0] == 0:
        return
    finite = torch.isfinite(sums)  # [steps, 2 W + 2]
    weights = (finite.shape[1] - 2) // 2
    given, logits, losses = finite[:, :weights].all(1), finite[:, weights], finite[:, weights + 1]
    bad_loss = given & logits & ~losses
    bad_step = given & losses & ~finite[:, weights + 2 :].all(1)
    if not bool((bad_loss | bad_step).any()):
        return
    step = int((bad_loss | bad_step).nonzero()[0])
    plugin, kind, what = (
        (
            loss,
            "model_inner_loss",
            "chunk_loss returned non-finite losses from finite fast weights and logits",
        )
        if bad_loss[step]
        else (
            rule,
            "model_update_rule",
            "step returned non-finite fast weights from finite ones and finite losses",
        )
    )
    built_in = (
        " (a built-in plugin: more likely the model's weights grew until the inner gradient overflowed; "
        "then try a lower learning rate)"
        if is_built_in(kind, plugin)
        else ""
    )
    raise NonFiniteInnerStepError(
        f"{plugin_label(kind, plugin)}: {what} at inner step {step + 1} of this call (a chunk trained on), "
        f"which the next chunks' logits and the state would carry{built_in}; model.e2e.non_finite='ignore' "
        "lets them propagate"
    )


def _checked_pieces(pieces: Any, caller: str) -> Iterable[torch.Tensor]:
    """``pieces`` if it can be an iterable of ``[B, n]`` id tensors, else a TypeError naming ``caller``:
    not iterable (None, an int), or one id tensor ``[B, T]`` (iterating it reads its rows, which
    ``pieces[0] must be [batch, length]`` would then blame), or a str."""
    single = isinstance(pieces, torch.Tensor) and pieces.dim() <= 2
    if single or isinstance(pieces, (str, bytes)) or not isinstance(pieces, Iterable):
        given = (
            f"a tensor of shape {list(pieces.shape)}"
            if isinstance(pieces, torch.Tensor)
            else f"{type(pieces).__name__} {pieces!r}"
        )
        raise TypeError(
            f"{caller}: pieces must be an iterable of token id tensors [batch, length], e.g. "
            f"ids.split(16, dim=1) or [ids] for one piece; got {given}"
        )
    return pieces


def _check_piece_rows(piece: torch.Tensor, index: int, state: E2EState | None) -> None:
    """A ValueError naming ``pieces[index]`` when it holds another number of sequences (rows) than the
    stream so far (``state``, None before the first piece): the forward would name ``input_ids`` and
    ``state``, which a caller of :meth:`E2ELM.stream` or :meth:`E2ELM.stream_losses` never passed."""
    if state is not None and piece.shape[0] != state.batch_size:
        raise ValueError(
            f"pieces[{index}] has {piece.shape[0]} sequences (rows), the stream's state {state.batch_size} "
            "(the state given, or made by the pieces before): every piece continues the same sequences, "
            "[batch, length] with one batch size"
        )


class E2ELM(MaterialisableLM):
    """The TTT-E2E language model (see the module docstring).

    Args:
        config: a :class:`ModelConfig` with ``mixer == "e2e"``; options in ``config.e2e``. The model
            keeps a copy as ``model.config`` (edit that one): the caller's may go on to build others.

    ``model(input_ids, state)`` returns ``(logits [B, T, V], state)``; each chunk's logits are those
    of the fast weights *before* training on it, so the usual next-token cross-entropy of the logits
    is the outer loss (the mean of the chunks' pre-update losses).

    ``diagnoses_its_inner_loop``: with ``model.e2e.non_finite="raise"``, whether a call raises
    :class:`NonFiniteInnerStepError` where its inner loop went NaN or inf without a plugin's fault (naming
    the chunk and the likely cause, :func:`_raise_if_the_inner_loop_went_non_finite`). Training turns it
    off while fitting: there the loss check, agreed by every process, says it.
    """

    diagnoses_its_inner_loop: bool = True

    def __init__(self, config: ModelConfig | Mapping[str, Any]) -> None:
        super().__init__()
        # its own copy: a config the caller edits to build another model must not change this one
        config = copy.deepcopy(require_model_config(config))
        if config.mixer != E2E:
            raise ValueError(f"E2ELM needs model.mixer='e2e', got {config.mixer!r}")
        validate_model_config(config)
        check_fits_in_memory(config)
        self.config = config
        self.num_prefix = config.num_layers - num_suffix_blocks(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.padding_id)
        self.blocks = nn.ModuleList(
            E2EBlock(config, prime=i >= self.num_prefix) for i in range(config.num_layers)
        )
        self.norm = FloatRMSNorm(config.hidden_size, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        registry = get_registry()
        self.inner_loss: ModelInnerLoss = registry.model_inner_loss(config.e2e.inner_loss)
        self.update_rule: ModelUpdateRule = registry.model_update_rule(config.e2e.update_rule)
        # Share of the outer training done, for the inner lr's warm-up (set_outer_progress). 1 (fully
        # warmed up) in a freshly built model. The training loop sets it to (global_step + 1) / max_steps
        # before each step, and it is saved with the weights: a loaded checkpoint keeps the progress of
        # the last step it was trained at (1 for a finished run) and runs at that step's inner lr (as
        # validation during the run did) until set_outer_progress(1.0).
        self.register_buffer("outer_progress", torch.ones((), dtype=torch.float64))
        self._built = {field: config_value(config, field) for field in BUILT_FIELDS}
        self._warned_of_one_chunk_training = False
        self._init_weights()

    gradient_checkpointing = False
    """Always False: :meth:`gradient_checkpointing_enable` refuses (read by Hugging Face's
    ``is_activation_checkpointing``)."""

    def gradient_checkpointing_enable(self, *args: Any, **kwargs: Any) -> None:
        """Refused (``NotImplementedError``): see :data:`~innerloop.models.config.E2E_CHECKPOINTING_REFUSED`."""
        raise NotImplementedError(E2E_CHECKPOINTING_REFUSED)

    def gradient_checkpointing_disable(self) -> None:
        """Nothing to do: the TTT-E2E model never checkpoints."""

    def _init_weights(self) -> None:
        """Normal(0, init_std) for the embedding and every projection; norms start at 1."""
        std = self.config.init_std
        init_embedding(self.embed, std)
        if not self.config.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)
        for module in self.modules():
            if isinstance(module, (SwiGLU, CausalSelfAttention)):
                for linear in module.children():
                    if isinstance(linear, nn.Linear):
                        nn.init.normal_(linear.weight, std=std)

    # ---- the fast weights ------------------------------------------------------------------------

    def fast_weight_names(self) -> list[str]:
        """Parameter names of the fast weights: every prime MLP's weights, block by block."""
        return [
            f"blocks.{i}.prime.{w}.weight"
            for i in range(self.num_prefix, len(self.blocks))
            for w in PRIME_WEIGHTS
        ]

    def initial_fast_weights(self, batch_size: int) -> FastWeights:
        """The meta-learned initial fast weights, one (expanded, not copied) row per sequence; ``batch_size``
        is an integer >= 0 (``expand`` would read -1 as "keep the size" and give one row)."""
        count = as_integer(batch_size)
        if count is None or count < 0:
            raise (TypeError if count is None else ValueError)(
                f"batch_size={batch_size!r} ({type(batch_size).__name__}) must be an integer >= 0: the number of "
                "sequences, one row of fast weights each"
            )
        batch_size = count
        # By attribute, not by named_parameters(): a suffix block compiled in place (torch.compile) names
        # its weights blocks.i._orig_mod.prime...; _weight reaches them through the wrapper.
        params = {name: self._weight(name) for name in self.fast_weight_names()}
        # In at least float32, whatever the parameters' dtype (model.bfloat16()): a bf16 fast weight
        # would lose every inner update smaller than its rounding step.
        return {
            name: weight.to(torch.promote_types(weight.dtype, torch.float32), copy=True)  # not a view of it
            .unsqueeze(0)
            .expand(batch_size, *weight.shape)
            for name, weight in params.items()
        }

    def _block_fast(self, fast: FastWeights, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gate, up, down = (fast[f"blocks.{i}.prime.{w}.weight"] for w in PRIME_WEIGHTS)
        return gate, up, down

    def set_outer_progress(self, progress: float) -> None:
        """Tell the model how far outer training is (``steps / max_steps``, in [0, 1]), for the inner-lr
        warm-up; ``set_outer_progress(1.0)`` gives the full ``inner_lr``.

        A finite value outside [0, 1] is clamped to it (a step past ``max_steps`` is fully warmed up);
        nan and +-inf are refused with a ``ValueError``.
        """
        one_number = (
            progress.numel() == 1 and not progress.dtype.is_complex and progress.dtype != torch.bool
            if isinstance(progress, torch.Tensor)
            else isinstance(progress, numbers.Real) and not isinstance(progress, bool)
        )
        if not one_number:  # float() of None, a complex or a longer tensor named neither progress nor [0, 1]
            raise TypeError(
                f"progress must be a number in [0, 1], got {progress!r:.80} ({type(progress).__name__})"
            )
        value = float(progress)
        if not math.isfinite(value):
            raise ValueError(
                f"progress={value} must be a finite number in [0, 1] (outer steps done / max_steps); "
                "finite values outside [0, 1] are clamped to it"
            )
        self.outer_progress.fill_(min(max(value, 0.0), 1.0))

    def _apply(self, fn: Any, recurse: bool = True) -> E2ELM:
        """``nn.Module``'s (``.to``, ``.bfloat16()``, ``.cuda()``, ...), keeping ``outer_progress`` in
        float64 on the new device: a cast to bfloat16 would round the inner lr's warm-up (0.3 to 0.3008).
        From the meta device (``to_empty`` of a model built under ``torch.device("meta")``, which leaves
        every buffer uninitialised) it is made again as built: 1, the full ``inner_lr``."""
        progress = self.outer_progress
        super()._apply(fn, recurse)
        if progress.is_meta and not self.outer_progress.is_meta:  # no value to keep: garbage, not 1
            self.outer_progress = torch.ones((), dtype=torch.float64, device=self.outer_progress.device)
        elif self.outer_progress.dtype != torch.float64:
            self.outer_progress = progress.to(device=self.outer_progress.device, copy=True)
        return self

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """``nn.Module``'s, after refusing an ``outer_progress`` buffer outside [0, 1] (nan included):
        training stores ``step / max_steps``, so such a value can only come from an edited file, and it
        would give a nan or negative inner lr."""
        progress = state_dict.get(prefix + "outer_progress")
        if isinstance(progress, torch.Tensor) and progress.numel() == 1 and progress.device.type != "meta":
            value = float(progress)
            if not 0.0 <= value <= 1.0:  # also refuses nan
                raise ValueError(
                    f"the checkpoint's buffer {prefix}outer_progress (the share of outer training done, "
                    f"for the inner-lr warm-up) is {value}; it must be a finite number in [0, 1], as "
                    "training stores it: was the file edited or written by another program?"
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def inner_lr(self) -> float:
        """The inner learning rate now: linear from ``inner_lr_start`` to ``inner_lr`` over the first
        ``inner_lr_warmup_fraction`` of outer training, then ``inner_lr``. ``ValueError`` if the
        ``outer_progress`` buffer is outside [0, 1] or nan (a file loaded around ``load_state_dict``)."""
        e2e = self.config.e2e
        if e2e.inner_lr_warmup_fraction <= 0 or self.outer_progress.device.type == "meta":
            return e2e.inner_lr  # meta: shapes only, no progress to read
        progress = float(self.outer_progress)
        if not 0.0 <= progress <= 1.0:  # also nan: written into the buffer, not by set_outer_progress
            raise ValueError(
                f"the buffer outer_progress (the share of outer training done, for the inner-lr warm-up) "
                f"is {progress}; it must be a finite number in [0, 1]: set it with "
                "model.set_outer_progress(...) (1.0: the full inner_lr)"
            )
        if progress >= e2e.inner_lr_warmup_fraction:
            return e2e.inner_lr
        return (
            e2e.inner_lr_start + (e2e.inner_lr - e2e.inner_lr_start) * progress / e2e.inner_lr_warmup_fraction
        )

    # ---- forward ---------------------------------------------------------------------------------

    def forward(
        self, input_ids: torch.Tensor, state: E2EState | None = None
    ) -> tuple[torch.Tensor, E2EState]:
        """``input_ids [B, T]`` (int64) → ``logits [B, T, V]`` and the state after the last token.

        Under ``torch.no_grad`` / ``inference_mode`` the inner loop still takes its gradients (that is
        test-time training) but keeps no graph between chunks; with gradients on, the logits are
        differentiable through every inner step (second order unless ``e2e.first_order``).

        The other ``config.e2e`` options are read at every call; a change of a :data:`BUILT_FIELDS` one
        (``window``, ``e2e.suffix_fraction``, ``e2e.update_rule``, ...) on a built model raises
        ``ValueError``. A training forward
        of a new sequence of at most ``chunk_size`` tokens warns once (:class:`OneChunkTrainingWarning`).
        """
        inference = self._check_call(input_ids, state)
        if state is None:
            self._warn_of_one_chunk_training(input_ids.shape[1])
        input_ids = input_ids.long()  # the inner loss's targets must be int64 (no copy if they are)
        if inference:
            # Inference tensors cannot enter autograd, and test-time training needs autograd: run on
            # normal tensors, without an outer graph.
            with torch.inference_mode(False), torch.no_grad():
                logits, state = self._forward(input_ids.clone(), state)
            return logits, state
        try:
            return self._forward(input_ids, state)
        except RuntimeError as err:  # inference-mode ids read by a parameter that requires grad
            raise_if_unrecordable(err, input_ids, "input_ids", "model")
            raise

    @run_eagerly("innerloop: the E2E model's checks of its call read values, options and modes")
    def _check_call(self, input_ids: torch.Tensor, state: E2EState | None) -> bool:
        """Refuse a call :meth:`forward` cannot run as asked (the ids, the options, the precision, the
        state); return whether inference mode is on. Eager under ``torch.compile``, in one piece: the checks
        read values, the options' dataclass fields and the inference mode, each of which broke the graph
        on its own (7 breaks in a prefill, 2 of them unannounced, where this one break is announced)."""
        self.check_built_fields()  # read only when built: a change is refused, not ignored (vocab_size too)
        check_token_ids(input_ids, self.config.vocab_size)
        check_same_device(input_ids, self.embed.weight)
        validate_e2e_options(self.config)  # read at every call, and users may change them on a built model
        self._check_precision()
        if state is not None:
            self._check_state(state, input_ids.shape[0])
        return torch.is_inference_mode_enabled()

    def check_built_fields(self, config: ModelConfig | Mapping[str, Any] | None = None) -> None:
        """Raise ``ValueError`` if a :data:`BUILT_FIELDS` field of ``self.config`` no longer has the value
        the model was built with (checked at every forward, and before the model is saved). ``config``:
        the config to check instead of ``self.config`` (a Hugging Face config's ``model`` dict)."""
        changed_built_field(self._built, self.config if config is None else config, _MADE_FROM)

    def _warn_of_one_chunk_training(self, length: int) -> None:
        """Warn once if a training forward (train mode, gradients on, test-time training, a new sequence)
        reads at most one chunk: no inner step can then reach the outer loss (with ``next_token``
        targets none is taken; with ``within_chunk`` the one taken scores nothing)."""
        e2e = self.config.e2e
        training = self.training and torch.is_grad_enabled() and e2e.test_time_training
        if not training or self._warned_of_one_chunk_training or not 0 < length <= e2e.chunk_size:
            return
        self._warned_of_one_chunk_training = True
        warnings.warn(
            f"TTT-E2E training on sequences of {length} tokens (data.seq_len in `innerloop train`), at "
            f"most one chunk (model.e2e.chunk_size={e2e.chunk_size}): every logit is scored before the "
            "chunk's inner step, so if the sequence ends there no inner step reaches the outer loss and "
            "training is exactly the sliding-window baseline (model.e2e.test_time_training=false). Use "
            "data.seq_len > model.e2e.chunk_size (several chunks) to train test-time training; a "
            "sequence fed in pieces, each continuing from the returned state, is trained through this "
            "chunk's step (filter OneChunkTrainingWarning there)",
            OneChunkTrainingWarning,
            stacklevel=warning_stacklevel(),
        )

    def _check_precision(self) -> None:
        """The weights' dtype fits the autocast the model runs under: ``e2e.compute_dtype``'s, or
        (``float32``) the enclosing one (:func:`~innerloop.models.lm.check_weights_under_autocast`)."""
        compute = self.config.e2e.compute_dtype
        device_type = self.embed.weight.device.type
        if compute == "float32":
            check_weights_under_autocast(self, device_type)
        else:
            source = f"model.e2e.compute_dtype={compute!r} runs it under torch.autocast to that dtype"
            check_weights_under_autocast(self, device_type, getattr(torch, compute), source)

    def _check_state(self, state: E2EState, batch: int) -> None:
        """``state`` is one this model made for a batch of ``batch`` sequences (a state of a model with
        other ``test_time_training`` or ``rope_positions`` holds other caches and fast weights)."""
        if not isinstance(state, E2EState):
            raise TypeError(
                f"state must be the E2EState a previous call of this model returned (or None), got "
                f"{type(state).__name__}"
            )
        if len(state.caches) != len(self.blocks):
            raise ValueError(f"state has {len(state.caches)} block caches, the model has {len(self.blocks)}")
        if state.pending_ids.shape[0] != batch:
            raise ValueError(
                f"state is for batch size {state.pending_ids.shape[0]}, input_ids has {batch}: pass the "
                "state made for this batch, or None"
            )
        e2e = self.config.e2e
        relative = e2e.rope_positions == "relative"
        first_chunked = self.num_prefix if e2e.test_time_training else 0
        for i, cache in enumerate(state.caches):
            wanted = ChunkKVCache if relative and i >= first_chunked else KVCache
            if cache is not None and not isinstance(cache, wanted):
                raise ValueError(
                    f"state's cache of block {i} is {a_type(cache)}, this model keeps a "
                    f"{wanted.__name__} there: the state was made by a model with other "
                    f"test_time_training / rope_positions (this one: {e2e.test_time_training} / "
                    f"{e2e.rope_positions!r})"
                )
        if state.chunk_size is not None and state.chunk_size != e2e.chunk_size:
            raise ValueError(
                f"state was made by a model with e2e.chunk_size={state.chunk_size}, this one has "
                f"{e2e.chunk_size}: its chunks would start elsewhere; pass a state this model made, or None"
            )
        if state.chunk_targets is not None and state.chunk_targets != e2e.chunk_targets:
            raise ValueError(
                f"state was made by a model with e2e.chunk_targets={state.chunk_targets!r}, this one has "
                f"{e2e.chunk_targets!r}: its chunks were trained the other way (a full chunk waits for its "
                "next token only with 'next_token'); pass a state this model made, or None"
            )
        self._check_state_shapes(state, batch)
        self._check_state_dtypes(state)

    def _weight(self, name: str) -> torch.Tensor:
        """The weight of that dotted name as the model holds it now: a parameter, or under
        ``torch.func.functional_call`` the plain tensor put in its place (``get_parameter`` refuses that)."""
        module_path, _, attribute = name.rpartition(".")
        return getattr(self.get_submodule(module_path) if module_path else self, attribute)

    def _check_state_dtypes(self, state: E2EState) -> None:
        """The state's tensors are floating point and on the model's device. The fast weights are at least
        as precise as this model keeps them (their parameter's dtype, at least float32:
        :meth:`initial_fast_weights`): narrower ones were rounded by a cast (a wider one, float64, is taken
        and the call computes in the model's dtype). The pending suffix inputs may be of any float dtype:
        they are in the embedding's dtype when made (a state made before ``model.float()`` holds bfloat16
        ones, exact in float32) and are cast to the call's. An integer state would truncate either. The
        caches are checked by :meth:`_check_caches` (floating point; a cache written under autocast holds
        its dtype)."""
        checked = {
            f"fast[{name!r}]": (tensor, torch.promote_types(self._weight(name).dtype, torch.float32))
            for name, tensor in state.fast.items()
        }
        pending_dtype = state.pending.dtype if state.pending.is_floating_point() else self.embed.weight.dtype
        checked["pending"] = (state.pending, pending_dtype)  # any float dtype: cast to the call's
        device = self.embed.weight.device
        for name, (tensor, wanted) in checked.items():
            if not tensor.is_floating_point() or torch.promote_types(tensor.dtype, wanted) != tensor.dtype:
                raise TypeError(
                    f"state.{name} is {tensor.dtype} but this model keeps it in {wanted} (a narrower or "
                    "integer dtype would round or truncate it): pass the state this model returned (not a "
                    "cast copy), or None"
                )
            if tensor.device != device:
                raise ValueError(
                    f"state.{name} is on {tensor.device}, the model on {device}: move the state with "
                    f"state.to({str(device)!r})"
                )

    def _check_state_shapes(self, state: E2EState, batch: int) -> None:
        """The state's fast weights, pending tokens and caches have this model's shapes for ``batch``."""
        e2e = self.config.e2e
        names = self.fast_weight_names() if e2e.test_time_training else []
        params = {name: self._weight(name) for name in names}  # _weight: a suffix block compiled in place too
        if sorted(state.fast) != sorted(names):
            raise ValueError(
                f"state holds fast weights {sorted(state.fast)}, this model (test_time_training="
                f"{e2e.test_time_training}) needs {names}"
            )
        for name in names:
            wanted, got = (batch, *params[name].shape), tuple(state.fast[name].shape)
            if got != wanted:
                raise ValueError(
                    f"state's fast weight {name} is {list(got)}, this model's is {list(wanted)} for a batch "
                    f"of {batch}: the state was made by a model of another shape"
                )
        pending, hidden = state.pending.shape[1], self.config.hidden_size
        if tuple(state.pending.shape) != (batch, pending, hidden) or tuple(state.pending_ids.shape) != (
            batch,
            pending,
        ):
            raise ValueError(
                f"state.pending is {list(state.pending.shape)} and state.pending_ids "
                f"{list(state.pending_ids.shape)}; this model needs [{batch}, p, {hidden}] and [{batch}, p]"
            )
        check_token_ids(state.pending_ids, self.config.vocab_size, name="state.pending_ids")
        if pending > e2e.chunk_size:
            raise ValueError(
                f"state holds {pending} pending tokens, more than a chunk of this model "
                f"(e2e.chunk_size={e2e.chunk_size}): it was made by a model with larger chunks"
            )
        self._check_caches(state.caches, batch, "state.caches")
        self._check_positions(state)
        if state.scored is not None:
            if len(state.scored) != len(self.blocks) or any(
                c is not None for c in state.scored[: self.num_prefix]
            ):
                raise ValueError(
                    f"state.scored must hold one cache per block, None for the {self.num_prefix} prefix "
                    f"blocks; got {len(state.scored)} entries: pass the state this model returned, or None"
                )
            self._check_caches(state.scored, batch, "state.scored")

    def _check_positions(self, state: E2EState) -> None:
        """The state's position agrees with its caches': the prefix blocks' caches are at ``position``,
        the suffix blocks' at the start of the current chunk (``position - pending``, a multiple of
        ``chunk_size``) and the scored ones after the pending tokens (a cache of None is at 0). The
        caches' positions place RoPE and the window, so a state edited by hand that disagrees would give
        other numbers without an error."""
        position, pending = state.position, state.pending.shape[1]
        if not isinstance(position, int) or isinstance(position, bool) or position < pending:
            raise ValueError(
                f"state.position must be an integer >= the {pending} pending tokens, got {position!r}: pass "
                "the state this model returned, or None"
            )
        chunk_start = position - pending
        suffix_from = self.num_prefix if self.config.e2e.test_time_training else len(self.blocks)
        if suffix_from < len(self.blocks) and chunk_start % self.config.e2e.chunk_size:
            raise ValueError(
                f"state.position {position} with {pending} pending tokens puts the current chunk at "
                f"{chunk_start}, not a multiple of e2e.chunk_size={self.config.e2e.chunk_size}: pass the "
                "state this model returned, or None"
            )
        lists = [("state.caches", state.caches, chunk_start)]
        if state.scored is not None:
            lists.append(("state.scored", state.scored, position))
        for name, caches, suffix_position in lists:
            for i, cache in enumerate(caches):
                if i < suffix_from and name == "state.scored":
                    continue  # None there (checked by the caller)
                wanted = position if i < suffix_from else suffix_position
                got = 0 if cache is None else cache.position
                if got != wanted:
                    raise ValueError(
                        f"{name}[{i}] is at position {got}, but a state at position {position} with {pending} "
                        f"pending tokens has it at {wanted}: the state was edited or assembled from "
                        "different states; pass the state this model returned, or None"
                    )

    def _check_caches(self, caches: tuple[AnyCache | None, ...], batch: int, name: str) -> None:
        """Each cache has the shapes its block keeps for ``batch`` sequences at its position."""
        for i, cache in enumerate(caches):
            if isinstance(cache, KVCache):
                self.blocks[i].attn.check_state(cache, batch, name=f"{name}[{i}]")
            elif isinstance(cache, ChunkKVCache):
                _check_chunk_cache(cache, self.blocks[i].attn, batch, f"{name}[{i}]")

    def _forward(self, input_ids: torch.Tensor, state: E2EState | None) -> tuple[torch.Tensor, E2EState]:
        e2e = self.config.e2e
        compute = getattr(torch, e2e.compute_dtype)
        # The official compute_dtype: matrix products in bf16/fp16, weights and fast weights float32.
        # float32 leaves an enclosing autocast (Lightning's mixed precision) in charge; autocast with
        # enabled=False would switch it off.
        precision = (
            nullcontext() if compute == torch.float32 else torch.autocast(input_ids.device.type, compute)
        )
        with precision:
            if not e2e.test_time_training:
                return self._forward_plain(input_ids, state)
            return self._forward_ttt(input_ids, state)

    def _forward_ttt(self, input_ids: torch.Tensor, state: E2EState | None) -> tuple[torch.Tensor, E2EState]:
        caches: list[AnyCache | None] = list(state.caches) if state is not None else [None] * len(self.blocks)
        h = self.embed(input_ids)  # [B, T, D]
        # 1. The prefix blocks, once over everything given, at absolute positions.
        for i in range(self.num_prefix):
            h, caches[i] = self.blocks[i](h, caches[i])
        # 2. The suffix, chunk by chunk, starting with the tokens of an unfinished chunk, if any.
        return self._suffix(h, input_ids, caches, state)

    @run_eagerly("innerloop: the suffix's chunks are cut by the count of pending tokens")
    def _suffix(
        self, h: torch.Tensor, input_ids: torch.Tensor, caches: list[AnyCache | None], state: E2EState | None
    ) -> tuple[torch.Tensor, E2EState]:
        """The suffix of :meth:`_forward_ttt` on the prefix blocks' outputs ``h [B, T, D]``: logits and the
        new state.

        Eager under ``torch.compile``: where its chunks start depends on how many tokens are pending,
        which changes at every decoded token, and a compiled suffix recompiled for each count (seconds
        each, to dynamo's limit). Its chunks trained on run eagerly anyway (their inner step's
        gradient); what it left to compile was the scoring of a chunk that cannot be trained on yet."""
        batch, length = input_ids.shape
        if state is None:
            fast = self.initial_fast_weights(batch)
            pending, pending_ids, scored = h[:, :0], input_ids[:, :0], None
        else:
            fast, pending, pending_ids, scored = state.fast, state.pending, state.pending_ids, state.scored
        h = torch.cat((pending.to(h.dtype), h), dim=1)  # [B, p + T, D], in this call's dtype
        ids = torch.cat((pending_ids, input_ids), dim=1)  # [B, p + T]
        done = Scored(pending.shape[1], list(scored)) if scored is not None and pending.shape[1] else None
        checks: list[torch.Tensor] | None = [] if self.config.e2e.non_finite == "raise" else None
        logits, caches, fast, pending, pending_ids, scored = self._inner_loop(
            h, ids, caches, fast, done, checks
        )
        self._raise_if_an_inner_step_went_non_finite(fast, checks or [], state)
        position = length if state is None else state.position + length
        new_state = E2EState(  # the pending chunk's own copy, not a view of the whole call's inputs
            tuple(caches),
            fast,
            owning(pending),
            owning(pending_ids),
            position,
            self.config.e2e.chunk_size,
            scored,
            self.config.e2e.chunk_targets,
        )
        return logits[:, -length:] if length else logits[:, :0], new_state

    def _raise_if_an_inner_step_went_non_finite(
        self, fast: FastWeights, checks: list[torch.Tensor], given_state: E2EState | None
    ) -> None:
        """The checks of this call's inner steps (``checks``: :func:`_step_sums` then :func:`_step_scales`
        each, by batch row, of fast weights like ``fast``): a plugin's own NaN, then where and why else the
        inner loop went non-finite; one read-back per call, none per chunk. The error names the batch rows
        whose checks hold NaN or inf (:func:`~innerloop.core.layer.with_rows`) and how to run the others
        again from ``given_state``, the state given to the call."""
        batch = next(iter(fast.values())).shape[0]
        if not checks or batch == 0:
            return
        width, trained = 2 * len(fast) + 2, 2 * len(fast) + 2 + 1 + len(fast)
        only_scored = [c.shape[0] > trained for c in checks]  # _scored_only_check's mark: known unread
        cut = trained if self.diagnoses_its_inner_loop else width  # scales are taken only when diagnosed
        by_row = torch.stack([c[:cut] for c in checks]).cpu()  # [steps, cut, B]: the call's one read-back
        broken = ~torch.isfinite(by_row).flatten(0, 1).all(0)  # [B]
        if not bool(broken.any()):
            return
        try:  # the diagnosis of the broken rows only: a finite row's large weights blame nothing
            self._raise_if_a_check_failed(fast, by_row[:, :, broken], width, only_scored)
        except NonFiniteInnerStepError as error:
            with_rows(error, batch, broken.nonzero().flatten().tolist(), given_state)
            raise

    def _raise_if_a_check_failed(
        self, fast: FastWeights, by_row: torch.Tensor, width: int, only_scored: list[bool]
    ) -> None:
        """:meth:`_raise_if_an_inner_step_went_non_finite`'s checks on its read-back ``by_row`` (``[steps,
        cut, B]``, the rows reduced here: a sum or maximum over them is finite iff each row's is)."""
        read = torch.cat((by_row[:, :width].sum(-1), by_row[:, width:].amax(-1)), dim=1)  # [steps, cut]
        _raise_if_a_plugin_went_non_finite(self.inner_loss, self.update_rule, read[:, :width])
        if self.diagnoses_its_inner_loop:
            _raise_if_the_inner_loop_went_non_finite(
                self.config.e2e,
                self.inner_lr,
                sorted(fast),
                read[:, :width],
                read[:, width:],
                self._initial_scales,
                only_scored,
            )

    def explain_non_finite_logits(self, state: E2EState, rows: list[int]) -> str:
        """Why a call that returned ``state`` gave NaN or inf logits in batch ``rows`` without an error, in
        words (for :func:`~innerloop.models.generate.generate`'s error): a call that only scores its tokens
        (no chunk trained on in it, as most decoded tokens' calls) is not checked, so the cause is read
        from the fast weights of those rows: NaN or inf carried in them, grown
        :data:`INNER_GROWTH_BLAMED` times past the model's own (the inner rate), or not (the model's
        weights). Reads the device: for an error only."""
        names = sorted(state.fast)
        picked = torch.tensor(rows, dtype=torch.long, device=state.fast[names[0]].device)
        with torch.no_grad():
            largest = torch.stack(
                [state.fast[n].index_select(0, picked).abs().amax().double() for n in names]
            )
        largest = largest.cpu()
        unchecked = (
            "TTT-E2E checks a call that trains on a chunk, not one that only scored its tokens (no chunk "
            "trained on in it), as this one"
            if self.config.e2e.non_finite == "raise"
            else f"model.e2e.non_finite={self.config.e2e.non_finite!r}: no call of TTT-E2E is checked"
        )
        if not bool(torch.isfinite(largest).all()):
            return (
                f"the fast weights of those rows hold NaN or inf (carried in the state: "
                f"model.e2e.non_finite={self.config.e2e.non_finite!r} let an inner step's NaN through, or the "
                "state was edited)"
            )
        growth, size = _fast_weight_growth(largest, self._initial_scales().cpu(), names)
        if growth >= INNER_GROWTH_BLAMED:
            advice = _inner_rate_advice(self.config.e2e, self.inner_lr())
            return (
                f"{unchecked}; the inner steps grew its fast weights ({size}): the inner learning rate is "
                f"likely too large: {advice}"
            )
        return (
            f"{unchecked}; its fast weights are finite and not grown much ({size}): the model's own weights "
            "or its hidden states likely overflowed (a diverged model: lower optim.lr), not model.e2e.inner_lr"
        )

    def _initial_scales(self) -> torch.Tensor:
        """The largest magnitude of each of the model's own fast weights (the initial ones), by name."""
        with torch.no_grad():
            return torch.stack(
                [self.get_parameter(name).abs().amax().float() for name in sorted(self.fast_weight_names())]
            )

    def _chunk_for_attention(self) -> int | None:
        """The chunk size the chunked blocks attend with (relative RoPE), or None (absolute RoPE)."""
        e2e = self.config.e2e
        return e2e.chunk_size if e2e.rope_positions == "relative" else None

    def _trainable(self, start: int, end: int, length: int) -> bool:
        """Whether the chunk ``[start, end)`` of ``length`` suffix inputs can be trained on now: it is
        complete and, with ``chunk_targets="next_token"``, the token after it has been read."""
        complete = end - start == self.config.e2e.chunk_size
        return complete and (end < length or self.config.e2e.chunk_targets == "within_chunk")

    def _trains_any(self, length: int) -> bool:
        """Whether a call with ``length`` suffix inputs trains on any chunk; refuses one that does under a
        ``torch.func`` transform (a call that only scores takes no inner gradient, so it runs there)."""
        chunk = self.config.e2e.chunk_size
        starts = range(0, length, chunk)
        trains = any(self._trainable(start, min(start + chunk, length), length) for start in starts)
        if trains:
            _check_not_under_func_transform()
        return trains

    def _mark_skipped(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids [B, n]`` with every target (all but the first id) equal to ``e2e.skip_target_id``
        replaced by -1, which the inner loss skips."""
        skip = self.config.e2e.skip_target_id
        if skip is None:
            return ids
        is_target = torch.arange(ids.shape[1], device=ids.device) > 0
        return torch.where((ids == skip) & is_target, torch.full_like(ids, -1), ids)

    def _inner_loop(
        self,
        h: torch.Tensor,
        ids: torch.Tensor,
        caches: list[AnyCache | None],
        fast: FastWeights,
        done: Scored | None = None,
        checks: list[torch.Tensor] | None = None,
    ) -> InnerLoopResult:
        """Score-then-train every chunk of ``h [B, N, D]`` (suffix inputs) whose tokens start a chunk.

        ``done``: how many of the first chunk's tokens an earlier call scored, and the caches after them;
        while that chunk cannot be trained on, only its new tokens are scored (from those caches).
        ``checks``: where each inner step appends its :func:`_step_sums` (None: none are taken).

        Returns the logits ``[B, N', V]`` (``N' = N``, or without the tokens of ``done`` when they were not
        scored again: the last ``N - done.tokens`` are the new tokens'), the caches and fast weights after
        the chunks trained on, the trailing chunk that cannot be trained on yet (scored, not trained on)
        as the new pending inputs and ids, and the caches after scoring it (None when nothing is pending).
        """
        chunk, length = self.config.e2e.chunk_size, h.shape[1]
        outer = torch.is_grad_enabled()  # an outer graph is wanted (training)
        with_next = self.config.e2e.chunk_targets == "next_token"  # the loss also reads the next token
        pieces: list[torch.Tensor] = []
        pending, pending_ids, scored = h[:, :0], ids[:, :0], None
        if self._trains_any(length) and outer:  # fast weights cut from the graph start afresh
            fast = {k: v if v.requires_grad else v.detach().requires_grad_() for k, v in fast.items()}
        inner_lr = self.inner_lr() if length >= chunk else None  # read once per call (a GPU buffer)
        for start in range(0, length, chunk):
            end = min(start + chunk, length)
            h_chunk, ids_chunk = h[:, start:end], ids[:, start:end]  # [B, C, D], [B, C]
            trainable = self._trainable(start, end, length)
            if start == 0 and done is not None and not trainable:  # score only the chunk's new tokens
                logits, new_scored = self._score(h_chunk[:, done.tokens :], done.caches, fast)
                pending, pending_ids, scored = h_chunk, ids_chunk, self._suffix_caches(new_scored)
                if not outer:
                    pending, scored = pending.detach(), _detached(scored)
                    logits = logits.detach()
                pieces.append(logits)
                continue
            if not outer:  # no graph between chunks: each chunk's inner gradient starts afresh
                h_chunk = h_chunk.detach()
                fast = {k: v.detach().requires_grad_() if trainable else v.detach() for k, v in fast.items()}
            targets = (ids[:, start : end + 1] if with_next else ids_chunk) if trainable else None
            logits, new_caches, fast = self._score_and_train(h_chunk, targets, caches, fast, inner_lr, checks)
            if trainable:
                caches = new_caches
            else:  # train on this chunk once its last token (and target) has come
                pending, pending_ids, scored = h_chunk, ids_chunk, self._suffix_caches(new_caches)
            if not outer:
                logits = logits.detach()
                caches = [None if c is None else c.detach() for c in caches]
                fast = {k: v.detach() for k, v in fast.items()}
                pending = pending.detach()
                scored = None if scored is None else _detached(scored)
            pieces.append(logits)
        if not pieces:
            empty = h.new_zeros(h.shape[0], 0, self.config.vocab_size)
            return empty, caches, fast, pending, pending_ids, scored
        return torch.cat(pieces, dim=1), caches, fast, pending, pending_ids, scored

    def _score_and_train(
        self,
        h_chunk: torch.Tensor,
        targets: torch.Tensor | None,
        caches: list[AnyCache | None],
        fast: FastWeights,
        inner_lr: float | None,
        checks: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, list[AnyCache | None], FastWeights]:
        """Score one chunk ``h_chunk [B, C, D]`` (logits ``[B, C, V]`` and the caches after it); with its
        ``targets`` (``[B, C (+ 1)]``: the chunk can be trained on), take the inner step on it too, at
        ``inner_lr`` (:meth:`inner_lr`, read by the caller), appending its finiteness to ``checks``; a chunk
        only scored appends its own (:func:`_scored_only_check`) where ``checks`` holds a trained one's.

        A chunk trained on is scored and stepped eagerly under ``torch.compile``: the step's
        ``torch.autograd.grad`` goes through the scoring's backward, which, compiled, could be neither
        differentiated again (the outer gradient, second order: "aot_autograd does not currently support
        double backward") nor run twice (the update rule retains the graph; AOTAutograd may compile a
        backward that frees its buffers). A chunk only scored compiles."""
        create_graph = torch.is_grad_enabled() and not self.config.e2e.first_order
        if targets is not None:
            return self._score_and_step_eagerly(
                h_chunk, targets, caches, fast, create_graph, inner_lr, checks
            )
        logits, new_caches, fast = self._score_and_step(h_chunk, targets, caches, fast, create_graph, None)
        if (
            checks and self.diagnoses_its_inner_loop and holds_values(logits)
        ):  # read back with a trained one's
            checks.append(
                _scored_only_check(h_chunk, fast, logits)
            )  # (no plugin ran: for the diagnosis only)
        return logits, new_caches, fast

    def _score_and_step(
        self,
        h_chunk: torch.Tensor,
        targets: torch.Tensor | None,
        caches: list[AnyCache | None],
        fast: FastWeights,
        create_graph: bool,
        inner_lr: float | None,
        checks: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, list[AnyCache | None], FastWeights]:
        """:meth:`_score_and_train`'s work; ``create_graph``: the outer loss differentiates through the
        inner step (second order); ``checks``: where to append the step's :func:`_step_sums`."""
        e2e = self.config.e2e
        # The inner step runs attention on the math kernel, which is differentiable to any order. attend's
        # own create_graph backward would recompute on it too, after a fused forward: no faster here (an
        # E2E training step, width 64, T=128: 86-90 ms either way), and these are the numbers kept so far.
        attention = sdpa_kernel([SDPBackend.MATH]) if create_graph else nullcontext()
        # the step's torch.autograd.grad unpacks the scoring's saved tensors during the forward: an enclosing
        # activation checkpoint's hooks would recompute the whole checkpointed function for each
        hooks = saved_tensors_hooks_suspended() if targets is not None else nullcontext()
        with torch.enable_grad(), attention, hooks:
            logits, new_caches = self._score(h_chunk, caches, fast)
            if targets is not None:
                losses = self.inner_loss.chunk_loss(logits, self._mark_skipped(targets))  # [B]
                _check_chunk_losses(self.inner_loss, losses, logits)
                assert inner_lr is not None, "a chunk trained on needs the inner learning rate"
                stepped = self.update_rule.step(fast, losses, inner_lr, e2e.inner_grad_clip, create_graph)
                stepped = _checked_step(self.update_rule, fast, stepped)
                if checks is not None and holds_values(logits):
                    sums = _step_sums(fast, logits, losses, stepped)  # the scales only where they are read
                    diagnosed = self.diagnoses_its_inner_loop
                    checks.append(torch.cat((sums, _step_scales(h_chunk, fast))) if diagnosed else sums)
                fast = stepped
        return logits, new_caches, fast

    _score_and_step_eagerly = run_eagerly("innerloop: the inner step takes a gradient eagerly")(
        _score_and_step
    )

    def _suffix_caches(self, caches: list[AnyCache | None]) -> tuple[AnyCache | None, ...]:
        """``caches`` with None for the prefix blocks (whose caches the state keeps up to date already)."""
        return tuple(None if i < self.num_prefix else c for i, c in enumerate(caches))

    def _score(
        self, h: torch.Tensor, caches: list[AnyCache | None], fast: FastWeights
    ) -> tuple[torch.Tensor, list[AnyCache | None]]:
        """The suffix blocks, final norm and head on one chunk ``h [B, C, D]`` with fast weights ``fast``
        (float32 logits ``[B, C, V]``)."""
        caches = list(caches)
        chunk = self._chunk_for_attention()
        for i in range(self.num_prefix, len(self.blocks)):
            h, caches[i] = self.blocks[i](h, caches[i], self._block_fast(fast, i), chunk)
        return _at_least_float32(self.lm_head(self.norm(h))), caches

    def _forward_plain(
        self, input_ids: torch.Tensor, state: E2EState | None
    ) -> tuple[torch.Tensor, E2EState]:
        """Every block over ``input_ids``, prime MLPs fixed: a plain sliding-window Transformer. With
        relative RoPE every block attends chunk by chunk, as the official code's ``pretrain`` mode."""
        caches: list[AnyCache | None] = list(state.caches) if state is not None else [None] * len(self.blocks)
        h = self.embed(input_ids)  # [B, T, D]
        chunk = self._chunk_for_attention()
        for i, block in enumerate(self.blocks):
            h, caches[i] = block(h, caches[i], None, chunk)
        logits = _at_least_float32(self.lm_head(self.norm(h)))  # [B, T, V]
        position = input_ids.shape[1] + (0 if state is None else state.position)
        # nothing pending: empty tensors of their own, not views of the call's hidden states and ids (a
        # state kept after a long prefill held them, and with gradients the call's graph, alive)
        batch = input_ids.shape[0]
        return logits, E2EState(
            tuple(caches),
            {},
            h.new_zeros((batch, 0, h.shape[-1])),
            input_ids.new_zeros((batch, 0)),
            position,
            self.config.e2e.chunk_size,
        )

    # ---- streaming -------------------------------------------------------------------------------

    def stream(
        self, pieces: Iterable[torch.Tensor], state: E2EState | None = None
    ) -> Iterator[tuple[torch.Tensor, E2EState]]:
        """Read a sequence given as pieces ``[B, n_i]`` (any lengths); yield each piece's logits
        ``[B, n_i, V]`` and the state after it.

        Memory is constant in the sequence length: the state holds one window of keys and values per
        block, the fast weights and at most one chunk of pending inputs, and nothing else is kept.
        The model runs without autograd: grad mode is set around each call, not by decorating this
        generator (torch's wrapper printed a traceback at interpreter exit for an iterator left half read).
        """
        for i, piece in enumerate(_checked_pieces(pieces, "stream")):
            check_token_ids(piece, self.config.vocab_size, f"pieces[{i}]")  # named as the caller gave it
            _check_piece_rows(piece, i, state)
            with torch.no_grad():
                logits, state = self(piece, state)
            yield logits, state

    def stream_losses(self, pieces: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Per-token next-token losses of a sequence given as pieces ``[B, n_i]``.

        Yields, one ``[B, n']`` tensor per piece (as :meth:`stream` yields one per piece), the losses of
        the tokens whose target has arrived: the loss at position ``t`` is ``-log p(x_{t+1} | x_{<=t})``,
        so the first non-empty piece's yield is one short, an empty piece's is ``[B, 0]``, and the
        sequence's last token has none. Concatenated, the yields are ``[B, N - 1]`` for ``N`` tokens.
        """
        last_logits: torch.Tensor | None = None  # [B, 1, V]: the previous piece's last prediction
        state: E2EState | None = None
        for i, piece in enumerate(_checked_pieces(pieces, "stream_losses")):
            check_token_ids(piece, self.config.vocab_size, f"pieces[{i}]")
            _check_piece_rows(piece, i, state)
            if piece.shape[1] == 0:  # no token, no target: [B, 0], so that yields and pieces pair up
                dtype = torch.promote_types(self.embed.weight.dtype, torch.float32)  # the logits'
                yield torch.zeros(piece.shape[0], 0, dtype=dtype, device=piece.device)
                continue
            with torch.no_grad():  # around the call, not as a decorator: see stream
                logits, state = self(piece, state)
                if last_logits is not None:
                    logits = torch.cat((last_logits, logits), dim=1)  # [B, 1 + n, V]
                    targets = piece
                else:
                    targets = piece[:, 1:]
                scored = logits[:, : targets.shape[1]]
                # int64 targets: a piece of int32 ids, which the model reads, was torch's "expected target
                # dtype to be Long or Byte" here
                losses = F.cross_entropy(scored.transpose(1, 2), targets.long(), reduction="none")  # [B, n']
                # a copy of the last row, not a view: a view, and these names, kept the whole piece's logits
                # [B, 1 + n, V] alive while the next piece ran
                last_logits = logits[:, -1:].clone()
                del logits, scored
            yield losses

    def training_loss(self, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
        """The loss a training step minimises for this model's ``logits [B, T, V]`` of ``targets [B, T]``
        (``ignore_index``: not scored), by ``e2e.outer_loss``: ``chunk_mean``, the official code's
        (:func:`~innerloop.core.functional.chunk_mean_cross_entropy`, ``skip_target_id`` not scored), or
        ``token_mean``, the mean over the scored targets. Training (``LanguageModelModule``) calls it;
        validation scores every target alike, as for every mixer."""
        validate_e2e_options(self.config)  # as forward does: "token-mean" is refused, not read as chunk_mean
        e2e = self.config.e2e
        if e2e.outer_loss == "token_mean":
            return mean_scored_cross_entropy(logits, targets, ignore_index)
        return chunk_mean_cross_entropy(logits, targets, e2e.chunk_size, ignore_index, e2e.skip_target_id)

    def num_parameters(self) -> int:
        """Number of distinct parameters (the tied head counted once)."""
        return sum(p.numel() for p in self.parameters())
