"""``innerloop.testing.check_kernel`` passes every built-in kernel that runs on CPU and fails, naming
the kernel, the case and the tensor, on wrong kernels registered as plugins, including those the
first-use probe accepts (wrong from the third mini-batch on: the probe sees two).

Each wrong kernel is ``fused_torch_linear`` changed in one way, registered at a priority above the
built-ins; the registry is reset after each test, which removes it."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from plugin_testing import accept_every_input, register_linear_dual_form_kernel
from torch._dynamo.testing import CompileCounterWithBackend

import innerloop
import innerloop.kernels.fused_torch.compiled as compiled
from innerloop.kernels import fused_torch
from innerloop.kernels.first_use import tolerance_for
from innerloop.kernels.reference import reference_kernel
from innerloop.plugins.losses.reconstruction import Reconstruction
from innerloop.plugins.models.linear import LinearModel
from innerloop.registry import get_registry
from innerloop.testing import (
    FLOAT64_TOLERANCE,
    KERNEL_CHECK_TOLERANCES,
    KernelCheckReport,
    check_kernel,
    kernel_checks,
)

pytestmark = pytest.mark.usefixtures("fresh_global_registry")  # tests/conftest.py


def register_changed(name: str, forward=None, verify=None) -> str:
    """``fused_torch_linear``'s spec under ``name`` with the given functions in place of its own."""
    base = fused_torch.kernel_spec("linear", get_registry().inner_model("linear").stack)
    changes = {"forward": forward, "verify": verify}
    spec = dataclasses.replace(base, name=name, priority=100, **{k: v for k, v in changes.items() if v})
    innerloop.register_kernel(spec)
    return name


FORWARD = fused_torch.kernel_spec("linear", LinearModel().stack).forward
REFERENCE_FORWARD, REFERENCE_DECODE = reference_kernel(LinearModel(), Reconstruction())


def register_reference(name: str, decode=REFERENCE_DECODE, verify=accept_every_input) -> str:
    """The pure-torch reference kernel of (linear, reconstruction, dual_form), with a decode step,
    under ``name``."""

    def forward(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps):
        return REFERENCE_FORWARD(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps)

    def decode_step(xq, xk, xv, lr, tau_i, params, pending, ln_weight, ln_bias, eps, is_last):
        return decode(xq, xk, xv, lr, tau_i, params, pending, ln_weight, ln_bias, eps, is_last)

    return register_linear_dual_form_kernel(name, forward, decode=decode_step, verify=verify, priority=100)


