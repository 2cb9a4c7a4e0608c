"""A full disk (or quota) is one clear error that names what is kept, never a traceback or a folder left
holding only a lock: the write fails, the last checkpoint stays whole, and the run can be resumed."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from lm_testing import TINY  # the tiny run of the end-to-end tests
from safetensors import SafetensorError

import innerloop.checkpoints as checkpoints
from innerloop.config import load_config
from innerloop.train import load_checkpoint, train
from innerloop.train.run import out_of_space
from innerloop.train.run_dir import LOCK_NAME, RunDirError, lock_run_dir

NO_SPACE = "Error while serializing: I/O error: No space left on device (os error 28)"


def test_what_counts_as_a_full_disk():
    assert out_of_space(OSError(errno.ENOSPC, "No space left on device"))
    assert out_of_space(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert out_of_space(SafetensorError(NO_SPACE))
    assert not out_of_space(OSError(errno.EACCES, "Permission denied"))
    assert not out_of_space(SafetensorError("Error while serializing: some other failure"))
    assert not out_of_space(ValueError(NO_SPACE))


def test_a_lock_that_cannot_be_written_leaves_no_folder(tmp_path, monkeypatch):
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    out = tmp_path / "new" / "run"
    with pytest.raises(
        RunDirError, match=rf"writing its lock .*{LOCK_NAME}.* failed: No space left on device"
    ):
        with lock_run_dir(out):
            pass
    assert not out.exists()  # made by this call, removed with its lock


@pytest.mark.slow  # ~1 s: a short training run
def test_a_checkpoint_write_on_a_full_disk_is_one_error_and_the_last_checkpoint_is_kept(
    tmp_path, monkeypatch
):
    out: Path = tmp_path / "run"
    run, cfg = load_config(
        "tiny", [*TINY, f"out_dir={out}", "trainer.max_steps=6", "trainer.checkpoint_every=2"]
    )
    real_save, writes = checkpoints.save_file, []

    def fills_the_disk(*args, **kwargs):
        writes.append(1)
        if len(writes) > 1:  # the first checkpoint fits, the second does not
            raise SafetensorError(NO_SPACE)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(checkpoints, "save_file", fills_the_disk)
    with pytest.raises(RunDirError) as raised:
        train(run, cfg)
    message = str(raised.value)
    assert "No space left on device" in message and "\n" not in message
    assert "(after 2 steps), is kept: continue it with `train(*load_config(" in message  # from Python (s51a)
    assert load_checkpoint(out / "last.safetensors")["global_step"] == 2
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]  # no partial file left
