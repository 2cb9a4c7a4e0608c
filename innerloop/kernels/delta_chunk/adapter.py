"""The chunked delta rule in the kernel call signature: DeltaNet as innerloop's dual_form at K = 1.

With the ``matrix`` inner model (``g(x) = x W``, state ``{"W": [B, H, f, f]}``), the reconstruction loss
``1/2 ||x_k W - x_v||^2``, no inner LayerNorm or residual and mini-batches of one token, the dual form is
``W_t = a_t W_{t-1} - tau_0 lr_t x_k^T (x_k W_{t-1} - x_v)`` and ``out_t = x_q W_t``: the delta rule with
``beta = tau_0 lr`` and the gradient read on the undecayed state (``decay_first=False``), ``a = 1 - decay``
(the project's shared ZOO.md, sections b and c). :func:`delta_rule_kernel_forward` takes a
:class:`~innerloop.kernels.spec.KernelForward`'s parameters (plus ``decay``, ``chunk_size``);
:func:`verify` says when it applies; :func:`kernel_spec` builds the registration (made by
``plugins/kernels.py``).
"""

from __future__ import annotations

import torch

from innerloop.core.protocol import Params
from innerloop.kernels.delta_chunk.chunk import chunk_delta_rule
from innerloop.kernels.delta_chunk.inputs import SUPPORTED_DTYPES, check_delta_inputs
from innerloop.kernels.delta_chunk.naive import delta_rule_loop
from innerloop.kernels.spec import KernelInputs, KernelSpec

KERNEL_NAME = "delta_chunk"
STATE_KEY = "W"  # the matrix inner model's weight
# Below this gate a = 1 - decay, the gradient w.r.t. decay is computed token by token (linear_gates_needed):
# through the chunked form's log gates it has an absolute error of ~eps in d/d(log a) = a * d/da, so
# ~eps / a relative in d/d(decay) (measured 7e-13 at a = 1e-4, 8e-5 at a = 1e-12, NaN at a = 0, float64).
SMALL_GATE = 1e-5
#: What :func:`delta_rule_kernel_forward`'s errors call the delta rule's arguments: its own parameters.
KERNEL_ARGUMENT_NAMES = {
    "q": "xq",
    "k": "xk",
    "v": "xv",
    "beta": "lr",
    "decay_log": "decay_log",
    "gate": "decay",
    "initial_state": f"params[{STATE_KEY!r}]",
}


def delta_rule_kernel_forward(
    xq: torch.Tensor,  # [B, H, T, f]
    xk: torch.Tensor,  # [B, H, T, f]
    xv: torch.Tensor,  # [B, H, T, f]
    lr: torch.Tensor,  # [B, H, T]
    tau: torch.Tensor,  # [1]: mini-batches of one token
    params: Params,  # {"W": [B, H, f, f]}
    ln_weight: torch.Tensor,  # unused: no inner LayerNorm (verify refuses layers with one)
    ln_bias: torch.Tensor,
    eps: float,
    decay: torch.Tensor | None = None,  # [B, H, T]: 1 - a_t, in [0, 1]
    chunk_size: int = 64,
    decay_log: torch.Tensor | None = None,  # [B, H, T]: log a_t (<= 0), instead of decay
) -> tuple[torch.Tensor, Params]:
    """``(out [B, H, T, f], {"W": W_T})`` of the dual form at K = 1 (module docstring), in chunks.

    The gate comes as ``decay = 1 - a`` or as ``decay_log = log a`` (not both). ``decay_log`` is used as
    it is: a small ``a`` keeps its precision (``log1p(-decay)`` of a float32 ``decay`` near 1 is off by up
    to ``eps / a``) and the gradient w.r.t. ``log a`` is exact, so the token loop is never needed for it."""
    if set(params) != {STATE_KEY}:
        raise ValueError(
            f"params must hold the matrix model's weight only, {{{STATE_KEY!r}}}, got {sorted(params)}"
        )
    if tau.numel() != 1:
        raise ValueError(f"tau must hold one scale (mini_batch_size=1), got shape {list(tau.shape)}")
    if decay is not None and decay_log is not None:
        raise ValueError("give the gate as decay (1 - a) or as decay_log (log a), not both")
    gate_why = "the gate a = 1 - decay is taken in log space"
    high = 0.0 if decay is None else _checked_range("decay", decay, 0.0, 1.0, gate_why)  # largest decay
    if decay_log is not None:
        _checked_range("decay_log", decay_log, -torch.inf, 0.0, "log a of a gate a in [0, 1]")
    weights = params[STATE_KEY]
    # checked here, under these names: the chunked form and the token loop check them again under theirs
    check_delta_inputs(xq, xk, xv, lr, decay_log, weights, gate=decay, names=KERNEL_ARGUMENT_NAMES)
    beta = lr * tau.reshape(())
    if decay is not None:
        if linear_gates_needed(decay, high):
            return _token_loop(xq, xk, xv, beta, weights, gate=1 - decay)
        decay_log = torch.log1p(-decay)  # -inf where decay = 1: chunk_delta_rule clamps it (a full reset)
    finite_logs = (
        None if decay_log is None else decay_log.clamp_min(-1e4)
    )  # -inf: a full reset, not bad input
    if not _all_finite(xk, xv, lr, weights, decay, finite_logs):
        # NaN/inf (non_finite="ignore", or ops.scan) must spread to later tokens only, as on the torch
        # path; a chunk's masked products (0 * NaN) would carry it to the chunk's earlier tokens too
        gate = {} if decay is None else {"gate": 1 - decay}
        return _token_loop(xq, xk, xv, beta, weights, **(gate or {"decay_log": decay_log}))
    out, final = chunk_delta_rule(
        xq,
        xk,
        xv,
        beta,
        decay_log=decay_log,
        initial_state=weights,
        chunk_size=chunk_size,
        decay_first=False,
    )
    return out, {STATE_KEY: final.to(weights.dtype)}


