"""The plugin registry (pluggy): hookspecs, typed registrars, entry-point loading.

Write a plugin as a module with functions marked ``@hookimpl`` named after the hooks in
:mod:`innerloop.registry.hookspecs`; install it under the ``innerloop`` entry-point group or call
:func:`register` in-process.
"""

import pluggy

hookimpl = pluggy.HookimplMarker("innerloop")

from innerloop.registry.manager import (  # noqa: E402  (hookimpl must exist before plugins import it)
    ALLOW_ENV,
    DISABLE_ENV,
    ENTRY_POINT_GROUP,
    BrokenPlugin,
    Entry,
    PluginError,
    PluginLoadWarning,
    Registry,
    available,
    build_registry,
    format_plugin_table,
    get_registry,
    register,
    reset_registry,
)

__all__ = [
    "ALLOW_ENV",
    "DISABLE_ENV",
    "ENTRY_POINT_GROUP",
    "BrokenPlugin",
    "Entry",
    "PluginError",
    "PluginLoadWarning",
    "Registry",
    "available",
    "build_registry",
    "format_plugin_table",
    "get_registry",
    "hookimpl",
    "register",
    "reset_registry",
]
