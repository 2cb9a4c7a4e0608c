"""A fused pure-torch fast path for whole mini-batches of the dual form (CPU and any device).

Same numbers as :func:`innerloop.kernels.reference.dual_aligned_block` for stack models
with the half-squared-error reconstruction loss, the inner residual and LayerNorm, computed with far
fewer operations inside the sequential scan:

- everything that does not depend on the inner weights is computed for all mini-batches at once
  before the scan: the first layer's causal similarity matrix ``M = tril(eta * (XQ XK^T + 1))``,
  the lr-scaled keys of the weight update, and the LayerNorm's constant terms;
- each affine layer's bias is folded into its weight as an extra input row (the first layer's inputs
  get their column of ones once, before the scan);
- the output correction ``eta * (XQ XK^T + 1) @ G`` and the weight update ``(tau lr XK)^T @ G``
  share their right factor, so one matmul per layer and mini-batch computes both;
- the gradient through the inner LayerNorm uses aten's fused ``native_layer_norm`` and
  ``native_layer_norm_backward``, so the path is differentiable once only: that backward is not
  twice differentiable, so ``verify`` refuses the blocks that record a graph of a layer built with
  ``needs_double_backward=True`` (its blocks under ``torch.no_grad`` run), and a ``create_graph=True``
  backward through it raises :func:`double_backward_message`, naming the kernel;
- the output LayerNorm and residual run once over all tokens after the scan.

The derivation is in ``kernels/README.md``; what moves out of the scan, in ``kernels/fused_torch/README.md``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.autograd.function import FunctionCtx

from innerloop.core.functional import overflow_safe_scale_if_needed
from innerloop.core.protocol import AffineLayer, Params
from innerloop.kernels.spec import (
    KernelForward,
    KernelInputs,
    KernelSpec,
    check_stack_kernel_inputs,
    stack_kernel_spec,
)
from innerloop.kernels.spec import double_backward_message as spec_double_backward_message


def double_backward_message(path: str) -> str:
    """The error of a ``create_graph=True`` backward through ``path`` (a kernel's name, or words for
    the fused path when it runs outside a registered kernel)."""
    return spec_double_backward_message(path, "aten's fused LayerNorm backward is not twice differentiable")


DOUBLE_BACKWARD_MESSAGE = double_backward_message("the fused_torch fast path")
"""The message of a :func:`make_fused_forward` block that was not told its kernel's name."""


