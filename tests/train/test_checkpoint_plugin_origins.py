"""A checkpoint records where each plugin its model uses came from (review s11, M1): loading it where
another plugin (another package, an upgrade) registers the same name warns, naming both; a name no
plugin registers fails naming the plugin and distribution it came from; a checkpoint written before
the record existed loads quietly, as before."""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from plugin_testing import NAME, TargetsAsGiven, TargetsDoubled, class_name, without_key

import innerloop
from innerloop.checkpoints import (
    PLUGINS_KEY,
    CheckpointError,
    PluginChangedWarning,
    load_checkpoint,
    load_model,
    load_training_checkpoint,
    plugin_record,
    recorded_plugins,
    save_checkpoint,
)
from innerloop.models import ModelConfig, build_model
from innerloop.registry import get_registry, hookimpl, manager, reset_registry
from innerloop.train.module import load_module, save_model_checkpoint


def _config() -> ModelConfig:
    return ModelConfig.from_dict(
        {"vocab_size": 64, "hidden_size": 16, "num_layers": 1, "num_heads": 2, "ttt": {"inner_loss": NAME}}
    )


def _save(path: Path) -> Path:
    torch.manual_seed(0)
    return save_model_checkpoint(build_model(_config()), path)


def _plugin_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, PluginChangedWarning)]


