"""Host side of the Triton TTT-MLP kernels: argument checks, launches and the autograd Function.

``forward`` runs the fused chunk kernel (differentiable through a Triton backward, see README.md);
``decode`` runs the one-token kernel (inference only).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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

NAME = "triton_ttt_mlp"
_KERNELS_MODULE = "innerloop.kernels.triton.ttt_mlp._kernels"
MAX_HEAD_DIM = 64
DEFAULT_CHECKPOINT_EVERY = 8
KEYS = ("W1", "b1", "W2", "b2")

# Tests set this to fill every output buffer with NaN before a kernel writes it, so that memory a
# kernel forgot to write cannot pass for a result.
POISON_OUTPUTS = False


CHECKS = HostChecks(NAME, _KERNELS_MODULE, MAX_HEAD_DIM, param_shapes)
_kernels = CHECKS.kernels


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return empty_output(shape, dtype, device, POISON_OUTPUTS)


def _state_buffers(rows: int, f: int, dtypes: Sequence[torch.dtype], dev: torch.device) -> list[torch.Tensor]:
    """Buffers ``W1 [rows, f, 4f]``, ``b1 [rows, 4f]``, ``W2 [rows, 4f, f]``, ``b2 [rows, f]``."""
    shapes = ((rows, f, 4 * f), (rows, 4 * f), (rows, 4 * f, f), (rows, f))
    return [_empty(s, d, dev) for s, d in zip(shapes, dtypes, strict=True)]


class _MLPChunk(torch.autograd.Function):
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
        W2: torch.Tensor,
        b2: torch.Tensor,
        ln_weight: torch.Tensor,
        ln_bias: torch.Tensor,
        eps: float,
        checkpoint_every: int,
    ) -> tuple[torch.Tensor, ...]:
        B, H, T, f = xq.shape
        K = tau.shape[0]
        NB = T // K
        # a group longer than the chunk is the whole chunk: the backward's scratch holds one group's
        # weights, so it is sized by the group actually run, not by the argument (review s20)
        checkpoint_every = max(1, min(checkpoint_every, NB))
        n_ckpt = math.ceil(NB / checkpoint_every)
        dev = xq.device
        weights = (W1, b1, W2, b2)
        xq, xk, xv, lr, tau = (t.contiguous() for t in (xq, xk, xv, lr, tau))
        wc = [t.contiguous() for t in weights]
        lnw, lnb = ln_weight.contiguous(), ln_bias.contiguous()
        out = _empty((B, H, T, f), xq.dtype, dev)
        new = [_empty(w.shape, w.dtype, dev) for w in weights]
        # weights at the start of every checkpoint group, float32, [B * H * n_ckpt, ...]
        ckpt = _state_buffers(B * H * n_ckpt, f, [torch.float32] * 4, dev)
        with launch_device(xq):
            _kernels().mlp_forward_kernel[(B * H,)](
                xq, xk, xv, lr, tau, *wc, lnw, lnb,
                out, *new, *ckpt,
                H, T, K, NB, n_ckpt, eps,
                F=f, F4=4 * f, BK=block_rows(K), GROUP=checkpoint_every, PREC=dot_precision(xq.dtype),
                num_warps=4 if f <= 32 else 8,
            )  # fmt: skip
        ctx.save_for_backward(xq, xk, xv, lr, tau, lnw, lnb, *ckpt)
        ctx.meta = (eps, checkpoint_every, n_ckpt, [w.dtype for w in weights], ln_weight.dtype, ln_bias.dtype)
        return (out, *new)

    @staticmethod
    @differentiable_once(NAME)
    def backward(
        ctx: FunctionCtx, d_out: torch.Tensor | None, *d_new: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        xq, xk, xv, lr, tau, lnw, lnb, *ckpt = ctx.saved_tensors
        eps, group, n_ckpt, w_dtypes, lnw_dtype, lnb_dtype = ctx.meta
        B, H, T, f = xq.shape
        K = tau.shape[0]
        NB = T // K
        BK = block_rows(K)
        dev = xq.device
        f32 = torch.float32
        shapes = ((B, H, f, 4 * f), (B, H, 1, 4 * f), (B, H, 4 * f, f), (B, H, 1, f))
        d_out = torch.zeros_like(xq) if d_out is None else d_out.contiguous()
        d_new = [
            torch.zeros(s, dtype=f32, device=dev) if d is None else d.contiguous()
            for d, s in zip(d_new, shapes, strict=True)
        ]
        scratch = _state_buffers(B * H * group, f, [f32] * 4, dev)
        dxq, dxk, dxv = (_empty((B, H, T, f), f32, dev) for _ in range(3))
        dlr = _empty((B, H, T), f32, dev)
        dtau = _empty((B * H, BK), f32, dev)
        d_init = [_empty(s, f32, dev) for s in shapes]
        dlnw = _empty((B * H, f), f32, dev)
        dlnb = _empty((B * H, f), f32, dev)
        with launch_device(xq):
            _kernels().mlp_backward_kernel[(B * H,)](
                xq, xk, xv, lr, tau, lnw, lnb, *ckpt,
                d_out, *d_new, *scratch,
                dxq, dxk, dxv, dlr, dtau, *d_init, dlnw, dlnb,
                H, T, K, NB, n_ckpt, eps,
                F=f, F4=4 * f, BK=BK, GROUP=group, PREC=dot_precision(xq.dtype),
                num_warps=4 if f <= 32 else 8,
                num_stages=1,  # no software pipelining: shared memory of 156 KiB, not 392, at f = 64
            )  # fmt: skip
        return (
            dxq.to(xq.dtype),
            dxk.to(xk.dtype),
            dxv.to(xv.dtype),
            dlr.to(lr.dtype),
            dtau.sum(0)[:K].to(tau.dtype),
            *(d.to(dt) for d, dt in zip(d_init, w_dtypes, strict=True)),
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
    """TTT-MLP chunk forward with the fused Triton kernel; differentiable w.r.t. every tensor.

    Same contract and numbers as :func:`naive.forward` (``xq, xk, xv [B, H, T, f]``, ``lr [B, H, T]``,
    ``tau [K]``, params ``W1 [B, H, f, 4f]``, ``b1 [B, H, 1, 4f]``, ``W2 [B, H, 4f, f]``,
    ``b2 [B, H, 1, f]``, ``ln_weight, ln_bias [H, f]``). Inputs may be float32, float16 or bfloat16;
    the weights are kept in float32 on chip and returned in the dtype of the given ones.
    ``checkpoint_every`` (G): mini-batches per stored weight checkpoint for the backward.

    Returns:
        ``(out [B, H, T, f], {"W1", "b1", "W2", "b2"})``.
    """
    checkpoint_every = CHECKS.check_forward(
        xq, xk, xv, lr, tau, params, ln_weight, ln_bias, checkpoint_every, eps
    )
    B, H, T, f = xq.shape
    out, *new = _MLPChunk.apply(
        xq, xk, xv, lr, tau, *(params[k] for k in KEYS), ln_weight, ln_bias, float(eps), checkpoint_every
    )
    return out, dict(zip(KEYS, new, strict=True))


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
    new_params = {k: _empty(params[k].shape, params[k].dtype, dev) for k in KEYS} if is_last else dict(params)
    new_pending = {k: _empty(pending[k].shape, pending[k].dtype, dev) for k in KEYS}
    with launch_device(xq):
        _kernels().mlp_decode_kernel[(B * H,)](
            *(t.contiguous() for t in (xq, xk, xv, lr, tau_i)),
            *(params[k].contiguous() for k in KEYS), *(pending[k].contiguous() for k in KEYS),
            ln_weight.contiguous(), ln_bias.contiguous(),
            out, *(new_params[k] for k in KEYS), *(new_pending[k] for k in KEYS),
            H, float(eps),
            F=f, F4=4 * f, IS_LAST=bool(is_last),
        )  # fmt: skip
    return out, new_params, new_pending
