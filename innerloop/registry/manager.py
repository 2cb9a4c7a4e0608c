"""The plugin registry: pluggy underneath, typed registrars on top.

``get_registry()`` builds the process-wide registry on first use: the built-in plugins
(``innerloop.plugins.DEFAULT_PLUGINS``), then the ``innerloop`` entry points of installed packages
unless the environment forbids them:

- ``INNERLOOP_DISABLE_EXTERNAL_PLUGINS=1`` loads no entry-point plugin at all;
- ``INNERLOOP_PLUGINS=name1,name2`` loads only the entry points with those names.

Every registered object remembers the plugin it came from (its origin), shown by
``innerloop plugins`` as the plugin that loaded it (:meth:`Registry.loaded_by`: what an entry point's or a
``-p`` module's import registered, ``@innerloop.register_inner_loss class ...``, shows that entry point or
``-p MODULE``, not the class).

Registering a plugin is all or nothing: if one of its hooks raises or returns a value (hooks call
``register(obj)``; a returned object would be silently dropped), one of its objects fails validation
or a name clashes, the registry is left exactly as it was. A plugin that implements none of the
hooks, or marks with ``hookimpl`` a function whose name is not a hook (a misspelling), is refused
before anything runs. An entry-point plugin that
fails to load is skipped with one :class:`PluginLoadWarning` and listed as broken; only asking for a
name it would have provided fails, with the reason. When two installed plugins (entry points of one
distribution or of two) register the same name, the second to load is refused (the warning), and asking
for that name fails naming both (which one a run got would otherwise depend on the order they load in), also when one was refused for another
reason (every name its hooks offer counts, those past its failure too); a plugin that takes a
built-in's name is refused and the built-in is used.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib
import inspect
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import pluggy
import torch

from innerloop.core.callers import first_frame_outside, warning_stacklevel
from innerloop.core.eager import run_eagerly
from innerloop.core.environment import EnvironmentSwitchError, environment_flag
from innerloop.core.functional import saved_tensors_hooks_suspended
from innerloop.core.identity import IdentityTable
from innerloop.core.protocol import InnerLoss, InnerModel, UpdateRule
from innerloop.core.scan import add_note
from innerloop.core.wording import a_type
from innerloop.kernels import first_use
from innerloop.kernels.spec import KernelSpec
from innerloop.registry import hookspecs
from innerloop.registry.kinds import KIND_BY_NAME, KIND_NAMES, KINDS, Kind, PluginError
from innerloop.registry.settings import declared_settings, declares_settings
from innerloop.registry.verdicts import PassedChecks

ENTRY_POINT_GROUP = "innerloop"
DISABLE_ENV = "INNERLOOP_DISABLE_EXTERNAL_PLUGINS"
ALLOW_ENV = "INNERLOOP_PLUGINS"
BUILTIN_PREFIX = "builtin:"


class PluginLoadWarning(UserWarning):
    """An external (entry-point) plugin failed to load and was skipped."""


@dataclass(frozen=True)
class Entry:
    """One registered object and where it came from."""

    kind: str
    name: str
    obj: Any
    origin: str


@dataclass(frozen=True)
class BrokenPlugin:
    """An entry-point plugin that failed to load and was skipped.

    ``names`` are the ``(kind, name)`` pairs it registered or tried to register before it failed:
    empty when it failed to import (what it would have provided is then unknowable).
    """

    entry_point: str
    distribution: str
    error: str
    names: tuple[tuple[str, str], ...] = ()

    @property
    def origin(self) -> str:
        return f"{self.entry_point} ({self.distribution})"

    def message(self) -> str:
        """One line: which plugin, from which distribution, what went wrong, what to do."""
        return (
            f"plugin {self.entry_point!r} from distribution {self.distribution!r} failed to load and was "
            f"skipped: {self.error} (fix or uninstall {self.distribution!r}, or set {DISABLE_ENV}=1 to load "
            "no external plugin)"
        )


# --------------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------------


def _one_thread_at_a_time(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` run holding the registries' lock (``_LOCK``, reentrant): a change of a registry
    (its checks, clash checks and commit) is whole before another thread's starts (pluggy's plugin
    manager is not thread-safe, and two plugins staged at once could both pass the clash check)."""

    @functools.wraps(method)
    def holding_the_lock(*args: Any, **kwargs: Any) -> Any:
        with _LOCK:
            return method(*args, **kwargs)

    return holding_the_lock


class _Staging:
    """What one plugin registers, held back until all its hooks have run (then committed at once)."""

    def __init__(self) -> None:
        self.entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KIND_NAMES}
        self.attempted: list[tuple[str, str]] = []  # (kind, name) of every object offered, accepted or not
        self.completed_hooks: set[str] = set()  # the hooks that ran to their end (all they offered is above)