def _load_recording(load, path) -> tuple[object, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load(path)
    return loaded, _plugin_warnings(caught)


def test_the_checkpoint_records_each_plugin_with_its_origin(fresh_global_registry, tmp_path) -> None:
    innerloop.register_inner_loss(TargetsAsGiven(), origin="first_pkg (first-dist)")
    path = _save(tmp_path / "c.safetensors")
    assert recorded_plugins(path) == {
        "inner_model": {"linear": {"origin": "builtin:innerloop.plugins.models.linear"}},
        "inner_loss": {NAME: {"origin": "first_pkg (first-dist)", "class": class_name(TargetsAsGiven)}},
        "update_rule": {"dual_form": {"origin": "builtin:innerloop.plugins.optimizers.dual_form"}},
    }
    assert load_checkpoint(path)[PLUGINS_KEY] == recorded_plugins(path)  # in the verified tree


def test_another_plugin_under_the_recorded_name_is_warned_about_once(fresh_global_registry, tmp_path) -> None:
    innerloop.register_inner_loss(TargetsAsGiven(), origin="first_pkg (first-dist)")
    path = _save(tmp_path / "c.safetensors")
    get_registry().remove_plugin("first_pkg (first-dist)")
    innerloop.register_inner_loss(TargetsDoubled(), origin="second_pkg (second-dist)")

    model, messages = _load_recording(load_model, path)
    assert len(messages) == 1, messages
    for part in (
        repr(str(path)),
        f"inner loss {NAME!r}",
        "'first_pkg (first-dist)'",
        "'second_pkg (second-dist)'",
    ):
        assert part in messages[0]
    assert (
        model.config.ttt.inner_loss == NAME
    )  # built, with the plugin registered now: a warning, not an error
    _, again = _load_recording(load_module, path)  # the same file and change: said once
    assert again == []


def test_the_training_checkpoint_loader_warns_too(fresh_global_registry, tmp_path) -> None:
    innerloop.register_inner_loss(TargetsAsGiven(), origin="first_pkg (first-dist)")
    path = _save(tmp_path / "c.safetensors")
    get_registry().remove_plugin("first_pkg (first-dist)")
    innerloop.register_inner_loss(TargetsDoubled(), origin="second_pkg (second-dist)")
    with pytest.warns(PluginChangedWarning):
        tree = load_checkpoint(path)
    # as innerloop train writes one: the run's keys too (what load_training_checkpoint requires)
    tree.update({"pytorch-lightning_version": "2", "loops": {}, "optimizer_states": [], "global_step": 1})
    training = save_checkpoint(tree, tmp_path / "last.safetensors")  # records second_pkg, registered now
    get_registry().remove_plugin("second_pkg (second-dist)")
    innerloop.register_inner_loss(TargetsAsGiven(), origin="third_pkg (third-dist)")
    _, messages = _load_recording(load_training_checkpoint, training)
    assert (
        len(messages) == 1
        and "'second_pkg (second-dist)'" in messages[0]
        and "'third_pkg (third-dist)'" in messages[0]
    )


def test_the_same_plugin_loads_quietly(fresh_global_registry, tmp_path) -> None:
    innerloop.register_inner_loss(TargetsAsGiven(), origin="first_pkg (first-dist)")
    path = _save(tmp_path / "c.safetensors")
    _, messages = _load_recording(load_model, path)
    assert messages == []
    get_registry().remove_plugin("first_pkg (first-dist)")  # registered again, from the same origin
    innerloop.register_inner_loss(TargetsAsGiven(), origin="first_pkg (first-dist)")
    _, messages = _load_recording(load_model, path)
    assert messages == []


def test_a_checkpoint_written_before_the_record_loads_quietly(fresh_global_registry, tmp_path) -> None:
    innerloop.register_inner_loss(TargetsAsGiven(), origin="first_pkg (first-dist)")
    old = without_key(_save(tmp_path / "c.safetensors"), tmp_path / "old.safetensors", PLUGINS_KEY)
    assert recorded_plugins(old) is None
    get_registry().remove_plugin("first_pkg (first-dist)")
    innerloop.register_inner_loss(TargetsDoubled(), origin="second_pkg (second-dist)")
    _, messages = _load_recording(load_model, old)
    assert messages == []
    get_registry().remove_plugin("second_pkg (second-dist)")
    with pytest.raises(CheckpointError) as error:  # the error it always gave, nothing added
        load_model(old)
    assert f"inner_loss={NAME!r} is not a registered inner_loss" in str(error.value)
    assert "when it was saved" not in str(error.value)


class FakeEntryPoint:
    """An installed package's ``innerloop`` entry point (``load`` gives the plugin)."""

    def __init__(self, plugin, version: str) -> None:
        self.name, self.value, self.group = "origins_pkg", "origins_pkg:plugin", "innerloop"
        self.dist = SimpleNamespace(name="origins-dist", version=version)
        self._plugin = plugin

    def load(self):
        return self._plugin


class LossPlugin:
    def __init__(self, loss) -> None:
        self.loss = loss

    @hookimpl
    def register_inner_losses(self, register) -> None:
        register(self.loss)


def _installed(monkeypatch, loss, version: str | None) -> None:
    """Rebuild the registry with the fake package ``origins-dist`` at ``version`` installed (none: not
    installed)."""
    points = [] if version is None else [FakeEntryPoint(LossPlugin(loss), version)]
    monkeypatch.setattr(manager, "_entry_points", lambda: points)
    monkeypatch.delenv(manager.DISABLE_ENV, raising=False)
    monkeypatch.delenv(manager.ALLOW_ENV, raising=False)
    reset_registry()


def test_an_upgraded_distribution_is_warned_about_and_a_missing_one_named(
    fresh_global_registry, monkeypatch, tmp_path
) -> None:
    _installed(monkeypatch, TargetsAsGiven(), "1.0")
    path = _save(tmp_path / "c.safetensors")
    origin = "origins_pkg (origins-dist)"
    assert recorded_plugins(path)["inner_loss"][NAME] == {
        "origin": origin,
        "distribution": "origins-dist",
        "version": "1.0",
    }
    _installed(monkeypatch, TargetsDoubled(), "2.0")  # the same origin, upgraded
    _, messages = _load_recording(load_model, path)
    assert len(messages) == 1
    assert "from distribution 'origins-dist' 1.0" in messages[0]
    assert "from distribution 'origins-dist' 2.0" in messages[0]

    _installed(monkeypatch, TargetsAsGiven(), None)  # uninstalled
    for load in (load_model, load_module):
        with pytest.raises(CheckpointError) as error:
            load(path)
        message = str(error.value)
        assert f"inner_loss={NAME!r} is not a registered inner_loss" in message
        assert f"was registered by plugin {origin!r} from distribution 'origins-dist' 1.0" in message


def test_an_e2e_model_records_its_model_level_plugins(fresh_global_registry) -> None:
    record = plugin_record({"mixer": "e2e"})
    assert set(record) == {"model_inner_loss", "model_update_rule"}
    assert all(
        origin["origin"].startswith("builtin:") for names in record.values() for origin in names.values()
    )
    assert plugin_record({"mixer": "attention"}) == {}  # no plugin by name


def test_holds_training_state_lives_in_the_checkpoint_module(tmp_path) -> None:
    import innerloop.checkpoints as checkpoints
    import innerloop.train.checkpoint as train_checkpoint

    assert train_checkpoint.holds_training_state is checkpoints.holds_training_state
    assert checkpoints.holds_training_state.__doc__
    source = Path(train_checkpoint.__file__).read_text()
    assert "_TREE_KEY" not in source  # no private name of innerloop.checkpoints imported
    path = checkpoints.save_checkpoint({"global_step": 3, "w": torch.ones(1)}, tmp_path / "c.safetensors")
    assert checkpoints.holds_training_state(path)
    assert not checkpoints.holds_training_state(tmp_path / "missing.safetensors")
