"""``--overwrite`` of ``innerloop export`` / ``convert --format hf`` replaces only what the earlier export
wrote itself (its ``innerloop_export.json``): tokenizer files the user copied in, notes and edits are
kept or the export is refused naming them, never deleted (docs/huggingface.md, "Export a checkpoint").
Also the targets that are links, or that are not what they should be: one line, nothing changed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from hf_testing import MODEL_KINDS

from innerloop.cli import main
from innerloop.hf import export
from innerloop.hf.export import ExportError, export_model
from innerloop.models import ModelConfig, build_model

MANIFEST = "innerloop_export.json"  # innerloop.hf.export.MANIFEST

MODEL_FILES = {
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "configuration_innerloop.py",
    "modeling_innerloop.py",
    MANIFEST,
}
COPIED = {  # what docs/huggingface.md tells a user to copy into a converted model's export
    "tokenizer.model": b"the user's sentencepiece model",
    "special_tokens_map.json": b'{"eos_token": "</s>"}',
    "tokenizer_config.json": b'{"tokenizer_class": "LlamaTokenizer"}',
}


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig.from_dict(MODEL_KINDS["swa"])).eval()


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _copy_in(folder: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (folder / name).write_bytes(data)


def test_overwrite_keeps_the_tokenizer_files_a_user_copied_in(model, tmp_path: Path) -> None:
    out = export_model(model, tmp_path / "hf", tokenizer=None)  # a converted model's: no tokenizer
    _copy_in(out, COPIED)
    export_model(model, out, overwrite=True, tokenizer=None)
    assert {name: (out / name).read_bytes() for name in COPIED} == COPIED
    assert {p.name for p in out.iterdir()} == MODEL_FILES | set(COPIED)
    assert set(json.loads((out / MANIFEST).read_text())["files"]) == MODEL_FILES - {MANIFEST}
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # nothing left beside it


def test_convert_to_hf_overwrite_keeps_copied_tokenizer_files_and_says_so(
    reference_models_dir: Path, tmp_path: Path, capsys
) -> None:
    args = [
        "convert",
        "ttt-lm-pytorch",
        str(reference_models_dir / "ttt_linear_transformer"),
        str(tmp_path / "hf"),
    ]
    assert main([*args, "--format", "hf"]) == 0
    _copy_in(tmp_path / "hf", COPIED)
    capsys.readouterr()
    assert main([*args, "--format", "hf", "--overwrite"]) == 0
    assert (
        "kept in it (not written by the export): special_tokens_map.json, tokenizer.model"
        in capsys.readouterr().out
    )
    assert {name: (tmp_path / "hf" / name).read_bytes() for name in COPIED} == COPIED


def test_overwrite_refuses_to_replace_a_users_file_with_another(model, tmp_path: Path) -> None:
    out = export_model(model, tmp_path / "hf", tokenizer=None)
    (out / "tokenizer.json").write_text('{"the user\'s": "tokenizer"}')
    before = _contents(out)
    with pytest.raises(ExportError, match=r"also holds tokenizer\.json, which that export did not write"):
        export_model(model, out, overwrite=True)  # writes the byte tokenizer's tokenizer.json
    assert _contents(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_an_export_file_edited_since_is_the_users(model, tmp_path: Path, capsys) -> None:
    out = export_model(model, tmp_path / "hf")
    (out / "generation_config.json").write_text('{"my": "generation defaults"}')
    (out / "tokenizer_config.json").write_text('{"my": "chat template"}')
    before = _contents(out)
    with pytest.raises(ExportError, match="generation_config.json, tokenizer_config.json"):
        export_model(model, out, overwrite=True)
    assert _contents(out) == before
    (out / "generation_config.json").unlink()  # moved out by the user
    export_model(model, out, overwrite=True, tokenizer=None)  # writes no tokenizer_config.json: kept
    assert (out / "tokenizer_config.json").read_text() == '{"my": "chat template"}'
    assert not (out / "tokenizer.json").exists()  # the earlier export's own, unchanged: replaced by none


def test_notes_and_folders_added_to_an_export_are_kept(model, tmp_path: Path) -> None:
    out = export_model(model, tmp_path / "hf")
    (out / "NOTES.md").write_text("my eval notes")
    (out / "results").mkdir()
    (out / "results" / "r.txt").write_text("1")
    export_model(model, out, overwrite=True)
    assert (out / "NOTES.md").read_text() == "my eval notes" and (
        out / "results" / "r.txt"
    ).read_text() == "1"
    assert export.foreign_entries(out) == ["NOTES.md", "results/"]


def test_an_export_without_a_manifest_keeps_its_tokenizer_files_unless_identical(
    model, tmp_path: Path
) -> None:
    """An export of an innerloop before the manifest: only its model files are taken as the export's."""
    out = export_model(model, tmp_path / "hf")
    (out / MANIFEST).unlink(missing_ok=True)
    export_model(model, out, overwrite=True)  # the same tokenizer files: replacing them loses nothing
    (out / MANIFEST).unlink(missing_ok=True)
    export_model(model, out, overwrite=True, tokenizer=None)
    assert (out / "tokenizer.json").is_file() and export.foreign_entries(out) == [
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    legacy = export_model(model, tmp_path / "legacy", tokenizer=None)
    (legacy / MANIFEST).unlink(missing_ok=True)
    _copy_in(legacy, {"tokenizer.json": b"{}"})
    with pytest.raises(ExportError, match="tokenizer.json"):
        export_model(model, legacy, overwrite=True)
    assert (legacy / "tokenizer.json").read_bytes() == b"{}"


def test_a_failed_replacement_puts_everything_back(model, tmp_path: Path, monkeypatch) -> None:
    out = export_model(model, tmp_path / "hf", tokenizer=None)
    _copy_in(out, COPIED)
    before = _contents(out)
    replace = os.replace

    def failing(source, target):
        if Path(source).name.endswith(".tmp"):  # the new folder, renamed into place
            raise KeyboardInterrupt
        return replace(source, target)

    monkeypatch.setattr(export.os, "replace", failing)
    with pytest.raises(KeyboardInterrupt):
        export_model(model, out, overwrite=True, tokenizer=None)
    assert _contents(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]


@pytest.mark.parametrize("interrupted_after", [1, 2, 3])
def test_ctrl_c_just_after_a_users_file_is_moved_loses_none_of_them(
    model, tmp_path: Path, monkeypatch, interrupted_after: int
) -> None:
    """Review s54g: the KeyboardInterrupt of a Ctrl-C pressed during the ``os.rename`` that moves the
    ``interrupted_after``-th user file into the new export is raised when the call returns, the file
    already moved. It was not yet recorded as moved, so it was not moved back, and the staging folder was
    deleted with it (the user's tokenizer file lost). Now every file is back and nothing is left beside."""
    out = export_model(model, tmp_path / "hf", tokenizer=None)
    _copy_in(out, COPIED)
    before = _contents(out)
    rename, renamed = os.rename, []

    def interrupted_on_return(source, target):  # noqa: ANN001, ANN202
        rename(source, target)
        renamed.append(source)
        if len(renamed) == interrupted_after:
            raise KeyboardInterrupt

    monkeypatch.setattr(export.os, "rename", interrupted_on_return)
    with pytest.raises(KeyboardInterrupt):
        export_model(model, out, overwrite=True, tokenizer=None)
    assert _contents(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_ctrl_c_just_after_the_earlier_export_is_set_aside_puts_it_back(
    model, tmp_path: Path, monkeypatch
) -> None:
    """Review s54g: a Ctrl-C during the rename that sets the earlier export aside (raised when it
    returns, OUT_DIR gone): the user's files, moved into the new export, could not be moved back into
    the missing OUT_DIR, and the export ended in an ExportError naming a staging folder, OUT_DIR missing
    until a later export settled it. Now the earlier export is put back first: the KeyboardInterrupt,
    and OUT_DIR as it was."""
    out = export_model(model, tmp_path / "hf", tokenizer=None)
    _copy_in(out, COPIED)
    before = _contents(out)
    replace = os.replace

    def interrupted_once_set_aside(source, target):  # noqa: ANN001, ANN202
        replace(source, target)
        if Path(target).name.endswith(".old"):
            raise KeyboardInterrupt

    monkeypatch.setattr(export.os, "replace", interrupted_once_set_aside)
    with pytest.raises(KeyboardInterrupt):
        export_model(model, out, overwrite=True, tokenizer=None)
    assert _contents(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]


@pytest.mark.parametrize("stopped", ["as the new export is renamed in", "while the earlier one is deleted"])
def test_ctrl_c_once_the_new_export_is_in_place_leaves_no_earlier_export_beside_it(
    model, tmp_path: Path, monkeypatch, stopped: str
) -> None:
    """Review s55p: a Ctrl-C raised as the rename that puts the new export in place returns (or while
    the earlier export's files are deleted) left the earlier export in ``.hf.*.old`` beside OUT_DIR until
    the next export to it settled it. Its own files are now deleted before the KeyboardInterrupt goes on;
    the new export, with the user's files, is in place."""
    out = export_model(model, tmp_path / "hf", tokenizer=None)
    _copy_in(out, COPIED)
    replace, unlink = os.replace, Path.unlink

    def interrupted_once_in_place(source, target):  # noqa: ANN001, ANN202
        replace(source, target)
        if Path(source).name.endswith(".tmp") and Path(target) == out:
            raise KeyboardInterrupt

    def interrupted_once_deleting(path, *args, **kwargs):  # noqa: ANN001, ANN202
        monkeypatch.setattr(Path, "unlink", unlink)  # the first unlink only
        unlink(path, *args, **kwargs)
        raise KeyboardInterrupt

    if stopped.startswith("as"):
        monkeypatch.setattr(export.os, "replace", interrupted_once_in_place)
    else:
        monkeypatch.setattr(Path, "unlink", interrupted_once_deleting)
    with pytest.raises(KeyboardInterrupt):
        export_model(model, out, overwrite=True, tokenizer=None)
    assert {p.name for p in out.iterdir()} == MODEL_FILES | set(COPIED)
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no .hf.*.old left


@pytest.mark.parametrize("second_after", [1, 2])
def test_a_second_ctrl_c_while_the_users_files_go_back_loses_none(
    model, tmp_path: Path, monkeypatch, second_after: int
) -> None:
    """Review s54j: ``export --overwrite`` stopped by a Ctrl-C as it moves the user's files into the new export, and a
    second one as the ``second_after``-th of them is moved back (each raised as its rename returns): the
    files not yet moved back were in the staging folder, which the export then deleted whole (the user's
    tokenizer files lost). The staging folder is now emptied by its record, as a later export settles
    one (the export's own files deleted, the user's moved back into OUT_DIR), so what the second Ctrl-C
    left in it goes back at the next export's settling."""
    out = export_model(model, tmp_path / "hf", tokenizer=None)
    copied = {f"tokenizer_{i}.json": f"the user's file {i}".encode() for i in range(3)}
    for name, data in copied.items():
        (out / name).write_bytes(data)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    rename, renamed = os.rename, []

    def interrupted_on_return(source, target):  # noqa: ANN001, ANN202
        rename(source, target)
        renamed.append(Path(target).parent)
        back = [folder for folder in renamed if folder == out]
        if len(renamed) == 3 or len(back) == second_after:  # the 3rd file in; then the move back
            raise KeyboardInterrupt

    monkeypatch.setattr(export.os, "rename", interrupted_on_return)
    with pytest.raises(KeyboardInterrupt):
        export_model(model, out, overwrite=True, tokenizer=None)
    monkeypatch.undo()
    export.settle_interrupted_export(out)  # as the next export does: the rest of the move back
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]


@pytest.mark.parametrize("stopped_after", [1, 2, 3, 4, 5])
def test_a_ctrl_c_after_any_rename_of_an_overwrite_loses_nothing(
    model, tmp_path: Path, monkeypatch, stopped_after: int
) -> None:
    """Review s54j, every rename of ``export --overwrite`` (3 user's files in, the earlier export aside,
    the new one in place): a Ctrl-C raised as the ``stopped_after``-th returns, then the next export's
    settling, leaves OUT_DIR an export (the earlier or the new) holding every file of the user's, and
    nothing beside it."""
    out = export_model(model, tmp_path / "hf", tokenizer=None)
    _copy_in(out, COPIED)
    rename, replace, calls = os.rename, os.replace, []

    def stopped(real):  # noqa: ANN001, ANN202
        def call(source, target):  # noqa: ANN001, ANN202
            real(source, target)
            calls.append(target)
            if len(calls) == stopped_after:
                raise KeyboardInterrupt

        return call

    monkeypatch.setattr(export.os, "rename", stopped(rename))
    monkeypatch.setattr(export.os, "replace", stopped(replace))
    with pytest.raises(KeyboardInterrupt):
        export_model(model, out, overwrite=True, tokenizer=None)
    monkeypatch.undo()
    export.settle_interrupted_export(out)
    assert {name: (out / name).read_bytes() for name in COPIED} == COPIED
    assert {p.name for p in out.iterdir()} == MODEL_FILES | set(COPIED)
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]


