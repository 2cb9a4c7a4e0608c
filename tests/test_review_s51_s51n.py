"""s51n: review of s51b -- which forgetting hook reaches the scan when one is set on an instance or on a
class after it is made, plugin files' folders on ``sys.path``, and the renamed public methods."""

from __future__ import annotations

import pytest
import torch

from innerloop.core.family_layers import GatedDeltaNetLayer
from innerloop.testing.kernel_checks import ForgettingLayer


def _no_decay_gates(x: torch.Tensor) -> tuple[torch.Tensor, None]:
    """``(decay 0 [B, H, T], None)`` for ``x [B, T, D]`` of a 2-head layer, in float64."""
    return torch.zeros(x.shape[0], 2, x.shape[1], dtype=torch.float64), None


class _GatedDeltaNetSubclass(GatedDeltaNetLayer):
    """A subclass that overrides nothing (yet): a test sets its hooks after the class is made."""


@pytest.mark.slow  # two layers built: 0.3-1.7 s on 2 shared cores (the first layer of a process)
def test_a_forgetting_hook_set_on_a_layer_reaches_its_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    """``layer.forgetting = f`` on a layer whose class gives ``log_forgetting`` (Gated DeltaNet) is the
    layer's gate, as it is on a plain TTTLayer: an attribute of the instance is below every class (it
    was ignored: the scan took the class's log gate, silently); ``layer.log_forgetting = g`` on a layer
    whose class overrides ``forgetting`` below its ``log_forgetting`` likewise."""
    torch.manual_seed(0)
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    layer = GatedDeltaNetLayer(8, 2).double()
    assert layer.scan_gates(x)[2] is not None
    with monkeypatch.context() as patch:
        patch.setattr(layer, "forgetting", _no_decay_gates)
        decay, momentum, decay_log = layer.scan_gates(x)
        assert decay_log is None and momentum is None and bool((decay == 0).all())
    assert layer.scan_gates(x)[0] is None and layer.scan_gates(x)[2] is not None
    forgets = ForgettingLayer(8, 2, mini_batch_size=2).double()
    halved = (torch.full((1, 2, 5), -0.5, dtype=torch.float64), None)
    monkeypatch.setattr(forgets, "log_forgetting", lambda x: halved)
    decay, momentum, decay_log = forgets.scan_gates(x)
    assert decay is None and momentum is None and decay_log is halved[0]


def test_a_forgetting_hook_set_on_a_class_after_it_is_made_reaches_the_scan(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``monkeypatch.setattr(Sub, "forgetting", f)`` on a subclass of Gated DeltaNet made before is an
    override below the class that defines ``log_forgetting``: its gates reach the scan (s51b decided the
    rule once, when the class was made, and kept the log gate, silently), and the log again once undone."""
    torch.manual_seed(0)
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    layer = _GatedDeltaNetSubclass(8, 2).double()
    with monkeypatch.context() as patch:
        patch.setattr(_GatedDeltaNetSubclass, "forgetting", lambda self, x: _no_decay_gates(x), raising=False)
        decay, _, decay_log = layer.scan_gates(x)
        assert decay_log is None and bool((decay == 0).all())
    decay, _, decay_log = layer.scan_gates(x)
    assert decay is None and decay_log is not None
