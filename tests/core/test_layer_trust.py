"""The layer never answers silently wrong (issue 9, items 1, 2, 3 and 17).

- Kernels are chosen by what the inner model, loss and update rule *are*, never by their names.
- Under autocast (bf16, fp16) every path runs its inner scan in float32 and matches float32 to the
  precision of the dtype, forward and backward.
- Huge finite inputs give on every path what they give on the torch path.
- Every bad constructor or forward argument fails at once, with one line naming it and the fix.
"""

from __future__ import annotations

import math

import pytest
import torch
from lm_testing import TINY

from innerloop import TTTLayer
from innerloop.core.functional import gelu_tanh_derivative, relative_error
from innerloop.core.protocol import Activation, AffineLayer, InnerLoss, LossPairs, StackModel
from innerloop.plugins.losses.reconstruction import Reconstruction
from innerloop.plugins.models.linear import LinearModel
from innerloop.plugins.models.mlp import MLPModel
from innerloop.plugins.optimizers.dual_form import DualForm
from innerloop.testing.checks import assert_finite_where_expected_is

# --------------------------------------------------------------------------------------------------
# 1. Kernels by identity, not by name
# --------------------------------------------------------------------------------------------------

TANH = Activation("tanh", torch.tanh, lambda z: 1 - torch.tanh(z) ** 2)


class TanhImpostor(StackModel):
    """Calls itself "linear" but is ``tanh(x W + b)``: the linear kernels do not compute it."""

    name = "linear"

    @property
    def stack(self) -> tuple[AffineLayer, ...]:
        return (AffineLayer("W1", "b1", TANH),)

    def param_shapes(self, head_dim: int) -> dict[str, tuple[int, ...]]:
        return {"W1": (head_dim, head_dim), "b1": (1, head_dim)}

    def init_params(self, num_heads, head_dim, generator=None):
        return {
            "W1": torch.randn(num_heads, head_dim, head_dim) * 0.5,
            "b1": torch.zeros(num_heads, 1, head_dim),
        }


class LinearLookalike(TanhImpostor):
    """Unregistered, named "linear", and declaring exactly the linear stack: the kernels compute it."""

    @property
    def stack(self) -> tuple[AffineLayer, ...]:
        return LinearModel().stack


class DoubledLoss(InnerLoss):
    """Calls itself "reconstruction" but weighs the error twice: the kernels do not compute it."""

    name = "reconstruction"

    def pairs(self, views, carry) -> LossPairs:
        return LossPairs(inputs=views.key, targets=views.value, valid=None, carry={})

    def token_loss(self, prediction, target):
        return (prediction - target).pow(2).sum(dim=-1)

    def token_loss_grad(self, prediction, target):
        return 2 * (prediction - target)


class RenamedDualForm(DualForm):
    """A subclass may override anything: it is not the registered rule, whatever its name."""


def _twins(**options) -> tuple[TTTLayer, TTTLayer]:
    torch.manual_seed(0)
    auto = TTTLayer(16, 2, mini_batch_size=4, **options)
    reference = TTTLayer(16, 2, mini_batch_size=4, kernel="torch", **options)
    reference.load_state_dict(auto.state_dict())
    return auto, reference


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize(
    "options",
    [{"inner_model": TanhImpostor()}, {"inner_loss": DoubledLoss()}],
    ids=["model", "loss"],
)
def test_an_impostor_runs_on_the_torch_path_and_says_why(options, grad):
    auto, reference = _twins(**options)
    x = torch.randn(2, 8, 16)
    with torch.set_grad_enabled(grad):
        y, state = auto(x)
        y_ref, state_ref = reference(x)
    assert [path for path, _ in auto.dispatches] == ["torch"]
    assert "reuses the name of the registered" in auto.dispatches[0][1]
    assert torch.equal(y, y_ref)
    assert all(torch.equal(state.params[k], state_ref.params[k]) for k in state.params)
    with torch.set_grad_enabled(grad):  # decoding one token: no kernel's decode either
        y, _ = auto(x[:, :1], state)
        y_ref, _ = reference(x[:, :1], state_ref)
    assert [path for path, _ in auto.dispatches] == ["torch"] and torch.equal(y, y_ref)