class Registry:
    """Registered inner models, inner losses, update rules, kernels and the model-level inner losses
    and update rules (TTT-E2E), by name, with origins; and the entry-point plugins that failed to load."""

    def __init__(self) -> None:
        self.plugin_manager = pluggy.PluginManager("innerloop")
        self.plugin_manager.add_hookspecs(hookspecs)
        self._entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KIND_NAMES}
        self._broken: list[BrokenPlugin] = []
        self._distributions: dict[str, tuple[str, str | None]] = {}  # origin -> (distribution, version)
        self.plugin_modules: list[str] = []  # origins of the modules loaded by `-p` (registry.modules)
        self._loaded_by: dict[str, str] = {}  # origin -> the load that registered it, where they differ

    # ---- registering -----------------------------------------------------------------------------

    def registrar(self, kind: Kind, origin: str, staging: _Staging) -> Callable[[Any], Any]:
        """The ``register`` callable handed to a plugin's hook for ``kind``; accepted objects go to
        ``staging`` (the registry itself changes only when the whole plugin has been accepted)."""

        def register(obj: Any) -> Any:
            offered = getattr(obj, "name", None)
            if isinstance(offered, str):
                staging.attempted.append((kind.name, offered))
            name = validate_plugin(kind, obj, external=not origin.startswith(BUILTIN_PREFIX))
            registered = self._entries[kind.name]
            if name in registered:
                raise PluginError(
                    f"{kind.label} name {name!r} from plugin {origin!r} is already registered "
                    f"by plugin {self.loaded_by(registered[name].origin)!r}; choose another name"
                )
            if name in staging.entries[kind.name]:
                raise PluginError(f"plugin {origin!r} registers the {kind.label} name {name!r} twice")
            staging.entries[kind.name][name] = Entry(kind.name, name, obj, origin)
            return obj

        register.__doc__ = f"Register a {kind.label} (validated against the protocol)."
        return register

    @_one_thread_at_a_time
    def add_plugin(self, plugin: Any, origin: str | None = None) -> None:
        """Register a plugin (module or object with hookimpls) and run its registration hooks.

        All or nothing: if the plugin is refused (a hook raises, an object fails validation, a name
        clashes, the plugin or its origin is already registered), the error is raised and the
        registry is left exactly as it was.
        """
        if origin is not None and not isinstance(origin, str):
            raise PluginError(
                f"origin must be a str (a name for the plugin); got {type(origin).__name__} {origin!r}"
            )
        origin = origin or getattr(plugin, "__name__", None) or type(plugin).__name__
        if isinstance(plugin, str):
            raise PluginError(
                f"register a plugin module or object, not its name: got the str {plugin!r}; import the module "
                "and pass it (innerloop.register(importlib.import_module(name))), or install it with an "
                f"{ENTRY_POINT_GROUP!r} entry point"
            )
        staging = _Staging()
        self._add(plugin, origin, staging)
        if not origin.startswith(BUILTIN_PREFIX) and _BUILDING is not self:  # in-process, once built
            warn_of_kernels_that_cannot_run(self, list(staging.entries["kernel"].values()), in_process=True)

    def _add(self, plugin: Any, origin: str, staging: _Staging) -> None:
        if origin.startswith(BUILTIN_PREFIX) and not _is_builtin_module(plugin):  # an entry point's name too
            raise PluginError(
                f"origin {origin!r}: the prefix {BUILTIN_PREFIX!r} is reserved for innerloop's own plugins "
                f"(the modules of innerloop.plugins.DEFAULT_PLUGINS, whose update rules the test suite checks "
                "instead of the registrar); choose another origin"
            )
        self._check_new(plugin, origin)
        self._check_hook_names(plugin, origin)
        try:
            self.plugin_manager.register(plugin, name=origin)
            self.plugin_manager.check_pending()
        except (pluggy.PluginValidationError, ValueError) as error:
            self._forget(plugin)
            raise PluginError(
                f"plugin {origin!r} is not a valid innerloop plugin: {_one_line(error)}{_hook_arguments_advice(error)}"
            ) from error
        try:
            for kind in KINDS:
                returned = self._hook_of(plugin, kind.hook)(register=self.registrar(kind, origin, staging))
                staging.completed_hooks.add(kind.hook)
                # pluggy collects the non-None return values of the implementations; `return
                # register(obj)` returns what was registered and is fine, anything else was dropped
                registered = {id(entry.obj) for entry in staging.entries[kind.name].values()}
                dropped = [value for value in returned if id(value) not in registered]
                if dropped:
                    offered = getattr(dropped[0], "name", None)
                    if isinstance(offered, str):  # asking for it later names this plugin's failure
                        staging.attempted.append((kind.name, offered))
                    raise _returned_error(origin, kind, dropped[0])
        except BaseException as error:
            self._forget(plugin)
            if isinstance(error, Exception) and not isinstance(error, PluginError):  # the plugin's own error
                add_note(error, f"raised by a registration hook of plugin {origin!r}; nothing was registered")
            raise
        self._commit(staging)

    def _commit(self, staging: _Staging) -> None:
        """Add what ``staging`` holds (a plugin accepted whole) to the registry."""
        for kind, accepted in staging.entries.items():
            self._entries[kind].update(accepted)

    def _hook_of(self, plugin: Any, hook_name: str) -> pluggy.HookCaller:
        """The pluggy hook caller of ``hook_name`` that calls ``plugin``'s implementation only (each
        plugin gets its own registrar, which records where every object came from)."""
        others = [p for p in self.plugin_manager.get_plugins() if p is not plugin]
        return self.plugin_manager.subset_hook_caller(hook_name, remove_plugins=others)

    def _check_new(self, plugin: Any, origin: str) -> None:
        """Refuse, before touching anything, a plugin object or an origin that is already registered."""
        if self.plugin_manager.is_registered(plugin):
            raise PluginError(
                f"plugin {self.plugin_manager.get_name(plugin)!r} is already registered (this same object); "
                "nothing was changed"
            )
        if self.plugin_manager.has_plugin(origin):
            raise PluginError(
                f"a plugin named {origin!r} is already registered; nothing was changed. To replace it (e.g. when "
                f"re-running a notebook cell) call innerloop.get_registry().remove_plugin({origin!r}) first, "
                "or register this one under another origin"
            )

    def _marked_hooks(self, plugin: Any) -> list[str]:
        """The attribute names of ``plugin`` marked with ``@innerloop.hookimpl``."""
        return [
            n for n in _public_names(plugin) if self.plugin_manager.parse_hookimpl_opts(plugin, n) is not None
        ]

    def _check_hook_arguments(self, plugin: Any, origin: str, marked: list[str]) -> None:
        """Refuse a hook that does not take the argument ``register`` as pluggy passes it: by that name,
        positionally, with no default (pluggy would call one that takes nothing with nothing, so it would
        silently register nothing; ``*args`` and a keyword-only ``register`` fail inside pluggy, and one
        with a default gets its default)."""
        for hook in marked:
            if inspect.isclass(plugin) and _instance_method(inspect.getattr_static(plugin, hook)):
                raise PluginError(
                    f"plugin {origin!r} is the class {plugin.__qualname__}, whose hook {hook} is an instance "
                    f"method: register an instance, {plugin.__qualname__}() (an entry point names a module or "
                    "an instance, module:attr). Nothing was registered"
                )
            try:
                parameters = inspect.signature(getattr(plugin, hook)).parameters
            except (TypeError, ValueError):
                continue
            # pluggy passes the hook's arguments positionally, and none that has a default: a keyword-only
            # `register` failed inside pluggy (missing argument), one defaulting to None got None
            positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
            taken = parameters.get("register")
            if taken is None or taken.kind not in positional or taken.default is not inspect.Parameter.empty:
                raise PluginError(
                    f"plugin {origin!r} is not a valid innerloop plugin: its hook {hook} must take the argument "
                    f"'register' by name, not keyword-only and with no default (pluggy passes it positionally, and "
                    f"not at all where it has a default): def {hook}(register): register(obj); its signature "
                    f"is {inspect.signature(getattr(plugin, hook))}. Nothing was registered"
                )

    def _check_hook_options(self, plugin: Any, origin: str, marked: list[str]) -> None:
        """Refuse a hook marked with a ``hookimpl`` option innerloop does not run: ``hookwrapper`` or
        ``wrapper`` (each plugin's hooks are called alone, so a wrapper wraps nothing: a plugin of wrappers
        registered nothing, accepted), and ``specname`` (the checks know a hook by its function's name:
        one so named was refused as no hook)."""
        for attribute in marked:
            options = self.plugin_manager.parse_hookimpl_opts(plugin, attribute) or {}
            used = [option for option in ("hookwrapper", "wrapper", "specname") if options.get(option)]
            if used:
                hook = options.get("specname") or attribute
                why = (
                    "it knows a hook by its function's name"
                    if used[0] == "specname"
                    else "it calls each plugin's hooks alone: a wrapper wraps nothing"
                )
                raise PluginError(
                    f"plugin {origin!r} is not a valid innerloop plugin: its function {attribute} is marked "
                    f"@innerloop.hookimpl({used[0]}={options[used[0]]!r}), which innerloop does not run ({why}). "
                    f"Write def {hook}(register): register(obj), marked with plain @innerloop.hookimpl. "
                    "Nothing was registered"
                )

    def _check_hook_names(self, plugin: Any, origin: str) -> None:
        """Refuse, before touching anything, a plugin whose ``hookimpl``-marked functions are not all
        hooks (pluggy would only notice in ``check_pending``), that implements no hook at all (it
        would register nothing, and asking for its names would fail far from the cause), or that has a
        function named after a hook but not marked beside marked ones (pluggy skips it: what it
        registers would be missing, silently)."""
        attributes = _public_names(plugin)
        marked = self._marked_hooks(plugin)
        self._check_hook_options(plugin, origin, marked)
        self._check_hook_arguments(plugin, origin, [name for name in marked if name in HOOK_NAMES])
        unknown = [name for name in marked if name not in HOOK_NAMES]
        invalid = f"plugin {origin!r} is not a valid innerloop plugin"
        if unknown:
            not_hooks = "is not a hook" if len(unknown) == 1 else "are not hooks"
            raise PluginError(
                f"{invalid}: it marks with @innerloop.hookimpl {_with_suggestions(unknown)}, which {not_hooks}; "
                f"valid hook names: {list(HOOK_NAMES)}. Nothing was registered"
            )
        unmarked = [
            name
            for name in attributes
            if name in HOOK_NAMES and name not in marked and callable(getattr(plugin, name))
        ]
        if marked and unmarked:
            raise PluginError(
                f"{invalid}: its {_with_suggestions(unmarked)} named after a hook "
                f"{'is' if len(unmarked) == 1 else 'are'} not decorated with @innerloop.hookimpl, so it would "
                "never be called and what it registers would be missing (marked: "
                f"{', '.join(map(repr, marked))}): decorate it with @innerloop.hookimpl. "
                "Nothing was registered"
            )
        if not marked:
            lookalikes = [name for name in attributes if name in HOOK_NAMES or _close_hook(name)]
            hint = (
                f" (not decorated with @innerloop.hookimpl: {_with_suggestions(lookalikes)})"
                if lookalikes
                else ""
            )
            raise PluginError(
                f"{invalid}: it implements no innerloop hook{hint}, so it would register nothing; valid hook "
                f"names: {list(HOOK_NAMES)}, each decorated with @innerloop.hookimpl. To register a single "
                "object without a plugin, use innerloop.register_<kind>(obj)"
            )

    def _forget(self, plugin: Any) -> None:
        """Undo a partial pluggy registration of ``plugin`` (this object only, never another by name)."""
        if self.plugin_manager.is_registered(plugin):
            self.plugin_manager.unregister(plugin)

    @_one_thread_at_a_time
    def add_entry_point(self, entry_point: Any) -> BrokenPlugin | None:
        """Load and register one ``innerloop`` entry point; never raises for the plugin's faults.

        A plugin that fails to import, whose hook raises or whose object is refused is skipped: the
        registry is left as it was, one :class:`PluginLoadWarning` says why, and the failure is
        remembered (and returned) so that asking for one of its names explains itself.
        """
        distribution = _distribution_of(entry_point)
        origin = f"{entry_point.name} ({distribution})"
        staging = _Staging()
        before = {(entry.kind, entry.name) for entry in self.entries()}
        origins_before = {entry.origin for entry in self.entries()}
        plugin: Any = None  # until it is imported
        try:
            plugin = entry_point.load()
        except (Exception, SystemExit) as error:  # a script-like module: sys.exit or argparse at import
            failure = f"importing {entry_point.value!r} raised {type(error).__name__}: {error}"
        else:
            try:
                self.load_module(plugin, origin, _module_of(entry_point), before, staging)
                self._remember_distribution(entry_point, origins_before)
                return None
            except PluginError as error:
                failure = str(error)
            except (Exception, SystemExit) as error:
                failure = f"its registration hook raised {type(error).__name__}: {error}"
        # every name its hooks offer, past its failure too, surveyed before the roll-back (which also
        # removes what a hook registers with innerloop.register_<kind> while surveyed)
        offered = _names_offered(plugin, staging)
        rolled_back = self.roll_back_since(before, _module_of(entry_point))  # what its import registered
        broken = BrokenPlugin(entry_point.name, distribution, failure, (*offered, *rolled_back))
        self._broken.append(broken)
        clashed = [(k, n) for k, n in broken.names if self.clash_error(k, n) is not None]
        refused = "".join(
            f"; so the {k.replace('_', ' ')} name {n!r}, which another installed distribution also provides, "
            f"is refused from both (set {ALLOW_ENV} to the entry point to load)"
            for k, n in clashed
        )
        warnings.warn(broken.message() + refused, PluginLoadWarning, stacklevel=warning_stacklevel())
        return broken

    @_one_thread_at_a_time
    def load_module(
        self,
        plugin: Any,
        origin: str,
        module: str,
        before: set[tuple[str, str]],
        staging: _Staging | None = None,
    ) -> list[Entry]:
        """Register ``plugin``, imported from ``module`` (just now or earlier in the process), under
        ``origin``: how an installed entry point (``name (distribution)``) and a module named with
        ``innerloop -p`` (``-p MODULE``) are loaded, and the built-in modules (``builtin:MODULE``): one path for all. ``before``: the ``(kind,
        name)`` pairs registered before the import. Returns what was registered besides what the import
        registered (whose kernels were checked for a missing inner model at registration).

        What the import registered (``innerloop.register_<kind>`` at import; else what a failing entry
        point's import of it registered and gave back, :func:`_claim_rolled_back`) is kept, and remembered
        under ``module``, and the plugin's hooks, if any, run. Otherwise (imported before): a plugin
        registered already (by another entry point, by ``-p``, by itself at import, or its module's
        objects) is loaded, nothing registered twice; a module imported for an earlier registry of the
        process has what its import registered then registered again, and its hooks run; a plugin with
        neither is refused (:meth:`add_plugin`'s checks: no hook). Raises
        :class:`PluginError` (or the hook's own error) with the registry left as it was but for what
        the import registered, which the caller rolls back (:meth:`roll_back_since`).
        """
        staging = staging if staging is not None else _Staging()
        at_import = [e for e in self.entries() if (e.kind, e.name) not in before]
        if not at_import:
            at_import = self._register_again(_claim_rolled_back(module), _Staging())
        hooked = bool(self._marked_hooks(plugin))
        if at_import:
            if hooked and not self.plugin_manager.is_registered(plugin):  # else it registered itself
                self._add(plugin, origin, staging)
            _REGISTERED_AT_IMPORT[module] = [
                e for e in at_import if self.plugin_manager.get_plugin(e.origin) is not plugin
            ]
        elif not self._loaded_already(plugin, module, before):
            again = _REGISTERED_AT_IMPORT.get(module)
            if again:  # imported for an earlier registry: its import does not run again
                self._register_again(again, _Staging())
            if hooked or not again:
                self._add(plugin, origin, staging)
        added = [entry for entry in self.entries() if (entry.kind, entry.name) not in before]
        for entry in added:  # what the import registered, and what was registered again
            if entry.origin != origin:
                self._loaded_by[entry.origin] = origin
        self._claim_imported_first(module, origin)
        from_import = {(entry.kind, entry.name) for entry in at_import}
        return [entry for entry in added if (entry.kind, entry.name) not in from_import]

    def _claim_imported_first(self, module: str, origin: str) -> None:
        """List under ``origin`` what ``module`` (or a submodule) registered at an import before it was
        loaded (a user's ``import my_loss`` before ``-p my_loss``) and no plugin claims yet: it was
        listed, recorded in checkpoints and removed as ``module.Class``, not as the plugin loading it."""
        for entry in self.entries():
            if entry.origin != origin and entry.origin not in self._loaded_by and self._from(entry, module):
                self._loaded_by[entry.origin] = origin

    def _from(self, entry: Entry, module: str) -> bool:
        """Whether ``entry`` was registered at the import of ``module`` or of one of its submodules."""
        registering = self._registering_module(entry.origin)
        return registering is not None and _within(registering, module)

    def loaded_by(self, origin: str) -> str:
        """How the plugin of ``origin`` was loaded, as ``innerloop plugins`` shows it: the entry point
        (``name (distribution)``) or ``-p MODULE`` whose module's import registered it
        (``@innerloop.register_inner_loss class ...`` has the origin ``module.Class``), else ``origin``."""
        return self._loaded_by.get(origin, origin)

    def _loaded_already(self, plugin: Any, module: str, before: set[tuple[str, str]]) -> bool:
        """Whether ``plugin`` is registered (by another caller, or by itself at its import:
        ``innerloop.register(sys.modules[__name__])``), or objects that ``module`` (or a submodule)
        registered at import were registered before this load: registering again would clash with them."""
        return self.plugin_manager.is_registered(plugin) or any(
            (entry.kind, entry.name) in before and self._from(entry, module) for entry in self.entries()
        )

    @_one_thread_at_a_time
    def roll_back_since(self, before: set[tuple[str, str]], failing_module: str) -> list[tuple[str, str]]:
        """Undo a plugin module's failed load (an installed entry point's, or one named with ``innerloop
        -p``): remove every object registered since ``before`` (the ``(kind, name)`` pairs registered
        before its import, as :meth:`load_module` takes them) and return the ``(kind, name)`` of those
        its own module ``failing_module`` registered: it is skipped whole, including what its module
        registered at import (``innerloop.register_<kind>``) before its import or its hook failed.

        What the module of another installed entry point registered at import while the failing one
        imported it is removed too but kept aside under that module's name, not counted as the failing
        one's: that module is not imported again, so its own entry point, loaded later, registers it from
        there (:func:`_claim_rolled_back`)."""
        added = [entry for entry in self.entries() if (entry.kind, entry.name) not in before]
        other_plugins = {_module_of(ep) for ep in _entry_points()} - {"", failing_module}
        own = []
        for entry in added:
            module = self._registering_module(entry.origin)
            if (
                module is not None
                and not _within(module, failing_module)
                and any(_within(module, plugin) for plugin in other_plugins)
            ):
                _ROLLED_BACK_AT_IMPORT.setdefault(module, []).append(entry)
            else:
                own.append((entry.kind, entry.name))
        for origin in dict.fromkeys(entry.origin for entry in added):
            self.remove_plugin(origin)
        return own

    def _registering_module(self, origin: str) -> str | None:
        """The module whose import registered the plugin of ``origin`` (``register_<kind>`` at import,
        or ``innerloop.register(module)``); None when unknown."""
        plugin = self.plugin_manager.get_plugin(origin)
        if isinstance(plugin, _OneObjectPlugin):
            return plugin.registered_from
        return plugin.__name__ if inspect.ismodule(plugin) else None

    def _register_again(self, entries: list[Entry], staging: _Staging) -> list[Entry]:
        """Register ``entries`` again, through the registrar of each one's kind and origin (validated, no
        clash), all or none; returns them."""
        for entry in entries:
            self.registrar(KIND_BY_NAME[entry.kind], entry.origin, staging)(entry.obj)
        self._commit(staging)
        return entries

    def _remember_distribution(self, entry_point: Any, origins_before: set[str]) -> None:
        """Record the distribution (and its version) of ``entry_point`` for every origin that appeared
        while it loaded (the entry point's own, and those of objects its import registered)."""
        version = getattr(getattr(entry_point, "dist", None), "version", None)
        installed = (_distribution_of(entry_point), version if isinstance(version, str) else None)
        for entry in self.entries():
            if entry.origin not in origins_before:
                self._distributions[entry.origin] = installed

    def distribution(self, origin: str) -> tuple[str, str | None] | None:
        """``(name, version)`` of the installed distribution whose ``innerloop`` entry point registered
        the plugin of ``origin`` (version None when its metadata has none); None for a built-in or
        in-process plugin. Checkpoints record it beside each plugin a model uses."""
        return self._distributions.get(origin)

    def broken(self) -> list[BrokenPlugin]:
        """The entry-point plugins that failed to load (skipped), in load order."""
        return list(self._broken)

    @_one_thread_at_a_time
    def remove_plugin(self, origin: str) -> None:
        """Unregister a plugin and everything it registered (used by tests and notebooks).

        ``origin`` is the plugin's origin as ``innerloop plugins`` shows it (not the name of an object
        it registered): for a module loaded by an entry point or ``-p``, what its import registered too
        (:meth:`loaded_by`), and a ``-p`` module is no longer loaded (naming it again loads it again). A
        ValueError lists the registered origins if no plugin has it.
        """
        plugin = self.plugin_manager.get_plugin(origin)
        origins = {e.origin for entries in self._entries.values() for e in entries.values()}
        loaded = [of for of, by in self._loaded_by.items() if by == origin]
        if plugin is None and origin not in origins and not loaded:
            named = sorted(
                f"{e.kind.replace('_', ' ')} {e.name!r} (origin {e.origin!r})"
                for e in self.entries()
                if e.name == origin
            )
            hint = f"; {origin!r} is the name of {', '.join(named)}: pass its origin" if named else ""
            listed = sorted({self.loaded_by(o) for o in origins} | set(self.plugin_modules))
            raise ValueError(
                f"no plugin with origin {origin!r} is registered{hint}; registered origins: {listed}"
            )
        for each in [*loaded, origin]:
            self._remove_origin(each)
        if origin in self.plugin_modules:
            self.plugin_modules.remove(origin)
        # the kernels' verdicts are tied to the objects they were earned with (so a plugin registered
        # under a removed one's name is checked anew); forgetting them also lets the removed objects go
        first_use.forget_verdicts()

    def _remove_origin(self, origin: str) -> None:
        """Unregister the plugin of ``origin`` (if any) and remove the objects of that origin."""
        plugin = self.plugin_manager.get_plugin(origin)
        if plugin is not None:
            self.plugin_manager.unregister(plugin)
        for entries in self._entries.values():
            for name in [n for n, e in entries.items() if e.origin == origin]:
                del entries[name]
        self._distributions.pop(origin, None)
        self._loaded_by.pop(origin, None)

    # ---- looking up ------------------------------------------------------------------------------

    def names(self, kind: str) -> list[str]:
        """Registered names of a kind that can be asked for, sorted: not a name two installed
        distributions provide (:meth:`clash_error`), which every lookup refuses."""
        self._check_kind(kind)
        return sorted(name for name in self._entries[kind] if self.clash_error(kind, name) is None)

    def entries(self, kind: str | None = None) -> list[Entry]:
        """The registered entries of ``kind`` (every kind when None), sorted by name within a kind."""
        kinds = KIND_NAMES if kind is None else (self._check_kind(kind),)
        return [e for k in kinds for e in sorted(self._entries[k].values(), key=lambda e: e.name)]

    def get(self, kind: str, name: str) -> Any:
        """The object registered under ``name``; a ValueError listing the valid names otherwise, and a
        :class:`PluginError` naming both when two installed plugins provide ``name``
        (:meth:`clash_error`)."""
        self._check_kind(kind)
        entries = self._entries[kind]
        if not isinstance(name, str) or name not in entries:
            raise self.unknown_name_error(kind, name)
        clash = self.clash_error(kind, name)
        if clash is not None:
            raise clash
        return entries[name].obj

    def clash_error(self, kind: str, name: str) -> PluginError | None:
        """The error for asking for ``name`` when an entry-point plugin registered it and another
        entry-point plugin, refused at load for the clash (or any other reason), offered the same name:
        which one a run gets would depend on the order ``sys.path`` finds them in, so neither is chosen.
        None when there is no such clash (a plugin that offered a built-in's name is refused, and the
        built-in is used, as before)."""
        entry = self._entries[kind].get(name)
        winner = None if entry is None else self._distributions.get(entry.origin)
        if winner is None:  # a built-in or in-process object, or none: no clash between installs
            return None
        rivals = [b for b in self._broken if (kind, name) in b.names and b.origin != entry.origin]
        if not rivals:
            return None
        label = kind.replace("_", " ")
        others = "; ".join(f"plugin {b.entry_point!r} from distribution {b.distribution!r}" for b in rivals)
        return PluginError(
            f"{label} name {name!r} is provided by two installed plugins: plugin {entry.origin!r} from "
            f"distribution {winner[0]!r}, and {others} (refused at load: {rivals[0].error}). Which one a run "
            f"would get depends on the order they are found in, so neither is used: uninstall one, or set "
            f"{ALLOW_ENV} to the entry point to load"
        )

    def unknown_name_error(self, kind: str, name: Any) -> ValueError:
        """The error for asking for a name that is not registered: the valid names, and the broken
        plugin that provides it (then a :class:`PluginError`) or the broken ones that may have."""
        label = kind.replace("_", " ")
        hint = self.broken_hint(kind, name)
        if any((kind, name) in b.names for b in self._broken):
            return PluginError(f"{label} {name!r} is not registered: {hint}")
        message = f"unknown {label} {name!r}; registered: {self.names(kind)} (see `innerloop plugins`)"
        return ValueError(f"{message}. {hint}" if hint else message)

    def broken_hint(self, kind: str, name: Any) -> str:
        """Why ``name`` may be missing: the broken plugin that provides it, or every broken plugin
        when it is not known which would have (one that failed to import), and whether the environment
        switches external plugins off or allows only some; "" when none of these applies."""
        providers = [b for b in self._broken if (kind, name) in b.names]
        if providers:
            return providers[0].message()
        if self._broken:
            broken = "Plugins that failed to load and may have provided it: " + "; ".join(
                b.message() for b in self._broken
            )
            return f"{broken}. {_external_plugins_hint()}".rstrip(". ") + "."
        return _external_plugins_hint()

    def inner_model(self, name: str) -> InnerModel:
        """The :class:`~innerloop.core.protocol.InnerModel` registered under ``name``."""
        return self.get("inner_model", name)

    def inner_loss(self, name: str) -> InnerLoss:
        """The :class:`~innerloop.core.protocol.InnerLoss` registered under ``name``."""
        return self.get("inner_loss", name)

    def update_rule(self, name: str) -> UpdateRule:
        """The :class:`~innerloop.core.protocol.UpdateRule` registered under ``name``."""
        return self.get("update_rule", name)

    def model_inner_loss(self, name: str) -> Any:
        """The :class:`~innerloop.core.model_inner.ModelInnerLoss` registered under ``name``."""
        return self.get("model_inner_loss", name)

    def model_update_rule(self, name: str) -> Any:
        """The :class:`~innerloop.core.model_inner.ModelUpdateRule` registered under ``name``."""
        return self.get("model_update_rule", name)

    def kernels(self) -> list[KernelSpec]:
        """Every registered :class:`~innerloop.kernels.KernelSpec`, sorted by name."""
        return [e.obj for e in self.entries("kernel")]

    def kernels_for(self, inner_model: str, inner_loss: str, update_rule: str) -> list[KernelSpec]:
        """Kernels registered for this combination, best (highest priority) first; not a kernel whose
        name two installed plugins provide (:meth:`clash_error`: neither is used)."""
        matching = [
            k
            for k in self.kernels()
            if (k.inner_model, k.inner_loss, k.update_rule) == (inner_model, inner_loss, update_rule)
            and self.clash_error("kernel", k.name) is None
        ]
        return sorted(matching, key=lambda k: -k.priority)

    def _check_kind(self, kind: str) -> str:
        if kind not in KIND_NAMES:
            raise ValueError(f"unknown plugin kind {kind!r}; valid kinds: {list(KIND_NAMES)}")
        return kind


