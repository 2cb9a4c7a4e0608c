"""Review s30e: an adversarial last look at the day's changes (f0fcc64..main).

- ``HFDataModule`` refused a checkpoint under a Trainer's epochs of ``n`` batches (``limit_train_batches``,
  ``overfit_batches``) only where its batch was no longer recorded (in a later epoch): one written in the
  first epoch (or at its end, or under ``limit_train_batches=1``, which ``limit not in (None, 1.0)`` took
  for "no limit") was accepted, and its resume read on along the endless stream where the uninterrupted
  run read batches 0 .. n-1 again (batches [353, 346, 353, 346, 257] for [353, 346, 395, 353, 346],
  weights 3e-3 apart). docs/training.md promises such a checkpoint is refused.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from innerloop.train.data import DataError, HFDataModule


@pytest.mark.parametrize("limit", [3, 1])
def test_an_hf_checkpoint_in_the_first_of_a_trainer_s_epochs_is_refused(tmp_path, limit) -> None:
    data = HFDataModule(paths=[str(tmp_path / "unread.jsonl")], seq_len=16, batch_size=2, val_batches=1)
    data.trainer = SimpleNamespace(
        num_training_batches=limit, limit_train_batches=limit, global_step=0, accumulate_grad_batches=1,
        world_size=1,
    )  # fmt: skip
    with pytest.raises(DataError, match=rf"limit_train_batches={limit} .*max_steps"):
        data.state_dict()


def test_an_hf_checkpoint_in_an_endless_epoch_records_its_position(tmp_path) -> None:
    data = HFDataModule(paths=[str(tmp_path / "unread.jsonl")], seq_len=16, batch_size=2, val_batches=1)
    data.trainer = SimpleNamespace(
        num_training_batches=float("inf"), limit_train_batches=1.0, global_step=0, accumulate_grad_batches=1,
        world_size=1,
    )  # fmt: skip
    assert data.state_dict() == {"batch": 0, "position": [0, 0, 0]}
