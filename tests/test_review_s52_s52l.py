"""Review s52l of s52a (plugin settings in checkpoints, found_elsewhere).

A plugin that declares no settings (no ``settings()``, not a dataclass) had its public plain attributes
recorded as its settings, and a load in a new process where one differed was refused: a counter bumped
by the training run (``calls``: 43 saved, 42 in the loading process), a ``tempfile.mkdtemp()`` path, a
``time.time()``, measured in real subprocesses; the checkpoint could not be loaded at all without editing
the plugin. Such attributes are not known to be settings: a difference is warned of
(:class:`PluginChangedWarning`), and refused only for settings the plugin declares. Settings compare as
values (``1`` and ``1.0`` are one setting; ``nan`` equals ``nan``), not as JSON text, which refused
``delta=1`` against ``delta=1.0`` with "differing in " naming nothing."""

from __future__ import annotations

import dataclasses
import importlib.machinery
import math
import warnings

import pytest
import torch
from test_review_s51_s51b import _PREFIX, plugin_folders  # noqa: F401  (a fixture)
from test_review_s52_s52a import _config as config_with_loss
from test_review_s52_s52a import _register as register_from

from innerloop import HalfSquaredError, LossPairs
from innerloop.checkpoints import PluginChangedWarning, PluginSettingsError, load_model
from innerloop.models import ModelConfig, build_model

NAME = "s52l_loss"
ORIGIN = "s52l_pkg"


class CountingLoss(HalfSquaredError):
    """A plugin loss that declares no settings, with public attributes that are none: a counter bumped
    as it runs, and a scratch path made per process."""

    name = NAME

    def __init__(self, scratch: str = "/tmp/a") -> None:
        self.calls = 0
        self.scratch = scratch

    def pairs(self, views, carry):
        self.calls += 1
        return LossPairs(inputs=views.key, targets=views.value, valid=None, carry={})


class DeclaredLoss(CountingLoss):
    """The same loss declaring a setting ``delta`` (it only reads it here)."""

    def __init__(self, delta: object = 1.0) -> None:
        super().__init__()
        self.delta = delta

    def settings(self):
        return {"delta": self.delta}


@dataclasses.dataclass
class DataclassLoss(CountingLoss):
    """The same loss as a dataclass: its fields are declared settings."""

    delta: float = 1.0

    def __post_init__(self) -> None:
        self.calls = 0  # not a field: not a setting


def _config() -> ModelConfig:
    return config_with_loss(NAME)


def _register(loss) -> None:
    register_from(loss, ORIGIN)


def _saved(tmp_path, loss):
    from innerloop.train.module import save_model_checkpoint

    _register(loss)
    loss.calls += 5  # the training run bumps the counter before the first save reads it
    torch.manual_seed(0)
    return save_model_checkpoint(build_model(_config()), tmp_path / "c.safetensors")


def test_public_attributes_that_differ_warn_and_load(fresh_global_registry, tmp_path) -> None:
    """Saved with ``calls`` bumped and one scratch path, loaded with a fresh object and another path (what
    a new process registers): the checkpoint loads, with one warning naming what differs and saying how
    to declare the settings. It was refused (PluginSettingsError)."""
    path = _saved(tmp_path, CountingLoss("/tmp/s52l-one"))
    _register(CountingLoss("/tmp/s52l-two"))
    with pytest.warns(PluginChangedWarning) as caught:
        assert load_model(path).config.ttt.inner_loss == NAME
    message = str(caught[0].message)
    for part in ("'calls'", "'scratch'", "/tmp/s52l-one", "/tmp/s52l-two", "settings()"):
        assert part in message, message


@pytest.mark.parametrize("cls", [DeclaredLoss, DataclassLoss])
def test_declared_settings_that_differ_are_refused(fresh_global_registry, tmp_path, cls) -> None:
    path = _saved(tmp_path, cls(delta=2.0))
    _register(cls(delta=1.0))
    with pytest.raises(PluginSettingsError, match="differing in 'delta'"):
        load_model(path)


