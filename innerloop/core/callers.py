"""``warning_stacklevel``: the ``stacklevel`` that makes a warning point at the user's line.

A fixed ``stacklevel`` is right for one call path only: innerloop's warnings are issued at different
depths below the user's call (``load_model`` calls ``load_checkpoint``, which warns; the registry's first
build runs inside whatever first asked for a plugin), and a fixed count pointed into innerloop's own
files for the other paths.
"""

from __future__ import annotations

import inspect
from types import FrameType

#: Top-level packages whose frames lie between a user's line and innerloop's warning: innerloop itself,
#: pluggy (which calls plugin hooks), torch (``torch.compiler.disable``'s wrapper, ``nn.Module.__call__``),
#: and the frameworks that call innerloop back (Lightning's ``load_from_checkpoint``, transformers'
#: ``from_pretrained``).
NOT_THE_CALLERS = ("innerloop", "pluggy", "torch", "lightning", "transformers")


def warning_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` made by the function that calls this one, so that the
    warning points at the first frame outside :data:`NOT_THE_CALLERS`: the user's line (the
    ``innerloop.register_update_rule(...)``, ``load_model(...)``, or the ``TTTLayer(...)`` whose first use
    of the registry loaded the entry points), or the ``register(...)`` line of a plugin's hook."""
    level, _ = first_frame_outside(NOT_THE_CALLERS)
    return level - 1  # counted from this function, one of innerloop's: the warning's function is level 1


def first_frame_outside(packages: tuple[str, ...]) -> tuple[int, FrameType | None]:
    """How many frames up from the function that calls this one the first frame of a module outside the
    top-level ``packages`` is (1: that function itself), and that frame (None when there is none)."""
    here = inspect.currentframe()
    frame, level = (here.f_back if here is not None else None), 1
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in packages:
        frame, level = frame.f_back, level + 1
    return level, frame
