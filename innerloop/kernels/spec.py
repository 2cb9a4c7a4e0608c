"""The contract between update rules and fast paths (kernels).

A kernel computes the same numbers as a pure-torch reference for one combination of
(inner model, inner loss, update rule), on whole mini-batches that start at a mini-batch
boundary with no pending gradients. The update rule asks the registry for the best kernel whose
``verify`` accepts the inputs and falls back to torch otherwise; the reason a kernel was refused is
kept so that users can read why (``TTTLayer.last_dispatch``).

Tensor conventions for a chunk kernel (``forward``), per batch ``B``, head ``H``, length ``T``
(a multiple of the mini-batch size ``K``) and head dim ``f``:

- ``xq, xk, xv``: ``[B, H, T, f]`` the views (RoPE already applied to ``xq``, ``xk``);
- ``lr``: ``[B, H, T]`` the per-token inner learning rate (``base_lr * sigmoid(gate) / f``, masked);
- ``tau``: ``[K]`` the token-index scale, already clamped at 0;
- ``params``: dict of the inner model's weights with batch dims, e.g. ``W1 [B, H, f, f]``,
  ``b1 [B, H, 1, f]`` (and ``W2``, ``b2`` for the MLP);
- ``ln_weight, ln_bias``: ``[H, f]`` the inner LayerNorm; ``eps`` its epsilon.

It returns ``(out [B, H, T, f], new_params)`` where ``out = xq + LN(g(xq; W_i))`` per token and
``new_params`` are the weights after the last mini-batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class KernelInputs:
    """What a kernel's ``verify`` may look at to decide whether it can run."""

    device: torch.device
    dtype: torch.dtype
    head_dim: int
    mini_batch_size: int
    num_tokens: int
    requires_grad: bool
    needs_double_backward: bool = False
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class KernelSpec:
    """A registered fast path.

    ``verify(inputs) -> str | None`` returns ``None`` when the kernel can run on these inputs,
    otherwise a human-readable reason why not. Higher ``priority`` wins among kernels that verify.
    ``decode`` (optional) handles one token with the pending-gradient state:
    ``decode(xq, xk, xv, lr, tau_i, params, pending, ln_weight, ln_bias, eps, is_last) ->
    (out [B, H, f], params, pending)`` with ``xq, xk, xv [B, H, f]``, ``lr [B, H]``; it is asked
    for with ``inputs.extra["decode"] = True`` and ``num_tokens = 1``.
    """

    name: str
    inner_model: str
    inner_loss: str
    update_rule: str
    forward: Callable
    verify: Callable[[KernelInputs], str | None]
    decode: Callable | None = None
    priority: int = 0
    description: str = ""
