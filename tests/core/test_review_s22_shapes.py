"""Review s22: every TTT and family sequence layer through every CPU path, on shapes and layouts a user
would pass (report: /work/notes/review_s22_shapes.md).

Each fast path (fused torch, the compiled CPU kernels, the chunked delta rule, Triton under
TRITON_INTERPRET=1: its test is in tests/kernels/test_layer_dispatch.py) is compared with a float64 copy
of the same layer on the torch path: outputs, every returned state tensor, and the gradients of a random
scalar function of the output (and state) with respect to the input and every parameter. Inputs are
non-contiguous (transposed storage, every second token, a slice of a larger tensor, strided features, an
expanded batch), lengths below, equal to and not a multiple of the mini-batch size, odd and non
power-of-two head sizes (family layers; TTTLayer needs an even head size for RoPE and says so).

Tolerances are set from measured errors, not widened: a float32 fast path is held to FACTOR times the
float32 torch path's own error against float64 (floor 1e-6 relative); the measured worst ratio was 7.0 over
188 random TTTLayer configurations (cpu_ttt / fused_torch), 6.8 for the chunked delta rule, 5.8 for Triton
in the interpreter, 1.96 for bfloat16 / autocast. A float64 fast path is held to 1e-10 (worst measured:
5e-14 for the TTT kernels, 2.4e-12 for the delta rule only at a head size of 1, excluded here).

The one defect found is pinned by an xfail(strict=True) test at the end.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from innerloop import TTTLayer
from innerloop.core import family_layers as FL
from innerloop.ops import scan

FACTOR = (
    10.0  # measured worst ratio 7.0 (float32 fast path error / float32 torch path error, both vs float64)
)
FLOOR = 1e-6
FLOAT64_TOL = 1e-10
LAYOUTS = ["contig", "transposed", "strided", "view", "featstrided", "expanded"]
SETTINGS = dict(max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return (a - b).norm().item() / max(b.norm().item(), 1e-30)


def perturb(layer: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
    """Move every parameter off its init (so each one, learnable lr and initial weights included, matters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * scale)
    return layer


def layout(x: torch.Tensor, how: str) -> torch.Tensor:
    """``x``'s values (for "expanded": row 0's, repeated) in a non-contiguous layout."""
    B, T, D = x.shape
    if how == "contig":
        return x.clone()
    if how == "transposed":
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    if how == "strided":
        big = torch.zeros(B, 2 * T, D, dtype=x.dtype)
        big[:, ::2] = x
        return big[:, ::2]
    if how == "view":
        big = torch.zeros(B + 1, T + 3, D + 5, dtype=x.dtype)
        big[1:, 2 : T + 2, 3 : D + 3] = x
        return big[1:, 2 : T + 2, 3 : D + 3]
    if how == "featstrided":
        big = torch.zeros(B, T, 2 * D, dtype=x.dtype)
        big[..., ::2] = x
        return big[..., ::2]
    if how == "expanded":
        return x[:1].expand(B, T, D)
    raise ValueError(how)


def state_tensors(state) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.tensors().items() if v.is_floating_point()}


def run(layer, x, gout, state=None, grad=True):
    """(y, state tensors, gradients by name) of ``sum(y * gout) + <state, random>``."""
    x = x.detach().requires_grad_(grad)
    if not grad:
        with torch.no_grad():
            y, s = layer(x, state)
        return y, state_tensors(s), {}
    y, s = layer(x, state)
    sts = state_tensors(s)
    loss = (y.double() * gout).sum()
    g2 = torch.Generator().manual_seed(123)
    for k in sorted(sts):
        if sts[k].requires_grad:
            loss = (
                loss + (sts[k].double() * torch.randn(sts[k].shape, generator=g2, dtype=torch.float64)).sum()
            )
    names = [n for n, _ in layer.named_parameters()]
    grads = torch.autograd.grad(loss, [x, *layer.parameters()], allow_unused=True)
    return y.detach(), {k: v.detach() for k, v in sts.items()}, dict(zip(["x", *names], grads, strict=True))


