"""Review s56u: the command line under hostile input (repeated flags, the examples its help prints)."""

from __future__ import annotations

import shlex

import pytest

from innerloop.cli import _TRAIN_EPILOG, _parse_intermixed, _parser
from innerloop.config.load import load_config


@pytest.mark.parametrize(
    ("argv", "dest", "expected"),
    [
        (["eval", "ck", "--data", "a.txt", "--data", "b.txt"], "data", ["a.txt", "b.txt"]),
        (["compare", "x", "y", "--data", "a.txt", "--data", "b", "c"], "data", ["a.txt", "b", "c"]),
        (["compare", "x", "y", "--seq-len", "8", "--seq-len", "16"], "seq_len", [8, 16]),
    ],
)
def test_a_repeated_option_of_several_values_keeps_every_value(argv, dest, expected) -> None:
    """``eval ck --data a.txt --data b.txt`` evaluated b.txt alone and said nothing (argparse's store
    replaces the first list): a perplexity of other data than asked. Each use now adds its values."""
    assert getattr(_parse_intermixed(_parser(), argv), dest) == expected


def test_an_option_of_several_values_given_once_or_not_keeps_its_default() -> None:
    parser = _parser()
    assert _parse_intermixed(parser, ["eval", "ck"]).data == []
    assert _parse_intermixed(parser, ["compare", "x", "y"]).seq_len is None
    assert _parse_intermixed(parser, ["compare", "x", "y"]).data == []
    assert _parse_intermixed(parser, ["compare", "x", "y", "--seq-len", "8", "16"]).seq_len == [8, 16]


@pytest.mark.slow  # reason: the first config loads import the trainer's checks (~5 s on a loaded machine)
def test_every_train_example_the_help_prints_parses_and_loads() -> None:
    """The examples of ``innerloop train --help``'s epilog parse and give a valid config (parse only: a
    run takes seconds)."""
    examples = [line.strip() for line in _TRAIN_EPILOG.splitlines() if line.strip().startswith("innerloop ")]
    assert len(examples) == 3
    for example in examples:
        args = _parse_intermixed(_parser(), shlex.split(example)[1:])
        assert args.command == "train"
        load_config(args.config or "tiny", args.overrides)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny byte-level model's checkpoint."""
    from innerloop.train import LanguageModelModule, save_checkpoint

    small = {"hidden_size": 16, "num_heads": 2, "num_layers": 2, "intermediate_size": 32}
    module = LanguageModelModule(model=small, num_position_buckets=4, seq_len=32)
    path = tmp_path_factory.mktemp("model") / "last.safetensors"
    save_checkpoint({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return str(path)


def _run_folder(folder, checkpoint_name: str = "last.safetensors"):
    folder.mkdir()
    (folder / "config.yaml").write_text("data:\n  seq_len: 32\n")
    (folder / checkpoint_name).write_bytes(b"\x00" * 64)
    return folder


@pytest.mark.parametrize("checkpoint_name", ["last.safetensors", ".last.safetensors.pending"])
@pytest.mark.parametrize("command", ["eval", "compare"])
def test_a_run_folder_or_checkpoint_given_as_data_is_refused(
    capsys, tmp_path, checkpoint, command, checkpoint_name
) -> None:
    """``compare runA --data code.py runB`` (a model after --data) compared runA alone on code.py and
    runB's files, its checkpoint's bytes read as text: a perplexity of weights, exit 0. A --data entry
    that is a run folder or a checkpoint is refused, naming it (before any model is loaded)."""
    from innerloop.cli import main

    (tmp_path / "code.py").write_text("x = 1\n" * 50)
    run = _run_folder(tmp_path / "runB", checkpoint_name)
    models = [checkpoint, checkpoint] if command == "compare" else [checkpoint]
    small = ["--seq-len", "8", "--batches", "1", "--batch-size", "1", "--out", str(tmp_path / "out")]
    for entry in (str(run), str(run / checkpoint_name)):
        if entry.endswith(".pending"):
            continue  # a hidden file: never read as data
        assert main([command, *models, *small, "--data", str(tmp_path / "code.py"), entry]) == 2
        line = capsys.readouterr().err.strip()
        assert line.startswith(f"innerloop {command}: error: --data {entry!r}"), line
        assert "\n" not in line
        assert "checkpoint" in line


def test_a_data_folder_of_text_is_still_read(tmp_path) -> None:
    from innerloop.cli import _check_data_patterns

    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("hello\n")
    _check_data_patterns([str(tmp_path / "texts"), str(tmp_path / "texts" / "*.txt")])


def test_params_overrides_may_come_after_its_flags_as_trains_do() -> None:
    """``innerloop params model.hidden_size=32 --budget 100000 model.num_layers=3`` said "unrecognized
    arguments: model.num_layers=3" (train reads overrides before and after its flags)."""
    argv = ["params", "model.hidden_size=32", "--budget", "100000", "model.num_layers=3"]
    args = _parse_intermixed(_parser(), argv)
    assert args.overrides == ["model.hidden_size=32", "model.num_layers=3"]
    assert args.budget == 100000


@pytest.mark.parametrize(
    "entry, named",
    [
        ("run", "reads the checkpoint"),  # a run folder: last.safetensors below it
        ("run/*", "reads the checkpoint"),  # a glob matching it
        ("run/last.safetensors", "reads the checkpoint"),  # the checkpoint named
        ("killed", "is a run folder"),  # only the hidden pending checkpoint: config.yaml would be read
    ],
)
def test_a_data_paths_entry_reading_a_model_is_refused(tmp_path, monkeypatch, entry: str, named: str) -> None:
    # s56u: 'innerloop train data.paths=[runs/a]' trained a byte-level model on the run's config.yaml and
    # last.safetensors bytes (and held the checkpoint out as validation text), exit 0 (eval/compare's
    # --data refused it since ea5790e6; the data layer that both read now refuses it for every caller).
    import re

    from innerloop.data.text import DataError, resolve_files

    for folder, checkpoint in (("run", "last.safetensors"), ("killed", ".last.safetensors.pending")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "config.yaml").write_text("model: {}\n")
        (tmp_path / folder / checkpoint).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("text")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        DataError, match=rf"data.paths entry '{re.escape(entry)}' {named}.*a model is not data"
    ):
        resolve_files([entry])
    assert resolve_files(["corpus"]) == [tmp_path / "corpus" / "a.txt"]
