"""The CPU kernel trains stack models (TTT-Linear, TTT-MLP, deeper stacks): its compiled scans and their
backwards equal the torch reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from kernel_testing import make_inputs, strided

from innerloop import TTTLayer
from innerloop.core.functional import relative_error
from innerloop.core.protocol import AffineLayer, StackModel
from innerloop.kernels.cpu import stack_scan
from innerloop.kernels.cpu.library import ACTIVATION_CODES, run_entry_point
from innerloop.kernels.cpu.linear_scan import DOUBLE_BACKWARD_MESSAGE, compiled_linear_scan
from innerloop.kernels.cpu.stack import make_forward, make_training_scan, make_verify
from innerloop.kernels.cpu.stack_scan import compiled_stack_scan
from innerloop.kernels.fused_torch import make_fused_forward
from innerloop.kernels.reference import reference_kernel
from innerloop.kernels.spec import KernelInputs
from innerloop.plugins.losses.reconstruction import Reconstruction
from innerloop.plugins.models.linear import LinearModel
from innerloop.plugins.models.mlp import GELU_TANH, MLPModel
from innerloop.testing import FLOAT64_TOLERANCE
from innerloop.testing.checks import assert_close, assert_layers_train_alike, twin_layers
from innerloop.testing.strategies import PAPER_INNER_WRAPPING, layer_configs, seeds

pytestmark = pytest.mark.usefixtures("cpu_kernels")  # skips, with the reason, where nothing compiles

LINEAR = LinearModel().stack
WITHOUT_BIAS = (AffineLayer("W1", None, None),)
REFERENCE_FORWARD, _ = reference_kernel(LinearModel(), Reconstruction())
GELU_CODE = next(code for code, name in ACTIVATION_CODES.items() if name == "gelu_tanh")


def outputs_and_gradients(forward, inputs, cotangent_seed: int, layouts: bool = False):
    """A chunk function's output, new weights, and the gradients of a random linear function of both
    w.r.t. every input (the views, lr, tau, the weights and the inner LayerNorm). ``layouts``: the
    views strided and the weights shared by the batch (stride 0), as a layer passes them."""
    xq, xk, xv, lr, tau, params, lnw, lnb = inputs
    leaves = [xq, xk, xv, lr, tau, *params.values(), lnw, lnb]
    if layouts:
        xq, xk, xv = (strided(t) for t in (xq, xk, xv))
        params = {k: v[:1].expand_as(v) for k, v in params.items()}
    out, new_params = forward(xq, xk, xv, lr, tau, params, lnw, lnb, 1e-6)
    generator = torch.Generator().manual_seed(cotangent_seed)  # the same cotangents in any dtype

    def noise(like: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, generator=generator, dtype=torch.float64).to(like.dtype)

    loss = (out * noise(out)).sum()
    for key in sorted(new_params):
        loss = loss + (new_params[key] * noise(new_params[key])).sum()
    return out, new_params, torch.autograd.grad(loss, leaves)


def leaf_inputs(inputs):
    """Fresh leaves that require grad, with the same values."""
    xq, xk, xv, lr, tau, params, lnw, lnb = inputs
    fresh = [t.detach().clone().requires_grad_() for t in (xq, xk, xv, lr, tau, lnw, lnb)]
    params = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    return (*fresh[:5], params, *fresh[5:])


def gradient_names(inputs) -> list[str]:
    """The names of :func:`outputs_and_gradients`' gradients, in its order."""
    return ["xq", "xk", "xv", "lr", "tau", *inputs[5], "ln_weight", "ln_bias"]


MLP = MLPModel().stack
REFERENCE_MLP_FORWARD, _ = reference_kernel(MLPModel(), Reconstruction())
REFERENCES = {id(LINEAR): REFERENCE_FORWARD, id(MLP): REFERENCE_MLP_FORWARD}


