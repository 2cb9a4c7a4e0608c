"""The delta rule token by token: the reference the chunked form must equal.

Per batch and head, with row vectors ``q_t, k_t [d_k]``, ``v_t [d_v]``, a step ``beta_t`` and a gate
``a_t = exp(decay_log_t)`` (1 without ``decay_log``), the state ``S [d_k, d_v]`` evolves as

    decay_first=True  (DeltaNet, Gated DeltaNet):   S_t = a_t S_{t-1} + beta_t k_t^T (v_t - k_t a_t S_{t-1})
    decay_first=False (innerloop's dual_form, K=1): S_t = a_t S_{t-1} + beta_t k_t^T (v_t - k_t S_{t-1})

and every token reads the state after its own step: ``o_t = q_t S_t``. ``q`` is used as given (no
``d_k ** -0.5`` scale: the caller scales). The two orders coincide without decay. This is a plain
Python loop over tokens, written for clarity; it is exact to all orders of differentiation. The gate may
also be given as ``a_t`` itself (``gate``): then its gradient is exact at ``a_t = 0`` too, where the one
w.r.t. ``a_t`` through ``decay_log = log a_t`` cannot be recovered (``d a / d log a = a = 0``).
"""

from __future__ import annotations

import torch

from innerloop.core.functional import check_flag
from innerloop.kernels.delta_chunk.inputs import check_delta_inputs, compute_dtype


def delta_rule_loop(
    q: torch.Tensor,  # [B, H, T, d_k]
    k: torch.Tensor,  # [B, H, T, d_k]
    v: torch.Tensor,  # [B, H, T, d_v]
    beta: torch.Tensor,  # [B, H, T]
    *,
    decay_log: torch.Tensor | None = None,  # [B, H, T]: log a_t
    gate: torch.Tensor | None = None,  # [B, H, T]: a_t itself, instead of decay_log
    initial_state: torch.Tensor | None = None,  # [B, H, d_k, d_v]
    decay_first: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The delta rule, one token at a time (module docstring). Returns ``(o [B, H, T, d_v], S_T)``.

    ``o`` has the inputs' dtype; the final state has the compute dtype (float64 for float64 inputs,
    float32 otherwise) and equals ``initial_state`` (or zeros) when ``T = 0``.
    """
    check_delta_inputs(q, k, v, beta, decay_log, initial_state, gate=gate)
    check_flag("decay_first", decay_first)  # a string or None would pick an order silently
    input_dtype, dtype = q.dtype, compute_dtype(q.dtype)
    batch, heads, tokens, key_dim = q.shape
    value_dim = v.shape[-1]
    q, k, v, beta = (x.to(dtype) for x in (q, k, v, beta))
    if initial_state is None:
        state = q.new_zeros(batch, heads, key_dim, value_dim)
    else:
        state = initial_state.to(dtype)
    outputs = []
    for t in range(tokens):
        k_t = k[:, :, t]  # [B, H, d_k]
        decayed = state
        if decay_log is not None:
            decayed = state * decay_log[:, :, t, None, None].to(dtype).exp()
        if gate is not None:
            decayed = state * gate[:, :, t, None, None].to(dtype)
        read = decayed if decay_first else state  # the state the prediction error is read on
        error = v[:, :, t] - torch.einsum("bhk,bhkv->bhv", k_t, read)  # [B, H, d_v]
        state = decayed + beta[:, :, t, None, None] * k_t[..., :, None] * error[..., None, :]
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], state))
    if not outputs:
        return q.new_zeros(batch, heads, 0, value_dim, dtype=input_dtype), state
    return torch.stack(outputs, dim=2).to(input_dtype), state


__all__ = ["delta_rule_loop"]
