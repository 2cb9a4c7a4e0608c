"""Review s48g: the house (issue 10) and the newcomer docs.

- The registry's warnings (``PluginLoadWarning``, ``PluginWarning``) point at the user's line, as the
  layer's and the config's do (``tests/core/test_errors.py``): they pointed at innerloop's own
  ``registry/manager.py`` and ``registry/kinds.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

import innerloop
from innerloop.kernels import fused_torch
from innerloop.plugins.models.mlp import MLPModel
from innerloop.registry import DISABLE_ENV, PluginLoadWarning, isolated_registry, manager

sys.path.insert(0, str(Path(__file__).parent / "registry"))
from test_passed_checks import InferenceModeRaises  # noqa: E402  (a rule that raises under inference_mode)


class _EntryPoint:
    """An installed entry point, as ``importlib.metadata`` gives it (``load`` runs ``load_module``)."""

    def __init__(self, name: str, load_module) -> None:
        self.name, self.value, self._load = name, f"{name}_module", load_module
        self.dist = SimpleNamespace(name=f"{name}-dist")

    def load(self):
        return self._load()


@pytest.fixture
def installed(monkeypatch):
    """Set the entry points the process's registry loads; the registry is rebuilt and forgotten after."""
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    monkeypatch.delenv(manager.ALLOW_ENV, raising=False)

    def use(*points: _EntryPoint) -> None:
        monkeypatch.setattr(manager, "_entry_points", lambda: list(points))

    with isolated_registry():
        yield use


def _fails_to_import():
    raise ImportError("no module named 'missing_dependency'")


def _registering_a_kernel_for_a_misspelt_model():
    module = ModuleType("s48g_plugin_module")

    @innerloop.hookimpl
    def register_kernels(register):
        register(fused_torch.kernel_spec("s48g_mpl", MLPModel().stack))

    module.register_kernels = register_kernels
    return module


def _warnings_of(call) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [w for w in caught if issubclass(w.category, PluginLoadWarning)]


def test_a_broken_entry_points_warning_points_at_the_users_line(installed) -> None:
    installed(_EntryPoint("s48g_broken", _fails_to_import))
    caught = _warnings_of(lambda: innerloop.available("inner_loss"))
    assert [w.filename for w in caught] == [__file__], [(w.filename, str(w.message)[:80]) for w in caught]
    assert "s48g_broken" in str(caught[0].message)


def test_a_misspelt_allow_list_warning_points_at_the_users_line(installed, monkeypatch) -> None:
    installed(_EntryPoint("s48g_plugin", _registering_a_kernel_for_a_misspelt_model))
    monkeypatch.setenv(manager.ALLOW_ENV, "s48g_plugn")
    caught = _warnings_of(lambda: innerloop.available("inner_loss"))
    assert [w.filename for w in caught] == [__file__], [(w.filename, str(w.message)[:80]) for w in caught]
    assert "s48g_plugn" in str(caught[0].message)


def test_an_entry_points_kernel_for_an_unknown_model_is_warned_of_at_the_users_line(installed) -> None:
    installed(_EntryPoint("s48g_plugin", _registering_a_kernel_for_a_misspelt_model))
    caught = _warnings_of(lambda: innerloop.available("inner_loss"))
    assert [w.filename for w in caught] == [__file__], [(w.filename, str(w.message)[:80]) for w in caught]
    assert "s48g_mpl" in str(caught[0].message)


@pytest.mark.slow  # registers an external rule (its naive-loop checks): ~0.4 s
def test_a_rule_that_cannot_run_without_autograd_is_warned_of_at_the_users_line() -> None:
    with (
        isolated_registry(),
        pytest.warns(innerloop.PluginWarning, match="cannot run without autograd") as caught,
    ):
        innerloop.register_update_rule(InferenceModeRaises())
    assert [w.filename for w in caught] == [__file__]