def worst_error(a, b) -> tuple[float, str]:
    errors = {"y": rel(a[0], b[0])}
    errors.update({f"state:{k}": rel(a[1][k], v) for k, v in b[1].items()})
    for k, gb in b[2].items():
        ga = a[2].get(k)
        if ga is None and gb is None:
            continue
        ga = torch.zeros_like(gb) if ga is None else ga
        gb = torch.zeros_like(ga) if gb is None else gb
        if ga.norm() > 0 or gb.norm() > 0:
            errors[f"grad:{k}"] = rel(ga, gb)
    name = max(errors, key=errors.get)
    return errors[name], name


def check_paths(base, kernels, B, T, how, grad, seed):
    """Each kernel, float32 and float64, against ``base`` in float64 on the torch path."""
    base.kernel = "torch"
    D = base.hidden_size
    x64 = torch.randn(B, T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    gout = torch.randn(B, T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 7))
    ref = run(copy.deepcopy(base).double(), layout(x64, how).contiguous(), gout, grad=grad)
    errors = {}
    for kernel in ["torch", *kernels]:
        for dtype in (torch.float32, torch.float64):
            layer = copy.deepcopy(base).to(dtype)
            layer.kernel = kernel
            got = run(layer, layout(x64.to(dtype), how), gout, grad=grad)
            errors[(kernel, dtype)] = worst_error(got, ref) + (sorted({p for p, _ in layer.dispatches}),)
    base32 = errors[("torch", torch.float32)][0]
    for (kernel, dtype), (err, where, paths) in errors.items():
        limit = FLOAT64_TOL if dtype == torch.float64 else FACTOR * max(base32, FLOOR)
        assert err <= limit, f"{kernel} {dtype}: {where} rel {err:.2e} > {limit:.1e} (paths {paths})"
    return errors


# ---- TTTLayer: fused torch, cpu kernels, auto, against float64 torch --------------------------------


@settings(**SETTINGS)
@given(
    model=st.sampled_from(["linear", "mlp"]),
    f=st.sampled_from([4, 6, 12]),
    H=st.integers(1, 3),
    K=st.sampled_from([1, 3, 4, 5, 16]),
    T_kind=st.sampled_from(["one", "below", "equal", "above", "free"]),
    T_free=st.integers(1, 40),
    B=st.integers(1, 3),
    share_qk=st.booleans(),
    use_gate=st.booleans(),
    how=st.sampled_from(LAYOUTS),
    grad=st.booleans(),
    seed=st.integers(0, 2**16),
)
@pytest.mark.slow  # ~0.9 s: over the fast loop's 0.4 s per test
def test_ttt_layer_fast_paths_match_float64(
    model, f, H, K, T_kind, T_free, B, share_qk, use_gate, how, grad, seed
):
    T = {"one": 1, "below": max(K - 1, 1), "equal": K, "above": 2 * K + 1, "free": T_free}[T_kind]
    torch.manual_seed(seed)
    layer = TTTLayer(f * H, H, inner_model=model, mini_batch_size=K, share_qk=share_qk, use_gate=use_gate)
    perturb(layer, seed)
    check_paths(layer, ["auto", f"fused_torch_{model}", f"cpu_ttt_{model}"], B, T, how, grad, seed)


@pytest.mark.slow  # 0.5 s: hypothesis examples
@settings(**{**SETTINGS, "max_examples": 6})
@given(
    model=st.sampled_from(["linear", "mlp"]),
    K=st.sampled_from([1, 2, 4]),
    T=st.integers(1, 12),
    how=st.sampled_from(LAYOUTS),
    seed=st.integers(0, 2**16),
)
def test_ttt_layer_next_token_matches_float64(model, K, T, how, seed):
    """next_token has no kernel: auto runs torch, and still agrees with float64 on every layout."""
    torch.manual_seed(seed)
    layer = TTTLayer(8, 2, inner_model=model, inner_loss="next_token", mini_batch_size=K)
    perturb(layer, seed)
    check_paths(layer, ["auto"], 2, T, how, True, seed)


def test_ttt_layer_odd_head_dim_is_refused_clearly():
    with pytest.raises(ValueError, match="must be even"):
        TTTLayer(15, 3)  # head_dim 5


# ---- family layers: delta_chunk and torch, odd head sizes -------------------------------------------


