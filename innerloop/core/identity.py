"""Whether a plugin object is the one registered under its name (or computes the same thing).

Kernels are registered for names (``KernelSpec.inner_model``, ``inner_loss``, ``update_rule``) and a
state records the names of the model and loss that wrote it. A name alone proves nothing: any
instance may set ``name = "linear"``. These helpers settle what an object *is*:

- an inner model is the registered one if it is that object, or if it declares the same structure:
  an equal stack of affine layers and activations (:attr:`InnerModel.stack`, compared field by
  field, activation functions by identity) and equal parameter shapes at the head dim in use;
- an inner loss or update rule is the registered one if it is that object or an instance of exactly
  its class (a subclass may override anything, so it is a different object);
- whatever its class, an object patched through its instance ``__dict__`` (a callable there that
  shadows an attribute of its class, or that is named like a method of the protocol) is not the
  registered one: the kernels compute the class's methods, not the patch.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from innerloop.core.protocol import InnerLoss, InnerModel, UpdateRule
from innerloop.core.state import UNREGISTERED

KIND_OF = {"inner_model": "inner model", "inner_loss": "inner loss", "update_rule": "update rule"}
PROTOCOL_OF = {"inner_model": InnerModel, "inner_loss": InnerLoss, "update_rule": UpdateRule}


@functools.cache
def _protocol_names(kind: str) -> frozenset[str]:
    """The attribute names of the ``kind``'s protocol class (asked at every dispatch: ``dir`` once)."""
    return frozenset(name for name in dir(PROTOCOL_OF[kind]) if not name.startswith("__"))


def patched_attributes(kind: str, obj: Any) -> list[str]:
    """Names of the callables in ``obj``'s instance ``__dict__`` that shadow an attribute of its class
    or are named like an attribute of the ``kind``'s protocol (methods patched onto the instance)."""
    protocol_names = _protocol_names(kind)
    cls = type(obj)
    return sorted(
        name
        for name, value in getattr(obj, "__dict__", {}).items()
        if callable(value) and (hasattr(cls, name) or name in protocol_names)
    )


Value = TypeVar("Value")


class IdentityTable(Generic[Value]):
    """Values kept per object, found by the very object (not by ``==`` or ``hash``, which a plugin may
    define or lack), without keeping the objects alive: an entry goes when its object is freed (a new
    object that takes its id is not found). An object that takes no weak reference is held, so that its
    id is never reused."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[Callable[[], Any], Value]] = {}

    def set(self, obj: Any, value: Value) -> None:
        key = id(obj)
        try:
            held: Callable[[], Any] = weakref.ref(obj, lambda _ref: self._entries.pop(key, None))
        except TypeError:  # no weak reference to it: held, so that its id is never reused
            held = lambda: obj  # noqa: E731
        self._entries[key] = (held, value)

    def get(self, obj: Any, default: Value | None = None) -> Value | None:
        """The value set for ``obj`` itself, else ``default``."""
        entry = self._entries.get(id(obj))
        return entry[1] if entry is not None and entry[0]() is obj else default

    def __contains__(self, obj: object) -> bool:
        entry = self._entries.get(id(obj))
        return entry is not None and entry[0]() is obj

    def __len__(self) -> int:
        return len(self._entries)


def _registered(kind: str, name: str) -> Any | None:
    from innerloop.registry import get_registry  # late import: core must not depend on the registry

    try:
        return get_registry().get(kind, name)
    except ValueError:
        return None


def _same_model(model: Any, registered: Any, head_dim: int | None) -> bool:
    if model.stack is None or model.stack != registered.stack:
        return False
    return head_dim is None or model.param_shapes(head_dim) == registered.param_shapes(head_dim)


def registered_mismatch(kind: str, obj: Any, head_dim: int | None = None) -> str | None:
    """None if ``obj`` is (or computes exactly what) the plugin registered under ``obj.name`` is,
    else a sentence saying why not. ``kind`` is ``"inner_model"``, ``"inner_loss"`` or
    ``"update_rule"``; ``head_dim`` (models) also compares parameter shapes."""
    what = f"{KIND_OF[kind]} {obj.name!r} ({type(obj).__module__}.{type(obj).__qualname__})"
    patched = patched_attributes(kind, obj)
    if patched:
        return f"{what} has {patched} patched onto the instance, so it is not the registered plugin"
    registered = _registered(kind, obj.name)
    if registered is obj:
        return None
    if registered is None:
        return f"{what} is not registered under that name"
    same = _same_model(obj, registered, head_dim) if kind == "inner_model" else type(obj) is type(registered)
    if same:
        return None
    detail = "a different stack or parameter shapes" if kind == "inner_model" else "a different class"
    return f"{what} reuses the name of the registered {type(registered).__qualname__} but has {detail}"


def identity_label(kind: str, obj: Any, head_dim: int | None = None) -> str:
    """The name of ``obj`` when it is the registered plugin of that name, else the name qualified by
    its class (so that states written by an impostor are not taken for the registered model's)."""
    if registered_mismatch(kind, obj, head_dim) is None:
        return obj.name
    return f"{obj.name}{UNREGISTERED} {type(obj).__module__}.{type(obj).__qualname__})"


__all__ = ["identity_label", "registered_mismatch"]
