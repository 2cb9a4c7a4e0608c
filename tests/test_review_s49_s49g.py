"""Review s49g: the house and the docs walked by a newcomer.

- The kernels' first-use probe (``innerloop/kernels/first_use.py``) ran inside the caller's
  ``TorchDispatchMode``s: a ``FlopCounterMode`` around a layer's first call counted the probe's two
  extra runs of the block (the torch path and the kernel) as the user's work (5.57 MFLOP on the first
  call of a TTT-Linear layer at width 64, 4.26 MFLOP on every later one). The probe now runs outside the
  caller's dispatch modes, where its inputs are plain tensors.
- ``TTTLayer(inner_loss=MyLoss)`` (the class, not an instance) said "expected ... an InnerLoss instance,
  got ABCMeta", naming the metaclass; it now names the class and the fix (``MyLoss()``), as
  ``innerloop.testing``'s checks do.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from innerloop import InnerLoss, LossPairs, TTTLayer
from innerloop.kernels import first_use
from innerloop.plugins.models.linear import LinearModel
from innerloop.plugins.optimizers.dual_form import DualForm


def _flops(layer: TTTLayer, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        layer(x)
    return counter.get_total_flops()


@pytest.mark.slow  # ~1 s: FlopCounterMode around two layer calls, the first one probing the kernel
def test_a_users_flop_count_does_not_include_the_first_use_probe(monkeypatch) -> None:
    monkeypatch.setenv("INNERLOOP_DISABLE_CPU_KERNELS", "1")  # auto picks the fused torch path, built in
    saved = first_use.saved_verdicts()
    first_use.forget_verdicts()  # the kernel is probed on this layer's first call
    try:
        torch.manual_seed(0)
        layer = TTTLayer(16, 2, mini_batch_size=4)
        x = torch.randn(1, 12, 16)
        first = _flops(layer, x)
        assert "verified" in str(layer.dispatches), layer.dispatches  # the first call did probe
        assert first == _flops(layer, x)  # no probe on the second call: the same count
    finally:
        first_use.restore_verdicts(saved)


# -- a plugin class passed to TTTLayer where an instance belongs ---------------------------------------------


class _L1(InnerLoss):
    """L1 reconstruction: a newcomer's loss."""

    name = "s49g_l1"

    def pairs(self, views, carry):
        return LossPairs(views.key, views.value)

    def token_loss(self, prediction, target):
        return (prediction - target).abs().sum(-1)


@pytest.mark.parametrize(
    ("option", "given", "base"),
    [
        ("inner_loss", _L1, "InnerLoss"),
        ("inner_model", LinearModel, "InnerModel"),
        ("update_rule", DualForm, "UpdateRule"),
    ],
)
def test_a_plugin_class_given_for_an_instance_is_named_with_the_fix(option, given, base) -> None:
    # it said "expected ... an InnerLoss instance, got ABCMeta" (the class's metaclass), where
    # innerloop.testing's checks say "got the class L1"
    with pytest.raises(TypeError) as raised:
        TTTLayer(16, 2, **{option: given})
    message = str(raised.value)
    assert f"got the class {given.__name__}" in message and f"{given.__name__}()" in message, message
    assert option in message and base in message and "ABCMeta" not in message, message
    with pytest.raises(TypeError, match=r"inner_loss: .* got int"):  # anything else: its type, as before
        TTTLayer(16, 2, inner_loss=3)
