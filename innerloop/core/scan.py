"""Helpers every update rule shares: splitting a chunk at mini-batch boundaries, carrying state.

A chunk of ``T`` tokens that starts at absolute position ``p`` is cut into segments that never
cross a mini-batch boundary: a head (the rest of a mini-batch already begun), whole mini-batches,
and a tail (the start of a mini-batch that the next chunk continues). Within one segment all
gradients are taken at the same weights, the mini-batch's starting weights.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any

import torch

from innerloop.core.arguments import check_kind as _check_kind
from innerloop.core.arguments import check_tensor as _check_tensor
from innerloop.core.eager import run_eagerly
from innerloop.core.functional import decay_from_log, log_segment_sums, transformed_or_dual
from innerloop.core.protocol import InnerModel, InnerTask, LossPairs, Params, UpdateRule, Views
from innerloop.core.state import TTTState
from innerloop.core.wording import a_type


@dataclass(frozen=True)
class Segment:
    """Tokens ``start:end`` of a chunk; ``offset`` is the first token's index in its mini-batch."""

    start: int
    end: int
    offset: int
    closes_mini_batch: bool

    @property
    def length(self) -> int:
        return self.end - self.start


def split_segments(position: int, num_tokens: int, mini_batch_size: int) -> list[Segment]:
    """Cut ``num_tokens`` tokens starting at absolute ``position`` at mini-batch boundaries."""
    segments = []
    start = 0
    while start < num_tokens:
        offset = (position + start) % mini_batch_size
        end = min(num_tokens, start + mini_batch_size - offset)
        segments.append(
            Segment(start, end, offset, closes_mini_batch=offset + end - start == mini_batch_size)
        )
        start = end
    return segments


@dataclass(frozen=True)
class ChunkInputs:
    """The per-token inputs of the inner loop for one chunk, loss pairs already built.

    ``query``, ``inputs``, ``targets``: ``[B, H, T, f]``; ``lr``: ``[B, H, T]`` with invalid pairs
    zeroed; ``decay`` and ``momentum`` (``[B, H, T]`` or None): each token's forgetting ``1 - a_t``
    and momentum ``m_t`` (see :func:`run_scan`). ``decay_log`` (``[B, H, T]`` or None): ``log a_t``
    where the gate came as a log (then ``decay`` is ``-expm1(decay_log)``); the planned forms take the
    decay products from it (:func:`log_running_products`), exact for a small ``a_t``, which ``1 - decay``
    holds only to ``eps / a_t`` relative.
    """

    query: torch.Tensor
    inputs: torch.Tensor
    targets: torch.Tensor
    lr: torch.Tensor
    decay: torch.Tensor | None = None
    momentum: torch.Tensor | None = None
    decay_log: torch.Tensor | None = None

    def segment(self, seg: Segment) -> ChunkInputs:
        sl = slice(seg.start, seg.end)
        return ChunkInputs(
            self.query[:, :, sl],
            self.inputs[:, :, sl],
            self.targets[:, :, sl],
            self.lr[:, :, sl],
            None if self.decay is None else self.decay[:, :, sl],
            None if self.momentum is None else self.momentum[:, :, sl],
            None if self.decay_log is None else self.decay_log[:, :, sl],
        )


def checked_pairs(loss: object, pairs: object, views: Views, carry: Mapping | None = None) -> LossPairs:
    """``pairs``, what ``loss.pairs(views, ...)`` returned, checked at run time as registration checks
    it at one small shape: a ``LossPairs`` whose inputs and targets are ``[B, H, T, f]`` like the
    views, in their dtype, a ``valid`` that broadcasts to ``[B, H, T]`` and a dict carry. A plugin
    wrong at this call's shape only is named here, not by a torch error further on."""
    label = f"inner loss {getattr(loss, 'name', '?')!r} ({type(loss).__module__}.{type(loss).__qualname__}): pairs()"
    if not isinstance(pairs, LossPairs):
        raise TypeError(f"{label} must return an innerloop.LossPairs; got {type(pairs).__name__}")
    expected = tuple(views.key.shape)
    for field_name in ("inputs", "targets"):
        value = getattr(pairs, field_name)
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        if got != expected:
            raise ValueError(
                f"{label} must give inputs and targets of shape [B, H, T, f] = {expected} (the views' of "
                f"this call); got {field_name} {got}"
            )
        if value.dtype != views.key.dtype:
            raise TypeError(
                f"{label} gave {field_name} of dtype {value.dtype} for views of dtype {views.key.dtype}; "
                "build the pairs in the views' dtype"
            )
    valid = pairs.valid
    if valid is not None:
        shape = tuple(valid.shape) if isinstance(valid, torch.Tensor) else None
        fits = shape is not None and len(shape) <= 3
        fits = fits and all(
            have in (1, want) for have, want in zip(shape[::-1], expected[2::-1], strict=False)
        )
        if not fits:
            raise ValueError(
                f"{label} gave valid of shape {shape or type(valid).__name__}; valid must broadcast to "
                f"[B, H, T] = {expected[:3]} (or be None: every pair counts)"
            )
    if not isinstance(pairs.carry, Mapping):
        raise TypeError(
            f"{label} must give a carry that is a dict of tensors; got {type(pairs.carry).__name__}"
        )
    _check_carry_kept_its_shapes(label, carry or {}, pairs.carry)
    return pairs


def _check_carry_kept_its_shapes(label: str, before: Mapping, after: Mapping) -> None:
    """A carry entry keeps its shape, dtype and device from one call to the next (a layer checks a state's
    carry against ``init_carry``'s): one that changed is the plugin's, named here, not blamed on the state
    the layer returned at the next call."""
    changed = {
        key: (tuple(before[key].shape), tuple(value.shape))
        for key, value in after.items()
        if isinstance(value, torch.Tensor)
        and isinstance(before.get(key), torch.Tensor)
        and value.shape != before[key].shape
    }
    if changed:
        raise ValueError(
            f"{label} gave a carry whose entries changed shape, {{key: (received, returned)}} = {changed}: "
            "each entry keeps the shape init_carry gives it"
        )
    for key, value in after.items():
        given = before.get(key)
        if not (isinstance(value, torch.Tensor) and isinstance(given, torch.Tensor)):
            continue
        if value.dtype != given.dtype or value.device != given.device:
            raise TypeError(
                f"{label} gave carry[{key!r}] in {value.dtype} on {value.device}, but the carry it received "
                f"holds it in {given.dtype} on {given.device} (init_carry's, in the layer's dtype): each entry "
                "keeps its dtype and device; build it from the views or the carry received (e.g. "
                "views.key.new_ones(()), not torch.tensor(1.0))"
            )


