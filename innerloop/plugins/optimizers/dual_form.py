"""``dual_form``: the same numbers as ``minibatch_gd`` without per-token weight matrices.

For a stack model (affine maps and elementwise functions) the output of token ``i`` of a mini-batch
needs ``x_i @ W_i`` with ``W_i = W_b - tau_i * sum_{j <= i} lr_j * X_j^T G_j``, which is
``x_i @ W_b - sum_{j <= i} tau_i lr_j (x_i . X_j) G_j``: a causal attention-like product instead
of a weight matrix per token. Applied layer by layer (the derivation is in kernels/README.md).

Whole mini-batches that start at a boundary go to the best registered kernel that verifies
(``InnerTask.kernel`` picks one or forbids them); everything else, and the fallback, runs here.
"""

from __future__ import annotations

import torch

from innerloop.core.functional import layer_norm_backward
from innerloop.core.protocol import InnerModel, InnerTask, Params, UpdateRule, Views
from innerloop.core.scan import (
    ChunkInputs,
    Segment,
    advance_state,
    close_mini_batch,
    prepare_chunk,
    split_segments,
)
from innerloop.core.state import TTTState
from innerloop.kernels.dispatch import run_aligned_block, run_decode_token
from innerloop.registry import hookimpl


def key_side(task: InnerTask, params: Params, inputs: torch.Tensor, targets: torch.Tensor):
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


def dual_aligned_block(
    task: InnerTask, params: Params, chunk: ChunkInputs, tau: torch.Tensor
) -> tuple[torch.Tensor, Params]:
    """Whole mini-batches from a boundary, pending zero: the pure-torch path kernels must equal."""
    mini_batch = task.mini_batch_size
    outputs = []
    zero_pending = {k: torch.zeros_like(v) for k, v in params.items()}
    for start in range(0, chunk.query.shape[2], mini_batch):
        seg = Segment(start, start + mini_batch, 0, closes_mini_batch=True)
        out, pending = dual_segment(task, params, zero_pending, chunk.segment(seg), tau, has_pending=False)
        params, _ = close_mini_batch(params, pending, tau[-1])
        outputs.append(out)
    return torch.cat(outputs, dim=2), params


class DualForm(UpdateRule):
    """Dual-form mini-batch TTT for stack models (see module docstring)."""

    name = "dual_form"

    def check_model(self, model: InnerModel) -> str | None:
        if model.stack is None:
            return (
                f"inner model {model.name!r} does not declare a stack of affine maps and elementwise "
                "functions (InnerModel.stack), which the dual form needs; use update_rule='minibatch_gd'"
            )
        return None

    def forward(
        self, state: TTTState, task: InnerTask, views: Views, lr: torch.Tensor, tau: torch.Tensor
    ) -> tuple[torch.Tensor, TTTState]:
        chunk, loss_carry = prepare_chunk(state, task, views, lr)
        params, pending = state.params, state.pending
        segments = split_segments(state.position, views.query.shape[2], task.mini_batch_size)
        outputs = []
        index = 0
        while index < len(segments):
            seg = segments[index]
            if seg.offset == 0 and seg.closes_mini_batch:
                # A run of whole mini-batches: the fast path's territory.
                last = index
                while last + 1 < len(segments) and segments[last + 1].closes_mini_batch:
                    last += 1
                block = Segment(seg.start, segments[last].end, 0, closes_mini_batch=True)
                out, params = run_aligned_block(
                    self, task, params, chunk.segment(block), tau, fallback=dual_aligned_block
                )
                outputs.append(out)
                index = last + 1
                continue
            seg_tau = tau[seg.offset : seg.offset + seg.length]
            if seg.length == 1:  # decoding: a kernel's one-token path, if one verifies
                decoded = run_decode_token(
                    self, task, params, pending, chunk.segment(seg), seg_tau[0], seg.closes_mini_batch
                )
                if decoded is not None:
                    out, params, pending = decoded
                    outputs.append(out)
                    index += 1
                    continue
            out, pending = dual_segment(
                task, params, pending, chunk.segment(seg), seg_tau, has_pending=seg.offset > 0
            )
            outputs.append(out)
            if seg.closes_mini_batch:
                params, pending = close_mini_batch(params, pending, seg_tau[-1])
            index += 1
        return torch.cat(outputs, dim=2), advance_state(
            state, params, pending, views.query.shape[2], loss_carry
        )


@hookimpl
def register_update_rules(register) -> None:
    register(DualForm())
