"""Shared helpers for the kernel tests: random inputs and a primal-form oracle (the error metric is
:func:`innerloop.core.functional.relative_error`)."""

from __future__ import annotations

import torch

from innerloop.kernels.triton.common import gelu_tanh, head_view, layer_norm


def strided(t: torch.Tensor) -> torch.Tensor:
    """The same values with gaps between rows and a permuted memory layout (last dim contiguous), as
    the strided views of a projection that a layer hands to a kernel."""
    batch, heads, tokens, dim = t.shape
    storage = torch.zeros(tokens, batch, heads, dim + 3, dtype=t.dtype)
    storage[..., :dim] = t.permute(2, 0, 1, 3)
    return storage[..., :dim].permute(1, 2, 0, 3)


def make_inputs(B, H, T, f, K, model, dtype=torch.float32, seed=0, requires_grad=False):
    """Random chunk inputs at realistic scales (lr like base_lr * sigmoid / f)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    xq, xk, xv = rnd(B, H, T, f), rnd(B, H, T, f), rnd(B, H, T, f)
    lr = (torch.rand(B, H, T, generator=gen, dtype=torch.float64) / f).to(dtype)
    tau = 1.0 / torch.arange(1, K + 1, dtype=torch.float64) + 0.1 * torch.randn(
        K, generator=gen, dtype=torch.float64
    )
    tau = tau.clamp_min(0).to(dtype)
    ln_weight = (1.0 + 0.1 * rnd(H, f)).to(dtype)
    ln_bias = (0.1 * rnd(H, f)).to(dtype)
    if model == "linear":
        params = {"W1": rnd(B, H, f, f, scale=0.3), "b1": rnd(B, H, 1, f, scale=0.1)}
    else:
        params = {
            "W1": rnd(B, H, f, 4 * f, scale=f**-0.5),
            "b1": rnd(B, H, 1, 4 * f, scale=0.1),
            "W2": rnd(B, H, 4 * f, f, scale=(4 * f) ** -0.5),
            "b2": rnd(B, H, 1, f, scale=0.1),
        }
    tensors = [xq, xk, xv, lr, tau, *params.values(), ln_weight, ln_bias]
    if requires_grad:
        for t in tensors:
            t.requires_grad_(True)
    return xq, xk, xv, lr, tau, params, ln_weight, ln_bias


def inner_model(model: str):
    """``g(x, params)`` of the inner model without residual and LN, for ``x [..., f]``."""
    if model == "linear":
        return lambda x, p: x @ p["W1"] + p["b1"]
    return lambda x, p: gelu_tanh(x @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"]


def primal_forward(model, xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps=1e-6):
    """The primal form token by token, gradients by autograd: the oracle for the dual form.

    For token i of a mini-batch starting at weights W_b:
    W_i = W_b - tau_i * sum_{j<=i} lr_j * dloss_j/dW (at W_b), out_i = xq_i + LN(g(xq_i; W_i)).
    """
    g = inner_model(model)
    B, H, T, f = xq.shape
    K = tau.shape[0]
    gamma, beta = head_view(ln_weight), head_view(ln_bias)
    start = {k: v.detach().clone() for k, v in params.items()}
    outs = []
    for n in range(T // K):
        base = {k: v.detach().clone().requires_grad_(True) for k, v in start.items()}
        running = {k: torch.zeros_like(v) for k, v in start.items()}
        for i in range(K):
            t = n * K + i
            k_t, v_t, q_t = xk[:, :, t : t + 1], xv[:, :, t : t + 1], xq[:, :, t : t + 1]  # [B, H, 1, f]
            pred = layer_norm(g(k_t, base), gamma, beta, eps)
            loss = 0.5 * ((pred - (v_t - k_t)) ** 2).sum()  # the sum over (b, h) keeps grads separate
            grads = torch.autograd.grad(loss, list(base.values()))
            rate = lr[:, :, t, None, None]
            for key, grad in zip(base, grads, strict=True):
                running[key] = running[key] + rate * grad
            W_i = {key: base[key].detach() - tau[i] * running[key] for key in base}
            outs.append(q_t + layer_norm(g(q_t, W_i), gamma, beta, eps))
        start = W_i
    return torch.cat(outs, dim=2), start


def hoisted_tensors(hoisted) -> tuple[torch.Tensor, ...]:
    """The torch hoisting's outputs in the order ``CompiledHoist`` returns them."""
    return (hoisted.both1, hoisted.left1, hoisted.shift, hoisted.gamma_sq, hoisted.eta, hoisted.update_scale)
