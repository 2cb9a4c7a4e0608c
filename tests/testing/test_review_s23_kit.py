"""Review s23: does the plugin testing kit (innerloop.testing) catch broken plugins?

Third-party plugins written as the docs say (registered through ``innerloop.register_<kind>``), first
right ones (the kit must pass them), then broken variants of each kind, run through the kit's checks as
a plugin's own tests would. The passing tests are what the kit does right; each ``xfail(strict=True)``
is a broken plugin the kit passes today (it fails now and passes once the kit catches the plugin).
Findings: /work/notes/review_s23_kit.md."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import find
from hypothesis import strategies as st
from plugin_testing import register_linear_dual_form_kernel

import innerloop
from innerloop import InnerLoss, InnerModel, LossPairs
from innerloop.core.functional import relative_error
from innerloop.kernels.reference import reference_kernel
from innerloop.plugins.losses.reconstruction import Reconstruction
from innerloop.plugins.models.linear import LinearModel
from innerloop.plugins.optimizers.dual_form import DualForm
from innerloop.plugins.optimizers.minibatch_gd import MiniBatchGD
from innerloop.registry.kinds import PluginError
from innerloop.testing import (
    check_inner_loss,
    check_inner_model,
    check_kernel,
    check_update_rule,
    make_problem,
)
from innerloop.testing.strategies import problems, split_points, views

pytestmark = pytest.mark.usefixtures("fresh_global_registry")  # tests/conftest.py


#: One small shape for check_inner_loss / check_inner_model (not PLUGIN_CHECK_SHAPES: fast).
SMALL = {"batch": 2, "heads": 2, "head_dim": 3, "tokens": 9, "mini_batch_size": 4}

#: A check_update_rule of one model, loss and wrapping (it still runs its wide shapes).
ONE_CASE = {"model": "linear", "loss": Reconstruction(), "norm": True, "residual": True}


# ==== inner losses ==================================================================================


class SmoothL1(InnerLoss):
    """README's plugin loss, with its closed-form gradient."""

    name = "s23_smooth_l1"
    delta = 1.0

    def pairs(self, views, carry):
        return LossPairs(views.key, views.value)

    def token_loss(self, prediction, target):
        error = (prediction - target).abs()
        return torch.where(error <= self.delta, 0.5 * error**2, self.delta * (error - 0.5 * self.delta)).sum(
            -1
        )

    def token_loss_grad(self, prediction, target):
        return (prediction - target).clamp(-self.delta, self.delta)


class SmoothL1TwiceTheGradient(SmoothL1):
    name = "s23_smooth_l1_twice"

    def token_loss_grad(self, prediction, target):
        return 2 * super().token_loss_grad(prediction, target)


