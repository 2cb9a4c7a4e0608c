"""Review s56d: no lost work -- every file innerloop writes, under interruption and hostile file systems."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
import torch

from innerloop import checkpoints
from innerloop.checkpoints import save_checkpoint
from innerloop.hf import InnerloopConfig, InnerloopForCausalLM
from innerloop.train.run_dir import (
    CHECKPOINT_FILE,
    PENDING_CHECKPOINT,
    RunDirError,
    lock_run_dir,
    settle_pending_checkpoint,
)

TINY = {"hidden_size": 16, "num_heads": 2, "num_layers": 1, "intermediate_size": 32}


def _record_syncs_and_renames(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Record every ``os.fsync`` (``("fsync", path)``) and ``os.replace``/``os.rename``
    (``("rename", target)``) from here on, in order."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
        real_replace(source, target)
        events.append(("rename", os.fspath(target)))

    def rename(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
        real_rename(source, target)
        events.append(("rename", os.fspath(target)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "rename", rename)
    return events


@pytest.mark.slow  # a save_pretrained: about 0.6 s
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names an fsync-ed descriptor by /proc")
def test_save_pretrained_flushes_each_file_before_its_rename_and_the_folder_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # save_pretrained staged the files and renamed them into the folder without an fsync of either:
    # after a power cut the folder could hold the new config.json and a model.safetensors of zero
    # bytes (the rename on disk, the data not), the earlier save's weights gone too
    torch.manual_seed(0)
    model = InnerloopForCausalLM(InnerloopConfig(model=TINY)).eval()
    folder = tmp_path / "saved"
    events = _record_syncs_and_renames(monkeypatch)
    model.save_pretrained(folder)
    renamed = [i for i, (kind, path) in enumerate(events) if kind == "rename" and Path(path).parent == folder]
    names = {Path(events[i][1]).name for i in renamed}
    assert {"config.json", "model.safetensors"} <= names
    for i in renamed:
        name = Path(events[i][1]).name
        synced = [p for kind, p in events[:i] if kind == "fsync" and Path(p).name == name]
        assert synced, f"{name} renamed into the folder before its bytes were flushed: {events}"
    assert ("fsync", str(folder)) in events[renamed[-1] + 1 :], f"the folder never flushed: {events}"
    assert stat.S_IMODE((folder / "model.safetensors").stat().st_mode) == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.slow  # an export: about 0.6 s
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names an fsync-ed descriptor by /proc")
def test_an_export_flushes_its_staging_folder_before_the_rename_and_the_parent_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the export flushed its files but neither the staging folder's entries before renaming it into
    # place nor the parent folder after: a power cut could leave OUT_DIR missing or without its files
    from innerloop.hf.export import export_model
    from innerloop.models import build_model

    torch.manual_seed(0)
    model = build_model({**TINY, "vocab_size": 256})
    out = tmp_path / "export"
    events = _record_syncs_and_renames(monkeypatch)
    export_model(model, out)
    into_place = events.index(("rename", str(out)))
    synced_before = {p for kind, p in events[:into_place] if kind == "fsync"}
    assert any(Path(p).name == "model.safetensors" for p in synced_before), events
    assert any(Path(p).parent == tmp_path and Path(p).name.startswith(".export.") for p in synced_before), (
        events
    )
    assert ("fsync", str(tmp_path)) in events[into_place + 1 :], events


def _training_checkpoint(path: Path, step: int) -> Path:
    """A minimal training checkpoint of ``global_step`` ``step`` (what ``settle_pending_checkpoint`` reads)."""
    checkpoint = {
        "pytorch-lightning_version": "2.0.0",
        "state_dict": {"w": torch.ones(2)},
        "hyper_parameters": {},
        "loops": {},
        "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(2)}}}],
        "global_step": step,
    }
    return save_checkpoint(checkpoint, path)


def test_a_pending_checkpoint_of_a_newer_format_is_kept_and_the_launch_refused_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a pending checkpoint written by a newer innerloop (a run killed during its validation, then launched
    # again from an older install) was removed as "not a whole checkpoint": the run's latest steps, lost,
    # although the file was whole and an upgrade reads it
    _training_checkpoint(tmp_path / CHECKPOINT_FILE, step=4)
    with monkeypatch.context() as newer:
        newer.setattr(checkpoints, "FORMAT_VERSION", str(int(checkpoints.FORMAT_VERSION) + 1))
        pending = _training_checkpoint(tmp_path / PENDING_CHECKPOINT, step=6)
    written = pending.read_bytes()
    with pytest.raises(RunDirError) as refused:
        settle_pending_checkpoint(tmp_path)
    assert pending.read_bytes() == written
    message = str(refused.value)
    assert str(pending) in message and "newer innerloop" in message and "upgrade" in message


def test_a_pending_checkpoint_that_cannot_be_read_now_is_kept_not_removed_as_damaged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a read that failed for the file system's reason (permission denied, an NFS I/O error) was taken as a
    # damaged file, and the whole pending checkpoint removed: its steps lost to a passing error
    _training_checkpoint(tmp_path / CHECKPOINT_FILE, step=4)
    pending = _training_checkpoint(tmp_path / PENDING_CHECKPOINT, step=6)
    real_open = checkpoints.safe_open

    def safe_open(path: str, *args: object, **kwargs: object) -> object:
        if Path(path).name == PENDING_CHECKPOINT:
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(checkpoints, "safe_open", safe_open)
    with pytest.raises(RunDirError) as refused:
        settle_pending_checkpoint(tmp_path)
    assert pending.is_file()
    assert str(pending) in str(refused.value) and "Permission denied" in str(refused.value)


def test_a_pending_checkpoint_refused_for_a_plugin_s_settings_now_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a pending checkpoint whose plugin is registered now with other settings was removed as "not a whole
    # checkpoint", while the refusal's own advice (register it with the settings it was saved with) would
    # have read it
    _training_checkpoint(tmp_path / CHECKPOINT_FILE, step=4)
    pending = _training_checkpoint(tmp_path / PENDING_CHECKPOINT, step=6)

    def settings_differ(source: str, record: object, model: object = None) -> None:
        raise checkpoints.PluginSettingsError(f"{source} was saved with the mixer 'mine' of other settings")

    monkeypatch.setattr(checkpoints, "check_plugin_settings", settings_differ)
    with pytest.raises(RunDirError, match="other settings") as refused:
        settle_pending_checkpoint(tmp_path)
    assert pending.is_file() and str(pending) in str(refused.value)


@pytest.mark.parametrize("below", ["", "sub"])
def test_an_out_dir_where_a_file_stands_is_refused_naming_the_file(tmp_path: Path, below: str) -> None:
    # the refusal said only "cannot be used: File exists" (or "Not a directory"), naming no file
    blocker = tmp_path / "run"
    blocker.write_text("mine")
    with pytest.raises(RunDirError) as refused, lock_run_dir(blocker / below if below else blocker):
        pass
    assert f"{str(blocker)!r} is a file, not a folder" in str(refused.value)
    assert blocker.read_text() == "mine"


@pytest.mark.slow  # ~1 s: a short training run
@pytest.mark.parametrize(("code", "reason"), [(errno.EROFS, "Read-only file system")])  # EIO: alike
def test_a_checkpoint_write_failing_otherwise_than_a_full_disk_says_the_last_checkpoint_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, reason: str
) -> None:
    # a full disk said which checkpoint was kept and how to continue; a file system turned read-only
    # (ext4's errors=remount-ro) or an I/O error raised the bare "writing ... failed", saying nothing
    # of the last checkpoint, which was whole
    from lm_testing import TINY as TINY_RUN

    from innerloop.config import load_config
    from innerloop.train import train

    out = tmp_path / "run"
    run, cfg = load_config(
        "tiny", [*TINY_RUN, f"out_dir={out}", "trainer.max_steps=6", "trainer.checkpoint_every=2"]
    )
    real_save, writes = checkpoints.save_file, []

    def fails_the_second(*args: object, **kwargs: object) -> None:
        writes.append(1)
        if len(writes) > 1:
            raise OSError(code, reason)
        real_save(*args, **kwargs)

    monkeypatch.setattr(checkpoints, "save_file", fails_the_second)
    with pytest.raises(OSError) as raised:
        train(run, cfg)
    message = str(raised.value)
    assert raised.value.errno == code and reason in message
    assert "(after 2 steps), is kept: continue it with" in message
    assert checkpoints.load_checkpoint(out / CHECKPOINT_FILE)["global_step"] == 2


def test_flushing_a_staged_folder_opens_its_files_read_only(tmp_path: Path, monkeypatch) -> None:
    # s56o: flush_files_in gave a file its mode and then opened it "rb+" to fsync it: with a mode (or a
    # umask such as 277) that leaves out the owner's write bit, a non-root user got PermissionError from
    # export. Root ignores the bit, so the open is made to check it as the kernel would for a user.
    import builtins
    import stat

    from innerloop.data.atomic import flush_files_in

    (tmp_path / "config.json").write_text("{}")
    real_open = builtins.open

    def open_as_a_user(file, mode="r", *args, **kwargs):
        writing = any(flag in mode for flag in "wa+x")
        if writing and Path(file).exists() and not Path(file).stat().st_mode & stat.S_IWUSR:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_as_a_user)
    assert flush_files_in(tmp_path, mode=0o444) == [tmp_path / "config.json"]