def assert_training_equal(stack, inputs, layouts: bool = False, cotangent_seed: int = 0) -> None:
    """The kernel against the reference (for other stacks than the built-in models' the fused torch path,
    itself tested against the reference): outputs, new weights, every gradient, float64 to 1e-10."""
    oracle = REFERENCES.get(id(stack)) or make_fused_forward(stack)
    reference = outputs_and_gradients(oracle, leaf_inputs(inputs), cotangent_seed, layouts)
    ours = outputs_and_gradients(make_forward(stack), leaf_inputs(inputs), cotangent_seed, layouts)
    assert_close(ours[0], reference[0], "training output", FLOAT64_TOLERANCE)
    for key in reference[1]:
        assert_close(ours[1][key], reference[1][key], f"new {key}", FLOAT64_TOLERANCE)
    for name, g_ours, g_ref in zip(gradient_names(inputs), ours[2], reference[2], strict=True):
        assert_close(g_ours, g_ref, f"gradient of {name}", FLOAT64_TOLERANCE)


STACKS = {"linear": LINEAR, "mlp": MLP}


@pytest.mark.parametrize("model", ["linear", "mlp"])
def test_training_equals_the_reference_on_one_example(model):
    inputs = make_inputs(2, 3, 12, 5, 4, model, dtype=torch.float64, seed=0)
    assert_training_equal(STACKS[model], inputs, layouts=True)


@pytest.mark.slow  # ~4 s: hypothesis over shapes and layouts (one example above stays in the fast loop)
@given(
    model=st.sampled_from(["linear", "mlp"]),
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    head_dim=st.sampled_from([2, 5, 8, 16, 20]),
    mini_batch=st.sampled_from([1, 3, 4, 16]),
    num_mini_batches=st.integers(1, 3),
    layouts=st.booleans(),
    seed=seeds(),
)
def test_training_equals_the_reference_in_float64(
    model, batch, heads, head_dim, mini_batch, num_mini_batches, layouts, seed
):
    """Outputs, new weights and the gradient of every input, against the pure-torch dual form."""
    tokens = mini_batch * num_mini_batches
    inputs = make_inputs(batch, heads, tokens, head_dim, mini_batch, model, dtype=torch.float64, seed=seed)
    assert_training_equal(STACKS[model], inputs, layouts, cotangent_seed=seed)


DEEPER = (  # every case the stack scan distinguishes: a bias or none, tanh-GELU or the identity between
    AffineLayer("W1", None, GELU_TANH),
    AffineLayer("W2", "b2", None),
    AffineLayer("W3", "b3", GELU_TANH),
    AffineLayer("W4", None, None),
)
DEEPER_WIDTHS = [6, 10, 7, 9, 6]


class DeeperModel(StackModel):
    """An inner model of the four layers above (head dim 6), for its reference."""

    name = "deeper_test_stack"

    @property
    def stack(self) -> tuple[AffineLayer, ...]:
        return DEEPER

    def param_shapes(self, head_dim: int) -> dict[str, tuple[int, ...]]:
        shapes = {}
        for layer, fan_in, width in zip(DEEPER, DEEPER_WIDTHS, DEEPER_WIDTHS[1:], strict=False):
            shapes[layer.weight] = (fan_in, width)
            if layer.bias is not None:
                shapes[layer.bias] = (1, width)
        return shapes

    def init_params(self, num_heads: int, head_dim: int, generator=None):
        return {
            k: torch.randn(num_heads, *shape, generator=generator)
            for k, shape in self.param_shapes(6).items()
        }


REFERENCES[id(DEEPER)] = reference_kernel(DeeperModel(), Reconstruction())[0]


@pytest.mark.parametrize("weight_scale", [1.0, 40.0])
def test_a_deeper_stack_trains_equal_to_the_reference(weight_scale):
    """Four layers, with and without biases and activations. At ``weight_scale=40`` many pre-activations
    lie beyond the GELU derivative's clamp at |x| = 100, where its own derivative is zero."""
    xq, xk, xv, lr, tau, _, lnw, lnb = make_inputs(2, 2, 12, 6, 4, "linear", dtype=torch.float64, seed=4)
    generator = torch.Generator().manual_seed(4)
    params = {}
    for name, shape in DeeperModel().param_shapes(6).items():
        params[name] = torch.randn(2, 2, *shape, generator=generator, dtype=torch.float64)
        params[name] *= weight_scale * shape[0] ** -0.5 if name.startswith("W") else 0.1
    if weight_scale > 1:
        hidden = (xk @ params["W1"]).abs()
        assert (hidden > 100).any() and (hidden < 100).any()  # both sides of the clamp are exercised
    inputs = (xq, xk, xv, lr, tau, params, lnw, lnb)
    assert_training_equal(DEEPER, inputs, layouts=True)
    # the fused torch path (training's fallback) too, which once assumed an activation between layers
    reference = outputs_and_gradients(REFERENCES[id(DEEPER)], leaf_inputs(inputs), 0)
    fused = outputs_and_gradients(make_fused_forward(DEEPER), leaf_inputs(inputs), 0)
    for name, g_fused, g_ref in zip(gradient_names(inputs), fused[2], reference[2], strict=True):
        assert_close(g_fused, g_ref, f"fused torch gradient of {name}", FLOAT64_TOLERANCE)


