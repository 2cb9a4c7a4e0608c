"""Review s54c: kernels matched by plugin settings, numpy settings, gate probes, interrupts in metrics."""

from __future__ import annotations

import pytest
import torch

from innerloop.train.metrics import Float64States


class _InterruptedSum(Float64States):
    """A metric whose update writes one state, then is interrupted before the other."""

    full_state_update = True

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.interrupt = False

    def update(self, values: torch.Tensor) -> None:
        self.total += values.sum()
        if self.interrupt:
            raise KeyboardInterrupt
        self.count += values.numel()

    def compute(self) -> torch.Tensor:
        return self.total / self.count


class _InterruptedSumReduced(_InterruptedSum):
    full_state_update = False


@pytest.mark.parametrize("metric_class", [_InterruptedSum, _InterruptedSumReduced])
def test_metric_forward_interrupted_keeps_earlier_sums(metric_class: type[_InterruptedSum]) -> None:
    """A KeyboardInterrupt inside update (a BaseException, not an Exception) leaves the metric as it was
    before the batch: torchmetrics' forward resets it first, so without restoring every earlier batch's
    sums were lost (``full_state_update=False``), and the accumulated total, updated in place first under
    ``full_state_update=True``, kept the batch's half write."""
    metric = metric_class()
    metric(torch.tensor([1.0, 2.0]))
    metric.interrupt = True
    with pytest.raises(KeyboardInterrupt):
        metric(torch.tensor([100.0]))
    assert (metric.total.item(), metric.count.item()) == (3.0, 2.0)
    metric.interrupt = False
    metric(torch.tensor([3.0]))
    assert metric.compute().item() == pytest.approx(2.0)