def _plugin_counting_its_hook_calls(calls: dict[str, int]) -> ModuleType:
    """A plugin whose second hook fails; each hook counts its calls (a hook's side effect)."""
    module = ModuleType("s48g_counting_module")

    @innerloop.hookimpl
    def register_inner_models(register):
        calls["register_inner_models"] += 1

    @innerloop.hookimpl
    def register_inner_losses(register):
        calls["register_inner_losses"] += 1
        raise RuntimeError("its configuration file is missing")

    @innerloop.hookimpl
    def register_update_rules(register):
        calls["register_update_rules"] += 1

    module.register_inner_models = register_inner_models
    module.register_inner_losses = register_inner_losses
    module.register_update_rules = register_update_rules
    return module


def test_a_refused_plugins_hooks_that_ran_whole_are_not_run_again(installed) -> None:
    """The names a refused plugin offers are surveyed by running its hooks again with a recording
    ``register``: hooks that had already run to their end ran twice, their side effects too (a
    download, a print, a counter). Only the hook that failed (for the names past its failure) and
    the ones never reached run now."""
    calls = dict.fromkeys(("register_inner_models", "register_inner_losses", "register_update_rules"), 0)
    installed(_EntryPoint("s48g_counting", lambda: _plugin_counting_its_hook_calls(calls)))
    caught = _warnings_of(lambda: innerloop.available("inner_loss"))
    assert "configuration file is missing" in str(caught[0].message)
    assert calls == {"register_inner_models": 1, "register_inner_losses": 2, "register_update_rules": 1}


def _public_packages() -> list[str]:
    """innerloop, innerloop.ops and every subpackage but the built-in plugins' (as test_api_documented)."""
    import pkgutil

    found = [
        info.name
        for info in pkgutil.walk_packages(innerloop.__path__, "innerloop.")
        if info.ispkg and not info.name.startswith("innerloop.plugins")
    ]
    return ["innerloop", "innerloop.ops", *sorted(found)]


@pytest.mark.parametrize("package", _public_packages())
def test_a_name_a_package_exports_is_in_its_own_modules_all(package: str) -> None:
    """``innerloop.testing`` exported ``twin_layers`` and ``ReferenceDivergedError`` while the module
    defining them left them out of its ``__all__`` (``from innerloop.testing.checks import *`` did not
    give them). A name exported under another name (``compiled_kernel_spec``) is looked for by its own."""
    import importlib
    import inspect

    module = importlib.import_module(package)
    missing = []
    for name in getattr(module, "__all__", []):
        value = getattr(module, name)
        if not (inspect.isclass(value) or inspect.isfunction(value)) or value.__module__ == package:
            continue  # a constant or an instance (a KernelSpec names its class's module), or defined here
        defining = sys.modules[value.__module__]
        if hasattr(defining, "__all__") and value.__name__ not in defining.__all__:
            missing.append(f"{name} (defined in {value.__module__})")
    assert not missing, f"{package} exports, and its defining module's __all__ leaves out: {missing}"


def test_the_warning_points_at_the_users_line_also_once_dynamo_is_imported(installed) -> None:
    """Once torch._dynamo is imported, the registry's first build runs inside ``torch.compiler.disable``
    (``core/eager.py``): the warning pointed at torch's ``eval_frame.py``."""
    import torch._dynamo  # noqa: F401  (what any earlier torch.compile in the process has done)

    installed(_EntryPoint("s48g_broken", _fails_to_import))
    caught = _warnings_of(lambda: innerloop.available("inner_loss"))
    assert [w.filename for w in caught] == [__file__], [(w.filename, str(w.message)[:80]) for w in caught]


REPO = Path(__file__).resolve().parents[1]
#: a fast test of a module that imports no torch, so that a child pytest's cost is its start-up
LIGHT_TEST = "tests/test_docs.py::test_bash_commands_are_parsed_as_a_shell_would"


def _child_pytest(*arguments: str) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_XDIST")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *arguments, LIGHT_TEST],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow  # a child pytest in one process: ~3.5 s on an idle machine (its start-up)
def test_the_suite_runs_without_xdist() -> None:
    """``-p no:xdist`` (or a pytest without pytest-xdist) was a usage error, "unrecognized arguments: -n
    --maxprocesses 8 --dist worksteal": pyproject.toml's addopts assumed xdist. tests/conftest.py sets
    those defaults now, where xdist is loaded."""
    result = _child_pytest("-p", "no:xdist", "-q")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "1 passed" in result.stdout


