"""torch.compile's names: the one rule by which innerloop reads weight names with or without them.

``torch.compile(module)`` returns a wrapper (``OptimizedModule``) that holds the module under the
attribute :data:`COMPILED`, so every weight name of a compiled model (``_orig_mod.embed.weight``) or part
(``blocks.1._orig_mod.mixer...``) has that segment, which the uncompiled model's names lack. A name is a
compiled one when one of its dot-separated segments is :data:`COMPILED` (:func:`is_compiled_name`), never
because a segment merely contains it (``my_orig_mod_x.weight`` is a plain name); :func:`plain_names` takes
those segments out. Every checkpoint innerloop writes uses the plain names and every loader (checkpoints,
the Lightning module, Hugging Face, the reference-code converter) reads both, through these functions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from torch import nn

COMPILED = "_orig_mod"
"""The attribute under which torch.compile's wrapper (``OptimizedModule``) holds the module it compiled: a
segment of every weight name of a compiled model (``_orig_mod.embed.weight``) or part
(``blocks.1._orig_mod.mixer...``), which the uncompiled model does not have."""

Key = TypeVar("Key")


def is_compiled_name(name: object) -> bool:
    """Whether the weight name ``name`` has torch.compile's :data:`COMPILED` as one of its dot-separated
    segments (a name that is not a string has none)."""
    return isinstance(name, str) and COMPILED in name.split(".")


def plain_name(name: Key) -> Key:
    """``name`` without its :data:`COMPILED` segments: the name the uncompiled model gives that weight
    (a name that is not a string is returned as it is, for the caller's own check to name)."""
    if not is_compiled_name(name):
        return name
    assert isinstance(name, str)
    return ".".join(part for part in name.split(".") if part != COMPILED)  # type: ignore[return-value]


def plain_names(state_dict: Mapping[Any, Any], where: str = "the state_dict") -> dict[Any, Any]:
    """``state_dict`` with torch.compile's ``_orig_mod`` segment taken out of every name, in the same order:
    the names the uncompiled model has, which every checkpoint innerloop writes uses and every loader
    reads (so a compiled and an uncompiled model read each other's files). Raises ``ValueError`` where
    two names become one (``a._orig_mod.w`` beside ``a.w``): no weight is dropped."""
    plain: dict[Any, Any] = {}
    for name, value in state_dict.items():
        key = plain_name(name)
        if key in plain:
            raise ValueError(
                f"{where} names the weight {key!r} both with and without torch.compile's {COMPILED!r} "
                "segment; keep one of them (e.g. the compiled model's state_dict alone)"
            )
        plain[key] = value
    return plain


def uncompiled(module: nn.Module) -> nn.Module:
    """The module that torch.compile's wrapper ``module`` holds (under :data:`COMPILED`), else ``module``."""
    return getattr(module, COMPILED, module)


__all__ = ["COMPILED", "is_compiled_name", "plain_name", "plain_names", "uncompiled"]
