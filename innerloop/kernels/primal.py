"""The primal form: one copy of the inner weights per token, for any inner model and loss.

For every token ``j`` of a mini-batch, the gradient of its inner loss is taken with ``torch.func`` at
the mini-batch's starting weights ``W_b``; token ``i`` then reads its output with weights that follow
from ``W_b``, the pending sums and those gradients. :func:`primal_segment` is one segment inside a
mini-batch (``W_i = W_b - tau_i * (pending + sum_{j <= i} lr_j * grad_j)``), and
:func:`primal_planned_segment` one under a :class:`~innerloop.core.scan.SegmentPlan` (decay,
momentum), the :data:`~innerloop.core.scan.Reader` of every built-in rule for a model without a
declared stack. Materialising the weights per token is what makes it generic (and slow): it is the
reference the dual form (``reference.py``, the same contracts for stack models) and the kernels are
tested against. The ``minibatch_gd`` and ``momentum`` update rules, and a plugin's own, read it from here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.func import grad, vmap

from innerloop.core.functional import saved_tensors_hooks_suspended
from innerloop.core.protocol import InnerTask, Params, residual_and_norm
from innerloop.core.scan import ChunkInputs, SegmentPlan


def _flatten_heads(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(0, 1)  # [B, H, ...] -> [B*H, ...]


@dataclass(frozen=True)
class _PrimalParts:
    """What every primal segment needs: the per-token gradients at ``W_b`` and a per-token reader."""

    grads: Params  # [BH, N, *shape]
    read: Callable[[Params], torch.Tensor]  # weights per token [BH, N, *shape] -> outputs [B, H, N, f]


def _primal_parts(task: InnerTask, params: Params, chunk: ChunkInputs) -> _PrimalParts:
    """Per-token gradients of the inner loss at ``params`` (``torch.func``) and the output reader."""
    batch, heads, _, _ = chunk.query.shape
    if batch == 0:
        return _parts_of_no_sequence(task, params, chunk)
    model, loss = task.model, task.loss
    flat_params = {k: _flatten_heads(v) for k, v in params.items()}  # [BH, *shape]
    if task.use_norm:
        norm_weight = task.norm_weight.expand(batch, -1, -1).flatten(0, 1)  # [BH, f]
        norm_bias = task.norm_bias.expand(batch, -1, -1).flatten(0, 1)
    else:
        norm_weight = norm_bias = chunk.query.new_zeros(batch * heads, 0)

    def predict_one(p: Params, x: torch.Tensor, nw: torch.Tensor, nb: torch.Tensor) -> torch.Tensor:
        # One head, one token: x [f] -> [f]; the model sees [heads = 1, N = 1, f].
        z = model.forward_unchecked({k: v[None] for k, v in p.items()}, x[None, None])[0, 0]  # [f]
        weight, bias = (nw, nb) if task.use_norm else (None, None)
        return residual_and_norm(x, z, weight, bias, task.norm_eps, task.residual)

    def token_loss(
        p: Params, x: torch.Tensor, y: torch.Tensor, nw: torch.Tensor, nb: torch.Tensor
    ) -> torch.Tensor:
        return loss.token_loss(predict_one(p, x, nw, nb), y)

    # Per-token gradients at W_b: [BH, N, *shape].
    per_token_grad = vmap(vmap(grad(token_loss), in_dims=(None, 0, 0, None, None)))
    with saved_tensors_hooks_suspended():  # torch.func.grad refuses an activation checkpoint's hooks
        grads = per_token_grad(
            flat_params, _flatten_heads(chunk.inputs), _flatten_heads(chunk.targets), norm_weight, norm_bias
        )

    def read(weights_per_token: Params) -> torch.Tensor:
        per_token = vmap(vmap(predict_one, in_dims=(0, 0, None, None)))
        outputs = per_token(weights_per_token, _flatten_heads(chunk.query), norm_weight, norm_bias)
        return outputs.unflatten(0, (batch, heads))

    return _PrimalParts(grads, read)


def _parts_of_no_sequence(task: InnerTask, params: Params, chunk: ChunkInputs) -> _PrimalParts:
    """The parts of a batch of no sequences, computed on one sequence of zeros of which no row is kept:
    ``torch.func``'s transforms over an empty batch reach torch's reductions (``var`` in the inner
    LayerNorm), which warn that they have no degrees of freedom."""

    def one_sequence(t: torch.Tensor) -> torch.Tensor:
        return t.new_zeros((1, *t.shape[1:]))  # [0, H, ...] -> [1, H, ...]

    one = _primal_parts(
        task,
        {key: one_sequence(value) for key, value in params.items()},
        ChunkInputs(*(one_sequence(t) for t in (chunk.query, chunk.inputs, chunk.targets, chunk.lr))),
    )

    def read(weights_per_token: Params) -> torch.Tensor:  # [0, N, *shape] -> [0, H, N, f]
        heads = chunk.query.shape[1]
        padded = {key: w.new_zeros((heads, *w.shape[1:])) for key, w in weights_per_token.items()}
        return one.read(padded)[:0]

    return _PrimalParts({key: g[:0] for key, g in one.grads.items()}, read)


def primal_segment(
    task: InnerTask,
    params: Params,
    pending: Params,
    chunk: ChunkInputs,
    tau: torch.Tensor,
) -> tuple[torch.Tensor, Params]:
    """One segment inside a mini-batch, primal form.

    Args:
        params, pending: ``[B, H, *shape]`` weights at the mini-batch start, pending gradient sums.
        chunk: the segment's inputs, ``[B, H, N, f]`` and lr ``[B, H, N]``.
        tau: ``[N]`` the token-index scale of each token of the segment.

    Returns:
        ``(outputs [B, H, N, f], pending after the segment)``.
    """
    batch, heads, num_tokens, _ = chunk.query.shape
    parts = _primal_parts(task, params, chunk)
    lr = _flatten_heads(chunk.lr)  # [BH, N]
    weights_per_token = {}
    new_pending = {}
    for key, g in parts.grads.items():
        extra = (1,) * (g.dim() - 2)
        running = torch.cumsum(lr.reshape(lr.shape + extra) * g, dim=1)  # [BH, N, *shape]
        running = running + _flatten_heads(pending[key])[:, None]
        # a copy of its own: a view of running[:, -1] would keep every token's sums [BH, N, *shape] alive
        # with the state (N - 1 times the pending sums' size, for as long as the caller keeps the state)
        new_pending[key] = running[:, -1].unflatten(0, (batch, heads)).clone()
        weights_per_token[key] = (
            _flatten_heads(params[key])[:, None] - tau.reshape((1, num_tokens) + extra) * running
        )
    return parts.read(weights_per_token), new_pending


def primal_planned_segment(
    task: InnerTask, params: Params, chunk: ChunkInputs, plan: SegmentPlan
) -> tuple[torch.Tensor, list[Params]]:
    """One segment under a :class:`~innerloop.core.scan.SegmentPlan` (decay, momentum), primal form:
    the weights of every token, ``W_i = base_i W_b - sum_k c_k,i E_k - sum_j mixing[i, j] lr_j grad_j``,
    materialised; any inner model. A :data:`~innerloop.core.scan.Reader`."""
    batch, heads = chunk.query.shape[:2]
    parts = _primal_parts(task, params, chunk)
    eta = _flatten_heads(plan.mixing * chunk.lr[..., None, :])  # [BH, N, N]
    rows = [_flatten_heads(row * chunk.lr) for row in plan.sums]  # [BH, N] each
    base = None if plan.base is None else _flatten_heads(plan.base)  # [BH, N]
    weights_per_token: Params = {}
    sums: list[Params] = [{} for _ in plan.sums]
    for key, g in parts.grads.items():
        extra = (1,) * (g.dim() - 2)
        # [BH, N, numel]: numel 1 for a per-head scalar weight; not -1, which an empty batch cannot infer
        flat_g = g.reshape(*g.shape[:2], math.prod(g.shape[2:]))
        start = _flatten_heads(params[key])[:, None]  # [BH, 1, *shape]
        weights = start if base is None else base.reshape(base.shape + extra) * start
        for coefficient, state in plan.extras:
            scale = _flatten_heads(coefficient)  # [BH, N]
            weights = weights - scale.reshape(scale.shape + extra) * _flatten_heads(state[key])[:, None]
        weights_per_token[key] = weights - (eta @ flat_g).reshape(g.shape)
        for row, total in zip(rows, sums, strict=True):
            total[key] = (
                (row[:, None] @ flat_g).reshape(g.shape[:1] + g.shape[2:]).unflatten(0, (batch, heads))
            )
    return parts.read(weights_per_token), sums


__all__ = ["primal_planned_segment", "primal_segment"]
