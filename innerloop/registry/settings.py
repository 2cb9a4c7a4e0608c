"""A plugin object's settings (``Huber(delta=2.0)``): the values a checkpoint records beside the plugin's
name and origin, so that a load where that name is registered with other settings is refused
(:func:`innerloop.checkpoints.check_plugin_settings`).

The rule is here, below the registry, so that registration checks a declared ``settings()`` at once (a
plugin whose ``settings()`` gives what a checkpoint cannot record is refused when registered, not when a
finished training run saves) and checkpoints read the same rule.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import enum
import functools
import inspect
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import PurePath
from typing import Any

import torch

PLAIN_SCALARS = (bool, int, float, str, type(None))

MODULE_STATE_ATTRIBUTES: frozenset[str] = frozenset(
    key for key in vars(torch.nn.Module()) if not key.startswith("_")
)
"""The public attributes ``torch.nn.Module`` itself keeps (``training``): a plugin written as an
``nn.Module`` has them, but they are its mode, not settings (a layer holding the plugin makes it a child
module, so ``model.eval()`` flips ``training``): left out of :func:`plugin_settings`, and of a recorded
plugin's settings where they are compared (a checkpoint saved before recorded them)."""


def is_no_setting(obj: Any, key: str) -> bool:
    """Whether the public attribute ``key`` of the plugin object ``obj`` is no setting though plain: an
    ``nn.Module``'s own (:data:`MODULE_STATE_ATTRIBUTES`: its mode), or a ``functools.cached_property``'s
    value (derived from the settings at its first use, a training run's: a fresh object has none yet).
    Each was recorded by a save and warned of at every load with a fresh object."""
    if isinstance(obj, torch.nn.Module) and key in MODULE_STATE_ATTRIBUTES:
        return True
    return isinstance(inspect.getattr_static(type(obj), key, None), functools.cached_property)


def is_plain_setting(value: Any) -> bool:
    """Whether ``value`` is a setting a checkpoint records (:func:`recorded_setting`): a bool, int,
    float, str or None, a numpy or 0-dim torch scalar, an enum member, a path, or a list or tuple of
    those (a tuple reads back as a list)."""
    return recorded_setting(value) is not NOT_RECORDED


NOT_RECORDED = object()
"""What :func:`recorded_setting` gives for a value that is no setting a checkpoint can record."""

_MAX_NESTING = 8
"""Lists within lists :func:`recorded_setting` reads at most (a list that holds itself is no setting)."""


_AS_PLAIN: dict[type, Any] = {int: int.__index__, float: float.__float__, str: str.__str__}
"""How a value of a subclass of a plain type is recorded: as the plain value it is (``str()`` of a
``(str, Enum)`` member would give ``"Class.MEMBER"``, not its value, which a checkpoint recorded before)."""


_TENSOR_READER: contextvars.ContextVar[Callable[[torch.Tensor], Any] | None] = contextvars.ContextVar(
    "innerloop_settings_tensor_reader", default=None
)


@contextlib.contextmanager
def tensors_read_as(reader: Callable[[torch.Tensor], Any]) -> Iterator[None]:
    """Inside (this thread or task), :func:`recorded_setting` gives ``reader(tensor)`` for a 0-dim torch
    tensor instead of the number it holds (``tensor.item()``, which waits for a GPU tensor's device):
    what a first-use verdict's lookup, run at every dispatch, reads instead (a stamp of the tensor)."""
    token = _TENSOR_READER.set(reader)
    try:
        yield
    finally:
        _TENSOR_READER.reset(token)


def recorded_setting(value: Any, depth: int = 0) -> Any:
    """``value`` as a checkpoint records it (JSON keeps it as it is), or :data:`NOT_RECORDED`: a bool,
    int, float, str or None as its plain type (a ``numpy.float64`` or an ``IntEnum`` member, subclasses
    of float and int, as the float or int they are); a numpy scalar (``np.float32(0.5)``,
    ``np.int64(3)``, ``np.bool_``), a 0-dim numpy array or a 0-dim torch tensor that records no graph as the Python number
    it holds (its exact value: ``np.float32(0.1)`` is 0.10000000149011612); another enum member as
    ``"Class.MEMBER"``; a path as its str; a list or tuple of these as a list. Anything else (an array
    or a tensor of more than one value, a module, a callable) is no setting."""
    if isinstance(value, bool | type(None)):
        return value
    for plain, as_plain in _AS_PLAIN.items():  # an IntEnum or (str, Enum) member, a numpy.float64: its value
        if isinstance(value, plain):
            return as_plain(value)
    if isinstance(value, enum.Enum):
        return f"{type(value).__qualname__}.{_member_name(value)}"
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, list | tuple):
        items = (
            [recorded_setting(item, depth + 1) for item in value] if depth < _MAX_NESTING else [NOT_RECORDED]
        )
        return NOT_RECORDED if any(item is NOT_RECORDED for item in items) else items
    if _is_scalar(value):
        reader = _TENSOR_READER.get() if isinstance(value, torch.Tensor) else None
        return recorded_setting(value.item(), depth) if reader is None else reader(value)
    return NOT_RECORDED


