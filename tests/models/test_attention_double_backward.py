"""Attention is differentiable to any order under autograd (innerloop.models.attention.attend).

Torch's fused SDPA kernels (CPU's among them) have no double backward: a ``create_graph=True`` gradient
through attention failed in its second backward with torch's bare "derivative for
aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented". ``attend`` now runs the
fused kernel with a backward that, under ``create_graph=True``, recomputes the attention on the math
kernel; a first-order backward is the fused kernel's own, bit for bit.
"""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from innerloop.models import build_model
from innerloop.models.attention import attend, sliding_window_attention


def _qkv(dtype: torch.dtype = torch.float64, length: int = 12) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, 2, length, 4, dtype=dtype, generator=gen).requires_grad_() for _ in range(3))


def _second_order(q, k, v, call):
    """d/d(q, k, v) of the sum of ``d |call(q, k, v)|^2 / dq``: a gradient of a gradient."""
    (grad_q,) = torch.autograd.grad(call(q, k, v).pow(2).sum(), q, create_graph=True)
    return torch.autograd.grad(grad_q.sum(), (q, k, v))


CALLS = {
    "sliding window, blocks": lambda q, k, v: sliding_window_attention(q, k, v, 5, [0, 7, 12]),
    "causal": lambda q, k, v: attend(q, k, v, is_causal=True),
    "bool mask": lambda q, k, v: attend(q, k, v, attn_mask=torch.ones(12, 12, dtype=torch.bool).tril()),
}


@pytest.mark.parametrize("name", CALLS)
def test_double_backward_equals_the_math_kernels(name):
    q, k, v = _qkv()
    got = _second_order(q, k, v, CALLS[name])
    with sdpa_kernel([SDPBackend.MATH]):  # made of differentiable ops: torch's own second derivative
        want = _second_order(q, k, v, CALLS[name])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_double_backward_passes_gradgradcheck():
    # second derivatives against finite differences of the first, in float64 (small: gradgradcheck
    # perturbs every input and every output's gradient)
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 1, 5, 2, dtype=torch.float64, generator=gen).requires_grad_() for _ in range(3))
    call = lambda q, k, v: sliding_window_attention(q, k, v, 3, [0, 3, 5])  # noqa: E731
    assert torch.autograd.gradgradcheck(call, (q, k, v), fast_mode=True)


def test_first_order_is_the_fused_kernels_bit_for_bit_and_frees_its_graph():
    q, k, v = _qkv(torch.float32)
    mask = torch.ones(12, 12, dtype=torch.bool).tril()
    out = attend(q, k, v, attn_mask=mask)
    upstream = torch.randn_like(out)
    want_out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    want = torch.autograd.grad(want_out, (q, k, v), upstream)
    first = torch.autograd.grad(out, (q, k, v), upstream, retain_graph=True)
    assert torch.equal(out, want_out)
    assert all(torch.equal(g, w) for g, w in zip(first, want, strict=True))
    assert out.grad_fn.graph is None  # the kernel's saved buffers went with its backward
    again = torch.autograd.grad(out, (q, k, v), upstream)  # retain_graph: from a recomputed forward
    assert all(torch.equal(g, w) for g, w in zip(again, want, strict=True))
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(out, (q, k, v), upstream)