@pytest.mark.parametrize("head_dim", [3, 16])
def test_a_layer_without_bias_trains_equal_to_fused_torch(head_dim):
    """A one-layer stack without bias folds no ones column: the compiled scan's input width is f."""
    inputs = make_inputs(2, 2, 12, head_dim, 4, "linear", dtype=torch.float64, seed=1)
    without_bias = (*inputs[:5], {"W1": inputs[5]["W1"]}, *inputs[6:])
    assert_training_equal(WITHOUT_BIAS, without_bias)


@pytest.mark.parametrize(
    ("model", "weight", "scale"),
    [("linear", "W1", 1e160), ("mlp", "W2", 1e150), ("mlp", "W2", 1e160), ("mlp", "W2", 1e200)],
)
def test_rows_whose_squares_overflow_train_equal_to_the_reference(model, weight, scale):
    """The last layer's weights so large that every pre-activation row's squares overflow float64 (from
    about 1e154): the LayerNorm rows take the scaled path. Outputs, new weights and every gradient equal
    the reference's; in TTT-MLP the gradient through those rows comes back large (through W2), so every
    term of the LayerNorm backward matters. One exception, TTT-Linear's keys: their gradient is the sum
    of terms of order 1 made of products of 1e160 and 1e-160 that nearly cancel, which float64 cannot
    resolve (the fused torch path and the reference already differ by a factor of about 2 there), so it
    is only required to be finite."""
    xq, xk, xv, lr, tau, params, lnw, lnb = make_inputs(1, 2, 8, 8, 4, model, dtype=torch.float64, seed=2)
    inputs = (xq, xk, xv, lr, tau, {**params, weight: params[weight] * scale}, lnw, lnb)
    reference = outputs_and_gradients(REFERENCES[id(STACKS[model])], leaf_inputs(inputs), 0)
    ours = outputs_and_gradients(make_forward(STACKS[model]), leaf_inputs(inputs), 0)
    assert_close(ours[0], reference[0], "training output", FLOAT64_TOLERANCE)
    for key in reference[1]:
        assert_close(ours[1][key], reference[1][key], f"new {key}", FLOAT64_TOLERANCE)
    for name, g_ours, g_ref in zip(gradient_names(inputs), ours[2], reference[2], strict=True):
        if model == "linear" and name == "xk":
            assert torch.isfinite(g_ours).all()
        else:
            assert_close(g_ours, g_ref, f"gradient of {name}", FLOAT64_TOLERANCE)


@pytest.mark.slow  # ~1.5 s: finite differences over every input (the fast loop checks against the reference)
@pytest.mark.parametrize("stack", [LINEAR, MLP, DEEPER], ids=["linear", "mlp", "deeper"])
def test_the_compiled_scans_pass_gradcheck(stack):
    """Finite differences in float64 against the hand-written backward, on the scan's own inputs (the
    hoisted tensors and the folded weights), not only through the reference."""
    generator = torch.Generator().manual_seed(6)

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=generator, dtype=torch.float64)).requires_grad_()

    num_mb, pairs, k, f = 2, 2, 3, 4
    widths = [f, *(DEEPER_WIDTHS[1:-1] if stack is DEEPER else [4 * f] if stack is MLP else []), f]
    weights, rows = [], f + (stack[0].bias is not None)
    for index in range(len(stack)):
        weights.append(rnd(pairs, rows, widths[index + 1], scale=rows**-0.5))
        rows = widths[index + 1] + (index + 1 < len(stack) and stack[index + 1].bias is not None)
    inputs = rnd(num_mb, pairs, 2 * k, weights[0].shape[1])
    left = rnd(num_mb, pairs, k + inputs.shape[-1], k, scale=0.1)
    shift, gamma_sq = rnd(num_mb, pairs, k, f), rnd(pairs, 1, f)
    eta, scale = rnd(num_mb, pairs, k, k, scale=0.1), rnd(num_mb, pairs, k, 1, scale=0.1)
    scan = make_training_scan(stack)
    deeper = len(stack) > 1  # the one-layer scan takes no eta and scale (they are in left)

    def function(inputs, left, shift, gamma_sq, *rest):
        eta, scale, weights = (*rest[:2], rest[2:]) if deeper else (None, None, rest)
        z, last = scan(inputs, left, shift, gamma_sq, eta, scale, list(weights), 1e-6)
        return (z, *last)

    arguments = (inputs, left, shift, gamma_sq, *((eta, scale) if deeper else ()), *weights)
    assert torch.autograd.gradcheck(function, arguments)


