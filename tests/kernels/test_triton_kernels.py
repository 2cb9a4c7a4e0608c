"""TTT-Linear and TTT-MLP: the naive references against the primal form, and the Triton kernels against
the naive references (run on CPU through Triton's interpreter, see conftest.py)."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from kernel_testing import make_inputs, primal_forward

from innerloop.core.functional import relative_error
from innerloop.kernels.spec import KernelInputs
from innerloop.kernels.triton import ttt_linear, ttt_mlp

# A child process under TRITON_INTERPRET=1 (conftest.py); slow: the child alone costs 8-18 s here (its
# start-up ~4 s), too much for the fast loop. `python -m pytest -m triton_interpreter` runs them all.
pytestmark = [pytest.mark.triton_interpreter, pytest.mark.slow]

TOL = 1e-4  # float32 kernels vs the float32 reference
TOL64 = 1e-10  # float64 reference vs the float64 primal form


@dataclass(frozen=True)
class Case:
    """One kernel package under test."""

    model: str
    package: ModuleType
    keys: tuple[str, ...]
    max_head_dim: int

    @property
    def fused(self) -> ModuleType:
        return self.package.fused

    @property
    def naive(self) -> ModuleType:
        return self.package.naive

    @property
    def names(self) -> tuple[str, ...]:
        return ("xq", "xk", "xv", "lr", "tau", *self.keys, "ln_weight", "ln_bias")

    def __str__(self) -> str:
        return self.model


CASES = [
    Case("linear", ttt_linear, ("W1", "b1"), 128),
    Case("mlp", ttt_mlp, ("W1", "b1", "W2", "b2"), 64),
]
each_kernel = pytest.mark.parametrize("case", CASES, ids=str)


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    for case in CASES:
        monkeypatch.setattr(case.fused, "POISON_OUTPUTS", True)


def _leaves(case, inputs):
    xq, xk, xv, lr, tau, params, ln_weight, ln_bias = inputs
    return [xq, xk, xv, lr, tau, *(params[k] for k in case.keys), ln_weight, ln_bias]


# ---------------------------------------------------------------- the naive reference itself


@each_kernel
@pytest.mark.parametrize("K,f,n_mb", [(4, 16, 3), (8, 16, 2), (16, 32, 1)])
def test_naive_dual_form_equals_primal_form_float64(case, K, f, n_mb):
    inputs = make_inputs(2, 2, K * n_mb, f, K, case.model, dtype=torch.float64, seed=K)
    out, params = case.naive.forward(*inputs)
    out_p, params_p = primal_forward(case.model, *inputs)
    assert relative_error(out, out_p) <= TOL64
    for key in params:
        assert relative_error(params[key], params_p[key]) <= TOL64, key


def _naive_decode_loop(inputs, decode_fn):
    """Feed the chunk token by token through ``decode_fn``; returns (out [B,H,T,f], final params)."""
    xq, xk, xv, lr, tau, params, ln_weight, ln_bias = inputs
    K = tau.shape[0]
    pending = {k: torch.zeros_like(v) for k, v in params.items()}
    outs = []
    for t in range(xq.shape[2]):
        i = t % K
        o, params, pending = decode_fn(
            xq[:, :, t], xk[:, :, t], xv[:, :, t], lr[:, :, t], tau[i], params, pending,
            ln_weight, ln_bias, 1e-6, i == K - 1,
        )  # fmt: skip
        outs.append(o)
    return torch.stack(outs, dim=2), params, pending


@each_kernel
def test_naive_decode_loop_equals_naive_chunk_float64(case):
    inputs = make_inputs(2, 3, 12, 16, 4, case.model, dtype=torch.float64, seed=1)
    out, params = case.naive.forward(*inputs)
    out_d, params_d, pending = _naive_decode_loop(inputs, case.naive.decode)
    assert relative_error(out_d, out) <= TOL64
    for key in params:
        assert relative_error(params_d[key], params[key]) <= TOL64, key
        assert torch.count_nonzero(pending[key]) == 0


# ---------------------------------------------------------------- the Triton kernels


# The edge cases are examples of their own, so that the drawn ones need not find them (25 drawn examples
# cost ~10 s of CPU per kernel in the interpreter; these 4 and 8 drawn, about half): batch rows and heads
# that index other data and weights, a last checkpoint group cut short (3 mini-batches in groups of 2), a
# group longer than the chunk, a checkpoint at every mini-batch, the largest head dim drawn (64, the MLP
# kernel's largest) and the smallest and largest mini-batch, and the new weights with and without a gradient.
@pytest.mark.slow  # ~5 s per kernel in the interpreter; like every triton_interpreter test (test_layer_dispatch's too), not in the fast loop
@each_kernel
@settings(max_examples=8, deadline=None)
@example(K=4, f=16, B=2, H=2, n_mb=3, checkpoint_every=2, grad_of_weights=True, seed=1)
@example(K=16, f=64, B=1, H=1, n_mb=1, checkpoint_every=3, grad_of_weights=False, seed=2)
@example(K=8, f=32, B=1, H=2, n_mb=3, checkpoint_every=1, grad_of_weights=True, seed=3)
@example(K=16, f=16, B=2, H=1, n_mb=2, checkpoint_every=3, grad_of_weights=False, seed=4)
@given(
    K=st.sampled_from([4, 8, 16]),
    f=st.sampled_from([16, 32, 64]),
    B=st.integers(1, 2),
    H=st.integers(1, 2),
    n_mb=st.integers(1, 3),
    checkpoint_every=st.integers(1, 3),
    grad_of_weights=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_kernel_forward_and_backward_match_naive(
    case, K, f, B, H, n_mb, checkpoint_every, grad_of_weights, seed
):
    inputs = make_inputs(B, H, K * n_mb, f, K, case.model, seed=seed, requires_grad=True)
    out, params = case.fused.forward(*inputs, checkpoint_every=checkpoint_every)
    out_ref, params_ref = case.naive.forward(*inputs)
    assert relative_error(out, out_ref) <= TOL
    for key in params_ref:
        assert params[key].dtype == params_ref[key].dtype
        assert relative_error(params[key], params_ref[key]) <= TOL, key

    gen = torch.Generator().manual_seed(seed + 1)
    cot_out = torch.randn(out.shape, generator=gen)
    cot = {k: torch.randn(v.shape, generator=gen) for k, v in params_ref.items()}

    def objective(o, p):
        total = (o * cot_out).sum()
        if grad_of_weights:  # otherwise the new weights get no gradient (None in the backward)
            total = total + sum((p[k] * cot[k]).sum() for k in p)
        return total

    grads = torch.autograd.grad(objective(out, params), _leaves(case, inputs))
    grads_ref = torch.autograd.grad(objective(out_ref, params_ref), _leaves(case, inputs))
    for name, g, g_ref in zip(case.names, grads, grads_ref, strict=True):
        assert g.shape == g_ref.shape, name
        assert relative_error(g, g_ref) <= TOL, name


@pytest.mark.slow  # ~3 s of interpretation; the layer tests through the kernel (test_layer_dispatch.py) are slow too
@each_kernel
@pytest.mark.parametrize("K,n_mb", [(1, 3), (5, 2), (12, 1), (64, 1)])
def test_kernel_any_mini_batch_size(case, K, n_mb):
    """K is padded to a power of two >= 16 inside the kernels; the padding must not leak."""
    inputs = make_inputs(1, 2, K * n_mb, 16, K, case.model, seed=K, requires_grad=True)
    out, params = case.fused.forward(*inputs, checkpoint_every=2)
    out_ref, params_ref = case.naive.forward(*inputs)
    assert relative_error(out, out_ref) <= TOL
    for key in params_ref:
        assert relative_error(params[key], params_ref[key]) <= TOL, key
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(K))
    grads = torch.autograd.grad((out * cot).sum(), _leaves(case, inputs))
    grads_ref = torch.autograd.grad((out_ref * cot).sum(), _leaves(case, inputs))
    for name, g, g_ref in zip(case.names, grads, grads_ref, strict=True):
        assert relative_error(g, g_ref) <= TOL, name


@pytest.mark.slow  # ~2 s of interpretation; test_layer_dispatch's decode through the kernel is slow too
@each_kernel
@pytest.mark.parametrize("f", [16, pytest.param(32, marks=pytest.mark.slow)])  # 32: ~3 s interpreted
def test_kernel_decode_matches_naive_decode(case, f):
    inputs = make_inputs(2, 2, 8, f, 4, case.model, seed=f)
    with torch.no_grad():
        out, params, pending = _naive_decode_loop(inputs, case.fused.decode)
        out_ref, params_ref, pending_ref = _naive_decode_loop(inputs, case.naive.decode)
        assert relative_error(out, out_ref) <= TOL
        for key in params_ref:
            assert relative_error(params[key], params_ref[key]) <= TOL, key
        # mid-mini-batch state: two tokens, pending sums non-zero
        xq, xk, xv, lr, tau, params0, lnw, lnb = inputs
        zero = {k: torch.zeros_like(v) for k, v in params0.items()}
        state = (params0, zero)
        state_ref = (params0, zero)
        for t in range(2):
            args = (xq[:, :, t], xk[:, :, t], xv[:, :, t], lr[:, :, t], tau[t])
            o, *state = case.fused.decode(*args, *state, lnw, lnb, 1e-6, False)
            o_ref, *state_ref = case.naive.decode(*args, *state_ref, lnw, lnb, 1e-6, False)
            assert relative_error(o, o_ref) <= TOL
        for key in params0:
            assert state[0][key] is params0[key]
            assert relative_error(state[1][key], state_ref[1][key]) <= TOL, key


@each_kernel
@pytest.mark.parametrize(
    "dtype,unit",
    [(torch.bfloat16, 2**-8), pytest.param(torch.float16, 2**-11, marks=pytest.mark.slow)],  # fp16: ~0.3 s
)
def test_kernel_half_precision_inputs(case, dtype, unit):
    """Half inputs: fp32 state and statistics inside, so the results are the fp32 answer (on the
    half-rounded inputs) up to the rounding of the stored results (``unit`` = 2^-p relative)."""
    inputs = make_inputs(1, 2, 16, 32, 8, case.model, dtype=dtype, seed=3)
    out, params = case.fused.forward(*inputs)
    assert out.dtype == dtype and all(p.dtype == dtype for p in params.values())
    inputs32 = [{k: v.float() for k, v in x.items()} if isinstance(x, dict) else x.float() for x in inputs]
    out_ref, params_ref = case.naive.forward(*inputs32)
    assert relative_error(out.float(), out_ref) <= unit
    for key in params_ref:
        assert relative_error(params[key].float(), params_ref[key]) <= unit, key


# ---------------------------------------------------------------- verify and argument checks


def _kin(**overrides):
    base = dict(
        device=torch.device("cpu"), dtype=torch.float32, head_dim=32, mini_batch_size=16,
        num_tokens=64, requires_grad=True,
    )  # fmt: skip
    base.update(overrides)
    return KernelInputs(**base)


@each_kernel
def test_verify_accepts_supported_inputs(case):
    assert case.package.verify(_kin()) is None
    assert (
        case.package.verify(_kin(dtype=torch.bfloat16, head_dim=case.max_head_dim, mini_batch_size=4)) is None
    )


@each_kernel
@pytest.mark.parametrize(
    "overrides,words",
    [
        (dict(dtype=torch.float64), "dtype"),
        (dict(head_dim=24), "head_dim"),
        (dict(head_dim="twice the maximum"), "head_dim"),
        (dict(mini_batch_size=128, num_tokens=256), "mini_batch_size"),
        (dict(num_tokens=40), "num_tokens"),
        (dict(needs_double_backward=True), "double backward"),
        (dict(device=torch.device("meta")), "device"),
    ],
)
def test_verify_names_the_failing_property(case, overrides, words):
    if overrides.get("head_dim") == "twice the maximum":
        overrides = {**overrides, "head_dim": 2 * case.max_head_dim}
    reason = case.package.verify(_kin(**overrides))
    assert reason is not None and words in reason


@each_kernel
def test_verify_refuses_cpu_without_interpreter(case, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    reason = case.package.verify(_kin())
    assert reason is not None and "TRITON_INTERPRET" in reason


@each_kernel
def test_bad_inputs_raise_clear_errors(case):
    xq, xk, xv, lr, tau, params, lnw, lnb = make_inputs(1, 1, 16, 16, 4, case.model)
    with pytest.raises(ValueError, match="multiple of the mini-batch size"):
        case.fused.forward(xq, xk, xv, lr, tau[:3], params, lnw, lnb)
    with pytest.raises(ValueError, match=r"params\['W1'\]"):
        case.fused.forward(xq, xk, xv, lr, tau, {**params, "W1": params["W1"][..., :8]}, lnw, lnb)
    with pytest.raises(ValueError, match="head_dim"):
        case.fused.forward(*make_inputs(1, 1, 8, 8, 4, case.model))
    with pytest.raises(ValueError, match="checkpoint_every"):
        case.fused.forward(xq, xk, xv, lr, tau, params, lnw, lnb, checkpoint_every=0)
    with pytest.raises(ValueError, match="missing"):
        case.fused.forward(xq, xk, xv, lr, tau, {"W1": params["W1"]}, lnw, lnb)
    with pytest.raises(ValueError, match="lr must be"):
        case.fused.forward(xq, xk, xv, lr[..., :8], tau, params, lnw, lnb)
