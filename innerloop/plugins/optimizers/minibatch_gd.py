"""``minibatch_gd``: mini-batch gradient descent in the primal form, for any model and loss.

For every token ``j`` of a mini-batch, the gradient of its inner loss is taken with ``torch.func``
at the mini-batch's starting weights ``W_b``; token ``i`` then reads its output with
``W_i = W_b - tau_i * (pending + sum_{j <= i} lr_j * grad_j)``. This materialises one copy of the
weights per token, which is what makes it generic (and slow): it is the reference the dual form
and the kernels are tested against, and the decode path (one token at a time). The segments it reads
(``primal_segment``, ``primal_planned_segment``) are in :mod:`innerloop.kernels.primal`, beside the dual
form's; importing them from here, as before, gives the same functions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from innerloop.core.protocol import InnerTask, UpdateRule, Views
from innerloop.core.scan import (
    advance_state,
    check_rule_arguments,
    close_mini_batch,
    prepare_chunk,
    run_planned,
    split_segments,
)
from innerloop.core.state import TTTState
from innerloop.kernels.dispatch import record_torch_part
from innerloop.kernels.primal import primal_planned_segment, primal_segment
from innerloop.registry import hookimpl

#: Why no kernel runs this rule (its ``no_kernel_reason``, and what each call records as its dispatch).
ON_TORCH_ONLY = "minibatch_gd is the primal form, in torch for any model (kernels run dual_form)"


class MiniBatchGD(UpdateRule):
    """Primal-form mini-batch TTT: generic over every inner model and loss (see module docstring)."""

    name = "minibatch_gd"
    supports_decay = True
    no_kernel_reason = ON_TORCH_ONLY

    def forward(
        self,
        state: TTTState,
        task: InnerTask,
        views: Views,
        lr: torch.Tensor,
        tau: torch.Tensor,
        decay: torch.Tensor | None = None,
        decay_log: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, TTTState]:
        """The chunk (:class:`~innerloop.core.protocol.UpdateRule`); ``decay_log`` is ``log(1 - decay)``
        given instead of ``decay``, for decay products in log space (:func:`~innerloop.core.scan.run_scan`)."""
        check_rule_arguments(self, state, task, views, lr, tau, decay=decay, decay_log=decay_log)
        chunk, loss_carry = prepare_chunk(state, task, views, lr, decay, decay_log=decay_log)
        record_torch_part(task, ON_TORCH_ONLY)
        if chunk.decay is not None or state.decay:  # forgetting: the planned form (core/scan.py)
            out, params, carry = run_planned(state, task, chunk, tau, primal_planned_segment)
            return out, advance_state(
                state, params, carry.pending, views.query.shape[2], loss_carry, None, carry.decay_product
            )
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
def register_update_rules(register: Callable[[Any], Any]) -> None:
    register(MiniBatchGD())
