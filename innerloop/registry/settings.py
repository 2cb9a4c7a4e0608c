"""A plugin object's settings (``Huber(delta=2.0)``): the values a checkpoint records beside the plugin's
name and origin, so that a load where that name is registered with other settings is refused
(:func:`innerloop.checkpoints.check_plugin_settings`).

The rule is here, below the registry, so that registration checks a declared ``settings()`` at once (a
plugin whose ``settings()`` gives what a checkpoint cannot record is refused when registered, not when a
finished training run saves) and checkpoints read the same rule.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Mapping
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
    """Whether ``value`` is a setting JSON keeps as it is: a bool, int, float, str or None, or a list or
    tuple of those (a tuple reads back as a list)."""
    if isinstance(value, list | tuple):
        return all(isinstance(item, PLAIN_SCALARS) for item in value)
    return isinstance(value, PLAIN_SCALARS)


def declares_settings(obj: Any) -> bool:
    """Whether the plugin object ``obj`` says which of its values are settings: it defines ``settings()``
    or is a dataclass (its fields). Otherwise :func:`plugin_settings` records its public plain attributes,
    which may be no settings (a counter bumped as it runs, a per-process path or time)."""
    return not isinstance(obj, type) and (
        callable(getattr(obj, "settings", None)) or dataclasses.is_dataclass(obj)
    )


def declared_settings(obj: Any) -> dict[str, Any]:
    """What the plugin object ``obj``'s ``settings()`` gives, checked: a mapping of str to plain values
    (:func:`is_plain_setting`; a tuple given as a list). A :class:`TypeError` naming the plugin where
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
    if not isinstance(settings, Mapping) or not all(
        isinstance(key, str) and is_plain_setting(value) for key, value in settings.items()
    ):
        raise TypeError(
            f"the plugin {name}'s settings() gave {settings!r}: it must give a mapping of str to plain "
            "values (bool, int, float, str, None, or lists of those), which a checkpoint records"
        )
    return {key: list(value) if isinstance(value, tuple) else value for key, value in settings.items()}


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
    are what is checked. Values that are not plain (tensors, modules, callables) are not settings and are
    left out, except from a declared ``settings()``, which must give plain values only."""
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
    return {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in sorted(candidates.items())
        if is_plain_setting(value) and key != "name"  # its name is recorded already, as the record's key
    }
