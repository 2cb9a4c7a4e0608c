"""Triton kernels of TTT-MLP. Imported lazily by ``fused.py`` (this module imports Triton).

One program per (batch, head); every tensor contiguous. ``F`` is the head dim, ``F4 = 4 F`` the hidden
width. Names follow README.md: Z1 = XK W1 + b1, X2 = gelu(Z1), Z2 = X2 W2 + b2, G2 / G1 the inner
gradients, E the masked eta matrix, M1 = E * (XQ XK^T + 1), M2 = E * (Xbar2 X2^T + 1).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..common_triton import (
    eta_tile,
    gelu_tanh,
    gelu_tanh_grad,
    gelu_tanh_grad2,
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
def _key_side(XK, XV, W1, b1, W2, b2, gamma, beta, eps, F: tl.constexpr, PREC: tl.constexpr):
    """Inner gradients of the mini-batch at its starting weights, and what their adjoint needs."""
    Z1 = tl.dot(XK, W1, input_precision=PREC) + b1[None, :]  # [BK, F4]
    X2 = gelu_tanh(Z1)
    Z2 = tl.dot(X2, W2, input_precision=PREC) + b2[None, :]  # [BK, F]
    G2, z2_hat, rstd2, gh2 = ln_l2_grad(Z2, XV - XK, gamma, beta, F, eps)
    Hm = tl.dot(G2, tl.trans(W2), input_precision=PREC)  # [BK, F4] = G2 W2^T
    G1 = Hm * gelu_tanh_grad(Z1)
    return Z1, X2, G2, z2_hat, rstd2, gh2, Hm, G1


@triton.jit
def _query_side(XQ, XK, X2, G1, G2, E, W1, b1, W2, b2, PREC: tl.constexpr):
    """The dual form's query side: ``(A1, M1, Zbar1, Xbar2, A2, M2, Zbar2)``."""
    A1 = tl.dot(XQ, tl.trans(XK), input_precision=PREC)  # [BK, BK]
    M1 = E * (A1 + 1.0)
    Zbar1 = tl.dot(XQ, W1, input_precision=PREC) + b1[None, :] - tl.dot(M1, G1, input_precision=PREC)
    Xbar2 = gelu_tanh(Zbar1)  # [BK, F4]
    A2 = tl.dot(Xbar2, tl.trans(X2), input_precision=PREC)  # [BK, BK]
    M2 = E * (A2 + 1.0)
    Zbar2 = tl.dot(Xbar2, W2, input_precision=PREC) + b2[None, :] - tl.dot(M2, G2, input_precision=PREC)
    return A1, M1, Zbar1, Xbar2, A2, M2, Zbar2


@triton.jit
def _update(W1, b1, W2, b2, XK, X2, G1, G2, e, PREC: tl.constexpr):
    """Weights after the mini-batch: ``W1 - (e XK)^T G1``, ``W2 - (e X2)^T G2``, biases likewise."""
    W1 = W1 - tl.dot(tl.trans(XK * e[:, None]), G1, input_precision=PREC)
    b1 = b1 - tl.sum(G1 * e[:, None], axis=0)
    W2 = W2 - tl.dot(tl.trans(X2 * e[:, None]), G2, input_precision=PREC)
    b2 = b2 - tl.sum(G2 * e[:, None], axis=0)
    return W1, b1, W2, b2


@triton.jit
def _store_state(w1_ptr, b1_ptr, w2_ptr, b2_ptr, W1, b1, W2, b2, F: tl.constexpr, F4: tl.constexpr):
    """Store the four weights of one (batch, head) at the given bases."""
    store_matrix(w1_ptr, W1, F, F4)
    tl.store(b1_ptr + tl.arange(0, F4), b1.to(b1_ptr.dtype.element_ty))
    store_matrix(w2_ptr, W2, F4, F)
    tl.store(b2_ptr + tl.arange(0, F), b2.to(b2_ptr.dtype.element_ty))