def family_layer(kind: str, f: int, H: int, K: int, seed: int):
    torch.manual_seed(seed)
    if kind == "linear_attention":
        layer = FL.LinearAttentionLayer(f * H, H, mini_batch_size=K)
    elif kind == "deltanet":
        layer = FL.DeltaNetLayer(f * H, H)
    elif kind == "gated_deltanet":
        layer = FL.GatedDeltaNetLayer(f * H, H)
    elif kind == "titans":
        layer = FL.TitansLayer(f * H, H, mini_batch_size=K)
    else:
        layer = FL.TitansLayer(f * H, H, inner_model="mlp", mini_batch_size=K)
    return perturb(layer, seed)


FAMILY = ["linear_attention", "deltanet", "gated_deltanet", "titans", "titans_mlp"]


@settings(**{**SETTINGS, "max_examples": 15})
@given(
    kind=st.sampled_from(FAMILY),
    f=st.sampled_from([3, 5, 12, 33]),
    H=st.integers(1, 3),
    K=st.sampled_from([1, 2, 5, 16]),
    T=st.sampled_from([1, 2, 5, 17, 66]),
    B=st.integers(1, 3),
    how=st.sampled_from(LAYOUTS),
    grad=st.booleans(),
    seed=st.integers(0, 2**16),
)
@pytest.mark.slow  # ~1.0 s: over the fast loop's 0.4 s per test
def test_family_layer_paths_match_float64(kind, f, H, K, T, B, how, grad, seed):
    if f == 33 and T == 66:
        T = 17
    layer = family_layer(kind, f, H, K, seed)
    kernels = ["auto", "delta_chunk"] if kind in ("deltanet", "gated_deltanet") else ["auto"]
    check_paths(layer, kernels, B, T, how, grad, seed)


@settings(**{**SETTINGS, "max_examples": 8})
@given(
    inner_model=st.sampled_from(["linear", "mlp"]),
    f=st.sampled_from([3, 5, 33]),
    K=st.sampled_from([1, 3, 4]),
    T=st.integers(1, 20),
    how=st.sampled_from(LAYOUTS),
    seed=st.integers(0, 2**16),
)
@pytest.mark.slow  # ~0.9 s: over the fast loop's 0.4 s per test
def test_family_layer_with_ttt_kernels_at_odd_head_sizes(inner_model, f, K, T, how, seed):
    """A FamilyLayer with the inner LN and residual sends odd head sizes (which TTTLayer cannot have) to
    the fused and CPU TTT kernels."""
    torch.manual_seed(seed)
    layer = FL.FamilyLayer(
        2 * f, 2, inner_model=inner_model, mini_batch_size=K, inner_norm=True, inner_residual=True
    )
    perturb(layer, seed)
    check_paths(
        layer, ["auto", f"fused_torch_{inner_model}", f"cpu_ttt_{inner_model}"], 2, T, how, True, seed
    )


# ---- invariances on the default (auto) paths, float64 -----------------------------------------------


@pytest.mark.slow  # every path split, decoded and by rows: ~0.8 s
@settings(**{**SETTINGS, "max_examples": 15})
@given(
    kind=st.sampled_from(["ttt_linear", "ttt_mlp", *FAMILY]),
    K=st.sampled_from([1, 3, 4, 16]),
    T=st.integers(2, 40),
    B=st.integers(1, 3),
    cuts=st.lists(st.integers(1, 39), min_size=1, max_size=3, unique=True),
    prefill=st.integers(0, 39),
    seed=st.integers(0, 2**16),
)
def test_split_decode_and_rows_equal_the_whole(kind, K, T, B, cuts, prefill, seed):
    if kind.startswith("ttt_"):
        torch.manual_seed(seed)
        layer = perturb(TTTLayer(12, 2, inner_model=kind[4:], mini_batch_size=K), seed)
    else:
        layer = family_layer(kind, 5, 2, K, seed)
    layer = layer.double()
    x = torch.randn(
        B, T, layer.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
    )
    cuts = sorted(c for c in cuts if c < T)
    prefill = prefill % T
    with torch.no_grad():
        y, whole = layer(x)
        pieces, s = [], None
        for a, b in zip([0, *cuts], [*cuts, T], strict=True):
            out, s = layer(x[:, a:b], s)
            pieces.append(out)
        assert rel(torch.cat(pieces, 1), y) < FLOAT64_TOL
        for k, v in state_tensors(s).items():
            assert rel(v, state_tensors(whole)[k]) < FLOAT64_TOL, k
        pieces, s = [], None
        if prefill:
            out, s = layer(x[:, :prefill])
            pieces.append(out)
        for t in range(prefill, T):
            out, s = layer(x[:, t : t + 1], s)
            pieces.append(out)
        assert rel(torch.cat(pieces, 1), y) < FLOAT64_TOL
        for k, v in state_tensors(s).items():
            assert rel(v, state_tensors(whole)[k]) < FLOAT64_TOL, k
        for i in range(B):
            assert rel(layer(x[i : i + 1])[0], y[i : i + 1]) < FLOAT64_TOL


