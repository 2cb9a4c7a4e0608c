"""Plugins a third-party user may write wrongly are refused or named (review s11): losses and models
that mix the sequences of a batch, NaN gradients, names a config cannot choose, models that hard-code
the heads or head dim, plugin errors at runtime, NaNs made by a plugin, hooks that raise, and external
plugins switched off."""

from __future__ import annotations

import pytest
import torch
from plugin_testing import One

import innerloop
from innerloop import HalfSquaredError, InnerLoss, InnerModel, LossPairs
from innerloop.plugins.models.linear import LinearModel
from innerloop.plugins.optimizers.dual_form import DualForm
from innerloop.registry import PluginError, build_registry, hookimpl
from innerloop.testing import check_inner_loss, check_inner_model, check_update_rule


@pytest.fixture(scope="module")
def registry():
    return build_registry(include_external=False)


def refused(registry, kind: str, obj, match: str) -> None:
    with pytest.raises(PluginError, match=match):
        registry.add_plugin(One(kind, obj), origin=f"test.{type(obj).__name__}")
    kind_name = {"inner_losses": "inner_loss", "inner_models": "inner_model"}[kind]
    assert obj.name not in registry.names(kind_name)


# ---- H2: sequences of a batch mixed ------------------------------------------------------------


class BatchMixing(HalfSquaredError):
    """Targets centred over the batch (dim 0 for dim 2): a sequence depends on the others."""

    name = "batch_mixing"

    def pairs(self, views, carry):
        return LossPairs(views.key, views.value - views.value.mean(dim=0, keepdim=True))


class BatchMixingModel(LinearModel):
    name = "batch_mixing_model"

    def forward(self, params, x):
        out = super().forward(params, x)
        return out - out.mean(dim=0, keepdim=True) if out.dim() == 4 else out


def test_a_loss_that_mixes_the_sequences_of_a_batch_is_refused_naming_it(registry):
    refused(registry, "inner_losses", BatchMixing(), r"'batch_mixing'.*sequence 0's pairs in a batch of 2")
    with pytest.raises(AssertionError, match="must not depend on the other sequences of the batch"):
        check_inner_loss(BatchMixing())


def test_a_model_that_mixes_the_sequences_of_a_batch_is_refused_naming_it(registry):
    with pytest.raises(PluginError, match=r"'batch_mixing_model'.*forward of sequence 0 in a batch of 2"):
        registry.add_plugin(One("inner_models", BatchMixingModel()), origin="test.mixing_model")
    with pytest.raises(AssertionError, match="must not depend on the other sequences of the batch"):
        check_inner_model(BatchMixingModel(), batch=2, tokens=5)


# ---- M5: NaN is not "zero" ---------------------------------------------------------------------


def loss_with(name: str, **methods) -> InnerLoss:
    body = {"name": name, "pairs": lambda self, v, c: LossPairs(v.key, v.value)}
    body.setdefault("token_loss", lambda self, p, t: 0.5 * (p - t).pow(2).sum(-1))
    body.update(methods)
    return type(name, (InnerLoss,), body)()


@pytest.mark.parametrize(
    "loss",
    [
        loss_with("nan_grad", token_loss_grad=lambda s, p, t: (p - t) * float("nan")),
        loss_with("nan_loss", token_loss=lambda s, p, t: (p - t).pow(2).sum(-1) * float("nan")),
    ],
)
def test_a_nan_gradient_or_loss_is_refused_as_non_finite(registry, loss):
    refused(
        registry,
        "inner_losses",
        loss,
        r"non-finite values \(NaN\) (at a finite point|for finite predictions)",
    )


class NanModel(LinearModel):
    name = "nan_model"

    def forward(self, params, x):
        return super().forward(params, x) * float("nan")


def test_a_model_with_a_nan_forward_is_refused_as_non_finite(registry):
    refused(registry, "inner_models", NanModel(), r"'nan_model'.*non-finite \(NaN\)")


# ---- M6: names a config cannot choose back --------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["1e3", "true", "on", "null", "~", "0x10", "1_000", "${oops}", "a=b", "a\tb", "a\nb", "Yes"]
)
def test_a_name_a_config_reads_as_another_value_is_refused_with_the_rule(registry, name):
    loss = loss_with("odd")
    loss.name = name
    with pytest.raises(PluginError, match=r"cannot be chosen from a config.*letters, digits, inner spaces"):
        registry.add_plugin(One("inner_losses", loss), origin="test.odd_name")


@pytest.mark.parametrize("name", ["huber-2", "my.loss", "org/loss", "v1:loss", "nan", "x1", "2", "my loss"])
def test_names_a_config_reads_back_are_accepted(registry, name):
    loss = loss_with("fine")
    loss.name = name
    registry.add_plugin(One("inner_losses", loss), origin=f"test.fine.{name}")
    assert name in registry.names("inner_loss")


# ---- M4: hard-coded heads or head dim, runtime errors named ---------------------------------------


class TwoHeads(InnerModel):
    name = "two_heads"

    def param_shapes(self, f):
        return {"W": (f, f)}

    def init_params(self, heads, f, generator=None):
        return {"W": 0.1 * torch.randn(2, f, f, generator=generator)}

    def forward(self, params, x):
        return x @ params["W"]


class RaisesOnLongChunks(HalfSquaredError):
    name = "raises_on_long_chunks"

    def pairs(self, views, carry):
        if views.key.shape[2] > 8:
            raise RuntimeError("boom from my plugin")
        return LossPairs(views.key, views.value)


