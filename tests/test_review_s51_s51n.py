"""s51n: review of s51b -- which forgetting hook reaches the scan when one is set on an instance or on a
class after it is made, plugin files' folders on ``sys.path``, and the renamed public methods."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch
from test_review_s51_s51b import _PREFIX, _plugin, plugin_folders  # noqa: F401  (a fixture)

from innerloop.core.family_layers import GatedDeltaNetLayer
from innerloop.registry import get_registry
from innerloop.registry.modules import PluginModuleError, load_plugin_module
from innerloop.testing.kernel_checks import ForgettingLayer


def _no_decay_gates(x: torch.Tensor) -> tuple[torch.Tensor, None]:
    """``(decay 0 [B, H, T], None)`` for ``x [B, T, D]`` of a 2-head layer, in float64."""
    return torch.zeros(x.shape[0], 2, x.shape[1], dtype=torch.float64), None


class _GatedDeltaNetSubclass(GatedDeltaNetLayer):
    """A subclass that overrides nothing (yet): a test sets its hooks after the class is made."""


@pytest.mark.slow  # two layers built: 0.3-1.7 s on 2 shared cores (the first layer of a process)
def test_a_forgetting_hook_set_on_a_layer_reaches_its_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    """``layer.forgetting = f`` on a layer whose class gives ``log_forgetting`` (Gated DeltaNet) is the
    layer's gate, as it is on a plain TTTLayer: an attribute of the instance is below every class (it
    was ignored: the scan took the class's log gate, silently); ``layer.log_forgetting = g`` on a layer
    whose class overrides ``forgetting`` below its ``log_forgetting`` likewise."""
    torch.manual_seed(0)
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    layer = GatedDeltaNetLayer(8, 2).double()
    assert layer.scan_gates(x)[2] is not None
    with monkeypatch.context() as patch:
        patch.setattr(layer, "forgetting", _no_decay_gates)
        decay, momentum, decay_log = layer.scan_gates(x)
        assert decay_log is None and momentum is None and bool((decay == 0).all())
    assert layer.scan_gates(x)[0] is None and layer.scan_gates(x)[2] is not None
    forgets = ForgettingLayer(8, 2, mini_batch_size=2).double()
    halved = (torch.full((1, 2, 5), -0.5, dtype=torch.float64), None)
    monkeypatch.setattr(forgets, "log_forgetting", lambda x: halved)
    decay, momentum, decay_log = forgets.scan_gates(x)
    assert decay is None and momentum is None and decay_log is halved[0]


@pytest.mark.slow  # one layer built: 0.01-1.6 s on 2 shared cores (the first layer of a process)
def test_a_forgetting_hook_set_on_a_class_after_it_is_made_reaches_the_scan(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``monkeypatch.setattr(Sub, "forgetting", f)`` on a subclass of Gated DeltaNet made before is an
    override below the class that defines ``log_forgetting``: its gates reach the scan (s51b decided the
    rule once, when the class was made, and kept the log gate, silently), and the log again once undone."""
    torch.manual_seed(0)
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    layer = _GatedDeltaNetSubclass(8, 2).double()
    with monkeypatch.context() as patch:
        patch.setattr(_GatedDeltaNetSubclass, "forgetting", lambda self, x: _no_decay_gates(x), raising=False)
        decay, _, decay_log = layer.scan_gates(x)
        assert decay_log is None and bool((decay == 0).all())
    decay, _, decay_log = layer.scan_gates(x)
    assert decay is None and decay_log is not None


# ---- -p dir/x.py: the modules it imports from beside it ------------------------------------------------


def _plugin_importing(folder: Path, module: str, number: int, helper: str) -> None:
    """A hooked plugin file ``folder/module.py`` that imports ``helper`` (a file beside it) as it loads."""
    _plugin(folder, module, number, f"import {helper}\nHELPER = {helper}\n")


@pytest.mark.slow  # imports two small modules: 0.1-0.4 s on 2 shared cores
def test_a_plugins_helper_named_like_an_installed_module_is_refused(plugin_folders) -> None:  # noqa: F811
    """``-p plugins/x.py`` whose ``import common`` loads ``plugins/common.py`` while a ``common`` is installed:
    the helper hid the installed module from the whole process (a later ``import common`` anywhere got it),
    and the processes ``ddp_spawn`` starts (which import x by name, its folder last on sys.path) got the
    installed one where the parent had the helper (measured: 'installed' in the child, 'beside the plugin'
    in the parent). Refused now, naming both files; sys.path and sys.modules as they were."""
    work, elsewhere, n = plugin_folders
    common = f"{_PREFIX}common_{n}"
    (work / "plugins").mkdir()
    (work / "plugins" / f"{common}.py").write_text("WHERE = 'beside the plugin'\n")
    (elsewhere / f"{common}.py").write_text("WHERE = 'installed'\n")
    _plugin_importing(work / "plugins", f"{_PREFIX}x_{n}", n, common)
    path_before = list(sys.path)
    with pytest.raises(PluginModuleError) as refused:
        load_plugin_module(f"plugins/{_PREFIX}x_{n}.py", get_registry())
    message = str(refused.value)
    assert f"{common}.py" in message and str(elsewhere) in message and "rename" in message
    assert sys.path == path_before and common not in sys.modules and f"{_PREFIX}x_{n}" not in sys.modules
    assert importlib.import_module(common).WHERE == "installed"


@pytest.mark.slow  # imports four small modules: 0.1-0.4 s on 2 shared cores
def test_two_plugin_folders_with_a_helper_of_one_name_are_refused(plugin_folders) -> None:  # noqa: F811
    """``-p a/x.py -p b/y.py``, each importing its own ``helpers.py``: y got a's (imported first, by that
    name), silently, and a helper imported at call time was a's for both. The second is refused now."""
    work, _, n = plugin_folders
    helpers = f"{_PREFIX}helpers_{n}"
    for folder in ("a", "b"):
        (work / folder).mkdir()
        (work / folder / f"{helpers}.py").write_text(f"WHO = {folder!r}\n")
    _plugin_importing(work / "a", f"{_PREFIX}a_{n}", n, helpers)
    _plugin_importing(work / "b", f"{_PREFIX}b_{n}", n + 1000, helpers)
    load_plugin_module(f"a/{_PREFIX}a_{n}.py", get_registry())
    assert sys.modules[f"{_PREFIX}a_{n}"].HELPER.WHO == "a"
    with pytest.raises(PluginModuleError, match=rf"{helpers}\.py.*rename") as refused:
        load_plugin_module(f"b/{_PREFIX}b_{n}.py", get_registry())
    assert str(work / "a") in str(refused.value) and str(work / "b") in str(refused.value)
    assert f"{_PREFIX}b_{n}" not in sys.modules