class _RefusingIdentity(torch.autograd.Function):
    """Identity whose backward raises a clear error (``message``: which path refuses, and why) when
    ``refuses()``, asked inside the backward, says the backward is one that path cannot run."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, message: str, refuses: Callable[[], bool]) -> torch.Tensor:
        ctx.message, ctx.refuses = message, refuses
        return x.view_as(x)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        if ctx.refuses():
            raise RuntimeError(ctx.message)
        return grad, None, None


def refusing_identity(t: torch.Tensor, message: str, refuses: Callable[[], bool]) -> torch.Tensor:
    """``t`` through :class:`_RefusingIdentity` when it records a graph, else ``t`` itself."""
    return _RefusingIdentity.apply(t, message, refuses) if t.requires_grad else t


def _builds_a_graph() -> bool:
    return torch.is_grad_enabled()  # inside a backward: true only with create_graph=True


def _guard(t: torch.Tensor, message: str) -> torch.Tensor:
    """``t``, whose backward refuses to build a graph (``create_graph=True``) with ``message``."""
    return refusing_identity(t, message, _builds_a_graph)


def _with_ones(x: torch.Tensor) -> torch.Tensor:
    """Append a column of ones, ``[..., n] -> [..., n + 1]``: a bias becomes one more weight row."""
    return torch.nn.functional.pad(x, (0, 1), value=1.0)


@dataclass(frozen=True)
class _Hoisted:
    """What the scan needs that does not depend on the inner weights, for all mini-batches at once.

    ``NB`` mini-batches of ``K`` tokens, ``BH`` (batch, head) pairs, ``in1`` the first layer's input
    width (``f``, plus 1 with a bias).
    """

    both1: torch.Tensor  # [NB, BH, 2K, in1]: the first layer's keys, then its queries
    left1: torch.Tensor  # [NB, BH, K + in1, K]: [eta * (XQ XK^T + 1); (tau_{K-1} lr XK)^T]
    shift: torch.Tensor  # [NB, BH, K, f]: the weight-independent term of d loss / d xhat
    gamma_sq: torch.Tensor  # [BH, 1, f]: the LayerNorm weight squared
    eta: torch.Tensor  # [NB, BH, K, K]: tau_i lr_j for j <= i, else 0
    update_scale: torch.Tensor  # [NB, BH, K, 1]: tau_{K-1} lr_j


def _hoist(
    xq: torch.Tensor,
    xk: torch.Tensor,
    xv: torch.Tensor,
    lr: torch.Tensor,
    tau: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    first_has_bias: bool,
) -> _Hoisted:
    """Everything about the first layer's inputs, computed before the scan (see the module docstring)."""
    batch, heads, tokens, _ = xq.shape
    mini_batch = tau.shape[0]
    bh, num_mb = batch * heads, tokens // mini_batch

    def blocks(t: torch.Tensor) -> torch.Tensor:  # [B, H, T, n] -> [NB, BH, K, n]
        return t.reshape(bh, num_mb, mini_batch, t.shape[-1]).transpose(0, 1)

    gamma_sq = (ln_weight * ln_weight).repeat(batch, 1)[:, None, :]
    # d loss / d xhat = gamma * (gamma * xhat + beta - (xv - xk)) = gamma^2 * xhat + shift
    shift = blocks((ln_bias[None, :, None, :] - xv + xk) * ln_weight[None, :, None, :])

    causal = torch.ones(mini_batch, mini_batch, dtype=torch.bool, device=xq.device).tril()
    lr_blocks = lr.reshape(bh, num_mb, mini_batch).transpose(0, 1)  # [NB, BH, K]
    eta = (tau[:, None] * lr_blocks[:, :, None, :]).masked_fill(~causal, 0.0)
    update_scale = (tau[-1] * lr_blocks)[..., None]

    # Keys and queries stacked (one matmul per step serves both), and the "left" matrix whose product
    # with the gradient G gives at once the dual-form correction of the outputs and the weight update.
    # With a bias, both1 takes a column of ones and left1 its share (the + 1, the row of scales);
    # left1 is built from the keys and queries themselves, not from slices of both1, whose backward
    # would zero-fill a gradient of both1's whole size for each slice.
    keys, queries = blocks(xk), blocks(xq)
    both1 = torch.cat([keys, queries], dim=2)
    similarity = torch.matmul(queries, keys.transpose(-1, -2))  # [NB, BH, K, K]
    update_rows = [(update_scale * keys).transpose(-1, -2)]  # [NB, BH, f, K]
    if first_has_bias:
        both1 = _with_ones(both1)
        similarity = similarity + 1.0
        update_rows.append(update_scale.transpose(-1, -2))  # the bias row: [NB, BH, 1, K]
    left1 = torch.cat([eta * similarity, *update_rows], dim=2)
    return _Hoisted(both1, left1, shift, gamma_sq, eta, update_scale)


def _folded_weights(
    stack: tuple[AffineLayer, ...], params: Params, bh: int, own_copies: bool
) -> list[torch.Tensor]:
    """Each layer's ``[W; b]`` as one ``[BH, in (+1), out]`` matrix; ``own_copies`` makes sure none of
    them shares memory with ``params`` (folding a bias in copies; a layer without one is cloned)."""
    weights = []
    for layer in stack:
        weight = params[layer.weight].reshape(bh, *params[layer.weight].shape[2:])
        if layer.bias is not None:
            weight = torch.cat([weight, params[layer.bias].reshape(bh, 1, weight.shape[-1])], dim=1)
        elif own_copies:
            weight = weight.clone()
        weights.append(weight)
    return weights


def _unfolded_params(
    stack: tuple[AffineLayer, ...], params: Params, weights: list[torch.Tensor], guard: Callable
) -> Params:
    """The inverse of :func:`_folded_weights`: ``params``' names and shapes, each passed through
    ``guard`` (for autograd)."""
    new_params: Params = {}
    for layer, matrix in zip(stack, weights, strict=True):
        rows = params[layer.weight].shape[-2]
        new_params[layer.weight] = guard(matrix[:, :rows].reshape(params[layer.weight].shape))
        if layer.bias is not None:
            new_params[layer.bias] = guard(matrix[:, rows:].reshape(params[layer.bias].shape))
    return new_params


