"""Review s16 (the plugin author's journey), the checks: an update rule wrong only when exactly one of
inner_norm / inner_residual is on (H1), one wrong only without autograd (H2), wrong shapes named by the
test helpers as registration names them (M1), a rule's wrong return type or layout named as such (M2),
the contract hint of a rule that declares its own reference (L1), and a model reading sequence 0's
weights named by the batch-independence check (L2). The plugins are the review's wrong ones
(/tmp/s16_author: repro_wrapping.py, repro_nograd.py, losses.py, models.py, mistakes/)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from plugin_testing import One

import innerloop
from innerloop.core.protocol import InnerLoss, InnerModel, LossPairs, UpdateRule
from innerloop.plugins.losses.reconstruction import Reconstruction
from innerloop.plugins.models.mlp import MLPModel
from innerloop.plugins.optimizers.minibatch_gd import MiniBatchGD
from innerloop.registry import PluginError, build_registry
from innerloop.testing import check_inner_loss, check_inner_model, check_update_rule
from innerloop.testing.checks import RaisedWithoutGradError, RuleOutputError
from innerloop.testing.reference import naive_token_loop

#: A cheap check_update_rule: the linear model, one loss, a short call (every wrapping still checked).
CHEAP = {"model": "linear", "loss": Reconstruction(), "gradients": False, "tokens": 7}


@pytest.fixture(scope="module")
def registry():
    return build_registry(include_external=False)


def register(registry, kind: str, plugin) -> None:
    registry.add_plugin(One(kind, plugin), origin=f"test.{plugin.name}")


# ---- H1: the mixed wrappings ------------------------------------------------------------------------


class ResidualIffNorm(MiniBatchGD):
    """Wrong in both mixed wrappings: takes the residual to be on exactly when the LayerNorm is."""

    name = "s16_residual_iff_norm"

    def forward(self, state, task, views, lr, tau, decay=None):
        return super().forward(state, replace(task, residual=task.use_norm), views, lr, tau, decay)


class NoResidualWithoutNorm(MiniBatchGD):
    """Wrong in (norm off, residual on) only: drops the residual when the LayerNorm is off."""

    name = "s16_no_residual_without_norm"

    def forward(self, state, task, views, lr, tau, decay=None):
        if task.residual and not task.use_norm:
            task = replace(task, residual=False)
        return super().forward(state, task, views, lr, tau, decay)


class NoResidualWithNorm(MiniBatchGD):
    """Wrong in (norm on, residual off) only: adds the residual whenever the LayerNorm is on."""

    name = "s16_residual_with_norm"

    def forward(self, state, task, views, lr, tau, decay=None):
        if task.use_norm and not task.residual:
            task = replace(task, residual=True)
        return super().forward(state, task, views, lr, tau, decay)


@pytest.mark.slow  # ~1.1 s for the three: each runs the registry's full checks; moved out of the fast loop, at its one-minute limit
@pytest.mark.parametrize(
    ("rule", "wrapping"),
    [
        (ResidualIffNorm(), "norm=True, residual=False"),
        (NoResidualWithoutNorm(), "norm=False, residual=True"),
        (NoResidualWithNorm(), "norm=True, residual=False"),
    ],
    ids=["both-mixed", "norm-off-residual-on", "norm-on-residual-off"],
)
def test_a_rule_wrong_in_a_mixed_wrapping_is_refused_and_fails_the_check(registry, rule, wrapping):
    with pytest.raises(PluginError, match=rf"{rule.name}.*{wrapping}.*relative error"):
        register(registry, "update_rules", rule)
    assert rule.name not in registry.names("update_rule")
    with pytest.raises(AssertionError, match=rf"{rule.name}.*{wrapping}.*relative error"):
        check_update_rule(rule, **CHEAP)


# ---- H2: the values without autograd ----------------------------------------------------------------


class FastInference(MiniBatchGD):
    """Wrong without autograd: its "fast inference path" ignores the learning rate."""

    name = "s16_fast_inference"

    def forward(self, state, task, views, lr, tau, decay=None):
        if not torch.is_grad_enabled():
            lr = torch.full_like(lr, 0.5)
        return super().forward(state, task, views, lr, tau, decay)


class FastInferenceMode(MiniBatchGD):
    """Wrong under torch.inference_mode only."""

    name = "s16_fast_inference_mode"

    def forward(self, state, task, views, lr, tau, decay=None):
        if torch.is_inference_mode_enabled():
            lr = lr * 0.5
        return super().forward(state, task, views, lr, tau, decay)


class RaisesInInferenceMode(MiniBatchGD):
    """Right where it runs, but raises under torch.inference_mode (as torch.autograd.grad does)."""

    name = "s16_raises_in_inference_mode"

    def check_model(self, model):  # registration checks linear alone: the warning is the same on every model
        return None if model.name == "linear" else "s16: the linear model only"

    def forward(self, state, task, views, lr, tau, decay=None):
        if torch.is_inference_mode_enabled():
            raise RuntimeError("element 0 of tensors does not require grad and does not have a grad_fn")
        return super().forward(state, task, views, lr, tau, decay)


@pytest.mark.parametrize(
    ("rule", "mode"),
    [(FastInference(), r"torch\.no_grad\(\)"), (FastInferenceMode(), r"torch\.inference_mode\(\)")],
    ids=["no_grad", "inference_mode"],
)
def test_a_rule_wrong_without_autograd_is_refused_and_fails_the_check(registry, rule, mode):
    with pytest.raises(PluginError, match=rf"{rule.name}.*under {mode}.*relative error"):
        register(registry, "update_rules", rule)
    with pytest.raises(AssertionError, match=rf"{rule.name}.*under {mode}.*relative error"):
        check_update_rule(rule, **CHEAP)


@pytest.mark.slow  # reason: registers a rule right everywhere it runs: every registration problem, ~2 s
def test_a_rule_raising_in_inference_mode_registers_and_the_check_says_why(registry):
    rule = RaisesInInferenceMode()
    with pytest.warns(innerloop.PluginWarning, match="cannot run without autograd"):
        register(registry, "update_rules", rule)  # loud at use, not wrong numbers: not refused
    assert rule.name in registry.names("update_rule")
    with pytest.raises(RaisedWithoutGradError, match=r"under torch\.inference_mode\(\).*forward raised"):
        check_update_rule(rule, **CHEAP, norm=True, residual=True)


# ---- M1: the test helpers name a wrong shape as registration does -----------------------------------


class TokenLossKeepsFeatures(InnerLoss):
    name = "s16_wrong_shape"

    def pairs(self, views, carry):
        return LossPairs(views.key, views.value)

    def token_loss(self, prediction, target):
        return 0.5 * (prediction - target).pow(2)  # forgot .sum(-1)


class PairsWithoutFeatures(InnerLoss):
    name = "s16_pairs_wrong_shape"

    def pairs(self, views, carry):
        return LossPairs(views.key.sum(-1), views.value)

    def token_loss(self, prediction, target):
        return 0.5 * (prediction - target).pow(2).sum(-1)


class WrongInitShape(MLPModel):
    name = "s16_wrong_init_shape"

    def init_params(self, heads, head_dim, generator=None):
        params = super().init_params(heads, head_dim, generator)
        params["b1"] = params["b1"].reshape(heads, -1)  # [H, 4f] where param_shapes says [H, 1, 4f]
        return params


class DoublesFeatures(InnerModel):
    name = "s16_wrong_out_dim"

    def param_shapes(self, head_dim):
        return {"W": (head_dim, 2 * head_dim)}

    def init_params(self, heads, head_dim, generator=None):
        return {"W": 0.02 * torch.randn(heads, head_dim, 2 * head_dim, generator=generator)}

    def forward(self, params, x):
        return x @ params["W"]


@pytest.mark.parametrize(
    ("plugin", "kind", "check", "message"),
    [
        (
            TokenLossKeepsFeatures(),
            "inner_losses",
            check_inner_loss,
            r"token_loss\(\) must reduce the feature dim to \[B, H, T\] = \(2, 2, 3\); got \(2, 2, 3, 4\)",
        ),
        (
            PairsWithoutFeatures(),
            "inner_losses",
            check_inner_loss,
            r"pairs\(\) must give inputs and targets of shape \[B, H, T, f\] = \(2, 2, 3, 4\); got inputs \(2, 2, 3\)",
        ),
        (
            WrongInitShape(),
            "inner_models",
            check_inner_model,
            r"init_params\(\)\['b1'\] has shape \(2, 16\), param_shapes\(\) says \(2, 1, 16\)",
        ),
        (
            DoublesFeatures(),
            "inner_models",
            check_inner_model,
            r"forward maps \[heads, N, f\] = \(2, 3, 4\) to \(2, 3, 8\); it must return the same shape",
        ),
    ],
    ids=["token_loss", "pairs", "init_params", "forward"],
)
def test_a_wrong_shape_is_named_by_the_helper_as_by_registration(registry, plugin, kind, check, message):
    with pytest.raises(PluginError, match=rf"'{plugin.name}': {message}"):
        register(registry, kind, plugin)
    with pytest.raises(AssertionError, match=rf"'{plugin.name}': {message}"):
        check(plugin)


# ---- M2: an update rule's return type and layout ----------------------------------------------------


class ReturnsOutputsOnly(MiniBatchGD):
    name = "s16_returns_out_only"

    def forward(self, state, task, views, lr, tau, decay=None):
        return super().forward(state, task, views, lr, tau, decay)[0]


class ReturnsTokensFirst(MiniBatchGD):
    name = "s16_wrong_out_shape"

    def forward(self, state, task, views, lr, tau, decay=None):
        outputs, new_state = super().forward(state, task, views, lr, tau, decay)
        return outputs.transpose(1, 2), new_state


class ReturnsWeightsAsState(MiniBatchGD):
    name = "s16_returns_weights"

    def forward(self, state, task, views, lr, tau, decay=None):
        outputs, new_state = super().forward(state, task, views, lr, tau, decay)
        return outputs, new_state.params


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (
            ReturnsOutputsOnly(),
            r"forward must return \(outputs \[B, H, T, f\], TTTState\); got a Tensor of shape \(2, 2, 5, 3\)",
        ),
        (
            ReturnsTokensFirst(),
            r"forward must return outputs of the query's shape \[B, H, T, f\] = \(2, 2, 5, 3\); "
            r"got a Tensor of shape \(2, 5, 2, 3\)",
        ),
        (ReturnsWeightsAsState(), r"forward must return \(outputs, TTTState\); got a dict as the state"),
    ],
    ids=["outputs-only", "tokens-first", "dict-state"],
)
def test_a_rule_returning_the_wrong_type_or_layout_is_named_not_measured(registry, rule, message):
    with pytest.raises(PluginError, match=rf"update rule '{rule.name}': {message}") as refused:
        register(registry, "update_rules", rule)
    assert "relative error" not in str(refused.value)
    with pytest.raises(RuleOutputError, match=rf"update rule '{rule.name}': forward must return"):
        check_update_rule(rule, **CHEAP)


# ---- L1: the contract hint of a rule that declares its own reference ---------------------------------


class DoubledLearningRate(UpdateRule):
    """Declares gradient descent at twice the learning rate as its reference, yet computes plain
    mini-batch GD: wrong against its own reference."""

    name = "s16_doubled_lr"

    def forward(self, state, task, views, lr, tau):
        return MiniBatchGD().forward(state, task, views, lr, tau)

    def reference(self, state, task, views, lr, tau):
        return naive_token_loop(state, task, views, 2 * lr, tau)


def test_a_rule_with_a_reference_is_refused_with_the_reference_hint(registry):
    with pytest.raises(PluginError, match=r"vs its declared reference") as refused:
        register(registry, "update_rules", DoubledLearningRate())
    assert "must compute what that reference computes" in str(refused.value)
    assert "implementation of mini-batch gradient descent" not in str(refused.value)


# ---- L2: a model reading sequence 0's weights ---------------------------------------------------------


class ReadsRowZero(InnerModel):
    name = "s16_row0"

    def param_shapes(self, head_dim):
        return {"W": (head_dim, head_dim)}

    def init_params(self, heads, head_dim, generator=None):
        return {"W": 0.02 * torch.randn(heads, head_dim, head_dim, generator=generator)}

    def forward(self, params, x):
        weights = params["W"]
        if weights.dim() > 3:  # [B, H, f, f]: every sequence reads sequence 0's weights
            weights = weights[:1].expand_as(weights)
        return x @ weights


def test_a_model_reading_sequence_zero_is_named_by_the_batch_check():
    with pytest.raises(
        AssertionError, match=r"s16_row0: forward of sequence 1 in a batch of 3 vs the sequence alone"
    ):
        check_inner_model(ReadsRowZero(), tokens=7)