@triton.jit
def mlp_forward_kernel(
    xq_ptr, xk_ptr, xv_ptr, lr_ptr, tau_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, lnw_ptr, lnb_ptr,
    out_ptr, w1_out_ptr, b1_out_ptr, w2_out_ptr, b2_out_ptr,
    ck_w1_ptr, ck_b1_ptr, ck_w2_ptr, ck_b2_ptr,
    H, T, K, NB, NCKPT, eps,
    F: tl.constexpr, F4: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Chunked dual form over ``NB`` mini-batches, storing the weights every ``GROUP`` mini-batches."""
    pid = tl.program_id(0).to(tl.int64)  # int64: offsets such as pid * T * F pass 2**31 on large inputs
    h = pid % H
    rows = tl.arange(0, BK)
    cols = tl.arange(0, F)
    hcols = tl.arange(0, F4)
    x_base = pid * T * F
    gamma = tl.load(lnw_ptr + h * F + cols).to(tl.float32)
    beta = tl.load(lnb_ptr + h * F + cols).to(tl.float32)
    W1 = load_matrix(w1_ptr + pid * F * F4, F, F4)  # [F, F4] float32 on chip
    b1 = tl.load(b1_ptr + pid * F4 + hcols).to(tl.float32)
    W2 = load_matrix(w2_ptr + pid * F4 * F, F4, F)  # [F4, F]
    b2 = tl.load(b2_ptr + pid * F + cols).to(tl.float32)
    for n in range(0, NB):
        if n % GROUP == 0:
            c = pid * NCKPT + n // GROUP
            _store_state(
                ck_w1_ptr + c * F * F4, ck_b1_ptr + c * F4, ck_w2_ptr + c * F4 * F, ck_b2_ptr + c * F,
                W1, b1, W2, b2, F, F4,
            )  # fmt: skip
        XQ = load_rows(xq_ptr + x_base, n * K, rows, cols, K, F)
        XK = load_rows(xk_ptr + x_base, n * K, rows, cols, K, F)
        XV = load_rows(xv_ptr + x_base, n * K, rows, cols, K, F)
        E, e, lr, tau, causal = eta_tile(lr_ptr + pid * T, tau_ptr, n * K, rows, K)
        Z1, X2, G2, z2_hat, rstd2, gh2, Hm, G1 = _key_side(XK, XV, W1, b1, W2, b2, gamma, beta, eps, F, PREC)
        A1, M1, Zbar1, Xbar2, A2, M2, Zbar2 = _query_side(XQ, XK, X2, G1, G2, E, W1, b1, W2, b2, PREC)
        zbar_hat, rstd_bar = ln_normalize(Zbar2, F, eps)
        out = XQ + gamma[None, :] * zbar_hat + beta[None, :]
        store_rows(out_ptr + x_base, out, n * K, rows, cols, K, F)
        W1, b1, W2, b2 = _update(W1, b1, W2, b2, XK, X2, G1, G2, e, PREC)
    _store_state(
        w1_out_ptr + pid * F * F4, b1_out_ptr + pid * F4, w2_out_ptr + pid * F4 * F, b2_out_ptr + pid * F,
        W1, b1, W2, b2, F, F4,
    )  # fmt: skip


@triton.jit
def mlp_backward_kernel(
    xq_ptr, xk_ptr, xv_ptr, lr_ptr, tau_ptr, lnw_ptr, lnb_ptr,
    ck_w1_ptr, ck_b1_ptr, ck_w2_ptr, ck_b2_ptr,
    dout_ptr, dw1_last_ptr, db1_last_ptr, dw2_last_ptr, db2_last_ptr,
    s_w1_ptr, s_b1_ptr, s_w2_ptr, s_b2_ptr,
    dxq_ptr, dxk_ptr, dxv_ptr, dlr_ptr, dtau_ptr, dw1_ptr, db1_ptr, dw2_ptr, db2_ptr, dlnw_ptr, dlnb_ptr,
    H, T, K, NB, NCKPT, eps,
    F: tl.constexpr, F4: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Reverse sweep, as the TTT-Linear backward: per checkpoint group (last first) recompute the
    starting weights of its mini-batches into scratch, then apply the adjoint equations of README.md
    from the group's last mini-batch to its first."""
    pid = tl.program_id(0).to(tl.int64)  # int64: offsets such as pid * T * F pass 2**31 on large inputs
    h = pid % H
    rows = tl.arange(0, BK)
    cols = tl.arange(0, F)
    hcols = tl.arange(0, F4)
    x_base = pid * T * F
    gamma = tl.load(lnw_ptr + h * F + cols).to(tl.float32)
    beta = tl.load(lnb_ptr + h * F + cols).to(tl.float32)
    # adjoints of the weights after the current mini-batch
    dW1 = load_matrix(dw1_last_ptr + pid * F * F4, F, F4)
    db1 = tl.load(db1_last_ptr + pid * F4 + hcols).to(tl.float32)
    dW2 = load_matrix(dw2_last_ptr + pid * F4 * F, F4, F)
    db2 = tl.load(db2_last_ptr + pid * F + cols).to(tl.float32)
    dgamma = tl.zeros([F], dtype=tl.float32)
    dbeta = tl.zeros([F], dtype=tl.float32)
    dtau = tl.zeros([BK], dtype=tl.float32)
    tau_last = tl.load(tau_ptr + K - 1).to(tl.float32)
    for ci in range(0, NCKPT):
        c = NCKPT - 1 - ci
        n0 = c * GROUP
        count = tl.minimum(GROUP, NB - n0)
        ck = pid * NCKPT + c
        W1 = load_matrix(ck_w1_ptr + ck * F * F4, F, F4)
        b1 = tl.load(ck_b1_ptr + ck * F4 + hcols)
        W2 = load_matrix(ck_w2_ptr + ck * F4 * F, F4, F)
        b2 = tl.load(ck_b2_ptr + ck * F + cols)
        tl.debug_barrier()  # the previous group's reads of scratch are done
        # 1) recompute the weights at the start of each mini-batch of the group
        for s in range(0, count):
            n = n0 + s
            sc = pid * GROUP + s
            _store_state(
                s_w1_ptr + sc * F * F4, s_b1_ptr + sc * F4, s_w2_ptr + sc * F4 * F, s_b2_ptr + sc * F,
                W1, b1, W2, b2, F, F4,
            )  # fmt: skip
            XK = load_rows(xk_ptr + x_base, n * K, rows, cols, K, F)
            XV = load_rows(xv_ptr + x_base, n * K, rows, cols, K, F)
            E, e, lr, tau, causal = eta_tile(lr_ptr + pid * T, tau_ptr, n * K, rows, K)
            Z1, X2, G2, z2_hat, rstd2, gh2, Hm, G1 = _key_side(
                XK, XV, W1, b1, W2, b2, gamma, beta, eps, F, PREC
            )
            W1, b1, W2, b2 = _update(W1, b1, W2, b2, XK, X2, G1, G2, e, PREC)
        tl.debug_barrier()  # scratch is written before it is read back
        # 2) walk the group's mini-batches backwards
        for si in range(0, count):
            s = count - 1 - si
            n = n0 + s
            sc = pid * GROUP + s
            W1 = load_matrix(s_w1_ptr + sc * F * F4, F, F4)
            b1 = tl.load(s_b1_ptr + sc * F4 + hcols)
            W2 = load_matrix(s_w2_ptr + sc * F4 * F, F4, F)
            b2 = tl.load(s_b2_ptr + sc * F + cols)
            XQ = load_rows(xq_ptr + x_base, n * K, rows, cols, K, F)
            XK = load_rows(xk_ptr + x_base, n * K, rows, cols, K, F)
            XV = load_rows(xv_ptr + x_base, n * K, rows, cols, K, F)
            dO = load_rows(dout_ptr + x_base, n * K, rows, cols, K, F)
            E, e, lr, tau, causal = eta_tile(lr_ptr + pid * T, tau_ptr, n * K, rows, K)
            target = XV - XK
            # recompute the mini-batch
            Z1, X2, G2, z2_hat, rstd2, gh2, Hm, G1 = _key_side(
                XK, XV, W1, b1, W2, b2, gamma, beta, eps, F, PREC
            )
            A1, M1, Zbar1, Xbar2, A2, M2, Zbar2 = _query_side(XQ, XK, X2, G1, G2, E, W1, b1, W2, b2, PREC)
            zbar_hat, rstd_bar = ln_normalize(Zbar2, F, eps)
            # out = XQ + gamma * zbar_hat + beta
            dgamma += tl.sum(dO * zbar_hat, axis=0)
            dbeta += tl.sum(dO, axis=0)
            dZbar2 = ln_backward(dO, zbar_hat, rstd_bar, gamma, F)
            # Zbar2 = Xbar2 W2 + b2 - M2 G2
            dM2 = -tl.dot(dZbar2, tl.trans(G2), input_precision=PREC)
            dA2 = dM2 * E
            dE = tl.where(causal, dM2 * (A2 + 1.0), 0.0)
            dG2 = -tl.dot(tl.trans(M2), dZbar2, input_precision=PREC)
            dXbar2 = tl.dot(dZbar2, tl.trans(W2), input_precision=PREC) + tl.dot(
                dA2, X2, input_precision=PREC
            )
            dX2 = tl.dot(tl.trans(dA2), Xbar2, input_precision=PREC)  # [BK, F4]
            # Xbar2 = gelu(Zbar1); Zbar1 = XQ W1 + b1 - M1 G1
            dZbar1 = dXbar2 * gelu_tanh_grad(Zbar1)
            dM1 = -tl.dot(dZbar1, tl.trans(G1), input_precision=PREC)
            dA1 = dM1 * E
            dE += tl.where(causal, dM1 * (A1 + 1.0), 0.0)
            dG1 = -tl.dot(tl.trans(M1), dZbar1, input_precision=PREC)
            dXQ = (
                dO
                + tl.dot(dZbar1, tl.trans(W1), input_precision=PREC)
                + tl.dot(dA1, XK, input_precision=PREC)
            )
            dXK = tl.dot(tl.trans(dA1), XQ, input_precision=PREC)
            # the weight updates; (dW1, db1, dW2, db2) are the adjoints of the updated weights
            XKdW1 = tl.dot(XK, dW1, input_precision=PREC) + db1[None, :]  # [BK, F4]
            dXK -= e[:, None] * tl.dot(G1, tl.trans(dW1), input_precision=PREC)
            dG1 -= e[:, None] * XKdW1
            de = -tl.sum(XKdW1 * G1, axis=1)
            X2dW2 = tl.dot(X2, dW2, input_precision=PREC) + db2[None, :]  # [BK, F]
            dX2 -= e[:, None] * tl.dot(G2, tl.trans(dW2), input_precision=PREC)
            dG2 -= e[:, None] * X2dW2
            de -= tl.sum(X2dW2 * G2, axis=1)
            # E[i, j] = tau_i lr_j (j <= i), e_j = tau_{K-1} lr_j
            dlr = tl.sum(dE * tau[:, None], axis=0) + de * tau_last
            dtau += tl.sum(dE * lr[None, :], axis=1) + tl.where(rows == K - 1, tl.sum(de * lr, axis=0), 0.0)
            tl.store(dlr_ptr + pid * T + n * K + rows, dlr, mask=rows < K)
            # G1 = Hm * gelu'(Z1), Hm = G2 W2^T
            gp1 = gelu_tanh_grad(Z1)
            dHm = dG1 * gp1
            dZ1 = dG1 * Hm * gelu_tanh_grad2(Z1)
            dG2 += tl.dot(dHm, W2, input_precision=PREC)
            # G2 = ln_l2_grad(Z2, XV - XK)
            dZ2, dtarget, dg_rows, db_rows = ln_l2_grad_backward(
                dG2, G2, z2_hat, rstd2, gh2, target, gamma, beta, F
            )
            dgamma += dg_rows
            dbeta += db_rows
            # Z2 = X2 W2 + b2, X2 = gelu(Z1), Z1 = XK W1 + b1
            dX2 += tl.dot(dZ2, tl.trans(W2), input_precision=PREC)
            dZ1 += dX2 * gp1
            dXK += tl.dot(dZ1, tl.trans(W1), input_precision=PREC) - dtarget
            store_rows(dxq_ptr + x_base, dXQ, n * K, rows, cols, K, F)
            store_rows(dxk_ptr + x_base, dXK, n * K, rows, cols, K, F)
            store_rows(dxv_ptr + x_base, dtarget, n * K, rows, cols, K, F)
            # adjoints of the weights at the start of this mini-batch
            dW1 += tl.dot(tl.trans(XQ), dZbar1, input_precision=PREC) + tl.dot(
                tl.trans(XK), dZ1, input_precision=PREC
            )
            db1 += tl.sum(dZbar1, axis=0) + tl.sum(dZ1, axis=0)
            dW2 += (
                tl.dot(tl.trans(Xbar2), dZbar2, input_precision=PREC)
                + tl.dot(tl.trans(dHm), G2, input_precision=PREC)
                + tl.dot(tl.trans(X2), dZ2, input_precision=PREC)
            )
            db2 += tl.sum(dZbar2, axis=0) + tl.sum(dZ2, axis=0)
    _store_state(
        dw1_ptr + pid * F * F4, db1_ptr + pid * F4, dw2_ptr + pid * F4 * F, db2_ptr + pid * F,
        dW1, db1, dW2, db2, F, F4,
    )  # fmt: skip
    tl.store(dlnw_ptr + pid * F + cols, dgamma)
    tl.store(dlnb_ptr + pid * F + cols, dbeta)
    tl.store(dtau_ptr + pid * BK + rows, dtau)


@triton.jit
def mlp_decode_kernel(
    xq_ptr, xk_ptr, xv_ptr, lr_ptr, tau_ptr,
    w1_ptr, b1_ptr, w2_ptr, b2_ptr, sw1_ptr, sb1_ptr, sw2_ptr, sb2_ptr, lnw_ptr, lnb_ptr,
    out_ptr, w1_out_ptr, b1_out_ptr, w2_out_ptr, b2_out_ptr, sw1_out_ptr, sb1_out_ptr, sw2_out_ptr, sb2_out_ptr,
    H, eps,
    F: tl.constexpr, F4: tl.constexpr, IS_LAST: tl.constexpr,
):  # fmt: skip
    """One token per (batch, head) with the pending-gradient sums ``S`` (see README.md).

    Vectors are ``[1, n]`` tiles; vector-matrix products are broadcast-and-sum (no ``tl.dot`` for 1 row).
    """
    pid = tl.program_id(0).to(tl.int64)  # int64: offsets such as pid * T * F pass 2**31 on large inputs
    h = pid % H
    cols = tl.arange(0, F)
    hcols = tl.arange(0, F4)
    tile = tl.arange(0, 1)[:, None] * F + cols[None, :]  # offsets of a [1, F] tile
    gamma = tl.load(lnw_ptr + h * F + cols).to(tl.float32)
    beta = tl.load(lnb_ptr + h * F + cols).to(tl.float32)
    xq = tl.load(xq_ptr + pid * F + tile).to(tl.float32)  # [1, F]
    xk = tl.load(xk_ptr + pid * F + tile).to(tl.float32)
    xv = tl.load(xv_ptr + pid * F + tile).to(tl.float32)
    lr = tl.load(lr_ptr + pid).to(tl.float32)
    tau = tl.load(tau_ptr).to(tl.float32)
    W1 = load_matrix(w1_ptr + pid * F * F4, F, F4)
    b1 = tl.load(b1_ptr + pid * F4 + hcols).to(tl.float32)
    W2 = load_matrix(w2_ptr + pid * F4 * F, F4, F)
    b2 = tl.load(b2_ptr + pid * F + cols).to(tl.float32)
    SW1 = load_matrix(sw1_ptr + pid * F * F4, F, F4)
    Sb1 = tl.load(sb1_ptr + pid * F4 + hcols).to(tl.float32)
    SW2 = load_matrix(sw2_ptr + pid * F4 * F, F4, F)
    Sb2 = tl.load(sb2_ptr + pid * F + cols).to(tl.float32)
    # the token's gradients at the mini-batch start weights
    z1 = tl.sum(tl.trans(xk) * W1, axis=0)[None, :] + b1[None, :]  # [1, F4]
    x2 = gelu_tanh(z1)
    z2 = tl.sum(tl.trans(x2) * W2, axis=0)[None, :] + b2[None, :]  # [1, F]
    g2, z2_hat, rstd2, gh2 = ln_l2_grad(z2, xv - xk, gamma, beta, F, eps)
    g1 = tl.sum(W2 * g2, axis=1)[None, :] * gelu_tanh_grad(z1)  # [1, F4] = (g2 W2^T) * gelu'(z1)
    SW1 += lr * tl.trans(xk) * g1  # outer products
    Sb1 += lr * tl.sum(g1, axis=0)
    SW2 += lr * tl.trans(x2) * g2
    Sb2 += lr * tl.sum(g2, axis=0)
    W1 = W1 - tau * SW1
    b1 = b1 - tau * Sb1
    W2 = W2 - tau * SW2
    b2 = b2 - tau * Sb2
    hq = gelu_tanh(tl.sum(tl.trans(xq) * W1, axis=0)[None, :] + b1[None, :])  # [1, F4]
    zq = tl.sum(tl.trans(hq) * W2, axis=0)[None, :] + b2[None, :]
    zq_hat, rstd_q = ln_normalize(zq, F, eps)
    out = xq + gamma[None, :] * zq_hat + beta[None, :]
    tl.store(out_ptr + pid * F + tile, out.to(out_ptr.dtype.element_ty))
    if IS_LAST:
        _store_state(
            w1_out_ptr + pid * F * F4, b1_out_ptr + pid * F4, w2_out_ptr + pid * F4 * F, b2_out_ptr + pid * F,
            W1, b1, W2, b2, F, F4,
        )  # fmt: skip
        _store_state(
            sw1_out_ptr + pid * F * F4, sb1_out_ptr + pid * F4, sw2_out_ptr + pid * F4 * F, sb2_out_ptr + pid * F,
            tl.zeros([F, F4], dtype=tl.float32), tl.zeros([F4], dtype=tl.float32),
            tl.zeros([F4, F], dtype=tl.float32), tl.zeros([F], dtype=tl.float32), F, F4,
        )  # fmt: skip
    else:
        _store_state(
            sw1_out_ptr + pid * F * F4, sb1_out_ptr + pid * F4, sw2_out_ptr + pid * F4 * F, sb2_out_ptr + pid * F,
            SW1, Sb1, SW2, Sb2, F, F4,
        )  # fmt: skip


# whether these kernels were built for Triton's CPU interpreter (decided when this module was imported)
INTERPRETED = not isinstance(mlp_forward_kernel, triton.runtime.JITFunction)
