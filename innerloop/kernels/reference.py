"""The pure-torch reference every dual-form fast path must equal: whole mini-batches, and segments.

For a stack model (affine maps and elementwise functions) the output of token ``i`` of a mini-batch
needs ``x_i @ W_i`` with ``W_i = W_b - tau_i * sum_{j <= i} lr_j * X_j^T G_j``, which is
``x_i @ W_b - sum_{j <= i} tau_i lr_j (x_i . X_j) G_j``: a causal attention-like product instead
of a weight matrix per token, applied layer by layer (the derivation is in ``kernels/README.md``).

``dual_aligned_block`` is what the fast paths (``fused_torch/``, ``cpu/``, ``triton/``) compute and
what dispatch falls back to; ``dual_segment`` is one segment that may start inside a mini-batch with
pending gradients (the ``dual_form`` update rule uses it for partial mini-batches and decoding).
It is written for clarity, not speed, and is exact to all orders of differentiation.

``reference_kernel(model, loss)`` wraps both in the kernel call signatures of ``spec.py``
(:class:`~innerloop.kernels.spec.KernelForward`, :class:`~innerloop.kernels.spec.KernelDecode`), so
that a fast path is tested against the reference with the same arguments it is called with.
"""

from __future__ import annotations

import torch

from innerloop.core.functional import layer_norm_backward
from innerloop.core.protocol import AffineLayer, InnerLoss, InnerModel, InnerTask, Params
from innerloop.core.scan import (
    ChunkInputs,
    Segment,
    SegmentCarry,
    SegmentPlan,
    close_mini_batch,
    close_planned,
    plan_dual,
)
from innerloop.kernels.spec import KernelDecode, KernelForward