def _options_after_the_suites_defaults(monkeypatch, pytestconfig, **given: object) -> SimpleNamespace:
    """The options xdist reads, after tests/conftest.py's ``pytest_cmdline_main`` saw ``given`` (what
    the command line said; xdist's own defaults for the rest) in pytest's main process."""
    here = Path(__file__).parent / "conftest.py"  # not `import conftest`: several folders have one
    (conftest,) = [
        p for p in pytestconfig.pluginmanager.get_plugins() if getattr(p, "__file__", None) == str(here)
    ]
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    option = SimpleNamespace(**{"numprocesses": None, "maxprocesses": None, "dist": "no", **given})
    config = SimpleNamespace(option=option, pluginmanager=SimpleNamespace(hasplugin=lambda name: True))
    conftest.pytest_cmdline_main(config)
    return option


def test_xdist_is_still_on_by_default_with_its_queue_shared(monkeypatch, pytestconfig) -> None:
    default = _options_after_the_suites_defaults(monkeypatch, pytestconfig)
    assert (default.numprocesses, default.maxprocesses, default.dist) == ("auto", 8, "worksteal")
    one_process = _options_after_the_suites_defaults(monkeypatch, pytestconfig, numprocesses=0)  # -n 0
    assert (one_process.numprocesses, one_process.dist) == (0, "no")
    chosen = _options_after_the_suites_defaults(
        monkeypatch, pytestconfig, numprocesses=3, maxprocesses=2, dist="load"
    )
    assert (chosen.numprocesses, chosen.maxprocesses, chosen.dist) == (3, 2, "load")


@pytest.mark.parametrize("loader", ["load_model", "load_checkpoint", "load_module"])
def test_a_changed_plugins_warning_points_at_the_users_line(loader: str, tmp_path) -> None:
    """PluginChangedWarning's fixed ``stacklevel=3`` pointed at ``load_checkpoint``'s caller, which is
    innerloop's own ``load_model`` or ``load_module`` (checkpoints.py, train/module.py) when a user calls
    those."""
    import torch
    from plugin_testing import NAME, TargetsAsGiven, TargetsDoubled

    from innerloop import checkpoints
    from innerloop.models import ModelConfig, build_model
    from innerloop.train import module

    load = {"load_module": module.load_module}.get(loader) or getattr(checkpoints, loader)
    config = {
        "vocab_size": 64,
        "hidden_size": 16,
        "num_layers": 1,
        "num_heads": 2,
        "ttt": {"inner_loss": NAME},
    }
    with isolated_registry():
        innerloop.register_inner_loss(TargetsAsGiven(), origin="s48g_first (first-dist)")
        torch.manual_seed(0)
        path = module.save_model_checkpoint(
            build_model(ModelConfig.from_dict(config)), tmp_path / "c.safetensors"
        )
        innerloop.get_registry().remove_plugin("s48g_first (first-dist)")
        innerloop.register_inner_loss(TargetsDoubled(), origin="s48g_second (second-dist)")
        with pytest.warns(checkpoints.PluginChangedWarning, match="s48g_second") as caught:
            load(path)
    assert [w.filename for w in caught if issubclass(w.category, checkpoints.PluginChangedWarning)] == [
        __file__
    ]


@pytest.mark.slow  # registers a kernel and runs its first-use probe: ~0.8 s
def test_a_refused_kernels_warning_points_at_the_users_line() -> None:
    """KernelCheckWarning's fixed ``stacklevel=4`` pointed at innerloop's
    ``plugins/optimizers/dual_form.py``, the rule that dispatched, not at the user's ``layer(x)``."""
    import torch

    sys.path.insert(0, str(Path(__file__).parent / "kernels"))
    from test_first_use import REFERENCE_FORWARD, Counting, layer_pair, register, scaled_weights

    from innerloop.kernels.first_use import KernelCheckWarning

    with isolated_registry():
        register(Counting(REFERENCE_FORWARD, scaled_weights))  # a kernel whose new weights are 1% off
        layer, _ = layer_pair()
        with torch.no_grad(), pytest.warns(KernelCheckWarning, match="failed its first-use check") as caught:
            layer(torch.randn(2, 12, 16))
    assert [w.filename for w in caught if issubclass(w.category, KernelCheckWarning)] == [__file__]


