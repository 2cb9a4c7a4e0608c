"""The delta rule in chunks (the WY / UT form of FLA's chunk kernels), in pure torch.

Same numbers as :func:`innerloop.kernels.delta_chunk.naive.delta_rule_loop`, without a Python loop over
tokens: inside a chunk of ``C`` tokens one unit lower-triangular solve gives every token's pseudo-value
``u_t`` in terms of the state at the chunk's start; a loop over the ``T / C`` chunks then carries the
state. The derivation is in this folder's README.md. Autograd runs through it (exact to all orders).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from innerloop.core.functional import check_flag, log_segment_sums
from innerloop.kernels.delta_chunk.inputs import check_chunk_size, check_delta_inputs, compute_dtype

# Gate factors below tiny ** 0.75 (3e-29 in float32, 1e-231 in float64) are taken as 0: a term they scale
# is below 3e-29 times what the same data contributes undecayed, and the products of larger factors with
# data above tiny ** 0.25 (1e-10 in float32) stay normal numbers.
GATE_FLUSH = {dtype: torch.finfo(dtype).tiny ** 0.75 for dtype in (torch.float32, torch.float64)}


@dataclass(frozen=True)
class _Gates:
    """The decay factors of all chunks, from ``G_t = sum_{r <= t} log a_r`` (cumulated inside each chunk).

    ``N`` chunks of ``C`` tokens; ``t`` indexes rows (the reading token), ``s`` columns.
    """

    output: torch.Tensor  # [B, H, N, C, C]: exp(G_t - G_s) for s <= t, else 0
    error: torch.Tensor  # [B, H, N, C, C]: exp(R_t - G_s) for s < t (R: the error's read point; the
    # diagonal and above are never read: the triangular solve reads the strictly lower part only)
    error_start: torch.Tensor  # [B, H, N, C]: exp(R_t), R_t = G_t (decay first) or G_{t-1}
    query_start: torch.Tensor  # [B, H, N, C]: exp(G_t)
    to_end: torch.Tensor  # [B, H, N, C]: exp(G_{C-1} - G_s)
    whole: torch.Tensor  # [B, H, N]: exp(G_{C-1}), the chunk's decay of the state


def _gate_exp(exponent: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """``exp(exponent)`` where ``keep`` (all by default), else 0; factors below ``GATE_FLUSH`` are 0 too.

    Masked before ``exp``, so that the backward never meets ``inf * 0``. The flush keeps most subnormal
    numbers out of the matrix products (README: "Numerics"): on a CPU, arithmetic on them is tens of
    times slower, and strong gates produce them by the million.
    """
    drop = exponent < math.log(GATE_FLUSH[exponent.dtype])
    if keep is not None:
        drop = drop | ~keep
    return exponent.masked_fill(drop, float("-inf")).exp()


def _gates(decay_log: torch.Tensor, decay_first: bool) -> _Gates:
    """Decay factors from ``decay_log [B, H, N, C]`` (README: "Inside a chunk").

    The logs are summed in float64, then cast, and each ``G_t - G_s`` over its own terms
    (:func:`~innerloop.core.functional.log_segment_sums`), never as a difference of two cumulated sums:
    that difference carries ``|G| eps`` of rounding, which in float32 lost 1e-4 of every factor under
    strong gates and in float64 2e-12 after a few full resets (each a log of -800).
    """
    dtype, size = decay_log.dtype, decay_log.shape[-1]
    lower = torch.ones(size, size, dtype=torch.bool, device=decay_log.device).tril()
    logs = decay_log.to(torch.float64)
    cumulative = logs.cumsum(-1)  # G
    between = log_segment_sums(logs)  # [B, H, N, C, C]: G_t - G_s, for s <= t
    output = _gate_exp(between.to(dtype), lower)
    if decay_first:  # R = G: the error's factors are the strictly lower part of the output's
        error, read = output, cumulative
    else:  # R_t = G_{t-1}: row t of the error's exponents is row t - 1 of `between`
        error = _gate_exp(F.pad(between[..., :-1, :], (0, 0, 1, 0)).to(dtype), lower.tril(-1))
        read = F.pad(cumulative[..., :-1], (1, 0))
    return _Gates(
        output=output,
        error=error,
        error_start=_gate_exp(read.to(dtype)),
        query_start=_gate_exp(cumulative.to(dtype)),
        to_end=_gate_exp(between[..., -1, :].to(dtype)),  # G_{C-1} - G_s
        whole=_gate_exp(cumulative[..., -1].to(dtype)),
    )


@dataclass(frozen=True)
class _Chunks:
    """What each chunk contributes, computed for all chunks at once (no dependence on the state)."""

    pseudo_values: torch.Tensor  # [B, H, N, C, d_v]: u_t when the chunk starts from S = 0
    correction: torch.Tensor  # [B, H, N, C, d_k]: u_t = pseudo_values_t - correction_t @ S_start
    attention: torch.Tensor  # [B, H, N, C, C]: causal q_t . k_s with the decay from s to t
    queries: torch.Tensor  # [B, H, N, C, d_k]: q_t with the decay from the chunk start to t
    keys_to_end: torch.Tensor  # [B, H, N, C, d_k]: k_s with the decay from s to the chunk end
    whole_decay: torch.Tensor | None  # [B, H, N, 1, 1], or None without decay


def _intra_chunk(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, gates: _Gates | None
) -> _Chunks:
    """The UT transform of every chunk: ``(I + L) [U | W] = [diag(b) V | diag(b e^R) K]`` (README)."""
    beta_keys = k * beta[..., None]  # [B, H, N, C, d_k]
    lower = beta_keys @ k.mT  # [B, H, N, C, C]: L below the diagonal (b_t k_t . k_s), before the decay
    attention = q @ k.mT
    if gates is None:
        step_keys = beta_keys
        attention = attention.tril()
    else:
        lower = lower * gates.error
        step_keys = beta_keys * gates.error_start[..., None]
        attention = attention * gates.output
    right = torch.cat([v * beta[..., None], step_keys], dim=-1)  # [B, H, N, C, d_v + d_k]
    # Reads the strictly lower part of `lower` only (unit diagonal; its gradient is zero elsewhere too),
    # so neither the diagonal nor the upper triangle needs zeroing.
    solved = torch.linalg.solve_triangular(lower, right, upper=False, unitriangular=True)
    pseudo_values, correction = solved.split([v.shape[-1], k.shape[-1]], dim=-1)
    if gates is None:
        return _Chunks(pseudo_values, correction, attention, q, k, None)
    return _Chunks(
        pseudo_values=pseudo_values,
        correction=correction,
        attention=attention,
        queries=q * gates.query_start[..., None],
        keys_to_end=k * gates.to_end[..., None],
        whole_decay=gates.whole[..., None, None],
    )


def _inter_chunk(chunks: _Chunks, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Carry the state over the chunks: returns ``(U [B, H, N, C, d_v], starts [B, H, N, d_k, d_v], S_T)``."""
    # unbind, not [:, :, n]: the backward of each index would write a whole-size zero tensor per chunk
    per_chunk = [x.unbind(dim=2) for x in (chunks.pseudo_values, chunks.correction, chunks.keys_to_end)]
    decays = [None] * len(per_chunk[0]) if chunks.whole_decay is None else chunks.whole_decay.unbind(dim=2)
    values, starts = [], []
    for pseudo_values, correction, keys_to_end, decay in zip(*per_chunk, decays, strict=True):
        starts.append(state)
        u = pseudo_values - correction @ state  # [B, H, C, d_v]
        values.append(u)
        state = (state if decay is None else state * decay) + keys_to_end.mT @ u
    return torch.stack(values, dim=2), torch.stack(starts, dim=2), state


