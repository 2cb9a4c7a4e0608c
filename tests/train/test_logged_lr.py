"""Each training row of the logs carries ``lr``, the learning rate its optimizer step applied, and
``grad_norm``, the norm of the gradients it applied before clipping (issue 3's training ergonomics: a
user reads the schedule and whether clipping bites off metrics.csv / TensorBoard)."""

from __future__ import annotations

import csv
import math

import lightning as L
import pytest
from lm_testing import TINY

from innerloop.config import load_config
from innerloop.train import train


class _AppliedRates(L.Callback):
    """The rate of every optimizer step, read where the step is taken."""

    def __init__(self) -> None:
        self.rates: dict[int, float] = {}
        self.norms: dict[int, float] = {}
        self.schedule = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.rates[trainer.global_step] = optimizer.param_groups[0]["lr"]
        grads = [p.grad.double() for p in pl_module.parameters() if p.grad is not None]
        self.norms[trainer.global_step] = math.sqrt(sum(float((g * g).sum()) for g in grads))
        self.schedule = pl_module._schedule()


@pytest.mark.slow  # reason: one tiny training run of 8 steps (~1 s)
@pytest.mark.parametrize("accumulate", [1, 2])
def test_each_training_row_logs_the_rate_its_step_applied(tmp_path, accumulate) -> None:
    applied = _AppliedRates()
    overrides = ["trainer.max_steps=8", "trainer.log_every=1", "optim.warmup_fraction=0.25"]
    overrides += [f"trainer.accumulate_grad_batches={accumulate}", f"out_dir={tmp_path}"]
    run, cfg = load_config("tiny", [*TINY, *overrides])
    train(run, cfg, callbacks=[applied])
    with open(tmp_path / "logs" / "version_0" / "metrics.csv", newline="", encoding="utf-8") as file:
        rows = [r for r in csv.DictReader(file) if r.get("lr")]
    logged = {int(r["step"]): float(r["lr"]) for r in rows}
    norms = {int(r["step"]): float(r["grad_norm"]) for r in rows}
    assert sorted(norms) == sorted(applied.norms)
    for step, norm in norms.items():  # before clipping: the tiny run's first steps exceed grad_clip=1
        assert math.isclose(norm, applied.norms[step], rel_tol=1e-6)
    assert max(norms.values()) > 1.0
    assert sorted(logged) == list(range(8)) == sorted(applied.rates)
    for step, rate in logged.items():  # float32 in the log
        assert math.isclose(rate, applied.rates[step], rel_tol=1e-6)
        assert math.isclose(rate, applied.schedule(step), rel_tol=1e-6)
    assert logged[0] < logged[1] and logged[7] < logged[4] < logged[1]  # warm-up (2 steps), then cosine decay
