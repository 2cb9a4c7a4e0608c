"""Reading the environment variables that switch innerloop's behaviour on or off, all one way."""

from __future__ import annotations

import os

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


class EnvironmentSwitchError(ValueError):
    """An environment switch holds a value that is neither yes nor no (the message names it)."""


def environment_flag(name: str, default: bool) -> bool:
    """The yes/no value of the environment variable ``name``: ``default`` when it is unset or empty
    (spaces around a value and its case do not matter), True for one of :data:`TRUE_WORDS`, False for
    one of :data:`FALSE_WORDS`. Any other value raises :class:`EnvironmentSwitchError` (a ``ValueError``)
    naming the variable, what it holds and what is valid: a switch never reads an unclear value as one
    side silently."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in TRUE_WORDS:
        return True
    if value in FALSE_WORDS:
        return False
    raise EnvironmentSwitchError(
        f"{name}={os.environ[name]!r} is not a yes/no value; valid: {', '.join(TRUE_WORDS)} (on) or "
        f"{', '.join(FALSE_WORDS)} (off), or unset for the default ({'on' if default else 'off'})"
    )


__all__ = ["FALSE_WORDS", "TRUE_WORDS", "EnvironmentSwitchError", "environment_flag"]
