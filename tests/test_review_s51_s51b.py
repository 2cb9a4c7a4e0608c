"""s51b: one hook for a layer's forgetting gate as a log (``TTTLayer.log_forgetting``), plugin files' module
paths (``-p dir/x.py``), and private calls across modules."""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from plugin_testing import PLUGIN_LOSS_CLASS

from innerloop.core.family_layers import DeltaNetLayer, GatedDeltaNetLayer, TitansLayer
from innerloop.core.layer import TTTLayer, _log_forgetting_reaches_scan
from innerloop.registry import DISABLE_ENV, get_registry, isolated_registry
from innerloop.registry.modules import PLUGIN_MODULES_ENV, PluginModuleError, load_plugin_module
from innerloop.testing.kernel_checks import ForgettingLayer, LogForgettingLayer


class _GatedDeltaNetHalfLog(GatedDeltaNetLayer):
    """Overrides only the log hook: its gate reaches the scan, and ``forgetting`` follows it."""

    def log_forgetting(self, x: torch.Tensor) -> tuple[torch.Tensor, None] | None:
        gates = super().log_forgetting(x)
        return None if gates is None else (0.5 * gates[0], None)


class _TitansNoDecay(TitansLayer):
    """Overrides ``forgetting`` below Titans' ``log_forgetting``: its gates reach the scan."""

    def forgetting(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        decay, momentum = super().forgetting(x)
        return torch.zeros_like(decay), momentum


class _TitansNoDecayThenLog(_TitansNoDecay):
    """Gives ``log_forgetting`` again below that override: the log reaches the scan again."""

    def log_forgetting(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        gates = super().log_forgetting(x)
        return None if gates is None else (torch.zeros_like(gates[0]), gates[1])


@pytest.mark.slow  # three layers built and run: 0.45 s on 2 shared cores
def test_the_lower_of_forgetting_and_log_forgetting_reaches_the_scan() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    halved = _GatedDeltaNetHalfLog(8, 2).double()
    decay, momentum, decay_log = halved.scan_gates(x)
    assert decay is None and momentum is None
    torch.testing.assert_close(decay_log, 0.5 * halved.log_decay_factor(x), rtol=0, atol=0)
    torch.testing.assert_close(halved.forgetting(x)[0], -torch.expm1(decay_log), rtol=0, atol=1e-15)
    no_decay = _TitansNoDecay(8, 2, mini_batch_size=2).double()
    decay, momentum, decay_log = no_decay.scan_gates(x)
    assert decay_log is None and bool((decay == 0).all()) and momentum is not None
    again = _TitansNoDecayThenLog(8, 2, mini_batch_size=2).double()
    decay, momentum, decay_log = again.scan_gates(x)
    assert decay is None and bool((decay_log == 0).all()) and momentum is not None
    assert [_log_forgetting_reaches_scan(cls) for cls in (TTTLayer, ForgettingLayer, LogForgettingLayer)] == [
        True,
        False,
        True,
    ]


@pytest.mark.slow  # two layers, three calls: 0.35 s on 2 shared cores
def test_a_third_party_log_gate_equals_its_decay_through_the_layer() -> None:
    """A FamilyLayer subclass giving its gate by ``log_forgetting`` (``innerloop.testing``'s
    LogForgettingLayer) computes the layer its twin giving ``decay = sigmoid(z)`` by ``forgetting``
    computes (float64, cut into calls inside a mini-batch too)."""
    torch.manual_seed(0)
    plain = ForgettingLayer(8, 2, mini_batch_size=3).double()
    logged = LogForgettingLayer(8, 2, mini_batch_size=3).double()
    logged.load_state_dict(plain.state_dict())
    x = torch.randn(2, 8, 8, dtype=torch.float64)
    assert logged.scan_gates(x)[0] is None and plain.scan_gates(x)[2] is None
    torch.testing.assert_close(
        logged.forgetting(x)[0], torch.sigmoid(plain._head_gate(x, plain.decay_proj)), rtol=1e-14, atol=0
    )
    whole, _ = plain(x)
    first, middle = logged(x[:, :4])
    second, _ = logged(x[:, 4:], middle)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, rtol=1e-10, atol=1e-12)


class _GatedDeltaNetHalfGate(GatedDeltaNetLayer):
    """Overrides the gate itself: ``a = 1/2`` for every head and token."""

    def log_decay_factor(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full_like(super().log_decay_factor(x), -math.log(2.0))


@pytest.mark.slow  # one layer built: 0.2-1.6 s on 2 shared cores (the first layer of a process)
def test_gated_deltanets_gate_is_log_decay_factor_in_values_step_and_decay() -> None:
    """docs/family.md: an override of ``log_decay_factor`` changes Gated DeltaNet's gate in its values
    ``v / a``, its step ``a * beta`` and its decay (the scan's ``decay_log``) alike."""
    torch.manual_seed(0)
    layer = _GatedDeltaNetHalfGate(8, 2).double()
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    views, lr, _, _ = layer._read(x, layer.init_state(1))
    plain, plain_lr, _, _ = DeltaNetLayer._read(layer, x, layer.init_state(1))
    torch.testing.assert_close(views.value, 2.0 * plain.value, rtol=0, atol=0)
    torch.testing.assert_close(lr, 0.5 * plain_lr, rtol=0, atol=0)
    torch.testing.assert_close(layer.scan_gates(x)[2], torch.full_like(lr, -math.log(2.0)), rtol=0, atol=0)


# ---- -p path/to/file.py: where its folder stays on sys.path ---------------------------------------------

_PLUGIN_COUNTER = itertools.count()
_PREFIX = "s51b_mod_"
_HOOKED = (
    "import innerloop\nfrom innerloop.core.protocol import InnerLoss, LossPairs\nfrom innerloop.registry import hookimpl\n"
    + PLUGIN_LOSS_CLASS
    + "\n\n@hookimpl\ndef register_inner_losses(register):\n    register({cls}())\n"
)


@pytest.fixture
def plugin_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A fresh registry, the working folder ``tmp_path`` (off sys.path), and a folder ``elsewhere`` last on
    sys.path; the modules imported from them are forgotten afterwards. Yields (tmp_path, elsewhere, n)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")] + [str(elsewhere)])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(DISABLE_ENV, "1")
    monkeypatch.delenv(PLUGIN_MODULES_ENV, raising=False)
    modules_before = set(sys.modules)
    with isolated_registry():
        yield tmp_path, elsewhere, next(_PLUGIN_COUNTER)
    for name in set(sys.modules) - modules_before:
        if name.startswith(_PREFIX) or name in _STDLIB_NAMES_USED:
            del sys.modules[name]


_STDLIB_NAMES_USED: set[str] = set()


def _plugin(folder: Path, module: str, number: int, first_line: str = "") -> str:
    """A hooked plugin file ``folder/module.py``; returns its inner loss's name."""
    loss = f"s51b_loss_{number}"
    folder.mkdir(parents=True, exist_ok=True)
    text = _HOOKED.format(cls=f"Loss{number}", name=loss)
    (folder / f"{module}.py").write_text(first_line + text)
    return loss


@pytest.mark.slow  # imports three small modules: 0.1-0.4 s on 2 shared cores
def test_a_plugin_files_folder_hides_no_module_after_it_loads(plugin_folders) -> None:
    """``-p dir/x.py`` put ``dir`` first on sys.path for good: a later ``import common`` found ``dir/common.py``
    instead of the ``common`` installed elsewhere. Now ``dir`` is first while x.py loads (its ``import helper``
    finds its own helper) and last afterwards. (s51n: a helper x.py imports that is installed elsewhere
    too is refused, test_review_s51_s51n.py; this test deleted it from sys.modules, where it hid the
    installed one.)"""
    work, elsewhere, n = plugin_folders
    common = f"{_PREFIX}common_{n}"
    helper = f"{_PREFIX}helper_{n}"
    (work / "plugins").mkdir()
    (work / "plugins" / f"{common}.py").write_text("WHERE = 'beside the plugin'\n")
    (work / "plugins" / f"{helper}.py").write_text("WHERE = 'beside the plugin'\n")
    (elsewhere / f"{common}.py").write_text("WHERE = 'installed'\n")
    loss = _plugin(
        work / "plugins",
        f"{_PREFIX}x_{n}",
        n,
        f"import {helper}\nassert {helper}.WHERE == 'beside the plugin'\n",
    )
    load_plugin_module(f"plugins/{_PREFIX}x_{n}.py", get_registry())
    assert loss in get_registry().names("inner_loss")
    assert importlib.import_module(common).WHERE == "installed"
    assert sys.path[-1] == str(work / "plugins")  # still importable by name (ddp_spawn's processes)


def test_a_plugin_file_that_fails_to_import_leaves_sys_path_as_it_was(plugin_folders) -> None:
    """A failed load moved the file's folder to the end of sys.path, where nothing would import from it."""
    work, _, n = plugin_folders
    (work / "broken").mkdir()
    (work / "broken" / f"{_PREFIX}broken_{n}.py").write_text("raise RuntimeError('no GPU here')\n")
    before = list(sys.path)
    with pytest.raises(PluginModuleError, match="raised RuntimeError: no GPU here"):
        load_plugin_module(f"broken/{_PREFIX}broken_{n}.py", get_registry())
    assert sys.path == before


def _stdlib_module_not_imported() -> str:
    return next(
        name
        for name in sorted(sys.stdlib_module_names)
        if name.isidentifier() and not name.startswith("_") and name not in sys.modules
        and (spec := importlib.util.find_spec(name)) is not None and spec.has_location
    )  # fmt: skip


@pytest.mark.parametrize("case", ["imported", "not imported", "package imported"])
def test_a_plugin_file_named_like_a_standard_module_is_refused(plugin_folders, case) -> None:
    """``-p dir/json.py`` (json imported already) was refused as "already another file"; a standard (or
    installed) module not imported yet was silently replaced for the whole process by the plugin file
    (every later ``import`` of it got the plugin); ``-p email/x.py`` (a package named like an imported
    one) raised "No module named 'email.x'". Each refused, naming the module and where it is."""
    work, _, n = plugin_folders
    name = {"imported": "json", "not imported": _stdlib_module_not_imported(), "package imported": "email"}[
        case
    ]
    _STDLIB_NAMES_USED.add(name)
    spec = f"dir/{name}.py"
    if case == "package imported":
        (work / name).mkdir()
        (work / name / "__init__.py").write_text("")
        spec = f"{name}/x.py"
        _plugin(work / name, "x", n)
    else:
        _plugin(work / "dir", name, n)
    with pytest.raises(PluginModuleError, match=rf"the module '{name}' is already another module here \('/"):
        load_plugin_module(spec, get_registry())
    assert str(work) not in str(getattr(sys.modules.get(name), "__file__", ""))


@pytest.mark.slow  # loads one plugin through six spellings: 0.2-0.5 s on 2 shared cores
def test_one_plugin_file_under_several_spellings_is_one_module(plugin_folders, monkeypatch) -> None:
    """A nested package's file (``pkg/sub/x.py`` importing ``..helper``) by its relative and absolute
    paths, its dotted name, a symlink to it and a '~' path: one module ``pkg.sub.x``, registered once;
    a file in a folder without ``__init__.py`` (a namespace package) is the top-level module of its stem."""
    work, _, n = plugin_folders
    package = work / f"{_PREFIX}pkg_{n}"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "helper.py").write_text(f"NAME = 's51b_nested_{n}'\n")
    loss = _plugin(package / "sub", "x", n, "from ..helper import NAME\n")
    text = (package / "sub" / "x.py").read_text().replace(f'"{loss}"', "NAME")
    (package / "sub" / "x.py").write_text(text)
    (work / "link.py").symlink_to(package / "sub" / "x.py")
    monkeypatch.setenv("HOME", str(work))
    dotted = f"{package.name}.sub.x"
    for spec in (
        f"{package.name}/sub/x.py",
        str(package / "sub" / "x.py"),
        dotted,
        "link.py",
        f"~/{package.name}/sub/x.py",
    ):
        assert load_plugin_module(spec, get_registry()) == f"-p {dotted}"
    assert get_registry().names("inner_loss").count(f"s51b_nested_{n}") == 1
    _plugin(work / "namespace", f"{_PREFIX}flat_{n}", n + 1000)
    assert load_plugin_module(f"namespace/{_PREFIX}flat_{n}.py", get_registry()) == f"-p {_PREFIX}flat_{n}"


# ---- private calls across modules ----------------------------------------------------------------------


def test_no_module_calls_another_modules_private_registry_or_layer_methods() -> None:
    """registry/modules.py called ``registry._roll_back_since`` (now :meth:`Registry.roll_back_since`,
    public and documented), core/diagnostics.py ``layer._scan_gates`` (now :meth:`TTTLayer.scan_gates`)
    and train/run.py ``module._unit`` (now the data module's ``unit``)."""
    root = Path(__file__).resolve().parents[1] / "innerloop"
    pattern = re.compile(r"\b(?:registry|module|layer)\._(?:roll_back_since|scan_gates|unit)\b")
    offenders = [
        f"{path.relative_to(root)}:{number}"
        for path in sorted(root.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []
