"""Review s20: the Triton TTT kernels on input classes the other Triton tests do not build (strided
views, weights shared across the batch with stride 0, empty batch / empty chunk, mixed activation and
weight dtypes, several checkpoint groups at the default ``checkpoint_every``), and one defect: the
host functions keep every launched tensor alive (``launch_device`` is a ``functools.cache`` keyed by
the tensor). Run under Triton's interpreter in a child process (conftest.py)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from kernel_testing import make_inputs

from innerloop.core.functional import relative_error
from innerloop.kernels.triton import ttt_linear, ttt_mlp

pytestmark = [pytest.mark.triton_interpreter, pytest.mark.slow]

TOL = 1e-4  # float32 kernel vs the float64 reference (the float32 torch path is ~3e-7 here)
PACKAGES = {"linear": (ttt_linear, ("W1", "b1")), "mlp": (ttt_mlp, ("W1", "b1", "W2", "b2"))}
each_kernel = pytest.mark.parametrize("model", sorted(PACKAGES))


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    for package, _ in PACKAGES.values():
        monkeypatch.setattr(package.fused, "POISON_OUTPUTS", True)


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout (last two dims transposed in memory)."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() >= 2 else t[None].expand(2, -1)[1]


def _leaves(inputs, keys):
    xq, xk, xv, lr, tau, params, lnw, lnb = inputs
    return [xq, xk, xv, lr, tau, *(params[k] for k in keys), lnw, lnb]


def _check_forward_backward(model, inputs64, kernel_inputs, leaves64, kernel_leaves, checkpoint_every=8):
    """Kernel (float32, any layout) against the float64 naive reference: outputs, new weights, grads."""
    package, keys = PACKAGES[model]
    out, params = package.fused.forward(*kernel_inputs, checkpoint_every=checkpoint_every)
    out_ref, params_ref = package.naive.forward(*inputs64)
    assert relative_error(out.double(), out_ref) <= TOL
    for key in keys:
        assert relative_error(params[key].double(), params_ref[key]) <= TOL, key
    gen = torch.Generator().manual_seed(1)
    cot = torch.randn(out_ref.shape, generator=gen, dtype=torch.float64)
    cots = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in params_ref.items()}

    def objective(o, p):
        return (o.double() * cot).sum() + sum((p[k].double() * cots[k]).sum() for k in keys)

    grads = torch.autograd.grad(objective(out, params), kernel_leaves)
    grads_ref = torch.autograd.grad(objective(out_ref, params_ref), leaves64)
    for i, (g, g_ref) in enumerate(zip(grads, grads_ref, strict=True)):
        assert g.shape == g_ref.shape, i
        assert relative_error(g.double(), g_ref) <= TOL, i


def _pair(model, B, H, T, f, K, seed, layout=None):
    """(float64 reference inputs, float32 kernel inputs) with the same values; both require grad."""
    _, keys = PACKAGES[model]
    base = make_inputs(B, H, T, f, K, model, dtype=torch.float64, seed=seed)
    ref = [{k: v.clone() for k, v in x.items()} if isinstance(x, dict) else x.clone() for x in base]
    ker = [{k: v.float() for k, v in x.items()} if isinstance(x, dict) else x.float() for x in base]
    if layout == "strided":
        ker = [{k: _strided(v) for k, v in x.items()} if isinstance(x, dict) else _strided(x) for x in ker]
        assert not ker[0].is_contiguous() and not ker[5]["W1"].is_contiguous()
    leaves = []
    for inputs in (ref, ker):
        ls = _leaves(inputs, keys)
        for t in ls:
            t.requires_grad_(True)
        leaves.append(ls)
    return ref, ker, leaves[0], leaves[1]


@each_kernel
def test_strided_views_forward_backward(model):
    ref, ker, l64, l32 = _pair(model, 2, 2, 15, 16, 5, seed=11, layout="strided")
    _check_forward_backward(model, ref, ker, l64, l32, checkpoint_every=2)


@each_kernel
def test_weights_shared_across_batch_stride0(model):
    """Starting weights given as ``w[:1].expand(B, ...)`` (stride 0): their gradient sums the batch."""
    _, keys = PACKAGES[model]
    ref, ker, l64, l32 = _pair(model, 1, 2, 8, 16, 4, seed=12)
    B = 3
    ref64 = make_inputs(B, 2, 8, 16, 4, model, dtype=torch.float64, seed=13)
    xs64 = [t.requires_grad_(True) for t in ref64[:5]]
    xs32 = [t.detach().float().requires_grad_(True) for t in ref64[:5]]
    shared64 = {k: l64[5 + i] for i, k in enumerate(keys)}  # [1, H, ...] leaves
    shared32 = {k: l32[5 + i] for i, k in enumerate(keys)}
    p64 = {k: v.expand(B, *v.shape[1:]) for k, v in shared64.items()}
    p32 = {k: v.expand(B, *v.shape[1:]) for k, v in shared32.items()}
    assert p32["W1"].stride(0) == 0
    lnw64, lnb64, lnw32, lnb32 = l64[-2], l64[-1], l32[-2], l32[-1]
    inputs64 = [*xs64, p64, lnw64, lnb64]
    inputs32 = [*xs32, p32, lnw32, lnb32]
    leaves64 = [*xs64, *shared64.values(), lnw64, lnb64]
    leaves32 = [*xs32, *shared32.values(), lnw32, lnb32]
    _check_forward_backward(model, inputs64, inputs32, leaves64, leaves32, checkpoint_every=1)


@each_kernel
def test_several_checkpoint_groups_at_the_default(model):
    """NB = 10 mini-batches at the default checkpoint_every (8): two groups, the last partial; the
    first-use probe (two mini-batches) never reaches a second group, so only this settles it."""
    package, _ = PACKAGES[model]
    ref, ker, l64, l32 = _pair(model, 1, 1, 10, 16, 1, seed=14)
    _check_forward_backward(
        model, ref, ker, l64, l32, checkpoint_every=package.fused.DEFAULT_CHECKPOINT_EVERY
    )


@each_kernel
def test_a_checkpoint_group_longer_than_the_chunk_is_the_chunk(model, monkeypatch):
    """review s20 (LOW): the backward's scratch was sized by checkpoint_every itself (10**6 at head_dim
    16: about 1 GB per sequence and head); a group longer than the chunk runs as the whole chunk, so no
    buffer is larger than the chunk's mini-batches, and the numbers are those of checkpoint_every = NB."""
    package, _ = PACKAGES[model]
    shapes = []
    allocate = package.fused._empty
    monkeypatch.setattr(
        package.fused, "_empty", lambda shape, *a: shapes.append(tuple(shape)) or allocate(shape, *a)
    )
    ref, ker, l64, l32 = _pair(model, 1, 1, 12, 16, 4, seed=15)  # NB = 3 mini-batches of 4
    _check_forward_backward(model, ref, ker, l64, l32, checkpoint_every=10**4)
    assert shapes and max(max(shape, default=0) for shape in shapes) < 10**3, shapes


