"""Review s52n: a user's stateful callbacks (ModelCheckpoint, EarlyStopping) across --resume, and stops."""

from __future__ import annotations

import pytest


@pytest.mark.slow  # a 4-step training run of the tiny model (~1.5 s)
def test_the_checkpoint_of_a_validated_step_holds_the_user_callbacks_states_after_that_validation(
    tmp_path,
) -> None:
    """The checkpoint of step 4 (validated: val_every=2) is written at the step's batch end, before its
    validation; a user's EarlyStopping and ModelCheckpoint update their best at the validation's end. The
    checkpoint held their states from step 2's validation (EarlyStopping's best_score a step behind, so a
    resumed run counts its patience from another best), and now holds those the callbacks end the step
    with; the weights and the loop counters (what a bitwise resume needs) are those of the batch end."""
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from lm_testing import TINY

    from innerloop.checkpoints import load_checkpoint
    from innerloop.config import load_config
    from innerloop.train import train

    out = tmp_path / "run"
    run, cfg = load_config("tiny", [*TINY, "trainer.max_steps=4", "trainer.val_every=2", f"out_dir={out}"])
    stopping = EarlyStopping(monitor="val_loss", patience=5)
    best = ModelCheckpoint(dirpath=tmp_path / "best", monitor="val_loss", save_top_k=1)
    train(run, cfg, callbacks=[stopping, best])
    checkpoint = load_checkpoint(out / "last.safetensors")
    states = checkpoint["callbacks"]
    assert checkpoint["global_step"] == 4
    assert float(states[stopping.state_key]["best_score"]) == float(stopping.best_score)
    assert states[stopping.state_key]["wait_count"] == stopping.wait_count
    assert states[best.state_key]["best_model_path"] == best.best_model_path
    assert best.best_model_path.endswith("step=4.ckpt")  # the test can tell: step 2's was the best before
    progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]
    assert progress["completed"] == progress["processed"] - 1  # written at the batch end, as before
