"""Passed registration checks, reused for an object of the same class code and the same settings.

A registry's checks of a plugin (:func:`innerloop.registry.manager.validate_plugin`) run the plugin on
seeded random inputs: one object always gets the same verdict. Building a registry again
(:func:`~innerloop.registry.isolated_registry`, :func:`~innerloop.registry.build_registry`) or giving a
layer a fresh instance of a plugin class already checked ran them again (~0.1 s for the built-ins).
Here a passed check is remembered under the object's *behaviour key*:

- its class and every class it inherits from, each attribute of theirs by identity when it is code
  (a function, a property, a descriptor: replacing a method makes another key) and by value when it is
  a plain setting (``name = "mlp"``, ``init_std = 0.02``);
- its instance attributes by value.

An object with any other state (a tensor, a list, a helper object in an attribute or on its class, slots)
has no key and is checked every time, as is every object whose check failed or warned (the warning is
said at every registration). What the key cannot see is
a module-level global its methods read: a plugin whose numbers depend on one is checked once per key.
"""

from __future__ import annotations

import enum
import threading
import types
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import torch

_CODE = (
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodDescriptorType,
    types.WrapperDescriptorType,
    types.MemberDescriptorType,
    types.GetSetDescriptorType,
    staticmethod,
    classmethod,
    property,
    type,
)
_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, enum.Enum)
_SKIPPED_CLASS_ATTRIBUTES = frozenset({"_abc_impl", "__dict__", "__weakref__", "__doc__", "__module__"})
_MAX_ENTRIES = 512


class _NoKey(Exception):
    """The object holds state the key cannot compare."""


def _plain(value: Any) -> Hashable:
    """``value`` as a hashable that compares as the value does, type included (1, 1.0 and True differ)."""
    if isinstance(value, _PLAIN):
        return (type(value), value)
    if isinstance(value, (tuple, frozenset)):
        return (type(value), tuple(_plain(item) for item in value))
    raise _NoKey


def _class_part(cls: type, alive: list[Any]) -> tuple:
    """One class of the MRO: code by identity (held alive in ``alive``, so that no id is reused while the
    entry lives), plain settings by value; dunder data attributes (annotations, slots) are skipped."""
    items = []
    for name, value in vars(cls).items():
        if name in _SKIPPED_CLASS_ATTRIBUTES:
            continue
        if isinstance(value, _CODE):
            alive.append(value)
            items.append((name, "code", id(value)))
        elif name.startswith("__") and name.endswith("__"):
            if name == "__slots__" and value:
                raise _NoKey
            continue
        else:
            items.append((name, "value", _plain(value)))
    return (cls, tuple(items))


def behaviour_key(kind: str, obj: Any, external: bool) -> tuple[Hashable, list[Any]] | None:
    """``(key, alive)``: the key of ``obj``'s verdict as a ``kind`` plugin (``external``: with the checks of
    a plugin that does not ship with innerloop) and the objects that must outlive the entry; None when
    ``obj`` holds state the key cannot compare."""
    state = getattr(obj, "__dict__", None)
    if state is None:
        return None
    alive: list[Any] = []
    try:
        classes = tuple(_class_part(cls, alive) for cls in type(obj).__mro__ if cls is not object)
        instance = tuple(sorted((str(name), _plain(value)) for name, value in state.items()))
    except _NoKey:
        return None
    return (kind, external, classes, instance), alive


_CHECKING = threading.local()


def not_reusable() -> None:
    """Called by a check that passes with a warning (or any outcome that must be said at every
    registration): the verdict being made is not remembered, so the check, and its warning, runs again."""
    if getattr(_CHECKING, "reusable", None) is not None:
        _CHECKING.reusable = False


class PassedChecks:
    """The names that objects registered under once their checks passed, by behaviour key (the most
    recent ``_MAX_ENTRIES`` keys; safe to share between threads)."""

    def __init__(self) -> None:
        self._names: OrderedDict[Hashable, tuple[str, list[Any]]] = OrderedDict()
        self._lock = threading.Lock()

    def name_or_check(self, kind: str, obj: Any, external: bool, check: Callable[[], str]) -> str:
        """The name ``obj`` registers under: remembered for its behaviour key, else ``check()``'s (which
        raises for an object that does not conform: nothing is remembered then)."""
        keyed = behaviour_key(kind, obj, external)
        if keyed is not None:
            with self._lock:
                found = self._names.get(keyed[0])
                if found is not None:
                    self._names.move_to_end(keyed[0])
                    return found[0]
        outer, _CHECKING.reusable = getattr(_CHECKING, "reusable", None), True
        try:
            name = check()
            reusable = _CHECKING.reusable
        finally:  # a check inside another (a registration hook that registers): its warning reaches the outer one
            _CHECKING.reusable = None if outer is None else outer and _CHECKING.reusable
        if keyed is not None and reusable:
            with self._lock:
                self._names[keyed[0]] = (name, keyed[1])
                while len(self._names) > _MAX_ENTRIES:
                    self._names.popitem(last=False)
        return name

    def clear(self) -> None:
        """Forget every remembered verdict."""
        with self._lock:
            self._names.clear()
