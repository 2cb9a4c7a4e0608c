"""Review s52s: the rewrite of a pending checkpoint with the user callbacks' states (s52n, s52h)."""

from __future__ import annotations

import pytest


class _BatchesStarted:
    """A user callback counting the batches it has started (a curriculum keyed on batches would): its
    state in the checkpoint of a step is the count at that step's end. It raises KeyboardInterrupt at the
    batch end of step ``interrupt_at`` (a Ctrl-C), so the run keeps the checkpoint of the step before."""

    def __new__(cls, interrupt_at: int):
        import lightning as L

        def on_train_batch_start(self, trainer, *args) -> None:
            self.started += 1

        def on_train_batch_end(self, trainer, *args) -> None:
            if trainer.global_step == interrupt_at:
                raise KeyboardInterrupt

        hooks = {
            "started": 0,
            "on_train_batch_start": on_train_batch_start,
            "on_train_batch_end": on_train_batch_end,
            "state_dict": lambda self: {"started": self.started},
            "load_state_dict": lambda self, state: setattr(self, "started", state["started"]),
        }
        return type("BatchesStarted", (L.Callback,), hooks)()


@pytest.mark.slow  # a 3-step training run of the tiny model (~1.5 s)
def test_the_rewritten_checkpoint_holds_a_user_callbacks_state_of_its_step_not_of_the_next_batch(
    tmp_path,
) -> None:
    """The pending checkpoint of step 2 was rewritten at the next batch's start with the states the user
    callbacks had then: after their own ``on_train_batch_start`` of step 3's batch (Lightning calls the
    checkpoint callbacks last). A callback counting started batches was saved with 3 for step 2; a resume
    counts step 3's batch again (4 where the uninterrupted run has 3). The checkpoint of step 2 holds 2."""
    from lm_testing import TINY

    from innerloop.checkpoints import load_training_checkpoint
    from innerloop.config import load_config
    from innerloop.train import train

    out = tmp_path / "run"
    settings = [*TINY, "trainer.max_steps=4", "trainer.val_every=4", "trainer.checkpoint_every=2"]
    run, cfg = load_config("tiny", [*settings, f"out_dir={out}"])
    counter = _BatchesStarted(interrupt_at=3)
    with pytest.raises(RuntimeError, match="KeyboardInterrupt"):
        train(run, cfg, callbacks=[counter])
    checkpoint = load_training_checkpoint(out / "last.safetensors")
    assert checkpoint["global_step"] == 2
    assert checkpoint["callbacks"][counter.state_key] == {"started": 2}
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp") or p.name.endswith(".pending")]
