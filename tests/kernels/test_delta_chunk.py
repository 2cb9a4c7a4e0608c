"""The chunked delta rule (innerloop/kernels/delta_chunk/) equals the token loop and FLA's naive ops.

Oracles: ``delta_rule_loop`` (the token recurrence, in this folder's sense) and FLA 0.6.0's
``delta_rule_recurrence`` and ``naive_recurrent_gated_delta_rule``. FLA's naive ops compute in float32;
as ZOO.md explains, their source is run with float32 replaced by float64 for the float64 comparisons
(:func:`in_float64`), and the float32 originals are compared at float32 accuracy.
"""

from __future__ import annotations

import inspect
import textwrap

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from innerloop.core.functional import relative_error
from innerloop.kernels.delta_chunk import chunk_delta_rule, delta_rule_loop
from innerloop.kernels.delta_chunk.adapter import delta_rule_kernel_forward, kernel_spec, verify
from innerloop.kernels.spec import KernelInputs

EXACT = 1e-10  # float64: both forms are exact up to rounding (measured ~1e-15)

# Importing fla.ops loads all of FLA's ops (5-10 s once per process here), so the FLA comparisons are
# marked slow: CI runs them, the quick local loop (-m "not slow") keeps the token-loop oracle.
needs_fla = pytest.mark.slow


def make_problem(B, H, T, d_k, d_v, *, decay=False, initial=False, dtype=torch.float64, seed=0):
    """A stable delta-rule problem: unit keys, beta in (0, 1.5), log gates in (-1, 0]."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    problem = {
        "q": rnd(B, H, T, d_k) * d_k**-0.5,
        "k": F.normalize(rnd(B, H, T, d_k), dim=-1),
        "v": rnd(B, H, T, d_v),
        "beta": 1.5 * torch.rand(B, H, T, generator=gen, dtype=torch.float64),
        "decay_log": -torch.rand(B, H, T, generator=gen, dtype=torch.float64) if decay else None,
        "initial_state": rnd(B, H, d_k, d_v) if initial else None,
    }
    return {name: None if t is None else t.to(dtype) for name, t in problem.items()}


def run(function, problem, **options):
    q, k, v, beta = (problem[n] for n in ("q", "k", "v", "beta"))
    return function(
        q, k, v, beta, decay_log=problem["decay_log"], initial_state=problem["initial_state"], **options
    )


shapes = st.tuples(
    st.integers(1, 2),  # B
    st.integers(1, 3),  # H
    st.integers(0, 70),  # T: empty, shorter than a chunk, not a multiple of it
    st.integers(1, 12),  # d_k
    st.integers(1, 12),  # d_v
)


@given(
    shape=shapes,
    chunk_size=st.sampled_from([1, 2, 3, 8, 16, 64]),
    decay=st.booleans(),
    initial=st.booleans(),
    decay_first=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_chunked_form_equals_the_token_loop_in_float64(shape, chunk_size, decay, initial, decay_first, seed):
    problem = make_problem(*shape, decay=decay, initial=initial, seed=seed)
    out, state = run(chunk_delta_rule, problem, chunk_size=chunk_size, decay_first=decay_first)
    expected_out, expected_state = run(delta_rule_loop, problem, decay_first=decay_first)
    assert out.shape == expected_out.shape and state.shape == expected_state.shape
    assert relative_error(out, expected_out) <= EXACT
    assert relative_error(state, expected_state) <= EXACT


def in_float64(function):
    """FLA's naive ``function`` with its float32 casts turned into float64 ones (ZOO.md's trick).

    The rewritten source must differ from the original (a version of FLA that no longer casts this way
    fails here instead of silently comparing float32 numbers).
    """
    source = textwrap.dedent(inspect.getsource(function))
    rewritten = source.replace(".float()", ".double()").replace("torch.float32", "torch.float64")
    assert rewritten != source, f"{function.__name__}: no float32 cast found to rewrite"
    assert "float32" not in rewritten and ".float()" not in rewritten
    namespace = dict(function.__globals__)
    exec(compile(rewritten, f"<{function.__name__} in float64>", "exec"), namespace)  # noqa: S102
    return namespace[function.__name__]


def fla_delta_rule(problem, float64: bool):
    """FLA's ``delta_rule_recurrence`` ([B, H, T, d]; it scales q by d_k^-0.5: given q / that scale)."""
    from fla.ops.delta_rule.naive import delta_rule_recurrence

    function = in_float64(delta_rule_recurrence) if float64 else delta_rule_recurrence
    q = problem["q"] * problem["q"].shape[-1] ** 0.5
    return function(q, problem["k"], problem["v"], problem["beta"], initial_state=problem["initial_state"])