@pytest.mark.slow  # ~2 s
@pytest.mark.parametrize("model", ["linear", "mlp"])
def test_float32_gradients_are_as_close_to_float64_as_fused_torch(model):
    inputs64 = make_inputs(2, 3, 64, 16, 16, model, dtype=torch.float64, seed=3)
    inputs32 = [{k: v.float() for k, v in t.items()} if isinstance(t, dict) else t.float() for t in inputs64]
    exact = outputs_and_gradients(REFERENCES[id(STACKS[model])], leaf_inputs(inputs64), 0)
    ours = outputs_and_gradients(make_forward(STACKS[model]), leaf_inputs(inputs32), 0)
    fused = outputs_and_gradients(make_fused_forward(STACKS[model]), leaf_inputs(inputs32), 0)
    for index, name in enumerate(gradient_names(inputs64)):
        error_ours = relative_error(ours[2][index], exact[2][index])
        error_fused = relative_error(fused[2][index], exact[2][index])
        assert error_ours < 1e-5, (name, error_ours)
        assert error_ours < 4 * error_fused + 1e-7, (name, error_ours, error_fused)


@pytest.mark.slow  # ~15 s: hypothesis over layer configs with every gradient
@given(config=layer_configs(inner_models=("linear", "mlp"), inner_losses=("reconstruction",),
                            update_rules=("dual_form",), inner_wrappings=PAPER_INNER_WRAPPING),
       tokens=st.integers(1, 26), seed=seeds())  # fmt: skip
def test_a_layer_trains_through_the_kernel_equal_to_torch(config, tokens, seed):
    """The layer picks the kernel for training (``kernel="auto"``); outputs, state and every parameter's
    gradient equal the torch path's, with a partial mini-batch at the end."""
    reference, fast = twin_layers(config, seed % 1000, kernel="auto")
    x = torch.randn(2, tokens, config["hidden_size"], dtype=torch.float64, requires_grad=True)
    assert_layers_train_alike(reference, fast, x, FLOAT64_TOLERANCE)
    if tokens >= config["mini_batch_size"]:
        assert f"cpu_ttt_{config['inner_model']}" in [path for path, _ in fast.dispatches]


@pytest.mark.parametrize("model", ["linear", "mlp"])
def test_double_backward_is_refused_with_a_clear_error(model):
    torch.manual_seed(0)
    layer = TTTLayer(8, 2, inner_model=model, mini_batch_size=2, kernel=f"cpu_ttt_{model}").double()
    x = torch.randn(1, 4, 8, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="differentiable once only.*needs_double_backward=True"):
        torch.autograd.grad(layer(x)[0].sum(), x, create_graph=True)
    assert "differentiable once only" in DOUBLE_BACKWARD_MESSAGE


def test_wrong_shapes_are_errors_not_out_of_bounds_reads():
    both, left = torch.zeros(2, 3, 8, 5), torch.zeros(2, 3, 9, 4)
    shift, gamma_sq, weight = torch.zeros(2, 3, 4, 4), torch.zeros(3, 1, 4), torch.zeros(3, 5, 4)
    compiled_linear_scan(both, left, shift, gamma_sq, weight, 1e-6)  # consistent: runs
    with pytest.raises(ValueError, match=r"left \(2, 3, 8, 4\) != \(2, 3, 9, 4\)"):
        compiled_linear_scan(both, left[:, :, :8], shift, gamma_sq, weight, 1e-6)
    with pytest.raises(ValueError, match=r"weight \(2, 5, 4\) != \(3, 5, 4\)"):
        compiled_linear_scan(both, left, shift, gamma_sq, weight[:2], 1e-6)
    with pytest.raises(ValueError, match="gamma_sq is torch.float64, both is torch.float32"):
        compiled_linear_scan(both, left, shift, gamma_sq.double(), weight, 1e-6)


