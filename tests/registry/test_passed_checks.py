"""A passed registration check is reused for an object of the same class code and settings, and for
nothing else (innerloop/registry/verdicts.py): replacing a method, changing a setting, holding a tensor or
failing once each means the checks run (and refuse) again."""

from __future__ import annotations

import pytest
import torch

import innerloop
from innerloop.core.protocol import UpdateRule
from innerloop.plugins.losses.reconstruction import Reconstruction
from innerloop.registry import PluginError, get_registry, isolated_registry, manager
from innerloop.registry.verdicts import PassedChecks, behaviour_key
from innerloop.testing.reference import naive_token_loop

CALLS: list[str] = []  # module-level: a counter on the class would be a setting, and change the key


class CountedLoss(Reconstruction):
    name = "passed_checks_counted"
    scale = 1.0

    def token_loss(self, prediction, target):
        CALLS.append(self.name)
        return self.scale * super().token_loss(prediction, target)


def _checks_run(loss) -> int:
    """How many times registering ``loss`` in a fresh registry ran its ``token_loss``."""
    CALLS.clear()
    with isolated_registry():
        innerloop.register_inner_loss(loss, origin="test_passed_checks")
    return len(CALLS)


def test_a_registry_built_again_does_not_check_the_built_ins_again(monkeypatch) -> None:
    checked = []
    check = manager._checked_name
    monkeypatch.setattr(manager, "_checked_name", lambda *args: checked.append(args[0].name) or check(*args))
    monkeypatch.setattr(manager, "_PASSED_CHECKS", PassedChecks())  # nothing remembered yet
    with isolated_registry():
        get_registry()
    numeric = {"inner_model", "inner_loss", "update_rule"}  # the checks that run the plugin (~0.1 s in all)
    assert sum(kind in numeric for kind in checked) >= 8  # every built-in model, loss and rule
    checked.clear()
    with isolated_registry():  # the same built-in classes and settings: their verdicts are reused
        get_registry()
    assert not numeric & set(checked), checked


def test_the_same_class_and_settings_are_checked_once() -> None:
    first = _checks_run(CountedLoss())
    assert first > 0
    assert _checks_run(CountedLoss()) == 0  # a fresh instance, the same class and settings


def test_another_setting_or_a_replaced_method_is_checked_again(monkeypatch) -> None:
    # CountedLoss inherits Reconstruction's closed-form token_loss_grad, right only at scale 1: a passed
    # scale-1 object must not vouch for a scaled one.
    _checks_run(CountedLoss())
    other = CountedLoss()
    other.scale = 2.0  # an instance setting
    with pytest.raises(PluginError, match="passed_checks_counted.*token_loss_grad"):
        _checks_run(other)
    monkeypatch.setattr(CountedLoss, "scale", 3.0)  # a class setting
    with pytest.raises(PluginError, match="passed_checks_counted.*token_loss_grad"):
        _checks_run(CountedLoss())
    monkeypatch.setattr(CountedLoss, "scale", 1.0)
    assert _checks_run(CountedLoss()) == 0  # the first verdict again

    def broken(self, prediction, target):
        return (prediction - target).abs().sum(-1) * float("nan")

    monkeypatch.setattr(CountedLoss, "token_loss", broken)  # the method replaced: refused, not reused
    with pytest.raises(PluginError, match="passed_checks_counted"):
        _checks_run(CountedLoss())


def test_a_failed_check_is_not_remembered(monkeypatch) -> None:
    flaky = {"broken": True}

    class SometimesBroken(Reconstruction):
        name = "passed_checks_sometimes_broken"

        def token_loss(self, prediction, target):
            loss = super().token_loss(prediction, target)
            return loss * float("nan") if flaky["broken"] else loss

    with pytest.raises(PluginError):
        _checks_run(SometimesBroken())
    flaky["broken"] = False
    _checks_run(SometimesBroken())  # passes now: the refusal was not kept


def test_objects_with_state_the_key_cannot_compare_have_no_key() -> None:
    class WithTensor(Reconstruction):
        name = "passed_checks_with_tensor"

    holder = WithTensor()
    holder.weights = torch.ones(2)
    assert behaviour_key("inner_loss", holder, True) is None
    holder.weights = [1.0, 2.0]  # a list: mutable in place
    assert behaviour_key("inner_loss", holder, True) is None

    class ListOnClass(Reconstruction):
        name = "passed_checks_list_on_class"
        table = [1.0]

    assert behaviour_key("inner_loss", ListOnClass(), True) is None

    class Slotted:
        __slots__ = ("x",)

    assert behaviour_key("inner_loss", Slotted(), True) is None


def test_equal_looking_settings_of_other_types_are_other_keys() -> None:
    one, other, same = CountedLoss(), CountedLoss(), CountedLoss()
    one.scale, other.scale, same.scale = 1, 1.0, 1.0
    assert behaviour_key("inner_loss", one, True)[0] != behaviour_key("inner_loss", other, True)[0]
    assert behaviour_key("inner_loss", other, True)[0] == behaviour_key("inner_loss", same, True)[0]
    assert behaviour_key("inner_loss", other, True)[0] != behaviour_key("inner_loss", other, False)[0]
    assert behaviour_key("inner_loss", other, True)[0] != behaviour_key("inner_model", other, True)[0]


def _autograd_inside() -> None:
    """What a rule taking torch.autograd.grad does inside (as naive_token_loop did before s47i made it
    leave inference mode): fine with autograd and under no_grad (enable_grad), raises under inference_mode."""
    with torch.enable_grad():
        probe = torch.zeros((), requires_grad=True)
        torch.autograd.grad(probe * 2, probe)


class InferenceModeRaises(UpdateRule):
    """Right with autograd and under no_grad; raises under inference_mode (it takes
    torch.autograd.grad, :func:`_autograd_inside`): registered with a PluginWarning."""

    name = "passed_checks_inference_mode_raises"

    def check_model(self, model):  # registration checks linear alone: the warning is the same on every model
        return None if model.name == "linear" else "passed_checks: the linear model only"

    def forward(self, state, task, views, lr, tau):
        _autograd_inside()
        return naive_token_loop(state, task, views, 0.5 * lr, tau)

    def reference(self, state, task, views, lr, tau):
        return naive_token_loop(state, task, views, lr * 0.5, tau)


@pytest.mark.slow  # registers an external rule twice (its naive-loop checks): ~0.7 s
def test_a_check_that_passes_with_a_warning_warns_at_every_registration() -> None:
    for _ in range(2):
        with isolated_registry(), pytest.warns(innerloop.PluginWarning, match="cannot run without autograd"):
            innerloop.register_update_rule(InferenceModeRaises())
