"""Review s52a: a checkpoint records the settings of each plugin object its model uses (``Huber(delta=2.0)``
registered under a name), and a load where the same plugin is registered under that name with other
settings is refused, naming the plugin and both settings: it evaluated with other numbers, silently (the
logits of a tiny model differed by 0.06, no warning). Every save path records them (innerloop's
safetensors checkpoints, ``save_pretrained``/``innerloop export``, and a pickled Lightning ``.ckpt``,
which recorded no plugin at all) and every load path checks them."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch
from test_review_s51_s51b import _PREFIX, plugin_folders  # noqa: F401  (a fixture)

import innerloop
from innerloop import HalfSquaredError, LossPairs
from innerloop.checkpoints import (
    PLUGINS_KEY,
    PluginChangedWarning,
    PluginSettingsError,
    load_model,
    plugin_settings,
    recorded_plugins,
)
from innerloop.models import ModelConfig, build_model
from innerloop.registry import get_registry

NAME = "s52a_scaled_targets"
ORIGIN = "s52a_pkg"


class ScaledTargets(HalfSquaredError):
    """A plugin loss with a setting kept as a plain attribute: the key view reconstructs ``scale * value``."""

    name = NAME

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    def pairs(self, views, carry):
        return LossPairs(inputs=views.key, targets=self.scale * views.value, valid=None, carry={})


@dataclasses.dataclass
class DataclassScaled(ScaledTargets):
    """The same loss as a dataclass: its fields are its settings."""

    scale: float = 1.0
    cache: torch.Tensor | None = None  # not a plain value: not a setting


class DeclaredScaled(ScaledTargets):
    """The same loss declaring its settings (a counter it keeps is not one)."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__(scale)
        self.calls = 0

    def settings(self):
        return {"scale": self.scale}


def _config(inner_loss: str = NAME) -> ModelConfig:
    """A tiny TTT model config whose inner loss is the plugin ``inner_loss``."""
    return ModelConfig.from_dict(
        {
            "vocab_size": 64,
            "hidden_size": 16,
            "num_layers": 1,
            "num_heads": 2,
            "ttt": {"inner_loss": inner_loss},
        }
    )


def _register(loss, origin: str = ORIGIN) -> None:
    """Register ``loss`` from ``origin``, after removing what ``origin`` registered before."""
    if any(entry.origin == origin for entry in get_registry().entries()):
        get_registry().remove_plugin(origin)
    innerloop.register_inner_loss(loss, origin=origin)


def _saved(tmp_path, loss):
    from innerloop.train.module import save_model_checkpoint

    _register(loss)
    torch.manual_seed(0)
    return save_model_checkpoint(build_model(_config()), tmp_path / "c.safetensors")


@pytest.mark.parametrize(
    ("loss", "settings"),
    [
        (ScaledTargets(2.0), {"scale": 2.0}),
        (DataclassScaled(2.0, torch.zeros(1)), {"scale": 2.0}),
        (DeclaredScaled(2.0), {"scale": 2.0}),
    ],
)
def test_a_checkpoint_records_a_plugins_settings(fresh_global_registry, tmp_path, loss, settings) -> None:
    path = _saved(tmp_path, loss)
    assert recorded_plugins(path)["inner_loss"][NAME]["settings"] == settings
    assert "settings" not in recorded_plugins(path)["update_rule"]["dual_form"]  # built in, no settings


@pytest.mark.parametrize("cls", [DataclassScaled, DeclaredScaled])
def test_the_same_plugin_with_other_settings_is_refused(fresh_global_registry, tmp_path, cls) -> None:
    path = _saved(tmp_path, cls(2.0))
    _register(cls(1.0))
    with pytest.raises(PluginSettingsError) as error:
        load_model(path)
    message = str(error.value)
    for part in (
        repr(str(path)),
        f"inner loss {NAME!r}",
        "'scale': 2.0",
        "'scale': 1.0",
        "differing in 'scale'",
        "Register",
    ):
        assert part in message, message
    assert "\n" not in message


