"""Review s32c: numerics at the edges of issues 9, 12 and 13 (every fast path against the torch path
on shapes, dtypes and hostile inputs the other tests do not use)."""

from __future__ import annotations

import pytest
import torch

from innerloop import TTTLayer
from innerloop.core.family_layers import DeltaNetLayer, GatedDeltaNetLayer, LinearAttentionLayer
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