def test_a_model_that_hard_codes_the_heads_fails_at_construction_naming_it(fresh_global_registry):
    innerloop.register_inner_model(TwoHeads(), origin="twoplug")
    innerloop.TTTLayer(4, 2, inner_model="two_heads", update_rule="minibatch_gd")  # the registrar's H
    with pytest.raises(
        ValueError,
        match=r"inner model 'two_heads' \(origin 'twoplug'\): init_params\(4, 2\)\['W'\] has shape "
        r"\(2, 2, 2\), expected \(4, 2, 2\)",
    ):
        innerloop.TTTLayer(8, 4, inner_model="two_heads", update_rule="minibatch_gd")


def test_an_error_raised_by_a_plugin_at_runtime_keeps_its_type_and_names_the_plugin(fresh_global_registry):
    innerloop.register_inner_loss(RaisesOnLongChunks())
    layer = innerloop.TTTLayer(8, 2, inner_loss="raises_on_long_chunks")
    with pytest.raises(RuntimeError, match="boom from my plugin") as raised:
        layer(torch.randn(1, 12, 8))
    notes = " ".join(getattr(raised.value, "__notes__", [str(raised.value)]))
    assert "inner loss 'raises_on_long_chunks'" in notes and "RaisesOnLongChunks.pairs" in notes


# ---- M3: a NaN made by a plugin is not called an overflow -------------------------------------------


class LogOfTargetLoss(InnerLoss):
    """The half squared error times ``1 + 0 * log(sum |y|)``: finite wherever a target is nonzero (so
    registration, on random targets, accepts it), NaN on an all-zero input row (``0 * log 0``).

    (This test used ``||p - y||``, whose gradient is NaN where ``p == y``; registration now refuses
    that loss, see tests/registry/test_review_s13_registration.py.)"""

    name = "log_of_target_loss"

    def pairs(self, views, carry):
        return LossPairs(views.key, views.value)

    def token_loss(self, p, y):
        return 0.5 * (p - y).pow(2).sum(-1) * (1 + 0 * y.abs().sum(-1).log())


def test_a_nan_from_a_plugin_on_small_input_names_the_plugins_not_overflow(fresh_global_registry):
    innerloop.register_inner_loss(LogOfTargetLoss(), origin="logplug")
    layer = innerloop.TTTLayer(8, 2, inner_loss="log_of_target_loss")
    with pytest.raises(ValueError, match="non-finite outputs") as raised:
        layer(torch.zeros(1, 8, 8))
    message = str(raised.value)
    assert "overflowed" not in message
    assert "inner loss 'log_of_target_loss' (origin 'logplug')" in message
    assert "update rule 'dual_form'" in message


# ---- M2: shapes of the shipped checks -------------------------------------------------------------


class HardCodedF(HalfSquaredError):
    name = "hard_coded_f"

    def pairs(self, views, carry):
        mask = torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=views.value.dtype)
        return LossPairs(views.key, views.value * mask)


class ThirdSequence(DualForm):
    """Right for batches of 1 and 2 only (an indexing slip)."""

    name = "third_sequence"

    def forward(self, state, task, views, lr, tau, decay=None):
        if lr.shape[0] > 2:
            lr = torch.cat([lr[:2], 0.5 * lr[2:]])
        return super().forward(state, task, views, lr, tau, decay)


def test_check_inner_loss_by_default_runs_a_head_dim_other_than_four():
    with pytest.raises(RuntimeError, match="must match the size"):
        check_inner_loss(HardCodedF())
    check_inner_loss(HardCodedF(), head_dim=4, tokens=9)  # the shape arguments are taken


def test_check_inner_loss_refuses_a_batch_of_one_naming_the_argument():
    with pytest.raises(ValueError, match=r"batch must be an int >= 2, got 1"):
        check_inner_loss(HardCodedF(), batch=1)


def test_check_update_rule_by_default_catches_a_rule_wrong_for_the_third_sequence():
    with pytest.raises(AssertionError, match="third_sequence"):
        check_update_rule(ThirdSequence(), gradients=False)


# ---- L1, L2: a hook that raises, external plugins switched off ------------------------------------


class ExplodingHook:
    @hookimpl
    def register_inner_losses(self, register):
        raise RuntimeError("my plugin's hook exploded")


def test_an_error_raised_by_a_registration_hook_names_the_plugin(registry):
    with pytest.raises(RuntimeError, match="exploded") as raised:
        registry.add_plugin(ExplodingHook(), origin="boomplug")
    notes = " ".join(getattr(raised.value, "__notes__", [str(raised.value)]))
    assert "plugin 'boomplug'" in notes


def test_a_missing_name_says_external_plugins_are_switched_off(registry, monkeypatch):
    monkeypatch.setenv("INNERLOOP_DISABLE_EXTERNAL_PLUGINS", "1")
    with pytest.raises(ValueError, match=r"External \(entry-point\) plugins are switched off"):
        registry.get("inner_model", "rv_sin_mlp")
    assert "switched off" in registry.broken_hint("inner_model", "rv_sin_mlp")  # what configs show
    monkeypatch.delenv("INNERLOOP_DISABLE_EXTERNAL_PLUGINS")
    monkeypatch.setenv("INNERLOOP_PLUGINS", "other")
    assert "Only the entry-point plugins ['other'] are loaded" in registry.broken_hint("inner_model", "x")
