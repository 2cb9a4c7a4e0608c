"""Plugin modules that are not installed: ``innerloop -p MODULE`` and :data:`PLUGIN_MODULES_ENV`.

As pytest's ``-p name`` and ``PYTEST_PLUGINS``: a module named on the command line (or in the
environment variable, comma-separated) is imported and registered exactly as an installed entry
point's module is (:meth:`~innerloop.registry.manager.Registry.load_module`): what its import registers
(``@innerloop.register_inner_loss class ...``) is kept and its ``@hookimpl`` hooks run, all shown by
``innerloop plugins`` with the origin ``-p MODULE``. MODULE is an
importable module name (``my_pkg.plugin``; one that is not importable, the file ``NAME.py`` of the
working folder: the name a run records for ``-p ./my_loss.py``) or the path of a ``.py`` file
(``./my_loss.py``), which is imported as the module named after the file (its folder first on
``sys.path`` while it loads, then last: it hides no other module afterwards, and the plugin still
imports by name), so that the name and the path are the same module, imported once; a file of a package
(its folder has ``__init__.py``) is the package's module, ``-p pkg/x.py`` is ``pkg.x`` (the folder above
the package put on ``sys.path`` so), so that its relative imports work. A file whose module name is
another module's (``-p dir/json.py``; ``pkg/x.py`` of a ``pkg`` installed) is refused: imported, it
would hide that module from the whole process; so is a plugin that imports a file beside it named like
another module (``plugins/token.py``: ``import token`` gets the standard library's). One rule for both,
:func:`found_elsewhere`.

:data:`~innerloop.registry.manager.DISABLE_ENV` and :data:`~innerloop.registry.manager.ALLOW_ENV`
concern installed entry points only: a module named here is loaded because it was named.

Unlike an entry point that fails (skipped with a warning), a module named here that cannot be
loaded is an error: it was asked for by name.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from innerloop.core.functional import user_path
from innerloop.registry.kinds import PluginError
from innerloop.registry.manager import Registry, get_registry, warn_of_kernels_that_cannot_run

PLUGIN_MODULES_ENV = "INNERLOOP_PLUGIN_MODULES"
"""The environment variable naming plugin modules to load, comma-separated (as ``-p``, before it)."""

OPTION = "-p"


class PluginModuleError(PluginError):
    """A plugin module named by ``-p`` or :data:`PLUGIN_MODULES_ENV` cannot be loaded (one line)."""


def plugin_modules_from_env() -> list[str]:
    """The modules :data:`PLUGIN_MODULES_ENV` names, in order (empty items left out)."""
    value = os.environ.get(PLUGIN_MODULES_ENV, "")
    return [item.strip() for item in value.split(",") if item.strip()]


def origin_of(spec: str) -> str:
    """The origin a module named ``spec`` (a module name or a ``.py`` path) is registered under."""
    return f"{OPTION} {_module_name(spec)}"


def _is_path(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec or os.sep in spec


def _module_name(spec: str) -> str:
    return _module_of_file(_file_of(spec))[0] if _is_path(spec) else spec


def _file_of(spec: str) -> Path:
    """The file the path ``spec`` names: itself, or a package folder's ``__init__.py``."""
    path = user_path(spec).resolve()
    return path / "__init__.py" if (path / "__init__.py").is_file() else path


def _module_of_file(path: Path) -> tuple[str, Path]:
    """The module the file ``path`` is, and the folder it is imported from: ``stem`` from its own folder;
    for a file of a package (its folder, and those above, have ``__init__.py``), the dotted name from the
    folder above the outermost package (``pkg/sub/x.py`` is ``pkg.sub.x``, ``pkg/__init__.py`` is ``pkg``),
    so that its relative imports (``from .helper import x``) work and its name is the package's."""
    parts = [] if path.name == "__init__.py" else [path.stem]
    folder = path.parent
    while (folder / "__init__.py").is_file() and folder.parent != folder:
        parts.insert(0, folder.name)
        folder = folder.parent
    return ".".join(parts), folder