@pytest.mark.parametrize(
    ("saved", "now"), [(1, 1.0), (2.0, 2), (math.nan, math.nan), ((1, 2.0), [1.0, 2]), (-0.0, 0.0)]
)
def test_equal_settings_of_other_spelling_load_quietly(fresh_global_registry, tmp_path, saved, now) -> None:
    """1 and 1.0 are one setting (JSON writes them apart: the load was refused "differing in " naming
    nothing); nan equals nan (it compared as text: held, now pinned); a tuple reads back as a list."""
    path = _saved(tmp_path, DeclaredLoss(saved))
    _register(DeclaredLoss(now))
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginChangedWarning)
        assert load_model(path).config.ttt.inner_loss == NAME


@pytest.mark.parametrize(("saved", "now"), [(True, 1), (1, 2), ([1, 2], [1, 2, 3]), ("a", None)])
def test_other_settings_name_what_differs(fresh_global_registry, tmp_path, saved, now) -> None:
    """A flag is not a number (True against 1), and a list of another length differs."""
    path = _saved(tmp_path, DeclaredLoss(saved))
    _register(DeclaredLoss(now))
    with pytest.raises(PluginSettingsError, match="differing in 'delta'"):
        load_model(path)


# -- found_elsewhere: what a -p of a plugin with many helpers costs ----------------------------------


def test_a_plugin_with_many_helpers_resolves_sys_path_once_per_check(plugin_folders, monkeypatch) -> None:  # noqa: F811
    """Each helper's name was looked up three times (the plugin's imports before, and after, its import;
    the helpers loaded), each resolving every ``sys.path`` entry anew: 3 x helpers x entries
    ``Path.resolve`` calls (a -p with 200 helpers took 0.8 s here, 0.3 s before found_elsewhere). Now
    ``sys.path`` is resolved once per folder and ``sys.path``, whatever the number of helpers."""
    from innerloop.registry import modules

    working, _, number = plugin_folders
    helpers = [f"{_PREFIX}{number}_helper_{index}" for index in range(20)]
    for helper in helpers:
        (working / f"{helper}.py").write_text("import os\nVALUE = 1\n")
    body = "".join(f"import {helper}\n" for helper in helpers)
    (working / f"{_PREFIX}{number}_plugin.py").write_text(
        body + "import innerloop\nfrom innerloop import HalfSquaredError, LossPairs\n\n\n"
        f"@innerloop.register_inner_loss\nclass Loss(HalfSquaredError):\n    name = 's52l_many_{number}'\n\n"
        "    def pairs(self, views, carry):\n"
        "        return LossPairs(inputs=views.key, targets=views.value, valid=None, carry={})\n"
    )
    calls = []
    same_folder = modules._same_folder
    monkeypatch.setattr(modules, "_same_folder", lambda *args: calls.append(args) or same_folder(*args))
    modules.load_plugin_module(f"./{_PREFIX}{number}_plugin.py")
    import sys

    assert len(calls) <= 4 * (len(sys.path) + 1), len(calls)


def test_the_resolved_sys_path_follows_the_working_folder(plugin_folders, monkeypatch) -> None:  # noqa: F811
    """``""`` on ``sys.path`` is the working folder: resolved once and kept, a module of the next working
    folder would not be found elsewhere (the cache is keyed by the working folder too)."""
    import sys

    from innerloop.registry.modules import found_elsewhere

    working, _, number = plugin_folders
    plugin_folder, other = working / "plugin", working / "other"
    plugin_folder.mkdir()
    other.mkdir()
    name = f"{_PREFIX}{number}_cwd"
    (other / f"{name}.py").write_text("X = 1\n")
    monkeypatch.setattr(sys, "path", ["", *sys.path])
    monkeypatch.chdir(plugin_folder)
    assert found_elsewhere(name, plugin_folder) is None
    monkeypatch.chdir(other)
    assert found_elsewhere(name, plugin_folder) == str(other / f"{name}.py")


