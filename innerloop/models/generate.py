"""Sampling from a language model (:class:`~innerloop.models.CausalLM` or
:class:`~innerloop.models.E2ELM`) through its recurrent state.

The prompt is read in one call; then each new token is fed alone (``T = 1``) with the state of the
previous step. Nothing else is kept: with TTT or sliding-window mixers the memory per token is
constant, however many tokens are generated.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # annotations only: generate calls the model, whatever its class
    from innerloop.models.e2e import E2ELM, E2EState
    from innerloop.models.lm import CausalLM, LMState


def sample_next(
    logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> torch.Tensor:
    """Draw one token per row from ``logits [B, V]``; ``temperature == 0`` is greedy. Returns ``[B]``."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    # Subtract the largest logit first (the most likely token then scores 0, the others < 0), and divide
    # in float64: exact for any positive temperature, however small. (Dividing first overflows to
    # inf - inf = NaN for a tiny temperature, and a temperature below float32's range rounds to 0.)
    logits = logits.double()
    logits = ((logits - logits.amax(dim=-1, keepdim=True)) / temperature).float()  # [B, V], max 0
    if top_k is not None and top_k < logits.shape[-1]:
        threshold = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: CausalLM | E2ELM,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, LMState | E2EState]]:
    """Yield ``(tokens [B], state)`` for each of ``max_new_tokens`` sampled tokens.

    Args:
        model: the language model (put in eval mode by the caller).
        prompt_ids: ``[B, P]`` token ids with ``P >= 1``.
        max_new_tokens: how many tokens to sample (>= 0).
        temperature: softmax temperature; 0 means greedy decoding.
        top_k: sample only among the ``top_k`` most likely tokens (None: all).
        generator: torch RNG for reproducible sampling.

    The state is yielded so that callers can inspect it (e.g. its size); the generator itself keeps
    only the latest state and the latest token.
    """
    if prompt_ids.dim() != 2 or prompt_ids.shape[1] < 1:
        raise ValueError(f"prompt_ids must be [batch, length >= 1], got shape {tuple(prompt_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature={temperature} must be a finite number >= 0 (0 is greedy)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1 or None")
    logits, state = model(prompt_ids)
    last = logits[:, -1]  # [B, V]
    for _ in range(max_new_tokens):
        token = sample_next(last, temperature, top_k, generator)  # [B]
        yield token, state
        logits, state = model(token[:, None], state)
        last = logits[:, -1]
