"""Review s29a: torch.compile, torch.func, copies and threads on the public API. Each test is one
finding."""

from __future__ import annotations

import copy

import pytest
import torch

from innerloop.core.family_layers import TitansLayer


# reason: dynamo traces a Titans layer's prefill and decoded tokens (~5 s on 2 cores)
@pytest.mark.slow
def test_a_compiled_titans_layer_decodes_as_eager():
    """Decoding a compiled Titans layer (a layer that forgets) crashed inside dynamo at the first decoded
    token ("BooleanAtom not allowed in this context"): the check that the state's decay product fits
    the layer's gates compared a bool with the symbolic mini-batch offset while traced."""
    torch.manual_seed(0)
    layer = TitansLayer(hidden_size=16, num_heads=2, mini_batch_size=4).eval()
    compiled = torch.compile(copy.deepcopy(layer), backend="eager")
    x = torch.randn(1, 9, 16)
    torch._dynamo.reset()
    with torch.no_grad():
        got, state = compiled(x[:, :2])
        want, want_state = layer(x[:, :2])
        torch.testing.assert_close(got, want)
        # the short convs' history has a fresh tensor's strides, not the prompt's (2 + 3 rows): dynamo
        # guards on strides (at batch size 1 too), and recompiled the first decoded token per prompt length
        assert all(t.stride() == torch.empty(t.shape).stride() for t in state.conv_history.values())
        for index in range(2, 9):
            got, state = compiled(x[:, index : index + 1], state)
            want, want_state = layer(x[:, index : index + 1], want_state)
            torch.testing.assert_close(got, want)


# reason: dynamo and AOTAutograd trace a Titans layer's training step with dynamic shapes (~3 s on 2 cores)
@pytest.mark.slow
def test_a_titans_layer_compiled_with_dynamic_shapes_trains_as_eager():
    """A Titans layer compiled with dynamic shapes (``dynamic=True``, or after a recompile for a second
    shape) crashed in its backward ("view size is not compatible with input tensor's size and
    stride"): its gates ``[B, H, T]`` were transposed views of ``[B, T, H]``, which AOTAutograd traced
    the gradient as, and the eager scan's backward hands it a contiguous one.

    One shape: ``dynamic=True`` traces symbolic sizes from the first call, and the crash came there
    (without the fix, the first of the two shapes this test ran before s58e failed, and either alone
    fails). 3 x 5 tokens: a whole mini-batch and a part of one."""
    torch.manual_seed(0)
    layer = TitansLayer(hidden_size=16, num_heads=2, mini_batch_size=4)
    compiled = torch.compile(copy.deepcopy(layer), backend="aot_eager", dynamic=True)
    torch._dynamo.reset()
    x = torch.randn(3, 5, 16)
    got, _ = compiled(x)
    got_grads = torch.autograd.grad(got.square().mean(), list(compiled.parameters()))
    want, _ = layer(x)
    want_grads = torch.autograd.grad(want.square().mean(), list(layer.parameters()))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grads, want_grads)