class _HalfSquaredError(torch.autograd.Function):
    """``0.5 ||p - t||^2`` over the last dim with a hand-written backward, scaled by ``factor``
    (1: right; 2: a gradient twice too large). Works under torch.func (minibatch_gd)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(prediction, target, factor):
        return 0.5 * (prediction - target).pow(2).sum(-1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        prediction, target, factor = inputs
        ctx.save_for_backward(prediction, target)
        ctx.factor = factor

    @staticmethod
    def backward(ctx, grad):
        prediction, target = ctx.saved_tensors
        d = ctx.factor * (prediction - target) * grad.unsqueeze(-1)
        return d, -d, None


class CustomBackwardLoss(InnerLoss):
    """Half squared error through an autograd.Function with a hand-written backward (a user's fused
    loss); no token_loss_grad, so the kit's and the layer's inner gradient is that backward."""

    name = "s23_custom_backward"
    factor = 1.0

    def pairs(self, views, carry):
        return LossPairs(views.key, views.value)

    def token_loss(self, prediction, target):
        return _HalfSquaredError.apply(prediction, target, self.factor)


class DoubledBackwardLoss(CustomBackwardLoss):
    """The same loss whose hand-written backward is twice the true gradient."""

    name = "s23_doubled_backward"
    factor = 2.0


def test_right_plugin_losses_pass_check_inner_loss():
    for loss in (SmoothL1(), CustomBackwardLoss()):
        innerloop.register_inner_loss(loss)
        check_inner_loss(loss, **SMALL)


def test_a_closed_form_gradient_wrong_by_a_factor_is_caught_naming_it():
    with pytest.raises(
        AssertionError, match=r"s23_smooth_l1_twice: token_loss_grad vs autograd of token_loss"
    ):
        check_inner_loss(SmoothL1TwiceTheGradient(), **SMALL)


def test_a_wrong_hand_written_backward_changes_what_the_layer_computes():
    """The defect below is real: the inner step of DoubledBackwardLoss is not gradient descent on its loss."""
    model = LinearModel()
    right = make_problem(model, CustomBackwardLoss(), **SMALL).naive()[0]
    wrong = make_problem(model, DoubledBackwardLoss(), **SMALL).naive()[0]
    assert relative_error(wrong, right) > 1e-2


def test_a_loss_whose_hand_written_backward_is_wrong_fails_check_inner_loss():
    with pytest.raises(PluginError, match="s23_doubled_backward.*token_loss.*finite differences"):
        innerloop.register_inner_loss(DoubledBackwardLoss())
    with pytest.raises(AssertionError, match="s23_doubled_backward.*finite differences"):
        check_inner_loss(DoubledBackwardLoss(), **SMALL)


# ==== inner models ==================================================================================


class _Affine(torch.autograd.Function):
    """``x W + b`` with a hand-written backward; ``bias_grad=False`` leaves out the bias's gradient."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, bias_grad):
        return x @ weight + bias

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, bias_grad = inputs
        ctx.save_for_backward(x, weight, bias)
        ctx.bias_grad = bias_grad

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias = ctx.saved_tensors
        grad_bias = grad.sum_to_size(bias.shape) if ctx.bias_grad else torch.zeros_like(bias)
        grad_x = (grad @ weight.transpose(-1, -2)).sum_to_size(x.shape)
        grad_weight = (x.transpose(-1, -2) @ grad).sum_to_size(weight.shape)
        return grad_x, grad_weight, grad_bias, None


class BiasedLinear(InnerModel):
    """``x W + b`` (no stack: the primal form runs it) with a hand-written backward."""

    name = "s23_biased_linear"
    bias_grad = True

    def param_shapes(self, head_dim):
        return {"W": (head_dim, head_dim), "b": (1, head_dim)}

    def init_params(self, num_heads, head_dim, generator=None):
        weight = torch.randn(num_heads, head_dim, head_dim, generator=generator) * 0.02
        return {"W": weight, "b": torch.zeros(num_heads, 1, head_dim)}

    def forward(self, params, x):
        return _Affine.apply(x, params["W"], params["b"], self.bias_grad)


class BiasGradMissing(BiasedLinear):
    """The same model whose backward misses the bias term."""

    name = "s23_bias_grad_missing"
    bias_grad = False


def test_a_right_plugin_model_with_a_hand_written_backward_passes_check_inner_model():
    innerloop.register_inner_model(BiasedLinear())
    check_inner_model(BiasedLinear(), **SMALL)


def test_a_model_missing_its_bias_gradient_computes_other_numbers():
    """The defect below is real: the bias never trains, the outputs differ."""
    loss = Reconstruction()
    right = make_problem(BiasedLinear(), loss, **SMALL).naive()[0]
    wrong = make_problem(BiasGradMissing(), loss, **SMALL).naive()[0]
    assert relative_error(wrong, right) > 1e-3


def test_a_model_whose_backward_misses_the_bias_term_fails_check_inner_model():
    with pytest.raises(PluginError, match=r"s23_bias_grad_missing.*1 \(weight b\).*finite differences"):
        innerloop.register_inner_model(BiasGradMissing())
    with pytest.raises(AssertionError, match="s23_bias_grad_missing.*finite differences"):
        check_inner_model(BiasGradMissing(), **SMALL)


