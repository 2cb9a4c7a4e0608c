"""bfloat16 (issue 13, item 1): under ``torch.autocast`` and with the weights in bfloat16
(``model.to(torch.bfloat16)``), every inner model on every path (torch, fused torch, the compiled
CPU kernel, token-by-token decoding, mini-batch GD) trains and infers with the precision policy:
the projections in bfloat16, the inner scan (inner weights W and b, the inner LayerNorm statistics,
the inner gradient sums) and so the whole state in float32.

How close bfloat16 must be to float32, and why. At these sizes the float32 run's relative error
against float64 is ``A`` times float32's unit roundoff (measured in each test: about 5 for outputs
and states, about 10 for the gradients): ``A`` is how much this network amplifies one rounding of
every operation. The bfloat16 run rounds a subset of those operations (the projections' operands
and outputs; the scan is float32) to bfloat16, so its error against float32, in units of
bfloat16's unit roundoff ``u = 2**-8``, is at most about ``A`` (measured: 0.6u to 2.6u for most). The bound is
``2 A u``: a factor 2 for the spread of a few dozen random roundings. ``A`` is measured for the
outputs, the states and each parameter's gradient alone: most gradients' ``A`` is 3 to 11 here, but a
gradient that is a sum over the sequence whose terms cancel amplifies roundings more (the learning-rate
gate's bias: 27 for TTT-Linear and 81 for TTT-MLP here, whose bf16 error is 2.1u and 11.9u; the
token-index scale's at other sizes: 48 at width 64 and 4 heads, a bf16 error of tens of percent, as the
float64 gradient of bf16-rounded inputs has), and a bound on all gradients together would not see any
one of them go wrong. A gradient's ``A`` is one draw of its rounding, though, and a gradient of a few elements
(the learning-rate gate's bias: 2; the token-index scale: 8) can land near zero by the machine's rounding
alone: on the same problem the TTT-Linear gate bias's ``A`` measured 1.9 with AVX-512 kernels and two threads,
11.8 with torch's default kernels and one, 34.9 on the fused path, while its bf16 error is 4.1u on every one.
So each gradient's ``A`` is at least the outputs' (about 5 here, a mean over thousands of elements, the
same on every machine to 20%): the gradients are computed through the same network. A state kept in
bfloat16 stays within that bound at these sizes (its updates are large here), so the dtype of every state tensor is asserted separately.
"""

from __future__ import annotations

import copy

import pytest
import torch
from lm_testing import tiny_ttt_lm

from innerloop import TTTLayer
from innerloop.core.diagnostics import inner_loss_before_after
from innerloop.core.functional import relative_error

BF16_UNIT = 2.0**-8  # bfloat16's unit roundoff (eps / 2)
FP32_UNIT = 2.0**-24
SPREAD = 2.0  # see the module docstring

PATHS = {  # name: (layer options, trains, decodes token by token)
    "torch": ({"kernel": "torch"}, True, False),
    "fused_torch": ({"kernel": "fused_torch_{model}"}, True, False),
    "auto_training": ({"kernel": "auto"}, True, False),  # the compiled training scan
    "cpu_kernel": ({"kernel": "auto"}, False, False),  # without autograd, the compiled kernel
    "decode": ({"kernel": "auto"}, False, True),
    "minibatch_gd": ({"kernel": "torch", "update_rule": "minibatch_gd"}, True, False),
}
EXPECTED_DISPATCH = {
    "torch": "torch",
    "fused_torch": "fused_torch_{model}",
    "auto_training": "cpu_ttt_{model}",
    "cpu_kernel": "cpu_ttt_{model}",
    "decode": "cpu_ttt_{model}.decode",
    "minibatch_gd": "torch",  # the primal form, recorded as torch
}


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.double().flatten() for t in tensors])


