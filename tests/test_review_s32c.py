"""Review s32c: numerics at the edges of issues 9, 12 and 13 (every fast path against the torch path
on shapes, dtypes and hostile inputs the other tests do not use)."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from innerloop import TTTLayer
from innerloop.core.family_layers import (
    DeltaNetLayer,
    GatedDeltaNetLayer,
    LinearAttentionLayer,
    TitansLayer,
)
from innerloop.core.functional import relative_error
from innerloop.ops import scan


def _finite_rows(out: torch.Tensor) -> list[bool]:
    """For ``[T, f]`` outputs, whether each token's row is finite."""
    return out.isfinite().all(-1).tolist()


def _delta_inputs(tokens: int, width: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 2, tokens, width, generator=g, dtype=torch.float64) for _ in range(3))
    lr = torch.rand(2, 2, tokens, generator=g, dtype=torch.float64)
    decay = 0.5 * torch.rand(2, 2, tokens, generator=g, dtype=torch.float64)
    return q, torch.nn.functional.normalize(k, dim=-1), v, lr, decay


# Found: the chunked delta rule (DeltaNet, Gated DeltaNet at K = 1) spread a NaN/inf key, value, step
# or gate to the EARLIER outputs of its chunk (0 * NaN in the chunk's masked products), where the torch
# path and the docs ("spreads to later outputs"; a mini-batch here is one token) keep them finite.
@pytest.mark.parametrize(
    ("where", "value"),
    [
        ("k", float("nan")),
        ("k", float("inf")),
        ("v", float("nan")),
        ("v", -float("inf")),
        ("lr", float("nan")),
        ("lr", float("inf")),
        ("decay", float("nan")),
    ],
)
def test_delta_chunk_spreads_a_non_finite_token_to_later_outputs_only_as_the_torch_path(where, value):
    tokens, bad = 11, 6
    q, k, v, lr, decay = _delta_inputs(tokens, 3, seed=1)
    given = {"k": k, "v": v, "lr": lr, "decay": decay}
    given[where] = given[where].clone()
    given[where][1, 0, bad] = value
    if where in ("k", "v"):  # through the op, as a user calls it
        results = {}
        for kernel in ("torch", "delta_chunk"):
            paths: list[tuple[str, str]] = []
            results[kernel] = scan(
                q,
                given["k"],
                given["v"],
                lr,
                inner_model="matrix",
                inner_norm=False,
                inner_residual=False,
                mini_batch_size=1,
                decay=decay,
                kernel=kernel,
                dispatches=paths,
            )[0]
            assert paths[0][0] == kernel
    else:  # scan refuses these at its boundary; a layer under non_finite="ignore" hands them on
        results = _kernel_and_loop(q, given)
    chunk, loop = results["delta_chunk"][1, 0], results["torch"][1, 0]
    assert _finite_rows(chunk) == _finite_rows(loop)
    assert _finite_rows(chunk)[:bad] == [True] * bad
    torch.testing.assert_close(chunk[:bad], loop[:bad], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results["delta_chunk"][0], results["torch"][0], rtol=1e-12, atol=1e-12)


def _kernel_and_loop(q, given):
    """The kernel's forward, called as dispatch calls it, and the token loop it must equal."""
    from innerloop.kernels.delta_chunk.adapter import delta_rule_kernel_forward
    from innerloop.kernels.delta_chunk.naive import delta_rule_loop

    weights = torch.zeros(*q.shape[:2], q.shape[-1], q.shape[-1], dtype=q.dtype)
    k, v, lr, decay = given["k"], given["v"], given["lr"], given["decay"]
    loop, _ = delta_rule_loop(q, k, v, lr, gate=1 - decay, initial_state=weights, decay_first=False)
    tau = torch.ones(1, dtype=q.dtype)
    chunk, _ = delta_rule_kernel_forward(q, k, v, lr, tau, {"W": weights}, None, None, 1e-6, decay=decay)
    return {"torch": loop, "delta_chunk": chunk}