def test_only_the_inputs_that_require_grad_get_one():
    q, k, v = _qkv()
    k.requires_grad_(False)
    out = attend(q, k, v, is_causal=True)
    grads = torch.autograd.grad(out.sum(), (q, v), create_graph=True)
    with sdpa_kernel([SDPBackend.MATH]):
        want = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True).sum(), (q, v))
    for g, w in zip(grads, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "section",
    [
        {"mixer": "attention"},
        {"mixer": "swa", "window": 3},
        {"mixer": "e2e", "window": 3, "intermediate_size": 16, "e2e": {"test_time_training": False}},
    ],
    ids=["attention", "swa", "e2e-swa"],
)
def test_a_gradient_penalty_through_a_language_model(section):
    model = build_model(
        {"vocab_size": 11, "hidden_size": 8, "num_layers": 2, "num_heads": 2, **section}
    ).double()
    ids = torch.randint(0, 11, (2, 9), generator=torch.Generator().manual_seed(1))

    def penalty_gradients():
        params = list(model.parameters())
        loss = model(ids)[0].pow(2).mean()
        grads = torch.autograd.grad(loss, params, create_graph=True)
        return torch.autograd.grad(sum(g.pow(2).sum() for g in grads), params, allow_unused=True)

    got = penalty_gradients()  # torch's bare NotImplementedError in the second backward before
    with sdpa_kernel([SDPBackend.MATH]):
        want = penalty_gradients()
    for g, w in zip(got, want, strict=True):
        if w is None:
            assert g is None
        else:
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_a_mask_that_requires_grad_gets_its_gradient():
    # the function differentiates q, k and v only: an additive mask being learned must not lose its gradient
    q, k, v = _qkv()
    bias = torch.randn(
        12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3)
    ).requires_grad_()
    got = torch.autograd.grad(attend(q, k, v, attn_mask=bias).pow(2).sum(), (q, bias))
    with sdpa_kernel([SDPBackend.MATH]):
        want = torch.autograd.grad(
            F.scaled_dot_product_attention(q, k, v, attn_mask=bias).pow(2).sum(), (q, bias)
        )
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def _backwards(call, dtype=torch.float32):
    """``call``'s output and its gradients w.r.t. (q, k, v): first order (retain_graph), first order
    again from the recomputed forward, and under create_graph=True."""
    q, k, v = _qkv(dtype, length=16)
    out = call(q, k, v)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(out.dtype)
    first = torch.autograd.grad(out, (q, k, v), upstream, retain_graph=True)
    again = torch.autograd.grad(out, (q, k, v), upstream, retain_graph=True)
    created = torch.autograd.grad(out, (q, k, v), upstream, create_graph=True)
    return out, first, again, created


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_under_autocast_every_backward_computes_in_the_forwards_dtype(dtype):
    # the function kept float32 q, k, v and recomputed from them outside the forward's autocast: a
    # retain_graph second backward and a create_graph backward differentiated float32 attention
    # (up to 0.016 from the bf16 gradients the first backward and SDPA's own gave)
    def call(q, k, v):
        with torch.autocast("cpu", dtype=dtype):
            return attend(q, k, v, is_causal=True)

    def plain(q, k, v):
        with torch.autocast("cpu", dtype=dtype):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    out, first, again, created = _backwards(call)
    want_out, want, want_again, _ = _backwards(plain)
    with sdpa_kernel([SDPBackend.MATH]):  # the math kernel under the same autocast: the create_graph one
        *_, want_created = _backwards(plain)
    assert out.dtype == dtype and torch.equal(out, want_out)
    for got, wanted in [(first, want), (again, want_again), (created, want_created)]:
        assert all(g.dtype == torch.float32 and torch.equal(g, w) for g, w in zip(got, wanted, strict=True))