@pytest.mark.parametrize("kernel", ["auto", "cpu_ttt_mlp", "fused_torch_mlp"])
def test_gradients_through_a_carried_state_equal_the_whole(kernel):
    torch.manual_seed(0)
    layer = perturb(TTTLayer(12, 2, inner_model="mlp", mini_batch_size=4, kernel=kernel), 0).double()
    x = torch.randn(2, 19, 12, dtype=torch.float64)
    gout = torch.randn(2, 19, 12, dtype=torch.float64)

    def grads(pieces):
        xx = x.clone().requires_grad_()
        outs, s = [], None
        for a, b in pieces:
            out, s = layer(xx[:, a:b], s)
            outs.append(out)
        loss = (torch.cat(outs, 1) * gout).sum() + sum((v**2).sum() for v in state_tensors(s).values())
        return torch.autograd.grad(loss, [xx, *layer.parameters()], allow_unused=True)

    for a, b in zip(grads([(0, 19)]), grads([(0, 3), (3, 4), (4, 13), (13, 19)]), strict=True):
        if a is not None:
            assert rel(b, a) < 1e-10


# ---- ops.scan ----------------------------------------------------------------------------------------


@pytest.mark.slow  # every shape through auto and torch in float64: ~0.5 s
@settings(**{**SETTINGS, "max_examples": 15})
@given(
    model=st.sampled_from(["linear", "mlp", "matrix"]),
    wrap=st.booleans(),
    f=st.sampled_from([3, 5, 12, 33]),
    K=st.sampled_from([1, 2, 4, 5]),
    T=st.integers(1, 30),
    decay=st.booleans(),
    how=st.sampled_from(["contig", "btT", "strided", "featstrided", "expanded"]),
    seed=st.integers(0, 2**16),
)
def test_scan_auto_matches_float64_torch(model, wrap, f, K, T, decay, how, seed):
    if model == "matrix" and not wrap:
        K = 1 if decay else K  # the delta rule's kernel (decay only there)
    g = torch.Generator().manual_seed(seed)
    B, H = 2, 2
    q, k, v = (torch.randn(B, H, T, f, generator=g, dtype=torch.float64) / f**0.5 for _ in range(3))
    lr = torch.rand(B, H, T, generator=g, dtype=torch.float64) * 0.5
    d = torch.rand(B, H, T, generator=g, dtype=torch.float64) * 0.3 if decay else None
    gout = torch.randn(B, H, T, f, generator=g, dtype=torch.float64)

    def nc(t):
        if how == "btT":
            return t.transpose(1, 2).contiguous().transpose(1, 2)
        if how == "strided":
            big = torch.zeros(B, H, 2 * T, f, dtype=t.dtype)
            big[:, :, ::2] = t
            return big[:, :, ::2]
        if how == "featstrided":
            big = torch.zeros(B, H, T, 2 * f, dtype=t.dtype)
            big[..., 1::2] = t
            return big[..., 1::2]
        if how == "expanded":
            return t[:1].expand(t.shape)
        return t.clone()

    def call(dtype, kernel):
        leaves = [nc(t.to(dtype)).requires_grad_() for t in (q, k, v)] + [lr.to(dtype).requires_grad_()]
        dd = None if d is None else d.to(dtype).requires_grad_()
        out, w = scan(
            *leaves,
            inner_model=model,
            mini_batch_size=K,
            inner_norm=wrap,
            inner_residual=wrap,
            decay=dd,
            kernel=kernel,
        )
        loss = (out.double() * gout).sum() + sum((t.double() ** 2).sum() for t in w.values())
        grads = torch.autograd.grad(loss, leaves + ([] if dd is None else [dd]))
        return [out.detach(), *(t.detach() for t in w.values()), *grads]

    ref = call(torch.float64, "torch")
    base32 = max(rel(a, b) for a, b in zip(call(torch.float32, "torch"), ref, strict=True))
    assert max(rel(a, b) for a, b in zip(call(torch.float64, "auto"), ref, strict=True)) < FLOAT64_TOL
    assert max(rel(a, b) for a, b in zip(call(torch.float32, "auto"), ref, strict=True)) <= FACTOR * max(
        base32, FLOOR
    )


