"""One path for loading a plugin module (review s50a): an installed entry point's module and a module named
with ``innerloop -p`` go through the same registry method, so every branch (a hooked module, one that
registers at import, one imported for an earlier registry, one loaded already, one with no hook, one that
fails at import, one that takes a built-in's name) is tested for both callers."""

from __future__ import annotations

import importlib
import itertools
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
from plugin_testing import PLUGIN_LOSS_CLASS, plugin_module_folder

from innerloop.registry import DISABLE_ENV, get_registry, isolated_registry
from innerloop.registry.modules import PLUGIN_MODULES_ENV, PluginModuleError, load_plugin_module

_COUNTER = itertools.count()
PREFIX = "s50a_mod_"

_LOSS = PLUGIN_LOSS_CLASS

_IMPORTS = "import innerloop\nfrom innerloop.core.protocol import InnerLoss, LossPairs\nfrom innerloop.registry import hookimpl\n"

HOOKED = _IMPORTS + _LOSS + "\n\n@hookimpl\ndef register_inner_losses(register):\n    register({cls}())\n"
DECORATED = _IMPORTS + "\n@innerloop.register_inner_loss" + _LOSS
BOTH = (
    DECORATED
    + _LOSS.replace("{cls}", "{cls}Hooked").replace('"{name}"', '"{name}_hooked"')
    + ("\n\n@hookimpl\ndef register_inner_losses(register):\n    register({cls}Hooked())\n")
)
NO_HOOK = _IMPORTS + _LOSS
FAILS_AT_IMPORT = DECORATED + "\nraise RuntimeError('no GPU here')\n"

CALLERS = ["entry point", "-p"]


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A folder on sys.path for this file's plugin modules, in a fresh registry (plugin_module_folder)."""
    with plugin_module_folder(tmp_path, monkeypatch, PREFIX) as path:
        yield path


def _write(folder: Path, template: str, name: str | None = None) -> tuple[str, str]:
    """A plugin module (a fresh name each time) in ``folder``; returns (module, inner loss name)."""
    number = next(_COUNTER)
    module, loss = f"{PREFIX}{number}", name or f"s50a_loss_{number}"
    (folder / f"{module}.py").write_text(template.format(cls=f"Loss{number}", name=loss))
    return module, loss


def _entry_point(module: str) -> SimpleNamespace:
    point = SimpleNamespace(
        name=f"ep_{module}",
        value=module,
        group="innerloop",
        dist=SimpleNamespace(name="s50a-dist", version="1"),
    )
    point.load = lambda: importlib.import_module(module)
    return point


def _load_origin(caller: str, module: str) -> str:
    return f"ep_{module} (s50a-dist)" if caller == "entry point" else f"-p {module}"


def _load(caller: str, module: str) -> str | None:
    """Load ``module`` into the process registry as ``caller`` does; the reason it was refused, or None."""
    registry = get_registry()
    if caller == "entry point":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            broken = registry.add_entry_point(_entry_point(module))
        return None if broken is None else broken.error
    try:
        load_plugin_module(module, registry)
    except PluginModuleError as error:
        return str(error)
    return None


def _losses() -> list[str]:
    return get_registry().names("inner_loss")


# ---- every branch, for both callers ---------------------------------------------------------------


@pytest.mark.parametrize("caller", CALLERS)
def test_a_hooked_module_is_registered_under_how_it_was_loaded(folder, caller) -> None:
    module, loss = _write(folder, HOOKED)
    assert _load(caller, module) is None
    (entry,) = [e for e in get_registry().entries("inner_loss") if e.name == loss]
    assert entry.origin == _load_origin(caller, module)


@pytest.mark.parametrize("caller", CALLERS)
def test_a_module_that_registers_at_import_needs_no_hook(folder, caller) -> None:
    module, loss = _write(folder, DECORATED)
    assert _load(caller, module) is None
    assert loss in _losses()
    assert get_registry().broken() == []


@pytest.mark.parametrize("caller", CALLERS)
def test_a_module_imported_for_an_earlier_registry_registers_again(folder, caller) -> None:
    module, loss = _write(folder, DECORATED)
    assert _load(caller, module) is None
    with isolated_registry():  # imported already: its decorator does not run again
        assert loss not in _losses()
        assert _load(caller, module) is None
        assert loss in _losses()


@pytest.mark.parametrize("template", [HOOKED, DECORATED], ids=["hooked", "decorated"])
def test_a_p_module_an_entry_point_loaded_already_is_not_loaded_again(folder, template) -> None:
    module, loss = _write(folder, template)
    assert _load("entry point", module) is None
    assert _load("-p", module) is None
    assert _losses().count(loss) == 1