def _import(spec: str, how: str) -> Any:
    """Import the module ``spec`` names; a path is imported as the module it is (:func:`_module_of_file`)."""
    if not _is_path(spec):
        return _import_name(spec, how)
    path = _file_of(spec)
    if path.is_dir():
        raise PluginModuleError(
            f"{how} {spec}: {str(path)!r} is a folder with no __init__.py, not a package; give a module name "
            "or a .py file's path"
        )
    if not path.is_file() or path.suffix != ".py":
        raise PluginModuleError(
            f"{how} {spec}: no such Python file {str(path)!r} (give a .py file or a module name)"
        )
    name, folder = _module_of_file(path)
    not_names = [part for part in name.split(".") if not part.isidentifier()]
    if not_names:
        raise PluginModuleError(
            f"{how} {spec}: {path.name!r} is not importable as the module {name!r} ({not_names[0]!r} is not a "
            "Python identifier; a folder with __init__.py is a package, its name part of the module's)"
        )
    _refuse_a_name_found_elsewhere(spec, name, folder, how)
    _refuse_imports_found_elsewhere(spec, name, folder, [path], how)
    module = _import_from(folder, name, spec, how)
    _check_file(spec, module, how)
    return module


_PLUGIN_FOLDERS: list[Path] = []
"""The folders of plugin files that :func:`_import_from` put on ``sys.path`` (last once loaded)."""


def _import_from(folder: Path, name: str, spec: str, how: str) -> Any:
    """Import the module ``name`` with ``folder`` first on ``sys.path`` while it loads (its imports of
    the files beside it find them), then last where it was not on ``sys.path`` before: a later import of
    another module named like a file of ``folder`` finds that module where it is installed, not the file,
    while the plugin (whose name is found nowhere else: :func:`_refuse_a_name_found_elsewhere`) and the
    files beside it still import by name, also in the processes ``ddp_spawn`` starts with this
    ``sys.path`` (they unpickle its plugins by their module's name). So that they are the same modules
    there, a file beside it that the plugin imports must be found nowhere else either
    (:func:`_refuse_helpers_found_elsewhere`). One that fails to import (or is refused) leaves
    ``sys.path`` and ``sys.modules`` as they were."""
    added = not any(_same_folder(entry, str(folder)) for entry in sys.path)
    if added:
        sys.path.insert(0, str(folder))
    modules_before = set(sys.modules)
    loaded = False
    try:
        module = importlib.import_module(name)
        if added:
            _refuse_helpers_found_elsewhere(spec, name, folder, set(sys.modules) - modules_before, how)
        loaded = True
        return module
    finally:
        if added and str(folder) in sys.path:
            sys.path.remove(str(folder))
            if loaded:  # a module that failed to import leaves sys.path as it was
                sys.path.append(str(folder))
                _PLUGIN_FOLDERS.append(folder)
        if added and not loaded:
            for new in set(sys.modules) - modules_before:
                if new.split(".")[0] == name.split(".")[0] or _file_in(sys.modules[new], folder):
                    del sys.modules[new]


def _file_in(module: Any, folder: Path) -> bool:
    """Whether the module's file is in ``folder`` itself or a package of it."""
    return _is_in(getattr(module, "__file__", None), folder)


def _is_in(file: str | None, folder: Path) -> bool:
    return file is not None and folder in Path(file).resolve().parents


def _refuse_helpers_found_elsewhere(spec: str, name: str, folder: Path, new: set[str], how: str) -> None:
    """Refuse the plugin ``name`` when a top-level module it imported as it loaded (``new``) is a file
    beside it whose name is found elsewhere too: installed (or standard), the file would hide that module
    from the whole process, and the processes ``ddp_spawn`` starts (which import the plugin with its
    folder last on ``sys.path``) would get the other one; in the folder of another plugin file, the second
    plugin's import of it would get the first's (one module of that name per process). Also refused: a
    module the plugin imported is a file of another plugin's folder while ``folder`` has one of that name."""
    own = name.split(".")[0]
    loaded_here = [
        Path(sys.modules[entry].__file__) for entry in sorted(new) if _file_in(sys.modules[entry], folder)
    ]
    _refuse_imports_found_elsewhere(spec, name, folder, loaded_here, how)
    for helper in sorted({entry.split(".")[0] for entry in new} - {own}):
        module = sys.modules.get(helper)
        if module is None or not _file_in(module, folder):
            continue
        other = found_elsewhere(helper, folder)
        if other is not None:
            raise PluginModuleError(
                f"{how} {spec}: it imports {helper!r} from beside it ({module.__file__!r}), a module that is "
                f"also {other!r}: one module of a name per process, so the other would get this file, or "
                f"this plugin the other (in ddp_spawn's processes too); rename {Path(module.__file__).name!r}"
            )
    beside = _module_names_in(folder) - {own}
    for helper in sorted(beside & set(sys.modules)):
        theirs = getattr(sys.modules[helper], "__file__", None)
        if any(_is_in(theirs, other) for other in _PLUGIN_FOLDERS if other != folder):
            raise PluginModuleError(
                f"{how} {spec}: the module {helper!r} is {theirs!r} (beside another plugin, loaded before), "
                f"but {str(folder)!r} has a file of that name too: an import of {helper!r} here gets the "
                f"other plugin's; rename one of them"
            )


