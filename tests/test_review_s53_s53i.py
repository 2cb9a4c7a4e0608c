"""Review s53i: the settings-check leftovers of s52a/s52l, and the pluggy surface at inputs nobody tried.

- A plugin that had no settings when a checkpoint was saved (the record then has no ``"settings"``) but
  has some now loaded unchecked and quiet: the value it has now may not be the one it trained with. It is
  a setting one side lacks, so it is warned of (:class:`PluginChangedWarning`) naming the plugin and the
  settings, as a setting added to ``settings()`` since the save already was.
- The public attributes of a plugin that declares no settings were read once per object, the first time
  asked (a training run's start, a load): ``loss.scale = 2.0`` after that was recorded as the first value
  by every later save, so a load with that first value registered computed another function, quietly.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from test_review_s52_s52a import NAME, DeclaredScaled, ScaledTargets, _config, _register, _saved

import innerloop
from innerloop import HalfSquaredError, LossPairs
from innerloop.checkpoints import PluginChangedWarning, PluginSettingsError, load_model, recorded_plugins
from innerloop.registry import PluginError, get_registry, hookimpl

pytestmark = pytest.mark.usefixtures("fresh_global_registry")


class Unsettled(HalfSquaredError):
    """A plugin loss with no settings: no ``settings()``, no public attribute (its scale is private)."""

    name = NAME

    def __init__(self, scale: float = 1.0) -> None:
        self._scale = scale

    def pairs(self, views, carry):
        return LossPairs(inputs=views.key, targets=self._scale * views.value, valid=None, carry={})


def _declared_scale(self) -> dict[str, float]:
    return {"scale": self._scale}


@pytest.mark.parametrize("declared", [True, False])
def test_settings_a_plugin_gained_since_the_save_are_warned_of(tmp_path, monkeypatch, declared) -> None:
    """Saved with no settings (nothing recorded), loaded with the same class now declaring ``scale``
    (``settings()``) or keeping it public: it loaded quietly; now one warning names the plugin and the
    setting it has now."""
    path = _saved(tmp_path, Unsettled(2.0))
    assert "settings" not in recorded_plugins(path)["inner_loss"][NAME]
    loss = Unsettled(1.0)
    if declared:
        monkeypatch.setattr(Unsettled, "settings", _declared_scale, raising=False)
    else:
        loss.scale = 1.0
    _register(loss)
    with pytest.warns(PluginChangedWarning) as caught:
        assert load_model(path).config.ttt.inner_loss == NAME
    messages = [str(w.message) for w in caught if issubclass(w.category, PluginChangedWarning)]
    assert len(messages) == 1, messages
    for part in (f"inner loss {NAME!r}", "'scale': 1.0", "differing in 'scale'", "with the settings {}"):
        assert part in messages[0], messages[0]


def test_a_plugin_without_settings_then_and_now_loads_quietly(tmp_path) -> None:
    """Nothing recorded, nothing now (the built-ins' case too): no warning."""
    path = _saved(tmp_path, Unsettled(2.0))
    _register(Unsettled(2.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginChangedWarning)
        assert load_model(path).config.ttt.inner_loss == NAME


def test_a_public_attribute_changed_after_a_first_save_is_recorded_as_it_is(tmp_path) -> None:
    """``ScaledTargets`` keeps ``scale`` as a public attribute (no ``settings()``): saved once with 1.0,
    then ``loss.scale = 2.0`` (a notebook's second run): the second save recorded 1.0, and a load with
    ``ScaledTargets(1.0)`` registered computed another function than the run that saved it, quietly."""
    from innerloop.models import build_model
    from innerloop.train.module import save_model_checkpoint

    loss = ScaledTargets(1.0)
    _saved(tmp_path, loss)
    loss.scale = 2.0
    torch.manual_seed(0)
    path = save_model_checkpoint(build_model(_config()), tmp_path / "second.safetensors")
    assert recorded_plugins(path)["inner_loss"][NAME]["settings"] == {"scale": 2.0}
    _register(ScaledTargets(1.0))
    with pytest.warns(PluginChangedWarning, match="differing in 'scale'"):
        load_model(path)


def _model_then_another_registered(first, second):
    """A model built with ``first`` registered under :data:`NAME`, then ``second`` registered in its place
    (``remove_plugin`` and register: a notebook's second try) while the model lives."""
    from innerloop.models import build_model

    _register(first)
    torch.manual_seed(0)
    model = build_model(_config())
    _register(second)
    return model


@pytest.mark.parametrize(
    "second",
    [DeclaredScaled(1.0), ScaledTargets(1.0), Unsettled(2.0)],
    ids=["declared-other-settings", "public-other-settings", "another-class"],
)
def test_a_save_of_a_model_whose_plugin_was_replaced_is_refused(tmp_path, second) -> None:
    """The model computes with ``DeclaredScaled(2.0)``; the save recorded the plugin registered now, e.g.
    ``{'scale': 1.0}``, and a load with that registered was quiet: another function. Refused now, naming
    the plugin and both settings, before anything is written."""
    from innerloop.train.module import save_model_checkpoint

    model = _model_then_another_registered(DeclaredScaled(2.0), second)
    path = tmp_path / "c.safetensors"
    with pytest.raises(PluginSettingsError) as error:
        save_model_checkpoint(model, path)
    message = str(error.value)
    for part in (f"inner loss {NAME!r}", "'scale': 2.0", "Register the object the model holds"):
        assert part in message, message
    assert not path.exists()


def test_a_save_of_a_model_whose_plugin_was_registered_again_alike_is_kept(tmp_path) -> None:
    """Another object of the same class and settings registered in its place: the record is true of
    what the model holds, so the save goes on."""
    from innerloop.train.module import save_model_checkpoint

    model = _model_then_another_registered(DeclaredScaled(2.0), DeclaredScaled(2.0))
    path = save_model_checkpoint(model, tmp_path / "c.safetensors")
    assert recorded_plugins(path)["inner_loss"][NAME]["settings"] == {"scale": 2.0}


@pytest.mark.slow  # transformers' import, an export: 1.5 s
def test_an_export_of_a_model_whose_plugin_was_replaced_is_refused(tmp_path) -> None:
    """``save_pretrained``/``innerloop export`` recorded the plugin registered now ({'scale': 1.0}) for a
    model computing with {'scale': 2.0}."""
    from innerloop.hf.export import export_model

    model = _model_then_another_registered(DeclaredScaled(2.0), DeclaredScaled(1.0))
    with pytest.raises(PluginSettingsError, match="'scale': 2.0"):
        export_model(model, tmp_path / "exported", tokenizer=None)
    assert not (tmp_path / "exported" / "config.json").exists()


@pytest.mark.slow  # a LanguageModelModule: 0.4 s
def test_a_training_checkpoint_of_a_model_whose_plugin_was_replaced_is_refused() -> None:
    """``on_save_checkpoint`` (every training save, and Lightning's own ``.ckpt``) recorded the plugin
    registered now for a module whose model computes with another."""
    from innerloop.train.module import LanguageModelModule

    _register(DeclaredScaled(2.0))
    torch.manual_seed(0)
    module = LanguageModelModule(_config())
    _register(DeclaredScaled(1.0))
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    with pytest.raises(PluginSettingsError, match="'scale': 2.0"):
        module.on_save_checkpoint(checkpoint)


# -- a hook's signature: pluggy passes `register` positionally, only where it has no default ----------------


class _KeywordOnly:
    @hookimpl
    def register_inner_losses(self, *, register):
        register(Unsettled())


class _Defaulted:
    @hookimpl
    def register_inner_losses(self, register=None):
        register(Unsettled())


class _PositionalOnly:
    @hookimpl
    def register_inner_losses(self, register, /):
        register(Unsettled())


@pytest.mark.parametrize("plugin", [_KeywordOnly, _Defaulted], ids=["keyword-only", "default"])
def test_a_hook_pluggy_would_call_without_register_is_refused_naming_it(plugin) -> None:
    """pluggy passes a hook's arguments positionally and leaves out those with defaults: ``(*, register)``
    was accepted and failed inside pluggy with "missing 1 required keyword-only argument", and
    ``(register=None)`` with "'NoneType' object is not callable". Refused now, saying why."""
    with pytest.raises(PluginError) as error:
        innerloop.registry.register(plugin(), origin="s53i_signature")
    message = str(error.value)
    for part in ("'s53i_signature'", "register_inner_losses", "register"):
        assert part in message, message
    assert NAME not in get_registry().names("inner_loss")


def test_a_hook_taking_register_positionally_only_registers() -> None:
    """``(register, /)``: pluggy calls it positionally, so it works; it was refused ("by name")."""
    innerloop.registry.register(_PositionalOnly(), origin="s53i_positional")
    assert NAME in get_registry().names("inner_loss")


class _OldStyleWrapper:
    @hookimpl(hookwrapper=True)
    def register_inner_losses(self, register):
        yield


class _NewStyleWrapper:
    @hookimpl(wrapper=True)
    def register_inner_losses(self, register):
        register(Unsettled())
        return (yield)


class _SpecNamed:
    @hookimpl(specname="register_inner_losses")
    def my_losses(self, register):
        register(Unsettled())


@pytest.mark.parametrize(
    ("plugin", "said"),
    [(_OldStyleWrapper, "wrapper"), (_NewStyleWrapper, "wrapper"), (_SpecNamed, "specname")],
    ids=["hookwrapper", "wrapper", "specname"],
)
def test_hookimpl_options_innerloop_does_not_run_are_refused_naming_them(plugin, said) -> None:
    """innerloop calls each plugin's hooks alone: a wrapper wraps nothing, so a hookwrapper plugin was
    accepted having registered nothing (and a new-style wrapper's own ``register`` call was kept or not by
    pluggy's wrapper rules); ``specname`` was refused as "'my_losses', which is not a hook", though pluggy
    reads it. Each is refused naming the option and the hook."""
    with pytest.raises(PluginError) as error:
        innerloop.registry.register(plugin(), origin="s53i_options")
    message = str(error.value)
    for part in ("'s53i_options'", said, "register_inner_losses"):
        assert part in message, message
    assert NAME not in get_registry().names("inner_loss")
