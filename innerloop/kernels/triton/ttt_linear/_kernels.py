"""Triton kernels of TTT-Linear. Imported lazily by ``fused.py`` (this module imports Triton).

One program per (batch, head). Every tensor is contiguous; a program's slice of ``[B, H, T, f]`` starts
at ``pid * T * F``. Names follow README.md: Z = XK W + b, G its inner gradient, E the masked eta
matrix, M = E * (XQ XK^T + 1), Zbar = XQ W + b - M G.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..common_triton import (
    eta_tile,
    ln_backward,
    ln_l2_grad,
    ln_l2_grad_backward,
    ln_normalize,
    load_matrix,
    load_rows,
    store_matrix,
    store_rows,
)


@triton.jit
def _update(W, b, XK, G, e, PREC: tl.constexpr):
    """Weights after the mini-batch: ``W - (e * XK)^T G``, ``b - sum_j e_j G_j``."""
    W = W - tl.dot(tl.trans(XK * e[:, None]), G, input_precision=PREC)
    b = b - tl.sum(G * e[:, None], axis=0)
    return W, b


@triton.jit
def linear_forward_kernel(
    xq_ptr, xk_ptr, xv_ptr, lr_ptr, tau_ptr, w_ptr, b_ptr, lnw_ptr, lnb_ptr,
    out_ptr, w_out_ptr, b_out_ptr, ckpt_w_ptr, ckpt_b_ptr,
    H, T, K, NB, NCKPT, eps,
    F: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Chunked dual form over ``NB`` mini-batches, storing the weights every ``GROUP`` mini-batches."""
    pid = tl.program_id(0).to(tl.int64)  # int64: offsets such as pid * T * F pass 2**31 on large inputs
    h = pid % H
    rows = tl.arange(0, BK)
    cols = tl.arange(0, F)
    x_base = pid * T * F
    gamma = tl.load(lnw_ptr + h * F + cols).to(tl.float32)
    beta = tl.load(lnb_ptr + h * F + cols).to(tl.float32)
    W = load_matrix(w_ptr + pid * F * F, F, F)  # [F, F] float32, lives on chip
    b = tl.load(b_ptr + pid * F + cols).to(tl.float32)  # [F]
    for n in range(0, NB):
        if n % GROUP == 0:
            c = n // GROUP
            store_matrix(ckpt_w_ptr + (pid * NCKPT + c) * F * F, W, F, F)
            tl.store(ckpt_b_ptr + (pid * NCKPT + c) * F + cols, b)
        XQ = load_rows(xq_ptr + x_base, n * K, rows, cols, K, F)
        XK = load_rows(xk_ptr + x_base, n * K, rows, cols, K, F)
        XV = load_rows(xv_ptr + x_base, n * K, rows, cols, K, F)
        E, e, lr, tau, causal = eta_tile(lr_ptr + pid * T, tau_ptr, n * K, rows, K)
        Z = tl.dot(XK, W, input_precision=PREC) + b[None, :]
        G, z_hat, rstd, gh = ln_l2_grad(Z, XV - XK, gamma, beta, F, eps)
        M = E * (tl.dot(XQ, tl.trans(XK), input_precision=PREC) + 1.0)  # [BK, BK]
        Zbar = tl.dot(XQ, W, input_precision=PREC) + b[None, :] - tl.dot(M, G, input_precision=PREC)
        zbar_hat, rstd_bar = ln_normalize(Zbar, F, eps)
        out = XQ + gamma[None, :] * zbar_hat + beta[None, :]
        store_rows(out_ptr + x_base, out, n * K, rows, cols, K, F)
        W, b = _update(W, b, XK, G, e, PREC)
    store_matrix(w_out_ptr + pid * F * F, W, F, F)
    tl.store(b_out_ptr + pid * F + cols, b.to(b_out_ptr.dtype.element_ty))