@pytest.mark.parametrize("caller", CALLERS)
def test_a_module_with_no_hook_is_refused_naming_the_hooks(folder, caller) -> None:
    module, loss = _write(folder, NO_HOOK)
    refused = _load(caller, module)
    assert refused is not None and "implements no innerloop hook" in refused
    assert loss not in _losses()


@pytest.mark.parametrize("caller", CALLERS)
def test_a_module_that_fails_at_import_leaves_nothing_registered(folder, caller) -> None:
    module, loss = _write(folder, FAILS_AT_IMPORT)
    refused = _load(caller, module)
    assert refused is not None and "raised RuntimeError: no GPU here" in refused
    assert loss not in _losses()  # registered by its import before it failed: rolled back


@pytest.mark.parametrize("template", [HOOKED, DECORATED], ids=["hooked", "decorated"])
@pytest.mark.parametrize("caller", CALLERS)
def test_a_module_that_takes_a_builtins_name_is_refused_and_the_builtin_kept(
    folder, caller, template
) -> None:
    builtin = get_registry().inner_loss("reconstruction")
    module, _ = _write(folder, template, name="reconstruction")
    refused = _load(caller, module)
    assert refused is not None and "'reconstruction'" in refused and "already registered" in refused
    assert get_registry().inner_loss("reconstruction") is builtin


# ---- where the two paths differed (each seen failing before they became one) -------------------------


@pytest.mark.parametrize(("first", "then"), [("-p", "entry point"), ("entry point", "-p")])
def test_a_module_imported_for_an_earlier_registry_by_the_other_caller_registers_again(
    folder, first, then
) -> None:
    """The two paths kept what a module registered at import under different keys (``-p MODULE`` and the
    entry point's value): a module loaded one way, then in a later registry the other way, was refused as
    having no hook."""
    module, loss = _write(folder, DECORATED)
    assert _load(first, module) is None
    with isolated_registry():
        assert _load(then, module) is None
        assert loss in _losses()


@pytest.mark.parametrize("template", [HOOKED, DECORATED], ids=["hooked", "decorated"])
@pytest.mark.parametrize(("first", "then"), [("-p", "entry point"), ("entry point", "entry point")])
def test_an_entry_point_whose_module_is_loaded_already_is_not_broken(folder, template, first, then) -> None:
    """A -p module already loaded (or a second entry point naming the same module) was listed as broken:
    "already registered (this same object)" or "implements no innerloop hook", its objects registered."""
    module, loss = _write(folder, template)
    assert _load(first, module) is None
    assert _load(then, module) is None
    assert _losses().count(loss) == 1
    assert get_registry().broken() == []


@pytest.mark.parametrize("caller", CALLERS)
def test_a_module_with_hooks_that_also_registers_at_import_runs_its_hooks(folder, caller) -> None:
    """-p took what the module's import registered as "loaded already" and never ran its hooks."""
    module, loss = _write(folder, BOTH)
    assert _load(caller, module) is None
    assert {loss, f"{loss}_hooked"} <= set(_losses())


@pytest.mark.parametrize(("first", "then"), [("entry point", "-p"), ("-p", "-p")])
def test_a_package_whose_submodule_registers_at_import_is_loaded_once(folder, first, then) -> None:
    """``-p pkg`` where ``pkg/__init__.py`` imports a decorated ``pkg.losses``: an entry point having loaded
    it already, -p refused it (no hook), the objects being registered by ``pkg.losses``, not ``pkg``."""
    package = folder / f"{PREFIX}pkg{next(_COUNTER)}"
    package.mkdir()
    (package / "__init__.py").write_text("from . import losses\n")
    (package / "losses.py").write_text(DECORATED.format(cls="PackageLoss", name=f"{package.name}_loss"))
    assert _load(first, package.name) is None
    with isolated_registry():
        assert _load(then, package.name) is None
        assert _load(then, package.name) is None
        assert _losses().count(f"{package.name}_loss") == 1


# ---- `innerloop plugins` names how a module was loaded ------------------------------------------------


@pytest.mark.parametrize("template", [HOOKED, DECORATED, BOTH], ids=["hooked", "decorated", "both"])
@pytest.mark.parametrize("caller", CALLERS)
def test_the_listing_names_how_each_object_was_loaded(folder, caller, template) -> None:
    """A module that registers at import was listed under its class (``module.Class``), not ``-p MODULE``
    or the entry point that loaded it; in a later registry (registered again) too."""
    from innerloop.registry import format_plugin_table

    module, loss = _write(folder, template)
    assert _load(caller, module) is None
    for _ in range(2):
        rows = [line.split(None, 2) for line in format_plugin_table().splitlines() if f" {loss}" in line]
        assert rows and all(row[2] == _load_origin(caller, module) for row in rows), rows
        with isolated_registry():
            assert _load(caller, module) is None
            rows_again = [
                line.split(None, 2) for line in format_plugin_table().splitlines() if f" {loss}" in line
            ]
            assert rows_again == rows