def fla_gated_delta_rule(problem, float64: bool):
    """FLA's ``naive_recurrent_gated_delta_rule`` ([B, T, H, d] layout, ``scale=1``: q as given)."""
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule

    function = in_float64(naive_recurrent_gated_delta_rule) if float64 else naive_recurrent_gated_delta_rule
    q, k, v = (problem[n].transpose(1, 2) for n in ("q", "k", "v"))
    beta, g = (problem[n].transpose(1, 2) for n in ("beta", "decay_log"))
    out, state = function(
        q, k, v, beta, g, scale=1.0, initial_state=problem["initial_state"], output_final_state=True
    )
    return out.transpose(1, 2), state


@needs_fla
@given(
    shape=shapes, chunk_size=st.sampled_from([1, 4, 16, 64]), initial=st.booleans(), seed=st.integers(0, 99)
)
def test_deltanet_equals_fla_delta_rule_recurrence_in_float64(shape, chunk_size, initial, seed):
    problem = make_problem(*shape, initial=initial, seed=seed)
    out, state = run(chunk_delta_rule, problem, chunk_size=chunk_size)
    expected_out, expected_state = fla_delta_rule(problem, float64=True)
    assert expected_out.dtype == torch.float64
    assert relative_error(out, expected_out) <= EXACT
    assert relative_error(state, expected_state) <= EXACT


@needs_fla
@given(
    shape=shapes, chunk_size=st.sampled_from([1, 4, 16, 64]), initial=st.booleans(), seed=st.integers(0, 99)
)
def test_gated_deltanet_equals_fla_naive_recurrent_gated_delta_rule_in_float64(
    shape, chunk_size, initial, seed
):
    problem = make_problem(*shape, decay=True, initial=initial, seed=seed)
    out, state = run(chunk_delta_rule, problem, chunk_size=chunk_size)
    expected_out, expected_state = fla_gated_delta_rule(problem, float64=True)
    assert expected_out.dtype == torch.float64
    assert relative_error(out, expected_out) <= EXACT
    assert relative_error(state, expected_state) <= EXACT


@needs_fla
@pytest.mark.parametrize("gated", [False, True])
def test_float32_matches_fla_float32_within_fla_own_float32_error(gated):
    """In float32 both are rounded: ours must be as close to the float64 truth as FLA's float32 op is
    (within a factor 4, or 2e-6 where FLA happens to be closer still)."""
    shape = (2, 3, 200, 16, 16)
    problem = make_problem(*shape, decay=gated, initial=True, seed=5)
    problem32 = {n: None if t is None else t.float() for n, t in problem.items()}
    fla = fla_gated_delta_rule if gated else fla_delta_rule
    truth_out, truth_state = fla(problem, float64=True)
    fla_out, fla_state = fla(problem32, float64=False)
    out, state = run(chunk_delta_rule, problem32, chunk_size=64)
    assert out.dtype == torch.float32 and state.dtype == torch.float32
    for ours, theirs, truth in ((out, fla_out, truth_out), (state, fla_state, truth_state)):
        assert relative_error(ours, truth) <= max(4 * relative_error(theirs, truth), 2e-6)


@given(
    shape=shapes.filter(lambda s: s[2] >= 2),
    cut=st.floats(0.0, 1.0),
    chunk_size=st.sampled_from([1, 3, 16]),
    decay=st.booleans(),
    decay_first=st.booleans(),
    seed=st.integers(0, 99),
)
def test_state_carry_split_equals_whole(shape, cut, chunk_size, decay, decay_first, seed):
    problem = make_problem(*shape, decay=decay, initial=True, seed=seed)
    split = round(cut * shape[2])
    options = {"chunk_size": chunk_size, "decay_first": decay_first}
    whole_out, whole_state = run(chunk_delta_rule, problem, **options)
    head = {n: t if n == "initial_state" or t is None else t[:, :, :split] for n, t in problem.items()}
    tail = {n: t if n == "initial_state" or t is None else t[:, :, split:] for n, t in problem.items()}
    head_out, head_state = run(chunk_delta_rule, head, **options)
    tail_out, tail_state = run(chunk_delta_rule, {**tail, "initial_state": head_state}, **options)
    assert relative_error(torch.cat([head_out, tail_out], dim=2), whole_out) <= EXACT
    assert relative_error(tail_state, whole_state) <= EXACT