def _patched_loss() -> Reconstruction:
    """The registered class, with its methods replaced on the instance (a loss twice as steep)."""
    loss = Reconstruction()
    loss.token_loss_grad = lambda prediction, target: 2 * (prediction - target)
    loss.token_loss = lambda prediction, target: ((prediction - target) ** 2).sum(-1)
    return loss


def _patched_model() -> LinearModel:
    model = LinearModel()
    model.init_params = lambda num_heads, head_dim, generator=None: LinearModel.init_params(
        model, num_heads, head_dim, generator
    )
    return model


def _patched_rule() -> DualForm:
    rule = DualForm()
    rule.forward = lambda *args: DualForm.forward(rule, *args)
    return rule


@pytest.mark.parametrize(
    ("kind", "make"),
    [("inner_loss", _patched_loss), ("inner_model", _patched_model), ("update_rule", _patched_rule)],
)
def test_an_instance_with_patched_methods_runs_on_the_torch_path(kind, make):
    """An instance of a built-in class whose methods were replaced on the instance is not the
    registered plugin: the kernels compute the class's methods, not the patch."""
    torch.manual_seed(0)
    auto, reference = _twins(**{kind: make()})
    x = torch.randn(2, 8, 16)
    with torch.no_grad():
        y, _ = auto(x)
        y_ref, _ = reference(x)
    path, reason = auto.dispatches[0]
    assert path == "torch" and "patched onto the instance" in reason
    assert torch.equal(y, y_ref)
    with pytest.raises(ValueError, match="patched onto the instance"):
        TTTLayer(16, 2, **{kind: make()}, kernel="fused_torch_linear")


class ForwardDisagreesWithStack(LinearModel):
    """Declares the linear stack but computes ``tanh(x W + b)``: the dual form would run the stack,
    minibatch_gd the forward, so the layer's answer would depend on the update rule."""

    def forward(self, params, x):
        return torch.tanh(x @ params["W1"] + params["b1"])


@pytest.mark.parametrize("rule", ["dual_form", "minibatch_gd"])
def test_an_unregistered_model_whose_forward_is_not_its_stack_is_refused(rule):
    with pytest.raises(ValueError) as error:
        TTTLayer(32, 2, inner_model=ForwardDisagreesWithStack(), update_rule=rule, kernel="torch")
    message = str(error.value)
    assert "inner_model 'linear'" in message and "ForwardDisagreesWithStack" in message
    assert (
        "does not compute its declared stack" in message and "apply_stack(self.stack, params, x)" in message
    )
    assert "\n" not in message
    patched = LinearModel()
    patched.forward = ForwardDisagreesWithStack().forward  # the same defect, patched onto an instance
    with pytest.raises(ValueError, match="does not compute its declared stack"):
        TTTLayer(32, 2, inner_model=patched)


def test_checking_an_unregistered_model_does_not_move_the_callers_seed():
    torch.manual_seed(0)
    by_name = TTTLayer(32, 2, inner_model="mlp")
    after_name = torch.rand(3)
    torch.manual_seed(0)
    by_instance = TTTLayer(32, 2, inner_model=MLPModel())  # checked: not the registered object
    after_instance = torch.rand(3)
    assert torch.equal(after_name, after_instance)
    assert all(torch.equal(a, b) for a, b in zip(by_name.parameters(), by_instance.parameters(), strict=True))


def test_an_update_rule_subclass_reusing_the_name_gets_no_kernel():
    rule = RenamedDualForm()
    assert rule.name == "dual_form"
    auto, _ = _twins(update_rule=rule)
    with torch.no_grad():
        auto(torch.randn(1, 8, 16))
    path, reason = auto.dispatches[0]
    assert path == "torch" and "update rule 'dual_form'" in reason and "a different class" in reason


