"""Review s24: mutation testing of the compiled CPU kernel (``innerloop/kernels/cpu/ttt_stack.cpp``).

Small wrong changes to the kernel (an operator, a stride, a dropped branch) that the rest of the suite
let through; each test below fails against such a change and passes against the kernel as it is.
What they pin down: rows whose squares overflow are found whichever column holds their largest value
(the vector lanes and the scalar remainder of ``max_abs_over``) and are normalised in float32 too (the
suite covered the overflow path in float64 only); stacks without biases in inference and decoding
(the suite trained one, but never ran one through the inference scan or the decode path); q, k, v and
lr of different layouts (the suite's views all shared one set of strides, so a swapped stride went
unseen), in the inference scan, the hoisting's forward and the hoisting's backward outputs; a hidden
unit far beyond the GELU derivative's clamp; the entry points' status codes for invalid sizes and
dtypes; and a C++ exception in a thread's range reported as status 3, not dropped. The mutants and
their outcomes: notes/review_s24_kernel_mutation.md.
"""

from __future__ import annotations

import ctypes

import pytest
import torch
from kernel_testing import hoisted_tensors, make_inputs, strided

from innerloop.core.functional import layer_norm
from innerloop.core.protocol import AffineLayer, StackModel
from innerloop.kernels.cpu import build
from innerloop.kernels.cpu.library import DTYPE_CODES, run_entry_point
from innerloop.kernels.cpu.scan_ends import CompiledHoist, CompiledOutputNorm, _hoist_args, _set
from innerloop.kernels.cpu.stack import _StackArgs, make_decode, make_forward
from innerloop.kernels.fused_torch.forward import _hoist
from innerloop.kernels.reference import reference_kernel
from innerloop.plugins.losses.reconstruction import Reconstruction
from innerloop.plugins.models.linear import LinearModel
from innerloop.plugins.models.mlp import GELU_TANH, MLPModel
from innerloop.testing import FLOAT64_TOLERANCE
from innerloop.testing.checks import assert_close

pytestmark = pytest.mark.usefixtures("cpu_kernels")  # skips, with the reason, where nothing compiles


def _output_norm_expected(z: torch.Tensor, xq: torch.Tensor, weight, bias) -> torch.Tensor:
    """xq + weight LN(z) + bias in float64 (layer_norm scales rows too large for their squares)."""
    return xq.double() + layer_norm(z.double(), weight.double()[:, None], bias.double()[:, None], 1e-6)


def _norm_inputs(heads: int, tokens: int, width: int, dtype: torch.dtype, seed: int):
    generator = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)

    return (
        rnd(1, heads, tokens, width),
        rnd(1, heads, tokens, width),
        1 + 0.1 * rnd(heads, width),
        0.1 * rnd(heads, width),
    )


