"""Helpers every update rule shares: splitting a chunk at mini-batch boundaries, carrying state.

A chunk of ``T`` tokens that starts at absolute position ``p`` is cut into segments that never
cross a mini-batch boundary: a head (the rest of a mini-batch already begun), whole mini-batches,
and a tail (the start of a mini-batch that the next chunk continues). Within one segment all
gradients are taken at the same weights, the mini-batch's starting weights.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from innerloop.core.protocol import InnerTask, LossPairs, Params, Views
from innerloop.core.state import TTTState


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
    zeroed.
    """

    query: torch.Tensor
    inputs: torch.Tensor
    targets: torch.Tensor
    lr: torch.Tensor

    def segment(self, seg: Segment) -> ChunkInputs:
        sl = slice(seg.start, seg.end)
        return ChunkInputs(
            self.query[:, :, sl], self.inputs[:, :, sl], self.targets[:, :, sl], self.lr[:, :, sl]
        )


def prepare_chunk(
    state: TTTState, task: InnerTask, views: Views, lr: torch.Tensor
) -> tuple[ChunkInputs, dict]:
    """Build the loss pairs of a chunk and fold their validity into the learning rates."""
    pairs: LossPairs = task.loss.pairs(views, state.loss_carry)
    if pairs.valid is not None:
        lr = lr * pairs.valid.to(lr.dtype)
    return ChunkInputs(views.query, pairs.inputs, pairs.targets, lr), pairs.carry


def close_mini_batch(params: Params, pending: Params, tau_last: torch.Tensor) -> tuple[Params, Params]:
    """Commit a finished mini-batch: ``W_b <- W_b - tau_last * pending``, ``pending <- 0``."""
    new_params = {k: params[k] - tau_last * pending[k] for k in params}
    new_pending = {k: torch.zeros_like(v) for k, v in pending.items()}
    return new_params, new_pending


def advance_state(
    state: TTTState, params: Params, pending: Params, num_tokens: int, loss_carry: dict
) -> TTTState:
    """The state after a chunk of ``num_tokens`` tokens."""
    return replace(
        state, params=params, pending=pending, position=state.position + num_tokens, loss_carry=loss_carry
    )


__all__ = ["ChunkInputs", "Segment", "advance_state", "close_mini_batch", "prepare_chunk", "split_segments"]