# -- targets: links, folders where a file belongs -----------------------------------------------------


def test_export_overwrite_through_a_link_to_an_earlier_export(model, tmp_path: Path, capsys) -> None:
    real = export_model(model, tmp_path / "real")
    (tmp_path / "link").symlink_to("real")
    assert main(["export", str(_checkpoint(model, tmp_path)), str(tmp_path / "link"), "--overwrite"]) == 0
    assert (tmp_path / "link").is_symlink() and os.readlink(tmp_path / "link") == "real"
    assert (real / "config.json").is_file() and (tmp_path / "link" / MANIFEST).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "link", "real"]  # no .link.*.old left


def test_export_through_a_link_to_an_empty_folder(model, tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to("empty")
    assert main(["export", str(_checkpoint(model, tmp_path)), str(tmp_path / "link")]) == 0
    assert (tmp_path / "link").is_symlink() and (tmp_path / "empty" / "model.safetensors").is_file()


def test_a_broken_link_as_out_dir_is_one_line(model, tmp_path: Path, capsys) -> None:
    (tmp_path / "link").symlink_to("missing")
    assert main(["export", str(_checkpoint(model, tmp_path)), str(tmp_path / "link")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "symbolic link" in error
    assert (tmp_path / "link").is_symlink() and not (tmp_path / "missing").exists()


def test_convert_onto_a_folder_named_last_safetensors_is_one_line(
    reference_models_dir: Path, tmp_path: Path, capsys
) -> None:
    (tmp_path / "last.safetensors").mkdir()
    source = str(reference_models_dir / "ttt_linear_transformer")
    assert main(["convert", "ttt-lm-pytorch", source, str(tmp_path), "--overwrite"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "last.safetensors' is not a file" in error
    assert (tmp_path / "last.safetensors").is_dir()


def _checkpoint(model, folder: Path) -> Path:
    from innerloop.train.module import save_model_checkpoint

    return save_model_checkpoint(model, folder / "ck" / "last.safetensors")


def test_a_manifest_naming_a_file_elsewhere_never_deletes_it(model, tmp_path: Path) -> None:
    import hashlib

    victim = tmp_path / "victim.txt"
    victim.write_text("not the export's")
    out = export_model(model, tmp_path / "hf")
    manifest = json.loads((out / MANIFEST).read_text())
    digest = hashlib.sha256(victim.read_bytes()).hexdigest()
    manifest["files"]["../victim.txt"] = {"size": victim.stat().st_size, "sha256": digest}
    (out / MANIFEST).write_text(json.dumps(manifest))
    export_model(model, out, overwrite=True)
    assert victim.read_text() == "not the export's"


def test_weights_saved_over_an_export_are_never_replaced(model, tmp_path: Path) -> None:
    """E.g. fine-tuned weights saved into the folder: the same size, other contents."""
    out = export_model(model, tmp_path / "hf")
    weights = bytearray((out / "model.safetensors").read_bytes())
    weights[-1] ^= 1
    (out / "model.safetensors").write_bytes(bytes(weights))
    with pytest.raises(ExportError, match="model.safetensors"):
        export_model(model, out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() == bytes(weights)