def _run(layer: TTTLayer, x: torch.Tensor, train: bool, decode: bool):
    """``(y, state, gradients of sum(y^2) w.r.t. every parameter or None)``."""
    with torch.set_grad_enabled(train):
        if decode:
            state, outputs = None, []
            for index in range(x.shape[1]):
                y, state = layer(x[:, index : index + 1], state)
                outputs.append(y)
            y = torch.cat(outputs, dim=1)
        else:
            y, state = layer(x)
        grads = torch.autograd.grad(y.double().square().sum(), list(layer.parameters())) if train else None
    return y, state, grads


def _bounds(layer: TTTLayer, x: torch.Tensor, train: bool, decode: bool, y32, state32, grads32):
    """``2 A u`` for outputs, states and gradients, ``A`` measured against float64 (module docstring)."""
    y64, state64, grads64 = _run(copy.deepcopy(layer).double(), x.double(), train, decode)

    def bound(error32: float) -> float:
        return SPREAD * max(error32 / FP32_UNIT, 1.0) * BF16_UNIT

    forward_error = relative_error(y32, y64)
    forward = bound(forward_error)
    state = bound(max(relative_error(state32.params[k], state64.params[k]) for k in state64.params))
    gradient = (  # each at least the outputs' amplification: a few elements' one draw can land near 0
        [
            bound(max(relative_error(g32, g64), forward_error))
            for g32, g64 in zip(grads32, grads64, strict=True)
        ]
        if train
        else None
    )
    return forward, state, gradient


def _assert_close_in_float32(name, y, state, grads, y32, state32, grads32, bounds) -> None:
    forward, state_bound, gradient = bounds
    assert all(t.dtype == torch.float32 for t in state.tensors().values()), (
        f"{name}: state dtypes {sorted({str(t.dtype) for t in state.tensors().values()})}"
    )
    assert relative_error(y.double(), y32.double()) <= forward, name
    for key in state32.params:
        assert relative_error(state.params[key], state32.params[key]) <= state_bound, (name, key)
    if grads is not None:  # each parameter's gradient within its own bound
        for index, (g, g32, bound) in enumerate(zip(grads, grads32, gradient, strict=True)):
            assert relative_error(g, g32) <= bound, (name, index, relative_error(g, g32), bound)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("model", ["linear", "mlp"])
def test_bf16_matches_float32_to_bf16_precision_with_a_float32_state(model, path, request):
    options, train, decode = PATHS[path]
    options = {key: value.format(model=model) for key, value in options.items()}
    if path in ("cpu_kernel", "decode", "auto_training"):
        request.getfixturevalue("cpu_kernels")
    torch.manual_seed(0)
    base_lr = 1.0 if model == "linear" else 0.1
    layer = TTTLayer(32, 2, inner_model=model, mini_batch_size=8, base_lr=base_lr, **options)
    x = torch.randn(2, 12 if decode else 32, 32)
    y32, state32, grads32 = _run(layer, x, train, decode)
    bounds = _bounds(layer, x, train, decode, y32, state32, grads32)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, state, grads = _run(layer, x, train, decode)
    expected = EXPECTED_DISPATCH[path]
    expected = expected.get(model) if isinstance(expected, dict) else expected
    assert {p for p, _ in layer.dispatches} <= ({expected.format(model=model)} if expected else set())
    assert y.dtype == torch.bfloat16  # o_proj ran under autocast
    _assert_close_in_float32("autocast", y, state, grads, y32, state32, grads32, bounds)

    bf16_layer = copy.deepcopy(layer).to(torch.bfloat16)
    y, state, grads = _run(bf16_layer, x.to(torch.bfloat16), train, decode)
    assert {p for p, _ in bf16_layer.dispatches} <= ({expected.format(model=model)} if expected else set())
    assert y.dtype == torch.bfloat16
    assert all(g.dtype == torch.bfloat16 for g in grads or [])  # gradients in the parameters' dtype
    _assert_close_in_float32("bf16 weights", y, state, grads, y32, state32, grads32, bounds)