def halved_from_third_mini_batch(lr: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """The learning rates with those of the third mini-batch on halved (the review's ``late``)."""
    lr = lr.clone()
    lr[:, :, 2 * tau.shape[0] :] *= 0.5
    return lr


def late(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps):
    return FORWARD(xq, xk, xv, halved_from_third_mini_batch(lr, tau), tau, params, ln_weight, ln_bias, eps)


def drops_bias(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps):
    out, new = FORWARD(
        xq, xk, xv, lr, tau, {**params, "b1": torch.zeros_like(params["b1"])}, ln_weight, ln_bias, eps
    )
    return out, {**new, "b1": params["b1"] + new["b1"]}


def reads_row_0(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps):
    row_0 = {k: v[:1].expand_as(v) for k, v in params.items()}  # every sequence starts from row 0's weights
    return FORWARD(xq, xk, xv, lr, tau, row_0, ln_weight, ln_bias, eps)


def wrong_under_no_grad(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps):
    if not torch.is_grad_enabled():
        lr = halved_from_third_mini_batch(lr, tau)
    return FORWARD(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps)


class HalvedLateGradient(torch.autograd.Function):
    """The identity, whose backward halves the gradient of the tokens from the third mini-batch on."""

    @staticmethod
    def forward(ctx, out, mini_batch_size):
        ctx.mini_batch_size = mini_batch_size
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        grad[:, :, 2 * ctx.mini_batch_size :] *= 0.5
        return grad, None


def wrong_in_backward(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps):
    out, new = FORWARD(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps)
    return HalvedLateGradient.apply(out, tau.shape[0]), new


def test_a_kernel_wrong_from_the_third_mini_batch_on_fails_though_first_use_accepts_it():
    name = register_changed("late", forward=late)
    layer = innerloop.TTTLayer(12, 3, mini_batch_size=4)  # kernel="auto"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the first-use check accepts it, without a warning
        layer(torch.randn(3, 8, 12))
    assert layer.last_dispatch[0] == name
    with pytest.raises(
        AssertionError, match=r"check_kernel\('late'\): .*15 tokens .*in one call, grad: output"
    ):
        check_kernel(name)


@pytest.mark.parametrize(
    ("name", "forward", "what", "wrong_from_the_third_mini_batch"),
    [
        ("drops_bias", drops_bias, "grad", False),
        ("reads_row_0", reads_row_0, "grad", False),
        ("wrong_under_no_grad", wrong_under_no_grad, r"in one call, no_grad: output", True),
        ("wrong_in_backward", wrong_in_backward, r"in one call, grad: gradient of", True),
    ],
)
def test_a_wrong_kernel_fails_naming_it_and_the_case(name, forward, what, wrong_from_the_third_mini_batch):
    """A kernel wrong from the third mini-batch on fails not through dispatch's first-use check (which sees
    two mini-batches) but on check_kernel's own comparisons."""
    register_changed(name, forward=forward)
    with pytest.raises(
        AssertionError, match=rf"check_kernel\('{name}'\): head_dim 4 .*tokens .*{what}"
    ) as raised:
        check_kernel(name)
    if wrong_from_the_third_mini_batch:
        assert "first-use" not in str(raised.value) and "relative error" in str(raised.value)


def test_a_wrong_decode_step_fails_in_the_decoding_case():
    def scaled_decode(xq, xk, xv, lr, tau_i, params, pending, ln_weight, ln_bias, eps, is_last):
        out, params, pending = REFERENCE_DECODE(
            xq, xk, xv, lr, tau_i, params, pending, ln_weight, ln_bias, eps, is_last
        )
        return out * 1.01, params, pending

    register_reference("bad_decode", decode=scaled_decode)
    # the first one-token call decodes: a split call's, before the prefill-then-decode case
    with pytest.raises(AssertionError, match=r"check_kernel\('bad_decode'\): .*split at \[1, .*out differs"):
        check_kernel("bad_decode", head_dims=(4,))


@pytest.mark.slow  # check_kernel tries every case before it says none was served: ~0.8 s
def test_a_kernel_that_serves_no_case_fails():
    register_changed("refuses_all", verify=lambda inputs: "refuses_all: never runs")
    with pytest.raises(AssertionError, match=r"computed nothing in any of the .*refuses_all: never runs"):
        check_kernel("refuses_all", head_dims=(4,))


@pytest.mark.slow  # ~1.2 s: over the fast loop's 0.4 s per test
def test_a_right_kernel_passes_and_the_cases_it_refuses_are_skipped_with_the_reason():
    def even_head_dims(inputs):
        return None if inputs.head_dim % 2 == 0 else "even_only: even head dims only"

    register_reference("even_only", verify=even_head_dims)
    report = check_kernel("even_only", head_dims=(4, 5))
    assert isinstance(report, KernelCheckReport)
    assert report.ran and all(
        case.startswith(("head_dim 4", "head_dim 32 ", "head_dim 40 ")) for case in report.ran
    )  # 32 and 40: the wide cases
    assert any(case.endswith("decode") for case in report.ran)
    assert any("15 tokens" in case and "grad" in case for case in report.ran)
    odd = [reason for case, reason in report.skipped.items() if case.startswith("head_dim 5")]
    assert odd and all("even head dims only" in reason for reason in odd)


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"kernel": "no_such_kernel"}, ValueError, "no_such_kernel"),
        ({"kernel": "fused_torch_linear", "dtype": torch.bfloat16}, ValueError, "dtype must be one of"),
        ({"kernel": "fused_torch_linear", "tolerance": -1.0}, ValueError, "tolerance must be a positive"),
        ({"kernel": "fused_torch_linear", "head_dims": ()}, ValueError, "head_dims must be"),
        ({"kernel": "fused_torch_linear", "hidden_size": 8}, TypeError, "check_kernel sets hidden_size"),
        ({"kernel": 3}, TypeError, "kernel must be"),
    ],
)
def test_bad_arguments_are_named(arguments, error, message):
    kernel = arguments.pop("kernel")
    with pytest.raises(error, match=message):
        check_kernel(kernel, **arguments)


@pytest.mark.slow  # 1-2 s each with one torch thread (as under xdist), ~50 cases: the fast loop has the rest
@pytest.mark.parametrize(
    ("model", "dtype"), [("linear", torch.float64), ("mlp", torch.float64), ("linear", torch.float32)]
)
def test_the_fused_torch_kernels_pass(model, dtype):
    report = check_kernel(f"fused_torch_{model}", dtype=dtype)
    assert any("15 tokens" in case for case in report.ran)


