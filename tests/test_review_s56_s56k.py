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