def test_a_recomputation_under_another_autocast_is_not_cast_again():
    q, k, v = _qkv(torch.float32, length=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attend(q, k, v, is_causal=True)
    first = torch.autograd.grad(out.float().sum(), (q, k, v), retain_graph=True)
    with torch.autocast("cpu", dtype=torch.float16):
        again = torch.autograd.grad(out.float().sum(), (q, k, v))
    assert all(torch.equal(g, w) for g, w in zip(again, first, strict=True))


def test_dropout_keeps_the_forwards_mask_in_every_backward():
    # the function recomputed the attention in a backward and drew another dropout mask there: a
    # retain_graph second backward gave other gradients than the first (SDPA's own gives the same)
    def call(q, k, v):
        torch.manual_seed(5)
        return attend(q, k, v, dropout_p=0.5)

    def plain(q, k, v):
        torch.manual_seed(5)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)

    out, first, again, created = _backwards(call, torch.float64)
    want_out, want, *_ = _backwards(plain, torch.float64)
    assert torch.equal(out, want_out) and all(torch.equal(g, w) for g, w in zip(first, want, strict=True))
    assert all(torch.equal(g, w) for g, w in zip(again, first, strict=True))
    for g, w in zip(created, first, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_meta_tensors_go_through_shapes_only():
    q = torch.empty(2, 2, 5, 4, device="meta", requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # on another device: meta is not cast
        out = attend(q, q, q, is_causal=True)
    out.sum().backward()
    assert out.shape == (2, 2, 5, 4) and out.dtype == torch.float32 and q.grad.shape == q.shape


def _tensors_held_by(node) -> list[torch.Tensor]:
    """The tensors a backward node holds through Python objects (its ctx's attributes), beside the
    saved tensors torch holds and its saved-tensor hooks govern."""
    found, stack, seen = [], [node], set()
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found.append(obj)
        elif isinstance(obj, (tuple, list, dict)) or obj is node:  # the node's referents: its ctx dict
            stack.extend(gc.get_referents(obj))
    return found


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_keeps_no_attention_tensor_alive(use_reentrant):
    # under saved-tensor hooks the function kept the kernel's graph on ctx, out of the hooks' reach:
    # a checkpointed attention's q, k, v and output stayed alive to the backward (8 checkpointed
    # layers of [4, 2048, 256] held 448 MB where SDPA's own held 64 MB)
    def call(f, q, k, v):
        def region(q, k, v):
            return f(q * 2, k * 2, v * 2, is_causal=True)

        return checkpoint(region, q, k, v, use_reentrant=use_reentrant)

    def gradients(f):  # (a reentrant checkpoint takes backward, not autograd.grad)
        q, k, v = _qkv(length=16)
        out = call(f, q, k, v)
        if not use_reentrant:  # (reentrant: the forward runs without grad, again in the backward)
            assert f is not attend or _tensors_held_by(out.grad_fn) == []
        out.backward(torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(6)))
        return out, q.grad, k.grad, v.grad

    got, want = gradients(attend), gradients(F.scaled_dot_product_attention)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    if not use_reentrant:  # a gradient of a gradient through the checkpointed attention
        q, k, v = _qkv(length=16)
        got = _second_order(q, k, v, lambda *qkv: call(attend, *qkv))
        with sdpa_kernel([SDPBackend.MATH]):
            want = _second_order(q, k, v, lambda *qkv: call(F.scaled_dot_product_attention, *qkv))
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_offloaded_saved_tensors_give_sdpas_gradients():
    q, k, v = _qkv(torch.float32, length=16)
    with torch.autograd.graph.save_on_cpu():
        out = attend(q * 2, k * 2, v * 2, is_causal=True)
    assert _tensors_held_by(out.grad_fn) == []
    got = torch.autograd.grad(out.sum(), (q, k, v))
    want = torch.autograd.grad(
        F.scaled_dot_product_attention(q * 2, k * 2, v * 2, is_causal=True).sum(), (q, k, v)
    )
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def test_the_function_leaves_the_overrideable_backend_as_it_found_it(monkeypatch):
    # sdpa_kernel turns off every backend its list leaves out: the function's list lacked OVERRIDEABLE
    # (XPU's and other out-of-tree devices' fused kernel), so their attention ran on the math kernel
    flag = getattr(torch._C, "_get_overrideable_sdp_enabled", None)
    if flag is None:
        pytest.skip("this torch has no OVERRIDEABLE SDPA backend (torch < 2.5)")
    seen = []
    sdpa = F.scaled_dot_product_attention

    def recording(*args, **kwargs):
        seen.append(flag())
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    q, k, v = _qkv(torch.float32)
    out = attend(q, k, v, is_causal=True)
    torch.autograd.grad(out.sum(), (q, k, v), retain_graph=True)
    torch.autograd.grad(out.sum(), (q, k, v))  # from a recomputed forward
    assert seen == [True, True]
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):  # narrowed: it stays off
        seen.clear()
        attend(q, k, v, is_causal=True)
        assert seen == [False]