# ==== update rules ==================================================================================


class GoodGD(MiniBatchGD):
    """A plugin rule that is minibatch_gd under another name."""

    name = "s23_good_gd"


class NoUpdate(DualForm):
    """Vacuity probe: the inner learning rate ignored (no inner update at all)."""

    name = "s23_no_update"

    def forward(self, state, task, views, lr, tau, **options):
        return super().forward(state, task, views, 0 * lr, tau, **options)


class IgnoresPosition(DualForm):
    """Reads the token-index scale from its chunk's start, not from the state's offset in its mini-batch."""

    name = "s23_ignores_position"

    def forward(self, state, task, views, lr, tau, **options):
        if state.offset and tau is not None:
            tau = torch.roll(tau, state.offset)
        return super().forward(state, task, views, lr, tau, **options)


class WrongForLaterRows(DualForm):
    """Wrong only for batch rows past the first, only on a chunk starting inside a mini-batch."""

    name = "s23_wrong_for_later_rows"

    def forward(self, state, task, views, lr, tau, **options):
        if state.offset and views.query.shape[0] > 1:
            lr = torch.cat([lr[:1], 0.9 * lr[1:]])
        return super().forward(state, task, views, lr, tau, **options)


class WrongInFloat32(DualForm):
    """Right in float64; in float32 (what a layer runs by default) its inner lr is 10% off."""

    name = "s23_wrong_in_float32"

    def forward(self, state, task, views, lr, tau, **options):
        if views.query.dtype == torch.float32:
            lr = 0.9 * lr
        return super().forward(state, task, views, lr, tau, **options)


class WrongAtOffsetThree(DualForm):
    """Wrong only for a chunk that starts at offset 3 of a mini-batch of 5 or more tokens."""

    name = "s23_wrong_at_offset_three"

    def forward(self, state, task, views, lr, tau, **options):
        if state.offset == 3 and task.mini_batch_size >= 5:
            lr = 0.9 * lr
        return super().forward(state, task, views, lr, tau, **options)


class SelfReference(DualForm):
    """A wrong forward (half the inner lr) that declares as its reference ... its own forward."""

    name = "s23_self_reference"

    def forward(self, state, task, views, lr, tau, **options):
        return super().forward(state, task, views, 0.5 * lr, tau, **options)

    def reference(self, state, task, views, lr, tau, **options):
        return self.forward(state, task, views, lr, tau, **options)


class MutatesItsState(DualForm):
    """Right values, but it writes its new weights into the state it was given (TTTState is immutable)."""

    name = "s23_mutates_its_state"

    def forward(self, state, task, views, lr, tau, **options):
        out, new = super().forward(state, task, views, lr, tau, **options)
        with torch.no_grad():
            for key, value in state.params.items():
                if not value.requires_grad:
                    value.contiguous().copy_(new.params[key])
        return out, new


def test_a_rule_that_mutates_the_state_it_is_given_is_caught():
    """Caught, and named as what it is: a write into the state the rule was given."""
    with pytest.raises(
        AssertionError, match=r"s23_mutates_its_state .*cut at \[\]: the rule wrote into the state"
    ):
        check_update_rule(MutatesItsState(), **ONE_CASE)


@pytest.mark.slow  # over 0.4 s: the fast loop stays under a minute
def test_a_right_plugin_rule_passes_in_float64_and_float32():
    innerloop.register_update_rule(GoodGD())
    check_update_rule(GoodGD(), **ONE_CASE)
    check_update_rule(GoodGD(), **ONE_CASE, dtype=torch.float32, tolerance=1e-4)


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (
            NoUpdate(),
            r"s23_no_update \(linear, reconstruction, plain, norm=True, residual=True\) vs the naive",
        ),
        (IgnoresPosition(), r"s23_ignores_position .* cut at \[1, "),
        (WrongForLaterRows(), r"s23_wrong_for_later_rows .* cut at \[1, "),
    ],
)
def test_a_broken_rule_is_caught_naming_it_and_the_cuts(rule, message):
    with pytest.raises(AssertionError, match=message):
        check_update_rule(rule, **ONE_CASE)