HOOK_NAMES: tuple[str, ...] = tuple(kind.hook for kind in KINDS)


_PASSED_CHECKS = PassedChecks()
"""Names of the plugins whose checks passed, by behaviour key (:mod:`innerloop.registry.verdicts`): an
object of the same class code and settings is not checked again (a registry built again, a fresh instance)."""

_CHECKED_INSTANCES: IdentityTable[bool] = IdentityTable()
"""The plugin instances that passed :func:`check_instance`, held weakly: a checked plugin, and the tensors
it may hold, is not kept alive by the check (a new object that takes a freed one's id is checked anew)."""


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """``torch.set_default_dtype(dtype)`` inside the block, the caller's default restored after it."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def validate_plugin(kind: Kind, obj: Any, external: bool) -> str:
    """``kind.validate(obj)`` and, for an object that does not ship with innerloop (``external``), its
    ``external_check``: the name ``obj`` goes by, or :class:`PluginError` with the reason.

    Smoke tests may take gradients and compute on the CPU in float32: they run the same way whatever
    context they are called in (under ``torch.no_grad`` or inference mode in a validation worker, ``with
    torch.device("meta")`` to count parameters, after ``torch.set_default_dtype(torch.float64)``, or
    under ``torch.autocast("cpu", ...)``, where the first scan of a mixed-precision step builds the
    registry: its float32 matmuls would run in bfloat16, or inside an activation checkpoint, whose
    saved-tensor hooks would take the checks' own saved tensors, and under which torch.func refuses to run). Their random inputs come from a forked CPU generator
    seeded with 0: one plugin always gets the same verdict, and the user's seed does not move (the first
    layer made after ``manual_seed`` must not differ from later ones).
    """
    # A device context only where the default device is not the CPU already: under one, every torch
    # call goes through its Python __torch_function__, which makes the checks several times slower.
    on_cpu = torch.get_default_device().type == "cpu"
    with (
        torch.random.fork_rng(devices=[]),
        torch.inference_mode(False),
        torch.enable_grad(),
        contextlib.nullcontext() if on_cpu else torch.device("cpu"),
        torch.autocast("cpu", enabled=False),
        saved_tensors_hooks_suspended(),
        _default_dtype(torch.float32),
    ):
        torch.random.default_generator.manual_seed(0)  # the CPU generator only: fork_rng restores it
        return _PASSED_CHECKS.name_or_check(
            kind.name, obj, external, lambda: _checked_name(kind, obj, external)
        )


def _checked_name(kind: Kind, obj: Any, external: bool) -> str:
    """The checks of :func:`validate_plugin` themselves, run in its context: the kind's, a declared
    ``settings()`` (:func:`~innerloop.registry.settings.declared_settings`: what a checkpoint records,
    refused now rather than when a finished run saves), and an external plugin's own."""
    name = kind.validate(obj)
    if declares_settings(obj) and callable(getattr(obj, "settings", None)):
        try:
            declared_settings(obj)
        except TypeError as error:
            raise PluginError(f"{kind.name} {name!r}: {error}") from None
    if external and kind.external_check is not None:
        kind.external_check(obj, name)
    return name


