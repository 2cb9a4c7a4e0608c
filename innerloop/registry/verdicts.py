"""Passed registration checks, reused for an object of the same class code and the same settings.

A registry's checks of a plugin (:func:`innerloop.registry.manager.validate_plugin`) run the plugin on
seeded random inputs: one object always gets the same verdict. Building a registry again
(:func:`~innerloop.registry.isolated_registry`, :func:`~innerloop.registry.build_registry`) or giving a
layer a fresh instance of a plugin class already checked ran them again (~0.1 s for the built-ins).
Here a passed check is remembered under the object's *behaviour key*:

- its class and every class it inherits from, each attribute of theirs by identity when it is code
  (a function, a property, a descriptor: replacing a method makes another key) and by value when it is
  a plain setting (``name = "mlp"``, ``init_std = 0.02``); a function also by what can change in it in
  place: its code object (IPython's autoreload swaps it), its defaults, the contents of its closure
  cells and the module globals its code names (a helper function the same way, a plain value by value,
  any other object by identity); a class held as a setting (``config = Defaults``) and the metaclass by
  their own attributes, as the object's classes;
- its instance attributes by value (a float with its sign: ``-0.0`` is not ``0.0``).

An object with any other state (a tensor, a list, a helper object in an attribute or on its class, slots)
has no key and is checked every time, as is every object whose check failed or warned (the warning is
said at every registration). What the key cannot see is what changes inside an object compared by
identity (an attribute of a global class or module, an entry of a global or closed-over dict).
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
_HEAP_TYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: a class written in Python (its attributes can be set)


class _NoKey(Exception):
    """The object holds state the key cannot compare."""


def _plain(value: Any) -> Hashable:
    """``value`` as a hashable that compares as the value does, type included (1, 1.0 and True differ;
    a float by its bits, so -0.0 and 0.0 differ too)."""
    if isinstance(value, float):
        return (type(value), value.hex())
    if isinstance(value, complex):
        return (type(value), value.real.hex(), value.imag.hex())
    if isinstance(value, _PLAIN):
        return (type(value), value)
    if isinstance(value, (tuple, frozenset)):
        return (type(value), tuple(_plain(item) for item in value))
    raise _NoKey


def _function_part(function: types.FunctionType, alive: list[Any], seen: set[int]) -> Hashable:
    """A function by identity and by what can be changed in it in place: its code object (IPython's
    autoreload swaps ``__code__``), defaults and closure cells' contents (a ``nonlocal`` rebinding)."""
    alive.extend((function, function.__code__))
    keywords = sorted((function.__kwdefaults__ or {}).items())
    held = [*(function.__defaults__ or ()), *(value for _, value in keywords)]
    held += [_cell_contents(cell) for cell in function.__closure__ or ()]
    names = tuple(sorted(name for name in _global_names(function.__code__) if name in function.__globals__))
    parts = tuple(_held(value, alive, seen) for value in held)
    parts += tuple(_global(function.__globals__[name], alive, seen) for name in names)
    named = (tuple(name for name, _ in keywords), names)
    return ("function", id(function), id(function.__code__), named, parts)


def _global_names(code: types.CodeType) -> set[str]:
    """The names ``code`` and the code nested in it (comprehensions, inner functions) may read as globals."""
    names = set(code.co_names)
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            names |= _global_names(constant)
    return names


def _cell_contents(cell: types.CellType) -> Any:
    """A closure cell's value; the cell itself while it is empty (its variable not yet assigned)."""
    try:
        return cell.cell_contents
    except ValueError:
        return cell


def _global(value: Any, alive: list[Any], seen: set[int]) -> Hashable:
    """A global a function reads: a function as :func:`_function_part` (a helper whose code IPython's
    autoreload swapped), a plain value by value, anything else (a class, a module, a table) by identity."""
    return _held(value, alive, seen, code=types.FunctionType)


def _held(value: Any, alive: list[Any], seen: set[int], code: type | tuple[type, ...] = _CODE) -> Hashable:
    """A function's default or closure cell's value: ``code`` as :func:`_code_part`, a plain value by
    value, another object by identity (rebinding it makes another key; like a module global, what is
    changed inside it in place is not seen)."""
    if isinstance(value, code):
        return _code_part(value, alive, seen)
    try:
        return _plain(value)
    except _NoKey:
        alive.append(value)
        return ("object", id(value))


def _code_part(value: Any, alive: list[Any], seen: set[int]) -> Hashable:
    """Code by identity, held alive in ``alive`` (no id is reused while the entry lives), with what can
    change in it in place: a function's (:func:`_function_part`), a wrapped function's, and a class's
    attributes (a class written in Python: one that C defines cannot change)."""
    alive.append(value)
    if isinstance(value, types.FunctionType) and id(value) not in seen:
        seen.add(id(value))  # a function met again (a recursive closure, one held twice): by identity
        return _function_part(value, alive, seen)
    if isinstance(value, (staticmethod, classmethod)):
        return (type(value), id(value), _held(value.__func__, alive, seen))
    if isinstance(value, property):
        accessors = (value.fget, value.fset, value.fdel)
        return (property, id(value), tuple(_held(f, alive, seen) for f in accessors))
    if isinstance(value, type) and value.__flags__ & _HEAP_TYPE and id(value) not in seen:
        seen.add(id(value))  # a class met again (its own methods' __class__ cell): by identity
        return ("class", id(value), _classes_part(value, alive, seen))
    return ("code", id(value))


def _classes_part(cls: type, alive: list[Any], seen: set[int]) -> tuple:
    """``cls``, the classes it inherits from and its metaclass's, each by :func:`_class_part`."""
    classes = [c for c in cls.__mro__ if c is not object]
    classes += [m for m in type(cls).__mro__ if m not in (type, object)]
    for c in classes:
        seen.add(id(c))
    return tuple(_class_part(c, alive, seen) for c in classes)


def _class_part(cls: type, alive: list[Any], seen: set[int]) -> tuple:
    """One class of the MRO: code by :func:`_code_part`, plain settings by value; dunder data attributes
    (annotations, slots) are skipped."""
    items = []
    for name, value in vars(cls).items():
        if name in _SKIPPED_CLASS_ATTRIBUTES:
            continue
        if isinstance(value, _CODE):
            items.append((name, "code", _code_part(value, alive, seen)))
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
        classes = _classes_part(type(obj), alive, set())
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
