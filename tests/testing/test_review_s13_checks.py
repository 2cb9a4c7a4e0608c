"""Review s13 (the user journey), innerloop.testing: check_update_rule without a model checks every
model a rule accepts (and problems() can draw the model), float validity weights compare within
FLOAT64_TOLERANCE, problems() leaves out the degenerate head dim 2, the loss gradient is probed at a
zero error, and the default checks reach a 150-token call and five heads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import innerloop
from innerloop import get_registry
from innerloop.core.protocol import HalfSquaredError, InnerLoss, LossPairs, Views
from innerloop.plugins.models.linear import LinearModel
from innerloop.plugins.optimizers.dual_form import DualForm
from innerloop.registry import isolated_registry
from innerloop.testing import check_inner_loss, check_update_rule, checks
from innerloop.testing.checks import (
    check_loss_gradient,
    check_pairs_chunk_invariant,
    check_pairs_token_by_token,
)
from innerloop.testing.strategies import problems


class LinearOnly(DualForm):
    """Right on ``linear`` only: halves the learning rate on every other model."""

    name = "linear_only_check"

    def forward(self, state, task, views, lr, tau, decay=None):
        if task.model.name != "linear":
            lr = lr * 0.5
        return super().forward(state, task, views, lr, tau, decay)


# ---- H1: every model the rule accepts ---------------------------------------------------------------


def test_check_update_rule_without_a_model_checks_every_model_it_accepts():
    with pytest.raises(AssertionError, match=r"linear_only_check \((matrix|mlp), "):
        check_update_rule(
            LinearOnly(), loss=get_registry().inner_loss("reconstruction"), gradients=False, tokens=7
        )


def test_check_update_rule_takes_a_registered_model_by_name():
    with pytest.raises(AssertionError, match=r"linear_only_check \(mlp, "):
        check_update_rule(
            LinearOnly(), "mlp", get_registry().inner_loss("reconstruction"), gradients=False, tokens=7
        )
    with pytest.raises(ValueError, match="unknown inner model 'no_such_model'"):
        check_update_rule(LinearOnly(), "no_such_model")


@pytest.mark.slow  # reason: hypothesis over up to 20 drawn problems
def test_problems_can_draw_the_model_and_the_readme_pattern_catches_a_linear_only_rule():
    # no shrink phase: the first failing example is the catch this asserts; shrinking it ran the check
    # some 15 times more (7.7 s of CPU, 2.2 s without), and the message names the model either way
    phases = (Phase.explicit, Phase.reuse, Phase.generate)

    @given(shape=problems(inner_models=("linear", "mlp"), max_tokens=8), seed=st.integers(0, 3))
    @settings(
        max_examples=20,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow],
        phases=phases,
    )
    def property_test(shape, seed):
        check_update_rule(
            LinearOnly(),
            loss=get_registry().inner_loss("reconstruction"),
            seed=seed,
            gradients=False,
            norm=True,
            residual=True,
            **shape,
        )

    with pytest.raises(AssertionError, match=r"linear_only_check \(mlp, "):
        property_test()


# ---- M4: float validity weights ---------------------------------------------------------------------


class Weighted(HalfSquaredError):
    """A weight per pair from a reduction over the features (an ulp apart on a slice and the whole)."""

    name = "weighted_pairs"

    def pairs(self, views, carry):
        return LossPairs(views.key, views.value, valid=torch.sigmoid(views.key.sum(-1)))


class WrongMask(HalfSquaredError):
    """A bool mask that depends on the chunk (its first token is always invalid): wrong when cut."""

    name = "wrong_mask"

    def pairs(self, views, carry):
        valid = torch.ones(views.key.shape[:-1], dtype=torch.bool)
        valid[..., 0] = False
        return LossPairs(views.key, views.value, valid=valid)


def random_views(tokens: int = 9, head_dim: int = 5) -> Views:
    generator = torch.Generator().manual_seed(0)
    return Views(
        *(torch.randn(2, 3, tokens, head_dim, generator=generator, dtype=torch.float64) for _ in range(3))
    )


@pytest.mark.slow  # reason: check_inner_loss at both default shapes
def test_float_weights_per_pair_pass_the_chunk_checks():
    views = random_views()
    check_pairs_token_by_token(Weighted(), views, {})
    check_pairs_chunk_invariant(Weighted(), views, {}, cut=4)
    check_inner_loss(Weighted(), tokens=9)


def test_a_bool_mask_is_still_compared_exactly():
    with pytest.raises(AssertionError, match=r"validity chunked at 4: relative error .* > 0\.0e\+00"):
        check_pairs_chunk_invariant(WrongMask(), random_views(), {}, cut=4, tolerance=1.0)


# ---- L4: head dim 2 ----------------------------------------------------------------------------------


class NormalizedReconstruction(HalfSquaredError):
    name = "normalized_reconstruction"

    def pairs(self, views, carry):
        return LossPairs(F.normalize(views.key, dim=-1), F.normalize(views.value, dim=-1))


@pytest.mark.slow  # reason: check_inner_loss on 8 drawn shapes
def test_problems_draws_no_head_dim_two_and_a_normalized_loss_passes_at_what_it_draws():
    @given(shape=problems(max_tokens=9, max_heads=2))
    @settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    def property_test(shape):
        assert shape["head_dim"] != 2
        check_inner_loss(NormalizedReconstruction(), **shape)

    property_test()


def test_the_checks_refuse_head_dim_two_saying_why():
    with pytest.raises(ValueError, match="head_dim must be 1 or at least 3 here, got 2: .*LayerNorm"):
        check_inner_loss(NormalizedReconstruction(), head_dim=2)


# ---- L1: the gradient at prediction == target --------------------------------------------------------


class NormLoss(InnerLoss):
    name = "norm_loss_check"

    def pairs(self, views, carry):
        return LossPairs(views.key, views.value)

    def token_loss(self, prediction, target):
        return (prediction - target).norm(dim=-1)


def test_check_loss_gradient_probes_a_zero_error():
    target = torch.randn(4, 3, dtype=torch.float64)
    prediction = target + torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(AssertionError, match=r"norm_loss_check: .* not finite where prediction == target"):
        check_loss_gradient(NormLoss(), prediction, target)
    check_loss_gradient(Weighted(), prediction, target)  # a squared error is fine there


# ---- L3: a long call and five heads -------------------------------------------------------------------


class LongCallOnly(DualForm):
    """Wrong past 48 tokens in one call (an internal block that loses half the step after it)."""

    name = "long_call_only"

    def forward(self, state, task, views, lr, tau, decay=None):
        if lr.shape[2] > 48:
            lr = torch.cat([lr[:, :, :48], 0.5 * lr[:, :, 48:]], dim=2)
        return super().forward(state, task, views, lr, tau, decay)


class FourHeadsOnly(DualForm):
    """Wrong past the fourth head."""

    name = "four_heads_only"

    def forward(self, state, task, views, lr, tau, decay=None):
        if lr.shape[1] > 4:
            lr = torch.cat([lr[:, :4], 0.5 * lr[:, 4:]], dim=1)
        return super().forward(state, task, views, lr, tau, decay)


@pytest.mark.slow  # reason: the naive token loop over a 150-token call
@pytest.mark.parametrize("rule", [LongCallOnly(), FourHeadsOnly()], ids=lambda r: r.name)
def test_check_update_rule_reaches_a_long_call_and_five_heads(rule):
    long_shape = getattr(checks, "LONG_CHECK_SHAPE", {"tokens": 0, "heads": 0})
    assert long_shape["tokens"] > 64 and long_shape["heads"] >= 5
    with pytest.raises(AssertionError, match=rf"{rule.name} \(linear, reconstruction, .*cut at \[\]"):
        check_update_rule(rule, model="linear", gradients=False)


class PluginLinear(LinearModel):
    """A third-party inner model (the linear one under another name), registered in the process."""

    name = "plugin_linear_for_checks"


class PluginModelOnly(DualForm):
    """Accepts the plugin model only."""

    name = "plugin_model_only_check"

    def check_model(self, model):
        return None if model.name == PluginLinear.name else "written for plugin_linear_for_checks only"


def test_check_update_rule_defaults_to_the_builtin_models_not_whatever_else_is_installed():
    """What a plugin's tests check by default must not depend on the other plugins installed: like
    registration, the default is the built-in models; a plugin's model is checked when named."""
    with isolated_registry():
        innerloop.register_inner_model(PluginLinear())
        with pytest.raises(ValueError, match="accepts none of the built-in inner models"):
            check_update_rule(PluginModelOnly(), gradients=False)
        loss = get_registry().inner_loss("reconstruction")
        check_update_rule(PluginModelOnly(), PluginLinear.name, loss, gradients=False, tokens=7)