def check_instance(kind_name: str, obj: Any) -> None:
    """Hold a plugin instance given directly (``TTTLayer(inner_loss=MyLoss())``), not through the
    registry, to the checks the registrar runs; the registered object itself, and an instance already
    checked, pass at once. Instances of classes defined in the built-in plugin modules
    (``innerloop.plugins.DEFAULT_PLUGINS``) skip the external check (the test suite checks them):
    :func:`_is_builtin_class`, as registration decides by the module object (:func:`_is_builtin_module`)."""
    registry = get_registry()
    registered = any(entry.obj is obj for entry in registry.entries(kind_name))  # not by name: no clash check
    if registered or obj in _CHECKED_INSTANCES:
        return
    builtin = _is_builtin_class(type(obj))
    with outside_transforms():
        validate_plugin(KIND_BY_NAME[kind_name], obj, external=not builtin)
    _CHECKED_INSTANCES.set(obj, True)


def _public_names(plugin: Any) -> list[str]:
    """The attribute names of ``plugin`` that could be hook implementations (pluggy scans ``dir``)."""
    return [name for name in dir(plugin) if not name.startswith("_")]


def _close_hook(name: str) -> str | None:
    """The hook name ``name`` is most likely a misspelling of, if any."""
    matches = difflib.get_close_matches(name, HOOK_NAMES, n=1, cutoff=0.75)
    return matches[0] if matches else None


