"""A resume, and an evaluation of the run's validation windows, refuse data whose split by file moved
since the checkpoint: with a few files the split may hold out the last file in sorted order, so a file
added later can move the one the run validated on into its training text (review s11, HF/data H1). The
checkpoint records the validation files' split keys, and a digest of the training text: a resume on
edited training files is warned about (M1)."""

from __future__ import annotations

import logging

import pytest
from lm_testing import TINY  # the tiny run of the end-to-end tests

from innerloop.config import load_config
from innerloop.data.text import DataError, split_by_file
from innerloop.train import train
from innerloop.train.module import load_module
from innerloop.train.run import evaluation_windows

# At data.val_fraction=0.1 each of these hashes to the training side, so the split holds out the last
# one in sorted order: e.txt, then z.txt once it is added.
FIRST, ADDED = ("b.txt", "c.txt", "e.txt"), "z.txt"


def _write(folder, name: str) -> None:
    (folder / name).write_text(f"# {name}\n" + "def f(x):\n    return x + 1\n" * 80)


@pytest.mark.slow  # ~3 s: a short training run and three resumes
def test_a_resume_refuses_data_whose_split_moved_a_validation_file_into_training(tmp_path, caplog):
    data, out = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    for name in FIRST:
        _write(data, name)
    files = sorted(data.iterdir())
    assert split_by_file(files, 0.1)[1] == []  # the fallback applies: every file on the training side
    run, cfg = load_config("tiny", [*TINY, f"data.paths=[{data}]", "trainer.max_steps=2", f"out_dir={out}"])
    train(run, cfg)

    _write(data, ADDED)
    run, cfg = load_config(str(out / "config.yaml"), ["trainer.max_steps=3"])
    with pytest.raises(
        DataError, match=r"validated on before, now not .*\['e.txt'\].*not before: \['z.txt'\]"
    ):
        train(run, cfg, resume=True)
    checkpoint = out / "last.safetensors"
    with pytest.raises(DataError, match=r"Evaluating its validation windows would use text the run trained"):
        evaluation_windows(checkpoint, load_module(checkpoint), [], 32)
    (data / ADDED).unlink()  # the data as it was: the resume goes on, without a word
    with caplog.at_level(logging.WARNING, logger="innerloop.train.data"):
        assert train(run, cfg, resume=True).checkpoint.is_file()
    assert "training text differs" not in caplog.text

    (data / "c.txt").write_text("an edited training file\n" * 40)  # the split stays; the text does not
    run, cfg = load_config(str(out / "config.yaml"), ["trainer.max_steps=4"])
    with caplog.at_level(logging.WARNING, logger="innerloop.train.data"):
        train(run, cfg, resume=True)
    assert "the training text differs from the one the checkpoint was trained on" in caplog.text
