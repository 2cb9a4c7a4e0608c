"""s55b: plugin paths the docs promised but the code did not keep (--no-ttt with any update rule, the
family members' inner-loss check, the Hugging Face folders' plugin source digests)."""

from __future__ import annotations

import json
import sys
import types
import warnings

import pytest
import torch

from innerloop import HalfSquaredError, LossPairs
from innerloop.core.family_layers import (
    VALUE_MAP_LOSSES,
    DeltaNetLayer,
    GatedDeltaNetLayer,
    LinearAttentionLayer,
    TitansLayer,
    value_map_mismatch,
)
from innerloop.core.layer import TTTLayer
from innerloop.models.ablation import no_test_time_training, weights_moved_at_zero_lr
from innerloop.plugins.optimizers.minibatch_gd import MiniBatchGD
from innerloop.registry import get_registry


class _LrFloorStep(MiniBatchGD):
    """Mini-batch gradient descent at ``lr + 0.5``: a step that does not vanish at inner learning rate 0 (as
    a sign step of fixed size, or a rule with a rate of its own), with its own token-by-token reference."""

    name = "s55b_lr_floor_step"

    def forward(self, state, task, views, lr, tau, **options):
        return super().forward(state, task, views, lr + 0.5, tau, **options)

    def reference(self, state, task, views, lr, tau, **options):
        from innerloop.testing import naive_token_loop

        return naive_token_loop(state, task, views, lr + 0.5, tau, **options)


@pytest.mark.slow  # 0.5 s after the plugins' imports (3 s in a fresh process)
def test_no_test_time_training_refuses_a_rule_that_moves_the_weights_at_lr_0(monkeypatch):
    """The docs said the inner weights stay at the initial ones under --no-ttt "whatever the update rule";
    the ablation set lr 0 and ran the rule, which moved them, silently."""
    # the rule passes the registrar's conformance checks against its reference (17 s here): not under test
    monkeypatch.setattr("innerloop.registry.check_instance", lambda kind, instance: None)
    torch.manual_seed(0)
    layer = TTTLayer(
        16, 2, inner_model="linear", update_rule=_LrFloorStep(), mini_batch_size=4, kernel="torch"
    )
    with (
        pytest.raises(
            ValueError,
            match=r"update rule 's55b_lr_floor_step' .*moves the inner weights at inner "
            r"learning rate 0 \(its weights or its outputs for other keys and values moved by \d",
        ),
        no_test_time_training(layer),
    ):
        pass  # pragma: no cover
    assert layer.base_lr == 1.0  # restored


@pytest.mark.slow  # 0.5 s after the plugins' imports (3 s in a fresh process)
def test_eval_refuses_no_ttt_for_such_a_rule_before_reading_any_window(monkeypatch):
    """innerloop eval's check (before any window is read) names --no-ttt, the checkpoint, the layer and
    the rule, as a one-line ConfigError; the model is left as it was."""
    from innerloop.config.load import ConfigError
    from innerloop.train.run import _refuse_no_ttt_without_ttt

    monkeypatch.setattr("innerloop.registry.check_instance", lambda kind, instance: None)
    layer = TTTLayer(
        16, 2, inner_model="linear", update_rule=_LrFloorStep(), mini_batch_size=4, kernel="torch"
    )
    module = types.SimpleNamespace(model=torch.nn.Sequential(layer))
    with pytest.raises(
        ConfigError,
        match=r"(--no-ttt|no_ttt): 'run/last.safetensors': the TTT layer '0': the update rule 's55b_lr_floor_step'",
    ):
        _refuse_no_ttt_without_ttt(module, "run/last.safetensors", no_ttt=True)
    assert layer.base_lr == 1.0
    _refuse_no_ttt_without_ttt(module, "run/last.safetensors", no_ttt=False)  # nothing measured without it


@pytest.mark.parametrize("rule", ["dual_form", "minibatch_gd", "momentum"])
@pytest.mark.parametrize("model", ["linear", "mlp"])
def test_the_built_in_rules_keep_the_weights_at_lr_0(model, rule):
    torch.manual_seed(0)
    layer = TTTLayer(
        16, 2, inner_model=model, update_rule=rule, mini_batch_size=4, base_lr=0.0, kernel="torch"
    )
    assert weights_moved_at_zero_lr(layer) is None


# -- a Hugging Face folder saved with a plugin whose code changed since: loaded silently --------------------