def test_the_same_settings_load_quietly_and_a_counter_is_not_a_setting(
    fresh_global_registry, tmp_path
) -> None:
    loss = DeclaredScaled(2.0)
    path = _saved(tmp_path, loss)
    loss.calls = 7  # a counter the plugin keeps: not declared, not compared
    _register(DeclaredScaled(2.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginChangedWarning)
        assert load_model(path).config.ttt.inner_loss == NAME


def test_a_checkpoint_without_settings_loads_as_before(fresh_global_registry, tmp_path) -> None:
    from plugin_testing import without_key  # noqa: F401  (the helper of older files; here: no settings key)

    path = _saved(tmp_path, ScaledTargets(2.0))
    record = recorded_plugins(path)
    del record["inner_loss"][NAME]["settings"]
    from innerloop.checkpoints import load_checkpoint, save_checkpoint

    tree = load_checkpoint(path)
    tree[PLUGINS_KEY] = record
    _register(ScaledTargets(1.0))
    older = save_checkpoint(tree, tmp_path / "older.safetensors")  # re-records what is registered now
    assert recorded_plugins(older)["inner_loss"][NAME]["settings"] == {"scale": 1.0}


def test_declared_settings_must_be_plain_values() -> None:
    class Bad(DeclaredScaled):
        def settings(self):
            return {"weights": torch.ones(2)}

    with pytest.raises(TypeError, match="settings\\(\\) gave .*plain values"):
        plugin_settings(Bad())
    assert plugin_settings(ScaledTargets) == {}  # a class registered itself: nothing to record


@pytest.mark.slow  # transformers' import, an export: 1.5 s
def test_an_export_refuses_other_settings(fresh_global_registry, tmp_path) -> None:
    from innerloop.hf import InnerloopForCausalLM
    from innerloop.hf.export import export_model

    _register(DeclaredScaled(2.0))
    torch.manual_seed(0)
    folder = export_model(build_model(_config()), tmp_path / "exported", tokenizer=None)
    record = json.loads((folder / "config.json").read_text())["innerloop_plugins"]
    assert record["inner_loss"][NAME]["settings"] == {"scale": 2.0}
    _register(DeclaredScaled(1.0))
    with pytest.raises(PluginSettingsError, match="'scale': 2.0.*'scale': 1.0"):
        InnerloopForCausalLM.from_pretrained(folder)


@pytest.mark.slow  # Lightning's load_from_checkpoint: 0.4 s
def test_a_pickled_lightning_checkpoint_records_and_checks_the_settings(
    fresh_global_registry, tmp_path
) -> None:
    """Lightning's own IO (torch.save) wrote no plugin record: resumed or loaded with another setting, the
    model computed another function, silently."""
    from innerloop.train.module import LanguageModelModule

    _register(DeclaredScaled(2.0))
    torch.manual_seed(0)
    module = LanguageModelModule(_config())
    checkpoint = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "pytorch-lightning_version": "2.4.0",
    }
    module.on_save_checkpoint(checkpoint)  # what Lightning calls before torch.save
    assert checkpoint[PLUGINS_KEY]["inner_loss"][NAME]["settings"] == {"scale": 2.0}
    path = tmp_path / "last.ckpt"
    torch.save(checkpoint, path)
    assert LanguageModelModule.load_from_checkpoint(path).model.config.ttt.inner_loss == NAME
    _register(DeclaredScaled(1.0))
    with pytest.raises(PluginSettingsError, match="'scale': 2.0"):
        LanguageModelModule.load_from_checkpoint(path)


# -- one rule for "a -p name is found elsewhere" (registry/modules.py: found_elsewhere) ----------------


def _loss_plugin(folder, module: str, body: str, loss: str) -> None:
    """``folder/module.py``: ``body`` (its imports), then an inner loss ``loss`` registered at import."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{module}.py").write_text(
        "import innerloop\nfrom innerloop import HalfSquaredError, LossPairs\n"
        + body
        + f"\n\n@innerloop.register_inner_loss\nclass Loss(HalfSquaredError):\n    name = {loss!r}\n\n"
        "    def pairs(self, views, carry):\n"
        "        return LossPairs(inputs=views.key, targets=views.value, valid=None, carry={})\n"
    )


def test_a_plugin_file_in_a_folder_first_on_sys_path_named_like_an_installed_module_is_refused(
    plugin_folders,  # noqa: F811
    monkeypatch,
) -> None:
    """The two lookups disagreed: the plugin's own name asked importlib.find_spec, which found the file
    itself where its folder is first on sys.path (the working folder under ``python -c``), and accepted it,
    hiding the module of that name installed further on for the whole process; the helpers' lookup
    (``_found_outside``) took a module of a folder inside the plugin's for the plugin's own. Now one
    function (``found_elsewhere``) names it, for both."""
    import sys

    from innerloop.registry.modules import PluginModuleError, found_elsewhere, load_plugin_module

    working, elsewhere, number = plugin_folders
    name = f"{_PREFIX}{number}_installed"
    (elsewhere / f"{name}.py").write_text("INSTALLED = True\n")
    _loss_plugin(working, name, "", f"s52a_loss_{number}")
    monkeypatch.setattr(sys, "path", [str(working), *sys.path])
    assert found_elsewhere(name, working) == str(elsewhere / f"{name}.py")
    with pytest.raises(
        PluginModuleError, match=f"the module {name!r} is already another module here .*elsewhere"
    ):
        load_plugin_module(f"./{name}.py")
    assert name not in sys.modules


@pytest.mark.parametrize("through_a_helper", [False, True])
def test_a_helper_named_like_an_imported_module_is_refused(
    plugin_folders,  # noqa: F811
    through_a_helper,
) -> None:
    """``plugins/token.py`` beside a plugin that says ``import token``: the standard library's ``token``,
    imported already, is what the import got, silently (its SCALE read the default 1.0, not the file's
    2.0). Now refused, naming both, also where a helper beside the plugin is the one that imports it."""
    import token  # noqa: F401  (imported already, as in any process that has imported inspect)

    from innerloop.registry.modules import PluginModuleError, load_plugin_module

    working, _, number = plugin_folders
    folder = working / "plugins"
    folder.mkdir()
    (folder / "token.py").write_text("SCALE = 2.0\n")
    body = "import token\nSCALE = getattr(token, 'SCALE', 1.0)\n"
    if through_a_helper:
        (folder / f"{_PREFIX}{number}_helper.py").write_text(body)
        body = f"from {_PREFIX}{number}_helper import SCALE\n"
    _loss_plugin(folder, f"{_PREFIX}{number}_plugin", body, f"s52a_loss_{number}")
    with pytest.raises(PluginModuleError, match="it imports 'token', a module of a file beside it") as error:
        load_plugin_module(f"plugins/{_PREFIX}{number}_plugin.py")
    assert "token.py" in str(error.value) and "rename" in str(error.value)
    assert f"s52a_loss_{number}" not in {entry.name for entry in get_registry().entries("inner_loss")}