def _with_suggestions(names: list[str]) -> str:
    """``names`` as a readable list, each followed by the hook it probably meant."""
    described = []
    for name in names:
        meant = _close_hook(name)
        described.append(f"{name!r} (did you mean {meant!r}?)" if meant and meant != name else repr(name))
    return ("function " if len(names) == 1 else "functions ") + ", ".join(described)


def _names_offered(plugin: Any, staging: _Staging) -> list[tuple[str, str]]:
    """``staging.attempted`` (the ``(kind, name)`` pairs a refused plugin offered before it failed) and
    those its hooks offer past the failure: each hook that did not run to its end (the one that failed, and
    those never reached) is run with a ``register`` that only records the name (it refuses nothing), and
    what a hook raises is ignored, ``SystemExit`` too (its failure is already the reason given). A hook
    that ran to its end is not run again: all it offered is in ``attempted``, and running it again
    repeated its side effects.
    Without them a name the plugin would also provide, which another installed distribution provides too,
    was seen as a clash only when the failure came after it in the plugin's hooks."""
    names = list(staging.attempted)
    for kind in KINDS:
        hook = getattr(plugin, kind.hook, None) if plugin is not None else None
        if not callable(hook) or not hasattr(hook, f"{ENTRY_POINT_GROUP}_impl"):
            continue
        if kind.hook in staging.completed_hooks:
            continue

        def record(obj: Any, kind: Kind = kind) -> Any:
            if isinstance(getattr(obj, "name", None), str):
                names.append((kind.name, obj.name))
            return obj

        with contextlib.suppress(Exception, SystemExit):  # SystemExit: as at registration (argparse)
            hook(register=record)
    return list(dict.fromkeys(names))