def key_side(
    task: InnerTask, params: Params, inputs: torch.Tensor, targets: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Forward the keys through the stack at ``params`` and backpropagate the inner loss in closed form.

    Returns ``(layer_inputs, grads)``: for each layer ``l`` its input ``X_l [B, H, N, in_l]`` and
    the gradient of the loss w.r.t. its pre-activation output ``G_l [B, H, N, out_l]``.
    """
    stack = task.model.stack
    layer_inputs, pre_activations = [], []
    h = inputs
    for layer in stack:
        layer_inputs.append(h)
        z = h @ params[layer.weight]
        if layer.bias is not None:
            z = z + params[layer.bias]
        pre_activations.append(z)
        h = layer.activation.fn(z) if layer.activation is not None else z

    z_last = pre_activations[-1]
    prediction = task.wrap_output(inputs, z_last)
    grad_prediction = task.loss.token_loss_grad(prediction, targets)
    if task.use_norm:
        grad = layer_norm_backward(z_last, grad_prediction, task.norm_weight[:, None, :], task.norm_eps)
    else:
        grad = grad_prediction

    grads = [grad]
    for index in range(len(stack) - 1, 0, -1):
        below = stack[index - 1]
        grad = grad @ params[stack[index].weight].transpose(-1, -2)
        if below.activation is not None:
            grad = grad * below.activation.derivative(pre_activations[index - 1])
        grads.append(grad)
    grads.reverse()
    return layer_inputs, grads


def dual_segment(
    task: InnerTask,
    params: Params,
    pending: Params,
    chunk: ChunkInputs,
    tau: torch.Tensor,
    has_pending: bool,
) -> tuple[torch.Tensor, Params]:
    """One segment inside a mini-batch, dual form. Same contract as ``primal_segment``."""
    layer_inputs, grads = key_side(task, params, chunk.inputs, chunk.targets)
    num_tokens = chunk.query.shape[2]
    causal = torch.ones(num_tokens, num_tokens, dtype=torch.bool, device=chunk.query.device).tril()
    # eta[b, h, i, j] = tau_i * lr_j for j <= i, else 0.
    eta = (tau[:, None] * chunk.lr[..., None, :]).masked_fill(~causal, 0.0)  # [B, H, N, N]
    tau_column = tau[:, None]  # [N, 1]

    h = chunk.query
    new_pending = dict(pending)
    for layer, x_keys, grad in zip(task.model.stack, layer_inputs, grads, strict=True):
        weight = params[layer.weight]
        similarity = h @ x_keys.transpose(-1, -2)  # [B, H, N, N]
        z = h @ weight
        if layer.bias is not None:
            similarity = similarity + 1.0
            z = z + params[layer.bias]
        z = z - (eta * similarity) @ grad
        if has_pending:
            correction = h @ pending[layer.weight]
            if layer.bias is not None:
                correction = correction + pending[layer.bias]
            z = z - tau_column * correction
        h = layer.activation.fn(z) if layer.activation is not None else z

        weighted_grad = chunk.lr[..., None] * grad  # [B, H, N, out]
        new_pending[layer.weight] = pending[layer.weight] + x_keys.transpose(-1, -2) @ weighted_grad
        if layer.bias is not None:
            new_pending[layer.bias] = pending[layer.bias] + weighted_grad.sum(dim=-2, keepdim=True)

    return task.wrap_output(chunk.query, h), new_pending


def dual_planned_segment(
    task: InnerTask, params: Params, chunk: ChunkInputs, plan: SegmentPlan
) -> tuple[torch.Tensor, list[Params]]:
    """One segment inside a mini-batch under a :class:`~innerloop.core.scan.SegmentPlan` (decay,
    momentum), dual form: layer by layer, ``z_i = base_i (h_i W_b + b_b) - sum_k c_k,i (h_i E_k^W +
    E_k^b) - sum_j mixing[i, j] lr_j (h_i . X_j + 1) G_j``. A :data:`~innerloop.core.scan.Reader`.

    Returns ``(outputs [B, H, N, f], sums)``: for each row ``w`` of ``plan.sums`` the weights-shaped
    ``sum_j w_j lr_j grad_j``."""
    layer_inputs, grads = key_side(task, params, chunk.inputs, chunk.targets)
    eta = plan.mixing * chunk.lr[..., None, :]  # [B, H, N, N]
    rows = [(row * chunk.lr)[..., None] for row in plan.sums]  # [B, H, N, 1] each
    sums: list[Params] = [{} for _ in plan.sums]
    h = chunk.query
    for layer, x_keys, grad in zip(task.model.stack, layer_inputs, grads, strict=True):

        def apply(
            weights: Params, x: torch.Tensor = h, layer: AffineLayer = layer
        ) -> torch.Tensor:  # x W (+ b)
            out = x @ weights[layer.weight]
            return out + weights[layer.bias] if layer.bias is not None else out

        similarity = h @ x_keys.transpose(-1, -2)  # [B, H, N, N]
        if layer.bias is not None:
            similarity = similarity + 1.0
        z = apply(params)
        if plan.base is not None:
            z = plan.base[..., None] * z
        for coefficient, extra in plan.extras:
            z = z - coefficient[..., None] * apply(extra)
        z = z - (eta * similarity) @ grad
        h = layer.activation.fn(z) if layer.activation is not None else z
        for row, total in zip(rows, sums, strict=True):
            weighted = row * grad  # [B, H, N, out]
            total[layer.weight] = x_keys.transpose(-1, -2) @ weighted
            if layer.bias is not None:
                total[layer.bias] = weighted.sum(dim=-2, keepdim=True)
    return task.wrap_output(chunk.query, h), sums


def _decayed_aligned_block(
    task: InnerTask, params: Params, chunk: ChunkInputs, tau: torch.Tensor
) -> tuple[torch.Tensor, Params]:
    """:func:`dual_aligned_block` with decay (``chunk.decay``), through :func:`plan_dual`."""
    zeros = {k: torch.zeros_like(v) for k, v in params.items()}
    outputs = []
    for start in range(0, chunk.query.shape[2], task.mini_batch_size):
        part = chunk.segment(Segment(start, start + task.mini_batch_size, 0, closes_mini_batch=True))
        plan, finish = plan_dual(part, tau, SegmentCarry(zeros, None, None), has_pending=False)
        out, sums = dual_planned_segment(task, params, part, plan)
        params, _ = close_planned(params, finish(sums), tau[-1])
        outputs.append(out)
    return torch.cat(outputs, dim=2), params


def dual_aligned_block(
    task: InnerTask, params: Params, chunk: ChunkInputs, tau: torch.Tensor
) -> tuple[torch.Tensor, Params]:
    """Whole mini-batches from a boundary, pending zero: the pure-torch path kernels must equal
    (with ``chunk.decay``: the decayed dual form, which no built-in kernel computes)."""
    if chunk.decay is not None:
        return _decayed_aligned_block(task, params, chunk, tau)
    mini_batch = task.mini_batch_size
    outputs = []
    zero_pending = {k: torch.zeros_like(v) for k, v in params.items()}
    for start in range(0, chunk.query.shape[2], mini_batch):
        seg = Segment(start, start + mini_batch, 0, closes_mini_batch=True)
        out, pending = dual_segment(task, params, zero_pending, chunk.segment(seg), tau, has_pending=False)
        params, _ = close_mini_batch(params, pending, tau[-1])
        outputs.append(out)
    return torch.cat(outputs, dim=2), params


def dual_token(
    task: InnerTask, params: Params, pending: Params, token: ChunkInputs, tau_i: torch.Tensor, is_last: bool
) -> tuple[torch.Tensor, Params, Params]:
    """One decoded token (``token``: ``[B, H, 1, f]`` views) with the mini-batch's pending gradient
    sums, committing the mini-batch when ``is_last``: ``(out [B, H, 1, f], params, pending)``, what a
    kernel's ``decode`` must equal."""
    out, pending = dual_segment(task, params, pending, token, tau_i.reshape(1), has_pending=True)
    if is_last:
        params, pending = close_mini_batch(params, pending, tau_i)
    return out, params, pending


def reference_kernel(model: InnerModel, loss: InnerLoss) -> tuple[KernelForward, KernelDecode]:
    """``(forward, decode)`` of the torch dual form for a stack ``model`` and an inner ``loss``, with
    the kernels' call signatures (keys ``xk`` as the loss inputs, values ``xv`` as its targets, the
    residual and the inner LayerNorm on): the oracle the fast paths are tested against."""
    if model.stack is None:
        raise ValueError(
            f"model: {model.name!r} declares no stack (InnerModel.stack); the dual form needs one"
        )

    def task(ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float, mini_batch_size: int) -> InnerTask:
        return InnerTask(model, loss, mini_batch_size, ln_weight, ln_bias, eps, residual=True, kernel="torch")

    def forward(
        xq: torch.Tensor,
        xk: torch.Tensor,
        xv: torch.Tensor,
        lr: torch.Tensor,
        tau: torch.Tensor,
        params: Params,
        ln_weight: torch.Tensor,
        ln_bias: torch.Tensor,
        eps: float,
    ) -> tuple[torch.Tensor, Params]:
        chunk = ChunkInputs(xq, xk, xv, lr)  # [B, H, T, f], lr [B, H, T]
        return dual_aligned_block(task(ln_weight, ln_bias, eps, tau.shape[0]), params, chunk, tau)

    def decode(
        xq: torch.Tensor,
        xk: torch.Tensor,
        xv: torch.Tensor,
        lr: torch.Tensor,
        tau_i: torch.Tensor,
        params: Params,
        pending: Params,
        ln_weight: torch.Tensor,
        ln_bias: torch.Tensor,
        eps: float,
        is_last: bool,
    ) -> tuple[torch.Tensor, Params, Params]:
        token = ChunkInputs(xq[:, :, None], xk[:, :, None], xv[:, :, None], lr[:, :, None])
        out, params, pending = dual_token(
            task(ln_weight, ln_bias, eps, 1), params, pending, token, tau_i, is_last
        )
        return out[:, :, 0], params, pending

    return forward, decode


__all__ = [
    "dual_aligned_block",
    "dual_planned_segment",
    "dual_segment",
    "dual_token",
    "key_side",
    "reference_kernel",
]
