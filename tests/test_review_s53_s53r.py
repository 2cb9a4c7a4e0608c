"""Review s53r: check_held_plugins, settings read fresh, metrics' forward restore, at inputs nobody tried.

- A model built with a plugin class whose definition was run again since (a notebook cell re-run,
  ``importlib.reload``) and an object of the new class registered under the name: the save is refused
  (the model computes with the old class's code), but the message read "of class DeclaredScaled with the
  settings {'scale': 2.0}, but ... is a DeclaredScaled with {'scale': 2.0}": two identical sides and no
  word of what differs. It now names that the classes are two class objects of one name, defined again.
"""

from __future__ import annotations

import functools
import warnings

import pytest
from test_review_s52_s52a import NAME, DeclaredScaled, _config, _register
from test_review_s53_s53i import _model_then_another_registered
from torch import nn

from innerloop import HalfSquaredError, LossPairs
from innerloop.checkpoints import (
    PluginChangedWarning,
    PluginSettingsError,
    check_plugin_settings,
    load_model,
    plugin_record,
    recorded_plugins,
)
from innerloop.models import build_model

pytestmark = pytest.mark.usefixtures("fresh_global_registry")


def test_a_save_refused_for_a_class_defined_again_says_so(tmp_path) -> None:
    """The class cell run again: same name, same settings, another class object. The refusal says the
    class was defined again (its code may differ), not two sides that read alike."""
    from innerloop.train.module import save_model_checkpoint

    again = type(
        "DeclaredScaled",
        (DeclaredScaled,),
        {"__module__": DeclaredScaled.__module__, "__qualname__": DeclaredScaled.__qualname__},
    )
    model = _model_then_another_registered(DeclaredScaled(2.0), again(2.0))
    path = tmp_path / "c.safetensors"
    with pytest.raises(PluginSettingsError) as error:
        save_model_checkpoint(model, path)
    message = str(error.value)
    for part in ("defined again", "its code may differ", "'scale': 2.0"):
        assert part in message, message
    assert not path.exists()


class ModuleLoss(HalfSquaredError, nn.Module):
    """A plugin loss written the PyTorch way, as an ``nn.Module`` (with a public ``scale``): the layer
    holding it makes it a child module, so ``model.eval()`` / ``model.train()`` flip its ``training``."""

    name = NAME

    def __init__(self, scale: float = 1.0) -> None:
        nn.Module.__init__(self)
        self.scale = scale

    def pairs(self, views, carry):
        return LossPairs(inputs=views.key, targets=self.scale * views.value, valid=None, carry={})


def test_an_nn_module_plugin_records_no_training_flag(tmp_path) -> None:
    """``nn.Module``'s ``training`` was read as a public attribute, so a model saved after ``model.eval()``
    recorded ``'training': False`` and every load (a fresh object: ``True``) warned the plugin's settings
    differ 'in training' -- noise on every load, since settings are read at each save (s53i). It is the
    module's mode, not a setting: left out, the real public settings kept."""
    from innerloop.train.module import save_model_checkpoint

    _register(ModuleLoss(2.0))
    model = build_model(_config())
    model.eval()  # the plugin, a child module of its layer, now has training False
    path = save_model_checkpoint(model, tmp_path / "c.safetensors")
    assert recorded_plugins(path)["inner_loss"][NAME]["settings"] == {"scale": 2.0}
    _register(ModuleLoss(2.0))  # a later process: a fresh object, training True
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginChangedWarning)
        load_model(path)


def test_an_nn_module_plugin_loads_quietly_from_a_record_of_its_training_flag(tmp_path) -> None:
    """A checkpoint saved before the fix recorded ``'training'``: the module's mode, not compared."""
    _register(ModuleLoss(2.0))
    record = plugin_record(_config().to_dict())
    record["inner_loss"][NAME]["settings"] = {"scale": 2.0, "training": False}
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginChangedWarning)
        check_plugin_settings("c.safetensors", record, _config().to_dict())


class CachedLoss(HalfSquaredError):
    """A plugin loss with a ``functools.cached_property`` derived from its setting: computed at the first
    call, it then sits in the instance's ``__dict__`` under a public name."""

    name = NAME

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    @functools.cached_property
    def squared_scale(self) -> float:
        return self.scale * self.scale

    def pairs(self, views, carry):
        return LossPairs(inputs=views.key, targets=self.squared_scale * views.value, valid=None, carry={})


def test_a_cached_property_of_a_plugin_is_no_setting(tmp_path) -> None:
    """A ``cached_property`` computed by the training run was recorded as a setting (settings are read at
    each save, s53i), and every load with a fresh object (not computed yet) warned that the save had a
    setting it lacks. It is derived from the settings, not one: left out."""
    import torch

    from innerloop.train.module import save_model_checkpoint

    _register(CachedLoss(2.0))
    model = build_model(_config())
    model(torch.randint(0, 64, (1, 16)))  # computes squared_scale
    path = save_model_checkpoint(model, tmp_path / "c.safetensors")
    assert recorded_plugins(path)["inner_loss"][NAME]["settings"] == {"scale": 2.0}
    _register(CachedLoss(2.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginChangedWarning)
        load_model(path)
