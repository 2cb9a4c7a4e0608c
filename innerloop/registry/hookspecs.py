"""The hooks an innerloop plugin implements, one per plugin kind (made from
:data:`innerloop.registry.kinds.KINDS`, where each is documented).

A plugin is a module or object with functions decorated by ``innerloop.registry.hookimpl`` whose
names are these hooks: ``register_inner_models``, ``register_inner_losses``,
``register_update_rules``, ``register_kernels``, ``register_model_inner_losses`` and
``register_model_update_rules``. Each receives a ``register`` callable (a typed registrar): call it
once per thing the plugin provides (a hook returns nothing: a plugin whose hook returns a value,
or that implements none of these hooks, is refused). The registrar checks the object against the
protocol right away and raises :class:`innerloop.registry.PluginError` with the reason if it does
not conform. (To
register a single object, ``innerloop.register_inner_loss(obj)`` and its siblings need no plugin.)

Built-in plugins implement these hooks exactly as third-party plugins do; third-party plugins are
found through the ``innerloop`` entry-point group::

    [project.entry-points.innerloop]
    my_plugin = "my_package.plugin"
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

from innerloop.registry.kinds import KINDS, Kind

hookspec = pluggy.HookspecMarker("innerloop")


def _hookspec(kind: Kind) -> Callable[..., None]:
    def spec(register: Callable[[Any], Any]) -> None:
        pass

    spec.__name__ = spec.__qualname__ = kind.hook
    spec.__doc__ = kind.doc
    return hookspec(spec)


for _kind in KINDS:
    globals()[_kind.hook] = _hookspec(_kind)
del _kind