@pytest.mark.parametrize("loader", ["load_checkpoint", "load_model"])
def test_an_unverified_checkpoints_warning_points_at_the_users_line(loader: str, tmp_path) -> None:
    """UnverifiedCheckpointWarning's fixed ``stacklevel=3`` pointed at innerloop's ``load_checkpoint``
    itself (it is issued two calls below it), whichever function the user called."""
    sys.path.insert(0, str(Path(__file__).parent / "train"))
    from test_checkpoint_trust import _module_checkpoint, _read_raw, _rewrite

    from innerloop import checkpoints

    path = _module_checkpoint(tmp_path / "last.safetensors")
    metadata, tensors = _read_raw(path)
    del metadata["innerloop.sha256"]
    _rewrite(path, {**metadata, "format_version": "1"}, tensors, sign=False)  # written before checksums
    with pytest.warns(checkpoints.UnverifiedCheckpointWarning, match="no checksum") as caught:
        getattr(checkpoints, loader)(path)
    assert [
        w.filename for w in caught if issubclass(w.category, checkpoints.UnverifiedCheckpointWarning)
    ] == [__file__]


def test_an_unread_unknown_plugin_names_warning_points_at_the_users_line() -> None:
    """``model.ttt.inner_loss`` misspelt in an attention model's config is warned of when the model is
    built; the fixed ``stacklevel=3`` pointed at innerloop's ``models/lm.py``, not at ``build_model(...)``."""
    from innerloop.models import build_model

    config = {"mixer": "attention", "hidden_size": 16, "num_heads": 2, "num_layers": 1, "vocab_size": 11}
    with pytest.warns(UserWarning, match="model.ttt.inner_loss='s48g_typo' is not a registered") as caught:
        build_model({**config, "ttt": {"inner_loss": "s48g_typo"}})
    assert [w.filename for w in caught if "s48g_typo" in str(w.message)] == [__file__]


#: ``warnings.warn`` calls in innerloop/ with a fixed ``stacklevel``, each with its reason. Any other
#: takes ``stacklevel=warning_stacklevel()`` (innerloop/core/callers.py): a fixed count is right for one
#: call path only, and pointed into innerloop's own files for the others (PluginLoadWarning,
#: PluginChangedWarning, KernelCheckWarning, UnverifiedCheckpointWarning and the model config's warning did).
FIXED_STACKLEVELS = {
    "innerloop/cli.py": "the command's own lines: the CLI prints a warning as one 'innerloop <cmd>: warning:' line, without where",
    "innerloop/train/throughput.py": "attributed to the check that found the load, not to Lightning's call of the hook (test_review_s19_wording)",
    "innerloop/hf/hook.py": "raised while transformers imports its Auto classes, in whatever code imported them",
}


def test_no_warning_has_a_fixed_stacklevel_outside_the_listed_modules() -> None:
    import ast

    fixed = []
    for path in sorted((REPO / "innerloop").rglob("*.py")):
        relative, source = path.relative_to(REPO).as_posix(), path.read_text(encoding="utf-8")
        if "warnings.warn(" not in source:
            continue  # parse only the modules that warn (parsing them all took seconds)
        for node in ast.walk(ast.parse(source)):
            if not (isinstance(node, ast.Call) and ast.unparse(node.func) == "warnings.warn"):
                continue
            level = next((k.value for k in node.keywords if k.arg == "stacklevel"), None)
            if isinstance(level, ast.Constant) and relative not in FIXED_STACKLEVELS:
                fixed.append(f"{relative}:{node.lineno} stacklevel={level.value}")
    assert not fixed, f"warnings with a fixed stacklevel (use warning_stacklevel()): {fixed}"
