"""``dual_form``: the same numbers as ``minibatch_gd`` without per-token weight matrices.

For a stack model (affine maps and elementwise functions) the output of token ``i`` of a mini-batch
needs ``x_i @ W_i`` with ``W_i = W_b - tau_i * sum_{j <= i} lr_j * X_j^T G_j``, which is
``x_i @ W_b - sum_{j <= i} tau_i lr_j (x_i . X_j) G_j``: a causal attention-like product instead
of a weight matrix per token. Applied layer by layer (the derivation is in kernels/README.md); the
pure-torch math (``dual_segment``, ``dual_aligned_block``) is ``kernels/reference.py``, beside the
fast paths it is the reference of.

Whole mini-batches that start at a boundary go to the best registered kernel that verifies
(``InnerTask.kernel`` picks one or forbids them); everything else, and the fallback, runs here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from innerloop.core.protocol import InnerModel, InnerTask, Params, UpdateRule, Views
from innerloop.core.scan import (
    ChunkInputs,
    Segment,
    SegmentCarry,
    advance_state,
    check_rule_arguments,
    close_mini_batch,
    close_planned,
    plan_dual,
    prepare_chunk,
    split_segments,
)
from innerloop.core.state import TTTState
from innerloop.kernels.dispatch import record_torch_part, run_aligned_block, run_decode_token
from innerloop.kernels.reference import dual_aligned_block, dual_planned_segment, dual_segment, dual_token
from innerloop.registry import hookimpl


class DualForm(UpdateRule):
    """Dual-form mini-batch TTT for stack models (see module docstring)."""

    name = "dual_form"
    supports_decay = True

    def check_model(self, model: InnerModel) -> str | None:
        if model.stack is None:
            return (
                f"inner model {model.name!r} does not declare a stack of affine maps and elementwise "
                "functions (InnerModel.stack), which the dual form needs; use update_rule='minibatch_gd'"
            )
        return None

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
        decaying = chunk.decay is not None or bool(state.decay)
        carry = SegmentCarry(state.pending, state.decay_product(), None)
        params = state.params
        segments = split_segments(state.position, views.query.shape[2], task.mini_batch_size)
        outputs = []
        index = 0
        while index < len(segments):
            seg = segments[index]
            if seg.offset == 0 and seg.closes_mini_batch:
                # A run of whole mini-batches: the fast path's territory (a kernel without decay
                # support refuses a decaying block, with the reason).
                last = index
                while last + 1 < len(segments) and segments[last + 1].closes_mini_batch:
                    last += 1
                block = Segment(seg.start, segments[last].end, 0, closes_mini_batch=True)
                out, params = run_aligned_block(
                    self, task, params, chunk.segment(block), tau, fallback=dual_aligned_block
                )
                outputs.append(out)
                index = last + 1
                continue
            out, params, carry = self._segment(task, params, carry, chunk.segment(seg), seg, tau, decaying)
            outputs.append(out)
            index += 1
        # One block (the common case) is returned as the path wrote it: a copy would cost a pass over
        # the outputs, and another to undo its layout (the CPU kernel writes [B, T, H, f] memory).
        output = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
        return output, advance_state(
            state, params, carry.pending, views.query.shape[2], loss_carry, None, carry.decay_product
        )

    def _segment(
        self,
        task: InnerTask,
        params: Params,
        carry: SegmentCarry,
        part: ChunkInputs,
        seg: Segment,
        tau: torch.Tensor,
        decaying: bool,
    ) -> tuple[torch.Tensor, Params, SegmentCarry]:
        """A segment that does not start and end a mini-batch (decoding: a kernel's one-token path
        if one verifies), committing the mini-batch when it closes one."""
        seg_tau = tau[seg.offset : seg.offset + seg.length]
        if seg.length == 1:
            decoded = run_decode_token(
                self,
                task,
                params,
                carry.pending,
                part,
                seg_tau[0],
                seg.closes_mini_batch,
                dual_token,
                decaying,
            )
            if decoded is not None:
                out, params, pending = decoded
                return out, params, SegmentCarry(pending, None, None)
        if seg.length > 1:
            record_torch_part(
                task,
                f"a part of {seg.length} tokens inside a mini-batch (kernels take whole mini-batches from a "
                "boundary, or one decoded token)",
            )
        if decaying:
            plan, finish = plan_dual(part, seg_tau, carry, has_pending=seg.offset > 0)
            out, sums = dual_planned_segment(task, params, part, plan)
            carry = finish(sums)
            if seg.closes_mini_batch:
                params, carry = close_planned(params, carry, seg_tau[-1])
            return out, params, carry
        out, pending = dual_segment(task, params, carry.pending, part, seg_tau, has_pending=seg.offset > 0)
        if seg.closes_mini_batch:
            params, pending = close_mini_batch(params, pending, seg_tau[-1])
        return out, params, SegmentCarry(pending, None, None)


@hookimpl
def register_update_rules(register: Callable[[Any], Any]) -> None:
    register(DualForm())
