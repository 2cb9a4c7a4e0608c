"""A fused pure-torch fast path for whole mini-batches of the dual form (CPU and any device).

Same numbers as :func:`innerloop.plugins.optimizers.dual_form.dual_aligned_block` for stack models
with the half-squared-error reconstruction loss, the inner residual and LayerNorm, computed with far
fewer operations inside the sequential scan:

- everything that does not depend on the inner weights is computed for all mini-batches at once
  before the scan: the first layer's causal similarity matrix ``M = tril(eta * (XQ XK^T + 1))``,
  the lr-scaled keys of the weight update, and the LayerNorm's constant terms;
- each affine layer's bias is folded into its weight as an extra input row (inputs get a column of
  ones), so one batched matmul serves weight and bias;
- the gradient through the inner LayerNorm uses aten's fused ``native_layer_norm`` and
  ``native_layer_norm_backward`` (both differentiable, twice);
- the output LayerNorm and residual run once over all tokens after the scan.

The derivation is in ``kernels/README.md``.
"""

from __future__ import annotations

import torch

from innerloop.core.protocol import AffineLayer, Params
from innerloop.kernels.spec import KernelInputs, KernelSpec


def _augment(x: torch.Tensor) -> torch.Tensor:
    """Append a column of ones: ``[..., n] -> [..., n + 1]`` (for folding a bias into a weight)."""
    return torch.cat([x, x.new_ones(x.shape[:-1] + (1,))], dim=-1)


def _fold(params: Params, layer: AffineLayer, batch_heads: int) -> torch.Tensor:
    """``[W; b]`` as one ``[BH, in (+1), out]`` matrix."""
    weight = params[layer.weight].reshape(batch_heads, *params[layer.weight].shape[-2:])
    if layer.bias is None:
        return weight
    bias = params[layer.bias].reshape(batch_heads, 1, weight.shape[-1])
    return torch.cat([weight, bias], dim=1)


def _unfold(folded: torch.Tensor, layer: AffineLayer, like: Params) -> Params:
    weight_shape = like[layer.weight].shape
    out = {layer.weight: folded[:, : weight_shape[-2]].reshape(weight_shape)}
    if layer.bias is not None:
        out[layer.bias] = folded[:, weight_shape[-2] :].reshape(like[layer.bias].shape)
    return out


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

        gamma = ln_weight.repeat(batch, 1)[:, None, :]  # [BH, 1, f]
        beta = ln_bias.repeat(batch, 1)[:, None, :]
        gamma_sq = gamma * gamma
        # d loss / d xhat = gamma * (gamma * xhat + beta - (xv - xk)) = gamma^2 * xhat + shift
        shift = blocks((beta.reshape(batch, heads, 1, dim) - (xv - xk)) * gamma.reshape(batch, heads, 1, dim))

        causal = torch.ones(mini_batch, mini_batch, dtype=torch.bool, device=xq.device).tril()
        lr_blocks = lr.reshape(bh, num_mb, mini_batch).transpose(0, 1)  # [NB, BH, K]
        eta = (tau[:, None] * lr_blocks[:, :, None, :]).masked_fill(~causal, 0.0)  # [NB, BH, K, K]
        update_scale = (tau[-1] * lr_blocks)[..., None]  # [NB, BH, K, 1]

        first = stack[0]
        keys1 = blocks(xk)
        queries1 = blocks(xq)
        if first.bias is not None:
            keys1, queries1 = _augment(keys1), _augment(queries1)
        # First layer: both sides in one matmul per mini-batch; its similarity matrix up front.
        both1 = torch.cat([keys1, queries1], dim=2)  # [NB, BH, 2K, in1]
        mix1 = eta * (queries1 @ keys1.transpose(-1, -2))  # [NB, BH, K, K]
        scaled_keys1 = (update_scale * keys1).transpose(-1, -2)  # [NB, BH, in1, K]

        folded = [_fold(params, layer, bh) for layer in stack]
        outputs = []
        for n in range(num_mb):
            # ---- key side: forward the keys at the mini-batch's starting weights
            z_both = both1[n] @ folded[0]  # [BH, 2K, out1]
            z_keys, z_query = z_both[:, :mini_batch], z_both[:, mini_batch:]
            key_inputs, key_pre = [keys1[n]], [z_keys]
            h = z_keys
            for layer_index in range(1, len(stack)):
                h = stack[layer_index - 1].activation.fn(h)
                h_in = _augment(h) if stack[layer_index].bias is not None else h
                key_inputs.append(h_in)
                h = h_in @ folded[layer_index]
                key_pre.append(h)

            # ---- inner gradient through LN (fused aten ops), then back through the stack
            xhat, mean, rstd = torch.native_layer_norm(key_pre[-1], [dim], None, None, eps)
            grad_xhat = torch.addcmul(shift[n], gamma_sq, xhat)
            grad = torch.ops.aten.native_layer_norm_backward(
                grad_xhat, key_pre[-1], [dim], mean, rstd, None, None, [True, False, False]
            )[0]
            grads = [grad]
            for layer_index in range(len(stack) - 1, 0, -1):
                weight = folded[layer_index][:, : key_pre[layer_index - 1].shape[-1]]
                grad = (grad @ weight.transpose(-1, -2)) * stack[layer_index - 1].activation.derivative(
                    key_pre[layer_index - 1]
                )
                grads.append(grad)
            grads.reverse()

            # ---- query side: the dual form layer by layer, then the weight updates
            # mix1 already holds eta * (XQ XK^T + 1) when the bias is folded (ones column).
            z = torch.baddbmm(z_query, mix1[n], grads[0], alpha=-1.0)
            new_folded = [torch.baddbmm(folded[0], scaled_keys1[n], grads[0], alpha=-1.0)]
            for layer_index in range(1, len(stack)):
                layer = stack[layer_index]
                hq = stack[layer_index - 1].activation.fn(z)
                hq = _augment(hq) if layer.bias is not None else hq
                similarity = hq @ key_inputs[layer_index].transpose(-1, -2)  # [BH, K, K]
                z = torch.baddbmm(
                    hq @ folded[layer_index], eta[n] * similarity, grads[layer_index], alpha=-1.0
                )
                scaled = (update_scale[n] * key_inputs[layer_index]).transpose(-1, -2)
                new_folded.append(torch.baddbmm(folded[layer_index], scaled, grads[layer_index], alpha=-1.0))
            folded = new_folded
            outputs.append(z)

        z_all = torch.stack(outputs, dim=1).reshape(batch, heads, tokens, dim)  # [B, H, T, f]
        normed = torch.nn.functional.layer_norm(z_all, [dim], eps=eps)
        out = xq + normed * ln_weight[None, :, None, :] + ln_bias[None, :, None, :]
        new_params: Params = {}
        for layer, matrix in zip(stack, folded, strict=True):
            new_params.update(_unfold(matrix, layer, params))
        return _guard(out), {k: _guard(v) for k, v in new_params.items()}

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