@each_kernel
@pytest.mark.parametrize("B,T", [(0, 8), (2, 0)])
def test_empty_batch_or_chunk(model, B, T):
    """B = 0: empty results; T = 0: the weights come back unchanged and their gradient passes through."""
    package, keys = PACKAGES[model]
    xq, xk, xv, lr, tau, params, lnw, lnb = make_inputs(B, 2, T, 16, 4, model, requires_grad=True)
    out, new = package.fused.forward(xq, xk, xv, lr, tau, params, lnw, lnb)
    assert out.shape == xq.shape
    for k in keys:
        assert new[k].shape == params[k].shape
        if T == 0:
            assert torch.equal(new[k], params[k]), k
    loss = out.sum() + sum(new[k].sum() for k in keys)
    grads = torch.autograd.grad(loss, [xq, tau, *params.values(), lnw])
    assert all(torch.isfinite(g).all() for g in grads)
    for k, g in zip(keys, grads[2:], strict=False):
        assert torch.equal(g, torch.ones_like(g) if T == 0 else torch.zeros_like(g)), k


@each_kernel
def test_half_activations_with_float32_weights(model):
    """bfloat16 queries/keys/values with float32 weights (autocast-style): the weights stay float32
    and float32-accurate; only the output is rounded to bfloat16."""
    package, keys = PACKAGES[model]
    xq, xk, xv, lr, tau, params, lnw, lnb = make_inputs(2, 1, 12, 16, 4, model, dtype=torch.float64, seed=5)
    xs = [t.to(torch.bfloat16) for t in (xq, xk, xv, lr, tau)]
    out, new = package.fused.forward(*xs, {k: v.float() for k, v in params.items()}, lnw.float(), lnb.float())
    out_ref, new_ref = package.naive.forward(*(t.double() for t in xs), params, lnw, lnb)
    assert out.dtype == torch.bfloat16
    assert relative_error(out.double(), out_ref) <= 2**-7
    for k in keys:
        assert new[k].dtype == torch.float32
        assert relative_error(new[k].double(), new_ref[k]) <= TOL, k


@each_kernel
def test_decode_strided_and_shared_state(model):
    """decode on strided tokens, with weights and pending sums shared across the batch (stride 0)."""
    package, keys = PACKAGES[model]
    xq, xk, xv, lr, tau, params, lnw, lnb = make_inputs(3, 2, 4, 16, 4, model, dtype=torch.float64, seed=7)
    pending = {k: 0.01 * torch.randn_like(v) for k, v in params.items()}
    shared_p = {k: v[:1].expand_as(v) for k, v in params.items()}
    shared_s = {k: v[:1].expand_as(v) for k, v in pending.items()}
    token = (xq[:, :, 1], xk[:, :, 1], xv[:, :, 1], lr[:, :, 1], tau[1])
    with torch.no_grad():
        for is_last in (False, True):
            ref = package.naive.decode(*token, shared_p, shared_s, lnw, lnb, 1e-6, is_last)
            args = [_strided(t.float()) if t.dim() else t.float() for t in token]
            got = package.fused.decode(
                *args,
                {k: v.float() for k, v in shared_p.items()},
                {k: v.float() for k, v in shared_s.items()},
                _strided(lnw.float()),
                _strided(lnb.float()),
                1e-6,
                is_last,
            )
            assert relative_error(got[0].double(), ref[0]) <= TOL
            for k in keys:
                assert relative_error(got[1][k].double(), ref[1][k]) <= TOL, (is_last, k)
                assert relative_error(got[2][k].double(), ref[2][k]) <= TOL, (is_last, k)


@each_kernel
def test_kernel_calls_do_not_keep_their_inputs_alive(model):
    package, _ = PACKAGES[model]
    xq, xk, xv, lr, tau, params, lnw, lnb = make_inputs(1, 1, 4, 16, 4, model, requires_grad=True)
    query = xq * 1.0  # a non-leaf, as a layer's projected queries are: it holds the graph behind it
    out, new = package.fused.forward(query, xk, xv, lr, tau, params, lnw, lnb)
    out.sum().backward()
    alive = weakref.ref(query)
    del query, out, new
    gc.collect()
    assert alive() is None
