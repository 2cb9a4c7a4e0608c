"""An ``innerloop export --overwrite`` killed part way leaves hidden folders beside OUT_DIR: its staging
folder ``.<name>.*.tmp`` (holding the user's files it had moved in from OUT_DIR) and, between its two
renames, the earlier export ``.<name>.*.old`` with OUT_DIR missing. The next export (or check of the
target) settles them: the earlier export and the user's files go back into OUT_DIR, the unfinished
export goes, and one line says so. A kill leaves these states; they are made here by hand, from real
exports, as the kill would leave them."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from hf_testing import MODEL_KINDS

from innerloop.hf.export import MANIFEST, check_target, export_model, settle_interrupted_export
from innerloop.models import ModelConfig, build_model

USERS = {"notes.txt": b"the user's notes", "tokenizer.model": b"the user's tokenizer"}


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig.from_dict(MODEL_KINDS["swa"])).eval()


@pytest.fixture
def earlier(model, tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """An earlier export at ``tmp_path/hf`` holding the user's files too; its contents."""
    out = export_model(model, tmp_path / "hf", tokenizer=None)
    for name, data in USERS.items():
        (out / name).write_bytes(data)
    return out, _contents(out)


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _unfinished_export(model, out: Path, name: str, users: dict[str, bytes] = {}) -> Path:  # noqa: B006
    """The staging folder ``name`` beside ``out`` as the new export left it, with ``users`` (the user's
    files it had moved in from ``out``)."""
    staging = export_model(model, out.parent / "new", tokenizer=None)
    for user_file in users:
        os.rename(out / user_file, staging / user_file)
    target = out.parent / name
    os.replace(staging, target)
    return target


def test_a_kill_between_the_two_renames_puts_the_earlier_export_and_the_users_files_back(
    model, earlier, caplog
) -> None:
    out, before = earlier
    _unfinished_export(model, out, ".hf.udw9rgiu.tmp", USERS)
    os.replace(out, out.parent / ".hf.rg1__738.old")  # the kill: OUT_DIR is missing
    assert not out.exists()
    with caplog.at_level(logging.WARNING, logger="innerloop.hf.export"):
        check_target(out, overwrite=True)
    assert _contents(out) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["hf"]
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1, said
    assert ".hf.rg1__738.old" in said[0] and ".hf.udw9rgiu.tmp" in said[0] and "notes.txt" in said[0]


def test_a_kill_while_the_files_were_synced_leaves_a_staging_folder_that_the_next_export_removes(
    model, earlier
) -> None:
    out, before = earlier
    _unfinished_export(model, out, ".hf.1hl98clx.tmp")
    assert settle_interrupted_export(out) == ["removed the unfinished export .hf.1hl98clx.tmp"]
    assert _contents(out) == before
    export_model(model, out, overwrite=True, tokenizer=None)  # and the export then goes on as usual
    assert {name: (out / name).read_bytes() for name in USERS} == USERS
    assert sorted(p.name for p in out.parent.iterdir()) == ["hf"]


def test_a_kill_while_the_earlier_export_was_deleted_finishes_deleting_only_its_own_files(
    model, earlier
) -> None:
    out, _ = earlier
    aside = out.parent / ".hf.abcdefgh.old"
    staging = _unfinished_export(model, out, ".hf.ijklmnop.tmp", USERS)
    os.replace(out, aside)
    os.replace(staging, out)  # the new export is in place, with the user's files
    (aside / "model.safetensors").unlink()  # the kill came part way through deleting the earlier one
    new = _contents(out)
    settle_interrupted_export(out)
    assert _contents(out) == new
    assert sorted(p.name for p in out.parent.iterdir()) == ["hf"]


def test_files_of_the_users_that_cannot_go_back_are_kept_where_they_are_and_named(
    model, earlier, caplog
) -> None:
    out, _ = earlier
    staging = _unfinished_export(model, out, ".hf.qrstuvwx.tmp", {"notes.txt": USERS["notes.txt"]})
    (out / "notes.txt").write_bytes(b"notes written since")
    with caplog.at_level(logging.WARNING, logger="innerloop.hf.export"):
        settle_interrupted_export(out)
    left = _contents(staging)  # the export's own files went; its record stays (the rest is the user's)
    assert left.pop("notes.txt") == USERS["notes.txt"] and sorted(left) == [MANIFEST]
    assert (out / "notes.txt").read_bytes() == b"notes written since"
    assert "kept .hf.qrstuvwx.tmp" in caplog.text and "notes.txt" in caplog.text


def test_folders_that_only_look_like_leftovers_are_left_alone(earlier) -> None:
    out, before = earlier
    others = [".hf.short.tmp", ".hfx.abcdefgh.tmp", ".hf.abcdefgh.tmp.bak", "hf.abcdefgh.old"]
    for name in others:
        (out.parent / name).mkdir()
        (out.parent / name / MANIFEST).write_text("{}")
    (out.parent / ".hf.abcdefgh.old").write_text("a file, not a folder")
    assert settle_interrupted_export(out) == []
    assert _contents(out) == before
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(["hf", ".hf.abcdefgh.old", *others])
