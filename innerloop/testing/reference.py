"""The slowest, plainest statement of mini-batch TTT: a loop over tokens with ``torch.autograd``.

Independent of the update rules' code (no ``torch.func``, no dual trick, no segments), so that
every rule can be checked against it. Use float64 and tiny shapes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import torch

from innerloop.core.protocol import InnerTask, Views
from innerloop.core.state import TTTState


def _token_grads(task: InnerTask, params: dict, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Gradient of one token's inner loss w.r.t. each weight, kept in the graph when the outer loop needs it.

    Without an outer graph it is taken outside inference mode on normal copies of any inference tensor
    (``torch.autograd.grad`` cannot run under ``torch.inference_mode``, nor save an inference tensor for
    backward), so the loop runs under ``inference_mode`` and on its tensors, as ``UpdateRule.forward`` does."""
    outer = torch.is_grad_enabled() and (x.requires_grad or any(v.requires_grad for v in params.values()))
    if outer:
        leaves = {k: v if v.requires_grad else v.detach().requires_grad_(True) for k, v in params.items()}
        with torch.enable_grad():
            token_loss = task.loss.token_loss(task.predict(leaves, x), y).sum()
            return list(torch.autograd.grad(token_loss, list(leaves.values()), create_graph=True))
    with torch.inference_mode(False), torch.enable_grad():
        leaves = {k: _normal(v).detach().requires_grad_(True) for k, v in params.items()}
        task = replace(task, norm_weight=_normal(task.norm_weight), norm_bias=_normal(task.norm_bias))
        token_loss = task.loss.token_loss(task.predict(leaves, _normal(x)), _normal(y)).sum()
        return list(torch.autograd.grad(token_loss, list(leaves.values())))


