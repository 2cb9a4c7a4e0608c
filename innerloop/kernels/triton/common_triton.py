"""Triton device helpers shared by the TTT-Linear and TTT-MLP kernels.

This module imports Triton at the top; it is only imported (lazily) by the ``_kernels`` modules.
Conventions: a mini-batch tile has ``BK`` rows (``K`` padded to a power of two >= 16 so ``tl.dot``
accepts it) of which the first ``K`` are real; padded rows load as 0 and are never stored. All math is
float32.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_rows(ptr, row0, rows, cols, K, F: tl.constexpr):
    """Load a ``[BK, F]`` tile of rows ``row0 + rows`` of a row-major ``[*, F]`` matrix as float32."""
    mask = (rows < K)[:, None]
    return tl.load(ptr + (row0 + rows)[:, None] * F + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def store_rows(ptr, value, row0, rows, cols, K, F: tl.constexpr):
    """Store the first ``K`` rows of a ``[BK, F]`` tile into rows ``row0 + rows`` of ``ptr``."""
    mask = (rows < K)[:, None]
    tl.store(ptr + (row0 + rows)[:, None] * F + cols[None, :], value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def load_matrix(ptr, R: tl.constexpr, C: tl.constexpr):
    """Load a full row-major ``[R, C]`` matrix as float32."""
    r = tl.arange(0, R)
    c = tl.arange(0, C)
    return tl.load(ptr + r[:, None] * C + c[None, :]).to(tl.float32)


@triton.jit
def store_matrix(ptr, value, R: tl.constexpr, C: tl.constexpr):
    """Store a full row-major ``[R, C]`` matrix (cast to the pointer's dtype)."""
    r = tl.arange(0, R)
    c = tl.arange(0, C)
    tl.store(ptr + r[:, None] * C + c[None, :], value.to(ptr.dtype.element_ty))


@triton.jit
def ln_normalize(x, F: tl.constexpr, eps):
    """Row-wise LayerNorm statistics of ``x [BK, F]``: returns ``(x_hat, rstd [BK])``.

    A row whose squares could overflow (largest |value| above 2**50, F <= 128) is normalised as a copy
    scaled down to that size (LayerNorm is scale-invariant; see overflow_safe_scale in
    core/functional.py); ``rstd`` is the row's own. Ordinary rows have scale 1 and are unchanged.
    """
    top = tl.max(tl.abs(x), axis=1)
    scale = tl.minimum(1125899906842624.0 / tl.maximum(top, 1.0), 1.0)  # 2**50 / top, at most 1 (no 0 / 0)
    xs = x * scale[:, None]
    mean = tl.sum(xs, axis=1) / F
    xc = xs - mean[:, None]
    var = tl.sum(xc * xc, axis=1) / F
    rstd_scaled = 1.0 / tl.sqrt(var + eps)
    return xc * rstd_scaled[:, None], rstd_scaled * scale


@triton.jit
def ln_l2_grad(z, target, gamma, beta, F: tl.constexpr, eps):
    """Closed-form gradient of ``1/2 ||LN(z) - target||^2`` w.r.t. ``z`` (rows of ``[BK, F]``).

    Returns ``(G, z_hat, rstd, grad_z_hat)``; the last three are what the backward needs.
    """
    z_hat, rstd = ln_normalize(z, F, eps)
    grad_z_hat = (gamma[None, :] * z_hat + beta[None, :] - target) * gamma[None, :]
    c1 = tl.sum(grad_z_hat, axis=1) / F
    c2 = tl.sum(grad_z_hat * z_hat, axis=1) / F
    G = (grad_z_hat - c1[:, None] - z_hat * c2[:, None]) * rstd[:, None]
    return G, z_hat, rstd, grad_z_hat


@triton.jit
def ln_l2_grad_backward(dG, G, z_hat, rstd, grad_z_hat, target, gamma, beta, F: tl.constexpr):
    """Adjoint of :func:`ln_l2_grad`: given ``dG`` returns ``(dz, dtarget, dgamma_rows, dbeta_rows)``.

    ``dgamma_rows`` / ``dbeta_rows`` are ``[F]`` sums over the tile's rows. Derivation in README.md.
    """
    # G = P / s with P = gh - mean(gh) - z_hat * mean(gh * z_hat), s = std
    dP = dG * rstd[:, None]
    ds = -tl.sum(dG * G, axis=1) * rstd  # explicit 1/s dependence
    m_dp = tl.sum(dP, axis=1) / F
    m_dpz = tl.sum(dP * z_hat, axis=1) / F
    c2 = tl.sum(grad_z_hat * z_hat, axis=1) / F
    d_gh = dP - m_dp[:, None] - z_hat * m_dpz[:, None]
    dz_hat = -dP * c2[:, None] - grad_z_hat * m_dpz[:, None]
    # gh = gamma * (gamma * z_hat + beta - target)
    dz_hat += d_gh * (gamma * gamma)[None, :]
    dgamma_rows = tl.sum(d_gh * (2.0 * gamma[None, :] * z_hat + beta[None, :] - target), axis=0)
    dbeta_rows = tl.sum(d_gh * gamma[None, :], axis=0)
    dtarget = -d_gh * gamma[None, :]
    # z_hat = (z - mean) / s, plus the explicit s above (ds/dz = z_hat / F)
    m_dzh = tl.sum(dz_hat, axis=1) / F
    m_dzhz = tl.sum(dz_hat * z_hat, axis=1) / F
    dz = (dz_hat - m_dzh[:, None] - z_hat * m_dzhz[:, None]) * rstd[:, None] + (ds / F)[:, None] * z_hat
    return dz, dtarget, dgamma_rows, dbeta_rows


@triton.jit
def ln_backward(dy, x_hat, rstd, gamma, F: tl.constexpr):
    """Adjoint of ``y = gamma * x_hat + beta`` w.r.t. the LayerNorm input, rows of ``[BK, F]``."""
    dxh = dy * gamma[None, :]
    m1 = tl.sum(dxh, axis=1) / F
    m2 = tl.sum(dxh * x_hat, axis=1) / F
    return (dxh - m1[:, None] - x_hat * m2[:, None]) * rstd[:, None]


@triton.jit
def eta_tile(lr_ptr, tau_ptr, t0, rows, K):
    """The mini-batch's learning rates: ``(E [BK, BK], e [BK], lr [BK], tau [BK], causal [BK, BK])``.

    ``E[i, j] = tau_i * lr_j`` for ``j <= i`` (0 elsewhere and on padded rows/columns), ``e = E[K-1, :]``
    without the mask (``tau_{K-1} * lr_j``).
    """
    ok = rows < K
    lr = tl.load(lr_ptr + t0 + rows, mask=ok, other=0.0).to(tl.float32)
    tau = tl.load(tau_ptr + rows, mask=ok, other=0.0).to(tl.float32)
    tau_last = tl.load(tau_ptr + K - 1).to(tl.float32)
    causal = rows[:, None] >= rows[None, :]
    E = tl.where(causal, tau[:, None] * lr[None, :], 0.0)
    return E, tau_last * lr, lr, tau, causal


@triton.jit
def clamp_keeping_nan(x, low, high):
    """``x`` limited to ``[low, high]``, a NaN kept NaN.

    ``tl.minimum``/``tl.maximum`` (and ``tl.clamp``) default to ``PropagateNan.NONE``: ``min(NaN, 100)``
    is 100 on a GPU and under the interpreter alike (``np.fmin``), which would turn a NaN into a finite
    number. Two ``tl.where`` on the comparisons (false for NaN) leave a NaN lane alone; on finite values
    and on +-inf they give exactly what the min/max pair gave.
    """
    return tl.where(x > high, high, tl.where(x < low, low, x))


@triton.jit
def tanh(x):
    """tanh via exp. The argument is clamped to [-20, 20] first: tanh(20) = 1 - 8.5e-18, which rounds to
    1 in float32 and float64 alike, so no value changes, and ``exp(2x)`` no longer overflows above
    x ~ 44 (harmless, 1 - 2/inf = 1, but numpy warned of it under the interpreter). A NaN still gives
    NaN (:func:`clamp_keeping_nan`)."""
    x = clamp_keeping_nan(x, -20.0, 20.0)
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def gelu_tanh(x):
    """``F.gelu(x, approximate="tanh")``."""
    return 0.5 * x * (1.0 + tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))


