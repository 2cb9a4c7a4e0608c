"""One table declares the plugin kinds; hooks are called through pluggy; one object registers without
a plugin class; the base classes are public (issue "The house", pluggy used as designed)."""

from __future__ import annotations

import pytest
import torch

import innerloop
from innerloop.registry import PluginError, build_registry, hookimpl, hookspecs, manager
from innerloop.registry.kinds import KINDS, Kind


def test_every_kind_of_the_table_has_its_hook_registrar_and_one_object_function():
    hooks = {name for name in dir(hookspecs) if name.startswith("register_")}
    assert hooks == {kind.hook for kind in KINDS}
    registry = build_registry(include_external=False)
    for kind in KINDS:
        assert getattr(hookspecs, kind.hook).__doc__ == kind.doc
        assert registry.names(kind.name), kind.name  # the built-ins provide one of each
        assert callable(getattr(innerloop.registry, f"register_{kind.name}"))
        assert isinstance(kind, Kind) and kind.base.__name__ in dir(innerloop) + ["KernelSpec"]


def test_a_plugin_s_hooks_are_called_through_pluggy_once_each():
    calls = []

    class Counting:
        def __init__(self, label):
            self.label = label

        @hookimpl(tryfirst=True)  # pluggy's own options work: hooks go through its hook caller
        def register_inner_losses(self, register):
            calls.append(self.label)

    registry = build_registry(include_external=False)
    registry.add_plugin(Counting("first"), origin="first")
    registry.add_plugin(Counting("second"), origin="second")
    assert calls == ["first", "second"]  # registering the second did not call the first again


class SmoothL1(innerloop.InnerLoss):
    name = "smooth_l1_kinds_test"

    def pairs(self, views, carry):
        return innerloop.LossPairs(views.key, views.value)  # valid and carry have defaults

    def token_loss(self, prediction, target):
        return torch.nn.functional.smooth_l1_loss(prediction, target, reduction="none").sum(-1)


def test_one_object_registers_without_a_plugin_class(fresh_global_registry):
    assert innerloop.register_inner_loss(SmoothL1()).name == "smooth_l1_kinds_test"
    (entry,) = [e for e in innerloop.get_registry().entries("inner_loss") if e.name == "smooth_l1_kinds_test"]
    assert entry.origin == f"{__name__}.SmoothL1"
    y, _ = innerloop.TTTLayer(16, 2, inner_loss="smooth_l1_kinds_test")(torch.randn(1, 5, 16))
    assert torch.isfinite(y).all()
    with pytest.raises(PluginError, match="already registered; nothing was changed"):
        innerloop.register_inner_loss(SmoothL1())  # a re-run notebook cell


def test_one_object_registration_works_as_a_class_decorator(fresh_global_registry):
    @innerloop.register_inner_loss
    class Shifted(innerloop.HalfSquaredError):
        name = "shifted_kinds_test"

        def pairs(self, views, carry):
            return innerloop.LossPairs(views.key, views.value + 1.0)

    assert isinstance(Shifted, type)
    assert "shifted_kinds_test" in innerloop.available("inner_loss")


def test_one_object_registration_validates_like_any_plugin(fresh_global_registry):
    class WrongGradient(innerloop.HalfSquaredError):
        name = "wrong_gradient_kinds_test"

        def pairs(self, views, carry):
            return innerloop.LossPairs(views.key, views.value)

        def token_loss_grad(self, prediction, target):
            return -(prediction - target)

    with pytest.raises(PluginError, match="token_loss_grad vs autograd"):
        innerloop.register_inner_loss(WrongGradient())
    assert "wrong_gradient_kinds_test" not in innerloop.available("inner_loss")
    with pytest.raises(ValueError, match="unknown plugin kind 'inner_losss'; valid kinds"):
        manager.register_object("inner_losss", SmoothL1())


def test_base_classes_are_public_and_loss_pairs_have_defaults():
    from innerloop.plugins.losses.reconstruction import HalfSquaredError as old_path

    assert old_path is innerloop.HalfSquaredError
    pairs = innerloop.LossPairs(torch.zeros(1), torch.ones(1))
    assert pairs.valid is None and pairs.carry == {}
    for name in ("InnerModel", "StackModel", "InnerLoss", "UpdateRule", "ModelInnerLoss", "ModelUpdateRule"):
        assert name in innerloop.__all__
