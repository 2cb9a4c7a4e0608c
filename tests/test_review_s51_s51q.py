"""Review s51q: a launch removes or puts back only the files that an innerloop ``--overwrite`` set aside."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from innerloop.train import run_dir

PREVIOUS = {
    "config.yaml": "seed: 0\n",
    run_dir.CHECKPOINT_FILE: "the previous run's weights",
    "loss_by_position.csv": "position,loss\n0,1.0\n",
    run_dir.PENDING_CHECKPOINT: "the previous run's later step",
}
USERS = {".replaced.notes.txt": "mine", ".replaced.loss_by_position.png.bak": "mine too"}


def _files(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in folder.iterdir() if p.is_file()}


def _write(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (folder / name).write_text(text)


def test_a_users_file_named_like_a_set_aside_one_is_not_deleted_by_a_launch(tmp_path) -> None:
    """A finished run and the user's own ``.replaced.loss_by_position.csv`` beside it: every launch
    (its settle of a killed ``--overwrite``) took the file for one that ``--overwrite`` had set aside and,
    the run having a checkpoint, deleted it."""
    _write(tmp_path, {"config.yaml": "seed: 0\n", run_dir.CHECKPOINT_FILE: "weights"})
    (tmp_path / ".replaced.loss_by_position.csv").write_text("the user's own table")
    before = _files(tmp_path)
    assert run_dir.settle_previous_run(tmp_path) == []
    assert run_dir.settle_interrupted_overwrite(tmp_path) == []
    assert _files(tmp_path) == before


def test_a_users_replaced_config_in_an_empty_folder_is_not_renamed(tmp_path) -> None:
    """An out_dir holding only the user's ``.replaced.config.yaml`` (and ``.replaced.incomplete``): a
    launch renamed it to ``config.yaml`` (the previous run "put back"), and removed the marker."""
    _write(tmp_path, {".replaced.config.yaml": "the user's", run_dir.SETTING_ASIDE: "the user's too"})
    before = _files(tmp_path)
    assert run_dir.settle_previous_run(tmp_path) == []
    assert run_dir.set_aside_previous_run(tmp_path) == []  # nothing to set aside: the marker stays
    assert _files(tmp_path) == before


@pytest.mark.parametrize("blocker", [".replaced.config.yaml", ".replaced.last.safetensors"])
def test_an_overwrite_refuses_to_set_aside_onto_a_users_file(tmp_path, blocker) -> None:
    """``--overwrite`` renamed the previous run's file onto the user's ``.replaced.<name>``, which was
    lost; it is refused, naming the file, and nothing is renamed."""
    _write(tmp_path, {**PREVIOUS, blocker: "the user's"})
    before = _files(tmp_path)
    with pytest.raises(
        run_dir.RunDirError, match=rf"holds {blocker}, which no .replaced.record names.*not written over"
    ):
        run_dir.set_aside_previous_run(tmp_path)
    assert _files(tmp_path) == before


def test_set_aside_files_an_older_innerloop_left_without_a_record_are_left_alone(tmp_path, caplog) -> None:
    """No record, no way to tell an older innerloop's set-aside files from the user's: they are left as
    they are, and each launch says so, naming them and how to put them back."""
    _write(tmp_path, {"config.yaml": "seed: 1\n", ".replaced.config.yaml": "seed: 0\n"})
    before = _files(tmp_path)
    with caplog.at_level(logging.WARNING, logger=run_dir.log.name):
        assert run_dir.settle_previous_run(tmp_path) == []
    assert _files(tmp_path) == before
    assert ".replaced.config.yaml" in caplog.text and "left as" in caplog.text


def test_an_overwrite_settles_only_what_it_recorded(tmp_path) -> None:
    """The record names exactly the files set aside; the user's other ``.replaced.*`` files stay."""
    _write(tmp_path, {**PREVIOUS, **USERS})
    assert run_dir.set_aside_previous_run(tmp_path) == list(PREVIOUS)
    _write(tmp_path, {"config.yaml": "seed: 1\n"})  # the new run, ended without a checkpoint
    assert run_dir.settle_previous_run(tmp_path) == list(PREVIOUS)
    assert _files(tmp_path) == {**PREVIOUS, **USERS}