def test_a_bf16_layer_continues_its_float32_state_and_refuses_a_bf16_one():
    torch.manual_seed(0)
    layer = TTTLayer(16, 2, mini_batch_size=4, share_qk=True, use_gate=True).to(torch.bfloat16)
    x = torch.randn(1, 10, 16, dtype=torch.bfloat16)
    _, state = layer(x[:, :5])
    assert layer.scan_dtype == torch.float32
    assert all(t.dtype == torch.float32 for t in state.tensors().values())  # conv history included
    layer(x[:, 5:], state)
    with pytest.raises(TypeError, match=r"is torch.bfloat16 but the layer keeps its state in torch.float32"):
        layer(x[:, 5:], state.to(torch.bfloat16))


def _lm_run(lm, ids: torch.Tensor):
    """Training logits and gradients on ``ids``, then decoding logits token by token (no grad)."""
    logits, _ = lm(ids)
    grads = torch.autograd.grad(logits.double().square().mean(), list(lm.parameters()))
    with torch.no_grad():
        _, state = lm(ids[:, :6])
        decoded = []
        for index in range(6, ids.shape[1]):
            step, state = lm(ids[:, index : index + 1], state)
            decoded.append(step)
    return logits, grads, torch.cat(decoded, dim=1)


WHAT = ("logits", "gradients", "decoded logits")


def _as_lists(run) -> list[list[torch.Tensor]]:
    logits, grads, decoded = run
    return [[logits], list(grads), [decoded]]


@pytest.mark.slow  # ~1.2 s in all: training steps and decoding of four language models; bf16 against float32 stays in the fast loop
@pytest.mark.parametrize("backbone", ["transformer", "mamba"])
@pytest.mark.parametrize("inner_model", ["linear", "mlp"])
def test_a_ttt_language_model_trains_and_decodes_in_bf16(inner_model, backbone):
    """The language model under autocast and in bfloat16: logits, every gradient and the decoded
    logits within ``2 A u`` of float32 (``A`` measured in float64 as above); the TTT states float32."""
    torch.manual_seed(0)
    lm = tiny_ttt_lm(inner_model, backbone)
    ids = torch.randint(0, 256, (2, 10))
    reference = _lm_run(lm, ids)
    exact = _lm_run(copy.deepcopy(lm).double(), ids)
    bounds = [
        SPREAD * max(relative_error(_flat(got), _flat(want)) / FP32_UNIT, 1.0) * BF16_UNIT
        for got, want in zip(_as_lists(reference), _as_lists(exact), strict=True)
    ]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = _lm_run(lm, ids)
    plain = _lm_run(copy.deepcopy(lm).to(torch.bfloat16), ids)
    for name, run in (("autocast", mixed), ("bf16 weights", plain)):
        for what, got, want, bound in zip(WHAT, _as_lists(run), _as_lists(reference), bounds, strict=True):
            assert relative_error(_flat(got), _flat(want)) <= bound, (name, what)
    with torch.no_grad():
        _, state = copy.deepcopy(lm).to(torch.bfloat16)(ids)
    for block_state in state.blocks:
        assert all(t.dtype == torch.float32 for t in block_state.mixer.tensors().values())


def test_the_inner_loss_diagnostics_run_in_float32_for_bf16():
    """``inner_loss_before_after`` reads the layer as its forward does: the scan in float32."""
    torch.manual_seed(0)
    layer = TTTLayer(32, 2, mini_batch_size=4)
    x = torch.randn(2, 16, 32)
    expected = inner_loss_before_after(layer, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = inner_loss_before_after(layer, x)
    plain = inner_loss_before_after(copy.deepcopy(layer).to(torch.bfloat16), x.to(torch.bfloat16))
    for got in (mixed, plain):
        for value, want in zip(got, expected, strict=True):
            assert value.dtype == torch.float32
            # a mean of squared errors of bf16-rounded views: a few u (2**-8) relative
            assert relative_error(value, want) <= 4 * BF16_UNIT
