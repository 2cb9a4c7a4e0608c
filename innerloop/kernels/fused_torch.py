"""A fused pure-torch fast path for whole mini-batches of the dual form (CPU and any device).

Same numbers as :func:`innerloop.plugins.optimizers.dual_form.dual_aligned_block` for stack models
with the half-squared-error reconstruction loss, the inner residual and LayerNorm, computed with far
fewer operations inside the sequential scan:

- everything that does not depend on the inner weights is computed for all mini-batches at once
  before the scan: the first layer's causal similarity matrix ``M = tril(eta * (XQ XK^T + 1))``,
  the lr-scaled keys of the weight update, and the LayerNorm's constant terms;
- a bias enters the similarity matrix as its constant input 1 (``+ eta``) and is updated with one
  small matmul, so nothing is concatenated inside the scan;
- the gradient through the inner LayerNorm uses aten's fused ``native_layer_norm`` and
  ``native_layer_norm_backward`` (both differentiable, twice);
- the output LayerNorm and residual run once over all tokens after the scan.

The derivation is in ``kernels/README.md``.
"""

from __future__ import annotations

import torch

from innerloop.core.protocol import AffineLayer, Params
from innerloop.kernels.spec import KernelInputs, KernelSpec

DOUBLE_BACKWARD_MESSAGE = (
    "the fused_torch fast path is differentiable once only (aten's fused LayerNorm backward is not "
    "twice differentiable); construct the TTTLayer with needs_double_backward=True (or kernel='torch') "
    "to take gradients of gradients"
)