def _checked_range(name: str, gate: torch.Tensor, low_bound: float, high_bound: float, why: str) -> float:
    """The largest value of ``gate`` (``name``) after checking that it lies in ``[low_bound, high_bound]``
    (one sync; a NaN, from a NaN input under ``non_finite="ignore"``, is let through to spread within its
    sequence, as on every path)."""
    checked = gate.detach()
    filler = 0.5 if low_bound == 0.0 else -1.0
    low, high = torch.stack(torch.aminmax(checked.masked_fill(torch.isnan(checked), filler))).tolist()
    if not (low >= low_bound and high <= high_bound):
        raise ValueError(
            f"{name} must lie in [{low_bound}, {high_bound}] ({why}), got values in [{low}, {high}]"
        )
    return high


def _all_finite(*tensors: torch.Tensor | None) -> bool:
    """Whether every given tensor holds finite values only: one sum each (at least float32) and one sync.
    A NaN or inf makes its sum NaN or inf; so may finite values whose sum overflows (then the token
    loop runs, with the same numbers, slower). ``isfinite(t).all()`` costs 25x a float32 sum on CPU."""
    sums = [
        t.detach().sum(dtype=torch.promote_types(t.dtype, torch.float32)).to(torch.float32)
        for t in tensors
        if t is not None
    ]
    return bool(torch.stack(sums).isfinite().all())


def _token_loop(
    xq: torch.Tensor,
    xk: torch.Tensor,
    xv: torch.Tensor,
    beta: torch.Tensor,
    weights: torch.Tensor,
    gate: torch.Tensor | None = None,
    decay_log: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Params]:
    """The delta rule token by token (the torch path's numbers), the gate as ``a`` (``gate``, linear space)
    or as ``log a`` (``decay_log``), or none."""
    out, final = delta_rule_loop(
        xq, xk, xv, beta, decay_log=decay_log, gate=gate, initial_state=weights, decay_first=False
    )
    return out, {STATE_KEY: final.to(weights.dtype)}


def linear_gates_needed(decay: torch.Tensor, largest: float) -> bool:
    """Whether the gradient w.r.t. ``decay`` (whose largest value is ``largest``) must be taken with the
    gates in linear space (the token loop).

    The chunked form takes the gate ``a = 1 - decay`` as ``log a``: its gradient w.r.t. ``decay``,
    ``(a * d/da) * (-1 / a)``, loses ``eps / a`` of itself and is NaN at a full reset (``decay = 1``),
    where the true ``-d/da`` is finite. So when a graph is recorded through ``decay`` and some gate is
    below :data:`SMALL_GATE`, :func:`delta_rule_kernel_forward` runs the token loop on ``a`` itself
    (the torch path's speed, exact to all orders). The log gates' outputs are exact either way.
    """
    return torch.is_grad_enabled() and decay.requires_grad and largest > 1 - SMALL_GATE


def mini_batch_size_refusal(mini_batch_size: int) -> str | None:
    """None at ``mini_batch_size = 1`` (the delta rule), else why the kernel does not run it: asked at a
    layer's construction (``KernelSpec.check_mini_batch_size``) and by :func:`verify`."""
    if mini_batch_size != 1:
        return (
            f"{KERNEL_NAME}: the delta rule is the dual form with mini_batch_size=1, got "
            f"{mini_batch_size} (K > 1 is mini-batch gradient descent, another recurrence)"
        )
    return None


def wrapping_refusal(inner_norm: bool, inner_residual: bool) -> str | None:
    """None for a layer with the inner LayerNorm and residual off (the kernel computes the bare ``q W``),
    else why not: asked at a layer's construction (``KernelSpec.check_wrapping``) and by :func:`verify`."""
    if inner_norm or inner_residual:
        return (
            f"{KERNEL_NAME}: computes out = q W without the inner LayerNorm and residual, which this layer "
            f"uses (inner_norm={inner_norm}, inner_residual={inner_residual})"
        )
    return None


def verify(inputs: KernelInputs) -> str | None:
    """None when the chunked delta rule computes this block, else why not."""
    refusal = mini_batch_size_refusal(inputs.mini_batch_size) or wrapping_refusal(
        bool(inputs.extra.get("norm")), bool(inputs.extra.get("residual"))
    )
    if refusal is not None:
        return refusal
    if inputs.dtype not in SUPPORTED_DTYPES:
        return f"{KERNEL_NAME}: dtype {inputs.dtype} is not one of {[str(d) for d in SUPPORTED_DTYPES]}"
    return None


def kernel_spec(priority: int = 1) -> KernelSpec:
    """The registration for (matrix, reconstruction, dual_form); any device, autograd to all orders."""
    return KernelSpec(
        name=KERNEL_NAME,
        inner_model="matrix",
        inner_loss="reconstruction",
        update_rule="dual_form",
        forward=delta_rule_kernel_forward,
        verify=verify,
        priority=priority,
        description="the delta rule (DeltaNet, Gated DeltaNet) in chunks (WY / UT form), pure torch",
        supports_decay=True,
        fuses_inner_norm=False,
        check_mini_batch_size=mini_batch_size_refusal,
        check_wrapping=wrapping_refusal,
    )


__all__ = [
    "KERNEL_NAME",
    "SMALL_GATE",
    "delta_rule_kernel_forward",
    "kernel_spec",
    "mini_batch_size_refusal",
    "linear_gates_needed",
    "verify",
]