def test_a_model_that_declares_the_registered_stack_keeps_its_kernels():
    auto, reference = _twins(inner_model=LinearLookalike())
    x = torch.randn(2, 8, 16)
    with torch.no_grad():
        y, _ = auto(x)
        y_ref, _ = reference(x)
    assert auto.dispatches[0][0] in ("cpu_ttt_linear", "fused_torch_linear")
    assert relative_error(y, y_ref) < 1e-5  # float32: kernels and torch differ in rounding only


@pytest.mark.parametrize("kernel", ["fused_torch_linear", "cpu_ttt_linear"])
def test_forcing_a_kernel_on_an_impostor_is_refused_at_construction(kernel):
    with pytest.raises(
        ValueError, match=f"kernel='{kernel}' cannot run this layer: inner model 'linear'.*TanhImpostor"
    ):
        TTTLayer(16, 2, inner_model=TanhImpostor(), kernel=kernel)


def test_a_state_written_by_an_impostor_is_refused_by_the_registered_model():
    impostor = TTTLayer(16, 2, inner_model=TanhImpostor(), mini_batch_size=4)
    _, state = impostor(torch.randn(1, 5, 16))
    with pytest.raises(
        ValueError, match=r"inner_model': \('linear \(unregistered .*TanhImpostor\)', 'linear'\)"
    ):
        TTTLayer(16, 2, mini_batch_size=4)(torch.randn(1, 1, 16), state)


# --------------------------------------------------------------------------------------------------
# 2. Mixed precision
# --------------------------------------------------------------------------------------------------

# How close a mixed-precision run must be to float32, in units of the dtype's unit roundoff
# u = eps / 2 (2**-8 for bf16, 2**-11 for fp16). Forward, the autocast run rounds six quantities
# once each to the dtype: x and the projection weights (as operands), the views, the post-norm output
# and o_proj's weight (as operands), and o_proj's output; each is a relative error <= u and the inner
# scan (float32, LayerNorm-wrapped) has a gain of about one, so outputs and states are within 6u. The
# backward rounds the same six quantities once more: the gradient (all parameters as one vector) is
# within 12u.
FORWARD_ULPS, GRADIENT_ULPS = 6, 12
MIXED_PATHS = {
    "torch": {"kernel": "torch"},
    "fused_torch": {"kernel": "fused_torch_{model}"},
    "cpu_training": {"kernel": "cpu_ttt_{model}"},  # TTT-Linear's compiled training scan (if it builds)
    "cpu_kernel": {"kernel": "auto"},  # without autograd, auto is the compiled kernel (if it builds)
    "minibatch_gd": {"kernel": "torch", "update_rule": "minibatch_gd"},
}


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.flatten() for t in tensors])