def _normal(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """``tensor``, or a normal copy of it if it is an inference tensor (call outside inference mode)."""
    return tensor.clone() if tensor is not None and tensor.is_inference() else tensor


def _check_recordable(state: TTTState, views: Views, gates: dict[str, torch.Tensor | None]) -> None:
    """Refuse, naming them, inference tensors in a call that records an outer graph (grad enabled and an
    input requires grad): autograd cannot save them for backward (torch's bare RuntimeError otherwise)."""
    tensors = {
        **{f"state.params[{k!r}]": v for k, v in state.params.items()},
        "views.query": views.query,
        "views.key": views.key,
        "views.value": views.value,
        **gates,
    }
    tensors = {name: t for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    inference = [name for name, t in tensors.items() if t.is_inference()]
    if torch.is_grad_enabled() and inference and any(t.requires_grad for t in tensors.values()):
        raise ValueError(
            f"naive_token_loop: {', '.join(inference)} are inference tensors (made under torch.inference_mode), "
            "which autograd cannot save for backward, in a call that records a graph (grad is enabled and an "
            "input requires grad): run it under torch.no_grad() or torch.inference_mode(), or pass clones made "
            "outside inference mode"
        )


def _check_gates(views: Views, mini_batch_size: int, gates: dict[str, torch.Tensor | None]) -> None:
    """Each of ``lr`` (required), ``decay``, ``momentum`` a floating-point ``[B, H, T]`` tensor of the
    views' batch, heads and tokens, and ``tau`` one of ``[mini_batch_size]``, else an error naming it, what
    was given and what is valid (not an IndexError or a broadcasting error from inside the loop)."""
    tokens = tuple(views.query.shape[:3])
    for name, gate in gates.items():
        if gate is None and name != "lr":
            continue
        wanted = (mini_batch_size,) if name == "tau" else tokens
        layout = "[mini_batch_size]" if name == "tau" else "[B, H, T] (the views' query [B, H, T, f])"
        if not isinstance(gate, torch.Tensor):
            raise TypeError(
                f"naive_token_loop: {name} must be a torch.Tensor {layout}, got {type(gate).__name__}"
            )
        if not gate.is_floating_point() or tuple(gate.shape) != wanted:
            raise ValueError(
                f"naive_token_loop: {name} must be a floating-point tensor {layout} = {wanted}, got "
                f"{gate.dtype} {tuple(gate.shape)}"
            )


def _per_head(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value [B, H]`` shaped to multiply ``like [B, H, *shape]``."""
    return value.reshape(value.shape + (1,) * (like.dim() - 2))


def _step(
    params: dict[str, torch.Tensor],
    pending: dict[str, torch.Tensor],
    surprise: dict[str, torch.Tensor],
    grads: dict[str, torch.Tensor],
    lr_t: torch.Tensor,
    keep: torch.Tensor | None,
    m_t: torch.Tensor | None,
    momentum_rule: bool,
) -> dict:
    """One token's update of the pending sums (and, for the momentum rule, of ``surprise`` in place);
    ``lr_t``, ``keep`` (``a_t``, None: 1), ``m_t`` (None: 0) are ``[B, H]``."""
    new_pending = {}
    for key, value in params.items():
        step = _per_head(lr_t, value) * grads[key]
        kept = pending[key] if keep is None else _per_head(keep, value) * pending[key]
        if momentum_rule:
            m = 0.0 if m_t is None else _per_head(m_t, value)
            surprise[key] = m * surprise[key] - step
            new_pending[key] = kept - surprise[key]
        else:
            new_pending[key] = kept + step
    return new_pending


def naive_token_loop(
    state: TTTState,
    task: InnerTask,
    views: Views,
    lr: torch.Tensor,
    tau: torch.Tensor | None,
    decay: torch.Tensor | None = None,
    momentum: torch.Tensor | None = None,
) -> tuple[torch.Tensor, TTTState]:
    """Same contract as ``UpdateRule.forward``: read every token in order, one at a time.

    Token t at mini-batch offset i: ``grad_t`` = autograd gradient of its inner loss at the
    mini-batch's starting weights ``W_b``; with ``a_t = 1 - decay_t`` (1 without decay):

    - ``tau`` given (mini-batch rules): ``pending = a_t pending + lr_t grad_t``; it reads
      ``A W_b - tau_i pending`` with ``A = prod a`` over the mini-batch so far;
    - ``tau`` None (the momentum rule): ``S = m_t S - lr_t grad_t`` (``m = 0`` without momentum),
      ``pending = a_t pending - S``; it reads ``A W_b - pending``, i.e. ``W_t = a_t W_{t-1} + S_t``.

    At the end of a mini-batch the weights it read become ``W_b``.
    """
    gates = {"lr": lr, "tau": tau, "decay": decay, "momentum": momentum}
    _check_gates(views, task.mini_batch_size, gates)
    _check_recordable(state, views, gates)
    pairs = task.loss.pairs(views, state.loss_carry)
    if pairs.valid is not None:
        lr = lr * pairs.valid.to(lr.dtype)
    params, pending = dict(state.params), dict(state.pending)
    product = state.decay.get("product")  # [B, H] or None (1)
    surprise = {k: state.momentum.get(k, torch.zeros_like(v)) for k, v in params.items()}
    outputs = []
    for t in range(views.query.shape[2]):
        offset = (state.position + t) % task.mini_batch_size
        x_t, y_t = pairs.inputs[:, :, t : t + 1], pairs.targets[:, :, t : t + 1]  # [B, H, 1, f]
        grads = dict(zip(params, _token_grads(task, params, x_t, y_t), strict=True))
        keep = None if decay is None else 1.0 - decay[:, :, t]  # [B, H]
        if keep is not None:
            product = keep if product is None else product * keep
        m_t = None if momentum is None else momentum[:, :, t]
        pending = _step(params, pending, surprise, grads, lr[:, :, t], keep, m_t, tau is None)
        scale = 1.0 if tau is None else tau[offset]
        start = params if product is None else {k: _per_head(product, v) * v for k, v in params.items()}
        current = {k: start[k] - scale * pending[k] for k in params}
        outputs.append(task.predict(current, views.query[:, :, t : t + 1]))
        if offset == task.mini_batch_size - 1:
            params, product = current, None
            pending = {k: torch.zeros_like(v) for k, v in pending.items()}
    new_state = replace(
        state,
        params=params,
        pending=pending,
        position=state.position + views.query.shape[2],
        loss_carry=pairs.carry,
        momentum=surprise if momentum is not None else {},
        decay={} if product is None else {"product": product},
    )
    return torch.cat(outputs, dim=2), new_state


def _check_one_float_dtype(dtypes: dict[str, torch.dtype]) -> None:
    """A TypeError naming the tensor whose dtype is not floating point or not the others' (the most
    common one), with every dtype given (a matmul of two dtypes names neither tensor)."""
    common = Counter(dtypes.values()).most_common(1)[0][0]
    for name, dtype in dtypes.items():
        if dtype != common or not dtype.is_floating_point:
            raise TypeError(
                f"causal_linear_attention: {name} is {dtype}; query, key and value must be floating-point "
                f"tensors of one dtype, got {dtypes}"
            )


def causal_linear_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``out_i = sum_{j <= i} (q_i . k_j) v_j`` for ``[B, H, T, f]`` inputs (unnormalised); ``value``'s
    last dim may differ from the others'."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"causal_linear_attention: {name} must be a torch.Tensor [B, H, T, f], got {type(t).__name__}"
            )
    shapes = {name: tuple(t.shape) for name, t in (("query", query), ("key", key), ("value", value))}
    if (
        any(len(shape) != 4 for shape in shapes.values())
        or not shapes["query"] == shapes["key"]
        or shapes["value"][:3] != shapes["query"][:3]
    ):
        raise ValueError(
            "causal_linear_attention takes query and key of one shape [B, H, T, f] and value [B, H, T, f_v] "
            f"of the same B, H, T; got {shapes}"
        )
    _check_one_float_dtype({"query": query.dtype, "key": key.dtype, "value": value.dtype})
    scores = (query @ key.transpose(-1, -2)).tril()  # [B, H, T, T]
    return scores @ value


__all__ = ["causal_linear_attention", "naive_token_loop"]