@triton.jit
def gelu_tanh_grad(x):
    """The reference's polynomial for d/dx gelu_tanh (truncated constants kept)."""
    x = clamp_keeping_nan(x, -100.0, 100.0)  # flat beyond; keeps x * x finite; NaN stays NaN
    t = tanh(0.79788456 * x * (1.0 + 0.044715 * x * x))
    return 0.5 * x * ((1.0 - t * t) * (0.79788456 + 0.1070322243 * x * x)) + 0.5 * (1.0 + t)


@triton.jit
def gelu_tanh_grad2(x):
    """d/dx of :func:`gelu_tanh_grad` (the exact derivative of that polynomial)."""
    x = clamp_keeping_nan(x, -100.0, 100.0)  # flat beyond; keeps x * x finite; NaN stays NaN
    t = tanh(0.79788456 * x * (1.0 + 0.044715 * x * x))
    sech2 = 1.0 - t * t
    du = 0.79788456 * (1.0 + 3.0 * 0.044715 * x * x)  # derivative of the tanh argument
    dt = sech2 * du
    a = 0.79788456 + 0.1070322243 * x * x
    return (
        0.5 * sech2 * a
        + 0.5 * x * (-2.0 * t * dt) * a
        + 0.5 * x * sech2 * (2.0 * 0.1070322243 * x)
        + 0.5 * dt
    )