class _OnceDifferentiable(torch.autograd.Function):
    """Identity whose backward refuses to build a graph (``create_graph=True``) with a clear error."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # only true inside a backward with create_graph=True
            raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)
        return grad


def _guard(t: torch.Tensor) -> torch.Tensor:
    return _OnceDifferentiable.apply(t) if t.requires_grad else t


def make_fused_forward(stack: tuple[AffineLayer, ...]):
    """The fused block function for a stack model with these layers."""

    def forward(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps):
        batch, heads, tokens, dim = xq.shape
        mini_batch = tau.shape[0]
        num_mb = tokens // mini_batch
        bh = batch * heads

        def blocks(t: torch.Tensor) -> torch.Tensor:  # [B, H, T, n] -> [NB, BH, K, n]
            return t.reshape(bh, num_mb, mini_batch, t.shape[-1]).transpose(0, 1)

        def per_sequence(name: str) -> torch.Tensor:  # [B, H, *shape] -> [BH, *shape]
            return params[name].reshape(bh, *params[name].shape[2:])

        gamma = ln_weight.repeat(batch, 1)[:, None, :]  # [BH, 1, f]
        gamma_sq = gamma * gamma
        # d loss / d xhat = gamma * (gamma * xhat + beta - (xv - xk)) = gamma^2 * xhat + shift
        shift = blocks((ln_bias[None, :, None, :] - xv + xk) * ln_weight[None, :, None, :])

        causal = torch.ones(mini_batch, mini_batch, dtype=torch.bool, device=xq.device).tril()
        lr_blocks = lr.reshape(bh, num_mb, mini_batch).transpose(0, 1)  # [NB, BH, K]
        eta = (tau[:, None] * lr_blocks[:, :, None, :]).masked_fill(~causal, 0.0)  # [NB, BH, K, K]
        update_scale = (tau[-1] * lr_blocks)[..., None]  # [NB, BH, K, 1]
        update_row = update_scale.transpose(-1, -2)  # [NB, BH, 1, K]: the bias update's weights

        # The first layer's inputs do not depend on the weights: its similarity matrix up front.
        keys1, queries1 = blocks(xk), blocks(xq)  # [NB, BH, K, f]
        mix1 = eta * (queries1 @ keys1.transpose(-1, -2))  # [NB, BH, K, K]
        if stack[0].bias is not None:
            mix1 = mix1 + eta  # the bias's input is a constant 1: similarity + 1
        scaled_keys1 = (update_scale * keys1).transpose(-1, -2)  # [NB, BH, f, K]
        both1 = torch.cat([keys1, queries1], dim=2)  # [NB, BH, 2K, f]: one matmul serves both sides

        weights = [per_sequence(layer.weight) for layer in stack]
        biases = [per_sequence(layer.bias) if layer.bias is not None else None for layer in stack]
        # Without a graph to record, the weights are updated in place (on copies of the caller's).
        in_place = not (
            torch.is_grad_enabled() and any(t.requires_grad for t in (xq, xk, xv, lr, tau, ln_weight))
        )
        in_place = in_place and not any(p.requires_grad for p in params.values())
        if in_place:
            weights = [w.clone() for w in weights]
            biases = [None if b is None else b.clone() for b in biases]

        def affine(x: torch.Tensor, index: int) -> torch.Tensor:
            bias = biases[index]
            return x @ weights[index] if bias is None else torch.baddbmm(bias, x, weights[index])

        def subtract_product(target: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
            """``target - left @ right``, in place when allowed."""
            if in_place:
                return target.baddbmm_(left, right, alpha=-1.0)
            return torch.baddbmm(target, left, right, alpha=-1.0)

        per_mb = zip(
            both1.unbind(0),
            shift.unbind(0),
            mix1.unbind(0),
            eta.unbind(0),
            scaled_keys1.unbind(0),
            update_scale.unbind(0),
            update_row.unbind(0),
            strict=True,
        )
        outputs = []
        for both_n, shift_n, mix_n, eta_n, scaled_keys_n, scale_n, row_n in per_mb:
            # ---- key side: forward the keys at the mini-batch's starting weights
            z_both = affine(both_n, 0)  # [BH, 2K, out1]
            z_keys, z_query = z_both[:, :mini_batch], z_both[:, mini_batch:]
            key_inputs, key_pre = [both_n[:, :mini_batch]], [z_keys]
            for index in range(1, len(stack)):
                key_inputs.append(stack[index - 1].activation.fn(key_pre[-1]))
                key_pre.append(affine(key_inputs[-1], index))

            # ---- inner gradient through LN (fused aten ops), then back through the stack
            xhat, mean, rstd = torch.native_layer_norm(key_pre[-1], [dim], None, None, eps)
            grad_xhat = torch.addcmul(shift_n, gamma_sq, xhat)
            grad = torch.ops.aten.native_layer_norm_backward(
                grad_xhat, key_pre[-1], [dim], mean, rstd, None, None, [True, False, False]
            )[0]
            grads = [grad]
            for index in range(len(stack) - 1, 0, -1):
                derivative = stack[index - 1].activation.derivative(key_pre[index - 1])
                grad = (grad @ weights[index].transpose(-1, -2)) * derivative
                grads.append(grad)
            grads.reverse()

            # ---- query side (the dual form, layer by layer)
            z = torch.baddbmm(z_query, mix_n, grads[0], alpha=-1.0)
            for index in range(1, len(stack)):
                hq = stack[index - 1].activation.fn(z)
                similarity = hq @ key_inputs[index].transpose(-1, -2)  # [BH, K, K]
                if biases[index] is not None:
                    similarity = similarity + 1.0
                z = subtract_product(affine(hq, index), eta_n * similarity, grads[index])
            outputs.append(z)

            # ---- the weight updates: W -= (tau_last lr X)^T G, b -= (tau_last lr)^T G
            for index, grad in enumerate(grads):
                scaled = scaled_keys_n if index == 0 else (scale_n * key_inputs[index]).transpose(-1, -2)
                weights[index] = subtract_product(weights[index], scaled, grad)
                if biases[index] is not None:
                    biases[index] = subtract_product(biases[index], row_n, grad)

        z_all = torch.stack(outputs, dim=1).reshape(batch, heads, tokens, dim)  # [B, H, T, f]
        normed = torch.nn.functional.layer_norm(z_all, [dim], eps=eps)
        out = torch.addcmul(xq + ln_bias[None, :, None, :], normed, ln_weight[None, :, None, :])
        new_params: Params = {}
        for layer, weight, bias in zip(stack, weights, biases, strict=True):
            new_params[layer.weight] = _guard(weight.reshape(params[layer.weight].shape))
            if bias is not None:
                new_params[layer.bias] = _guard(bias.reshape(params[layer.bias].shape))
        return _guard(out), new_params

    return forward


def verify(inputs: KernelInputs) -> str | None:
    """The fused torch path runs anywhere torch does; it needs whole mini-batches only."""
    if inputs.num_tokens % inputs.mini_batch_size != 0:
        return f"num_tokens {inputs.num_tokens} is not a multiple of mini_batch_size {inputs.mini_batch_size}"
    if inputs.needs_double_backward:
        return "double backward needed: aten's fused LayerNorm backward is not twice differentiable"
    if inputs.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        return f"dtype {inputs.dtype} is not a floating type this path supports"
    return None


def kernel_spec(model_name: str, stack: tuple[AffineLayer, ...]) -> KernelSpec:
    """The registration of the fused torch path for one stack model with the reconstruction loss."""
    return KernelSpec(
        name=f"fused_torch_{model_name}",
        inner_model=model_name,
        inner_loss="reconstruction",
        update_rule="dual_form",
        forward=make_fused_forward(stack),
        verify=verify,
        priority=1,
        description="pure-torch dual form with the weight-independent work hoisted out of the scan",
    )


__all__ = ["kernel_spec", "make_fused_forward", "verify"]
