"""Inner-loop diagnostics: does each inner update lower the inner loss?

For every mini-batch of a sequence, the mean inner loss of its tokens is measured at the weights the
mini-batch starts with (before its update) and at the weights after it (same tokens, same pairs).
A working TTT layer shows ``after < before``: the fast weights learned the mini-batch.
"""

from __future__ import annotations

import torch

from innerloop.core.layer import TTTLayer
from innerloop.core.protocol import InnerTask, LossPairs
from innerloop.core.scan import checked_pairs, run_scan


def _weighted_loss(task: InnerTask, params: dict, pairs: LossPairs, weights: torch.Tensor) -> torch.Tensor:
    """Sum over heads and tokens of the weighted inner loss, per sequence: ``[B]``."""
    per_token = task.loss.token_loss(task.predict(params, pairs.inputs), pairs.targets)  # [B, H, N]
    return (per_token * weights).sum(dim=(1, 2))


@torch.no_grad()
def inner_loss_before_after(layer: TTTLayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean inner loss per sequence before and after each mini-batch's update.

    Args:
        layer: the TTT layer.
        x: ``[B, T, D]`` the layer's input (a whole sequence, from its start).

    Returns:
        ``(before [B], after [B])``: token-weighted means over every mini-batch of the sequence.
    """
    layer._check_input(x, None)
    state = layer.init_state(x.shape[0])  # in the scan's dtype (float32 for a bfloat16 layer)
    views, lr, tau, _ = layer._read(x, state)
    tau = tau if layer.update_rule.uses_token_scale else None
    gates = layer.scan_gates(x)  # (decay, momentum, decay_log), each [B, H, T] or None: the layer's scan's
    views, (lr, tau, *gates) = layer.in_scan_dtype(views, lr, tau, *gates)
    task = layer.inner_task()
    mini_batch = layer.mini_batch_size
    dtype = layer.scan_dtype
    totals_before = x.new_zeros(x.shape[0], dtype=dtype)
    totals_after = x.new_zeros(x.shape[0], dtype=dtype)
    counts = x.new_zeros(x.shape[0], dtype=dtype)
    with torch.autocast(x.device.type, enabled=False):  # the scan runs in its dtype, as in the layer
        for start in range(0, x.shape[1], mini_batch):
            end = min(start + mini_batch, x.shape[1])
            chunk_views = views.slice_tokens(start, end)
            pairs = checked_pairs(
                task.loss, task.loss.pairs(chunk_views, state.loss_carry), chunk_views, state.loss_carry
            )
            valid = (
                pairs.valid
                if pairs.valid is not None
                else torch.ones(end - start, dtype=dtype, device=x.device)
            )
            weights = torch.broadcast_to(valid.to(dtype), lr[:, :, start:end].shape)  # [B, H, N]

            totals_before += _weighted_loss(task, state.params, pairs, weights)
            decay, momentum, decay_log = (None if g is None else g[:, :, start:end] for g in gates)
            _, state = run_scan(
                layer.update_rule,
                state,
                task,
                chunk_views,
                lr[:, :, start:end],
                tau,
                decay,
                momentum,
                decay_log=decay_log,
            )
            totals_after += _weighted_loss(task, state.current_weights(tau), pairs, weights)
            counts += weights.sum(dim=(1, 2))
    counts = counts.clamp_min(1.0)
    return totals_before / counts, totals_after / counts


__all__ = ["inner_loss_before_after"]
