"""Review s29c: the "compare TTT layers against attention on my own data" journey (own text files, train,
params, eval, compare, interrupt and resume, hostile inputs). Each test is one finding."""

from __future__ import annotations

import pytest

from innerloop.config.load import ConfigError
from innerloop.train.run_dir import RunDirError


@pytest.mark.parametrize("name", ["config.yaml", "last.safetensors", "loss_by_position.png"])
def test_an_output_name_that_is_a_folder_is_refused_naming_it(tmp_path, name):
    """A folder where a run writes one of its files (here beside a run's checkpoint, so --overwrite is
    what a user tries) made `innerloop train --overwrite` end in a traceback (IsADirectoryError from
    removing its own config.yaml, after writing it failed): --overwrite sets aside only files, so the run
    wrote onto the folder. It is one error naming the out_dir and the folder, and the folder is kept."""
    from innerloop.train.run_dir import refuse_outputs_not_files

    out = tmp_path / "run"
    out.mkdir()
    (out / name).mkdir()
    (out / name / "mine.txt").write_text("keep")
    with pytest.raises(RunDirError, match=rf"out_dir=.*{name}.* is a folder"):
        refuse_outputs_not_files(out)
    assert (out / name / "mine.txt").read_text() == "keep"
    assert issubclass(RunDirError, ConfigError)  # the CLI prints it as one error line, status 2


def test_overwrite_into_an_out_dir_whose_config_yaml_is_a_folder_is_one_error(tmp_path, capsys):
    """The CLI end to end: one error line, exit status 2, no traceback, the user's folder untouched."""
    from innerloop.cli import main

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").mkdir()
    (out / "config.yaml" / "mine.txt").write_text("keep")
    (out / "last.safetensors").write_bytes(b"not a checkpoint")
    argv = ["train", "--config", "tiny", "--overwrite", f"out_dir={out}", "trainer.max_steps=1",
            "trainer.progress_bar=false", "data.seq_len=16", "data.batch_size=2", "data.val_batches=1"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "config.yaml" in err and "is a folder" in err and "Traceback" not in err
    assert (out / "config.yaml" / "mine.txt").read_text() == "keep"
    assert (out / "last.safetensors").read_bytes() == b"not a checkpoint"


@pytest.mark.parametrize("kind", ["file out_dir", "folder config.yaml"])
def test_resume_names_a_file_out_dir_or_a_folder_config(tmp_path, capsys, kind):
    """`--resume out_dir=X` said "no saved config at 'X/config.yaml'; is out_dir a run?" both when X is a
    file and when X/config.yaml is a folder: neither is missing. The error says what is there."""
    from innerloop.cli import main

    if kind == "file out_dir":
        out = tmp_path / "notes.txt"
        out.write_text("mine")
        expected = "is a file, not a run's folder"
    else:
        out = tmp_path / "run"
        (out / "config.yaml").mkdir(parents=True)
        expected = "is a folder, not a run's config file"
    assert main(["train", "--resume", f"out_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert "out_dir" in err and expected in err, err
    assert kind != "file out_dir" or out.read_text() == "mine"


def test_tokenizer_train_overwrite_onto_a_folder_is_one_error(tmp_path, capsys):
    """`innerloop tokenizer train --overwrite` into a --out whose tokenizer.json is a folder wrote
    tokenizer_config.json and then ended in an IsADirectoryError traceback (a half-written pair). It is
    one error naming --out and the folder, before anything is written."""
    from innerloop.cli import main

    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 20)
    out = tmp_path / "tok"
    (out / "tokenizer.json").mkdir(parents=True)
    argv = ["tokenizer", "train", "--vocab-size", "260", "--out", str(out), "--overwrite", str(text)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "tokenizer.json" in err and "is a folder" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json"]


def test_an_atomic_write_onto_a_folder_is_a_user_error_naming_it(tmp_path):
    """`innerloop eval --out D` (and compare's) where D holds a folder of the output's name ended in a
    traceback, IsADirectoryError naming the temporary file: every atomic write now refuses a folder in its
    target's place before writing, naming the target, and the CLI prints that as one error line."""
    from innerloop.cli import _is_user_error
    from innerloop.data.atomic import atomic_write_text

    target = tmp_path / "eval_last-1a2b3c4d_default-val_T128_n128.csv"
    target.mkdir()
    (target / "mine.txt").write_text("keep")
    with pytest.raises(IsADirectoryError) as info:
        atomic_write_text(target, "start,end,loss\n")
    message = str(info.value)
    assert str(target) in message and "is a folder" in message and ".tmp" not in message
    assert message.startswith("cannot write")  # one line for the CLI, no "[Errno 21]"
    assert _is_user_error(info.value)
    assert (target / "mine.txt").read_text() == "keep"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no temporary file left
