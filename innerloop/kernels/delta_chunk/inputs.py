"""Checking the delta rule's inputs once, for the chunked form and its token loop alike.

Both functions take the same arguments (layout ``[B, H, T, d]``, innerloop's) and refuse bad ones with
an error that names the parameter, what was given and what is valid. Half-precision inputs are
computed in float32; float64 stays float64.
"""

from __future__ import annotations

import torch

from innerloop.core.functional import as_integer

SUPPORTED_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything else (bf16 and fp16 included)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _shape(tensor: torch.Tensor) -> str:
    return f"[{', '.join(str(n) for n in tensor.shape)}]"


def _require_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in SUPPORTED_DTYPES:
        valid = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        raise TypeError(f"{name} must have a floating dtype ({valid}), got {value.dtype}")
    return value


#: The names errors give the arguments: the delta rule's own. A caller whose parameters are named otherwise
#: (the kernel adapter's ``xq``, ``lr``, ``params['W']``, ...) passes its names (:func:`check_delta_inputs`).
DELTA_NAMES = {name: name for name in ("q", "k", "v", "beta", "decay_log", "gate", "initial_state")}


def _require_shape(
    name: str, tensor: torch.Tensor, expected: tuple[int, ...], layout: str, source: str = "q and v"
) -> None:
    if tuple(tensor.shape) != expected:
        wanted = f"[{', '.join(str(n) for n in expected)}]"
        raise ValueError(f"{name} must have shape {layout} = {wanted} (from {source}), got {_shape(tensor)}")


def _require_readable_dtypes(
    dtype: torch.dtype, named: dict[str, torch.Tensor | None], q_name: str = "q"
) -> None:
    """A TypeError naming the first step, gate or state whose dtype is neither ``dtype`` (q's) nor the
    compute dtype: a float64 one with float32 q would be rounded to float32 silently."""
    valid = sorted({str(dtype).removeprefix("torch."), str(compute_dtype(dtype)).removeprefix("torch.")})
    for name, tensor in named.items():
        if tensor is not None and tensor.dtype not in (dtype, compute_dtype(dtype)):
            raise TypeError(
                f"{name} is {tensor.dtype} but {q_name} is {dtype}: it must be {' or '.join(valid)} ({q_name}'s "
                f"dtype or the compute dtype); cast it, or cast {q_name} and the other inputs to {tensor.dtype}"
            )


def check_delta_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    decay_log: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    *,
    gate: torch.Tensor | None = None,
    names: dict[str, str] | None = None,
) -> None:
    """Raise a clear error unless the arguments describe one delta-rule problem (see module docstring).

    ``q, k [B, H, T, d_k]``, ``v [B, H, T, d_v]``, ``beta``, ``decay_log`` and ``gate`` (the token loop's
    alternative to ``decay_log``: ``a_t`` itself; not both) ``[B, H, T]``, ``initial_state [B, H, d_k, d_v]``; ``q, k, v`` share a dtype, and the others have it or the compute
    dtype (float32 gates and state with half-precision q); everything is on one device. ``names``: what
    the errors call each argument (by default :data:`DELTA_NAMES`, the names here), for a caller whose
    own parameters these are under other names.
    """
    n = {**DELTA_NAMES, **(names or {})}
    q = _require_tensor(n["q"], q)
    if q.ndim != 4:
        raise ValueError(f"{n['q']} must have shape [B, H, T, d_k] (4 dims), got {_shape(q)}")
    batch, heads, tokens, key_dim = q.shape
    source = f"{n['q']} and {n['v']}"
    _require_shape(n["k"], _require_tensor(n["k"], k), tuple(q.shape), "[B, H, T, d_k]", source)
    v = _require_tensor(n["v"], v)
    if v.ndim != 4 or tuple(v.shape[:3]) != (batch, heads, tokens):
        raise ValueError(
            f"{n['v']} must have shape [B, H, T, d_v] = [{batch}, {heads}, {tokens}, d_v], got {_shape(v)}"
        )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(
            f"{n['q']}, {n['k']} and {n['v']} must share a dtype, got {n['q']} {q.dtype}, {n['k']} {k.dtype}, "
            f"{n['v']} {v.dtype}"
        )
    value_dim = v.shape[-1]
    optional = {"decay_log": decay_log, "gate": gate, "initial_state": initial_state}
    _require_shape(n["beta"], _require_tensor(n["beta"], beta), (batch, heads, tokens), "[B, H, T]", source)
    if decay_log is not None and gate is not None:
        raise ValueError(f"give the gate as {n['decay_log']} (log a_t) or as {n['gate']} (a_t), not both")
    for name in ("decay_log", "gate"):
        if optional[name] is not None:
            tensor = _require_tensor(n[name], optional[name])
            _require_shape(n[name], tensor, (batch, heads, tokens), "[B, H, T]", source)
    if initial_state is not None:
        state = _require_tensor(n["initial_state"], initial_state)
        layout = "[B, H, d_k, d_v]"
        _require_shape(n["initial_state"], state, (batch, heads, key_dim, value_dim), layout, source)
    named = {n[name]: tensor for name, tensor in {"beta": beta, **optional}.items()}
    _require_readable_dtypes(q.dtype, named, n["q"])
    for name, tensor in {n["k"]: k, n["v"]: v, **named}.items():
        if tensor is not None and tensor.device != q.device:
            raise ValueError(
                f"{name} is on {tensor.device} but {n['q']} is on {q.device}; put all inputs on one device"
            )


def check_chunk_size(chunk_size: object) -> int:
    """The chunk size as an int >= 1 (a numpy integer is one), or a clear error."""
    size = as_integer(chunk_size)
    if size is None or size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    return size


__all__ = ["DELTA_NAMES", "SUPPORTED_DTYPES", "check_chunk_size", "check_delta_inputs", "compute_dtype"]