def _activate(layer: AffineLayer, z: torch.Tensor) -> torch.Tensor:
    """The layer's activation of its pre-activation ``z`` (None: the identity)."""
    return z if layer.activation is None else layer.activation.fn(z)


class _Scan:
    """The sequential part: one mini-batch at a time, the weights updated in between.

    Without a graph to record (``in_place``) the weights are updated in place, on the scan's own
    copies; otherwise each update makes new tensors.
    """

    def __init__(
        self, stack: tuple[AffineLayer, ...], weights: list[torch.Tensor], in_place: bool, eps: float
    ) -> None:
        self.stack = stack
        self.has_bias = [layer.bias is not None for layer in stack]
        self.weights = weights
        self.in_place = in_place
        self.eps = eps

    def step_weights(self, index: int, correction: torch.Tensor) -> None:
        if self.in_place:
            self.weights[index].sub_(correction)
        else:
            self.weights[index] = self.weights[index] - correction

    def key_side(
        self, both_n: torch.Tensor, mini_batch: int
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Forward the keys at the mini-batch's starting weights (the first layer with the queries).

        Returns ``(z_both [BH, 2K, out1], key_inputs, key_pre)``: each layer's input and pre-activation.
        """
        z_both = torch.matmul(both_n, self.weights[0])
        key_inputs, key_pre = [both_n[:, :mini_batch]], [z_both[:, :mini_batch]]
        for index in range(1, len(self.stack)):
            h = _activate(self.stack[index - 1], key_pre[-1])
            key_inputs.append(_with_ones(h) if self.has_bias[index] else h)
            key_pre.append(torch.matmul(key_inputs[-1], self.weights[index]))
        return z_both, key_inputs, key_pre

    def key_gradients(
        self, key_pre: list[torch.Tensor], shift_n: torch.Tensor, gamma_sq: torch.Tensor
    ) -> list[torch.Tensor]:
        """The inner gradient w.r.t. each layer's pre-activation: through LN (fused aten ops), then
        back through the stack. LN runs on a copy scaled where squares would overflow: LN is
        scale-invariant, and d/dz = s d/d(sz)."""
        dim = key_pre[-1].shape[-1]
        scale = overflow_safe_scale_if_needed(key_pre[-1])  # [BH, K, 1], or None: no row needs it
        scaled = key_pre[-1] if scale is None else key_pre[-1] * scale
        xhat, mean, rstd = torch.native_layer_norm(scaled, [dim], None, None, self.eps)
        grad_xhat = torch.addcmul(shift_n, gamma_sq, xhat)
        grad = torch.ops.aten.native_layer_norm_backward(
            grad_xhat, scaled, [dim], mean, rstd, None, None, [True, False, False]
        )[0]
        if scale is not None:
            grad = grad * scale
        grads = [grad]
        for index in range(len(self.stack) - 1, 0, -1):
            weight = self.weights[index][:, : key_pre[index - 1].shape[-1]]  # without the bias row
            grad = torch.matmul(grad, weight.transpose(-1, -2))
            below = self.stack[index - 1].activation
            if below is not None:
                grad = grad * below.derivative(key_pre[index - 1])
            grads.append(grad)
        grads.reverse()
        return grads

    def mini_batch(
        self,
        both_n: torch.Tensor,
        left_n: torch.Tensor,
        shift_n: torch.Tensor,
        eta_n: torch.Tensor,
        scale_n: torch.Tensor,
        gamma_sq: torch.Tensor,
    ) -> torch.Tensor:
        """One mini-batch: its outputs' pre-LN values ``[BH, K, f]``; the weights move past it."""
        mini_batch = eta_n.shape[-1]
        z_both, key_inputs, key_pre = self.key_side(both_n, mini_batch)
        grads = self.key_gradients(key_pre, shift_n, gamma_sq)
        # the query side (the dual form, layer by layer) and the weight updates
        products = torch.matmul(left_n, grads[0])  # [BH, K + in1, out1]
        z = z_both[:, mini_batch:] - products[:, :mini_batch]
        for index in range(1, len(self.stack)):
            hq = _activate(self.stack[index - 1], z)
            hq = _with_ones(hq) if self.has_bias[index] else hq
            mix = eta_n * torch.matmul(hq, key_inputs[index].transpose(-1, -2))  # [BH, K, K]
            left = torch.cat([mix, (scale_n * key_inputs[index]).transpose(-1, -2)], dim=1)
            later = torch.matmul(left, grads[index])  # [BH, K + in, out]
            z = torch.matmul(hq, self.weights[index]) - later[:, :mini_batch]
            self.step_weights(index, later[:, mini_batch:])
        self.step_weights(0, products[:, mini_batch:])
        return z


TrainingScan = Callable[..., tuple[torch.Tensor, list[torch.Tensor]]]
"""A whole scan with its own backward: ``(both1, left1, shift, gamma_sq, eta, update_scale, weights, eps) ->
(z [BH, NB, K, f], each layer's weight after the last mini-batch)`` on :class:`_Hoisted`'s tensors and
the folded weights ``[BH, in, out]`` (``innerloop.kernels.cpu`` compiles one). A scan whose backward is
not twice differentiable raises its own error inside a ``create_graph=True`` backward (the CPU scans
raise ``innerloop.kernels.cpu.linear_scan.DOUBLE_BACKWARD_MESSAGE``); one that does not is stopped
right after it by the fused path's guard on its inputs."""


@dataclass(frozen=True)
class TrainingEnds:
    """What a training scan may replace around itself (``innerloop.kernels.cpu`` compiles both): the
    hoisting, ``(first_has_bias, xq, xk, xv, lr, tau, ln_weight, ln_bias) -> (both1, left1, shift,
    gamma_sq, eta, update_scale)`` as :func:`_hoist` computes them, and the output LayerNorm with the
    residual, ``(eps, z [B, H, T, f], xq, ln_weight, ln_bias) -> xq + ln_weight * LN(z) + ln_bias``."""

    hoist: Callable[..., tuple[torch.Tensor, ...]]
    output: Callable[..., torch.Tensor]


TrainingStep = Callable[..., torch.Tensor]
"""A replacement for :meth:`_Scan.mini_batch` (same arguments, the scan first) for blocks that record
a graph (``innerloop.kernels.fused_torch.compiled`` compiles one)."""


def _unguarded(t: torch.Tensor) -> torch.Tensor:
    return t


def _scan_mini_batches(
    scan: _Scan, hoisted: _Hoisted, training_step: TrainingStep | None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Every mini-batch through ``scan`` in order (``training_step`` in place of :meth:`_Scan.mini_batch`
    where given): the pre-LayerNorm outputs of the mini-batches ``[BH, NB, K, f]`` and the
    scan's final weights."""
    blocks = (hoisted.both1, hoisted.left1, hoisted.shift, hoisted.eta, hoisted.update_scale)
    step = _Scan.mini_batch if training_step is None else training_step
    if training_step is not None:
        # one copy each, so that every mini-batch's tensors have the same strides whatever the call's
        # length: as views of the [B, H, T, n] inputs their strides held T, and torch.compile recompiled
        # a training step for each new sequence length (to its limit)
        blocks = tuple(t.contiguous() for t in blocks)
    per_mb = zip(*(t.unbind(0) for t in blocks), strict=True)
    z_all = torch.stack([step(scan, *tensors_n, hoisted.gamma_sq) for tensors_n in per_mb], dim=1)
    return z_all, scan.weights


def make_fused_forward(
    stack: tuple[AffineLayer, ...],
    training_scan: TrainingScan | None = None,
    training_step: TrainingStep | None = None,
    kernel_name: str | None = None,
    training_ends: TrainingEnds | None = None,
) -> KernelForward:
    """The fused block function for a stack model with these layers. When a graph is needed, with
    ``training_scan`` that scan runs in place of the recorded one (and ``training_ends``, if given, the
    hoisting before it and the output LayerNorm after it); with ``training_step`` that function runs
    each mini-batch in place of :meth:`_Scan.mini_batch`.

    A ``create_graph=True`` backward through the block raises :func:`double_backward_message` naming
    ``kernel_name`` (the registered kernel this forward is; None: "the fused_torch fast path"). With
    ``training_scan`` the guard sits on the scan's inputs, not on the block's outputs, so that the scan's
    own error, naming the path that ran, comes first."""
    path = "the fused_torch fast path" if kernel_name is None else f"kernel {kernel_name!r}"
    guard = functools.partial(_guard, message=double_backward_message(path))

    def forward(  # KernelForward's parameters, three lines (make_fused_forward stays under 60)
        xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor, lr: torch.Tensor, tau: torch.Tensor,
        params: Params, ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float,
    ) -> tuple[torch.Tensor, Params]:  # fmt: skip
        inputs = (xq, xk, xv, lr, tau, ln_weight, ln_bias)
        check_stack_kernel_inputs(kernel_name or "fused_torch", stack, *inputs[:5], params, *inputs[5:])
        batch, heads, tokens, dim = xq.shape
        in_place = not (torch.is_grad_enabled() and any(t.requires_grad for t in (*inputs, *params.values())))
        ends = training_ends if training_scan is not None and not in_place else None
        if ends is None:
            hoisted = _hoist(*inputs, stack[0].bias is not None)
        else:
            hoisted = _Hoisted(*ends.hoist(stack[0].bias is not None, *inputs))
        weights = _folded_weights(stack, params, batch * heads, own_copies=in_place)
        output_guard = guard
        if training_scan is not None and not in_place:
            h = hoisted
            scan_inputs = (h.both1, h.left1, h.shift, h.gamma_sq, h.eta, h.update_scale)
            z_all, weights = training_scan(*map(guard, scan_inputs), [guard(w) for w in weights], eps)
            output_guard = _unguarded  # the scan's inputs are guarded
            if ends is not None:
                out = ends.output(eps, z_all.reshape(batch, heads, tokens, dim), xq, ln_weight, ln_bias)
                return out, _unfolded_params(stack, params, weights, output_guard)
        else:
            step = training_step if training_step is not None and not in_place else None
            z_all, weights = _scan_mini_batches(_Scan(stack, weights, in_place, eps), hoisted, step)

        # the output LayerNorm and residual, once over all tokens
        z_all = z_all.reshape(batch, heads, tokens, dim)  # [B, H, T, f]
        scale = overflow_safe_scale_if_needed(z_all)
        normed = torch.nn.functional.layer_norm(z_all if scale is None else z_all * scale, [dim], eps=eps)
        out = torch.addcmul(xq + ln_bias[None, :, None, :], normed, ln_weight[None, :, None, :])
        return output_guard(out), _unfolded_params(stack, params, weights, output_guard)

    return forward


def verify(inputs: KernelInputs) -> str | None:
    """The fused torch path runs anywhere torch does; it needs whole mini-batches only, and refuses a
    block that records a graph for a layer that takes gradients of gradients (``needs_double_backward``).
    A block without a graph (``torch.no_grad``, inference mode) is differentiated never, so it runs."""
    if inputs.num_tokens % inputs.mini_batch_size != 0:
        return f"num_tokens {inputs.num_tokens} is not a multiple of mini_batch_size {inputs.mini_batch_size}"
    if inputs.requires_grad and inputs.needs_double_backward:
        return "double backward needed: aten's fused LayerNorm backward is not twice differentiable"
    if inputs.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        return f"dtype {inputs.dtype} is not a floating type this path supports"
    return None


def kernel_spec(model_name: str, stack: tuple[AffineLayer, ...]) -> KernelSpec:
    """The registration of the fused torch path for one stack model with the reconstruction loss."""
    return stack_kernel_spec(
        "fused_torch",
        model_name,
        forward=make_fused_forward(stack, kernel_name=f"fused_torch_{model_name}"),
        verify=verify,
        priority=1,
        description="pure-torch dual form with the weight-independent work hoisted out of the scan",
    )


__all__ = [
    "DOUBLE_BACKWARD_MESSAGE",
    "TrainingEnds",
    "TrainingScan",
    "TrainingStep",
    "double_backward_message",
    "kernel_spec",
    "make_fused_forward",
    "refusing_identity",
    "verify",
]
