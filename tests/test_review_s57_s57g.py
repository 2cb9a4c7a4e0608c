"""Review s57g: training runs interrupted, resumed, on bad data and bad settings."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from trainer_testing import user_fit

from innerloop.train import TrainingDivergedError


class _NanGradientAt(L.Callback):
    """Puts a NaN into one gradient element after the backward of optimizer step ``step`` (0-based): a
    finite loss whose backward is not (a plugin's sqrt at 0, an overflow in the backward)."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.module: L.LightningModule | None = None

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.module = pl_module
        if trainer.global_step == self.step:
            next(pl_module.parameters()).grad.view(-1)[0] = float("nan")


@pytest.mark.slow  # a float64 fit of the small model, 3 steps (~1 s)
@pytest.mark.parametrize("clip", [None, 1.0])
def test_a_nan_gradient_from_a_finite_loss_stops_before_the_step_names_it_and_keeps_the_weights_finite(
    tmp_path, clip
) -> None:
    callback = _NanGradientAt(step=2)
    with pytest.raises(TrainingDivergedError, match=r"the gradients of optimizer step 3 hold nan .*finite"):
        user_fit(tmp_path, 5, {"max_steps": 5, "gradient_clip_val": clip}, callbacks=[callback])
    assert all(bool(torch.isfinite(p).all()) for p in callback.module.parameters())  # not applied