def test_a_rule_wrong_in_float32_is_caught_when_the_user_asks_for_float32():
    with pytest.raises(AssertionError, match=r"s23_wrong_in_float32 .*relative error"):
        check_update_rule(WrongInFloat32(), **ONE_CASE, dtype=torch.float32, tolerance=1e-4)


@pytest.mark.slow  # check_update_rule in float64 and float32: ~0.45 s
def test_a_rule_wrong_only_in_float32_fails_the_default_check():
    with pytest.raises(PluginError, match="s23_wrong_in_float32.* in float32 vs"):
        innerloop.register_update_rule(WrongInFloat32())
    with pytest.raises(AssertionError, match="s23_wrong_in_float32.* in float32 vs"):
        check_update_rule(WrongInFloat32(), **ONE_CASE)


def test_a_rule_whose_reference_is_its_own_forward_fails_the_check():
    with pytest.raises(PluginError, match="s23_self_reference.*reference called the rule's own forward"):
        innerloop.register_update_rule(SelfReference())
    with pytest.raises(AssertionError, match="s23_self_reference.*reference called the rule's own forward"):
        check_update_rule(SelfReference(), **ONE_CASE)


def test_a_rule_wrong_only_for_chunks_starting_at_offset_three_fails_the_check():
    with pytest.raises(AssertionError, match="s23_wrong_at_offset_three"):
        check_update_rule(WrongAtOffsetThree(), **ONE_CASE)


def test_a_problems_inner_update_is_measurable():
    """make_problem's lr is not so small that an update changes nothing: no update is 10%+ off."""
    problem = make_problem(LinearModel(), Reconstruction(), **SMALL)
    with_update = problem.naive()[0]
    without = make_problem(LinearModel(), Reconstruction(), **SMALL)
    without.lr = torch.zeros_like(without.lr)
    assert relative_error(without.naive()[0], with_update) > 0.1


# ==== strategies ====================================================================================


@pytest.mark.parametrize(
    ("condition", "what"),
    [
        (lambda s: s["tokens"] == 1, "T = 1"),
        (lambda s: s["tokens"] % s["mini_batch_size"] != 0 and s["tokens"] > s["mini_batch_size"], "partial"),
        (lambda s: s["tokens"] < s["mini_batch_size"], "fewer tokens than a mini-batch"),
        (lambda s: s["head_dim"] % 2 == 1 and s["head_dim"] > 1, "odd head dim"),
        (lambda s: s["head_dim"] == 1, "head dim 1"),
        (lambda s: s["batch"] > 2, "batch > 2"),
        (lambda s: s["heads"] > 4, "more than four heads"),
        (lambda s: s["mini_batch_size"] == 1, "mini-batch of one"),
    ],
)
def test_problems_draws_the_edge_cases(condition, what):
    drawn = find(problems(), condition)
    assert condition(drawn), what
    assert drawn["batch"] >= 2  # never batch 1: every check needs a second sequence


def test_views_and_split_points_draw_the_edge_cases():
    assert find(views(), lambda v: v.query.shape[2] == 1).query.shape[2] == 1
    assert find(views(), lambda v: v.query.shape[0] > 1).query.shape[0] > 1
    assert find(split_points(40), lambda c: len(c) >= 3) == sorted(
        set(find(split_points(40), lambda c: len(c) >= 3))
    )
    cuts = find(st.integers(2, 40).flatmap(lambda t: split_points(t).map(lambda c: (t, c))), lambda tc: tc[1])
    assert all(0 < c < cuts[0] for c in cuts[1])


# ==== kernels =======================================================================================

REFERENCE_FORWARD, REFERENCE_DECODE = reference_kernel(LinearModel(), Reconstruction())