def gradients(function, problem, cotangents, **options):
    """d <(o, S_T), cotangents> / d every input, through ``function``."""
    leaves = {n: t.clone().requires_grad_(True) for n, t in problem.items() if t is not None}
    out, state = run(function, {**problem, **leaves}, **options)
    objective = (out * cotangents[0]).sum() + (state * cotangents[1]).sum()
    return dict(zip(leaves, torch.autograd.grad(objective, list(leaves.values())), strict=True))


@given(
    shape=shapes.filter(lambda s: s[2] >= 1),
    chunk_size=st.sampled_from([1, 4, 16]),
    decay=st.booleans(),
    decay_first=st.booleans(),
    seed=st.integers(0, 99),
)
def test_gradients_equal_autograd_through_the_token_loop_in_float64(
    shape, chunk_size, decay, decay_first, seed
):
    B, H, T, d_k, d_v = shape
    problem = make_problem(*shape, decay=decay, initial=True, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    cotangents = (
        torch.randn(B, H, T, d_v, generator=gen, dtype=torch.float64),
        torch.randn(B, H, d_k, d_v, generator=gen, dtype=torch.float64),
    )
    got = gradients(chunk_delta_rule, problem, cotangents, chunk_size=chunk_size, decay_first=decay_first)
    expected = gradients(delta_rule_loop, problem, cotangents, decay_first=decay_first)
    assert set(got) == {"q", "k", "v", "beta", "initial_state"} | ({"decay_log"} if decay else set())
    for name in got:
        assert relative_error(got[name], expected[name]) <= EXACT, name


@pytest.mark.parametrize("decay_first", [True, False])
def test_gradcheck_and_gradgradcheck_through_the_chunked_form(decay_first):
    """Autograd through the chunked form is exact to second order (the adapter needs no refusal of
    ``needs_double_backward``); 5 tokens in chunks of 2: two whole chunks and a padded one."""
    problem = make_problem(1, 1, 5, 2, 2, decay=True, initial=True, seed=3)
    names = list(problem)
    inputs = tuple(problem[n].clone().requires_grad_(True) for n in names)

    def function(*tensors):
        given_problem = dict(zip(names, tensors, strict=True))
        return run(chunk_delta_rule, given_problem, chunk_size=2, decay_first=decay_first)

    assert torch.autograd.gradcheck(function, inputs, fast_mode=True)
    assert torch.autograd.gradgradcheck(function, inputs, fast_mode=True)


@pytest.mark.parametrize("gate_strength", [1.0, 20.0])
def test_float32_error_is_within_a_small_factor_of_the_token_loops(gate_strength):
    """Long sequence, float32: error to the float64 truth at most 4x the token loop's (or 2e-6). Strong
    gates (log a down to -20) reach the flushed factors (GATE_FLUSH in chunk.py)."""
    problem = make_problem(2, 2, 512, 32, 32, decay=True, initial=True, seed=7)
    problem["decay_log"] = problem["decay_log"] * gate_strength
    problem32 = {n: t.float() for n, t in problem.items()}
    truth_out, truth_state = run(delta_rule_loop, problem)
    loop_out, loop_state = run(delta_rule_loop, problem32)
    for chunk_size in (16, 64, 128):
        out, state = run(chunk_delta_rule, problem32, chunk_size=chunk_size)
        assert relative_error(out, truth_out) <= max(4 * relative_error(loop_out, truth_out), 2e-6)
        assert relative_error(state, truth_state) <= max(4 * relative_error(loop_state, truth_state), 2e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_are_computed_in_float32(dtype):
    problem = {n: t.to(dtype) for n, t in make_problem(1, 2, 40, 8, 8, decay=True, initial=True).items()}
    out, state = run(chunk_delta_rule, problem, chunk_size=16)
    as_float32 = {n: t.float() for n, t in problem.items()}
    out32, state32 = run(chunk_delta_rule, as_float32, chunk_size=16)
    assert out.dtype == dtype and state.dtype == torch.float32
    assert torch.equal(out, out32.to(dtype)) and torch.equal(state, state32)


def test_a_full_reset_gate_is_exact_with_finite_gradients():
    """``decay_log = -inf`` (a = 0) forgets the state; differences of cumulated logs must not be NaN."""
    problem = make_problem(1, 2, 20, 4, 4, decay=True, initial=True, seed=2)
    problem["decay_log"][:, :, [0, 7, 8, 15]] = float("-inf")
    cotangents = (torch.ones(1, 2, 20, 4, dtype=torch.float64), torch.ones(1, 2, 4, 4, dtype=torch.float64))
    for decay_first in (True, False):
        out, state = run(chunk_delta_rule, problem, chunk_size=8, decay_first=decay_first)
        expected_out, expected_state = run(delta_rule_loop, problem, decay_first=decay_first)
        assert relative_error(out, expected_out) <= EXACT and relative_error(state, expected_state) <= EXACT
        grads = gradients(chunk_delta_rule, problem, cotangents, chunk_size=8, decay_first=decay_first)
        expected = gradients(delta_rule_loop, problem, cotangents, decay_first=decay_first)
        for name in grads:
            assert torch.isfinite(grads[name]).all(), name
            assert relative_error(grads[name], expected[name]) <= EXACT, name


def test_the_token_loop_takes_the_gate_itself_with_its_gradient_at_a_full_reset():
    """``gate = a`` equals ``decay_log = log a``, and its gradient at ``a = 0`` is the finite ``d/da``
    (the kernel adapter's path for gradients w.r.t. a decay near 1; through ``log a`` it is NaN there)."""
    problem = make_problem(1, 2, 12, 3, 4, decay=True, initial=True, seed=4)
    gate = problem["decay_log"].exp()
    gate[0, 1, 5] = 0.0
    q, k, v, beta, start = (problem[n] for n in ("q", "k", "v", "beta", "initial_state"))
    for decay_first in (True, False):
        by_gate = delta_rule_loop(q, k, v, beta, gate=gate, initial_state=start, decay_first=decay_first)
        by_log = delta_rule_loop(
            q, k, v, beta, decay_log=gate.log(), initial_state=start, decay_first=decay_first
        )
        assert all(relative_error(a, b) <= EXACT for a, b in zip(by_gate, by_log, strict=True))
    leaf = gate.clone().requires_grad_(True)
    out, state = delta_rule_loop(q, k, v, beta, gate=leaf, initial_state=start, decay_first=False)
    (d_gate,) = torch.autograd.grad(out.sum() + state.sum(), leaf)
    assert torch.isfinite(d_gate).all() and d_gate[0, 1, 5] != 0
    with pytest.raises(ValueError, match="decay_log .* or as gate .*, not both"):
        delta_rule_loop(q, k, v, beta, decay_log=gate.log(), gate=gate)
    with pytest.raises(ValueError, match=r"gate must have shape \[B, H, T\] = \[1, 2, 12\]"):
        delta_rule_loop(q, k, v, beta, gate=gate[..., :5])


def test_no_tokens_return_the_initial_state():
    problem = make_problem(2, 3, 0, 4, 5, decay=True, initial=True)
    # a copy (s50d): the state returned is the very tensor given, so comparing the two held even when
    # the function had changed it in place
    initial = problem["initial_state"].clone()
    for function in (chunk_delta_rule, delta_rule_loop):
        out, state = run(function, problem)
        assert out.shape == (2, 3, 0, 5) and torch.equal(state, initial)
        assert torch.equal(problem["initial_state"], initial)


def _bad(problem, **changes):
    return {**problem, **changes}


BAD_INPUTS = [
    ("q must have shape", lambda p: _bad(p, q=p["q"][0])),
    ("k must have shape", lambda p: _bad(p, k=p["k"][:, :, :3])),
    ("v must have shape", lambda p: _bad(p, v=p["v"][:, :1])),
    ("beta must have shape", lambda p: _bad(p, beta=p["beta"][..., None])),
    ("decay_log must have shape", lambda p: _bad(p, decay_log=p["decay_log"][:, :, :2])),
    ("initial_state must have shape", lambda p: _bad(p, initial_state=p["initial_state"].mT)),
    ("q, k and v must share a dtype", lambda p: _bad(p, k=p["k"].float())),
    ("beta must have a floating dtype", lambda p: _bad(p, beta=torch.ones(2, 3, 6, dtype=torch.int64))),
    ("v must be a torch.Tensor", lambda p: _bad(p, v=[1.0])),
]


@pytest.mark.parametrize(("message", "corrupt"), BAD_INPUTS, ids=[m for m, _ in BAD_INPUTS])
def test_bad_inputs_are_refused_naming_the_parameter(message, corrupt):
    problem = corrupt(make_problem(2, 3, 6, 4, 5, decay=True, initial=True))
    for function in (chunk_delta_rule, delta_rule_loop):
        with pytest.raises((ValueError, TypeError), match=message):
            run(function, problem)


@pytest.mark.parametrize("chunk_size", [0, -3, 2.5, True, "64"])
def test_a_bad_chunk_size_is_refused(chunk_size):
    problem = make_problem(1, 1, 6, 4, 4)
    with pytest.raises(ValueError, match=f"chunk_size must be an int >= 1, got {chunk_size!r}"):
        run(chunk_delta_rule, problem, chunk_size=chunk_size)


def dual_form_k1_oracle(xq, xk, xv, lr, tau, W, decay):
    """innerloop's dual form at K = 1 for the matrix model, literally (ZOO.md): the gradient of
    ``1/2 ||k W - v||^2`` by autograd at the undecayed ``W``, then ``W <- (1 - decay) W - tau lr grad``."""
    outputs = []
    for t in range(xq.shape[2]):
        at = W.detach().requires_grad_(True)
        loss = 0.5 * ((xk[:, :, t, None] @ at - xv[:, :, t, None]) ** 2).sum()
        (grad,) = torch.autograd.grad(loss, at)
        W = (1 - decay[:, :, t, None, None]) * W - tau[0] * lr[:, :, t, None, None] * grad
        outputs.append(xq[:, :, t, None] @ W)
    return torch.cat(outputs, dim=2), W


@given(
    T=st.integers(1, 40), f=st.integers(1, 8), chunk_size=st.sampled_from([1, 5, 16]), seed=st.integers(0, 99)
)
def test_kernel_adapter_equals_the_dual_form_at_mini_batch_size_one(T, f, chunk_size, seed):
    problem = make_problem(2, 2, T, f, f, decay=True, initial=True, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    decay = torch.rand(2, 2, T, generator=gen, dtype=torch.float64)
    decay[0, 0, :: max(T // 3, 1)] = 1.0  # full resets and no decay at all, both valid
    decay[1, 1] = 0.0
    lr, tau = problem["beta"], torch.tensor([0.8], dtype=torch.float64)
    xq, xk, xv, W = problem["q"], problem["k"], problem["v"], problem["initial_state"]
    unused = torch.ones(2, f, dtype=torch.float64)
    out, params = delta_rule_kernel_forward(
        xq, xk, xv, lr, tau, {"W": W}, unused, unused, 1e-6, decay=decay, chunk_size=chunk_size
    )
    expected_out, expected_W = dual_form_k1_oracle(xq, xk, xv, lr, tau, W, decay)
    assert relative_error(out, expected_out) <= EXACT
    assert set(params) == {"W"} and relative_error(params["W"], expected_W) <= EXACT
    plain, _ = delta_rule_kernel_forward(xq, xk, xv, lr, tau, {"W": W}, unused, unused, 1e-6)
    no_decay, _ = dual_form_k1_oracle(xq, xk, xv, lr, tau, W, torch.zeros_like(decay))
    assert relative_error(plain, no_decay) <= EXACT


def test_kernel_adapter_refuses_what_it_does_not_compute():
    problem = make_problem(1, 2, 6, 4, 4, initial=True)
    args = (problem["q"], problem["k"], problem["v"], problem["beta"], torch.ones(1, dtype=torch.float64))
    unused = torch.ones(2, 4, dtype=torch.float64)
    W = problem["initial_state"]
    with pytest.raises(
        ValueError, match=r"params must hold the matrix model's weight only, \{'W'\}, got \['W1', 'b1'\]"
    ):
        delta_rule_kernel_forward(*args, {"W1": W, "b1": W[..., :1, :]}, unused, unused, 1e-6)
    with pytest.raises(ValueError, match="decay must lie in"):
        delta_rule_kernel_forward(*args, {"W": W}, unused, unused, 1e-6, decay=torch.full((1, 2, 6), 1.5))
    with pytest.raises(ValueError, match="tau must hold one scale"):
        delta_rule_kernel_forward(*args[:4], torch.ones(4), {"W": W}, unused, unused, 1e-6)


def kernel_inputs(**changes) -> KernelInputs:
    base = {
        "device": torch.device("cpu"),
        "dtype": torch.float32,
        "head_dim": 64,
        "mini_batch_size": 1,
        "num_tokens": 2048,
        "requires_grad": True,
        "extra": {"norm": False, "residual": False, "decode": False},
    }
    return KernelInputs(**{**base, **changes})


def test_verify_accepts_deltanet_blocks_and_says_why_it_refuses_others():
    spec = kernel_spec()
    assert (spec.name, spec.inner_model, spec.inner_loss, spec.update_rule) == (
        "delta_chunk",
        "matrix",
        "reconstruction",
        "dual_form",
    )
    assert verify(kernel_inputs()) is None
    assert verify(kernel_inputs(needs_double_backward=True, dtype=torch.bfloat16)) is None
    assert "mini_batch_size=1, got 16" in verify(kernel_inputs(mini_batch_size=16))
    with_norm = verify(kernel_inputs(extra={"norm": True, "residual": True}))
    assert "without the inner LayerNorm and residual" in with_norm
    assert "dtype torch.int32" in verify(kernel_inputs(dtype=torch.int32))
