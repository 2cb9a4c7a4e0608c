"""s51b: one hook for a layer's forgetting gate as a log (``TTTLayer.log_forgetting``), plugin files' module
paths (``-p dir/x.py``), and private calls across modules."""

from __future__ import annotations

import pytest
import torch

from innerloop.core.family_layers import GatedDeltaNetLayer, TitansLayer
from innerloop.core.layer import TTTLayer
from innerloop.testing.kernel_checks import ForgettingLayer, LogForgettingLayer


class _GatedDeltaNetHalfLog(GatedDeltaNetLayer):
    """Overrides only the log hook: its gate reaches the scan, and ``forgetting`` follows it."""

    def log_forgetting(self, x: torch.Tensor) -> tuple[torch.Tensor, None] | None:
        gates = super().log_forgetting(x)
        return None if gates is None else (0.5 * gates[0], None)


class _TitansNoDecay(TitansLayer):
    """Overrides ``forgetting`` below Titans' ``log_forgetting``: its gates reach the scan."""

    def forgetting(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        decay, momentum = super().forgetting(x)
        return torch.zeros_like(decay), momentum


class _TitansNoDecayThenLog(_TitansNoDecay):
    """Gives ``log_forgetting`` again below that override: the log reaches the scan again."""

    def log_forgetting(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        gates = super().log_forgetting(x)
        return None if gates is None else (torch.zeros_like(gates[0]), gates[1])


@pytest.mark.slow  # three layers built and run: 0.45 s on 2 shared cores
def test_the_lower_of_forgetting_and_log_forgetting_reaches_the_scan() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    halved = _GatedDeltaNetHalfLog(8, 2).double()
    decay, momentum, decay_log = halved._scan_gates(x)
    assert decay is None and momentum is None
    torch.testing.assert_close(decay_log, 0.5 * halved.log_decay_factor(x), rtol=0, atol=0)
    torch.testing.assert_close(halved.forgetting(x)[0], -torch.expm1(decay_log), rtol=0, atol=1e-15)
    no_decay = _TitansNoDecay(8, 2, mini_batch_size=2).double()
    decay, momentum, decay_log = no_decay._scan_gates(x)
    assert decay_log is None and bool((decay == 0).all()) and momentum is not None
    again = _TitansNoDecayThenLog(8, 2, mini_batch_size=2).double()
    decay, momentum, decay_log = again._scan_gates(x)
    assert decay is None and bool((decay_log == 0).all()) and momentum is not None
    assert [cls._scan_takes_log_forgetting for cls in (TTTLayer, ForgettingLayer, LogForgettingLayer)] == [
        True,
        False,
        True,
    ]


@pytest.mark.slow  # two layers, three calls: 0.35 s on 2 shared cores
def test_a_third_party_log_gate_equals_its_decay_through_the_layer() -> None:
    """A FamilyLayer subclass giving its gate by ``log_forgetting`` (``innerloop.testing``'s
    LogForgettingLayer) computes the layer its twin giving ``decay = sigmoid(z)`` by ``forgetting``
    computes (float64, cut into calls inside a mini-batch too)."""
    torch.manual_seed(0)
    plain = ForgettingLayer(8, 2, mini_batch_size=3).double()
    logged = LogForgettingLayer(8, 2, mini_batch_size=3).double()
    logged.load_state_dict(plain.state_dict())
    x = torch.randn(2, 8, 8, dtype=torch.float64)
    assert logged._scan_gates(x)[0] is None and plain._scan_gates(x)[2] is None
    torch.testing.assert_close(
        logged.forgetting(x)[0], torch.sigmoid(plain._head_gate(x, plain.decay_proj)), rtol=1e-14, atol=0
    )
    whole, _ = plain(x)
    first, middle = logged(x[:, :4])
    second, _ = logged(x[:, 4:], middle)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, rtol=1e-10, atol=1e-12)
