"""Review s49c: the data pipeline's Hugging Face datasets (issue 11)."""

from __future__ import annotations

from pathlib import Path

import pytest

from innerloop.data.hf import open_hf_dataset
from innerloop.data.text import DataError


@pytest.mark.parametrize("saved", [False, True], ids=["data_file", "save_to_disk_folder"])
def test_a_path_holding_a_double_colon_is_refused_naming_it(tmp_path: Path, saved: bool) -> None:
    """datasets reads '::' in a path as its chained-URL syntax ('zip://x.jsonl::archive.zip'): a local
    file in a folder 'a::b' failed as "Unable to find '.../a::b/d.jsonl'" (it exists), and a saved dataset
    there as "No such files: '.../a/dataset_info.json'". Refused before datasets is asked, naming
    data.paths, the path, and what to do."""
    folder = tmp_path / "runs::v1"
    folder.mkdir()
    if saved:
        (folder / "dataset_info.json").write_text("{}", encoding="utf-8")
        (folder / "state.json").write_text("{}", encoding="utf-8")
        given = folder
    else:
        given = folder / "d.jsonl"
        given.write_text('{"text": "hello"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"data\.paths .*runs::v1.*'::'.*chained.*rename"):
        open_hf_dataset([str(given)], "train", False, "text")