MIXED_CASES = [  # the compiled training scan is TTT-Linear's only (fused torch trains TTT-MLP, above)
    (path, model)
    for path in MIXED_PATHS
    for model in ("linear", "mlp")
    if (path, model) != ("cpu_training", "mlp")
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(("path", "model"), MIXED_CASES, ids=[f"{p}-{m}" for p, m in MIXED_CASES])
def test_autocast_runs_the_scan_in_float32_and_matches_float32(path, model, dtype, request):
    if path in ("cpu_kernel", "cpu_training"):
        request.getfixturevalue("cpu_kernels")
    if path == "cpu_training" and model != "linear":
        pytest.skip(
            "the compiled training scan is TTT-Linear's only (fused torch trains TTT-MLP, tested above)"
        )
    grad = path != "cpu_kernel"  # without autograd: the compiled kernel's inference path
    torch.manual_seed(0)
    base_lr = 1.0 if model == "linear" else 0.1
    options = {key: value.format(model=model) for key, value in MIXED_PATHS[path].items()}
    layer = TTTLayer(32, 2, inner_model=model, mini_batch_size=8, base_lr=base_lr, **options)
    x = torch.randn(2, 32, 32)
    params = list(layer.parameters())
    with torch.set_grad_enabled(grad):
        y32, state32 = layer(x)
        with torch.autocast("cpu", dtype=dtype):
            y, state = layer(x)
        if grad:
            grads32 = torch.autograd.grad(y32.square().sum(), params)
            grads = torch.autograd.grad(y.float().square().sum(), params)

    expected_path = {
        "fused_torch": f"fused_torch_{model}",
        "cpu_kernel": f"cpu_ttt_{model}",
        "cpu_training": f"cpu_ttt_{model}",
    }.get(path, "torch")
    assert {p for p, _ in layer.dispatches} <= {expected_path}
    assert y.dtype == dtype  # o_proj ran under autocast
    assert all(t.dtype == torch.float32 for t in state.tensors().values())
    u = torch.finfo(dtype).eps / 2
    assert relative_error(y.float(), y32) < FORWARD_ULPS * u
    for key in state.params:
        assert relative_error(state.params[key], state32.params[key]) < FORWARD_ULPS * u
    if grad:
        assert relative_error(_flat(grads), _flat(grads32)) < GRADIENT_ULPS * u


def test_autocast_continues_a_state_and_a_share_qk_conv_history():
    torch.manual_seed(0)
    layer = TTTLayer(16, 2, mini_batch_size=4, share_qk=True, use_gate=True)
    x = torch.randn(1, 10, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, state = layer(x[:, :5])
        y, state = layer(x[:, 5:], state)
    y.float().sum().backward()
    assert all(t.dtype == torch.float32 for t in state.tensors().values())
    assert torch.isfinite(x.grad).all()


# A language model and a run small enough for a few seconds on a CPU: the end-to-end tests' TINY, 3 steps.
TINY_RUN = [*TINY, "model.num_layers=2", "trainer.max_steps=3"]


@pytest.mark.slow  # a whole (tiny) Lightning run per model: about 8 s
@pytest.mark.parametrize("model", ["linear", "mlp"])
def test_bf16_mixed_training_on_cpu_is_finite_and_moves_the_weights(model, tmp_path):
    import lightning as L

    from innerloop.config import load_config
    from innerloop.train import build_module, load_model, train

    overrides = ["trainer.precision=bf16-mixed", f"model.ttt.inner_model={model}", f"out_dir={tmp_path}"]
    run, cfg = load_config("tiny", [*TINY_RUN, *overrides])
    L.seed_everything(run.seed, verbose=False)
    initial = {k: v.clone() for k, v in build_module(run).model.state_dict().items()}
    result = train(run, cfg)  # seeds the same way, so it starts from `initial`
    assert math.isfinite(result.metrics["val_loss"])
    trained = load_model(result.checkpoint).state_dict()
    ttt_weights = [k for k in trained if ".initial_params." in k or "learnable_ttt_lr" in k]
    assert ttt_weights
    for name, value in trained.items():
        assert torch.isfinite(value).all(), name
    for name in [*ttt_weights, "embed.weight"]:
        assert not torch.equal(trained[name], initial[name]), f"{name} did not move in 3 steps"


def test_preset_precision_auto_is_32_true_on_a_cpu(capsys):
    from innerloop.config import load_config
    from innerloop.train.run import resolve_precision

    run, _ = load_config("ttt-linear-125m")
    assert run.trainer.precision == "auto"
    assert resolve_precision("auto", "cpu") == "32-true"
    assert (
        capsys.readouterr().out.strip() == "trainer.precision=auto: 32-true (no CUDA GPU for accelerator=cpu)"
    )
    assert resolve_precision("auto", "cuda") == "bf16-mixed"
    assert resolve_precision("16-mixed", "cpu") == "16-mixed"  # an explicit choice is kept


# --------------------------------------------------------------------------------------------------
# 3. Huge finite inputs
# --------------------------------------------------------------------------------------------------

# Each path with the autograd mode it runs in (the compiled kernel infers, fused torch trains).
LARGE_PATHS = [
    ("fused_torch", {"kernel": "fused_torch_{model}"}, True),
    ("cpu_kernel", {"kernel": "cpu_ttt_{model}"}, False),
    ("minibatch_gd", {"kernel": "torch", "update_rule": "minibatch_gd"}, False),
    ("minibatch_gd", {"kernel": "torch", "update_rule": "minibatch_gd"}, True),
]


@pytest.mark.parametrize("scale", [1e10, 1e15, 1e30])
@pytest.mark.parametrize("model", ["linear", "mlp"])
@pytest.mark.parametrize(
    ("path", "options", "grad"),
    LARGE_PATHS,
    ids=[f"{p}-{'training' if g else 'inference'}" for p, _, g in LARGE_PATHS],
)
def test_huge_inputs_give_what_the_torch_path_gives(path, options, grad, model, scale, request):
    if path == "cpu_kernel":
        request.getfixturevalue("cpu_kernels")
    options = {k: v.format(model=model) for k, v in options.items()}
    torch.manual_seed(0)
    # non_finite="ignore": the paths' raw numbers are compared (with "raise", overflow is an error)
    layer = TTTLayer(16, 2, inner_model=model, mini_batch_size=4, non_finite="ignore", **options)
    reference = TTTLayer(16, 2, inner_model=model, mini_batch_size=4, non_finite="ignore", kernel="torch")
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(2, 12, 16) * scale
    with torch.set_grad_enabled(grad):
        y, state = layer(x)
        y_ref, state_ref = reference(x)
    # At least as stable: finite wherever the torch path is, and equal there (float32 rounding).
    pairs = [(y, y_ref)] + [(state.params[k], state_ref.params[k]) for k in state.params]
    for actual, expected in pairs:
        assert_finite_where_expected_is(actual, expected, path, 1e-4)
    # The inner weights grow like the input, so the dual form's products of two inputs (x . x for the
    # linear model) overflow float32 only beyond about 1e19; the MLP's hidden activations grow like x^2,
    # so its products overflow already near 1e10 (on the torch path as well).
    if model == "linear" and scale <= 1e15:
        assert torch.isfinite(y).all() and state.is_finite()
        assert torch.isfinite(y_ref).all() and state_ref.is_finite()


@pytest.mark.parametrize("scale", [1e10, 1e15])
def test_the_torch_path_on_huge_inputs_is_right_not_just_finite(scale):
    """Float32 against float64 (where nothing overflows): the LayerNorm of a huge row is its true
    LayerNorm, not a degenerate one."""
    torch.manual_seed(0)
    layer = TTTLayer(16, 2, mini_batch_size=4, kernel="torch")
    wide = TTTLayer(16, 2, mini_batch_size=4, kernel="torch").double()
    wide.load_state_dict(layer.state_dict())
    x = torch.randn(2, 12, 16) * scale
    with torch.no_grad():
        y, _ = layer(x)
        y64, _ = wide(x.double())
    assert relative_error(y.double(), y64) < 1e-5  # float32 rounding (1e-7) through three mini-batches


@pytest.mark.parametrize("kernel", ["torch", "fused_torch_mlp"])
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_finite_input_that_overflows_the_inner_model_raises_by_default(kernel, grad):
    """The MLP's inner weights overflow float32 near 1e10: an error naming it, never silent NaN."""
    torch.manual_seed(0)
    layer = TTTLayer(32, 2, inner_model="mlp", kernel=kernel)
    x = torch.randn(1, 40, 32) * 1e10
    with torch.set_grad_enabled(grad), pytest.raises(ValueError) as error:
        layer(x)
    message = str(error.value)
    assert "non-finite outputs from finite input" in message and "overflowed float32" in message
    assert "normalise the input or run in float64" in message and "non_finite='ignore'" in message
    layer.non_finite = "ignore"  # asked for: the numbers as they are
    with torch.set_grad_enabled(grad):
        y, _ = layer(x)
    assert not torch.isfinite(y).all()


def test_a_non_finite_state_passed_in_is_named_as_the_cause():
    torch.manual_seed(0)
    layer = TTTLayer(16, 2, mini_batch_size=4)
    x = torch.randn(1, 8, 16)
    with torch.no_grad():
        _, state = layer(x)
    state.params["W1"][0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="the state passed in already holds NaN or inf"):
        layer(x, state)


def test_gelu_derivative_of_huge_values_is_finite():
    """The MLP's backward through its activation at huge pre-activations (used by every path)."""
    assert torch.isfinite(gelu_tanh_derivative(torch.tensor([1e30, -1e30, 1e38]))).all()


# --------------------------------------------------------------------------------------------------
# 17. One clear line for every bad argument
# --------------------------------------------------------------------------------------------------


def test_an_unknown_kernel_fails_at_construction_listing_the_valid_ones():
    with pytest.raises(ValueError) as error:
        TTTLayer(16, 2, kernel="fused")
    message = str(error.value)
    assert "kernel='fused' is not a kernel for (inner_model='linear'" in message
    assert (
        "'auto', 'torch'" in message and "'fused_torch_linear'" in message and "'cpu_ttt_linear'" in message
    )
    assert "'fused_torch_mlp'" not in message  # another model's kernel is not valid here


@pytest.mark.parametrize(
    ("argument", "value", "message"),
    [
        ("mini_batch_size", 10**9, "mini_batch_size must be a positive integer <= 65536 .* got 1000000000"),
        ("base_lr", float("nan"), "base_lr must be a finite number >= 0, got nan"),
        ("base_lr", "1.0", "base_lr must be a finite number >= 0, got '1.0'"),
        ("base_lr", -1.0, "base_lr must be a finite number >= 0, got -1.0"),
        ("rope_theta", 0.0, "rope_theta must be a finite number >= 1, got 0.0"),
        ("rope_theta", float("inf"), "rope_theta must be a finite number >= 1, got inf"),
        ("norm_eps", -1e-6, r"norm_eps must be a finite number in \(0, 1\), got -1e-06"),
        ("conv_kernel", True, "conv_kernel must be a positive integer <= 1024, got True"),
        ("use_gate", "false", "use_gate must be True or False, got 'false'"),
        ("share_qk", 1, "share_qk must be True or False, got 1"),
        ("inner_norm", None, "inner_norm must be True or False, got None"),
        ("inner_residual", "yes", "inner_residual must be True or False, got 'yes'"),
        ("needs_double_backward", 0, "needs_double_backward must be True or False, got 0"),
    ],
)
def test_bad_constructor_arguments_name_themselves(argument, value, message):
    with pytest.raises((ValueError, TypeError), match=message):
        TTTLayer(16, 2, **{argument: value})


def test_input_of_another_dtype_than_the_weights():
    layer = TTTLayer(16, 2)
    with pytest.raises(
        TypeError, match=r"x is torch.float64 but the layer's weights are torch.float32: cast x"
    ):
        layer(torch.randn(1, 4, 16, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast, lower-precision inputs are expected
        layer(torch.randn(1, 4, 16, dtype=torch.bfloat16))


DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


@pytest.mark.parametrize("weights", DTYPES, ids=str)
@pytest.mark.parametrize("inputs", DTYPES, ids=str)
def test_under_autocast_a_layer_runs_or_names_the_dtypes(weights, inputs):
    """Under autocast, x in the weights' dtype runs for every dtype (a bfloat16 layer's post-norm
    crashed on the float32 scan output), and so does a float32 layer with bfloat16 / float16 x; every
    other mix is refused naming both dtypes (it crashed in F.linear or layer_norm, naming neither)."""
    torch.manual_seed(0)
    layer = TTTLayer(16, 2, mini_batch_size=4).double()
    x = torch.randn(1, 6, 16, dtype=torch.float64)
    expected, _ = layer(x)
    layer.to(weights)
    runs = inputs == weights or (weights == torch.float32 and inputs != torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if not runs:
            with pytest.raises(
                TypeError, match=f"x is {inputs} but the layer's weights are {weights}: under"
            ):
                layer(x.to(inputs))
            return
        y, state = layer(x.to(inputs))
    assert all(t.dtype == layer.scan_dtype for t in state.tensors().values())
    # bf16 projections (autocast): measured up to 0.027 on outputs of magnitude 1.4, five bf16 ulps
    bound = 1e-12 if weights == inputs == torch.float64 else 0.05
    assert (y.double() - expected).abs().max().item() <= bound


def test_a_state_of_another_dtype():
    layer = TTTLayer(16, 2, mini_batch_size=4)
    _, state = layer(torch.randn(1, 5, 16))
    with pytest.raises(
        TypeError, match=r"state tensor params.W1 is torch.float64 .* state.to\(torch.float32\)"
    ):
        layer(torch.randn(1, 1, 16), state.to(torch.float64))


def test_a_share_qk_state_without_or_with_the_wrong_conv_history():
    plain = TTTLayer(16, 2, mini_batch_size=4)
    shared = TTTLayer(16, 2, mini_batch_size=4, share_qk=True, conv_kernel=4)
    _, plain_state = plain(torch.randn(1, 5, 16))
    with pytest.raises(ValueError, match=r"conv_history\['shared_qk'\] must be \(1, 3, 16\) .* got None"):
        shared(torch.randn(1, 1, 16), plain_state)
    other = TTTLayer(16, 2, mini_batch_size=4, share_qk=True, conv_kernel=2)
    _, other_state = other(torch.randn(1, 5, 16))
    with pytest.raises(
        ValueError, match=r"must be \(1, 3, 16\) for this share_qk layer \(conv_kernel=4\), got \(1, 1, 16\)"
    ):
        shared(torch.randn(1, 1, 16), other_state)
    _, shared_state = shared(torch.randn(1, 5, 16))
    with pytest.raises(
        ValueError, match="state has a conv history \\['shared_qk'\\] but this layer has share_qk=False"
    ):
        plain(torch.randn(1, 1, 16), shared_state)


def test_a_state_with_params_of_the_wrong_shape_or_position():
    layer = TTTLayer(16, 2, mini_batch_size=4)
    _, state = layer(torch.randn(1, 5, 16))
    from dataclasses import replace

    broken = replace(state, params={**state.params, "W1": state.params["W1"][..., :4]})
    with pytest.raises(ValueError, match=r"state.params must have the shapes .*'W1': \(1, 2, 8, 8\)"):
        layer(torch.randn(1, 1, 16), broken)
    with pytest.raises(ValueError, match="state.position must be an integer >= 0, got -1"):
        layer(torch.randn(1, 1, 16), replace(state, position=-1))


def test_plain_reconstruction_instance_is_the_registered_loss():
    """A fresh instance of a registered class is that plugin (no false refusals)."""
    auto, _ = _twins(inner_loss=Reconstruction())
    with torch.no_grad():
        auto(torch.randn(1, 8, 16))
    assert auto.dispatches[0][0] != "torch"


def test_the_overflow_safe_scale_of_an_all_zero_row_is_one():
    # max(high, -low) of a zero row is -0.0, and 2**limit / -0.0 is -inf: the scale must read |values|
    from innerloop.core.functional import overflow_safe_scale

    rows = torch.tensor([[0.0, 0.0, 0.0], [-0.0, 0.0, -0.0], [1.0, -2.0, 0.5]])
    assert torch.equal(overflow_safe_scale(rows), torch.ones(3, 1))
