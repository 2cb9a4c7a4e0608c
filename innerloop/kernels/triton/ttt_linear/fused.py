"""Host side of the Triton TTT-Linear kernels: argument checks, launches and the autograd Function.

``forward`` runs the fused chunk kernel (differentiable through a Triton backward, see README.md);
``decode`` runs the one-token kernel (inference only).
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import FunctionCtx

from ..common import (
    HostChecks,
    block_rows,
    differentiable_once,
    dot_precision,
    empty_output,
    launch_device,
)
from .naive import param_shapes

NAME = "triton_ttt_linear"
_KERNELS_MODULE = "innerloop.kernels.triton.ttt_linear._kernels"
MAX_HEAD_DIM = 128
DEFAULT_CHECKPOINT_EVERY = 8

# Tests set this to fill every output buffer with NaN before a kernel writes it, so that memory a
# kernel forgot to write cannot pass for a result.
POISON_OUTPUTS = False


CHECKS = HostChecks(NAME, _KERNELS_MODULE, MAX_HEAD_DIM, param_shapes)
_kernels = CHECKS.kernels


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return empty_output(shape, dtype, device, POISON_OUTPUTS)


class _LinearChunk(torch.autograd.Function):
    """Autograd wrapper: Triton forward with weight checkpoints, Triton recompute-backward."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        xq: torch.Tensor,
        xk: torch.Tensor,
        xv: torch.Tensor,
        lr: torch.Tensor,
        tau: torch.Tensor,
        W1: torch.Tensor,
        b1: torch.Tensor,
        ln_weight: torch.Tensor,
        ln_bias: torch.Tensor,
        eps: float,
        checkpoint_every: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, H, T, f = xq.shape
        K = tau.shape[0]
        NB = T // K
        # a group longer than the chunk is the whole chunk: the backward's scratch holds one group's
        # weights, so it is sized by the group actually run, not by the argument (review s20)
        checkpoint_every = max(1, min(checkpoint_every, NB))
        n_ckpt = math.ceil(NB / checkpoint_every)
        dev = xq.device
        xq, xk, xv, lr, tau = (t.contiguous() for t in (xq, xk, xv, lr, tau))
        W1c, b1c, lnw, lnb = (t.contiguous() for t in (W1, b1, ln_weight, ln_bias))
        out = _empty((B, H, T, f), xq.dtype, dev)
        W_new = _empty((B, H, f, f), W1.dtype, dev)
        b_new = _empty((B, H, 1, f), b1.dtype, dev)
        ckpt_w = _empty((B * H, n_ckpt, f, f), torch.float32, dev)  # weights at every group start
        ckpt_b = _empty((B * H, n_ckpt, f), torch.float32, dev)
        with launch_device(xq):
            _kernels().linear_forward_kernel[(B * H,)](
                xq, xk, xv, lr, tau, W1c, b1c, lnw, lnb,
                out, W_new, b_new, ckpt_w, ckpt_b,
                H, T, K, NB, n_ckpt, eps,
                F=f, BK=block_rows(K), GROUP=checkpoint_every, PREC=dot_precision(xq.dtype),
                num_warps=4 if f <= 64 else 8,
            )  # fmt: skip
        ctx.save_for_backward(xq, xk, xv, lr, tau, lnw, lnb, ckpt_w, ckpt_b)
        ctx.meta = (eps, checkpoint_every, W1.dtype, b1.dtype, ln_weight.dtype, ln_bias.dtype)
        return out, W_new, b_new

    @staticmethod
    @differentiable_once(NAME)
    def backward(
        ctx: FunctionCtx,
        d_out: torch.Tensor | None,
        d_W_new: torch.Tensor | None,
        d_b_new: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, ...]:
        xq, xk, xv, lr, tau, lnw, lnb, ckpt_w, ckpt_b = ctx.saved_tensors
        eps, group, w_dtype, b_dtype, lnw_dtype, lnb_dtype = ctx.meta
        B, H, T, f = xq.shape
        K = tau.shape[0]
        NB = T // K
        BK = block_rows(K)
        n_ckpt = ckpt_w.shape[1]
        dev = xq.device
        f32 = torch.float32
        d_out = torch.zeros_like(xq) if d_out is None else d_out.contiguous()
        d_W_new = torch.zeros(B, H, f, f, dtype=f32, device=dev) if d_W_new is None else d_W_new.contiguous()
        d_b_new = torch.zeros(B, H, 1, f, dtype=f32, device=dev) if d_b_new is None else d_b_new.contiguous()
        scratch_w = _empty((B * H, group, f, f), f32, dev)
        scratch_b = _empty((B * H, group, f), f32, dev)
        dxq, dxk, dxv = (_empty((B, H, T, f), f32, dev) for _ in range(3))
        dlr = _empty((B, H, T), f32, dev)
        dtau = _empty((B * H, BK), f32, dev)
        dW0 = _empty((B, H, f, f), f32, dev)
        db0 = _empty((B, H, 1, f), f32, dev)
        dlnw = _empty((B * H, f), f32, dev)
        dlnb = _empty((B * H, f), f32, dev)
        with launch_device(xq):
            _kernels().linear_backward_kernel[(B * H,)](
                xq, xk, xv, lr, tau, lnw, lnb, ckpt_w, ckpt_b,
                d_out, d_W_new, d_b_new, scratch_w, scratch_b,
                dxq, dxk, dxv, dlr, dtau, dW0, db0, dlnw, dlnb,
                H, T, K, NB, n_ckpt, eps,
                F=f, BK=BK, GROUP=group, PREC=dot_precision(xq.dtype),
                num_warps=4 if f <= 64 else 8,
                num_stages=1,  # no software pipelining: shared memory of 98 KiB, not 272, at f = 128
            )  # fmt: skip
        return (
            dxq.to(xq.dtype),
            dxk.to(xk.dtype),
            dxv.to(xv.dtype),
            dlr.to(lr.dtype),
            dtau.sum(0)[:K].to(tau.dtype),
            dW0.to(w_dtype),
            db0.to(b_dtype),
            dlnw.view(B, H, f).sum(0).to(lnw_dtype),
            dlnb.view(B, H, f).sum(0).to(lnb_dtype),
            None,
            None,
        )


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
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
) -> tuple[torch.Tensor, dict]:
    """TTT-Linear chunk forward with the fused Triton kernel; differentiable w.r.t. every tensor.

    Same contract and numbers as :func:`naive.forward` (``xq, xk, xv [B, H, T, f]``, ``lr [B, H, T]``,
    ``tau [K]``, ``params = {"W1": [B, H, f, f], "b1": [B, H, 1, f]}``, ``ln_weight, ln_bias [H, f]``).
    Inputs may be float32, float16 or bfloat16; the weights are kept in float32 on chip and the new
    weights are returned in the dtype of the given ones. ``checkpoint_every`` (G) is how many
    mini-batches share one stored weight checkpoint for the backward (memory ``T / (K G)`` weight
    copies per (batch, head); the backward recomputes at most G mini-batches per checkpoint).

    Returns:
        ``(out [B, H, T, f], {"W1": ..., "b1": ...})``.
    """
    checkpoint_every = CHECKS.check_forward(
        xq, xk, xv, lr, tau, params, ln_weight, ln_bias, checkpoint_every, eps
    )
    B, H, T, f = xq.shape
    out, W, b = _LinearChunk.apply(
        xq, xk, xv, lr, tau, params["W1"], params["b1"], ln_weight, ln_bias, float(eps), checkpoint_every
    )
    return out, {"W1": W, "b1": b}


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
    """One token per sequence with the pending-gradient state, Triton kernel (no autograd).

    Same contract and numbers as :func:`naive.decode`: ``xq, xk, xv [B, H, f]``, ``lr [B, H]``,
    ``tau_i`` a 0-d tensor, ``params`` the mini-batch's starting weights, ``pending`` the lr-weighted
    gradient sums so far (same keys/shapes). Returns ``(out [B, H, f], new_params, new_pending)``;
    when ``is_last`` the weights are committed and the sums reset to zero, otherwise ``new_params`` is
    ``params`` itself.
    """
    CHECKS.check_decode(xq, xk, xv, lr, tau_i, params, pending, ln_weight, ln_bias, eps)
    B, H, f = xq.shape
    dev = xq.device
    out = _empty((B, H, f), xq.dtype, dev)
    if is_last:
        new_params = {k: _empty(v.shape, v.dtype, dev) for k, v in params.items()}
    else:
        new_params = dict(params)
    new_pending = {k: _empty(v.shape, v.dtype, dev) for k, v in pending.items()}
    c = [t.contiguous() for t in (xq, xk, xv, lr, tau_i, params["W1"], params["b1"])]
    s = [pending["W1"].contiguous(), pending["b1"].contiguous()]
    with launch_device(xq):
        _kernels().linear_decode_kernel[(B * H,)](
            *c, *s, ln_weight.contiguous(), ln_bias.contiguous(),
            out, new_params["W1"], new_params["b1"], new_pending["W1"], new_pending["b1"],
            H, float(eps),
            F=f, IS_LAST=bool(is_last),
        )  # fmt: skip
    return out, new_params, new_pending
