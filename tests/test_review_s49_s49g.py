"""Review s49g: the house and the docs walked by a newcomer.

- The kernels' first-use probe (``innerloop/kernels/first_use.py``) ran inside the caller's
  ``TorchDispatchMode``s: a ``FlopCounterMode`` around a layer's first call counted the probe's two
  extra runs of the block (the torch path and the kernel) as the user's work (5.57 MFLOP on the first
  call of a TTT-Linear layer at width 64, 4.26 MFLOP on every later one). The probe now runs outside the
  caller's dispatch modes, where its inputs are plain tensors.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from innerloop import TTTLayer
from innerloop.kernels import first_use


def _flops(layer: TTTLayer, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        layer(x)
    return counter.get_total_flops()


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
