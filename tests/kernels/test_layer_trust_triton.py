"""The Triton path under autocast and on huge inputs (issue 9, items 2 and 3), run by the interpreter.

The same checks as tests/core/test_layer_trust.py, for the path only this directory can reach on a CPU.
"""

from __future__ import annotations

import pytest
import torch

from innerloop import TTTLayer
from innerloop.core.functional import relative_error
from innerloop.testing.checks import assert_finite_where_expected_is

# See tests/core/test_layer_trust.py for the derivation: six roundings to the dtype forward, six more
# backward, each a relative error <= u = eps / 2, through a scan whose gain is about one.
FORWARD_ULPS, GRADIENT_ULPS = 6, 12

# A child process under TRITON_INTERPRET=1 (conftest.py); slow: whole layers through the interpreter
# (~8 s). The kernel-level Triton tests of test_triton_kernels.py stay in the fast loop.
pytestmark = [pytest.mark.triton_interpreter, pytest.mark.slow]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("model", ["linear", "mlp"])
def test_triton_under_autocast_scans_in_float32_and_matches_float32(model, dtype):
    torch.manual_seed(0)
    layer = TTTLayer(32, 2, inner_model=model, mini_batch_size=4, kernel=f"triton_ttt_{model}")
    x = torch.randn(1, 8, 32)  # one batch row: the bounds are per element, each row one more program
    params = list(layer.parameters())
    y32, state32 = layer(x)
    with torch.autocast("cpu", dtype=dtype):
        y, state = layer(x)
    assert {path for path, _ in layer.dispatches} == {f"triton_ttt_{model}"}
    assert all(t.dtype == torch.float32 for t in state.tensors().values())
    grads32 = torch.autograd.grad(y32.square().sum(), params)
    grads = torch.autograd.grad(y.float().square().sum(), params)
    u = torch.finfo(dtype).eps / 2
    assert relative_error(y.float(), y32) < FORWARD_ULPS * u
    for key in state.params:
        assert relative_error(state.params[key], state32.params[key]) < FORWARD_ULPS * u
    flat = [torch.cat([g.flatten() for g in gs]) for gs in (grads, grads32)]
    assert relative_error(*flat) < GRADIENT_ULPS * u


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("scale", [1e10, 1e15, 1e30])
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("model", ["linear", "mlp"])
def test_triton_on_huge_inputs_is_as_stable_as_torch(model, grad, scale):
    torch.manual_seed(0)
    # non_finite="ignore": the paths' raw numbers are compared (with "raise", overflow is an error)
    options = {"inner_model": model, "mini_batch_size": 4, "non_finite": "ignore"}
    layer = TTTLayer(32, 2, kernel=f"triton_ttt_{model}", **options)
    reference = TTTLayer(32, 2, kernel="torch", **options)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(1, 12, 32) * scale  # one batch row: each row is one more interpreted program
    with torch.set_grad_enabled(grad):
        y, state = layer(x)
        y_ref, state_ref = reference(x)
    # Finite wherever the torch path is, and equal there (float32 rounding).
    for actual, expected in [(y, y_ref)] + [(state.params[k], state_ref.params[k]) for k in state.params]:
        assert_finite_where_expected_is(actual, expected, f"triton_ttt_{model}", 1e-4)
    if model == "linear" and scale <= 1e15:  # see tests/core/test_layer_trust.py
        assert torch.isfinite(y).all() and state.is_finite()
