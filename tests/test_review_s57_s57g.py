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


def test_a_safetensors_write_on_a_full_disk_is_an_os_error_naming_the_file(tmp_path) -> None:
    """safetensors reports a full disk as a ``SafetensorError`` ending ``(os error 28)``, not an ``OSError``:
    a run's checkpoint write on a full disk said 'writing into out_dir=... failed: Error while serializing:
    I/O error: No space left on device (os error 28)', not which file; the file kept is the old one."""
    from safetensors import SafetensorError

    from innerloop.data.atomic import atomic_write

    target = tmp_path / "last.safetensors"
    target.write_bytes(b"old")

    def full(tmp: str) -> None:
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with pytest.raises(OSError, match=r"writing '.*last\.safetensors' failed: .*No space left") as caught:
        atomic_write(target, full)
    assert caught.value.errno == 28
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["last.safetensors"]


def test_a_metrics_csv_append_on_a_full_disk_names_the_file(tmp_path, monkeypatch) -> None:
    """The append of a flush's rows to ``metrics.csv`` on a full disk was '[Errno 28] No space left on
    device', naming no file (the run's line named the out_dir only); the file is cut back as it was."""
    import os

    from innerloop.train.loggers import append_whole

    metrics = tmp_path / "metrics.csv"
    metrics.write_bytes(b"step,train_loss\n0,2.0\n")

    def full(fd: int, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError, match=r"appending to '.*metrics\.csv' failed: No space left") as caught:
        append_whole(metrics, b"1,1.5\n")
    assert caught.value.errno == 28 and metrics.read_bytes() == b"step,train_loss\n0,2.0\n"
