"""Built-in TTT-E2E plugins: the ``next_token`` model inner loss and the ``score_first_sgd`` rule.

Both are registered through the same hooks as third-party plugins
(``register_model_inner_losses``, ``register_model_update_rules``), so a model config can swap
either by name: ``model.e2e.inner_loss=...``, ``model.e2e.update_rule=...``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from innerloop.core.model_inner import FastWeights, ModelInnerLoss, ModelUpdateRule
from innerloop.registry import hookimpl


class NextTokenChunkLoss(ModelInnerLoss):
    """Mean next-token cross-entropy of the chunk's tokens whose next token is given.

    Token ``t`` of the chunk predicts token ``t + 1`` of ``input_ids``. With the chunk's ``C`` tokens
    followed by the next chunk's first (``input_ids [B, C + 1]``, ``model.e2e.chunk_targets =
    "next_token"``, the official code's loss) that is all ``C`` tokens; with the chunk alone
    (``[B, C]``, ``within_chunk``) the ``C - 1`` pairs inside it. A negative id marks a target the
    loss skips (``model.e2e.skip_target_id``): the mean is over the others, 0 if there are none (as
    the official masked loss).
    """

    name = "next_token"

    def chunk_loss(self, logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 3 or input_ids.dim() != 2 or input_ids.shape[0] != logits.shape[0]:
            raise ValueError(
                f"logits must be [B, C, V] and input_ids [B, C] or [B, C + 1]; got {tuple(logits.shape)} "
                f"and {tuple(input_ids.shape)}"
            )
        chunk = logits.shape[1]
        if input_ids.shape[1] not in (chunk, chunk + 1):
            raise ValueError(
                f"input_ids must hold the chunk's {chunk} tokens, or those and the next one; got "
                f"{input_ids.shape[1]} tokens for logits {tuple(logits.shape)}"
            )
        pairs = input_ids.shape[1] - 1  # tokens whose next token is given
        if pairs < 1:
            raise ValueError(f"a chunk needs a next-token pair; got C={chunk} and {input_ids.shape[1]} ids")
        targets = input_ids[:, 1:]  # [B, pairs]
        valid = targets >= 0
        per_token = F.cross_entropy(
            logits[:, :pairs].transpose(1, 2),
            targets.clamp_min(0).long(),
            reduction="none",  # int32 ids too
        )  # [B, pairs]
        # the masked mean whether or not a target is masked: asking which would read a value from the
        # device (a host sync per chunk on a GPU) and give the same number
        return (per_token * valid).sum(dim=1) / valid.sum(dim=1).clamp_min(1)  # [B]


class ScoreFirstSGD(ModelUpdateRule):
    """One SGD step per chunk on the loss of the chunk the model has just scored.

    Each sequence's gradient (over all fast weights together) is clipped to global norm
    ``max_grad_norm``; then ``W <- W - lr * g``. With ``create_graph=True`` the step is differentiable
    to second order, which is what the outer loop's meta-gradient goes through.
    """

    name = "score_first_sgd"

    def step(
        self,
        fast: Mapping[str, torch.Tensor],
        losses: torch.Tensor,
        lr: float,
        max_grad_norm: float,
        create_graph: bool,
    ) -> FastWeights:
        names = list(fast)
        # Sequence b's loss depends only on fast[...][b], so the gradient of the sum is, row by row,
        # each sequence's own gradient.
        grads = torch.autograd.grad(
            losses.sum(), [fast[k] for k in names], create_graph=create_graph, retain_graph=True
        )
        if max_grad_norm > 0:
            squared = sum(g.pow(2).flatten(1).sum(dim=1) for g in grads)  # [B]
            # clamp_min keeps the square root's derivative finite for an all-zero gradient
            norm = squared.clamp_min(1e-30).sqrt()  # type: ignore[union-attr]
            scale = (max_grad_norm / norm).clamp(max=1.0)  # [B]
            grads = tuple(g * scale.view(-1, *([1] * (g.dim() - 1))) for g in grads)
        return {k: fast[k] - lr * g for k, g in zip(names, grads, strict=True)}


@hookimpl
def register_model_inner_losses(register: Callable[[Any], Any]) -> None:
    register(NextTokenChunkLoss())


@hookimpl
def register_model_update_rules(register: Callable[[Any], Any]) -> None:
    register(ScoreFirstSGD())
