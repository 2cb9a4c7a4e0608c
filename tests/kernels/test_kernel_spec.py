"""Every built-in kernel takes the parameters of the call Protocols in kernels/spec.py, and a spec
whose functions do not is refused when it is built."""

from __future__ import annotations

import inspect
from dataclasses import replace

import pytest

from innerloop.kernels.spec import KernelDecode, KernelForward, KernelSpec, protocol_parameters
from innerloop.plugins.kernels import builtin_kernel_specs

SPECS = builtin_kernel_specs()


def test_the_protocols_name_the_documented_parameters() -> None:
    assert protocol_parameters(KernelForward) == (
        "xq", "xk", "xv", "lr", "tau", "params", "ln_weight", "ln_bias", "eps",
    )  # fmt: skip
    assert protocol_parameters(KernelDecode) == (
        "xq", "xk", "xv", "lr", "tau_i", "params", "pending", "ln_weight", "ln_bias", "eps", "is_last",
    )  # fmt: skip


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_each_builtin_kernel_takes_the_protocol_parameters(spec: KernelSpec) -> None:
    pairs = [(spec.forward, KernelForward)] + ([(spec.decode, KernelDecode)] if spec.decode else [])
    for function, protocol in pairs:
        parameters = list(inspect.signature(function).parameters.values())
        expected = protocol_parameters(protocol)
        assert tuple(p.name for p in parameters[: len(expected)]) == expected, (spec.name, function)
        assert all(p.default is not inspect.Parameter.empty for p in parameters[len(expected) :])


def test_the_checks_see_a_decode_path() -> None:
    assert any(spec.decode is not None for spec in SPECS)


def _positional_forward(a, b, c, d, e, f, g, h, i):  # the old untyped 9-argument form
    raise AssertionError("never called")


def _forward_with_a_required_extra(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps, chunk_size):
    raise AssertionError("never called")


def _decode_in_another_order(xq, xk, xv, lr, tau_i, pending, params, ln_weight, ln_bias, eps, is_last):
    raise AssertionError("never called")


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"forward": _positional_forward}, ["forward", "xq, xk, xv", "in this order"]),
        ({"forward": _forward_with_a_required_extra}, ["forward", "chunk_size", "without a default"]),
        ({"decode": _decode_in_another_order}, ["decode", "tau_i, params, pending"]),
        ({"forward": None}, ["forward", "callable"]),
    ],
)
def test_a_spec_whose_functions_do_not_conform_is_refused(changes: dict, words: list[str]) -> None:
    with pytest.raises(TypeError) as error:
        replace(SPECS[0], **changes)
    message = str(error.value)
    assert SPECS[0].name in message and all(word in message for word in words), message