@pytest.mark.slow  # reason: builds the process registry with an entry point twice, and a folder (~1 s)
@pytest.mark.usefixtures("fresh_global_registry")
def test_a_hugging_face_folder_whose_plugin_code_changed_since_is_warned_of(tmp_path, monkeypatch):
    """Training checkpoints recorded each plugin's source digest (s54l); a Hugging Face folder recorded only
    the plugin's distribution and version, so an editable install's edited plugin loaded it silently."""
    from test_review_s54_s54l import DISTRIBUTION_MODULE, _install, cosine_loss_config

    from innerloop.checkpoints import PluginChangedWarning
    from innerloop.hf.export import to_hugging_face
    from innerloop.hf.modeling import InnerloopForCausalLM
    from innerloop.models import build_model

    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, DISTRIBUTION_MODULE, raising=False)
    _install(tmp_path, "1e-6")
    torch.manual_seed(0)
    to_hugging_face(build_model(cosine_loss_config())).save_pretrained(tmp_path / "hf")
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "review_s54l_cosine" in saved["innerloop_plugin_sources"]["inner_loss"]

    _install(tmp_path, "1e-3")  # the plugin's code edited, its version the same
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        InnerloopForCausalLM.from_pretrained(tmp_path / "hf")
    messages = [str(w.message) for w in caught if issubclass(w.category, PluginChangedWarning)]
    assert len(messages) == 1, messages
    assert "'review_s54l_cosine'" in messages[0] and "its code changed" in messages[0]


def test_a_plugin_whose_source_cannot_be_read_records_no_digest():
    """As docs/training.md says: a class defined by ``exec`` (or in ``python -c``) has no source to digest."""
    from innerloop.checkpoints import plugin_source_digest

    namespace: dict = {"__name__": "s55b_exec_defined"}
    exec("from innerloop import HalfSquaredError\nclass Loss(HalfSquaredError):\n    name = 'x'\n", namespace)
    assert plugin_source_digest(namespace["Loss"]) is None
    assert plugin_source_digest(_LrFloorStep) is not None


# -- Gated DeltaNet took an inner loss by its name and built-in origin, not by what it computes -------------


class _ValueRegression(HalfSquaredError):
    """A third party's 1/2 ||f(k) - v||^2 (the built-in reconstruction under another name)."""

    name = "s55b_value_regression"

    def pairs(self, views, carry):
        return LossPairs(views.key, views.value)


class _ResidualTargets(_ValueRegression):
    """Targets v - k: not the values as given."""

    name = "s55b_residual_targets"

    def pairs(self, views, carry):
        return LossPairs(views.key, views.value - views.key)


class _Huber(_ValueRegression):
    """Huber loss (delta 0.5): its gradient is not of degree 1 in prediction and target."""

    name = "s55b_huber"

    def token_loss(self, prediction, target):
        return torch.nn.functional.huber_loss(prediction, target, reduction="none", delta=0.5).sum(-1)

    def token_loss_grad(self, prediction, target):
        return (prediction - target).clamp(-0.5, 0.5)


@pytest.mark.slow  # reason: two layers built and run in float64, the first use of the family (~0.5 s warm)
def test_gated_deltanet_takes_a_plugin_loss_for_which_its_map_is_exact(monkeypatch):
    """A third-party loss computing reconstruction was refused for its name and origin, which a built-in
    could not be; now the property the map needs is measured, the same for every loss."""
    monkeypatch.setattr("innerloop.registry.check_instance", lambda kind, instance: None)  # not under test
    torch.manual_seed(0)
    mine = GatedDeltaNetLayer(16, 2, inner_loss=_ValueRegression(), kernel="torch").double()
    torch.manual_seed(0)
    builtin = GatedDeltaNetLayer(16, 2, inner_loss="reconstruction", kernel="torch").double()
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    torch.testing.assert_close(mine(x)[0], builtin(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("loss", "reason"),
    [
        (_ResidualTargets(), r"its targets are not the values of their own token as given"),
        (_Huber(), r"its gradient is not of degree 1 in the prediction and target"),
    ],
)
def test_gated_deltanet_refuses_a_loss_that_breaks_its_map_saying_why(monkeypatch, loss, reason):
    monkeypatch.setattr("innerloop.registry.check_instance", lambda kind, instance: None)
    with pytest.raises(
        ValueError, match=rf"GatedDeltaNetLayer got inner_loss='{loss.name}', .*: {reason}.*valid:"
    ):
        GatedDeltaNetLayer(16, 2, inner_loss=loss, kernel="torch")


@pytest.mark.parametrize("name", VALUE_MAP_LOSSES)
def test_the_built_in_value_map_losses_pass_the_measured_check(name):
    assert value_map_mismatch(get_registry().inner_loss(name), 8) is None


@pytest.mark.parametrize(
    ("member", "kind", "name"),
    [
        (DeltaNetLayer, "update_rule", "dual_form"),
        (DeltaNetLayer, "inner_model", "matrix"),
        (LinearAttentionLayer, "inner_loss", "dot_product"),
        (TitansLayer, "update_rule", "momentum"),
    ],
)
def test_a_member_takes_the_registered_object_of_the_plugin_it_fixes(member, kind, name):
    """A member fixing update_rule="dual_form" refused the registered dual_form object itself (compared
    with the string by ==): the same plugin, refused for being given as an object."""
    registered = get_registry().get(kind, name)
    torch.manual_seed(0)
    by_object = member(16, 2, **{kind: registered})
    torch.manual_seed(0)
    by_name = member(16, 2)
    assert getattr(by_object, kind) is getattr(by_name, kind)
    with pytest.raises(
        ValueError, match=rf"{member.__name__} fixes {kind}='{name}', got {kind}=the .*s55b_huber.*_Huber"
    ):
        member(16, 2, **{kind: _Huber()})
