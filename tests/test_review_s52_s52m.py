"""Review s52m: s52c's one glob matcher where a second one was left (``train.run._data_moved`` asked
``glob.glob``, which finds folders), and s52f's CLI number rule and --resume hand-over."""

from __future__ import annotations

from pathlib import Path

import pytest

from innerloop.cli import UsageError, _parser
from innerloop.train.run import _data_moved  # imported at collection: the tests stay fast


@pytest.mark.parametrize(
    "layout",
    [
        "an empty folder",
        "a folder of hidden files only",
        "a glob matching only folders",
        "a '**' of an empty folder",
    ],
)
def test_recorded_data_that_finds_no_file_counts_as_moved(tmp_path: Path, layout: str) -> None:
    """A run's data moved out of its folder (the folder left behind, empty or holding only a .git) finds
    no file: glob.glob found the folder itself, so the weights were taken for another run's, evaluated
    on the recorded paths, which then 'match no file'."""
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    entry = {
        "an empty folder": str(data),
        "a folder of hidden files only": str(data),
        "a glob matching only folders": str(data / "s*"),
        "a '**' of an empty folder": str(data / "**"),
    }[layout]
    if layout == "a folder of hidden files only":
        (data / ".git").mkdir()
        (data / ".git" / "HEAD").write_text("ref")
        (data / ".notes.txt").write_text("x")
    assert _data_moved(["data.paths"], {"data.paths": [entry]})
    (data / "sub" / "text.txt").write_text("text")  # files it reads: the data is there
    (data / "s.txt").write_text("text")
    assert not _data_moved(["data.paths"], {"data.paths": [entry]})


@pytest.mark.parametrize("argv", [["generate", "c", "--prompt", "-x"], ["eval", "c", "--out", "-results"]])
def test_a_value_starting_with_a_dash_is_refused_saying_how_to_give_it(argv: list[str]) -> None:
    """argparse takes '-x' for an option and said only 'expected one argument': the error says to write
    the value after '=' (the one way argparse reads it as the option's value)."""
    with pytest.raises(UsageError) as caught:
        _parser().parse_args(argv)
    assert f"{argv[2]}={argv[3]}" in str(caught.value)