def _register_kernel(name: str, forward=REFERENCE_FORWARD, decode=REFERENCE_DECODE) -> str:
    """The torch dual form of (linear, reconstruction, dual_form) as a plugin kernel, with ``forward``
    and ``decode`` in place of the reference's, registered above the built-ins."""

    def chunk(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps):
        return forward(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps)

    def step(xq, xk, xv, lr, tau_i, params, pending, ln_weight, ln_bias, eps, is_last):
        return decode(xq, xk, xv, lr, tau_i, params, pending, ln_weight, ln_bias, eps, is_last)

    return register_linear_dual_form_kernel(name, chunk, decode=step, priority=100)


def from_fourth_mini_batch(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps):
    """Right on a block's first three mini-batches; from the fourth on, half the inner lr."""
    lr = lr.clone()
    lr[:, :, 3 * tau.shape[0] :] *= 0.5
    return REFERENCE_FORWARD(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps)


def odd_head_dims_only(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps):
    lr = 0.5 * lr if xq.shape[-1] % 2 else lr
    return REFERENCE_FORWARD(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps)


def no_update(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps):
    return REFERENCE_FORWARD(xq, xk, xv, 0 * lr, tau, params, ln_weight, ln_bias, eps)


def state_in_float32(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps):
    out, new = REFERENCE_FORWARD(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps)
    return out, {k: v.float() for k, v in new.items()}


def mutates_in_place(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps, always=False):
    """Writes the new weights into a contiguous buffer of the weights it was given, as a compiled kernel
    would: the given tensor itself when it is contiguous (a carried state's), a copy when it is not (a
    fresh state's expanded initial weights). Only without autograd, unless ``always``."""
    out, new = REFERENCE_FORWARD(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps)
    if always or not torch.is_grad_enabled():
        for key, value in params.items():
            value.contiguous().copy_(new[key])
    return out, new


def mutates_in_place_always(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps):
    return mutates_in_place(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps, always=True)


def last_token_of_each_block_off(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps):
    """In float32, the output of each block's last token ~0.01% off (1000 float32 roundings). Not a pure
    scaling of the token's output, which the layer's post-norm would undo (an equivalent mutant)."""
    out, new = REFERENCE_FORWARD(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps)
    if xq.dtype == torch.float32:
        last = out[:, :, -1:]
        out = torch.cat([out[:, :, :-1], last + 0.0001 * last.roll(1, dims=-1)], dim=2)
    return out, new


def decode_off_at_last_token(xq, xk, xv, lr, tau_i, params, pending, ln_weight, ln_bias, eps, is_last):
    out, params, pending = REFERENCE_DECODE(
        xq, xk, xv, lr, tau_i, params, pending, ln_weight, ln_bias, eps, is_last
    )
    return (1.001 * out if is_last else out), params, pending


@pytest.mark.slow  # over 0.4 s: the fast loop stays under a minute
def test_a_right_plugin_kernel_passes_in_float64_and_float32():
    name = _register_kernel("s23_right")
    for dtype in (torch.float64, torch.float32):
        report = check_kernel(name, dtype=dtype)
        assert report.ran and any(case.endswith("decode") for case in report.ran)


@pytest.mark.parametrize(
    ("forward", "decode", "dtype", "message"),
    [
        pytest.param(  # slow: check_kernel runs every case before the family layers' head_dim 5 (1-2 s)
            odd_head_dims_only,
            REFERENCE_DECODE,
            torch.float64,
            r"head_dim 5 \(FamilyLayer\).*out differs",
            marks=pytest.mark.slow,
        ),
        (
            no_update,
            REFERENCE_DECODE,
            torch.float64,
            # the large-rates case runs first (review s56v): it is off there, from a carried state
            r"head_dim 4 \(TTTLayer, base_lr 10.0, the large-rates case.*out differs by a relative RMS error of",
        ),
        (
            no_update,
            REFERENCE_DECODE,
            torch.float32,
            # the large-rates case runs first (review s56v): it is off there, from a carried state
            r"head_dim 4 \(TTTLayer, base_lr 10.0, the large-rates case.*out differs by a relative RMS error of",
        ),
        (
            state_in_float32,
            REFERENCE_DECODE,
            torch.float64,
            r"the large-rates case.*grad: raised RuntimeError: kernel 's23_broken' returned weights\['W1'\] as torch.float32",
        ),
        (mutates_in_place_always, REFERENCE_DECODE, torch.float64, r"grad: .*in-?place operation"),
        (REFERENCE_FORWARD, decode_off_at_last_token, torch.float64, r"split at \[1, 7, 12\].*out differs"),
    ],
)
def test_a_broken_kernel_is_caught_naming_the_case(forward, decode, dtype, message):
    name = _register_kernel("s23_broken", forward=forward, decode=decode)
    with pytest.raises(AssertionError, match=r"check_kernel\('s23_broken'\): .*" + message):
        check_kernel(name, dtype=dtype)