def _returned_error(origin: str, kind: Kind, value: Any) -> PluginError:
    """The error for a hook implementation that returned ``value`` instead of registering it."""
    name = getattr(value, "name", None)
    what = a_type(value) + (f" named {name!r}" if isinstance(name, str) else "")
    return PluginError(
        f"plugin {origin!r}: its hook {kind.hook} returned {what}, which would be silently dropped; "
        f"hooks register objects through their argument: call register(obj) instead of returning it "
        "(and return nothing). Nothing was registered"
    )


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _allowed_external() -> tuple[bool, set[str] | None]:
    """Whether entry-point plugins load, and which (None: all). A :data:`DISABLE_ENV` that is not yes/no
    raises naming it: a safety switch never reads an unclear value as "load them"."""
    if environment_flag(DISABLE_ENV, default=False):
        return False, None
    allow = os.environ.get(ALLOW_ENV)
    if allow is None:
        return True, None
    return True, {name.strip() for name in allow.split(",") if name.strip()}


def _external_plugins_hint() -> str:
    """Why an installed plugin package may not have been loaded: the environment switches external
    plugins off, or allows only some; "" when every entry point is loaded."""
    try:
        enabled, allowlist = _allowed_external()
    except EnvironmentSwitchError as error:  # the switch's value is what is wrong
        return str(error)
    if not enabled:
        return (
            f"External (entry-point) plugins are switched off ({DISABLE_ENV}={os.environ.get(DISABLE_ENV)!r}): "
            f"no installed plugin package was loaded, so one that provides it is missing here; unset {DISABLE_ENV} to load them."
        )
    if allowlist is not None:
        return (
            f"Only the entry-point plugins {sorted(allowlist)} are loaded ({ALLOW_ENV}={os.environ.get(ALLOW_ENV)!r}); "
            f"add the plugin that provides it to {ALLOW_ENV}, or unset it."
        )
    return ""


def _distribution_of(entry_point: Any) -> str:
    """The name of the distribution that installed ``entry_point`` (its value if unknown)."""
    dist = getattr(entry_point, "dist", None)
    return dist.name if dist is not None else entry_point.value


def _entry_points() -> Iterable[Any]:
    """The installed ``innerloop`` entry points (tests replace this function to fake some)."""
    return metadata.entry_points(group=ENTRY_POINT_GROUP)


def load_entry_point_plugins(registry: Registry) -> list[str]:
    """Load the ``innerloop`` entry points the environment allows; returns the origins that loaded.

    One that fails is skipped with a warning (see :meth:`Registry.add_entry_point`).
    """
    enabled, allowlist = _allowed_external()
    if not enabled:
        return []
    loaded, installed = [], set()
    for entry_point in _entry_points():
        installed.add(entry_point.name)
        if allowlist is not None and entry_point.name not in allowlist:
            continue
        if registry.add_entry_point(entry_point) is None:
            loaded.append(f"{entry_point.name} ({_distribution_of(entry_point)})")
    if allowlist == set() and installed:  # set but empty: every installed plugin is skipped
        warnings.warn(
            f"{ALLOW_ENV}={os.environ.get(ALLOW_ENV)!r} names no plugin, so none of the installed entry points "
            f"{sorted(installed)} is loaded; unset {ALLOW_ENV} to load them all, or set {DISABLE_ENV}=1 to "
            "load none without this warning",
            PluginLoadWarning,
            stacklevel=warning_stacklevel(),
        )
    missing = sorted((allowlist or set()) - installed)
    if missing:  # a misspelt name would otherwise load nothing without a word
        warnings.warn(
            f"{ALLOW_ENV}={os.environ.get(ALLOW_ENV)!r} names {missing}, which no installed package provides as "
            f"an {ENTRY_POINT_GROUP!r} entry point; installed entry points: {sorted(installed)}",
            PluginLoadWarning,
            stacklevel=warning_stacklevel(),
        )
    return loaded