def _in_chunks(x: torch.Tensor, num_chunks: int, size: int) -> torch.Tensor:
    """``[B, H, T, ...] -> [B, H, N, C, ...]``, zero-padded at the end to ``N * C`` tokens."""
    missing = num_chunks * size - x.shape[2]
    if missing:
        x = F.pad(x, (0, 0) * (x.ndim - 3) + (0, missing))
    return x.reshape(*x.shape[:2], num_chunks, size, *x.shape[3:])


def chunk_delta_rule(
    q: torch.Tensor,  # [B, H, T, d_k]
    k: torch.Tensor,  # [B, H, T, d_k]
    v: torch.Tensor,  # [B, H, T, d_v]
    beta: torch.Tensor,  # [B, H, T]
    *,
    decay_log: torch.Tensor | None = None,  # [B, H, T]: log a_t (<= 0 for a decay)
    initial_state: torch.Tensor | None = None,  # [B, H, d_k, d_v]
    chunk_size: int = 64,
    decay_first: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The delta rule ``S_t = a_t S_{t-1} + beta_t k_t^T (v_t - k_t a_t S_{t-1})``, ``o_t = q_t S_t``, in chunks.

    Exactly :func:`~innerloop.kernels.delta_chunk.naive.delta_rule_loop` (same arguments, same
    ``decay_first`` orders; ``q`` unscaled) for any ``T``, in ``ceil(T / chunk_size)`` steps instead of
    ``T``. Returns ``(o [B, H, T, d_v]`` in the inputs' dtype``, S_T [B, H, d_k, d_v])`` in the
    compute dtype (float64 for float64 inputs, float32 otherwise: bf16 and fp16 are computed in
    float32). ``decay_log`` may be ``-inf`` (a full reset); it is meant to be ``<= 0``.
    """
    check_delta_inputs(q, k, v, beta, decay_log, initial_state)
    check_flag("decay_first", decay_first)  # a string or None would pick an order silently
    chunk_size = check_chunk_size(chunk_size)
    input_dtype, dtype = q.dtype, compute_dtype(q.dtype)
    batch, heads, tokens, key_dim = q.shape
    value_dim = v.shape[-1]
    state = q.new_zeros(batch, heads, key_dim, value_dim, dtype=dtype)
    if initial_state is not None:
        state = initial_state.to(dtype)
    if tokens == 0:
        return q.new_zeros(batch, heads, 0, value_dim), state
    size = min(chunk_size, tokens)
    num_chunks = -(-tokens // size)
    q, k, v, beta = (_in_chunks(x.to(dtype), num_chunks, size) for x in (q, k, v, beta))
    gates = None
    if decay_log is not None:
        log_gates = _in_chunks(decay_log.to(dtype), num_chunks, size)
        gates = _gates(log_gates.clamp_min(_log_floor(dtype)), decay_first)
    chunks = _intra_chunk(q, k, v, beta, gates)
    values, starts, final_state = _inter_chunk(chunks, state)
    out = chunks.queries @ starts + chunks.attention @ values  # [B, H, N, C, d_v]
    out = out.reshape(batch, heads, num_chunks * size, value_dim)[:, :, :tokens]
    return out.to(input_dtype), final_state


def _log_floor(dtype: torch.dtype) -> float:
    """A log gate below which ``exp`` is exactly 0 in ``dtype``: ``-inf`` (a full reset) is clamped to
    it, so that differences of cumulated logs stay finite (``-inf - -inf`` would be NaN)."""
    return -800.0 if dtype == torch.float64 else -120.0


__all__ = ["chunk_delta_rule"]