def test_wrong_shapes_for_the_stack_scan_are_errors_not_out_of_bounds_reads():
    both, left, shift, gamma_sq = (
        torch.zeros(2, 3, 8, 5),
        torch.zeros(2, 3, 9, 4),
        torch.zeros(2, 3, 4, 4),
        torch.zeros(3, 1, 4),
    )
    eta, scale = torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 1)
    weights = [torch.zeros(3, 5, 7), torch.zeros(3, 8, 4)]

    def scan(**changes):
        tensors = dict(
            both=both, left=left, shift=shift, gamma_sq=gamma_sq, eta=eta, scale=scale, weights=weights
        )
        return compiled_stack_scan([1], **{**tensors, **changes}, eps=1e-6)

    scan()  # consistent: runs
    with pytest.raises(
        ValueError, match=r"weights\[1\] \(3, 9, 4\) is not \[3, 7 \(\+1 with a bias\), width\]"
    ):
        scan(weights=[weights[0], torch.zeros(3, 9, 4)])
    with pytest.raises(ValueError, match="the last layer's width 5 is not shift's 4"):
        scan(weights=[weights[0], torch.zeros(3, 8, 5)])
    with pytest.raises(ValueError, match=r"eta \(2, 3, 4, 3\) != \(2, 3, 4, 4\)"):
        scan(eta=eta[..., :3])
    with pytest.raises(ValueError, match="1 weights, the scan takes 2 to 8 layers"):
        scan(weights=weights[:1])
    with pytest.raises(ValueError, match=r"weights\[1\] is torch.float64, both is torch.float32"):
        scan(weights=[weights[0], weights[1].double()])
    with pytest.raises(ValueError, match=r"activations\[0\] is 7, not one of the kernel's codes \[0, 1\]"):
        compiled_stack_scan([7], both, left, shift, gamma_sq, eta, scale, weights, 1e-6)
    with pytest.raises(ValueError, match="eta is on meta, the kernel runs on the CPU"):
        scan(eta=eta.to("meta"))
    with pytest.raises(ValueError, match="shift is on meta, the kernel runs on the CPU"):
        compiled_linear_scan(both, left, shift.to("meta"), gamma_sq, torch.zeros(3, 5, 4), 1e-6)


@pytest.mark.parametrize("widths", [(7, 4), (6, 9, 4), (3, 5, 2, 4)])
def test_the_stack_scans_record_size_is_the_kernels(widths):
    """The forward keeps a record per (mini-batch, pair) that the backward reads: Python sizes the
    buffer, the kernel lays it out and fills it exactly. A size the kernel does not compute itself is
    refused, not written past."""
    num_mb, pairs, k, inputs = 2, 3, 4, 5
    rows = [inputs] + [width + 1 for width in widths[:-1]]  # every later layer with a bias row
    size = stack_scan.record_size(k, widths)
    tensors = {  # the struct holds raw pointers: every tensor stays referenced here
        "both": torch.randn(num_mb, pairs, 2 * k, inputs),
        "left": torch.randn(num_mb, pairs, k + inputs, k),
        "shift": torch.randn(num_mb, pairs, k, widths[-1]),
        "gamma_sq": torch.rand(pairs, 1, widths[-1]),
        "eta": torch.rand(num_mb, pairs, k, k).tril(),
        "scale": torch.rand(num_mb, pairs, k, 1),
        "z": torch.empty(num_mb, pairs, k, widths[-1]),
        "records": torch.full((num_mb * pairs * size + 1,), float("nan")),  # one sentinel past the end
    }
    per_layer = {
        "weights": [torch.randn(pairs, r, w) * 0.3 for r, w in zip(rows, widths, strict=True)],
        "starts": [torch.empty(num_mb, pairs, r, w) for r, w in zip(rows, widths, strict=True)],
    }
    args = stack_scan._args([GELU_CODE] * (len(widths) - 1), 1e-6, tensors, per_layer)
    assert args.record_size == size
    for wrong in (size - 1, size + 1):
        args.record_size = wrong
        with pytest.raises(RuntimeError, match="invalid sizes"):
            run_entry_point("innerloop_stack_scan_forward", args)
    assert tensors["records"].isnan().all()  # refused before anything was written
    args.record_size = size
    run_entry_point("innerloop_stack_scan_forward", args)
    assert not tensors["records"][:-1].isnan().any() and tensors["records"][-1].isnan()