def build_registry(
    include_external: bool = True, on_builtins: Callable[[Registry], None] | None = None
) -> Registry:
    """A fresh registry with the built-ins and (if allowed) the entry-point plugins.

    ``on_builtins(registry)`` is called once the built-ins are in, before the entry points load
    (:func:`get_registry` publishes the registry there, so that an entry-point module that registers
    an object at import, ``@innerloop.register_inner_loss class ...``, registers it in this registry).
    """
    from innerloop.plugins import DEFAULT_PLUGINS

    registry = Registry()
    for module_name in DEFAULT_PLUGINS:  # the path of an entry point's module and of -p (load_module)
        before = {(entry.kind, entry.name) for entry in registry.entries()}
        module = importlib.import_module(module_name)
        registry.load_module(module, f"{BUILTIN_PREFIX}{module_name}", module_name, before)
    if on_builtins is not None:
        on_builtins(registry)
    if include_external:
        load_entry_point_plugins(registry)
        warn_of_kernels_that_cannot_run(registry)
    return registry


def warn_of_kernels_that_cannot_run(
    registry: Registry, kernels: list[Entry] | None = None, in_process: bool = False
) -> None:
    """Warn (:class:`PluginLoadWarning`) of each kernel (``kernels``, default every registered one)
    registered for an inner model, inner loss or update rule that no loaded plugin provides (a misspelt
    name): it would never be chosen, without a word. Each warning names the kernel, its plugin, the
    unknown name and the registered ones. ``in_process``: the kernel was just registered in-process
    (:func:`register_kernel`, :func:`register`), where the name may only be registered later."""
    for entry in registry.entries("kernel") if kernels is None else kernels:
        spec = entry.obj
        for kind in ("inner_model", "inner_loss", "update_rule"):
            name, known = getattr(spec, kind), registry.names(kind)
            if name not in known:
                later = f" (register the {kind.replace('_', ' ')} before its kernels)" if in_process else ""
                warnings.warn(
                    f"kernel {entry.name!r} ({registry.loaded_by(entry.origin)}) is registered for {kind}={name!r}, which no loaded "
                    f"plugin provides{' yet' if in_process else ''}, so it can never run{later}; registered "
                    f"{kind}s: {known}",
                    PluginLoadWarning,
                    stacklevel=warning_stacklevel(),
                )


def _builtin_modules() -> frozenset[str]:
    """The modules of the plugins that ship with innerloop (``innerloop.plugins.DEFAULT_PLUGINS``)."""
    from innerloop.plugins import DEFAULT_PLUGINS

    return frozenset(DEFAULT_PLUGINS)


def _one_line(error: BaseException) -> str:
    """``error``'s message on one line (pluggy's validation errors take three), its lines joined by "; "."""
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip())


def _hook_arguments_advice(error: BaseException) -> str:
    """What to write instead, where pluggy refused a hook for arguments its spec does not declare (every
    innerloop hook passes one, ``register``); "" for another error."""
    hook = next((kind.hook for kind in KINDS if f"hook {kind.hook!r}" in str(error)), None)
    if hook is None or "can not be found in the hookspec" not in str(error):
        return ""
    return f" (every innerloop hook takes one argument: def {hook}(register): register(obj)). Nothing was registered"


def _is_builtin_module(plugin: Any) -> bool:
    """Whether ``plugin`` is one of the built-in plugin modules themselves (not a module or object that
    merely names itself like one)."""
    name = getattr(plugin, "__name__", None)
    return inspect.ismodule(plugin) and name in _builtin_modules() and sys.modules.get(name) is plugin


def _is_builtin_class(cls: type) -> bool:
    """Whether ``cls`` is a class a built-in plugin module defines: that module (loaded) holds ``cls``
    itself under its qualified name. A class defined elsewhere whose ``__module__`` merely names a
    built-in module (set by hand, or by a class factory) is not: its instances meet the external checks."""
    module = sys.modules.get(cls.__module__)
    if not _is_builtin_module(module):
        return False
    found: Any = module
    for part in cls.__qualname__.split("."):
        found = getattr(found, part, None)
    return found is cls


def outside_transforms() -> contextlib.AbstractContextManager[None]:
    """A context in which torch.func transforms the caller is inside (vmap, grad) do not apply: the
    registrar's checks build and differentiate their own plain tensors (a first use of the registry
    inside ``torch.func.vmap`` would otherwise fail them with vmap's errors, blaming a built-in)."""
    try:
        from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack
    except ImportError:  # another torch: nothing to clear there
        return contextlib.nullcontext()
    return temporarily_clear_interpreter_stack()


_REGISTRY: Registry | None = None
_LOCK = threading.RLock()


def _new_lock_in_child() -> None:
    """A forked child starts with a free lock: one held by another thread of the parent at the fork (a
    registry being built) would never be released there."""
    global _LOCK
    _LOCK = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock_in_child)

_REGISTERED_AT_IMPORT: dict[str, list[Entry]] = {}
"""Module (of an entry point or a ``-p`` module) -> what it registered when imported (``innerloop.register_<kind>``
at import, no hooks): a later registry of this process gets them again (the module is not imported again)."""


_ROLLED_BACK_AT_IMPORT: dict[str, list[Entry]] = {}
"""Module -> what it registered at import while a failing entry point imported it (rolled back with that
entry point's skip); the module's own entry point claims them (:func:`_claim_rolled_back`)."""


def _module_of(entry_point: Any) -> str:
    """The module an entry point names (``module`` or ``module:attr``)."""
    return str(getattr(entry_point, "value", "")).partition(":")[0].strip()


def _within(module: str, package: str) -> bool:
    """Whether ``module`` is ``package`` or one of its submodules."""
    return module == package or module.startswith(f"{package}.")


def _claim_rolled_back(module: str) -> list[Entry]:
    """Take what ``module`` (or its submodules) registered at import while another, failing entry point
    imported it; [] when nothing was kept aside."""
    claimed = [name for name in _ROLLED_BACK_AT_IMPORT if module and _within(name, module)]
    return [entry for name in claimed for entry in _ROLLED_BACK_AT_IMPORT.pop(name)]


_BUILDING: Registry | None = None
"""The process-wide registry while its entry points load (then :func:`get_registry` returns it)."""


def get_registry() -> Registry:
    """The process-wide registry, built on first use.

    While it is being built (an entry-point module calling ``innerloop.register_<kind>`` at import),
    the registry under construction is returned: a second one is never built.
    """
    with _LOCK:
        if _REGISTRY is None:
            return _BUILDING if _BUILDING is not None else _build_process_registry()
        return _REGISTRY


@run_eagerly("innerloop: the registry is built once, eagerly (its checks differentiate twice)")
def _build_process_registry() -> Registry:
    """Build :data:`_REGISTRY` (the caller holds ``_LOCK``). Outside ``torch.compile``'s graphs and the
    caller's torch.func transforms: a first use of the registry inside a compiled function (or
    ``vmap``) would otherwise trace the registrar's conformance checks, which dynamo cannot (their
    second derivatives), and refuse a built-in."""
    global _REGISTRY, _BUILDING

    def publish(registry: Registry) -> None:
        global _BUILDING
        _BUILDING = registry

    try:
        with outside_transforms():  # the plugins' checks make plain tensors, not the caller's vmap
            _REGISTRY = build_registry(on_builtins=publish)
    finally:
        _BUILDING = None
    return _REGISTRY


def reset_registry() -> None:
    """Forget the process-wide registry, and the kernels' first-use verdicts; the next
    :func:`get_registry` rebuilds it."""
    global _REGISTRY
    with _LOCK:
        _REGISTRY = None
    first_use.forget_verdicts()  # a kernel registered again is checked again


