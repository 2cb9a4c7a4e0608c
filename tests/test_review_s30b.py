"""Review s30b: numbers under hostile magnitudes, dtypes and lengths.

Each test is a regression test of a finding of the review (docs: /work/notes/review_s30b.md): a
silently wrong number or a misleading message that the library returned before its fix.
"""

from __future__ import annotations

import copy

import pytest
import torch

import innerloop
from innerloop.core.family_layers import LinearAttentionLayer
from innerloop.core.functional import LayerNorm, RMSNorm
from innerloop.models import ModelConfig, build_model


@pytest.fixture(autouse=True, scope="module")
def _registry_loaded() -> None:
    """The registry's first-use checks (about 0.8 s, once per process) run here, not in a test's call."""
    with torch.no_grad():
        innerloop.TTTLayer(8, 2)(torch.randn(1, 2, 8))


def _row_errors(y: torch.Tensor, y64: torch.Tensor) -> torch.Tensor:
    """Relative error of each row (last dim) of ``y`` against the float64 ``y64``."""
    return (y.double() - y64).norm(dim=-1) / y64.norm(dim=-1)


def _layer_and_its_float64_copy(layer: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The outputs of ``layer`` on ``x`` and of a float64 copy of it on ``x`` in float64 (no grad)."""
    layer64 = copy.deepcopy(layer).double()
    with torch.no_grad():
        return layer(x)[0], layer64(x.double())[0]


@pytest.mark.parametrize("norm_class", [RMSNorm, LayerNorm])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_a_norm_of_a_finite_row_whose_squares_overflow_is_its_true_norm_not_zero(norm_class, dtype) -> None:
    """torch's RMSNorm / LayerNorm square the row as it is: a finite float32 row of entries ~1e20 has an
    inf mean square and was normalised to 0 (RMSNorm) or to the bias (LayerNorm), silently. The norms
    the layers and models use scale such rows by a power of two first; gradients stay right too."""
    torch.manual_seed(0)
    norm = norm_class(16).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
    scale = 1e200 if dtype == torch.float64 else 1e20
    x = torch.randn(3, 16, dtype=torch.float64)
    exact = copy.deepcopy(norm).double()
    exact.eps = 0.0  # scale-invariant without eps (negligible beside a mean square of 1e40)
    reference = exact(x)
    big = (x * scale).to(dtype).requires_grad_()
    y = norm(big)
    # measured 9e-8 / 2.8e-3 / 2.2e-16 (float32 / bf16 / float64); the bug gave errors of 1 (a zero row)
    tolerance = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float64: 1e-14}[dtype]
    assert _row_errors(y, reference).max() < tolerance
    y.sum().backward()
    assert bool(torch.isfinite(big.grad).all()) and bool(big.grad.abs().sum() > 0)
    moderate = torch.randn(4, 16).to(dtype)  # any row of ordinary size: exactly torch's norm
    plain = (torch.nn.RMSNorm if norm_class is RMSNorm else torch.nn.LayerNorm)(16).to(dtype)
    plain.load_state_dict(norm.state_dict())
    assert torch.equal(norm(moderate), plain(moderate))


@pytest.mark.parametrize("norm_class", [RMSNorm, LayerNorm])
def test_a_norm_under_vmap_scales_as_it_does_eagerly(norm_class) -> None:
    """Under torch.func transforms (and torch.compile, and off the CPU) the norm cannot ask whether any
    row needs scaling (a data-dependent branch): it always scales, and gives the eager result, huge rows
    and ordinary rows (multiplied by exactly 1) alike."""
    torch.manual_seed(0)
    norm = norm_class(16)
    x = torch.randn(2, 3, 16)
    x[0, 1] *= 1e20  # one huge row among ordinary ones
    eager = torch.stack([norm(row) for row in x])
    mapped = torch.func.vmap(norm)(x)
    torch.testing.assert_close(mapped, eager, rtol=1e-6, atol=0)
    plain = (torch.nn.RMSNorm if norm_class is RMSNorm else torch.nn.LayerNorm)(16)
    plain.load_state_dict(norm.state_dict())
    assert torch.equal(mapped[1], plain(x[1]))  # an ordinary batch element: torch's norm, bit for bit


def test_linear_attention_of_large_input_is_right_not_zeroed_by_its_output_norm() -> None:
    """LinearAttentionLayer (its quadratic feature map) on float32 input of size 1e4: the scan's output
    (~1e20) stayed finite, but its per-head RMSNorm's mean square overflowed and 16 of 37 tokens came
    out with 40-80% error (heads zeroed), finite, no error raised. Now every token is within float32
    rounding of the float64 layer."""
    torch.manual_seed(0)
    y, y64 = _layer_and_its_float64_copy(LinearAttentionLayer(32, 2), torch.randn(1, 37, 32) * 1e4)
    assert _row_errors(y, y64).max() < 1e-5  # measured <= 7e-7


@pytest.mark.parametrize("mixer", ["ttt", "attention", "linear_attention", "e2e"])
def test_a_model_whose_residual_stream_is_huge_gives_its_logits_not_uniform_ones(mixer) -> None:
    """An untied embedding scaled by 1e30 (weights loaded from elsewhere, a bad init): every RMSNorm of
    the float32 residual stream overflowed to 0 and the logits came out uniform (std 0), finite, with
    no error; at 1e20 the TTT and linear-attention models were 20-30% off. Now float32 equals float64."""
    torch.manual_seed(0)
    config = ModelConfig(mixer=mixer, tie_embeddings=False, hidden_size=32, num_heads=2, intermediate_size=64)
    model = build_model(config)
    with torch.no_grad():
        model.embed.weight.mul_(1e30)
    model64 = copy.deepcopy(model).double()
    ids = torch.randint(0, 256, (1, 24))
    with torch.no_grad():
        logits, _ = model(ids)
        logits64, _ = model64(ids)
    assert float(logits.std()) > 0
    assert _row_errors(logits, logits64).max() < 1e-5  # measured <= 2e-7


def test_a_ttt_layer_without_inner_norm_on_large_input_is_right() -> None:
    """TTTLayer's post-norm (a LayerNorm) takes the inner model's output, unbounded without the inner
    LayerNorm; it is the same overflow-safe norm."""
    layer = innerloop.TTTLayer(32, 2, inner_model="matrix", inner_loss="dot_product", inner_norm=False)
    y, y64 = _layer_and_its_float64_copy(layer, torch.randn(1, 20, 32) * 3e5)
    assert _row_errors(y, y64).max() < 1e-5  # measured <= 7e-7


def test_an_inner_loop_that_diverged_is_named_so_not_blamed_on_the_built_in_plugins() -> None:
    """TTT-MLP without the inner LayerNorm, base_lr 10, input ~4e3: the inner weights grew from 0.075 to
    4.5e18 (a growth of 6e19: a divergence) and the output went NaN. The message
    called the weights "moderate", the input "of moderate size", and asked to report the case; it now
    says the inner loop diverged and to lower base_lr."""
    torch.manual_seed(0)
    layer = innerloop.TTTLayer(32, 2, inner_model="mlp", inner_norm=False, inner_residual=False, base_lr=10.0)
    with torch.no_grad(), pytest.raises(ValueError) as raised:
        layer(torch.randn(1, 32, 32) * 1000)
    message = str(raised.value)
    assert "the inner weights diverged: they grew from largest |W| 7.5e-02 to" in message
    assert "lower base_lr (now 10)" in message
    assert "stayed moderate" not in message and "please report" not in message


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sliding_window_attention_far_into_a_sequence_equals_it_at_the_start(dtype) -> None:
    """A sliding window reads only its last tokens, so its output is the same at any position (RoPE is
    relative). The angles position * inv_freq were rounded to float32: at position 1e7 (a long
    constant-memory generation) the output was 1.3e-2 off its value at the start, in float64 too
    (1.3e-5 at 1e4, 1.2e-1 beyond 2**24 where positions collide). Now the angles are taken in float64."""
    from innerloop.models.attention import CausalSelfAttention, KVCache, rotate_with_rope

    torch.manual_seed(0)
    attention = CausalSelfAttention(64, 4, window=32).to(dtype)
    before, x = torch.randn(1, 31, 64, dtype=dtype), torch.randn(1, 40, 64, dtype=dtype)
    with torch.no_grad():
        at_start = attention(torch.cat([before, x], 1))[0][:, 31:]
        _, k, v = attention.qkv_proj(before).view(1, 31, 3, 4, 16).unbind(2)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        tolerance = 1e-12 if dtype == torch.float64 else 1e-6
        for position in (10**4, 10**7, 2**24 + 1000):  # the window's cache as it would be there
            keys = rotate_with_rope(k, torch.arange(position - 31, position), attention.rope_theta, True)
            far, _ = attention(x, KVCache(keys, v, position))
            assert float((far - at_start).norm() / at_start.norm()) < tolerance, position


def test_a_ttt_layer_with_a_huge_query_projection_is_right_not_nan() -> None:
    """q_proj's weights x1e37 (finite, and q stays finite): the query's output rows (~1e37) were NaN after
    the post-LayerNorm, and training stopped as "diverged" (tests/train/test_review_s13_train.py used it
    as its divergence); the float64 layer's output is finite and float32 now equals it."""
    torch.manual_seed(0)
    layer = innerloop.TTTLayer(32, 2)
    with torch.no_grad():
        layer.q_proj.weight.mul_(1e37)
    layer64 = copy.deepcopy(layer).double()
    x = torch.randn(1, 20, 32)
    with torch.no_grad():
        y, _ = layer(x)
        y64, _ = layer64(x.double())
    assert _row_errors(y, y64).max() < 1e-5  # measured <= 7e-7
