"""A second Ctrl-C while a checkpoint is being written names the last step completed (the step whose
checkpoint was being written), not the next one, which never started, and says that the checkpoint of
that step was being written (review s11, resume L4)."""

from __future__ import annotations

import os
import signal

import lightning as L
import pytest
from lm_testing import TINY

from innerloop.config import load_config
from innerloop.train import TrainingInterrupted, load_checkpoint, train


class _CtrlCTwiceWhileSaving(L.Callback):
    """Presses Ctrl-C twice while the checkpoint of optimizer step ``step`` is being made."""

    def __init__(self, step: int):
        self.step = step

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)  # the first asks for a stop after this step
            os.kill(os.getpid(), signal.SIGINT)  # the second stops at once, inside the write


@pytest.mark.slow  # reason: a 4-step training run (~3 s)
def test_a_second_ctrl_c_during_a_checkpoint_write_names_the_step_completed(tmp_path) -> None:
    overrides = [*TINY, "trainer.max_steps=8", "trainer.checkpoint_every=2", f"out_dir={tmp_path}"]
    run, cfg = load_config("tiny", overrides)
    with pytest.raises(TrainingInterrupted) as stopped:
        train(run, cfg, callbacks=[_CtrlCTwiceWhileSaving(step=4)])
    message = str(stopped.value)
    assert message.startswith(
        "stopped at once at a second Ctrl-C, after 4 of 8 steps, while writing the checkpoint of step 4; "
    ), message
    assert "step 5" not in message
    assert "(after 2 steps), is kept" in message  # the step-4 checkpoint was never written
    assert load_checkpoint(tmp_path / "last.safetensors")["global_step"] == 2
    assert stopped.value.exit_code == 130
