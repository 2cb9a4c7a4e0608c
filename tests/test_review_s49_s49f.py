"""Review s49f: fair comparisons (issue 14) against inputs nobody listed."""

from __future__ import annotations

import pytest

from innerloop.config.load import ConfigError
from innerloop.train.compare import compare, resolve_checkpoint


def _hugging_face_folder(folder):
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def _orbax_folder(folder):
    (folder / "100").mkdir(parents=True)
    (folder / "100" / "_CHECKPOINT_METADATA").write_text("{}")
    return folder


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (_hugging_face_folder, "a Hugging Face folder"),
        (_orbax_folder, "innerloop convert ttt-e2e"),
    ],
)
def test_compare_names_an_export_or_an_e2e_checkpoint_folder_as_eval_does(tmp_path, make, says) -> None:
    """An exported Hugging Face folder or an official TTT-E2E (orbax) checkpoint given to compare was "a
    folder without a checkpoint (last.safetensors)", not what it is and how to compare it (eval said)."""
    folder = make(tmp_path / "model")
    with pytest.raises(ConfigError, match=says):
        resolve_checkpoint(folder)
    with pytest.raises(ConfigError, match=says):
        compare([folder, folder])


def test_a_plain_folder_without_a_checkpoint_is_still_named_so(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"is a folder without a checkpoint \(last.safetensors\)"):
        resolve_checkpoint(tmp_path)