def _counting_kills(monkeypatch, kill_at: int) -> list[int]:
    """Make the ``kill_at``-th ``os.replace`` / ``os.unlink`` (Path.unlink too) raise KeyboardInterrupt
    before it acts: a stand-in for a kill there. Returns the counter (its one item: calls so far)."""
    count = [0]
    for name in ("replace", "unlink"):
        real = getattr(os, name)

        def killing(*args, _real=real, **kwargs):
            count[0] += 1
            if count[0] == kill_at:
                raise KeyboardInterrupt
            return _real(*args, **kwargs)

        monkeypatch.setattr(os, name, killing)
    return count


def _launch(folder: Path, new_run_checkpoints: bool) -> None:
    """An ``--overwrite`` launch: set aside, the new run writes, settle at its end."""
    run_dir.set_aside_previous_run(folder)
    _write(folder, {"config.yaml": "seed: 1\n"})
    if new_run_checkpoints:
        _write(folder, {run_dir.CHECKPOINT_FILE: "the new run's weights"})
    else:
        _write(folder, {run_dir.PENDING_CHECKPOINT: "the new run's unconfirmed step"})
    run_dir.settle_previous_run(folder)


@pytest.mark.parametrize("new_run_checkpoints", [False, True])
def test_an_overwrite_killed_at_any_rename_or_removal_loses_or_mixes_up_no_file(
    tmp_path, monkeypatch, new_run_checkpoints
) -> None:
    """s51o's kill matrix over the recorded set-aside: a kill at the k-th ``os.replace`` / unlink, for
    every k, over setting aside, settling and putting back; the next launch's settle then leaves the
    previous run whole (or the new run, once it has its checkpoint), the user's files untouched."""
    with monkeypatch.context() as m:
        total = _counting_kills(m, kill_at=0)
        (tmp_path / "count").mkdir()
        _write(tmp_path / "count", {**PREVIOUS, **USERS})
        _launch(tmp_path / "count", new_run_checkpoints)
        calls = total[0]
    assert calls >= 8
    new_run = {"config.yaml": "seed: 1\n", run_dir.CHECKPOINT_FILE: "the new run's weights"}
    for kill_at in range(1, calls + 1):
        folder = tmp_path / f"k{kill_at}"
        folder.mkdir()
        _write(folder, {**PREVIOUS, **USERS})
        with monkeypatch.context() as m:
            _counting_kills(m, kill_at)
            with pytest.raises(KeyboardInterrupt):
                _launch(folder, new_run_checkpoints)
        run_dir.settle_previous_run(folder)  # the next launch
        run_dir.remove_stale_temporaries(folder)
        after = _files(folder)
        assert after in ({**PREVIOUS, **USERS}, {**new_run, **USERS}), (kill_at, after)
        if after == {**new_run, **USERS}:  # only once the new run has its checkpoint
            assert new_run_checkpoints, kill_at


@pytest.mark.slow  # ~0.26 s (loaded machine): a config built and saved, the CLI's train refused
def test_an_overwrite_from_the_command_line_onto_a_users_file_is_one_error_line(tmp_path, capsys) -> None:
    """The refusal reaches the command line as one line naming the file; nothing in the out_dir moves."""
    from lm_testing import TINY

    from innerloop.cli import main
    from innerloop.config import load_config
    from innerloop.config.load import save_config

    out = tmp_path / "run"
    out.mkdir()
    save_config(load_config("tiny", [*TINY, f"out_dir={out}"])[1], out / "config.yaml")
    _write(out, {run_dir.CHECKPOINT_FILE: "the previous run's weights", ".replaced.config.yaml": "mine"})
    before = _files(out)
    assert main(["train", *TINY, f"out_dir={out}", "--overwrite"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "holds .replaced.config.yaml, which no .replaced.record names" in error
    assert "--overwrite sets the previous run's config.yaml, last.safetensors aside" in error
    assert {name: text for name, text in _files(out).items() if name != run_dir.LOCK_NAME} == before