@pytest.mark.parametrize("template", [HOOKED, DECORATED], ids=["hooked", "decorated"])
def test_removing_a_p_module_by_its_listed_origin_removes_it_and_it_loads_again(folder, template) -> None:
    """``remove_plugin`` takes the origin ``innerloop plugins`` shows: ``-p MODULE`` removed nothing of a
    module that registers at import (ValueError), and a removed -p module was still taken as loaded, so
    naming it again registered nothing."""
    module, loss = _write(folder, template)
    registry = get_registry()
    load_plugin_module(module, registry)
    registry.remove_plugin(f"-p {module}")
    assert loss not in _losses()
    assert registry.plugin_modules == []
    load_plugin_module(module, registry)
    assert loss in _losses()


@pytest.mark.parametrize("caller", CALLERS)
def test_a_module_with_hooks_that_registers_at_import_has_both_in_a_later_registry(folder, caller) -> None:
    """Seen failing (the listing test above found it): in a later registry only the hooks ran, so what the
    module registered at import was missing there (its import does not run again)."""
    module, loss = _write(folder, BOTH)
    assert _load(caller, module) is None
    with isolated_registry():
        assert _load(caller, module) is None
        assert {loss, f"{loss}_hooked"} <= set(_losses())


# ---- -p path/to/file.py of a package ------------------------------------------------------------------

_RELATIVE = "from .helper import NAME\n" + HOOKED.replace('"{name}"', "NAME")