def test_a_deltanet_layer_ignoring_non_finite_input_keeps_the_outputs_before_it():
    torch.manual_seed(0)
    layer = DeltaNetLayer(32, 2, non_finite="ignore")  # kernel="auto": delta_chunk
    reference = DeltaNetLayer(32, 2, non_finite="ignore", kernel="torch")
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(1, 13, 32)
    x[0, 6] = float("nan")
    with torch.no_grad():
        y, _ = layer(x)
        want, _ = reference(x)
    assert {path for path, _ in layer.dispatches} == {"delta_chunk"}
    assert _finite_rows(y[0]) == [True] * 6 + [False] * 7 == _finite_rows(want[0])
    torch.testing.assert_close(y[0, :6], want[0, :6], rtol=1e-5, atol=1e-6)


# Promise no test covered (docs/architecture.md, "Thread counts", written by this review): 1 and 2
# threads give bitwise the same outputs and states on the paths other than the CPU kernel's (which
# tests/kernels/test_review_s21_cpu.py checks), and gradients within a few float32 roundoffs.
@pytest.mark.slow  # each path forward and backward at two thread counts: 0.5-2 s a case
@pytest.mark.parametrize(
    "make",
    [
        lambda: TTTLayer(32, 2, mini_batch_size=5, kernel="fused_torch_linear"),
        lambda: TTTLayer(32, 2, inner_model="mlp", mini_batch_size=5, kernel="torch"),
        lambda: LinearAttentionLayer(32, 2),
        lambda: GatedDeltaNetLayer(32, 2),
    ],
    ids=["fused_torch_linear", "torch_mlp", "linear_attention", "gated_deltanet"],
)
def test_one_and_two_threads_give_the_same_outputs_and_states(make):
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(3, 23, 32, requires_grad=True)
    previous, runs = torch.get_num_threads(), {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            y, state = layer(x)
            grads = torch.autograd.grad(y.square().sum(), [x, *layer.parameters()])
            with torch.no_grad():
                inferred, inferred_state = layer(x)
            runs[threads] = (y, *state.params.values(), inferred, *inferred_state.params.values()), grads
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(runs[1][0], runs[2][0], strict=True):
        assert torch.equal(a, b)
    for a, b in zip(runs[1][1], runs[2][1], strict=True):
        assert relative_error(a, b) <= 32 * torch.finfo(torch.float32).eps


BF16_UNIT, FP32_UNIT = 2.0**-8, 2.0**-24


def _family_run(layer, x, autocast: bool):
    layer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y, state = layer(x)
        (y.float() ** 2).sum().backward()
    grads = torch.cat([p.grad.double().flatten() for p in layer.parameters() if p.grad is not None])
    return y.double(), torch.cat([t.double().flatten() for t in state.params.values()]), grads, state, y.dtype


# Promise no test covered (issue 13: "bf16 results match float32 to bf16 precision"; tests/core/test_bf16.py
# checks the TTT layers, tests/family only float16): the family's layers under bf16 autocast keep their
# state in float32 and match float32 to A bf16 roundoffs, A measured as their float32 error against
# float64 in float32 roundoffs (the bound of test_bf16.py, factor 2 for spread; measured 1.1u to 3.8u).
@pytest.mark.parametrize("cls", [LinearAttentionLayer, DeltaNetLayer, GatedDeltaNetLayer, TitansLayer])
def test_family_layers_under_bf16_autocast_match_float32_to_bf16_precision(cls):
    torch.manual_seed(0)
    layer = cls(32, 2)
    exact = _family_run(copy.deepcopy(layer).double(), torch.randn(2, 21, 32).double(), False)
    torch.manual_seed(0)
    x = torch.randn(2, 21, 32)
    single = _family_run(layer, x, False)
    mixed = _family_run(layer, x, True)
    assert mixed[4] == torch.bfloat16 and all(t.dtype == torch.float32 for t in mixed[3].params.values())
    for index, what in enumerate(("output", "state", "gradients")):
        amplification = max(relative_error(single[index], exact[index]) / FP32_UNIT, 1.0)
        error = relative_error(mixed[index], single[index])
        assert error <= 2 * amplification * BF16_UNIT, (what, error / BF16_UNIT, amplification)


def _kernel_case(kernel, model, shape, mini_batch, mode, strided, seed):
    """Outputs, final weights and (mode "grad") the gradient of every input of one float64 scan."""
    batch, tokens, width = shape
    g = torch.Generator().manual_seed(seed)

    def rnd(*size, scale=1.0):
        return torch.randn(*size, generator=g, dtype=torch.float64) * scale

    q, k, v = rnd(batch, 2, tokens, width), rnd(batch, 2, tokens, width), rnd(batch, 2, tokens, width)
    if strided:  # a [B, T, H, f] projection viewed as [B, H, T, f], and a view with gaps between rows
        q, k = q.transpose(1, 2).contiguous().transpose(1, 2), torch.cat([k, k], -1)[..., :width]
    lr = torch.rand(batch, 2, tokens, generator=g, dtype=torch.float64) / width
    tau = 1.0 / torch.arange(1, mini_batch + 1, dtype=torch.float64)
    norm_weight, norm_bias = 1 + 0.1 * rnd(2, width), 0.1 * rnd(2, width)
    hidden = width if model == "linear" else 4 * width
    initial = {
        "W1": rnd(batch, 2, width, hidden, scale=width**-0.5),
        "b1": rnd(batch, 2, 1, hidden, scale=0.1),
    }
    if model == "mlp":
        initial |= {
            "W2": rnd(batch, 2, hidden, width, scale=hidden**-0.5),
            "b2": rnd(batch, 2, 1, width, scale=0.1),
        }
    inputs = [q, k, v, lr, tau, norm_weight, norm_bias, *initial.values()]
    for t in inputs:
        t.requires_grad_(mode == "grad")
    context = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[
        mode
    ]
    paths: list[tuple[str, str]] = []
    with context():
        out, final = scan(q, k, v, lr, inner_model=model, mini_batch_size=mini_batch, token_scale=tau,
                          norm_weight=norm_weight, norm_bias=norm_bias, initial=initial, kernel=kernel,
                          dispatches=paths)  # fmt: skip
    results = [out, *final.values()]
    if mode == "grad":
        loss = (out * out.detach().cos()).sum() + sum((w * w).sum() for w in final.values())
        results += torch.autograd.grad(loss, inputs)
    return [r.detach() for r in results], {path for path, _ in paths}


# Promise no test covered at these shapes (issue 13: every fast path equals the torch path in float64 to
# 1e-10, outputs, states and every gradient): head dims 1, 3 and 24, mini-batches 1, 5 and 33, lengths
# 1, K - 1, K + 1 and primes, batch 4, strided views, no_grad and inference_mode (measured: 1.1e-12 at
# worst, cpu_ttt_*, fused_torch_* and compiled_torch_* alike; 96 too, outside this test for time).
# reason: eight float64 scans with their backward against the torch path's (~0.5 s on 2 cores)
@pytest.mark.slow
@settings(max_examples=8, deadline=None)
@given(
    kernel=st.sampled_from(["cpu_ttt", "fused_torch"]),
    model=st.sampled_from(["linear", "mlp"]),
    width=st.sampled_from([3, 4, 24]),  # not 1 (refused under the inner LayerNorm) nor 2 (ill-conditioned)
    mini_batch=st.sampled_from([1, 5, 33]),
    tokens=st.sampled_from(["1", "K-1", "K+1", "37"]),
    mode=st.sampled_from(["grad", "no_grad", "inference_mode"]),
    strided=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fast_paths_equal_the_torch_path_in_float64_at_unusual_shapes(
    kernel, model, width, mini_batch, tokens, mode, strided, seed
):
    count = {"1": 1, "K-1": max(mini_batch - 1, 1), "K+1": mini_batch + 1, "37": 37}[tokens]
    shape = (4 if width < 24 else 2, count, width)
    fast, used = _kernel_case(f"{kernel}_{model}", model, shape, mini_batch, mode, strided, seed)
    slow, _ = _kernel_case("torch", model, shape, mini_batch, mode, strided, seed)
    assert any(path.startswith(f"{kernel}_{model}") for path in used) or count < mini_batch, used
    for index, (a, b) in enumerate(zip(fast, slow, strict=True)):
        assert relative_error(a, b) <= 1e-10, (index, relative_error(a, b))