def test_a_kernel_wrong_from_the_fourth_mini_batch_is_chosen_by_auto_and_computes_wrong_numbers():
    """The defect below is real: first-use accepts it (two mini-batches) and a 32-token call is 1% off."""
    name = _register_kernel("s23_from_fourth", forward=from_fourth_mini_batch)
    torch.manual_seed(0)
    reference = innerloop.TTTLayer(12, 3, mini_batch_size=4, kernel="torch").double()
    layer = innerloop.TTTLayer(12, 3, mini_batch_size=4).double()  # kernel="auto"
    layer.load_state_dict(reference.state_dict())
    x = torch.randn(2, 32, 12, dtype=torch.float64)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")
        got = layer(x)[0]
    assert layer.last_dispatch[0] == name
    assert relative_error(got, reference(x)[0]) > 1e-3


@pytest.mark.slow  # check_kernel over its cases: ~0.35 s
def test_a_kernel_wrong_from_the_fourth_mini_batch_fails_check_kernel():
    name = _register_kernel("s23_from_fourth", forward=from_fourth_mini_batch)
    with pytest.raises(AssertionError, match="s23_from_fourth"):
        check_kernel(name)


def test_a_kernel_that_mutates_the_state_it_is_given_is_refused_at_first_use():
    """The defect s23 found (the state a user keeps, a shared prefix or beam search, changed under it: the
    probe ran on private copies) is caught by the first-use check since review s32d: a layer that names the
    kernel gets ``KernelCheckError``, and under ``kernel="auto"`` a reused state stays as it was."""
    from innerloop.kernels.dispatch import KernelCheckError

    name = _register_kernel("s23_mutates", forward=mutates_in_place)
    torch.manual_seed(0)
    layer = innerloop.TTTLayer(12, 3, mini_batch_size=4, kernel=name).double()
    x = torch.randn(2, 12, 12, dtype=torch.float64)
    with torch.no_grad(), pytest.raises(KernelCheckError, match="wrote into what it was given"):
        layer(x[:, :4])
    layer.kernel = "auto"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, state = layer(x[:, :4])
        before = {k: v.clone() for k, v in state.params.items()}
        first, _ = layer(x[:, 4:], state)
        second, _ = layer(x[:, 4:], state)
    assert all(torch.equal(before[k], state.params[k]) for k in before)
    assert torch.equal(first, second)


def test_a_kernel_that_mutates_the_state_it_is_given_fails_check_kernel():
    name = _register_kernel("s23_mutates", forward=mutates_in_place)
    with pytest.raises(AssertionError, match="s23_mutates"):
        check_kernel(name)


def test_a_float32_kernel_off_on_one_token_per_block_fails_check_kernel():
    name = _register_kernel("s23_last_token_off", forward=last_token_of_each_block_off)
    with pytest.raises(AssertionError, match="s23_last_token_off"):
        check_kernel(name, dtype=torch.float32)


def test_a_kernel_returning_weights_in_the_wrong_dtype_is_named_as_such():
    name = _register_kernel("s23_state_in_float32", forward=state_in_float32)
    with pytest.raises(AssertionError, match=r"(?i)s23_state_in_float32.*returned .*(dtype|float32)"):
        check_kernel(name)