@pytest.fixture
def outside(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A folder that is not on sys.path (what -p puts there is undone), the working folder; a package
    ``s50a_mod_pkgN`` in it with a ``plugin.py`` that imports ``.helper``. Yields (package folder, loss)."""
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(DISABLE_ENV, "1")
    monkeypatch.delenv(PLUGIN_MODULES_ENV, raising=False)
    number = next(_COUNTER)
    package = tmp_path / f"{PREFIX}pkg{number}"
    package.mkdir()
    (package / "__init__.py").write_text("")
    loss = f"s50a_relative_{number}"
    (package / "helper.py").write_text(f"NAME = {loss!r}\n")
    (package / "plugin.py").write_text(_RELATIVE.format(cls=f"Loss{number}", name=loss))
    modules_before = set(sys.modules)
    with isolated_registry():
        yield package, loss
    for name in set(sys.modules) - modules_before:
        if name.startswith(PREFIX):
            del sys.modules[name]


@pytest.mark.parametrize("spec", ["{package}/plugin.py", "./{name}/plugin.py"])
def test_a_file_of_a_package_is_imported_as_the_packages_module(outside, spec) -> None:
    """``-p pkg/plugin.py`` was imported as the top-level module ``plugin``: its relative imports failed
    ("attempted relative import with no known parent package"). It is the module ``pkg.plugin``, and
    naming it so (the name a run records) is the same module, loaded once."""
    package, loss = outside
    origin = load_plugin_module(spec.format(package=package, name=package.name), get_registry())
    assert origin == f"-p {package.name}.plugin"
    assert get_registry().entries("inner_loss")[0].origin  # registered
    assert loss in _losses()
    assert load_plugin_module(f"{package.name}.plugin", get_registry()) == origin
    assert _losses().count(loss) == 1


def test_the_recorded_dotted_name_of_a_package_file_loads_from_the_working_folder(outside) -> None:
    """A later run names ``-p pkg.plugin`` (config.yaml, a checkpoint's error) where the working folder is
    not on sys.path (the console script): found as ``pkg/plugin.py`` there, as ``-p my_loss`` finds
    ``my_loss.py``."""
    package, loss = outside
    assert load_plugin_module(f"{package.name}.plugin", get_registry()) == f"-p {package.name}.plugin"
    assert loss in _losses()


def test_a_packages_init_file_is_the_package(outside) -> None:
    package, _ = outside
    (package / "__init__.py").write_text("from .plugin import *  # noqa\n")
    assert load_plugin_module(str(package / "__init__.py"), get_registry()) == f"-p {package.name}"


def test_a_package_folder_that_is_not_an_identifier_is_refused_naming_it(outside) -> None:
    package, _ = outside
    bad = package / "not-a-name"
    bad.mkdir()
    (bad / "__init__.py").write_text("")
    (bad / "plugin.py").write_text("")
    with pytest.raises(PluginModuleError, match=r"'not-a-name' is not a Python identifier"):
        load_plugin_module(str(bad / "plugin.py"), get_registry())


def test_a_package_folder_given_by_its_path_is_the_package(outside) -> None:
    """``-p ./pkg`` (a folder with ``__init__.py``) said "no such Python file" of a folder that exists."""
    package, _ = outside
    (package / "__init__.py").write_text("from .plugin import *  # noqa\n")
    for spec in (f"./{package.name}", f"./{package.name}/"):
        assert load_plugin_module(spec, get_registry()) == f"-p {package.name}"


@pytest.mark.parametrize(
    ("spec", "said"),
    [
        ("./{folder}", "is a folder with no __init__.py, not a package"),
        ("", "'' is not a module name"),
        ("  ", "'  ' is not a module name"),
        ("my loss", "'my loss' is not a module name"),
    ],
)
def test_what_is_neither_a_module_name_nor_a_file_says_what_is_valid(outside, spec, said) -> None:
    """A folder that is not a package was "no such Python file"; an empty or blank -p was "importing ''
    raised ValueError: Empty module name" and a name with a space was looked for as the file ' .py'."""
    package, _ = outside
    folder = package.parent / "not_a_package"
    folder.mkdir()
    with pytest.raises(PluginModuleError, match="give a module name") as refused:
        load_plugin_module(spec.format(folder=folder.name), get_registry())
    assert said in str(refused.value) and str(refused.value).startswith("-p ")


@pytest.mark.parametrize("caller", CALLERS)
def test_an_error_naming_a_plugin_names_the_origin_the_listing_shows(folder, caller) -> None:
    """``plugin_label`` (the plugin in a layer's or a training step's error) says "origin as `innerloop
    plugins` shows it": it named the class origin of what a module registered at import."""
    from innerloop.core.layer import plugin_label

    module, loss = _write(folder, DECORATED)
    assert _load(caller, module) is None
    label = plugin_label("inner_loss", get_registry().inner_loss(loss))
    assert label == f"inner loss {loss!r} (origin {_load_origin(caller, module)!r})"


@pytest.mark.parametrize("caller", CALLERS)
def test_a_name_clash_names_the_other_plugin_as_the_listing_shows_it(folder, caller) -> None:
    """The registrar's "already registered by plugin ..." named the class origin of what a module's
    import registered, which ``innerloop plugins`` does not show."""
    first, loss = _write(folder, DECORATED)
    assert _load(caller, first) is None
    second, _ = _write(folder, HOOKED, name=loss)
    refused = _load(caller, second)
    assert refused is not None and f"already registered by plugin {_load_origin(caller, first)!r}" in refused


_KERNEL_FOR_NO_MODEL = """
from innerloop.kernels.spec import KernelSpec
from innerloop.registry import hookimpl


def forward(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps, **options):
    raise NotImplementedError


@hookimpl
def register_kernels(register):
    register(KernelSpec(name="{name}", inner_model="s50a_no_such_model", inner_loss="reconstruction",
                        update_rule="dual_form", forward=forward, verify=lambda inputs: None))
"""


def test_a_p_kernel_that_can_never_run_is_warned_of_and_stays_loaded(folder) -> None:
    """The warning of a kernel for an inner model no plugin provides was raised inside the try that rolls
    a failing module back: with warnings as errors the loaded module was removed as if it had failed."""
    from innerloop.registry import PluginLoadWarning

    module, kernel = _write(folder, _KERNEL_FOR_NO_MODEL)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginLoadWarning)
        with pytest.raises(PluginLoadWarning, match="s50a_no_such_model"):
            load_plugin_module(module, get_registry())
    assert kernel in get_registry().names("kernel")
    assert get_registry().plugin_modules == [f"-p {module}"]


def test_the_python_api_takes_a_path_and_refuses_a_bare_string_for_the_list(folder) -> None:
    """``load_plugin_module(Path)`` raised AttributeError ('PosixPath' has no 'endswith'); and
    ``load_plugin_modules("my_loss")`` loaded each character as a module (``-p m: importing 'm'``)."""
    from innerloop.registry.modules import load_plugin_modules

    module, loss = _write(folder, HOOKED)
    assert load_plugin_module(folder / f"{module}.py", get_registry()) == f"-p {module}"
    assert loss in _losses()
    with pytest.raises(
        TypeError, match=rf"command_line must be a list .*got the str '{module}'.*\['{module}'\]"
    ):
        load_plugin_modules(module)
    with pytest.raises(TypeError, match=r"spec must be a module name or a \.py file's path.*got int 3"):
        load_plugin_module(3, get_registry())  # type: ignore[arg-type]
