"""The plugin contracts of a model-level inner loop (TTT-E2E, ``innerloop.models.e2e``).

In TTT-E2E the fast weights are not inside one layer: they are the weights of the "prime" MLPs of the
model's last blocks, and the inner loss is the language model's own next-token loss. The model reads a
sequence chunk by chunk; for each chunk it

1. scores the chunk with the current fast weights (``logits [B, C, V]``),
2. asks the :class:`ModelInnerLoss` for each sequence's loss on the chunk (``[B]``),
3. asks the :class:`ModelUpdateRule` for the fast weights of the next chunk.

The scoring comes first, so a chunk is never predicted by weights that were trained on it. Fast
weights carry a leading batch dim ``[B, ...]``: every sequence learns on its own.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import ClassVar

import torch

FastWeights = dict[str, torch.Tensor]
"""Fast weights by parameter name, each ``[B, *parameter shape]``."""


class ModelInnerLoss(ABC):
    """A self-supervised loss on one chunk of a sequence, computed from the model's logits."""

    name: ClassVar[str]

    @abstractmethod
    def chunk_loss(self, logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Each sequence's loss on the chunk: ``logits [B, C, V]``, ``input_ids [B, C]`` or
        ``[B, C + 1]`` → ``[B]``.

        ``input_ids`` are the chunk's tokens, followed by the next chunk's first token when the model's
        ``chunk_targets`` is ``next_token`` (the official TTT-E2E loss: every token of the chunk has
        its target); with ``within_chunk`` the chunk's tokens alone. No later token is ever given
        (the model streams). A negative id (after the first) is a target to skip
        (``model.e2e.skip_target_id``, the official code's mask of BOS targets).
        """


class ModelUpdateRule(ABC):
    """One step of the fast weights on a chunk's inner losses."""

    name: ClassVar[str]

    @abstractmethod
    def step(
        self,
        fast: Mapping[str, torch.Tensor],
        losses: torch.Tensor,
        lr: float,
        max_grad_norm: float,
        create_graph: bool,
    ) -> FastWeights:
        """The fast weights after one step on ``losses [B]`` (sequence ``b``'s loss depends only on
        ``fast[...][b]``).

        Args:
            fast: current fast weights ``[B, ...]`` (the ones that scored the chunk).
            losses: per-sequence inner losses of the chunk, ``[B]``.
            lr: learning rate of this step.
            max_grad_norm: clip each sequence's gradient to this global norm (0: no clipping).
            create_graph: keep the step differentiable to second order (for the meta-gradient);
                False treats the gradient as a constant.

        The graph behind ``losses`` must survive the step (the model backpropagates the outer loss
        through the same logits), so take gradients with ``retain_graph=True``.
        """