@pytest.mark.parametrize(
    ("dtype", "huge", "width"),
    [
        (torch.float64, 1e200, 5),  # all of the row in the scalar remainder
        (torch.float64, 1e200, 13),  # one vector of 8 doubles, then 5 in the remainder
        (torch.float64, 1e200, 16),  # two vectors: column 0 and 8 in lane 0
        (torch.float32, 1e30, 5),
        (torch.float32, 1e30, 21),  # one vector of 16 floats, then 5
        (torch.float32, 1e30, 32),
    ],
)
def test_a_lone_huge_value_in_any_column_makes_its_row_take_the_scaled_moments(dtype, huge, width):
    """Row t holds one value whose square overflows, in column t, the others ordinary: the row's
    largest |value| must be found in every vector lane and in every element of the remainder (a
    remainder that skipped its last element, or maxima that skipped lane 0, left such a row unscaled:
    its variance inf, its output xq + beta)."""
    z, xq, weight, bias = _norm_inputs(1, width, width, dtype, seed=width)
    for t in range(width):
        z[0, 0, t, t] = huge * (1 if t % 2 else -1)
    with torch.no_grad():
        got = CompiledOutputNorm.apply(1e-6, z, xq, weight, bias)
    expected = _output_norm_expected(z, xq, weight, bias)
    tolerance = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got.double(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("width", [16, 64])
def test_float32_rows_whose_squares_overflow_are_normalised(width):
    """float32 rows beyond the overflow bound (2^59 at width 16): alternating +-1e20 (squares 1e40),
    random ones around 1e25, one near float32's largest value. The suite checks this path in float64
    only; a float32 bound 16x too high (power_of_two<float>) overflowed the alternating rows' sum of
    squares."""
    z, xq, weight, bias = _norm_inputs(2, 4, width, torch.float32, seed=width)
    z[0, 0, 0] = 1e20 * torch.tensor([1.0, -1.0]).repeat(width // 2)
    z[0, 0, 1] *= 1e25
    z[0, 1, 2] = 3e38 * torch.tensor([1.0, -0.5]).repeat(width // 2)
    with torch.no_grad():
        got = CompiledOutputNorm.apply(1e-6, z, xq, weight, bias)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), _output_norm_expected(z, xq, weight, bias), rtol=2e-5, atol=2e-5)


class _MLPWithoutBiases(StackModel):
    """TTT-MLP's two layers (f -> 4f -> f, tanh-GELU between) without biases."""

    name = "review_s24_mlp_without_biases"

    @property
    def stack(self) -> tuple[AffineLayer, ...]:
        return (AffineLayer("W1", None, GELU_TANH), AffineLayer("W2", None, None))

    def param_shapes(self, head_dim: int) -> dict[str, tuple[int, ...]]:
        return {"W1": (head_dim, 4 * head_dim), "W2": (4 * head_dim, head_dim)}

    def init_params(self, num_heads: int, head_dim: int, generator=None):
        return {
            k: torch.randn(num_heads, *s, generator=generator) for k, s in self.param_shapes(head_dim).items()
        }


def _without_biases(model: str):
    """(stack, model, params without the biases) for TTT-Linear or TTT-MLP without biases."""
    if model == "linear":

        class _LinearWithoutBias(StackModel):
            name = "review_s24_linear_without_bias"

            @property
            def stack(self):
                return (AffineLayer("W1", None, None),)

            def param_shapes(self, head_dim):
                return {"W1": (head_dim, head_dim)}

            def init_params(self, num_heads, head_dim, generator=None):
                return {"W1": torch.randn(num_heads, head_dim, head_dim, generator=generator)}

        return _LinearWithoutBias()
    return _MLPWithoutBiases()


@pytest.mark.parametrize("model", ["linear", "mlp"])
def test_stacks_without_biases_run_inference_and_decode_equal_to_the_reference(model):
    """The inference scan's mix has a `+ 1` for a bias only, and decoding starts a layer without bias
    at zero: neither branch was reached by the suite (its inference and decode tests use the built-in,
    biased models). Float64, against the reference's forward and its token-by-token decode."""
    inner = _without_biases(model)
    stack = inner.stack
    xq, xk, xv, lr, tau, params, lnw, lnb = make_inputs(2, 2, 8, 6, 4, model, dtype=torch.float64, seed=11)
    params = {k: v for k, v in params.items() if k.startswith("W")}
    reference_forward, reference_decode = reference_kernel(inner, Reconstruction())
    with torch.no_grad():
        out_ref, params_ref = reference_forward(xq, xk, xv, lr, tau, params, lnw, lnb, 1e-6)
        out, new_params = make_forward(stack)(xq, xk, xv, lr, tau, params, lnw, lnb, 1e-6)
    assert_close(out, out_ref, "no-bias inference output", FLOAT64_TOLERANCE)
    for key in params_ref:
        assert_close(new_params[key], params_ref[key], f"no-bias inference {key}", FLOAT64_TOLERANCE)
    decode = make_decode(stack)
    states = {name: (params, {k: torch.zeros_like(v) for k, v in params.items()}) for name in ("ref", "cpu")}
    for t in range(6):  # through the first mini-batch's closing token into the second
        i = t % 4
        token = (xq[:, :, t], xk[:, :, t], xv[:, :, t], lr[:, :, t], tau[i])
        with torch.no_grad():
            out_ref, *states["ref"] = reference_decode(*token, *states["ref"], lnw, lnb, 1e-6, i == 3)
            out, *states["cpu"] = decode(*token, *states["cpu"], lnw, lnb, 1e-6, i == 3)
        assert_close(out, out_ref, f"no-bias decode output, token {t}", FLOAT64_TOLERANCE)
        for ours, theirs in zip(states["cpu"], states["ref"], strict=True):
            for key in theirs:
                assert_close(
                    ours[key], theirs[key], f"no-bias decode state {key}, token {t}", FLOAT64_TOLERANCE
                )


def _layouts(xq, xk, xv, lr):
    """The same values in four different memory layouts (the last dim contiguous): xq contiguous, xk
    tokens-first with gaps between rows, xv heads-inner ([B, T, H, f] memory), lr a transposed gate."""
    batch, heads, tokens, width = xq.shape
    xv_memory = torch.empty(batch, tokens, heads, width, dtype=xv.dtype)
    xv_memory.copy_(xv.transpose(1, 2))
    lr_memory = torch.empty(batch, tokens, heads, dtype=lr.dtype)
    lr_memory.copy_(lr.transpose(1, 2))
    views = (xq.contiguous(), strided(xk), xv_memory.transpose(1, 2), lr_memory.transpose(1, 2))
    strides = {t.stride() for t in views[:3]}
    assert len(strides) == 3 and views[3].stride()[2] != 1  # every view strided its own way
    return views


@pytest.mark.parametrize("model", ["linear", "mlp"])
def test_views_of_different_layouts_run_inference_equal_to_the_reference(model):
    """Each of q, k, v and lr read through its own strides (token, head and batch): a kernel that read
    v with k's strides, or lr as if contiguous, passed every test whose views share one layout."""
    xq, xk, xv, lr, tau, params, lnw, lnb = make_inputs(2, 3, 8, 5, 4, model, dtype=torch.float64, seed=7)
    reference_forward, _ = reference_kernel(
        LinearModel() if model == "linear" else MLPModel(), Reconstruction()
    )
    with torch.no_grad():
        out_ref, params_ref = reference_forward(xq, xk, xv, lr, tau, params, lnw, lnb, 1e-6)
        out, new_params = make_forward(_stack(model))(*_layouts(xq, xk, xv, lr), tau, params, lnw, lnb, 1e-6)
    assert_close(out, out_ref, "inference output, views of different layouts", FLOAT64_TOLERANCE)
    for key in params_ref:
        assert_close(
            new_params[key],
            params_ref[key],
            f"inference {key}, views of different layouts",
            FLOAT64_TOLERANCE,
        )


def _stack(model: str):
    return LinearModel().stack if model == "linear" else MLPModel().stack


def _hoist_leaves(seed: int, has_bias: bool):
    batch, heads, tokens, width, mini_batch = 2, 2, 6, 5, 3
    xq, xk, xv, lr, tau, _, lnw, lnb = make_inputs(
        batch, heads, tokens, width, mini_batch, "linear", torch.float64, seed
    )
    return [t.requires_grad_() for t in (xq, xk, xv, lr, tau, lnw, lnb)]


@pytest.mark.parametrize("has_bias", [True, False])
def test_the_hoisting_of_views_of_different_layouts_equals_the_torch_path(has_bias):
    """The compiled hoisting's forward and backward with q, k, v and lr each in its own layout, against
    the fused torch path's ``_hoist``: values and every gradient (a kernel that gathered the keys with
    the queries' token stride passed the suite's views, q, k and v of one projection with one layout)."""
    leaves = _hoist_leaves(3, has_bias)
    xq, xk, xv, lr, tau, lnw, lnb = leaves
    views = (*_layouts(xq, xk, xv, lr), tau, lnw, lnb)
    expected = hoisted_tensors(_hoist(xq, xk, xv, lr, tau, lnw, lnb, has_bias))
    got = CompiledHoist.apply(has_bias, *views)
    generator = torch.Generator().manual_seed(5)
    cotangents = [torch.randn(t.shape, generator=generator, dtype=t.dtype) for t in expected]
    for name, a, b in zip(("both", "left", "shift", "gamma_sq", "eta", "scale"), got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")
    wanted = torch.autograd.grad(expected, leaves, cotangents)
    grads = torch.autograd.grad(got, leaves, cotangents)
    for name, a, b in zip(
        ("xq", "xk", "xv", "lr", "tau", "ln_weight", "ln_bias"), grads, wanted, strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"grad {name}: {m}")


def test_the_hoisting_backward_writes_each_views_gradient_through_its_own_strides():
    """The C interface takes grad_xq, grad_xk and grad_xv with strides of their own (the host passes one
    layout for all three today): written into three different layouts, each equals the host's."""
    leaves = _hoist_leaves(4, True)
    xq, xk, xv, lr, tau, lnw, lnb = leaves
    hoisted = CompiledHoist.apply(True, xq, xk, xv, lr, tau, lnw, lnb)
    generator = torch.Generator().manual_seed(6)
    cotangents = [torch.randn(t.shape, generator=generator, dtype=t.dtype) for t in hoisted]
    wanted = torch.autograd.grad(hoisted, [xq, xk, xv, lr], cotangents)
    views = {"xq": xq.detach(), "xk": xk.detach(), "xv": xv.detach(), "lr": lr.detach()}
    args = _hoist_args(views, tau.detach(), lnw.detach(), lnb.detach(), True)
    grads = [g.contiguous() for g in cotangents]
    _set(args, **dict(zip(("both", "left", "shift", "gamma_sq", "eta", "scale"), grads, strict=True)))
    batch, heads, tokens, width = xq.shape
    grad_views = {
        "grad_xq": torch.full((batch, heads, tokens, width), float("nan"), dtype=torch.float64),
        "grad_xk": torch.full((batch, tokens, heads, width), float("nan"), dtype=torch.float64).transpose(
            1, 2
        ),
        "grad_xv": torch.full((tokens, batch, heads, width + 3), float("nan"), dtype=torch.float64)[
            ..., :width
        ].permute(1, 2, 0, 3),
    }
    partial = {
        "grad_lr": torch.empty(batch, heads, tokens, dtype=torch.float64),
        "grad_tau": torch.empty(batch * heads, tau.shape[0], dtype=torch.float64),
        "grad_ln_weight": torch.empty(batch * heads, width, dtype=torch.float64),
        "grad_ln_bias": torch.empty(batch * heads, width, dtype=torch.float64),
    }
    _set(args, **grad_views, **partial)
    run_entry_point("innerloop_hoist_backward", args)
    for (name, got), want in zip(grad_views.items(), wanted[:3], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")
    torch.testing.assert_close(partial["grad_lr"], wanted[3], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_cpp_exception_in_a_threads_range_is_status_3(threads):
    """A workspace too large to allocate (std::length_error, thrown before any memory is touched: a
    mini-batch of 2^62 tokens over a sequence of none) inside the parallel region must come back as
    status 3, whichever thread threw; a region that dropped it returned 0 (success) with nothing done."""
    library = build.load_library()
    function = library.innerloop_stack_forward
    function.argtypes, function.restype = [ctypes.POINTER(_StackArgs)], ctypes.c_int
    xq = torch.zeros(2, 1, 1, 1, dtype=torch.float64)
    weight = torch.zeros(2, 1, 1, 1, dtype=torch.float64)
    lnw = torch.ones(1, 1, dtype=torch.float64)
    args = _StackArgs()
    args.dtype, args.num_threads = DTYPE_CODES[torch.float64], threads
    args.batch, args.heads, args.tokens, args.mini_batch = 2, 1, 0, 1 << 62
    args.num_layers = 1
    args.dims[0], args.dims[1] = 1, 1
    args.activations[0] = 0
    for name in ("xq", "xk", "xv", "lr", "out"):
        setattr(args, name, xq.data_ptr())
    args.tau = args.ln_weight = args.ln_bias = lnw.data_ptr()
    args.weights[0] = weight.data_ptr()
    args.eps = 1e-6
    assert function(ctypes.byref(args)) == 3


@pytest.mark.parametrize(("dtype", "huge"), [(torch.float32, -1e20), (torch.float64, -1e160)])
def test_a_hidden_unit_far_beyond_the_gelu_clamp_stays_finite(dtype, huge):
    """One hidden unit of TTT-MLP whose pre-activation is so negative (its bias) that x * x overflows
    (float32 beyond 1.8e19, float64 beyond 1.3e154): its GELU is 0 and act' must be 0 (the clamp at
    |x| = 100), not 0 * inf = NaN; inference and decoding against the float64 reference. (The suite's
    clamp test stays far below where x * x overflows, so a derivative without the clamp passed it.)"""
    inputs = list(make_inputs(1, 2, 8, 8, 4, "mlp", dtype=torch.float64, seed=2))
    b1 = inputs[5]["b1"].clone()
    b1[..., 3] = huge
    inputs[5] = {**inputs[5], "b1": b1}
    reference_forward, reference_decode = reference_kernel(MLPModel(), Reconstruction())
    out_ref, params_ref = reference_forward(*inputs, 1e-6)
    xq, xk, xv, lr, tau, params, lnw, lnb = (
        {k: v.to(dtype) for k, v in t.items()} if isinstance(t, dict) else t.to(dtype) for t in inputs
    )
    tolerance = 1e-10 if dtype == torch.float64 else 2e-5
    with torch.no_grad():
        out, new_params = make_forward(MLPModel().stack)(xq, xk, xv, lr, tau, params, lnw, lnb, 1e-6)
        torch.testing.assert_close(out.double(), out_ref, rtol=tolerance, atol=tolerance)
        for key in params_ref:
            torch.testing.assert_close(
                new_params[key].double(), params_ref[key], rtol=tolerance, atol=tolerance
            )
        pending = {k: torch.zeros_like(v) for k, v in params.items()}
        for t in range(4):  # decoding: its own gradient through the stack, closing on the last token
            out, params, pending = make_decode(MLPModel().stack)(
                xq[:, :, t],
                xk[:, :, t],
                xv[:, :, t],
                lr[:, :, t],
                tau[t],
                params,
                pending,
                lnw,
                lnb,
                1e-6,
                t == 3,
            )
            torch.testing.assert_close(out.double(), out_ref[:, :, t], rtol=tolerance, atol=tolerance)


def _entry(name: str, struct):
    function = getattr(build.load_library(), name)
    function.argtypes, function.restype = [ctypes.POINTER(struct)], ctypes.c_int
    return lambda args: function(ctypes.byref(args))


def test_the_entry_points_return_their_status_for_invalid_sizes_and_dtypes():
    """The C interface's own checks (the host checks first, so no other test reaches them): tokens that
    are not a multiple of the mini-batch are status 2 for the inference scan and the hoisting (not a
    partial last mini-batch read past the caller's rows), another dtype is status 1 (not success with
    nothing written). The buffers are sized for whole mini-batches so that a kernel without the check
    reads nothing out of bounds."""
    from innerloop.kernels.cpu.scan_ends import _OutputNormArgs

    batch, heads, width, k = 1, 1, 4, 4
    xq, xk, xv, lr, tau, params, lnw, lnb = make_inputs(
        batch, heads, 2 * k, width, k, "linear", torch.float64, 0
    )
    weight, bias = params["W1"].clone(), params["b1"].clone()
    out = torch.empty_like(xq)
    args = _StackArgs()
    args.dtype, args.num_threads = DTYPE_CODES[torch.float64], 1
    args.batch, args.heads, args.tokens, args.mini_batch = batch, heads, k + 1, k
    args.num_layers, args.dims[0], args.dims[1] = 1, width, width
    for name, t in (("xq", xq), ("xk", xk), ("xv", xv), ("lr", lr), ("out", out)):
        setattr(args, name, t.data_ptr())
        getattr(args, f"{name}_strides")[:] = list(t.stride()[:3])
    args.tau, args.ln_weight, args.ln_bias, args.eps = tau.data_ptr(), lnw.data_ptr(), lnb.data_ptr(), 1e-6
    args.weights[0], args.biases[0] = weight.data_ptr(), bias.data_ptr()
    forward = _entry("innerloop_stack_forward", _StackArgs)
    assert forward(args) == 2  # 5 tokens, mini-batches of 4
    args.tokens, args.dtype = 2 * k, 7
    assert forward(args) == 1  # neither float32 (0) nor float64 (1)

    views = {"xq": xq, "xk": xk, "xv": xv, "lr": lr}
    hoist_args = _hoist_args(views, tau, lnw, lnb, True)
    hoisted = {
        "both": torch.empty(2, 1, 2 * k, width + 1, dtype=torch.float64),
        "left": torch.empty(2, 1, k + width + 1, k, dtype=torch.float64),
        "shift": torch.empty(2, 1, k, width, dtype=torch.float64),
        "gamma_sq": torch.empty(1, 1, width, dtype=torch.float64),
        "eta": torch.empty(2, 1, k, k, dtype=torch.float64),
        "scale": torch.empty(2, 1, k, 1, dtype=torch.float64),
    }
    _set(hoist_args, **hoisted)
    hoist = _entry("innerloop_hoist_forward", type(hoist_args))
    assert hoist(hoist_args) == 0
    hoist_args.tokens = 2 * k - 1
    assert hoist(hoist_args) == 2  # 7 tokens, mini-batches of 4

    norm_args = _OutputNormArgs()
    norm_args.dtype, norm_args.num_threads, norm_args.batch, norm_args.heads = 7, 1, 1, 1
    norm_args.tokens, norm_args.width = 0, width
    assert _entry("innerloop_output_norm_forward", _OutputNormArgs)(norm_args) == 1
