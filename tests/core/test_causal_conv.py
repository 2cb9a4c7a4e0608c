"""The short causal convolution (``causal_depthwise_conv``) against ``torch.nn.functional.conv1d``.

It is written as one multiply-add per tap over ``[B, T, C]`` rows, so that its output lies in the input's
layout (``F.conv1d`` on a transposed input returned a ``[B, C, T]`` buffer, whose strides slowed every
later elementwise op and its backward). These tests hold it to the convolution it replaces: values,
every gradient, resuming from the carried history, and bfloat16 accumulated in float32 and rounded once.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from innerloop.core.functional import causal_depthwise_conv


def conv1d_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, history: torch.Tensor
) -> torch.Tensor:
    """The convolution over ``[history; x]`` by ``F.conv1d`` (``[B, T, C]``)."""
    padded = torch.cat([history, x], dim=1)
    return F.conv1d(padded.transpose(1, 2), weight, bias, groups=weight.shape[0]).transpose(1, 2)


def _case(batch: int, tokens: int, channels: int, kernel: int, with_bias: bool, seed: int) -> tuple:
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64, requires_grad=True)

    return (
        draw(batch, tokens, channels),
        draw(channels, 1, kernel),
        draw(channels) if with_bias else None,
        draw(batch, kernel - 1, channels),
    )


shapes = {
    "batch": st.integers(1, 3),
    "tokens": st.integers(0, 19),
    "channels": st.integers(1, 9),
    "kernel": st.integers(1, 5),
    "with_bias": st.booleans(),
    "seed": st.integers(0, 2**16),
}


@pytest.mark.slow  # ~0.9 s: 40 shapes with every gradient (the split, layout and bfloat16 tests stay in the fast loop)
@settings(max_examples=40, deadline=None)
@given(**shapes)
def test_equals_conv1d_values_history_and_gradients(
    batch: int, tokens: int, channels: int, kernel: int, with_bias: bool, seed: int
) -> None:
    x, weight, bias, history = _case(batch, tokens, channels, kernel, with_bias, seed)
    y, new_history = causal_depthwise_conv(x, weight, bias, history)
    assert y.shape == (batch, tokens, channels) and y.dtype == torch.float64
    torch.testing.assert_close(new_history, torch.cat([history, x], dim=1)[:, tokens:], rtol=0, atol=0)
    if tokens == 0:  # nothing to convolve (F.conv1d refuses an input shorter than its kernel)
        return
    expected = conv1d_reference(x, weight, bias, history)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    inputs = [t for t in (x, weight, bias, history) if t is not None]
    probe = torch.randn_like(y)
    ours = torch.autograd.grad((y * probe).sum(), inputs)
    theirs = torch.autograd.grad((expected * probe).sum(), inputs)
    for got, want in zip(ours, theirs, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.slow  # hypothesis over splits: ~0.4 s
@settings(max_examples=25, deadline=None)
@given(
    tokens=st.integers(1, 19), split=st.integers(0, 19), kernel=st.integers(1, 5), seed=st.integers(0, 2**16)
)
def test_any_split_with_the_history_carried_equals_the_whole(
    tokens: int, split: int, kernel: int, seed: int
) -> None:
    split = min(split, tokens)
    x, weight, bias, history = _case(2, tokens, 5, kernel, True, seed)
    whole, whole_history = causal_depthwise_conv(x, weight, bias, history)
    first, carried = causal_depthwise_conv(x[:, :split], weight, bias, history)
    second, final_history = causal_depthwise_conv(x[:, split:], weight, bias, carried)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, rtol=0, atol=0)  # the same sums
    torch.testing.assert_close(final_history, whole_history, rtol=0, atol=0)


def test_the_output_lies_in_the_input_layout() -> None:
    x = torch.randn(2, 33, 12)
    y, _ = causal_depthwise_conv(x, torch.randn(12, 1, 4), torch.randn(12), torch.zeros(2, 3, 12))
    assert y.is_contiguous() and y.stride() == x.stride()


def test_second_derivatives_equal_conv1d() -> None:
    x, weight, bias, history = _case(2, 7, 3, 4, True, 0)
    inputs = (x, weight, bias, history)
    torch.autograd.gradgradcheck(lambda *a: causal_depthwise_conv(*a)[0], inputs)
    torch.autograd.gradgradcheck(conv1d_reference, inputs)


@pytest.mark.parametrize("with_bias", [False, True])
def test_bfloat16_accumulates_in_float32_and_rounds_once(with_bias: bool) -> None:
    """Each output within half a bfloat16 ulp of the exact sum (plus float32's accumulation error): taps
    added in bfloat16 one by one would round after each and miss this where the terms cancel."""
    generator = torch.Generator().manual_seed(0)
    x, weight, history = (
        torch.randn(*s, generator=generator) for s in ((2, 256, 64), (64, 1, 4), (2, 3, 64))
    )
    bias = torch.randn(64, generator=generator) if with_bias else None
    x, weight, history = x.bfloat16(), weight.bfloat16(), history.bfloat16()
    bias = bias.bfloat16() if bias is not None else None
    y, _ = causal_depthwise_conv(x, weight, bias, history)
    assert y.dtype == torch.bfloat16
    as64 = [t.double() if t is not None else None for t in (x, weight, bias, history)]
    exact = conv1d_reference(*as64)
    padded = torch.cat([as64[3], as64[0]], dim=1).abs()
    magnitude = conv1d_reference(padded[:, 3:], as64[1].abs(), None, padded[:, :3])  # sum of |terms|
    if bias is not None:
        magnitude = magnitude + as64[2].abs()
    bound = 2.0**-8 * exact.abs() + 1e-6 * magnitude
    assert bool(((y.double() - exact).abs() <= bound).all())


def test_vmap_equals_a_loop_over_the_batch() -> None:
    x, weight, bias, history = (t.detach() if t is not None else t for t in _case(3, 6, 4, 3, True, 1))
    batched = torch.func.vmap(lambda a, h: causal_depthwise_conv(a[None], weight, bias, h[None])[0][0])(
        x, history
    )
    looped = torch.stack(
        [causal_depthwise_conv(x[i : i + 1], weight, bias, history[i : i + 1])[0][0] for i in range(3)]
    )
    torch.testing.assert_close(batched, looped, rtol=0, atol=0)