@pytest.mark.parametrize("cls", [DeclaredLoss, DataclassLoss])
def test_declared_settings_are_recorded_as_they_are_at_the_save(fresh_global_registry, tmp_path, cls) -> None:
    """Declared settings were read once per object, the first time asked: a registered loss changed after a
    first save (a notebook's second try, ``loss.delta = 2.0``) was recorded with its first value, 1.0, and a
    load with the 1.0 registered computed another function than the run that saved it, silently."""
    from innerloop.checkpoints import recorded_plugins
    from innerloop.train.module import save_model_checkpoint

    loss = cls(delta=1.0)
    _saved(tmp_path, loss)
    loss.delta = 2.0
    path = save_model_checkpoint(build_model(_config()), tmp_path / "second.safetensors")
    assert recorded_plugins(path)["inner_loss"][NAME]["settings"] == {"delta": 2.0}
    _register(cls(delta=1.0))
    with pytest.raises(PluginSettingsError, match="differing in 'delta'"):
        load_model(path)


@pytest.mark.parametrize(
    ("helper_file", "import_line"),
    [
        ("token.py", "import importlib\nTOKEN = importlib.import_module('token')\n"),
        ("token.py", "TOKEN = __import__('token')\n"),
        ("token.py", "def later():\n    import importlib\n    return importlib.import_module('token')\n"),
        (f"token{importlib.machinery.EXTENSION_SUFFIXES[0]}", "import token\n"),
    ],
)
def test_a_helper_named_like_an_imported_module_is_refused_however_imported(
    plugin_folders,  # noqa: F811
    helper_file,
    import_line,
) -> None:
    """s52a refused ``plugins/token.py`` beside a plugin that says ``import token`` (the standard library's
    is what it gets), but not one that imports it by ``importlib.import_module('token')`` or
    ``__import__('token')`` (a string literal), nor a compiled helper ``token.cpython-*.so`` beside it:
    those loaded and got the standard library's ``token``, silently."""
    import token  # noqa: F401  (imported already, as in any process that has imported inspect)

    from innerloop.registry.modules import PluginModuleError, load_plugin_module

    working, _, number = plugin_folders
    folder = working / "plugins"
    folder.mkdir()
    (folder / helper_file).write_text("SCALE = 2.0\n")
    plugin = f"{_PREFIX}{number}_plugin"
    (folder / f"{plugin}.py").write_text(
        import_line + "import innerloop\nfrom innerloop import HalfSquaredError, LossPairs\n\n\n"
        f"@innerloop.register_inner_loss\nclass Loss(HalfSquaredError):\n    name = 's52l_token_{number}'\n\n"
        "    def pairs(self, views, carry):\n"
        "        return LossPairs(inputs=views.key, targets=views.value, valid=None, carry={})\n"
    )
    with pytest.raises(PluginModuleError, match="it imports 'token', a module of a file beside it"):
        load_plugin_module(f"plugins/{plugin}.py")


def test_a_setting_added_since_the_save_warns_and_loads(fresh_global_registry, tmp_path, monkeypatch) -> None:
    """A checkpoint of a plugin before it had the setting ``eps`` was refused once ``eps`` was added
    ("differing in 'eps'"): no registration could match it (the file has no ``eps``), so every checkpoint
    of the plugin's earlier code was lost. A setting on one side only is warned of; one on both with
    other values is still refused."""
    path = _saved(tmp_path, DeclaredLoss(delta=1.0))
    # the plugin's next version: a setting eps added (its default keeps the old function)
    monkeypatch.setattr(DeclaredLoss, "settings", lambda self: {"delta": self.delta, "eps": 0.0})
    _register(DeclaredLoss(delta=1.0))
    with pytest.warns(PluginChangedWarning, match="'eps'"):
        assert load_model(path).config.ttt.inner_loss == NAME
    _register(DeclaredLoss(delta=2.0))
    with pytest.raises(PluginSettingsError, match="differing in 'delta'"):
        load_model(path)