def _cast(value, dtype: torch.dtype):
    """``value`` (a tensor, or a dict, tuple or list of them) with its floating tensors in ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):
        return {key: _cast(item, dtype) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(item, dtype) for item in value)
    return value


def computes_in_float64(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps):
    """``fused_torch_linear`` run in float64 and rounded back: as right as a float32 kernel can be."""
    inputs = _cast((xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps), torch.float64)
    return _cast(FORWARD(*inputs), xq.dtype)


@pytest.mark.slow  # ~2 s: every case of check_kernel in float32 at 16 tokens a mini-batch, twice
def test_a_float32_case_that_amplifies_rounding_passes_a_right_kernel_and_fails_a_wrong_one():
    # Mini-batches of 16 amplify rounding: the torch path's own float32 gradients are ~1e-3 off its
    # float64 ones, so the most accurate float32 kernel differs from it by more than the 1e-4 tolerance
    # (innerloop's own fused kernel failed so on an AMD EPYC host) and is allowed 10x that error.
    check_kernel(
        register_changed("float64_inside", forward=computes_in_float64),
        dtype=torch.float32,
        mini_batch_size=16,
    )
    with pytest.raises(AssertionError, match=r"check_kernel\('late'\): .*at most 1e-02\)"):
        check_kernel(register_changed("late", forward=late), dtype=torch.float32, mini_batch_size=16)


@pytest.mark.slow  # 1-2 s each with one torch thread (as under xdist), ~50 cases, decoding included
@pytest.mark.usefixtures("cpu_kernels")  # skips, with the reason, where the C++ kernel does not build
@pytest.mark.parametrize("model", ["linear", "mlp"])
def test_the_compiled_cpu_kernels_pass(model):
    report = check_kernel(f"cpu_ttt_{model}")
    assert any(case.endswith("decode") for case in report.ran)


@pytest.mark.slow  # ~1.5 s (its decay_log cases too): over the fast loop's 0.4 s per test
def test_the_delta_rule_kernel_passes_at_its_mini_batch_size():
    report = check_kernel("delta_chunk", mini_batch_size=1)
    assert report.ran
    # it supports decay: each case ran again on a layer that forgets (review s47e)
    assert any("with decay" in case for case in report.ran)
    # its forward names decay_log: each ran once more with the gate given as its log (review s50k)
    assert any("given as decay_log" in case for case in report.ran)


@pytest.mark.slow  # 5-9 s each: torch.compile (aot_eager) traces the training step of each case's shapes
@pytest.mark.parametrize("model", ["linear", "mlp"])
def test_the_compiled_torch_kernels_pass_where_they_train(model, monkeypatch):
    backend = CompileCounterWithBackend("aot_eager")  # inductor would compile C++ (minutes)
    monkeypatch.setattr(compiled, "BACKEND", backend)
    torch._dynamo.reset()
    report = check_kernel(f"compiled_torch_{model}", head_dims=(4,))
    assert all(case.endswith("grad") for case in report.ran)  # it trains only: the rest run elsewhere
    assert any("trains only" in reason for reason in report.skipped.values())
    # one step compiled for the layer's weights, one for a carried state's (no grad), one for both wide
    # head dims (dynamic: the overflow bound's bit_length specialised the first), one in float32; no more
    # (the step's tensors were views whose strides held the call's length: 7 compiles, seconds each)
    assert backend.frame_count == 4, backend.frame_count
    torch._dynamo.reset()


def test_the_float32_tolerance_follows_the_matmul_precision():
    """Where float32 products may round to TF32 (``"high"``), both paths round, each its own way."""
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert kernel_checks._tolerance(torch.float32, None) == tolerance_for(torch.float32) > 1e-4
    finally:
        torch.set_float32_matmul_precision(previous)
    assert kernel_checks._tolerance(torch.float32, None) == KERNEL_CHECK_TOLERANCES[torch.float32] == 1e-4
    assert kernel_checks._tolerance(torch.float64, None) == FLOAT64_TOLERANCE


def test_the_rounding_allowance_names_the_dtype_whose_error_it_measured() -> None:
    """A bfloat16 case measures the torch path's bfloat16 error against float64: the message said
    "float32 error" for it too."""
    from innerloop.testing.kernel_checks import _rounding_allowance

    assert "own bfloat16 error 3.0e-03" in _rounding_allowance(torch.bfloat16, 1e-2, 3e-3)[1]
    assert "own float16 error" in _rounding_allowance(torch.float16, 1e-2, 3e-3)[1]
    assert "own float32 error 3.0e-05" in _rounding_allowance(torch.float32, 1e-4, 3e-5)[1]
