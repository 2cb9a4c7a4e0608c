"""The plugin registry (pluggy): hookspecs, typed registrars, entry-point loading.

Write a plugin as a module with functions marked ``@hookimpl`` named after the hooks in
:mod:`innerloop.registry.hookspecs`; install it under the ``innerloop`` entry-point group or call
:func:`register` in-process. One object needs no plugin: ``register_inner_loss(obj)`` (and one such
function per kind) registers it. The kinds are declared once, in :mod:`innerloop.registry.kinds`.
"""

import pluggy

hookimpl = pluggy.HookimplMarker("innerloop")

from innerloop.registry.kinds import PluginWarning  # noqa: E402
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
    check_instance,
    format_plugin_table,
    get_registry,
    isolated_registry,
    register,
    register_inner_loss,
    register_inner_model,
    register_kernel,
    register_model_inner_loss,
    register_model_update_rule,
    register_object,
    register_update_rule,
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
    "PluginWarning",
    "Registry",
    "available",
    "build_registry",
    "check_instance",
    "format_plugin_table",
    "get_registry",
    "hookimpl",
    "isolated_registry",
    "register",
    "register_inner_loss",
    "register_inner_model",
    "register_kernel",
    "register_model_inner_loss",
    "register_model_update_rule",
    "register_object",
    "register_update_rule",
    "reset_registry",
]
