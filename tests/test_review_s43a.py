"""Review s43a (session 42's changes read adversarially): attention's twice-differentiable SDPA function
(models/attention.py attend), the evaluation metrics' reset (train/module.py), the momentum rule's tie of
its unread token offsets (core/layer.py) and the xdist controller's kernel build (tests/conftest.py).

Checked and found right: attend against SDPA bit for bit, first order, and against the math kernel under
create_graph, for GQA (enable_gqa), scale, non-contiguous and expanded (zero-stride) inputs, batch or
length 0 and 1, inputs that do not require grad, no_grad / inference_mode, tensor hooks, torch.func
(grad, vmap, jvp, vmap of grad), torch.compile (fullgraph, also under autocast), reentrant checkpointing;
peak memory and saved bytes of a training step of the attention and swa LMs equal af14a60's (float32 and
bfloat16 autocast), a first-order step's thread CPU time within the noise at 256 wide (about 0.15 ms more
per attend call on tiny tensors); the metric reset (all four metrics are evaluation-only; a no-op for one
process); the momentum tie under float16 / bfloat16 weights, a frozen learnable_token_idx and
torch.compile; the controller's build with no compiler (no file, no process left) and under -n 0.

Found and fixed (tests in tests/models/test_attention_double_backward.py and here): under autocast a
retain_graph second backward and every create_graph backward through attend differentiated float32
attention; dropout drew a new mask in each recomputation; under non-reentrant checkpointing or
save_on_cpu attend kept q, k, v and its output alive outside the hooks; a NaN or inf in the momentum
rule's unread token offsets made its outputs NaN under autograd only.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from innerloop.core.layer import TTTLayer
from innerloop.models.attention import attend


def _tensor(*shape, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


SHAPES = {  # name: (call, q, k, v shapes)
    "gqa": (lambda f, q, k, v: f(q, k, v, enable_gqa=True, is_causal=True), (2, 4, 6, 4), (2, 2, 6, 4)),
    "scale": (lambda f, q, k, v: f(q, k, v, scale=0.3, is_causal=True), (2, 2, 6, 4), (2, 2, 6, 4)),
    "non-contiguous": (
        lambda f, q, k, v: f(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True),
        (2, 6, 2, 4),
        (2, 6, 2, 4),
    ),
    "expanded": (
        lambda f, q, k, v: f(q, k.expand(2, 2, 6, 4), v.expand(2, 2, 6, 4)),
        (2, 2, 6, 4),
        (1, 1, 6, 4),
    ),
    "length 1": (lambda f, q, k, v: f(q, k, v, is_causal=True), (2, 2, 1, 4), (2, 2, 1, 4)),
    "batch 0": (lambda f, q, k, v: f(q, k, v, is_causal=True), (0, 2, 5, 4), (0, 2, 5, 4)),
    "length 0": (lambda f, q, k, v: f(q, k, v), (2, 2, 0, 4), (2, 2, 0, 4)),
}


@pytest.mark.parametrize("name", SHAPES)
def test_attend_is_sdpa_on_every_shape(name):
    call, q_shape, kv_shape = SHAPES[name]

    def gradients(f, create_graph=False):
        q, k, v = (_tensor(*s, seed=i).requires_grad_() for i, s in enumerate((q_shape, kv_shape, kv_shape)))
        out = call(f, q, k, v)
        upstream = _tensor(*out.shape, seed=9)
        return out, torch.autograd.grad(out, (q, k, v), upstream, create_graph=create_graph)

    (out, got), (want_out, want) = gradients(attend), gradients(F.scaled_dot_product_attention)
    assert torch.equal(out, want_out) and all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    _, created = gradients(attend, create_graph=True)
    with sdpa_kernel([SDPBackend.MATH]):
        _, want = gradients(F.scaled_dot_product_attention)
    for g, w in zip(created, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_attend_under_torch_func_is_the_math_kernels():
    q = _tensor(2, 2, 6, 4)

    def loss(f):
        return lambda x: f(x, x, x, is_causal=True).pow(2).sum()

    with sdpa_kernel([SDPBackend.MATH]):
        want = grad(loss(F.scaled_dot_product_attention))(q)
        want_jvp = jvp(lambda x: F.scaled_dot_product_attention(x, x, x, is_causal=True), (q,), (q,))[1]
    torch.testing.assert_close(grad(loss(attend))(q), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        vmap(grad(loss(attend)))(q), vmap(grad(loss(F.scaled_dot_product_attention)))(q)
    )
    torch.testing.assert_close(jvp(lambda x: attend(x, x, x, is_causal=True), (q,), (q,))[1], want_jvp)


@pytest.mark.parametrize("offset", [float("inf"), float("nan")])
def test_a_non_finite_unread_token_offset_leaves_a_momentum_layers_outputs_as_without_autograd(offset):
    # lr + 0.0 * tau.sum() was NaN for an inf or NaN offset: the outputs were NaN under autograd (the
    # layer raised 'non-finite outputs from finite input') and finite without it
    torch.manual_seed(0)
    layer = TTTLayer(8, 2, update_rule="momentum", mini_batch_size=2, kernel="torch")
    with torch.no_grad():
        layer.learnable_token_idx[0] = offset
    x = torch.randn(1, 5, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, _ = layer(x)
    got, _ = layer(x)
    assert torch.equal(got, want)
    got.square().sum().backward()
    assert torch.equal(layer.learnable_token_idx.grad, torch.zeros_like(layer.learnable_token_idx))
