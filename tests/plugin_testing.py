"""Plugins for the tests: two plugin losses under one name, with different math, for the tests of what
checkpoints and exports record of their plugins (tests/train/test_checkpoint_plugin_origins.py, tests/hf/
test_export_plugin_origins.py: loading where the other one answers to the name must warn), and
:class:`One`, a plugin object registering one object through one hook (the registry's tests)."""

from __future__ import annotations

from innerloop import HalfSquaredError, LossPairs, hookimpl

NAME = "origins_test_loss"


class TargetsAsGiven(HalfSquaredError):
    """A plugin loss: the key view should reconstruct the value view."""

    name = NAME

    def pairs(self, views, carry):
        return LossPairs(inputs=views.key, targets=views.value, valid=None, carry={})


class TargetsDoubled(TargetsAsGiven):
    """Another plugin's loss under the same name, with other math (the model computes another function)."""

    def pairs(self, views, carry):
        return LossPairs(inputs=views.key, targets=2 * views.value, valid=None, carry={})


def class_name(cls: type) -> str:
    """``module.QualName``, as a plugin record names a plugin's class."""
    return f"{cls.__module__}.{cls.__qualname__}"


class One:
    """A plugin registering one object through the hook of ``kind``."""

    def __init__(self, kind: str, obj):
        def hook(register):
            register(obj)

        setattr(self, f"register_{kind}", hookimpl(hook))