def _member_name(member: enum.Enum) -> str | None:
    """``member.name``; for an ``enum.Flag`` value of several members, which Python 3.10 leaves unnamed
    (None, so that every such value recorded alike), the names of its single-bit members joined by ``|``
    in the order of their values, as Python 3.11 names it (``"R|B"``); any bits no member names follow
    as a number. The empty flag stays None on every version."""
    flags = member.value if isinstance(member, enum.Flag) else None
    if member.name is not None or not isinstance(flags, int) or flags == 0:
        return member.name
    bits = sorted(
        {
            m.value: m.name
            for m in type(member).__members__.values()
            if _is_single_bit(m.value) and m.value & flags
        }.items()
    )
    rest = flags & ~sum(bit for bit, _ in bits)
    return "|".join([*(name for _, name in bits), *([str(rest)] if rest else [])])


def _is_single_bit(value: Any) -> bool:
    return isinstance(value, int) and value > 0 and value & (value - 1) == 0


def _is_scalar(value: Any) -> bool:
    """A numpy scalar (``np.float32``, ``np.int64``, ``np.bool_``; numpy imported by whoever made it), a
    0-dim numpy array of a real number or flag (``np.asarray(0.5)``), or a 0-dim torch tensor of a number
    that records no graph (a learned value is a weight, not a setting)."""
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and not value.requires_grad and not value.is_complex()
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, numpy.ndarray):
        return value.ndim == 0 and value.dtype.kind in "biuf"
    return (
        numpy is not None
        and isinstance(value, numpy.generic)
        and not isinstance(value, numpy.complexfloating)
    )


def declares_settings(obj: Any) -> bool:
    """Whether the plugin object ``obj`` says which of its values are settings: it defines ``settings()``
    or is a dataclass (its fields). Otherwise :func:`plugin_settings` records its public plain attributes,
    which may be no settings (a counter bumped as it runs, a per-process path or time)."""
    return not isinstance(obj, type) and (
        callable(getattr(obj, "settings", None)) or dataclasses.is_dataclass(obj)
    )


def declared_settings(obj: Any) -> dict[str, Any]:
    """What the plugin object ``obj``'s ``settings()`` gives, checked: a mapping of str to plain values
    (:func:`recorded_setting`: a tuple given as a list, a numpy scalar as its number). A :class:`TypeError` naming the plugin where
    ``settings`` takes arguments (a method of that name meant for something else) or gives anything else."""
    declared = obj.settings
    name = type(obj).__qualname__
    try:
        inspect.signature(declared).bind()
    except TypeError:
        raise TypeError(
            f"the plugin {name} has a method settings{inspect.signature(declared)} that takes arguments: "
            "innerloop calls settings() with none to record the plugin's settings in a checkpoint (a "
            "mapping of str to plain values); rename the method or make it take none"
        ) from None
    except ValueError:  # a builtin without a signature: called as it is below
        pass
    settings = declared()
    if not isinstance(settings, Mapping) or not all(isinstance(key, str) for key in settings):
        raise TypeError(
            f"the plugin {name}'s settings() gave {settings!r}: it must give a mapping of str to plain "
            "values (bool, int, float, str, None, or lists of those), which a checkpoint records"
        )
    recorded = {key: recorded_setting(value) for key, value in settings.items()}
    refused = [key for key, value in recorded.items() if value is NOT_RECORDED]
    if refused:
        raise TypeError(
            f"the plugin {name}'s settings() gave {', '.join(f'{key}={settings[key]!r}' for key in refused)}: "
            "a checkpoint records only plain values (bool, int, float, str, None; numpy or 0-dim torch "
            "scalars, enum members and paths as those; lists of them); give the value as one of those"
        )
    return recorded


def plugin_settings(obj: Any) -> dict[str, Any]:
    """The settings of the plugin object ``obj`` that a checkpoint records beside its name and origin, so
    that a load where that name is registered with other settings is refused
    (:class:`~innerloop.checkpoints.PluginSettingsError`; warned of where they are public attributes, not
    declared: :func:`~innerloop.checkpoints.check_plugin_settings`).

    The rule, one for innerloop's plugins and everyone's: what ``obj.settings()`` returns, where it
    defines one (:func:`declared_settings`; ``{}`` opts out); else, for a dataclass instance, its fields
    of plain values; else its public instance attributes (``vars(obj)``, but ``name``, those starting
    with ``_`` and those of :func:`is_no_setting`) of plain values (``Huber(delta=2.0)`` that keeps
    ``self.delta``). A class registered itself, and an object with none of these, has ``{}``: then its name, origin, class and source digest
    are what is checked. Values are recorded as :func:`recorded_setting` reads them (a numpy scalar as the
    number it holds, an enum member as ``"Class.MEMBER"``, a path as its str); those it cannot record
    (tensors of more than one value, modules, callables) are not settings and are left out, except from a
    declared ``settings()``, which is refused naming them."""
    if isinstance(obj, type):
        return {}
    if callable(getattr(obj, "settings", None)):
        return declared_settings(obj)
    if dataclasses.is_dataclass(obj):
        candidates = {field.name: getattr(obj, field.name, None) for field in dataclasses.fields(obj)}
    else:
        candidates = {
            key: value
            for key, value in getattr(obj, "__dict__", {}).items()
            if not key.startswith("_") and not is_no_setting(obj, key)
        }
    recorded = {key: recorded_setting(value) for key, value in sorted(candidates.items()) if key != "name"}
    # its name is recorded already, as the record's key
    return {key: value for key, value in recorded.items() if value is not NOT_RECORDED}