def check_rule_arguments(
    rule: UpdateRule,
    state: object,
    task: object,
    views: object,
    lr: object,
    tau: object,
    **gates: object,
) -> None:
    """Refuse what ``rule.forward`` cannot run, naming the parameter, what was given and what is valid:
    ``state`` a :class:`TTTState`, ``task`` an :class:`InnerTask` of the state's mini-batch size,
    ``views`` a :class:`Views` of three ``[B, H, T, f]`` tensors (the state's ``B``, ``H``, ``f``;
    ``T >= 1``) and ``lr`` and each gate given (``decay``, ``momentum``, ``decay_log``) ``[B, H, T]``,
    all in the state's dtype and on its device; ``tau`` ``[K]`` (None for a rule without a token-index
    scale). The built-in rules call it once at the top of ``forward`` (their public entry, called
    directly too): it reads shapes, dtypes and devices only, never a value (no device sync)."""
    where = f"update_rule={rule.name!r}: forward"
    _check_kind(where, "state", state, TTTState)
    _check_kind(where, "task", task, InnerTask)
    _check_kind(where, "views", views, Views)
    signature = state.signature  # type: ignore[attr-defined]
    if task.mini_batch_size != signature.mini_batch_size:  # type: ignore[attr-defined]
        raise ValueError(
            f"{where}: task.mini_batch_size must be the state's ({signature.mini_batch_size}), got "
            f"{task.mini_batch_size}"  # type: ignore[attr-defined]
        )
    like = next(iter(state.params.values()), None)  # type: ignore[attr-defined]
    query = views.query  # type: ignore[attr-defined]
    tokens = query.shape[2] if isinstance(query, torch.Tensor) and query.dim() == 4 else None
    rows = (signature.batch_size, signature.num_heads)
    for name in ("query", "key", "value"):
        expected = (*rows, tokens, signature.head_dim)
        what = "[B, H, T, f] (the state's B, H, f; one T)"
        _check_tensor(where, f"views.{name}", getattr(views, name), expected, what, like)
    assert tokens is not None  # views.query passed its check
    if tokens < 1:
        raise ValueError(
            f"{where}: views must hold at least one token, got T = 0 (TTTLayer and innerloop.ops.scan "
            "return empty outputs for an empty chunk without calling the rule)"
        )
    _check_tensor(where, "lr", lr, (*rows, tokens), "[B, H, T]", like)
    for name, gate in gates.items():
        if gate is not None:
            _check_tensor(where, name, gate, (*rows, tokens), "[B, H, T] (or None)", like)
    if not rule.uses_token_scale:
        if tau is not None:
            raise ValueError(
                f"{where}: tau must be None (the rule has no token-index scale), got {_shape_or_type(tau)}"
            )
        return
    _check_tensor(where, "tau", tau, (task.mini_batch_size,), "[K] (K = task.mini_batch_size)", like)  # type: ignore[attr-defined]


def prepare_chunk(
    state: TTTState,
    task: InnerTask,
    views: Views,
    lr: torch.Tensor,
    decay: torch.Tensor | None = None,
    momentum: torch.Tensor | None = None,
    decay_log: torch.Tensor | None = None,
) -> tuple[ChunkInputs, dict]:
    """Build the loss pairs of a chunk and fold their validity into the learning rates (a token
    without a pair takes no gradient step; its decay and momentum still apply). ``decay_log`` (``log
    a``, instead of ``decay``) is kept beside the ``decay = -expm1(decay_log)`` it gives."""
    pairs = checked_pairs(task.loss, task.loss.pairs(views, state.loss_carry), views, state.loss_carry)
    if pairs.valid is not None:
        lr = lr * pairs.valid.to(lr.dtype)
    if decay_log is not None:
        decay = decay_from_log(decay_log)
    return ChunkInputs(views.query, pairs.inputs, pairs.targets, lr, decay, momentum, decay_log), pairs.carry


def close_mini_batch(params: Params, pending: Params, tau_last: torch.Tensor) -> tuple[Params, Params]:
    """Commit a finished mini-batch: ``W_b <- W_b - tau_last * pending``, ``pending <- 0``."""
    new_params = {k: params[k] - tau_last * pending[k] for k in params}
    new_pending = {k: torch.zeros_like(v) for k, v in pending.items()}
    return new_params, new_pending


def advance_state(
    state: TTTState,
    params: Params,
    pending: Params,
    num_tokens: int,
    loss_carry: dict,
    momentum: Params | None = None,
    decay_product: torch.Tensor | None = None,
) -> TTTState:
    """The state after a chunk of ``num_tokens`` tokens (``momentum``: the momentum rule's ``S``,
    None for none; ``decay_product`` ``[B, H]``: the decay product inside the current mini-batch,
    None when it is 1)."""
    return replace(
        state,
        params=params,
        pending=pending,
        position=state.position + num_tokens,
        loss_carry=loss_carry,
        momentum={} if momentum is None else dict(momentum),
        decay={} if decay_product is None else {"product": decay_product},
    )


# --------------------------------------------------------------------------------------------------
# Decay and momentum: what every token of a segment reads, as a plan the dual and primal forms share
# --------------------------------------------------------------------------------------------------


