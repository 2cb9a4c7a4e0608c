"""Review s58b: attention keeps NaN and inf where its definition (torch's math kernel) does, on the two
paths s57d left open -- while ``torch.compile`` traces, and for a key cached by an earlier call."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from innerloop.models.attention import CausalSelfAttention, attend, finite_or_nan_positions, rotate_with_rope


def _non_finite_rows(t: torch.Tensor) -> torch.Tensor:
    return ~torch.isfinite(t).all(-1)


# reason: dynamo and AOTAutograd trace attend once per case (~1 s each on a loaded 2-core CPU). aot_eager
# runs aten's fused CPU kernel as inductor does (its output code calls
# aten._scaled_dot_product_flash_attention_for_cpu), without a C++ compile
@pytest.mark.slow
@pytest.mark.parametrize("which", ["q", "k"])
@pytest.mark.parametrize("queries", [1, 8])
def test_compiled_attention_is_non_finite_where_the_math_kernel_is(which: str, queries: int) -> None:
    """Under torch.compile attend ran SDPA as it is: the fused CPU kernel returned finite numbers for a
    NaN/inf query and for causal queries seeing a NaN key (s57d's cases), where the math kernel gives NaN."""
    causal = queries > 1
    torch._dynamo.reset()  # one trace a case, its shapes static
    compiled = torch.compile(
        lambda q, k, v: attend(q, k, v, is_causal=causal), backend="aot_eager", fullgraph=True, dynamic=False
    )
    for value in (float("nan"), float("inf")):
        torch.manual_seed(0)
        t = {name: torch.randn(1, 2, queries if name == "q" else 8, 8) for name in "qkv"}
        t[which][0, 0, 0, 0] = value
        with sdpa_kernel([SDPBackend.MATH]):
            expected = F.scaled_dot_product_attention(t["q"], t["k"], t["v"], is_causal=causal)
        wanted = _non_finite_rows(expected)
        assert wanted.any() or (which, value) == ("k", float("inf"))  # an inf key may weigh 0
        got = _non_finite_rows(compiled(t["q"], t["k"], t["v"]))
        assert (got | ~wanted).all(), (which, queries, value, wanted, got)  # finite before on a wanted row


# reason: inductor compiles the layer's C++ kernels (25-80 s on a loaded 2-core CPU); the one test of what
# a user runs: the default backend, whose output code calls aten's fused CPU kernel
@pytest.mark.slow
def test_a_compiled_attention_layer_with_a_nan_weight_gives_nan() -> None:
    """A NaN query weight: eager gave NaN, the compiled layer finite outputs on every row."""
    torch.manual_seed(0)
    attn = CausalSelfAttention(16, 2).eval()
    with torch.no_grad():
        attn.qkv_proj.weight[0, 0] = float("nan")
        y, _ = torch.compile(attn, fullgraph=True)(torch.randn(1, 8, 16))
    assert _non_finite_rows(y).all()


def _attention_by_definition(attn: CausalSelfAttention, x: torch.Tensor, cached: int) -> torch.Tensor:
    """The attention outputs [B, H, T - cached, f] of x's tokens after the first ``cached``, on the math
    kernel in float64, from q, k, v computed as the layer computes them (RoPE at absolute positions)."""
    batch, length, _ = x.shape
    q, k, v = attn.qkv_proj(x).view(batch, length, 3, attn.num_heads, attn.head_dim).unbind(2)
    positions = torch.arange(length)
    q, k = (rotate_with_rope(t.transpose(1, 2), positions, attn.rope_theta, True) for t in (q, k))
    mask = positions[None, :] <= positions[cached:, None]
    with sdpa_kernel([SDPBackend.MATH]):
        return F.scaled_dot_product_attention(
            q[:, :, cached:].double(), k.double(), v.transpose(1, 2).double(), attn_mask=mask
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("queries", [1, 4])
def test_a_key_that_overflowed_in_an_earlier_call_is_not_weighed_finite_later(
    dtype: torch.dtype, queries: int
) -> None:
    """A key that overflowed to inf in one call (its own outputs NaN on rows) is cached; the fused CPU
    kernel (bfloat16, float16) weighed it finite for later queries the definition gives NaN, a decoded
    token among them: finite, wrong outputs. The cache now holds that position as NaN."""
    torch.manual_seed(0)
    attn = CausalSelfAttention(16, 2).to(dtype).eval()
    x = torch.randn(1, 40 + queries, 16, dtype=dtype)
    x[..., 0] = 0
    x[0, 1, 0] = 2  # token 1's key overflows: 2 * the dtype's largest number in its first feature
    with torch.no_grad():
        attn.qkv_proj.weight[16] = 0
        attn.qkv_proj.weight[16, 0] = torch.finfo(dtype).max
        _, state = attn(x[:, :40])
        y, _ = attn(x[:, 40:], state)
        wanted = _non_finite_rows(_attention_by_definition(attn, x, 40)).any(1)  # [B, T]
    assert wanted.any()
    assert (_non_finite_rows(y) | ~wanted).all(), (wanted, _non_finite_rows(y))


def test_a_cached_position_holding_nan_or_inf_is_nan_in_its_key_and_value() -> None:
    """The rule the caches keep: finite positions bit for bit (-0.0 too), a position whose key or value
    holds NaN or inf is NaN in both, the other positions and heads as they were."""
    k, v = torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)
    k[0, 0, 0, 0], k[1, 1, 3, 2], v[0, 1, 4, 1] = -0.0, float("inf"), float("-inf")
    v[1, 0, 2, 0] = float("nan")
    new_k, new_v = finite_or_nan_positions(k, v)
    bad = torch.zeros(2, 2, 5, dtype=torch.bool)
    bad[1, 1, 3] = bad[0, 1, 4] = bad[1, 0, 2] = True
    assert new_k[bad].isnan().all() and new_v[bad].isnan().all()
    assert torch.equal(new_k[~bad].view(torch.int32), k[~bad].view(torch.int32))
    assert torch.equal(new_v[~bad].view(torch.int32), v[~bad].view(torch.int32))