def _module_names_in(folder: Path) -> set[str]:
    """The top-level modules of ``folder``: its ``NAME.py`` files, packages (``NAME/__init__.py``) and
    compiled modules (``NAME.cpython-*.so``)."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return set()
    names = set()
    for entry in entries:
        if entry.suffix == ".py" and entry.is_file():
            names.add(entry.stem)
        elif (entry / "__init__.py").is_file():
            names.add(entry.name)
        elif entry.name.endswith(_EXTENSION_SUFFIXES) and entry.is_file():  # a compiled helper
            names.add(entry.name.split(".")[0])
    return names


_EXTENSION_SUFFIXES = tuple(importlib.machinery.EXTENSION_SUFFIXES)
"""The endings of a compiled module's file (``.cpython-311-x86_64-linux-gnu.so``, ``.abi3.so``, ``.so``)."""


def found_elsewhere(name: str, folder: Path) -> str | None:
    """Where the top-level module ``name`` is found other than in ``folder`` (the folder of a plugin file),
    or None. The one rule for a plugin file's own name and for the files beside it that it imports: a
    name is found elsewhere when the module of that name imported already (``sys.modules``) is not a file
    of ``folder`` (``import token`` gets the standard library's, not ``token.py`` beside the plugin), or
    when the import system finds it with ``folder`` off ``sys.path`` (a standard, installed, built-in or
    frozen module, a file of another folder on ``sys.path``, another plugin's folder), wherever ``folder``
    is on ``sys.path`` (the working folder is first there under ``python -c``: a file of it named like an
    installed module would hide that module). A namespace package (no file) does not count: a file or
    package wins over one, as Python's import has it."""
    module = sys.modules.get(name)
    if module is not None and not _is_module_of(getattr(module, "__file__", None), name, folder):
        spec = getattr(module, "__spec__", None)
        origin = getattr(module, "__file__", None) or getattr(spec, "origin", None)
        if origin not in (None, "namespace"):
            return str(origin)
    elsewhere = list(_sys_path_without(tuple(sys.path), str(folder), _working_folder()))
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        if find is None:
            continue
        try:
            found = find(name, elsewhere) if finder is importlib.machinery.PathFinder else find(name, None)
        except (ImportError, ValueError):
            continue
        if found is None or found.origin in (None, "namespace"):  # a namespace package: a file wins
            continue
        if not found.has_location or not _is_module_of(
            found.origin, name, folder
        ):  # built-in, frozen, a file
            return found.origin
    return None


@functools.lru_cache(maxsize=16)
def _sys_path_without(path: tuple[str, ...], folder: str, working: str) -> tuple[str, ...]:
    """The entries of ``path`` (``sys.path``) that are not ``folder``: resolved once per ``sys.path``,
    folder and ``working`` folder (what a relative entry such as ``""`` is), not once per name looked up
    (a plugin with 200 helpers looked each up three times)."""
    del working  # a key only: the entries resolve against the working folder
    return tuple(entry for entry in path if not _same_folder(entry, folder))


def _working_folder() -> str:
    try:
        return os.getcwd()
    except OSError:  # removed since
        return ""


def _is_module_of(file: str | None, name: str, folder: Path) -> bool:
    """Whether ``file`` is the top-level module ``name`` of ``folder``: ``folder/name.py`` (or a compiled
    ``name.*.so``) or a file of the
    package ``folder/name/`` (not a file of another folder on ``sys.path`` that is inside ``folder``)."""
    if file is None:
        return False
    path = Path(file).resolve()
    own_file = path.parent == folder.resolve() and path.name.split(".")[0] == name  # name.py, name.*.so
    return own_file or (folder / name).resolve() in path.parents


def _imported_names(path: Path) -> set[str]:
    """The top-level modules the file ``path`` imports by absolute name anywhere in it (``import token``,
    ``from token import x``, also inside a function, and ``importlib.import_module("token")`` or
    ``__import__("token")`` of a string literal); none for a file that does not parse (its import says
    why)."""
    try:
        tree = ast.parse(path.read_bytes(), str(path))
    except (OSError, SyntaxError, ValueError):
        return set()
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and _imports_by_name(node):
            names.add(node.args[0].value.split(".")[0])  # type: ignore[attr-defined]
    return names