# ---- low precision: kernels within a factor of the torch path's own bf16 error ----------------------


@pytest.mark.parametrize(
    "kind,mode",
    [("ttt_linear", "bf16"), ("ttt_mlp", "autocast"), ("gated_deltanet", "bf16"), ("deltanet", "autocast")],
)
def test_low_precision_paths_match_the_torch_path(kind, mode):
    if kind.startswith("ttt_"):
        torch.manual_seed(1)
        base = perturb(TTTLayer(24, 2, inner_model=kind[4:], mini_batch_size=4), 1)
        kernels = ["auto", f"fused_torch_{kind[4:]}", f"cpu_ttt_{kind[4:]}"]
    else:
        base = family_layer(kind, 12, 2, 1, 1)
        kernels = ["auto", "delta_chunk"]
    x = layout(torch.randn(2, 13, 24, generator=torch.Generator().manual_seed(1)).bfloat16(), "strided")
    gout = torch.randn(2, 13, 24, dtype=torch.float64)
    base.kernel = "torch"
    ref = run(copy.deepcopy(base).double(), x.double().contiguous(), gout)

    def lowp(kernel):
        layer = copy.deepcopy(base)
        layer.kernel = kernel
        if mode == "bf16":
            got = run(layer.bfloat16(), x, gout)
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = run(layer, x, gout)
        assert all(v.dtype == torch.float32 for v in got[1].values())  # the state stays float32
        return worst_error(got, ref)[0]

    torch_error = lowp("torch")
    for kernel in kernels:
        assert lowp(kernel) <= 3 * torch_error, kernel  # measured worst ratio 1.96


# ---- Triton in the interpreter: tests/kernels/test_layer_dispatch.py ---------------------------------
# (test_triton_interpreter_paths_match_float64, run by the interpreter's one child process; it started a
# child of its own here)


# ---- the defect --------------------------------------------------------------------------------------


# review s22 shapes (MED, fixed): the chunked kernel refused the NaN decay of one row ("values in [nan, nan]")
def test_gated_deltanet_ignore_mode_nan_row_stays_in_its_row():
    torch.manual_seed(0)
    layer = FL.GatedDeltaNetLayer(16, 2, non_finite="ignore")  # kernel="auto" -> delta_chunk
    x = torch.randn(3, 11, 16)
    bad = x.clone()
    bad[1, 5, 3] = float("nan")
    with torch.no_grad():
        y_alone, _ = layer(x[:1])
        y_last, _ = layer(x[2:])
        y, state = layer(bad)  # the delta_chunk path
    assert torch.allclose(y[:1], y_alone, rtol=1e-5, atol=1e-6)
    assert torch.allclose(y[2:], y_last, rtol=1e-5, atol=1e-6)
    # the tokens before the bad one stay finite, as on the torch path; it and the later ones are NaN
    # (review s32c made the chunked kernel run the token loop on non-finite input: b266abc)
    assert torch.isfinite(y[1, :5]).all() and torch.isnan(y[1, 5:]).all()
    assert not state.is_finite()


def test_gated_deltanet_ignore_mode_nan_row_on_the_torch_path():
    """What the defect above should do, as the torch path does it."""
    torch.manual_seed(0)
    layer = FL.GatedDeltaNetLayer(16, 2, non_finite="ignore", kernel="torch")
    x = torch.randn(3, 11, 16)
    bad = x.clone()
    bad[1, 5, 3] = float("nan")
    with torch.no_grad():
        y_alone, _ = layer(x[:1])
        y, state = layer(bad)
    assert torch.allclose(y[:1], y_alone, rtol=1e-5, atol=1e-6)
    assert torch.isnan(y[1, 5:]).all() and torch.isfinite(y[1, :5]).all()
    assert not state.is_finite()