@contextlib.contextmanager
def isolated_registry() -> Iterator[None]:
    """A fresh process-wide registry inside the block, the process's own one back after it (blocks
    nest; they are not for several threads at once: the registry is the process's).

    Inside, :func:`get_registry` builds a new registry on first use (the built-ins and the allowed
    entry points) with no kernel verdicts; what the block registers, removes or breaks is gone when it
    ends, and the registry and verdicts from before come back as they were (nothing is rebuilt). For a
    plugin's tests::

        @pytest.fixture(autouse=True)
        def own_registry():
            with innerloop.registry.isolated_registry():
                yield
    """
    global _REGISTRY
    with _LOCK:
        if _BUILDING is not None:
            raise RuntimeError("isolated_registry() cannot start while the registry is being built")
        before, verdicts = _REGISTRY, first_use.saved_verdicts()
        _REGISTRY = None
        first_use.forget_verdicts()
    try:
        yield
    finally:
        with _LOCK:
            _REGISTRY = before
            first_use.restore_verdicts(verdicts)


def register(plugin: Any, origin: str | None = None) -> None:
    """Register an in-process plugin (module or object with hookimpls) in the global registry."""
    get_registry().add_plugin(plugin, origin=origin)


_hookimpl = pluggy.HookimplMarker("innerloop")


class _OneObjectPlugin:
    """A plugin whose one hook (that of ``kind``) registers ``obj``."""

    def __init__(self, kind: Kind, obj: Any) -> None:
        def hook(register: Callable[[Any], Any]) -> None:
            register(obj)

        setattr(self, kind.hook, _hookimpl(hook))
        self.registered_from = _calling_module()  # the module that called register_<kind>


def register_object(kind: str, obj: Any, origin: str | None = None) -> Any:
    """Register one object of ``kind`` in the global registry, without writing a plugin.

    ``obj`` is an instance, or a class that is instantiated with no arguments (so that this works as
    a class decorator); ``obj`` is returned. The origin (shown by ``innerloop plugins``) defaults to
    the object's class, ``module.QualName`` (for an instance of an innerloop class, such as a
    :class:`KernelSpec`, the calling module's name in place of innerloop's). Validation and errors are those of :meth:`Registry.add_plugin`.
    """
    if kind not in KIND_BY_NAME:
        raise ValueError(f"unknown plugin kind {kind!r}; valid kinds: {list(KIND_NAMES)}")
    instance = _instantiate(KIND_BY_NAME[kind], obj) if inspect.isclass(obj) else obj
    KIND_BY_NAME[kind].check_kind_of(instance)  # before the default origin, which it may hold as its own kind
    plugin = _OneObjectPlugin(KIND_BY_NAME[kind], instance)
    with _LOCK:  # the default origin is free when it is taken (another thread may register alike)
        registry = get_registry()
        registry.add_plugin(plugin, origin=origin or _default_origin(registry, instance))
    return obj


def _instantiate(kind: Kind, cls: type) -> Any:
    """``cls()``, for ``register_<kind>`` used as a class decorator; a class that needs arguments is
    refused with what to do instead."""
    try:
        inspect.signature(cls).bind()
    except TypeError as error:
        raise PluginError(
            f"register_{kind.name} was given the class {cls.__qualname__}, which it instantiates with no "
            f"arguments (as a class decorator), but {cls.__qualname__}() {error}: register an instance "
            f"instead, innerloop.register_{kind.name}({cls.__qualname__}(...))"
        ) from None
    except ValueError:  # no signature to inspect (a builtin): let the call say
        pass
    if inspect.isabstract(cls):  # else Python's "Can't instantiate abstract class"
        raise PluginError(
            f"register_{kind.name} was given the class {cls.__qualname__}, which it instantiates, but "
            f"{cls.__qualname__} does not implement {sorted(cls.__abstractmethods__)} of "
            f"{kind.base.__name__}: define them (CONTRIBUTING.md, 'Write and register a plugin')"
        )
    return cls()


def _default_origin(registry: Registry, instance: Any) -> str:
    """``module.QualName`` of ``instance``'s class; ``module.QualName:name`` when another instance of
    the class, with another name, already has that origin (so that each can be removed on its own).
    An instance of one of innerloop's own classes (a :class:`KernelSpec`) registered from outside
    innerloop is the caller's: ``caller_module.QualName``."""
    cls = type(instance)
    module = cls.__module__
    if module.split(".")[0] == "innerloop":
        module = _calling_module() or module
    origin = f"{module}.{cls.__qualname__}"
    name = getattr(instance, "name", None)
    taken = [e.name for e in registry.entries() if e.origin == origin]
    if taken and isinstance(name, str) and name not in taken:
        return f"{origin}:{name}"
    return origin


def _instance_method(attribute: Any) -> bool:
    """Whether ``attribute`` (a class's own, unbound) is a function that takes an instance first: not a
    staticmethod or classmethod, nor a function taking ``register`` first (a class used as a namespace,
    whose hooks pluggy calls on the class itself)."""
    if not inspect.isfunction(attribute):
        return False
    return next(iter(inspect.signature(attribute).parameters), None) != "register"


def _calling_module() -> str | None:
    """The module that called into innerloop's registration functions, when it is not innerloop's."""
    frame = first_frame_outside(("innerloop",))[1]
    return None if frame is None else frame.f_globals.get("__name__")


def _register_one(kind: str) -> Callable[..., Any]:
    def register_one(obj: Any, origin: str | None = None) -> Any:
        return register_object(kind, obj, origin)

    register_one.__name__ = register_one.__qualname__ = f"register_{kind}"
    register_one.__doc__ = (
        f"Register one {KIND_BY_NAME[kind].label} (an instance of {KIND_BY_NAME[kind].base.__name__}, "
        "or such a class, instantiated with no arguments: usable as a class decorator); returns it. "
        "See :func:`register_object`."
    )
    return register_one


register_inner_model = _register_one("inner_model")
register_inner_loss = _register_one("inner_loss")
register_update_rule = _register_one("update_rule")
register_kernel = _register_one("kernel")
register_model_inner_loss = _register_one("model_inner_loss")
register_model_update_rule = _register_one("model_update_rule")


def available(kind: str) -> list[str]:
    """Registered names of ``kind`` (one of :data:`innerloop.registry.kinds.KIND_NAMES`)."""
    return get_registry().names(kind)


def format_plugin_table(registry: Registry | None = None) -> str:
    """A plain-text table of every registered plugin (kind, name, origin: how it was loaded,
    :meth:`Registry.loaded_by`), then the broken ones (skipped) with the reason each failed."""
    registry = registry or get_registry()
    rows = [
        (
            e.kind,
            e.name,
            registry.loaded_by(e.origin)
            if registry.clash_error(e.kind, e.name) is None
            else f"{registry.loaded_by(e.origin)} [refused: another installed distribution provides the same name, see below]",
        )
        for e in registry.entries()
    ]
    header = ("kind", "name", "origin")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    broken = registry.broken()
    if broken:
        lines += ["", f"broken plugins (skipped; {DISABLE_ENV}=1 loads no external plugin):"]
        for plugin in broken:
            provided = ", ".join(f"{kind} {name!r}" for kind, name in plugin.names) or "unknown"
            lines.append(f"  {plugin.origin}: {plugin.error} [names: {provided}]")
    return "\n".join(lines)
