"""The slowest, plainest statement of mini-batch TTT: a loop over tokens with ``torch.autograd``.

Independent of the update rules' code (no ``torch.func``, no dual trick, no segments), so that
every rule can be checked against it. Use float64 and tiny shapes.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from innerloop.core.protocol import InnerTask, Views
from innerloop.core.state import TTTState


def _token_grads(task: InnerTask, params: dict, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Gradient of one token's inner loss w.r.t. each weight, kept in the graph when the outer loop needs it."""
    outer = torch.is_grad_enabled() and (x.requires_grad or any(v.requires_grad for v in params.values()))
    leaves = {k: v if v.requires_grad else v.detach().requires_grad_(True) for k, v in params.items()}
    with torch.enable_grad():
        token_loss = task.loss.token_loss(task.predict(leaves, x), y).sum()
        return list(torch.autograd.grad(token_loss, list(leaves.values()), create_graph=outer))


def naive_token_loop(
    state: TTTState, task: InnerTask, views: Views, lr: torch.Tensor, tau: torch.Tensor
) -> tuple[torch.Tensor, TTTState]:
    """Same contract as ``UpdateRule.forward``: read every token in order, one at a time.

    Token t at mini-batch offset i: ``grad_t`` = autograd gradient of its inner loss at the
    mini-batch's starting weights; ``pending += lr_t * grad_t``; it reads its output with
    ``W_b - tau_i * pending``; at the end of a mini-batch those weights become ``W_b``.
    """
    pairs = task.loss.pairs(views, state.loss_carry)
    if pairs.valid is not None:
        lr = lr * pairs.valid.to(lr.dtype)
    params = dict(state.params)
    pending = dict(state.pending)
    outputs = []
    for t in range(views.query.shape[2]):
        offset = (state.position + t) % task.mini_batch_size
        x_t, y_t = pairs.inputs[:, :, t : t + 1], pairs.targets[:, :, t : t + 1]  # [B, H, 1, f]
        grads = _token_grads(task, params, x_t, y_t)
        for (key, value), g in zip(params.items(), grads, strict=True):
            lr_t = lr[:, :, t].reshape(lr.shape[:2] + (1,) * (value.dim() - 2))
            pending[key] = pending[key] + lr_t * g
        current = {k: params[k] - tau[offset] * pending[k] for k in params}
        outputs.append(task.predict(current, views.query[:, :, t : t + 1]))
        if offset == task.mini_batch_size - 1:
            params = current
            pending = {k: torch.zeros_like(v) for k, v in pending.items()}
    new_state = replace(
        state,
        params=params,
        pending=pending,
        position=state.position + views.query.shape[2],
        loss_carry=pairs.carry,
    )
    return torch.cat(outputs, dim=2), new_state


def causal_linear_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``out_i = sum_{j <= i} (q_i . k_j) v_j`` for ``[B, H, T, f]`` inputs (unnormalised)."""
    scores = (query @ key.transpose(-1, -2)).tril()  # [B, H, T, T]
    return scores @ value


__all__ = ["causal_linear_attention", "naive_token_loop"]
