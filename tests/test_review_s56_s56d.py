"""Review s56d: no lost work -- every file innerloop writes, under interruption and hostile file systems."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from innerloop.hf import InnerloopConfig, InnerloopForCausalLM

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
