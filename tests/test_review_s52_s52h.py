"""Review s52h: interrupts and resumes of training runs, and settings nobody tried."""

from __future__ import annotations

import lightning as L
import pytest
from trainer_testing import user_fit

from innerloop.train.interrupt import optimizer_step_ends_here


class _StepsSeen(L.Callback):
    """Per training batch: whether ``optimizer_step_ends_here`` said the batch ends a step, and whether
    the optimizer did step on it (``on_before_optimizer_step`` ran during the batch)."""

    def __init__(self) -> None:
        self.said: list[bool] = []
        self.stepped: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.stepped.append(False)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.stepped[-1] = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.said.append(optimizer_step_ends_here(trainer, batch_idx))


@pytest.mark.slow  # a float64 fit of 3 small steps over a 4-batch epoch and a half (~1 s)
def test_optimizer_step_ends_here_says_where_lightning_steps(tmp_path) -> None:
    """The behaviour the stop logic relies on (a Ctrl-C, SIGTERM, max_time or a callback's stop waits for
    it), checked against the optimizer itself, not against Lightning's private loop method it read: 4
    batches an epoch under accumulate_grad_batches=3 step after batches 3 and 4 (the epoch's last)."""
    seen = _StepsSeen()
    user_fit(
        tmp_path, 3, dict(max_steps=3, limit_train_batches=4, accumulate_grad_batches=3), callbacks=[seen]
    )
    assert seen.stepped == [False, False, True, True, False, False, True]  # 4 batches an epoch
    assert seen.said == seen.stepped