@pytest.mark.parametrize("model", ["linear", "mlp"])
def test_inputs_of_mixed_dtypes_train_as_in_the_views_dtype(model):
    """A direct call with float32 learning rates, token scales, inner LayerNorm and weights beside
    float64 views trains as if all were float64 (inference casts them so too)."""
    inputs = make_inputs(1, 2, 8, 4, 4, model, dtype=torch.float64, seed=5)
    xq, xk, xv, lr, tau, params, lnw, lnb = inputs
    mixed = (
        xq,
        xk,
        xv,
        lr.float(),
        tau.float(),
        {k: v.float() for k, v in params.items()},
        lnw.float(),
        lnb.float(),
    )
    as64 = (xq, xk, xv, lr.float().double(), tau.float().double(),
            {k: v.float().double() for k, v in params.items()}, lnw.float().double(), lnb.float().double())  # fmt: skip
    got = outputs_and_gradients(make_forward(STACKS[model]), leaf_inputs(mixed), 0)
    want = outputs_and_gradients(make_forward(STACKS[model]), leaf_inputs(as64), 0)
    assert_close(got[0], want[0], "output", FLOAT64_TOLERANCE)
    for name, g_got, g_want in zip(gradient_names(inputs), got[2], want[2], strict=True):
        assert g_got.dtype == (torch.float64 if name in ("xq", "xk", "xv") else torch.float32), name
        assert_close(g_got.double(), g_want, f"gradient of {name}", 1e-6)


def test_verify_says_what_training_the_kernel_takes():
    def inputs(**changes):
        fields = dict(device=torch.device("cpu"), dtype=torch.float32, head_dim=8, mini_batch_size=4,
                      num_tokens=8, requires_grad=True)  # fmt: skip
        return KernelInputs(**{**fields, **changes})

    assert make_verify(LINEAR)(inputs()) is None
    assert make_verify(MLPModel().stack)(inputs()) is None
    assert make_verify(DEEPER)(inputs()) is None
    assert "differentiable once only" in make_verify(LINEAR)(inputs(needs_double_backward=True))
    assert make_verify(MLPModel().stack)(inputs(requires_grad=False)) is None


def test_the_scans_backward_leaves_the_callers_gradients_alone_and_reads_their_strides():
    """The compiled scan's backward turns d loss / d last weights into d loss / d weight in place: on a
    copy of the gradient it is given, not on the caller's tensor (``torch.autograd.grad``'s
    ``grad_outputs``); and it reads a gradient of the outputs given as a strided view as that view, not
    as its memory. (Review s61: writing into the given gradient, mutant K3, and passing a strided one
    to the kernel as it is, mutant K1, passed every test: the fused path hands the scan fresh,
    contiguous gradients.)"""
    generator = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    num_mb, pairs, k, inputs, f = 2, 3, 4, 5, 4
    leaves = [
        rnd(num_mb, pairs, 2 * k, inputs),  # both
        0.1 * rnd(num_mb, pairs, k + inputs, k),  # left
        rnd(num_mb, pairs, k, f),  # shift
        1.0 + 0.1 * rnd(pairs, 1, f),  # gamma_sq
        0.3 * rnd(pairs, inputs, f),  # weight
    ]
    leaves = [t.requires_grad_(True) for t in leaves]
    z, last = compiled_linear_scan(*leaves, 1e-6)
    grad_z, grad_last = rnd(*z.shape), rnd(*last.shape)
    kept = grad_last.clone()
    grads = torch.autograd.grad((z, last), leaves, (grad_z, grad_last), retain_graph=True)
    assert all(g.abs().max() > 0 for g in grads)
    assert torch.equal(grad_last, kept)  # the caller's gradient is not written into
    strided_z = rnd(*z.shape[:-1], 2 * f)[..., ::2]  # a view with a stride of 2 in its last dim
    strided = torch.autograd.grad((z, last), leaves, (strided_z, grad_last))
    again = torch.autograd.grad(
        compiled_linear_scan(*leaves, 1e-6), leaves, (strided_z.contiguous(), grad_last)
    )
    for got, want in zip(strided, again, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
