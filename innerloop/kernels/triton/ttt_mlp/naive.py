"""Pure-torch reference of the TTT-MLP chunk computation (dual form) and of one-token decode.

Follows the math in this folder's README.md (the dual form of ``innerloop/kernels/README.md``) and
``compute_mini_batch`` of ttt-lm-pytorch's TTTMLP: the dual form applied layer by layer, tanh-GELU
between the layers, and the reference's polynomial for the GELU derivative in the inner gradient. Differentiable; the ground truth for the Triton kernels.
"""

from __future__ import annotations

import torch

from ..common import (
    check_chunk_inputs,
    check_decode_inputs,
    concat_tokens,
    eta_matrix,
    gelu_tanh,
    gelu_tanh_derivative,
    given_dtypes,
    head_view,
    layer_norm,
    ln_fused_l2_bwd,
)


def param_shapes(B: int, H: int, f: int) -> dict:
    """Expected inner weights: ``W1 [B,H,f,4f]``, ``b1 [B,H,1,4f]``, ``W2 [B,H,4f,f]``, ``b2 [B,H,1,f]``."""
    return {"W1": (B, H, f, 4 * f), "b1": (B, H, 1, 4 * f), "W2": (B, H, 4 * f, f), "b2": (B, H, 1, f)}


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
    """TTT-MLP over whole mini-batches, dual form, in plain torch.

    Args:
        xq, xk, xv: ``[B, H, T, f]``; ``T`` a multiple of ``K = len(tau)``.
        lr: ``[B, H, T]``; tau: ``[K]``.
        params: ``W1 [B, H, f, 4f]``, ``b1 [B, H, 1, 4f]``, ``W2 [B, H, 4f, f]``, ``b2 [B, H, 1, f]``.
        ln_weight, ln_bias: ``[H, f]``; eps: LayerNorm epsilon.

    Returns:
        ``(out [B, H, T, f], new_params)``.
    """
    B, H, T, f = xq.shape
    check_chunk_inputs(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, param_shapes(B, H, f))
    K = tau.shape[0]
    gamma, beta = head_view(ln_weight), head_view(ln_bias)
    W1, b1, W2, b2 = params["W1"], params["b1"], params["W2"], params["b2"]
    outs = []
    for n in range(T // K):
        sl = slice(n * K, (n + 1) * K)
        q, k, v = xq[:, :, sl], xk[:, :, sl], xv[:, :, sl]  # [B, H, K, f]
        eta = eta_matrix(lr[:, :, sl], tau)  # [B, H, K, K]
        # key side: the inner gradients at the mini-batch start weights
        Z1 = k @ W1 + b1  # [B, H, K, 4f]
        X2 = gelu_tanh(Z1)
        Z2 = X2 @ W2 + b2  # [B, H, K, f]
        G2 = ln_fused_l2_bwd(Z2, v - k, gamma, beta, eps)
        G1 = (G2 @ W2.transpose(-2, -1)) * gelu_tanh_derivative(Z1)  # [B, H, K, 4f]
        # query side, layer by layer
        attn1 = torch.tril(q @ k.transpose(-2, -1))
        Zbar1 = q @ W1 - (eta * attn1) @ G1 + b1 - eta @ G1
        Xbar2 = gelu_tanh(Zbar1)
        attn2 = torch.tril(Xbar2 @ X2.transpose(-2, -1))
        Zbar2 = Xbar2 @ W2 - (eta * attn2) @ G2 + b2 - eta @ G2
        outs.append(q + layer_norm(Zbar2, gamma, beta, eps))
        last = eta[:, :, -1, :, None]  # [B, H, K, 1]
        W1 = W1 - (last * k).transpose(-2, -1) @ G1
        b1 = b1 - (last * G1).sum(dim=-2, keepdim=True)
        W2 = W2 - (last * X2).transpose(-2, -1) @ G2
        b2 = b2 - (last * G2).sum(dim=-2, keepdim=True)
    return concat_tokens(outs, xq), {"W1": W1, "b1": b1, "W2": W2, "b2": b2}


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
        xq, xk, xv: ``[B, H, f]``; lr: ``[B, H]``; tau_i: 0-d tensor.
        params: the weights at the start of the current mini-batch (keys ``W1, b1, W2, b2``).
        pending: same keys/shapes, the lr-weighted gradient sums of the mini-batch's earlier tokens.
        ln_weight, ln_bias: ``[H, f]``; eps: LayerNorm epsilon.
        is_last: whether the token closes its mini-batch (then the weights are committed).

    Returns:
        ``(out [B, H, f], new_params, new_pending)``.
    """
    B, H, f = xq.shape
    check_decode_inputs(xq, xk, xv, lr, tau_i, params, pending, ln_weight, ln_bias, param_shapes(B, H, f))
    gamma, beta = head_view(ln_weight), head_view(ln_bias)
    q, k, v = xq[:, :, None], xk[:, :, None], xv[:, :, None]  # [B, H, 1, f]
    W1, b1, W2, b2 = params["W1"], params["b1"], params["W2"], params["b2"]
    Z1 = k @ W1 + b1  # [B, H, 1, 4f]
    X2 = gelu_tanh(Z1)
    Z2 = X2 @ W2 + b2
    G2 = ln_fused_l2_bwd(Z2, v - k, gamma, beta, eps)  # [B, H, 1, f]
    G1 = (G2 @ W2.transpose(-2, -1)) * gelu_tanh_derivative(Z1)  # [B, H, 1, 4f]
    rate = lr[:, :, None, None]
    S = {
        "W1": pending["W1"] + rate * (k.transpose(-2, -1) @ G1),
        "b1": pending["b1"] + rate * G1,
        "W2": pending["W2"] + rate * (X2.transpose(-2, -1) @ G2),
        "b2": pending["b2"] + rate * G2,
    }
    W = {key: params[key] - tau_i * S[key] for key in S}
    hidden = gelu_tanh(q @ W["W1"] + W["b1"])
    out = q + layer_norm(hidden @ W["W2"] + W["b2"], gamma, beta, eps)
    if is_last:
        return out[:, :, 0], W, {key: torch.zeros_like(s) for key, s in S.items()}
    return out[:, :, 0], dict(params), S
