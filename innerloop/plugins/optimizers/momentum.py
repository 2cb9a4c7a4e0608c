"""``momentum``: Titans' surprise momentum with forgetting, gradients at the mini-batch start.

Per token ``t`` (gradient ``grad_t`` at the weights ``W_b`` its mini-batch started with)::

    S_t = m_t S_{t-1} - lr_t grad_t        (momentum m; S runs across mini-batches)
    W_t = a_t W_{t-1} + S_t                (a_t = 1 - decay_t; decay applies to every weight)

and token ``t`` reads ``f(XQ_t; W_t)``. At ``K = 1`` this is the plain recurrence (Titans, momentum
DeltaNet); at ``K > 1`` it is FLA's chunked Titans. There is no token-index scale (``tau`` is None);
without momentum and decay it equals ``dual_form`` with ``tau = 1``. ``S`` is carried in
``TTTState.momentum`` (``innerloop.ops.scan`` returns it as ``"momentum.<name>"``).

Stack models run in the dual form, any other model in the primal form; both read the segment plan
of ``core/scan.py`` (:func:`~innerloop.core.scan.plan_momentum`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from innerloop.core.protocol import InnerTask, UpdateRule, Views
from innerloop.core.scan import advance_state, check_rule_arguments, prepare_chunk, run_planned
from innerloop.core.state import TTTState
from innerloop.kernels.dispatch import record_torch_block
from innerloop.kernels.primal import primal_planned_segment
from innerloop.kernels.reference import dual_planned_segment
from innerloop.registry import hookimpl


class Momentum(UpdateRule):
    """Surprise momentum and forgetting (Titans); see the module docstring."""

    name = "momentum"
    supports_decay = True
    supports_momentum = True
    uses_token_scale = False
    no_kernel_reason = (
        "no kernel contract carries the momentum rule's state (momentum S): its blocks run on torch"
    )

    def forward(
        self,
        state: TTTState,
        task: InnerTask,
        views: Views,
        lr: torch.Tensor,
        tau: torch.Tensor | None,
        decay: torch.Tensor | None = None,
        momentum: torch.Tensor | None = None,
        decay_log: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, TTTState]:
        """The chunk (:class:`~innerloop.core.protocol.UpdateRule`); ``decay_log`` is ``log(1 - decay)``
        given instead of ``decay``, for decay products in log space (:func:`~innerloop.core.scan.run_scan`)."""
        check_rule_arguments(
            self, state, task, views, lr, tau, decay=decay, momentum=momentum, decay_log=decay_log
        )
        chunk, loss_carry = prepare_chunk(state, task, views, lr, decay, momentum, decay_log)
        record_torch_block(self, task, chunk, state.params)
        reader = dual_planned_segment if task.model.stack is not None else primal_planned_segment
        out, params, carry = run_planned(state, task, chunk, None, reader)
        new_state = advance_state(
            state,
            params,
            carry.pending,
            views.query.shape[2],
            loss_carry,
            carry.momentum,
            carry.decay_product,
        )
        return out, new_state


@hookimpl
def register_update_rules(register: Callable[[Any], Any]) -> None:
    register(Momentum())
