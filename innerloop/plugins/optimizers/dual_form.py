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

import torch

from innerloop.core.protocol import InnerModel, InnerTask, UpdateRule, Views
from innerloop.core.scan import (
    Segment,
    advance_state,
    close_mini_batch,
    prepare_chunk,
    split_segments,
)
from innerloop.core.state import TTTState
from innerloop.kernels.dispatch import run_aligned_block, run_decode_token
from innerloop.kernels.reference import dual_aligned_block, dual_segment
from innerloop.registry import hookimpl


class DualForm(UpdateRule):
    """Dual-form mini-batch TTT for stack models (see module docstring)."""

    name = "dual_form"

    def check_model(self, model: InnerModel) -> str | None:
        if model.stack is None:
            return (
                f"inner model {model.name!r} does not declare a stack of affine maps and elementwise "
                "functions (InnerModel.stack), which the dual form needs; use update_rule='minibatch_gd'"
            )
        return None

    def forward(
        self, state: TTTState, task: InnerTask, views: Views, lr: torch.Tensor, tau: torch.Tensor
    ) -> tuple[torch.Tensor, TTTState]:
        chunk, loss_carry = prepare_chunk(state, task, views, lr)
        params, pending = state.params, state.pending
        segments = split_segments(state.position, views.query.shape[2], task.mini_batch_size)
        outputs = []
        index = 0
        while index < len(segments):
            seg = segments[index]
            if seg.offset == 0 and seg.closes_mini_batch:
                # A run of whole mini-batches: the fast path's territory.
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
            seg_tau = tau[seg.offset : seg.offset + seg.length]
            if seg.length == 1:  # decoding: a kernel's one-token path, if one verifies
                decoded = run_decode_token(
                    self, task, params, pending, chunk.segment(seg), seg_tau[0], seg.closes_mini_batch
                )
                if decoded is not None:
                    out, params, pending = decoded
                    outputs.append(out)
                    index += 1
                    continue
            out, pending = dual_segment(
                task, params, pending, chunk.segment(seg), seg_tau, has_pending=seg.offset > 0
            )
            outputs.append(out)
            if seg.closes_mini_batch:
                params, pending = close_mini_batch(params, pending, seg_tau[-1])
            index += 1
        return torch.cat(outputs, dim=2), advance_state(
            state, params, pending, views.query.shape[2], loss_carry
        )


@hookimpl
def register_update_rules(register) -> None:
    register(DualForm())
