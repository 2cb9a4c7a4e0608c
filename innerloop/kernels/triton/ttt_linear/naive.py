"""Pure-torch reference of the TTT-Linear chunk computation (dual form) and of one-token decode.

Written to follow the math in this folder's README.md (the dual form of ``innerloop/kernels/README.md``)
and ``compute_mini_batch`` of ttt-lm-pytorch line by line; it is the ground truth the Triton kernels
are tested against, and it is differentiable, so autograd through it gives the reference gradients.
"""

from __future__ import annotations

import torch

from ..common import (
    check_chunk_inputs,
    check_decode_inputs,
    concat_tokens,
    eta_matrix,
    given_dtypes,
    head_view,
    layer_norm,
    ln_fused_l2_bwd,
)


def param_shapes(B: int, H: int, f: int) -> dict:
    """Expected shapes of the inner weights: ``W1 [B, H, f, f]``, ``b1 [B, H, 1, f]``."""
    return {"W1": (B, H, f, f), "b1": (B, H, 1, f)}


@given_dtypes
def forward(
    xq: torch.Tensor,
    xk: torch.Tensor,
    xv: torch.Tensor,
    lr: torch.Tensor,
    tau: torch.Tensor,
    params: dict,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, dict]:
    """TTT-Linear over whole mini-batches, dual form, in plain torch.

    Args:
        xq, xk, xv: ``[B, H, T, f]`` query / key / value views; ``T`` a multiple of ``K = len(tau)``.
        lr: ``[B, H, T]`` per-token inner learning rates.
        tau: ``[K]`` token-index scales.
        params: ``{"W1": [B, H, f, f], "b1": [B, H, 1, f]}`` the weights at the chunk start.
        ln_weight, ln_bias: ``[H, f]`` the inner LayerNorm.
        eps: LayerNorm epsilon.

    Returns:
        ``(out [B, H, T, f], new_params)`` with ``out = xq + LN(Zbar)`` and the weights after the
        last mini-batch.
    """
    B, H, T, f = xq.shape
    check_chunk_inputs(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, param_shapes(B, H, f))
    K = tau.shape[0]
    gamma, beta = head_view(ln_weight), head_view(ln_bias)
    W, b = params["W1"], params["b1"]
    outs = []
    for n in range(T // K):
        sl = slice(n * K, (n + 1) * K)
        q, k, v = xq[:, :, sl], xk[:, :, sl], xv[:, :, sl]  # [B, H, K, f]
        eta = eta_matrix(lr[:, :, sl], tau)  # [B, H, K, K], lower triangular
        Z = k @ W + b
        G = ln_fused_l2_bwd(Z, v - k, gamma, beta, eps)  # dloss/dZ at the mini-batch start weights
        attn = torch.tril(q @ k.transpose(-2, -1))
        Zbar = q @ W - (eta * attn) @ G + b - eta @ G
        outs.append(q + layer_norm(Zbar, gamma, beta, eps))
        last = eta[:, :, -1, :, None]  # [B, H, K, 1] = tau_{K-1} * lr_j
        W = W - (last * k).transpose(-2, -1) @ G
        b = b - (last * G).sum(dim=-2, keepdim=True)
    return concat_tokens(outs, xq), {"W1": W, "b1": b}


@given_dtypes
def decode(
    xq: torch.Tensor,
    xk: torch.Tensor,
    xv: torch.Tensor,
    lr: torch.Tensor,
    tau_i: torch.Tensor,
    params: dict,
    pending: dict,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float = 1e-6,
    is_last: bool = False,
) -> tuple[torch.Tensor, dict, dict]:
    """One token per sequence with the pending-gradient state, in plain torch.

    Args:
        xq, xk, xv: ``[B, H, f]`` the token's views.
        lr: ``[B, H]`` its inner learning rate.
        tau_i: 0-d tensor, the scale of its index ``i`` within the mini-batch.
        params: the weights at the start of the current mini-batch (``W1 [B, H, f, f]``, ``b1 [B, H, 1, f]``).
        pending: same keys/shapes; the lr-weighted gradient sums of the mini-batch's earlier tokens.
        ln_weight, ln_bias: ``[H, f]``.
        eps: LayerNorm epsilon.
        is_last: whether the token closes its mini-batch (then the weights are committed).

    Returns:
        ``(out [B, H, f], new_params, new_pending)``.
    """
    B, H, f = xq.shape
    check_decode_inputs(xq, xk, xv, lr, tau_i, params, pending, ln_weight, ln_bias, param_shapes(B, H, f))
    gamma, beta = head_view(ln_weight), head_view(ln_bias)
    q, k, v = xq[:, :, None], xk[:, :, None], xv[:, :, None]  # [B, H, 1, f]
    Z = k @ params["W1"] + params["b1"]
    G = ln_fused_l2_bwd(Z, v - k, gamma, beta, eps)  # [B, H, 1, f]
    rate = lr[:, :, None, None]
    S_W = pending["W1"] + rate * (k.transpose(-2, -1) @ G)
    S_b = pending["b1"] + rate * G
    W = params["W1"] - tau_i * S_W
    b = params["b1"] - tau_i * S_b
    out = q + layer_norm(q @ W + b, gamma, beta, eps)
    if is_last:
        return out[:, :, 0], {"W1": W, "b1": b}, {"W1": torch.zeros_like(S_W), "b1": torch.zeros_like(S_b)}
    return out[:, :, 0], dict(params), {"W1": S_W, "b1": S_b}
