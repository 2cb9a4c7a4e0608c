"""Review s56k: the data pipeline (text, tokenizers, packing, splits, the hub extra)."""

from __future__ import annotations

import pytest
import torch

from innerloop.data.text import DataError
from innerloop.train.data import TextDataModule

_TEXT = b"the quick brown fox jumps over the lazy dog. " * 10


def _module(pattern: str) -> TextDataModule:
    module = TextDataModule([pattern], seq_len=8, batch_size=2, val_batches=1, val_fraction=0.25)
    module.setup()
    return module


def _several_files(folder, count: int = 6) -> None:
    for index in range(count):
        (folder / f"f{index}.txt").write_bytes(_TEXT + bytes([65 + index]) * 40)


def test_resuming_a_one_file_run_on_several_files_is_refused(tmp_path):
    """A run on the one file a glob found (its last val_fraction held out, the cut recorded) resumed after
    files were added beside it: the data now splits by file, so that file is wholly training (the text it
    validated on trained on) or wholly validation (the text it trained on validated on). Resumed with two
    warnings that blamed an edit, never a refusal: the split record was of the other kind and not compared."""
    (tmp_path / "f0.txt").write_bytes(_TEXT * 4)
    state = _module(str(tmp_path / "*.txt")).state_dict()
    assert "validation_cut" in state and "validation_files" not in state
    _several_files(tmp_path)
    module = _module(str(tmp_path / "*.txt"))
    with pytest.raises(DataError, match=r"one file.*now finds 6 files.*Resuming would use text"):
        module.load_state_dict(state)


def test_resuming_a_run_of_several_files_on_one_file_is_refused(tmp_path):
    """The reverse: a run of several files (its validation files recorded) resumed after all but one were
    removed: that file is now cut by bytes, its first part trained on whichever side it was on."""
    _several_files(tmp_path)
    state = _module(str(tmp_path / "*.txt")).state_dict()
    kept = state["validation_files"][0]
    for path in tmp_path.glob("*.txt"):
        if path.name != kept:
            path.unlink()
    module = _module(str(tmp_path / "*.txt"))
    with pytest.raises(
        DataError, match=rf"several files.*\['{kept}'\].*now finds one file.*Resuming would use text"
    ):
        module.load_state_dict(state)


def _checkpoint(tmp_path, state):
    from innerloop.checkpoints import save_checkpoint

    checkpoint = tmp_path / "last.safetensors"
    save_checkpoint({"state_dict": {"w": torch.zeros(1)}, "TextDataModule": state}, checkpoint)
    return checkpoint


@pytest.mark.slow  # 0.6 s: a config loaded, the windows read twice
@pytest.mark.parametrize("direction", ["one to several", "several to one"])
def test_evaluating_a_runs_validation_windows_after_its_split_changed_kind_is_refused(tmp_path, direction):
    """eval's default windows (the run's validation text) on data that now splits the other way: they
    would score text the run trained on (one file now wholly validation; the one file left now cut)."""
    from innerloop.config import load_config
    from innerloop.train.run import _run_validation_windows

    data = tmp_path / "data"
    data.mkdir()
    pattern = str(data / "*.txt")
    if direction == "one to several":
        (data / "f0.txt").write_bytes(_TEXT * 4)
    else:
        _several_files(data)
    state = _module(pattern).state_dict()
    checkpoint = _checkpoint(tmp_path, state)
    overrides = [f"data.paths=[{pattern}]", "data.val_fraction=0.25", "data.seq_len=8", "data.batch_size=2"]
    run = load_config("tiny", [*overrides, "data.val_batches=1"])[0]
    assert len(_run_validation_windows(run, checkpoint, 8, None, None).inputs) >= 1  # unchanged: scored
    if direction == "one to several":
        _several_files(data)
    else:
        for path in data.glob("*.txt"):
            if path.name != state["validation_files"][0]:
                path.unlink()
    with pytest.raises(DataError, match="split otherwise than when the checkpoint was written"):
        _run_validation_windows(run, checkpoint, 8, None, None)


def _project_with_brackets(tmp_path):
    """A run's folder whose path holds '[1]' with a data folder, and a sibling 'proj1' that the
    unescaped path would read as a glob matching instead."""
    project = tmp_path / "proj[1]"
    (project / "data").mkdir(parents=True)
    for name in ("a.txt", "b.txt"):
        (project / "data" / name).write_bytes(b"own " + name.encode())
    (tmp_path / "proj1" / "data").mkdir(parents=True)
    (tmp_path / "proj1" / "data" / "other.txt").write_bytes(b"another project's text")
    return project


def test_a_relative_glob_made_absolute_in_a_folder_whose_path_holds_brackets_reads_its_files(
    tmp_path, monkeypatch
):
    """A run records its data.paths absolute, joined to the folder it was started from: a relative glob
    started from '.../proj[1]' became the glob '.../proj[1]/data/*.txt', whose '[1]' matches the
    character 1: the run (after its config check passed on the relative glob) read the files of
    '.../proj1/data', another project's, or failed with "matches no file"."""
    from innerloop.config.load import absolute_data_paths
    from innerloop.data.text import resolve_files, split_keys

    project = _project_with_brackets(tmp_path)
    monkeypatch.chdir(project)
    absolute = absolute_data_paths(["data/*.txt", "data"])
    assert resolve_files(absolute[:1]) == sorted((project / "data").glob("*.txt"))
    assert resolve_files(absolute) == resolve_files(["data/*.txt", "data"])
    # keyed below the escaped folder, as any glob holding an escape ('s[[]1]/*': s[1]/x.txt) is keyed
    assert sorted(split_keys(absolute[:1]).values()) == ["proj[1]/data/a.txt", "proj[1]/data/b.txt"]


def test_a_relative_file_whose_name_holds_brackets_made_absolute_is_still_read(tmp_path, monkeypatch):
    from innerloop.config.load import absolute_data_paths
    from innerloop.data.text import resolve_files

    project = _project_with_brackets(tmp_path)
    (project / "x[1].txt").write_bytes(b"a file named with brackets")
    monkeypatch.chdir(project)
    assert resolve_files(absolute_data_paths(["x[1].txt"])) == [project / "x[1].txt"]
    # written escaped, as the error of a glob matching nothing advises: that file too
    assert resolve_files(absolute_data_paths(["x[[]1].txt"])) == [project / "x[1].txt"]
    assert resolve_files(["x[[]1].txt"]) == [project / "x[1].txt"]


def test_a_glob_below_a_home_folder_whose_path_holds_brackets_reads_its_files(tmp_path, monkeypatch):
    """'~/data/*.txt' with the home folder '.../home[1]': the '~' was expanded into the glob unescaped, so
    '[1]' matched 'home1' and the run read another folder's files (the config check alike)."""
    from innerloop.config.load import absolute_data_paths
    from innerloop.data.text import resolve_files

    home = tmp_path / "home[1]"
    (home / "data").mkdir(parents=True)
    (home / "data" / "a.txt").write_bytes(b"own text")
    (tmp_path / "home1" / "data").mkdir(parents=True)
    (tmp_path / "home1" / "data" / "other.txt").write_bytes(b"another folder's text")
    monkeypatch.setenv("HOME", str(home))
    assert resolve_files(["~/data/*.txt"]) == [home / "data" / "a.txt"]
    assert resolve_files(absolute_data_paths(["~/data/*.txt"])) == [home / "data" / "a.txt"]
    assert resolve_files(["~/data"]) == [home / "data" / "a.txt"]  # a folder: as named
