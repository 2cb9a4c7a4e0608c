"""The plugin a checkpoint or export records is compared by what it is, not by the order things were
registered in (review of s11 regressions, M3): a plugin registered in the process is recorded with its
class, and the same class under the same name loads quietly in a process that registered other things
(or nothing else) first; another class under the name still warns, naming both classes."""

from __future__ import annotations

import warnings

import pytest
import torch

import innerloop
from innerloop import HalfSquaredError, LossPairs
from innerloop.checkpoints import (
    PluginChangedWarning,
    load_model,
    recorded_plugins,
    same_plugin,
    warn_changed_plugins,
)
from innerloop.hf import InnerloopForCausalLM
from innerloop.hf.export import export_model
from innerloop.models import ModelConfig, build_model
from innerloop.registry import get_registry, reset_registry
from innerloop.train.module import save_model_checkpoint

FIRST, SECOND = "stable_origin_first", "stable_origin_second"


class NamedLoss(HalfSquaredError):
    """One class, several instances under other names (a family of losses)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def pairs(self, views, carry):
        return LossPairs(inputs=views.key, targets=views.value, valid=None, carry={})


class OtherNamedLoss(NamedLoss):
    """Another class under the same names, with other math."""

    def pairs(self, views, carry):
        return LossPairs(inputs=views.key, targets=2 * views.value, valid=None, carry={})


CLASS = f"{__name__}.NamedLoss"
OTHER_CLASS = f"{__name__}.OtherNamedLoss"


def _model():
    config = {"vocab_size": 64, "hidden_size": 16, "num_layers": 1, "num_heads": 2}
    torch.manual_seed(0)
    return build_model(ModelConfig.from_dict({**config, "ttt": {"inner_loss": SECOND}}))


def _plugin_warnings(load, *args) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load(*args)
    return [str(w.message) for w in caught if issubclass(w.category, PluginChangedWarning)]


def _register_both() -> None:
    """As a process that registers a sibling first: the second instance gets ``module.Class:name``."""
    innerloop.register_inner_loss(NamedLoss(FIRST))
    innerloop.register_inner_loss(NamedLoss(SECOND))


@pytest.mark.slow  # ~0.8 s: over the fast loop's 0.4 s per test
def test_the_same_class_loads_quietly_whatever_was_registered_first(fresh_global_registry, tmp_path) -> None:
    _register_both()
    path = save_model_checkpoint(_model(), tmp_path / "c.safetensors")
    assert recorded_plugins(path)["inner_loss"][SECOND] == {"origin": f"{CLASS}:{SECOND}", "class": CLASS}
    reset_registry()
    innerloop.register_inner_loss(NamedLoss(SECOND))  # alone: its origin is now plain module.Class
    assert get_registry().entries("inner_loss")[-1].origin == CLASS
    assert _plugin_warnings(load_model, path) == []

    reset_registry()
    innerloop.register_inner_loss(OtherNamedLoss(SECOND))
    messages = _plugin_warnings(load_model, path)
    assert len(messages) == 1, messages
    assert f"plugin '{CLASS}:{SECOND}'" in messages[0] and f"plugin {OTHER_CLASS!r}" in messages[0]


def test_an_export_from_another_registration_order_loads_quietly(fresh_global_registry, tmp_path) -> None:
    _register_both()
    folder = export_model(_model(), tmp_path / "exported", tokenizer=None)
    reset_registry()
    innerloop.register_inner_loss(NamedLoss(SECOND))
    assert _plugin_warnings(InnerloopForCausalLM.from_pretrained, folder) == []
    reset_registry()
    innerloop.register_inner_loss(OtherNamedLoss(SECOND))
    assert len(_plugin_warnings(InnerloopForCausalLM.from_pretrained, folder)) == 1


def test_another_class_under_the_same_explicit_origin_warns(fresh_global_registry) -> None:
    record = {"inner_loss": {SECOND: {"origin": "my_pkg", "class": CLASS}}}
    innerloop.register_inner_loss(OtherNamedLoss(SECOND), origin="my_pkg")
    messages = _plugin_warnings(warn_changed_plugins, "'explicit'", record)
    assert len(messages) == 1, messages
    assert f"plugin 'my_pkg' (class {CLASS!r})" in messages[0]
    assert f"plugin 'my_pkg' (class {OTHER_CLASS!r})" in messages[0]


def test_a_record_without_the_class_matches_its_default_origin(fresh_global_registry) -> None:
    """Records written before the class was (innerloop at f644ecb) hold the origin alone."""
    innerloop.register_inner_loss(NamedLoss(SECOND))
    for origin in (f"{CLASS}:{SECOND}", CLASS):
        record = {"inner_loss": {SECOND: {"origin": origin}}}
        assert _plugin_warnings(warn_changed_plugins, f"'old {origin}'", record) == []
    record = {"inner_loss": {SECOND: {"origin": f"{OTHER_CLASS}:{SECOND}"}}}
    assert len(_plugin_warnings(warn_changed_plugins, "'old other'", record)) == 1


def test_same_plugin_compares_distributions_builtins_and_classes() -> None:
    installed = {"origin": "ep (dist)", "distribution": "dist", "version": "1.0"}
    assert same_plugin("x", installed, {**installed, "origin": "renamed (dist)"})
    assert not same_plugin("x", installed, {**installed, "version": "2.0"})
    assert not same_plugin("x", installed, {"origin": "ep (dist)", "class": CLASS})  # not installed now
    builtin = {"origin": "builtin:innerloop.plugins.losses.reconstruction"}
    assert same_plugin("x", builtin, dict(builtin))
    assert not same_plugin("x", builtin, {"origin": "builtin:innerloop.plugins.losses.other"})
    assert not same_plugin("x", builtin, {"origin": CLASS, "class": CLASS})
    assert same_plugin("x", {"origin": "a", "class": CLASS}, {"origin": "b", "class": CLASS})
    assert not same_plugin("x", {"origin": "a", "class": CLASS}, {"origin": "a", "class": OTHER_CLASS})
