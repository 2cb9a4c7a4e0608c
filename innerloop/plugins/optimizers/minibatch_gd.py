"""``minibatch_gd``: mini-batch gradient descent in the primal form, for any model and loss.

For every token ``j`` of a mini-batch, the gradient of its inner loss is taken with ``torch.func``
at the mini-batch's starting weights ``W_b``; token ``i`` then reads its output with
``W_i = W_b - tau_i * (pending + sum_{j <= i} lr_j * grad_j)``. This materialises one copy of the
weights per token, which is what makes it generic (and slow): it is the reference the dual form
and the kernels are tested against, and the decode path (one token at a time).
"""

from __future__ import annotations

import torch
from torch.func import grad, vmap

from innerloop.core.protocol import InnerTask, Params, UpdateRule, Views, residual_and_norm
from innerloop.core.scan import ChunkInputs, advance_state, close_mini_batch, prepare_chunk, split_segments
from innerloop.core.state import TTTState
from innerloop.registry import hookimpl


def _flatten_heads(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(0, 1)  # [B, H, ...] -> [B*H, ...]


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
    model, loss = task.model, task.loss
    flat_params = {k: _flatten_heads(v) for k, v in params.items()}  # [BH, *shape]
    if task.use_norm:
        norm_weight = task.norm_weight.expand(batch, -1, -1).flatten(0, 1)  # [BH, f]
        norm_bias = task.norm_bias.expand(batch, -1, -1).flatten(0, 1)
    else:
        norm_weight = norm_bias = chunk.query.new_zeros(batch * heads, 0)

    def predict_one(p: Params, x: torch.Tensor, nw: torch.Tensor, nb: torch.Tensor) -> torch.Tensor:
        # One head, one token: x [f] -> [f]; the model sees [heads = 1, N = 1, f].
        z = model.forward({k: v[None] for k, v in p.items()}, x[None, None])[0, 0]  # [f]
        weight, bias = (nw, nb) if task.use_norm else (None, None)
        return residual_and_norm(x, z, weight, bias, task.norm_eps, task.residual)

    def token_loss(p: Params, x, y, nw, nb) -> torch.Tensor:
        return loss.token_loss(predict_one(p, x, nw, nb), y)

    # Per-token gradients at W_b: [BH, N, *shape].
    per_token_grad = vmap(vmap(grad(token_loss), in_dims=(None, 0, 0, None, None)))
    grads = per_token_grad(
        flat_params,
        _flatten_heads(chunk.inputs),
        _flatten_heads(chunk.targets),
        norm_weight,
        norm_bias,
    )
    lr = _flatten_heads(chunk.lr)  # [BH, N]
    weights_per_token = {}
    new_pending = {}
    for key, g in grads.items():
        extra = (1,) * (g.dim() - 2)
        running = torch.cumsum(lr.reshape(lr.shape + extra) * g, dim=1)  # [BH, N, *shape]
        running = running + _flatten_heads(pending[key])[:, None]
        new_pending[key] = running[:, -1].unflatten(0, (batch, heads))
        weights_per_token[key] = flat_params[key][:, None] - tau.reshape((1, num_tokens) + extra) * running

    read = vmap(vmap(predict_one, in_dims=(0, 0, None, None)))
    outputs = read(weights_per_token, _flatten_heads(chunk.query), norm_weight, norm_bias)
    return outputs.unflatten(0, (batch, heads)), new_pending


class MiniBatchGD(UpdateRule):
    """Primal-form mini-batch TTT: generic over every inner model and loss (see module docstring)."""

    name = "minibatch_gd"

    def forward(
        self, state: TTTState, task: InnerTask, views: Views, lr: torch.Tensor, tau: torch.Tensor
    ) -> tuple[torch.Tensor, TTTState]:
        chunk, loss_carry = prepare_chunk(state, task, views, lr)
        params, pending = state.params, state.pending
        outputs = []
        for seg in split_segments(state.position, views.query.shape[2], task.mini_batch_size):
            seg_tau = tau[seg.offset : seg.offset + seg.length]
            out, pending = primal_segment(task, params, pending, chunk.segment(seg), seg_tau)
            outputs.append(out)
            if seg.closes_mini_batch:
                params, pending = close_mini_batch(params, pending, seg_tau[-1])
        return torch.cat(outputs, dim=2), advance_state(
            state, params, pending, views.query.shape[2], loss_carry
        )


@hookimpl
def register_update_rules(register) -> None:
    register(MiniBatchGD())