@triton.jit
def linear_backward_kernel(
    xq_ptr, xk_ptr, xv_ptr, lr_ptr, tau_ptr, lnw_ptr, lnb_ptr, ckpt_w_ptr, ckpt_b_ptr,
    dout_ptr, dw_last_ptr, db_last_ptr, scratch_w_ptr, scratch_b_ptr,
    dxq_ptr, dxk_ptr, dxv_ptr, dlr_ptr, dtau_ptr, dw0_ptr, db0_ptr, dlnw_ptr, dlnb_ptr,
    H, T, K, NB, NCKPT, eps,
    F: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Reverse sweep: per checkpoint group (last first), recompute the group's starting weights into
    ``scratch``, then walk its mini-batches backwards applying the adjoint equations of README.md.

    Writes per-token grads (dxq, dxk, dxv, dlr), the grads of the initial weights, and per-program
    partial sums of dtau ``[BK]`` and of the LayerNorm weight/bias ``[F]`` (reduced in torch).
    """
    pid = tl.program_id(0).to(tl.int64)  # int64: offsets such as pid * T * F pass 2**31 on large inputs
    h = pid % H
    rows = tl.arange(0, BK)
    cols = tl.arange(0, F)
    x_base = pid * T * F
    gamma = tl.load(lnw_ptr + h * F + cols).to(tl.float32)
    beta = tl.load(lnb_ptr + h * F + cols).to(tl.float32)
    # adjoints of the weights after the current mini-batch, starting from the chunk's final weights
    dW = load_matrix(dw_last_ptr + pid * F * F, F, F)
    db = tl.load(db_last_ptr + pid * F + cols).to(tl.float32)
    dgamma = tl.zeros([F], dtype=tl.float32)
    dbeta = tl.zeros([F], dtype=tl.float32)
    dtau = tl.zeros([BK], dtype=tl.float32)
    sw_base = scratch_w_ptr + pid * GROUP * F * F
    sb_base = scratch_b_ptr + pid * GROUP * F
    for ci in range(0, NCKPT):
        c = NCKPT - 1 - ci
        n0 = c * GROUP
        count = tl.minimum(GROUP, NB - n0)
        # 1) recompute the weights at the start of each mini-batch of the group
        W = load_matrix(ckpt_w_ptr + (pid * NCKPT + c) * F * F, F, F)
        b = tl.load(ckpt_b_ptr + (pid * NCKPT + c) * F + cols)
        tl.debug_barrier()  # the previous group's reads of scratch are done
        for s in range(0, count):
            n = n0 + s
            store_matrix(sw_base + s * F * F, W, F, F)
            tl.store(sb_base + s * F + cols, b)
            XK = load_rows(xk_ptr + x_base, n * K, rows, cols, K, F)
            XV = load_rows(xv_ptr + x_base, n * K, rows, cols, K, F)
            E, e, lr, tau, causal = eta_tile(lr_ptr + pid * T, tau_ptr, n * K, rows, K)
            Z = tl.dot(XK, W, input_precision=PREC) + b[None, :]
            G, z_hat, rstd, gh = ln_l2_grad(Z, XV - XK, gamma, beta, F, eps)
            W, b = _update(W, b, XK, G, e, PREC)
        tl.debug_barrier()  # scratch is written before it is read back
        # 2) walk the group's mini-batches backwards
        for si in range(0, count):
            s = count - 1 - si
            n = n0 + s
            W = load_matrix(sw_base + s * F * F, F, F)
            b = tl.load(sb_base + s * F + cols)
            XQ = load_rows(xq_ptr + x_base, n * K, rows, cols, K, F)
            XK = load_rows(xk_ptr + x_base, n * K, rows, cols, K, F)
            XV = load_rows(xv_ptr + x_base, n * K, rows, cols, K, F)
            dO = load_rows(dout_ptr + x_base, n * K, rows, cols, K, F)
            E, e, lr, tau, causal = eta_tile(lr_ptr + pid * T, tau_ptr, n * K, rows, K)
            target = XV - XK
            # recompute the mini-batch
            Z = tl.dot(XK, W, input_precision=PREC) + b[None, :]
            G, z_hat, rstd, gh = ln_l2_grad(Z, target, gamma, beta, F, eps)
            A = tl.dot(XQ, tl.trans(XK), input_precision=PREC)  # [BK, BK]
            M = E * (A + 1.0)
            Zbar = tl.dot(XQ, W, input_precision=PREC) + b[None, :] - tl.dot(M, G, input_precision=PREC)
            zbar_hat, rstd_bar = ln_normalize(Zbar, F, eps)
            # out = XQ + gamma * zbar_hat + beta
            dgamma += tl.sum(dO * zbar_hat, axis=0)
            dbeta += tl.sum(dO, axis=0)
            dZbar = ln_backward(dO, zbar_hat, rstd_bar, gamma, F)
            # Zbar = XQ W + b - M G
            dM = -tl.dot(dZbar, tl.trans(G), input_precision=PREC)
            dA = dM * E
            dE = tl.where(causal, dM * (A + 1.0), 0.0)
            dG = -tl.dot(tl.trans(M), dZbar, input_precision=PREC)
            dXQ = dO + tl.dot(dZbar, tl.trans(W), input_precision=PREC) + tl.dot(dA, XK, input_precision=PREC)
            dXK = tl.dot(tl.trans(dA), XQ, input_precision=PREC)
            # W_next = W - (e * XK)^T G, b_next = b - e^T G; (dW, db) are their adjoints
            XKdW = tl.dot(XK, dW, input_precision=PREC)  # [BK, F]
            dXK -= e[:, None] * tl.dot(G, tl.trans(dW), input_precision=PREC)
            dG -= e[:, None] * (XKdW + db[None, :])
            de = -tl.sum((XKdW + db[None, :]) * G, axis=1)
            # E[i, j] = tau_i lr_j (j <= i), e_j = tau_{K-1} lr_j
            dlr = tl.sum(dE * tau[:, None], axis=0) + de * tl.load(tau_ptr + K - 1).to(tl.float32)
            dtau += tl.sum(dE * lr[None, :], axis=1) + tl.where(rows == K - 1, tl.sum(de * lr, axis=0), 0.0)
            tl.store(dlr_ptr + pid * T + n * K + rows, dlr, mask=rows < K)
            # G = ln_l2_grad(Z, XV - XK)
            dZ, dtarget, dg_rows, db_rows = ln_l2_grad_backward(
                dG, G, z_hat, rstd, gh, target, gamma, beta, F
            )
            dgamma += dg_rows
            dbeta += db_rows
            dXK += tl.dot(dZ, tl.trans(W), input_precision=PREC) - dtarget
            store_rows(dxq_ptr + x_base, dXQ, n * K, rows, cols, K, F)
            store_rows(dxk_ptr + x_base, dXK, n * K, rows, cols, K, F)
            store_rows(dxv_ptr + x_base, dtarget, n * K, rows, cols, K, F)
            # adjoints of the weights at the start of this mini-batch
            dW += tl.dot(tl.trans(XQ), dZbar, input_precision=PREC) + tl.dot(
                tl.trans(XK), dZ, input_precision=PREC
            )
            db += tl.sum(dZbar, axis=0) + tl.sum(dZ, axis=0)
    store_matrix(dw0_ptr + pid * F * F, dW, F, F)
    tl.store(db0_ptr + pid * F + cols, db)
    tl.store(dlnw_ptr + pid * F + cols, dgamma)
    tl.store(dlnb_ptr + pid * F + cols, dbeta)
    tl.store(dtau_ptr + pid * BK + rows, dtau)


@triton.jit
def linear_decode_kernel(
    xq_ptr, xk_ptr, xv_ptr, lr_ptr, tau_ptr, w_ptr, b_ptr, sw_ptr, sb_ptr, lnw_ptr, lnb_ptr,
    out_ptr, w_out_ptr, b_out_ptr, sw_out_ptr, sb_out_ptr,
    H, eps,
    F: tl.constexpr, IS_LAST: tl.constexpr,
):  # fmt: skip
    """One token per (batch, head) with the pending-gradient sums ``S`` (see README.md).

    Vectors are handled as ``[1, F]`` tiles so the LayerNorm helpers apply unchanged.
    """
    pid = tl.program_id(0).to(tl.int64)  # int64: offsets such as pid * T * F pass 2**31 on large inputs
    h = pid % H
    cols = tl.arange(0, F)
    r1 = tl.arange(0, 1)
    gamma = tl.load(lnw_ptr + h * F + cols).to(tl.float32)
    beta = tl.load(lnb_ptr + h * F + cols).to(tl.float32)
    xq = tl.load(xq_ptr + pid * F + r1[:, None] * F + cols[None, :]).to(tl.float32)  # [1, F]
    xk = tl.load(xk_ptr + pid * F + r1[:, None] * F + cols[None, :]).to(tl.float32)
    xv = tl.load(xv_ptr + pid * F + r1[:, None] * F + cols[None, :]).to(tl.float32)
    lr = tl.load(lr_ptr + pid).to(tl.float32)
    tau = tl.load(tau_ptr).to(tl.float32)
    W = load_matrix(w_ptr + pid * F * F, F, F)
    b = tl.load(b_ptr + pid * F + cols).to(tl.float32)
    SW = load_matrix(sw_ptr + pid * F * F, F, F)
    Sb = tl.load(sb_ptr + pid * F + cols).to(tl.float32)
    # the token's gradient at the mini-batch start weights
    z = tl.sum(tl.trans(xk) * W, axis=0)[None, :] + b[None, :]  # [1, F]
    g, z_hat, rstd, gh = ln_l2_grad(z, xv - xk, gamma, beta, F, eps)
    SW += lr * tl.trans(xk) * g  # outer product [F, 1] * [1, F]
    Sb += lr * tl.sum(g, axis=0)
    W_now = W - tau * SW
    b_now = b - tau * Sb
    zq = tl.sum(tl.trans(xq) * W_now, axis=0)[None, :] + b_now[None, :]
    zq_hat, rstd_q = ln_normalize(zq, F, eps)
    out = xq + gamma[None, :] * zq_hat + beta[None, :]
    tl.store(out_ptr + pid * F + r1[:, None] * F + cols[None, :], out.to(out_ptr.dtype.element_ty))
    if IS_LAST:
        store_matrix(w_out_ptr + pid * F * F, W_now, F, F)
        tl.store(b_out_ptr + pid * F + cols, b_now.to(b_out_ptr.dtype.element_ty))
        store_matrix(sw_out_ptr + pid * F * F, tl.zeros([F, F], dtype=tl.float32), F, F)
        tl.store(sb_out_ptr + pid * F + cols, tl.zeros([F], dtype=tl.float32).to(sb_out_ptr.dtype.element_ty))
    else:
        store_matrix(sw_out_ptr + pid * F * F, SW, F, F)
        tl.store(sb_out_ptr + pid * F + cols, Sb.to(sb_out_ptr.dtype.element_ty))


# whether these kernels were built for Triton's CPU interpreter (decided when this module was imported)
INTERPRETED = not isinstance(linear_forward_kernel, triton.runtime.JITFunction)
