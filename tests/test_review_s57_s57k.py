"""Review s57k: adversarial review of session 57's merged changes (see the report)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from test_review_s57_s57c import IgnoresBias
from trainer_testing import user_fit

from innerloop.registry import PluginError
from innerloop.train import TrainingDivergedError


def test_an_unread_weight_is_refused_for_its_true_reason():
    """s57c's refusal of a model that never reads a declared weight said 'the inner loop differentiates
    w.r.t. every declared weight', which is false: every update rule runs such a model (the layer trained,
    measured). What it costs is a layer parameter (the weight's initial value) that never gets a gradient,
    which DDP refuses at its second step (measured, gloo). Seen failing with the old message."""
    from innerloop.registry.kinds import smoke_test

    with pytest.raises(
        PluginError, match=r"\['b'\].*a layer trains each declared weight's initial value.*DDP"
    ):
        smoke_test("inner_model", IgnoresBias())


class _NanGradientEveryStep(L.Callback):
    """A NaN in one gradient element after every backward: a plugin's backward that is NaN at every step
    (a sqrt at 0), whatever the loss scale."""

    def __init__(self) -> None:
        self.module: L.LightningModule | None = None
        self.initial: list[torch.Tensor] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.module, self.initial = pl_module, [p.detach().clone() for p in pl_module.parameters()]

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        next(pl_module.parameters()).grad.view(-1)[0] = float("nan")


@pytest.mark.slow  # a float16 loss-scaled fit of the small model, 3 steps (~3 s, Lightning's start)
def test_gradients_non_finite_at_every_loss_scale_stop_a_float16_run(tmp_path) -> None:
    """s57g's check of a NaN gradient from a finite loss left out a run with a loss scaler (16-mixed),
    whose scaler skips such a step and halves its scale. A backward that is NaN at every scale (a
    plugin's) had every step skipped: the run 'trained' to its end, its weights as initialised, its
    losses finite, nothing said. Seen failing without the fix (the fit of 40 steps ended, no weight
    changed); now it stops when the scale has fallen below 1 (17 halvings of 65536; from 2 here)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    scaled = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0))
    callback = _NanGradientEveryStep()
    options = {"max_steps": 40, "precision": None, "plugins": [scaled]}
    with pytest.raises(
        TrainingDivergedError,
        match=r"optimizer step 3 hold nan .*at every loss scale down to 0\.5 \(16-mixed's scaler skipped",
    ):
        user_fit(tmp_path, 40, options, callbacks=[callback])
    assert all(torch.equal(p, q) for p, q in zip(callback.module.parameters(), callback.initial, strict=True))


@pytest.mark.slow  # a float16 loss-scaled fit of the small model, 4 steps (~3 s, Lightning's start)
def test_a_float16_run_whose_scaler_skips_one_step_goes_on(tmp_path) -> None:
    """The other side: a step whose gradients are not finite at the scaler's scale (65536) is skipped as
    before, the scale halved, and the run goes on (the weights change after)."""
    from lightning.pytorch.plugins.precision import MixedPrecision
    from test_review_s57_s57g import _NanGradientAt

    scaler = torch.amp.GradScaler("cpu")
    options = {
        "max_steps": 4,
        "precision": None,
        "plugins": [MixedPrecision("16-mixed", "cpu", scaler=scaler)],
    }
    module, _ = user_fit(tmp_path, 4, options, callbacks=[_NanGradientAt(step=1)])
    assert scaler.get_scale() == 2.0**15  # one step skipped