def running_products(factors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For per-token factors ``a [B, H, N]``: ``(within [B, H, N, N], cumulative [B, H, N])`` with
    ``within[i, j] = prod_{r = j+1..i} a_r`` for ``j <= i`` (1 on the diagonal, 0 above it) and
    ``cumulative[i] = prod_{r <= i} a_r``. Exact products (no logarithms), so a factor of 0 (full
    forgetting) is fine, and differentiable to every order."""
    num_tokens = factors.shape[-1]
    strictly_below = torch.ones(num_tokens, num_tokens, dtype=torch.bool, device=factors.device).tril(-1)
    # rows i, columns j: a_i where i > j, else 1; the product down column j from row j to row i.
    table = torch.where(strictly_below, factors[..., :, None], torch.ones_like(factors)[..., :, None])
    within = torch.cumprod(table, dim=-2).tril()
    return within, torch.cumprod(factors, dim=-1)


# exp of this is 0 in float64 (and below): a log gate of -inf (a full reset) is clamped to it, so no -inf
# enters the running sums. Values and derivatives are the same either way (exp gives 0, and each factor
# comes from its own segment's sum, log_segment_sums, never from a difference of two running sums, where
# -inf - -inf would be NaN)
LOG_GATE_FLOOR = -800.0


def log_running_products(logs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`running_products` of the factors ``a = exp(logs)`` for ``logs [B, H, N]`` (``log a <= 0``),
    taken in log space as FLA takes its gates: ``within[i, j] = exp(G_i - G_j)`` for ``j <= i`` and
    ``cumulative[i] = exp(G_i)`` with ``G = cumsum(logs)``.

    The logs are summed in float64 (float32 on MPS; then the factors cast to ``logs``' dtype), each
    ``G_i - G_j`` over its own terms (:func:`~innerloop.core.functional.log_segment_sums`): each product is
    then within float64's rounding of itself however long the segment, strong the gates or many the resets,
    where a product of rounded factors (or differences of long sums, ``|G| eps``: 2e-12 in float64 after
    a few resets, 1e-4 in float32 under strong gates) is not, and a
    factor given as ``1 - decay`` holds a small ``a`` only to ``eps / a`` relative. Its gradient w.r.t. ``logs``
    is exact too (no division by a factor). ``-inf`` (a full reset) is clamped to
    :data:`LOG_GATE_FLOOR`. Differentiable to every order."""
    num_tokens = logs.shape[-1]
    wide = torch.float32 if logs.device.type == "mps" else torch.float64  # MPS has no float64
    clamped = logs.to(wide).clamp_min(LOG_GATE_FLOOR)
    cumulated = clamped.cumsum(dim=-1)  # G [B, H, N]
    lower = torch.ones(num_tokens, num_tokens, dtype=torch.bool, device=logs.device).tril()
    # G_i - G_j summed over its own terms (log_segment_sums), not as a difference of two long sums;
    # masked before exp (to -inf: exp 0, gradient 0), so the backward never meets inf * 0
    exponents = torch.where(lower, log_segment_sums(clamped), -torch.inf)
    return exponents.exp().to(logs.dtype), cumulated.exp().to(logs.dtype)


def scale_params(scale: torch.Tensor, params: Params) -> Params:
    """``scale [B, H]`` times every weight ``[B, H, *shape]``."""
    return {k: _times(scale, v) for k, v in params.items()}


def _times(scale: torch.Tensor | float, value: torch.Tensor) -> torch.Tensor:
    """``scale`` (a number, or ``[B, H]``) times ``value [B, H, *shape]``."""
    if isinstance(scale, float):
        return scale * value
    return scale.reshape(scale.shape + (1,) * (value.dim() - 2)) * value


def combine(*terms: tuple[torch.Tensor | float, Params]) -> Params:
    """``sum_k scale_k * params_k`` for scales ``[B, H]`` (or numbers) over weights ``[B, H, *shape]``."""
    first_scale, first = terms[0]
    total = {k: _times(first_scale, v) for k, v in first.items()}
    for scale, params in terms[1:]:
        total = {k: total[k] + _times(scale, params[k]) for k in total}
    return total


@dataclass(frozen=True)
class SegmentPlan:
    """How each token ``i`` of a segment (inside one mini-batch) reads its weights::

        W_i = base_i * W_b - sum_k coefficient_k,i * extra_k - sum_{j <= i} mixing[i, j] * lr_j * grad_j

    where ``W_b`` are the mini-batch's starting weights (where every gradient is taken) and
    ``extra_k`` are weights-shaped state (pending sums, momentum). ``base`` ``[B, H, N]`` (None: 1),
    each coefficient ``[B, H, N]``, ``mixing`` ``[B, H, N, N]`` lower triangular. ``sums`` are rows
    ``w [B, H, N]``: the reader also returns ``sum_j w_j * lr_j * grad_j`` for each (the state update).
    """

    base: torch.Tensor | None
    extras: tuple[tuple[torch.Tensor, Params], ...]
    mixing: torch.Tensor
    sums: tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class SegmentCarry:
    """What a segment continues from and hands on: the pending sums, the decay product ``[B, H]``
    (None: 1) and the momentum ``S`` (None: no momentum)."""

    pending: Params
    decay_product: torch.Tensor | None
    momentum: Params | None


#: Turns a plan's ``sums`` into the carry after the segment.
Finish = Callable[[list[Params]], SegmentCarry]


def _decay_products(chunk: ChunkInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The running products of a segment's gates ``a = 1 - decay`` (:func:`_products`): from
    ``chunk.decay_log`` in log space where the gate came as a log (:func:`log_running_products`),
    else from ``1 - decay``."""
    if chunk.decay_log is not None:
        return log_running_products(chunk.decay_log)
    return _products(None if chunk.decay is None else 1.0 - chunk.decay, chunk.lr)


def _products(factors: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`running_products` of ``factors``, or for None (all ones) the causal mask of ones
    ``[N, N]`` and None."""
    if factors is None:
        num_tokens = like.shape[-1]
        return torch.ones(num_tokens, num_tokens, dtype=like.dtype, device=like.device).tril(), None
    return running_products(factors)


def _start_scale(
    carry: SegmentCarry, cumulative: torch.Tensor | None, like: torch.Tensor
) -> torch.Tensor | None:
    """``A_i = A_prev * prod_{r <= i} a_r`` ``[B, H, N]``, None when both are 1."""
    if carry.decay_product is None:
        return cumulative
    product = carry.decay_product[..., None]  # [B, H, 1]
    return product * cumulative if cumulative is not None else product.expand_as(like)


def plan_dual(
    chunk: ChunkInputs, tau: torch.Tensor, carry: SegmentCarry, has_pending: bool
) -> tuple[SegmentPlan, Finish]:
    """The plan of the mini-batch rule (dual form and primal form) with decay ``1 - a``:
    ``W_i = A_i W_b - tau_i P_i`` with ``P_i = a_i P_{i-1} + lr_i grad_i`` and ``A_i = a_i A_{i-1}``.

    Returns the plan and ``finish(sums) -> SegmentCarry`` (the carry after the segment)."""
    within, cumulative = _decay_products(chunk)  # of a = 1 - decay [B, H, N]
    base = _start_scale(carry, cumulative, chunk.lr)
    tau_tokens = tau.expand_as(chunk.lr)  # [B, H, N]
    extras = (
        ((tau_tokens if cumulative is None else tau_tokens * cumulative, carry.pending),)
        if has_pending
        else ()
    )
    plan = SegmentPlan(base, extras, tau[:, None] * within, (within[..., -1, :],))

    def finish(sums: list[Params]) -> SegmentCarry:
        if not has_pending:
            pending = sums[0]
        else:
            kept = 1.0 if cumulative is None else cumulative[..., -1]
            pending = combine((kept, carry.pending), (1.0, sums[0]))
        return SegmentCarry(pending, None if base is None else base[..., -1], None)

    return plan, finish


def plan_momentum(chunk: ChunkInputs, carry: SegmentCarry) -> tuple[SegmentPlan, Finish]:
    """The plan of the ``momentum`` rule (Titans): ``S_i = m_i S_{i-1} - lr_i grad_i``,
    ``W_i = a_i W_{i-1} + S_i``. With ``P_i = A_i W_b - W_i`` the state keeps the pending form
    ``W_i = A_i W_b - P_i``, ``P_i = a_i P_{i-1} - S_i``; solved over the segment:
    ``P_i = c_i P_prev - (D mc)_i S_prev + sum_j (D M)[i, j] lr_j grad_j`` with ``D``, ``c`` the
    decay's and ``M``, ``mc`` the momentum's :func:`running_products` (no momentum: ``M = I``)."""
    within, cumulative = _decay_products(chunk)
    base = _start_scale(carry, cumulative, chunk.lr)
    kept = torch.ones_like(chunk.lr) if cumulative is None else cumulative  # c [B, H, N]
    extras = [(kept, carry.pending)]
    if chunk.momentum is None:
        plan = SegmentPlan(base, tuple(extras), within, (within[..., -1, :],))
    else:
        momentum_within, momentum_cumulative = running_products(chunk.momentum)
        mixing = within @ momentum_within  # [B, H, N, N]
        from_momentum = (within @ momentum_cumulative[..., None])[..., 0]  # [B, H, N]
        if carry.momentum is not None:
            extras.append((-from_momentum, carry.momentum))
        plan = SegmentPlan(base, tuple(extras), mixing, (mixing[..., -1, :], momentum_within[..., -1, :]))

    def finish(sums: list[Params]) -> SegmentCarry:
        pending_terms = [(kept[..., -1], carry.pending), (1.0, sums[0])]
        new_momentum = None
        if chunk.momentum is not None:
            momentum_terms = [(-1.0, sums[1])]
            if carry.momentum is not None:
                pending_terms.append((-from_momentum[..., -1], carry.momentum))
                momentum_terms.append((momentum_cumulative[..., -1], carry.momentum))
            new_momentum = combine(*momentum_terms)
        return SegmentCarry(combine(*pending_terms), None if base is None else base[..., -1], new_momentum)

    return plan, finish


def close_planned(
    params: Params, carry: SegmentCarry, tau_last: torch.Tensor | float
) -> tuple[Params, SegmentCarry]:
    """Commit a finished mini-batch under a plan: ``W_b <- A W_b - tau_last P``; ``P <- 0``, ``A <- 1``."""
    base = params if carry.decay_product is None else scale_params(carry.decay_product, params)
    new_params = {k: base[k] - tau_last * carry.pending[k] for k in params}
    zeros = {k: torch.zeros_like(v) for k, v in carry.pending.items()}
    return new_params, SegmentCarry(zeros, None, carry.momentum)


#: Reads a segment under a plan: ``(task, params W_b, segment inputs, plan) -> (outputs [B, H, N, f],
#: one weights-shaped sum per ``plan.sums`` row)``; the dual form's for stack models, the primal's for any.
Reader = Callable[[InnerTask, Params, ChunkInputs, SegmentPlan], tuple[torch.Tensor, list[Params]]]


def run_planned(
    state: TTTState, task: InnerTask, chunk: ChunkInputs, tau: torch.Tensor | None, reader: Reader
) -> tuple[torch.Tensor, Params, SegmentCarry]:
    """Every segment of a chunk through ``reader``: the mini-batch rule with decay when ``tau`` is
    given (:func:`plan_dual`), the momentum rule when it is None (:func:`plan_momentum`).

    Returns ``(outputs [B, H, T, f], params, carry)``: the state's parts after the chunk."""
    params = state.params
    carry = SegmentCarry(state.pending, state.decay_product(), dict(state.momentum) or None)
    outputs = []
    for seg in split_segments(state.position, chunk.query.shape[2], task.mini_batch_size):
        part = chunk.segment(seg)
        if tau is None:
            plan, finish = plan_momentum(part, carry)
            tau_last: torch.Tensor | float = 1.0
        else:
            seg_tau = tau[seg.offset : seg.offset + seg.length]
            plan, finish = plan_dual(part, seg_tau, carry, has_pending=seg.offset > 0)
            tau_last = seg_tau[-1]
        out, sums = reader(task, params, part, plan)
        outputs.append(out)
        carry = finish(sums)
        if seg.closes_mini_batch:
            params, carry = close_planned(params, carry, tau_last)
    return torch.cat(outputs, dim=2), params, carry


def _check_rule_takes(
    rule: UpdateRule,
    state: TTTState,
    tau: torch.Tensor | None,
    decay: torch.Tensor | None,
    momentum: torch.Tensor | None,
) -> None:
    """Raise, naming the argument, when ``rule`` cannot take what it is given."""
    if (decay is not None or state.decay) and not rule.supports_decay:
        what = "decay (or decay_log) is given" if decay is not None else "the state carries a decay product"
        raise ValueError(
            f"decay: {what} but update_rule={rule.name!r} does not support decay (forgetting); "
            "rules that do set supports_decay: the built-in 'dual_form', 'minibatch_gd' and 'momentum', "
            "and a plugin's that does (`innerloop plugins` lists the registered rules)"
        )
    if (momentum is not None or state.momentum) and not rule.supports_momentum:
        what = "momentum is given" if momentum is not None else "the state carries momentum"
        raise ValueError(
            f"momentum: {what} but update_rule={rule.name!r} does not take momentum; use update_rule='momentum' "
            "or another rule that sets supports_momentum (`innerloop plugins` lists the registered rules)"
        )
    if tau is not None and not rule.uses_token_scale:
        raise ValueError(
            f"token_scale must be None for update_rule={rule.name!r} (it has no token-index scale: every "
            "token steps with its own lr), got a tensor"
        )
    if tau is None and rule.uses_token_scale:
        raise ValueError(
            f"token_scale: update_rule={rule.name!r} needs the token-index scale tau [K], got None"
        )


def _gate_for(
    rule: UpdateRule, decay: torch.Tensor | None, decay_log: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(decay, decay_log)`` as ``rule`` takes them: ``decay_log`` as given to a rule whose ``forward``
    names it, else turned into ``decay = -expm1(decay_log)``; both given is refused."""
    if decay_log is None:
        return decay, None
    if decay is not None:
        raise ValueError("give the gate as decay (1 - a) or as decay_log (log a), not both")
    return (None, decay_log) if takes_decay_log(rule) else (decay_from_log(decay_log), None)


def takes_decay_log(rule: UpdateRule) -> bool:
    """Whether ``rule.forward`` names a ``decay_log`` parameter (then :func:`run_scan` gives it a gate
    that came as a log as ``decay_log``, not ``decay``). Read once per forward function (a scan runs per
    call and, decoding, per token); a forward set on the instance itself is read each time."""
    if "forward" in vars(rule):
        return _reads_decay_log(rule.forward)
    return _function_takes_decay_log(type(rule).forward)


@functools.lru_cache(maxsize=256)
def _function_takes_decay_log(forward: Callable) -> bool:
    return _reads_decay_log(forward)


def _reads_decay_log(forward: Callable) -> bool:
    try:
        return "decay_log" in inspect.signature(forward).parameters
    except (TypeError, ValueError):  # unreadable: the plain keyword every rule that forgets takes
        return False


def add_note(error: BaseException, note: str) -> None:
    """``error.add_note(note)`` (the note is shown under the message, the exception keeps its type); on
    Python 3.10, which has no notes, the note is appended to a str message instead."""
    if hasattr(error, "add_note"):
        error.add_note(note)
    elif error.args and isinstance(error.args[0], str):
        error.args = (f"{error.args[0]}\n{note}", *error.args[1:])


def run_scan(
    rule: UpdateRule,
    state: TTTState,
    task: InnerTask,
    views: Views,
    lr: torch.Tensor,
    tau: torch.Tensor | None,
    decay: torch.Tensor | None = None,
    momentum: torch.Tensor | None = None,
    *,
    decay_log: torch.Tensor | None = None,
) -> tuple[torch.Tensor, TTTState]:
    """The one path of ``TTTLayer`` and ``innerloop.ops.scan``: the update rule over a chunk.

    Per batch and head, token ``t`` of the mini-batch starting at ``b`` (``i = t - b``) takes its
    gradient ``grad_t`` at the weights ``W_b`` the mini-batch started with, and with ``a_t = 1 - decay_t``:

    - mini-batch rules (``dual_form``, ``minibatch_gd``): ``W_t = (prod_{s=b..t} a_s) W_b -
      tau_i * sum_{s=b..t} (prod_{r=s+1..t} a_r) lr_s grad_s``;
    - ``momentum``: ``S_t = m_t S_{t-1} - lr_t grad_t``, ``W_t = a_t W_{t-1} + S_t`` (``S`` runs across
      mini-batches, ``tau`` is None).

    Token ``t`` outputs ``f(XQ_t; W_t)``. ``decay`` and ``momentum`` (``[B, H, T]``) are passed to the
    rule only when given; a rule that does not take them is refused, naming the argument.

    ``decay_log`` ``[B, H, T]`` gives the gate as ``log a_t`` instead of ``decay`` (not both): a rule whose
    ``forward`` has a ``decay_log`` parameter (the built-in ones) takes its decay products in log space
    from it (:func:`log_running_products`), exact for small ``a_t``, which ``1 - decay`` holds only to
    ``eps / a_t`` relative; any other rule gets ``decay = -expm1(decay_log)``.
    """
    decay, decay_log = _gate_for(rule, decay, decay_log)
    _check_rule_takes(rule, state, tau, decay if decay_log is None else decay_log, momentum)
    if state.offset == 0 and state.pending:
        # At a mini-batch boundary the pending sums are zero by definition (TTTState): every path reads
        # them so, whatever a hand-made state holds (a whole call would ignore them, a decoded token add them).
        state = replace(state, pending={k: torch.zeros_like(v) for k, v in state.pending.items()})
    options = {}
    if decay is not None:
        options["decay"] = decay
    if momentum is not None:
        options["momentum"] = momentum
    if decay_log is not None:
        options["decay_log"] = decay_log
    try:
        result = rule.forward(state, task, views, lr, tau, **options)
    except Exception as error:  # a plugin's own failure: name it (the type stays, for callers that catch it)
        note_plugin_failure(error, {"inner model": task.model, "inner loss": task.loss, "update rule": rule})
        if is_allocation_failure(error):  # the allocator's words name no argument: say which one to lower
            message = _out_of_memory_message(error, task, views)
            if type(error) in _ALLOCATION_FAILURES:  # torch's and Python's own: reworded, the same type
                raise type(error)(message) from error
            add_note(error, message)  # a subclass (a plugin's own) may need other arguments: kept, noted
        raise
    return check_rule_returns(rule, result, state, views)  # a plugin wrong only at this call's shape


def autocast_on(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)``, False for meta tensors (which autocast does not know)."""
    return device_type != "meta" and torch.is_autocast_enabled(device_type)


@run_eagerly("innerloop: the scan's autograd nodes are read and hooked")
def run_scan_without_autocast(
    device_type: str, scan: Callable[..., tuple[torch.Tensor, TTTState]], *args: Any, **kwargs: Any
) -> tuple[torch.Tensor, TTTState]:
    """``scan(*args, **kwargs)`` (a :func:`run_scan` call) with autocast off on ``device_type``, its forward and its
    backward: the scan's state, inner LayerNorm statistics and gradient sums stay in their float32 (at
    least) dtype, also when ``loss.backward()`` is called inside the ``torch.autocast`` region, which
    applies autocast to the backward's ops (PyTorch advises against it; users and some trainers do it).

    The nodes that end the scan's graph (its outputs' and state's) get hooks (:class:`_ScanGuard`). A
    backward outside autocast (the usual one) finds autocast off there and does nothing more. A backward
    inside it turns autocast off for every node the scan recorded (whatever path: the torch ops of a rule,
    a kernel's ``autograd.Function``), which the autograd engine restores after each node: the projections
    and the rest of the model keep their bfloat16 backward. A backward with ``create_graph=True`` guards
    the nodes each scan node records in turn, so a gradient of a gradient (a penalty, a meta-learned
    loss) taken inside autocast also runs the scan's part in float32. Outside autocast this is the plain call."""
    if not autocast_on(device_type):
        return scan(*args, **kwargs)
    recording = torch.is_grad_enabled()
    last_before = _last_sequence_number() if recording else 0
    with torch.autocast(device_type, enabled=False):
        outputs, state = scan(*args, **kwargs)
    roots = [outputs, *state.tensors().values()]
    if recording and not transformed_or_dual(roots):  # torch.func's wrapped tensors: its own graph
        inputs = _input_nodes((scan, args, kwargs))
        guard = _ScanGuard(device_type, last_before, inputs)
        for node in {t.grad_fn for t in roots if t.grad_fn is not None and id(t.grad_fn) not in inputs}:
            node.metadata[_GUARDED] = _WITH_SECOND_ORDER
            node.register_prehook(guard.at_root)
            node.register_hook(guard.after_node)
    return outputs, state


_SEQUENCE_PROBE = torch.zeros((), requires_grad=True)
"""A leaf whose view's node reads the autograd sequence counter (never written, never differentiated)."""
_ACCUMULATE_GRAD_SEQUENCE = 2**64 - 1  # a leaf's AccumulateGrad node: no computation to guard
_GUARDED = "innerloop: backward without autocast"  # the key of a guarded node's level in its metadata
_FIRST_ORDER, _WITH_SECOND_ORDER = 1, 2  # the levels: its pre-hook; its pre-hook and post-hook
_BEFORE = "innerloop: sequence number before the node ran"  # its metadata in a backward that records


def _last_sequence_number() -> int:
    """The sequence number of a node recorded now: every node recorded later on this thread has a larger
    one (torch counts per thread: a node recorded on another thread may have any number)."""
    with torch.enable_grad():
        return _SEQUENCE_PROBE.view_as(_SEQUENCE_PROBE).grad_fn._sequence_nr()


def _input_nodes(value: object, found: dict[int, Any] | None = None) -> dict[int, Any]:
    """The autograd nodes of every tensor in ``value`` (nested tuples, lists, dicts, dataclasses, modules'
    parameters and buffers, a bound method's object), by ``id`` (the dict holds them: the ids stay theirs)."""
    found = {} if found is None else found
    if isinstance(value, torch.Tensor):
        if value.grad_fn is not None:
            found[id(value.grad_fn)] = value.grad_fn
    elif isinstance(value, torch.nn.Module):
        for tensor in [*value.parameters(), *value.buffers()]:
            _input_nodes(tensor, found)
    elif isinstance(value, (tuple, list)):
        for item in value:
            _input_nodes(item, found)
    elif isinstance(value, dict):
        _input_nodes(list(value.values()), found)
    elif is_dataclass(value) and not isinstance(value, type):
        _input_nodes([getattr(value, f.name) for f in fields(value)], found)
    elif inspect.ismethod(value):
        _input_nodes(value.__self__, found)
    return found


class _ScanGuard:
    """The hooks of one scan's nodes. The nodes it guards: those the scan recorded, found by walking down
    from the nodes that end its graph and stopping at its inputs' nodes (by identity, whatever thread
    recorded them), at nodes recorded before it on its thread (a tensor the scan reads that is no
    argument: a plugin's own) and at leaves; in a backward that records (``create_graph=True``), the nodes
    each guarded node records, found the same way from its results. A guarded node's pre-hook turns
    autocast off for that node (the engine restores it after each node). The hooks hold no node of the
    scan (none of them holds the guard): no reference cycle."""

    __slots__ = ("device_type", "last_before", "inputs")

    def __init__(self, device_type: str, last_before: int, inputs: dict[int, Any]) -> None:
        self.device_type, self.last_before, self.inputs = device_type, last_before, inputs

    def at_root(self, grad_outputs: tuple) -> None:
        """The pre-hook of a node that ends the scan: in a backward under autocast, or one that records,
        guards the scan's nodes below it (once: the level in each node's metadata says so)."""
        recording = torch.is_grad_enabled()
        if not (recording or torch.is_autocast_enabled(self.device_type)):
            return
        self.before_node(grad_outputs)
        root = torch._C._current_autograd_node()
        if root is not None:
            level = _WITH_SECOND_ORDER if recording else _FIRST_ORDER
            self._guard([child for child, _ in root.next_functions], self.last_before, level)

    def before_node(self, grad_outputs: tuple) -> None:
        """A guarded node's pre-hook: autocast off for this node; in a backward that records, the sequence
        number before it runs (for :meth:`after_node`)."""
        torch.set_autocast_enabled(
            self.device_type, False
        )  # for this node only: the engine restores it after
        if torch.is_grad_enabled():
            node = torch._C._current_autograd_node()
            if node is not None:
                node.metadata[_BEFORE] = _last_sequence_number()

    def after_node(self, grad_inputs: tuple, grad_outputs: tuple) -> None:
        """A guarded node's post-hook: in a backward that records, guards the nodes this node recorded."""
        node = torch._C._current_autograd_node() if torch.is_grad_enabled() else None
        before = None if node is None else node.metadata.pop(_BEFORE, None)
        if before is not None:
            starts = [t.grad_fn for t in grad_inputs if t is not None]
            self._guard(starts, before, _WITH_SECOND_ORDER)

    def _guard(self, starts: list, before: int, level: int) -> None:
        pending = starts
        while pending:
            node = pending.pop()
            if node is None:
                continue
            guarded = node.metadata.get(_GUARDED, 0)
            if guarded >= level:
                continue
            if not guarded:
                number = node._sequence_nr()
                if number <= before or number == _ACCUMULATE_GRAD_SEQUENCE or id(node) in self.inputs:
                    continue
                node.register_prehook(self.before_node)
            if level == _WITH_SECOND_ORDER:
                node.register_hook(self.after_node)
            node.metadata[_GUARDED] = level
            pending.extend(child for child, _ in node.next_functions)


_ALLOCATION_FAILURES = (RuntimeError, MemoryError, torch.OutOfMemoryError)
"""The allocation failures the scan rewords as a new exception of the same type (their constructors take
a message); a subclass of one keeps its object (its own ``__init__`` and fields) and gets a note."""


def is_allocation_failure(error: BaseException) -> bool:
    """Whether ``error`` is torch's (or Python's) failure to allocate memory: a CPU allocator's
    ``RuntimeError`` ("can't allocate memory"), ``torch.OutOfMemoryError`` (CUDA) or ``MemoryError``."""
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(error).lower()
    return type(error) is RuntimeError and ("can't allocate memory" in text or "not enough memory" in text)


def _out_of_memory_message(error: BaseException, task: InnerTask, views: Views) -> str:
    """The scan's allocation failure in words: the call's shape, ``mini_batch_size`` and the size of
    one ``[B, H, K, K]`` matrix of a mini-batch, and what to lower; the allocator's own message last."""
    batch, heads, tokens, head_dim = views.query.shape
    block = min(task.mini_batch_size, tokens)
    matrix = batch * heads * block * block * views.query.element_size()
    # the allocator's whole message, on one line: callers that recognise an out-of-memory error by its
    # words (Lightning's batch-size finder looks for "CUDA" and "out of memory") still do
    allocator = " ".join(str(error).split()) or type(error).__name__
    return (
        f"the inner scan ran out of memory on [B, H, T, f] = {(batch, heads, tokens, head_dim)} with "
        f"mini_batch_size={task.mini_batch_size}: a mini-batch of {block} tokens needs [B, H, {block}, {block}] "
        f"matrices of {matrix / 2**30:.3g} GiB each ({views.query.dtype}); pass a smaller mini_batch_size "
        f"(the paper's is 16) or fewer sequences or tokens per call ({allocator})"
    )


class RuleOutputError(AssertionError):
    """An update rule's ``forward`` returned the wrong type or layout (not ``(outputs [B, H, T, f],
    TTTState)``): said by name, before any comparison of values."""


def _shape_or_type(value: object) -> str:
    """``value`` in words: a tensor's shape, else its type."""
    if isinstance(value, torch.Tensor):
        return f"a Tensor of shape {tuple(value.shape)}"
    return "None" if value is None else a_type(value)


def check_rule_returns(
    rule: UpdateRule, result: object, state: TTTState, views: Views
) -> tuple[torch.Tensor, TTTState]:
    """``result`` (what ``rule.forward`` returned for ``state`` and ``views``) is ``(outputs, state)``:
    outputs of the query's shape ``[B, H, T, f]``, dtype and device, and a :class:`TTTState` whose weights
    have the shapes, dtypes and devices of the input state's (its pending sums, momentum and decay
    products the weights' dtype and device); returned as that pair, else
    :class:`RuleOutputError` naming what came back (a state in another dtype would reach the caller, whose
    next call is refused as if the caller had cast it; bfloat16 outputs would be rounded silently)."""
    name = getattr(rule, "name", type(rule).__name__)
    expected = tuple(views.query.shape)
    if not isinstance(result, tuple | list) or len(result) != 2:
        got = f"{a_type(result)} of length {len(result)}" if isinstance(result, tuple | list) else None
        raise RuleOutputError(
            f"update rule {name!r}: forward must return (outputs [B, H, T, f], TTTState); got "
            f"{got or _shape_or_type(result)}"
        )
    out, new_state = result
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        raise RuleOutputError(
            f"update rule {name!r}: forward must return outputs of the query's shape [B, H, T, f] = "
            f"{expected}; got {_shape_or_type(out)}"
        )
    _check_same_dtype(name, "outputs", out, views.query, "the query's ")
    if not isinstance(new_state, TTTState):
        raise RuleOutputError(
            f"update rule {name!r}: forward must return (outputs, TTTState); got {_shape_or_type(new_state)} "
            "as the state"
        )
    for key, value in state.params.items():
        got = new_state.params.get(key)
        if not isinstance(got, torch.Tensor) or got.shape != value.shape:
            raise RuleOutputError(
                f"update rule {name!r}: the state forward returns must hold weights of the input state's "
                f"shapes; got params[{key!r}]: {'missing' if got is None else _shape_or_type(got)}, expected "
                f"a Tensor of shape {tuple(value.shape)}"
            )
        _check_same_dtype(name, f"the state's params[{key!r}]", got, value, "")
    weights = next(iter(state.params.values()), None)  # the scan's dtype and device
    for group in ("pending", "momentum", "decay") if weights is not None else ():
        for key, value in getattr(new_state, group).items():
            _check_same_dtype(name, f"the state's {group}[{key!r}]", value, weights, "the weights' ")
    moved = state.position + expected[2]
    if new_state.position != moved:
        raise RuleOutputError(
            f"update rule {name!r}: the state forward returns must be at position {moved} (the input state's "
            f"{state.position} + the call's {expected[2]} tokens); got {new_state.position}"
        )
    return out, _in_the_given_order(state, new_state)


def _in_the_given_order(state: TTTState, new_state: TTTState) -> TTTState:
    """``new_state`` with its weights, pending sums and momentum keyed in the order of ``state``'s weights
    (a kernel builds them in its stack's order: TTT-MLP's W1, b1, W2, b2 against the layer's W1, W2, b1,
    b2), so that ``state.params.values()`` means the same whatever path wrote the state; keys ``state``
    does not hold keep their place after them (the layer's state check names them)."""
    order = list(state.params)
    groups = {g: getattr(new_state, g) for g in ("params", "pending", "momentum")}
    if all(list(group) == [k for k in order if k in group] for group in groups.values()):
        return new_state  # already in order (every path but a stack kernel's)
    ordered = {
        g: {
            **{k: group[k] for k in order if k in group},
            **{k: v for k, v in group.items() if k not in order},
        }
        for g, group in groups.items()
    }
    return replace(new_state, **ordered)


def _check_same_dtype(name: str, what: str, got: torch.Tensor, like: torch.Tensor, whose: str) -> None:
    """:class:`RuleOutputError` unless ``got`` (``what`` the rule ``name`` returned) has ``like``'s dtype
    and device (``whose``: how the message names ``like``, e.g. "the query's ")."""
    if got.dtype != like.dtype or got.device != like.device:
        raise RuleOutputError(
            f"update rule {name!r}: forward returned {what} in {got.dtype} on {got.device}, expected "
            f"{whose}{like.dtype} on {like.device} (a rule computes in the dtype and on the device it is given)"
        )


class CheckModelAnswerError(TypeError):
    """An update rule's ``check_model`` answered something other than None or a str (a bool, say)."""


def model_refusal(rule: UpdateRule, model: InnerModel) -> str | None:
    """``rule.check_model(model)``: None (the rule runs the model) or why it cannot (a str). Any other
    answer (``return model.stack is not None``, a bool) is a :class:`CheckModelAnswerError` naming the rule:
    taken as a refusal it would refuse every model, True and False alike, and skip the rule's conformance
    check at registration. An error the method raises carries a note naming the plugin."""
    try:
        reason = rule.check_model(model)
    except Exception as error:
        note_plugin_failure(error, {"update rule": rule})
        raise
    if reason is None or isinstance(reason, str):
        return reason
    raise CheckModelAnswerError(
        f"update rule {getattr(rule, 'name', type(rule).__name__)!r}: check_model must return None (the rule "
        f"runs the model) or a str (why it cannot); got {type(reason).__name__} {reason!r} for inner model "
        f"{getattr(model, 'name', '?')!r}"
    )


def note_plugin_failure(error: BaseException, plugins: dict[str, object]) -> None:
    """Add a note to ``error`` naming the plugin (of ``plugins``, by kind) whose method raised it: the
    deepest frame of its traceback that runs a method of one that is not built in (a plugin's rule that
    called a built-in model wrongly is named, not the model), and the plugin that called it where another
    one did (a rule passing a model's ``predict`` its arguments swapped: either may be at fault). Errors
    raised in built-in plugins alone, and errors already noted, are left as they are."""
    if any(_PLUGIN_NOTE in note for note in getattr(error, "__notes__", ())):
        return
    own = []  # (kind, plugin, method) of the frames in third-party plugins, outermost first
    frame = error.__traceback__
    while frame is not None:
        owner = frame.tb_frame.f_locals.get("self")
        for kind, plugin in plugins.items():
            if owner is plugin and type(plugin).__module__.split(".")[0] != "innerloop":
                own.append((kind, plugin, frame.tb_frame.f_code.co_name))
        frame = frame.tb_next
    if not own:
        return
    kind, plugin, method = own[-1]
    callers = [found for found in own[:-1] if found[1] is not plugin]
    called_by = ""
    if callers:
        caller_kind, caller, caller_method = callers[-1]
        called_by = (
            f", called by the {caller_kind} {getattr(caller, 'name', '?')!r} ({_where(caller, caller_method)}), "
            "which may have called it wrongly"
        )
    add_note(
        error,
        f"{_PLUGIN_NOTE} {kind} {getattr(plugin, 'name', '?')!r} ({_where(plugin, method)}){called_by}: the "
        "error is the plugin's own; innerloop.testing's check_inner_model / check_inner_loss / check_update_rule "
        "run it at other shapes",
    )


def _where(plugin: object, method: str) -> str:
    """``module.Class.method`` of a plugin's method, for a note."""
    cls = type(plugin)
    return f"{cls.__module__}.{cls.__qualname__}.{method}"


_PLUGIN_NOTE = "raised in the plugin"


__all__ = [
    "CheckModelAnswerError",
    "ChunkInputs",
    "RuleOutputError",
    "check_rule_returns",
    "add_note",
    "model_refusal",
    "note_plugin_failure",
    "Reader",
    "run_planned",
    "run_scan",
    "run_scan_without_autocast",
    "Segment",
    "SegmentCarry",
    "SegmentPlan",
    "advance_state",
    "checked_pairs",
    "close_mini_batch",
    "close_planned",
    "combine",
    "plan_dual",
    "plan_momentum",
    "prepare_chunk",
    "log_running_products",
    "takes_decay_log",
    "running_products",
    "scale_params",
    "split_segments",
]