def _imports_by_name(call: ast.Call) -> bool:
    """Whether ``call`` is ``importlib.import_module("name")``, ``import_module("name")`` or
    ``__import__("name")`` of an absolute name given as a string literal."""
    function = call.func
    called = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", None)
    first = call.args[0] if call.args else None
    return (
        called in ("import_module", "__import__")
        and isinstance(first, ast.Constant)
        and isinstance(first.value, str)
        and first.value[:1] not in ("", ".")
    )


def _refuse_imports_found_elsewhere(spec: str, name: str, folder: Path, files: list[Path], how: str) -> None:
    """Refuse the plugin ``name`` when one of ``files`` (of ``folder``: the plugin's, and those beside it
    that its import loaded) imports a module named like a file beside it that is found elsewhere too
    (:func:`found_elsewhere`): the import gets the other module, not the file (``import token`` the
    standard library's), or the file hides the other from the whole process."""
    beside = _module_names_in(folder) - {name.split(".")[0]}
    for helper in sorted(set().union(*(_imported_names(file) for file in files)) & beside):
        other = found_elsewhere(helper, folder)
        if other is not None:
            raise PluginModuleError(
                f"{how} {spec}: it imports {helper!r}, a module of a file beside it in {str(folder)!r}, which is "
                f"also {other!r}: one module of a name per process, so the import gets the other one (or the "
                f"file hides it from the whole process, and ddp_spawn's processes get the other); rename the "
                f"file {helper!r} beside the plugin (and its imports)"
            )


def _refuse_a_name_found_elsewhere(spec: str, name: str, folder: Path, how: str) -> None:
    """Refuse the file ``spec`` when its top-level module name (``json`` for ``dir/json.py``, ``pkg`` for
    ``pkg/x.py``) is found elsewhere (:func:`found_elsewhere`: imported already from another file, or a
    standard library or installed module, wherever the file's folder is on ``sys.path``): imported, the
    file would hide that module from the whole process (or be that other module); and ``pkg.x`` of
    another ``pkg`` is no module at all."""
    top = name.split(".")[0]
    other = found_elsewhere(top, folder)
    if other is not None:
        raise PluginModuleError(
            f"{how} {spec}: the module {top!r} is already another module here ({other!r}), which "
            f"importing {spec!r} as {name!r} would hide from the whole process; rename the file (or its package)"
        )


def _import_name(name: str, how: str) -> Any:
    """Import the module ``name``; where it is not importable, the file ``NAME.py`` of the working
    folder (``pkg/x.py`` for ``pkg.x``, :func:`_file_in_working_folder`) (the ``innerloop`` console script has its own folder on ``sys.path``, not the working one, so
    the name a run records, ``-p my_loss`` for ``-p ./my_loss.py``, did not import even beside the file)."""
    if not all(part.isidentifier() for part in name.split(".")):
        raise PluginModuleError(
            f"{how} {name}: {name!r} is not a module name (Python identifiers joined by dots: my_pkg.plugin) "
            "nor a path (one has a '/' or ends in .py); give a module name or a .py file's path"
        )
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name != name.split(".")[0]:  # the module was found; an import inside it failed
            raise
        beside = _file_in_working_folder(name)
        if beside.is_file() and _module_name(str(beside)) == name:  # pkg/x.py is pkg.x where pkg is a package
            return _import(str(beside), how)
        raise ModuleNotFoundError(
            f"{error}, on sys.path nor as {str(beside.relative_to(Path.cwd()))!r} in {str(Path.cwd())!r}: "
            "give the .py file's path "
            f"(-p path/to/{name.split('.')[-1]}.py) or make the module importable (PYTHONPATH)",
            name=error.name,
        ) from error


def _file_in_working_folder(name: str) -> Path:
    """The file of the working folder that would be the module ``name``: ``a/b.py`` for ``a.b``, or the
    package's ``a/b/__init__.py`` where that is a file."""
    path = Path.cwd().joinpath(*name.split("."))
    package = path / "__init__.py"
    return package if package.is_file() else path.with_suffix(".py")


def _check_file(spec: str, module: Any, how: str) -> None:
    """Refuse the path ``spec`` when the module of its name (imported already, or imported from
    another file found on ``sys.path`` before its own folder) is another file: the two would be one
    plugin, ``-p NAME``."""
    path = _file_of(spec)
    found = getattr(module, "__file__", None)
    if found is None or Path(found).resolve() != path:
        raise PluginModuleError(
            f"{how} {spec}: the module {_module_name(spec)!r} is already another file here ({found!r}), not "
            f"{str(path)!r}; rename the file or give its module name"
        )


