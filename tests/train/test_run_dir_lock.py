"""The lock a run holds on its out_dir holds even when its lock file is deleted or replaced: users
delete "stale" lock files, and ``.innerloop.lock`` stays in every finished run's folder.

(``flock`` locks of two opens of the same file conflict within one process too, so a live run is
stood in for by :func:`lock_run_dir` held in this process.)"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from innerloop.cli import main
from innerloop.config import load_config
from innerloop.config.load import save_config
from innerloop.train.run_dir import RunDirError, lock_run_dir

TINY = ["model.hidden_size=16", "model.num_heads=2", "trainer.max_steps=1"]
LOCK_TABLE = Path("/proc/locks")  # where a holder whose lock file is gone is found (Linux)


def _refused_naming(pid: object) -> str:
    return rf"is in use by another run \(pid {re.escape(str(pid))}, lock "


def test_a_deleted_lock_file_does_not_let_a_second_run_in(tmp_path) -> None:
    out = tmp_path / "run"
    with lock_run_dir(out) as lock:
        lock.unlink()  # "a stale lock file"
        holder = os.getpid() if LOCK_TABLE.is_file() else "unknown"
        with pytest.raises(RunDirError, match=_refused_naming(holder)):
            with lock_run_dir(out):
                pass
        assert not lock.exists()  # the refused run made no lock file of its own
    with lock_run_dir(out):  # the first run ended: the out_dir is free again
        pass


def test_a_replaced_lock_file_does_not_let_a_second_run_in(tmp_path) -> None:
    out = tmp_path / "run"
    with lock_run_dir(out) as lock:
        lock.unlink()
        lock.write_text("4242\n")  # another file where the lock was, e.g. restored from a backup
        with pytest.raises(RunDirError, match=_refused_naming(4242)):
            with lock_run_dir(out):
                pass
        assert lock.read_text() == "4242\n"  # the refused run wrote nothing into it


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the holder's pid comes from /proc/locks")
def test_innerloop_train_into_a_live_run_whose_lock_file_was_deleted_is_refused(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    with lock_run_dir(out) as lock:
        save_config(load_config("tiny", [*TINY, f"out_dir={out}"])[1], out / "config.yaml")
        config = (out / "config.yaml").read_bytes()
        lock.unlink()
        for launch in (["--config", "tiny"], ["--resume"], ["--config", "tiny", "--overwrite"]):
            assert main(["train", *launch, *TINY, f"out_dir={out}"]) == 2
            assert re.search(_refused_naming(os.getpid()), capsys.readouterr().err)
        assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]
        assert (out / "config.yaml").read_bytes() == config


def test_the_lock_of_a_folder_this_run_made_and_left_empty_goes_with_it(tmp_path) -> None:
    out = tmp_path / "new" / "run"
    with lock_run_dir(out) as lock:
        assert lock.is_file() and lock.read_text() == f"{os.getpid()}\n"
    assert not out.exists()
