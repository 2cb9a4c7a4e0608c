"""Review s35c: no lost work, and one clear line before any long work (issue 9, issue 3's training)."""

from __future__ import annotations

import importlib
import os
import shutil
import stat
from collections import namedtuple

import pytest
from lm_testing import TINY

from innerloop.config import load_config
from innerloop.data.atomic import atomic_write_text
from innerloop.train import train
from innerloop.train.run_dir import RunDirError

run_module = importlib.import_module("innerloop.train.run")  # `innerloop.train.run` the attribute is not it

_Usage = namedtuple("_Usage", "total used free")


@pytest.mark.slow  # builds the run's LanguageModelModule from a preset: ~0.3 s
def test_a_disk_without_room_for_one_checkpoint_is_refused_before_training(tmp_path, monkeypatch) -> None:
    """A full disk was found at the first checkpoint, after trainer.checkpoint_every steps of work
    (safetensors' 'No space left on device'); now one line before the Trainer is built or a step is taken,
    and nothing is left in out_dir but what was there."""
    (tmp_path / "corpus.txt").write_text("abcdefgh " * 400)
    out = tmp_path / "run"
    run, cfg = load_config("tiny", [*TINY, f"data.paths=[{tmp_path / 'corpus.txt'}]", f"out_dir={out}"])
    monkeypatch.setattr(shutil, "disk_usage", lambda path: _Usage(10**9, 10**9 - 4096, 4096))
    monkeypatch.setattr(run_module, "build_trainer", lambda *a, **k: pytest.fail("built a Trainer"))
    refused = (
        r"out_dir='.*run' has 4,096 bytes free, and a checkpoint of this model needs at least [\d,]+; free"
    )
    with pytest.raises(RunDirError, match=refused):
        train(run, cfg)
    assert not (out / "config.yaml").exists() and not (out / "last.safetensors").exists()


def test_an_atomic_write_syncs_its_folder_after_the_rename(tmp_path, monkeypatch) -> None:
    """The file was fsync-ed before the rename, the folder never after it: a power cut could lose the
    rename (a resumed run then finds the previous checkpoint, not the one its log says it wrote)."""
    synced: list[bool] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    atomic_write_text(tmp_path / "config.yaml", "a: 1\n")
    assert synced == [False, True]  # the temporary file, then the folder holding its new name