def _same_folder(entry: str, folder: str) -> bool:
    try:
        return Path(entry or ".").resolve() == Path(folder)
    except OSError:
        return False


def load_plugin_module(
    spec: str | os.PathLike[str], registry: Registry | None = None, how: str = OPTION
) -> str:
    """Import the plugin module ``spec`` (a module name or a ``.py`` path, a str or a path object) and register it in
    ``registry`` (default the process-wide one) as an entry point's module is; returns its origin.

    A module already loaded this way into the registry is not loaded again. A module that does not
    import, or that the registry refuses (a name already taken, no hook: the registry's message), raises
    a one-line :class:`PluginModuleError` that starts with ``how`` (``-p`` or the environment variable)
    and the module; what its import registered is removed again.
    """
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str):
        raise TypeError(
            f"spec must be a module name or a .py file's path (a str or os.PathLike); got {type(spec).__name__} "
            f"{spec!r}"
        )
    registry = registry if registry is not None else get_registry()
    origin = origin_of(spec)
    if origin in registry.plugin_modules:
        if _is_path(spec):  # the same module name: the same file, or a refusal
            _check_file(spec, sys.modules.get(_module_name(spec)), how)
        return origin
    before = {(entry.kind, entry.name) for entry in registry.entries()}
    doing = f"importing {_module_name(spec)!r}"
    try:
        module = _import(spec, how)
        doing = "its registration hook"
        registered = registry.load_module(module, origin, module.__name__, before)
    except PluginModuleError:
        registry.roll_back_since(before, _module_name(spec))
        raise
    except PluginError as error:  # refused by the registry: its own message, after the option
        registry.roll_back_since(before, _module_name(spec))
        raise PluginModuleError(f"{how} {spec}: " + " ".join(str(error).split())) from error
    except (Exception, SystemExit) as error:  # a script-like module: sys.exit or argparse at import
        registry.roll_back_since(before, _module_name(spec))
        raise PluginModuleError(
            f"{how} {spec}: {doing} raised {type(error).__name__}: " + " ".join(str(error).split())
        ) from error
    registry.plugin_modules.append(origin)
    if _is_path(spec):  # its name alone imports only beside the file (the working folder): keep the file
        _FILES_GIVEN[origin] = str(
            _file_of(spec).parent if _file_of(spec).name == "__init__.py" else _file_of(spec)
        )
    warn_of_kernels_that_cannot_run(registry, [e for e in registered if e.kind == "kernel"], in_process=True)
    return origin


def load_plugin_modules(
    command_line: list[str | os.PathLike[str]], registry: Registry | None = None
) -> list[str]:
    """Load the modules of :data:`PLUGIN_MODULES_ENV`, then those of ``command_line`` (``-p``), each
    once; returns their origins, in order."""
    if isinstance(command_line, str | os.PathLike):
        raise TypeError(
            f"command_line must be a list of module names or .py paths; got the {type(command_line).__name__} "
            f"{os.fspath(command_line)!r}: "
            f"pass [{os.fspath(command_line)!r}]"
        )
    named = [(spec, f"{PLUGIN_MODULES_ENV}:") for spec in plugin_modules_from_env()]
    named += [(spec, OPTION) for spec in command_line]
    origins = [load_plugin_module(spec, registry, how) for spec, how in named]
    return list(dict.fromkeys(origins))


_FILES_GIVEN: dict[str, str] = {}
"""The absolute path of the file (or package folder) of each plugin module loaded from a path (``-p
plugins/my_loss.py``), by its origin (``-p my_loss``), whose name alone imports only from the folder
holding it."""


def plugin_module_options(registry: Registry | None = None) -> list[str]:
    """The ``-p MODULE`` arguments of ``innerloop`` that load again the plugin modules loaded into
    ``registry`` (default the process-wide one), in load order: a module loaded from a path by its file's
    absolute path, one loaded by name by its name; ``[]`` when none was loaded. A command that a result
    file or a run's config.yaml records to make it again starts with them: without them it fails, or runs
    with another plugin of that name."""
    words: list[str] = []
    for origin in loaded_plugin_modules(registry):
        words += [OPTION, _FILES_GIVEN.get(origin, origin.removeprefix(f"{OPTION} "))]
    return words


def loaded_plugin_modules(registry: Registry | None = None) -> list[str]:
    """The origins (``-p MODULE``) of the plugin modules loaded into ``registry`` (default the
    process-wide one), in load order."""
    return list((registry if registry is not None else get_registry()).plugin_modules)
