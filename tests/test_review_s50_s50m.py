"""Review s50m: ``evaluate`` and ``compare`` called from Python name their own parameters in errors.

Their errors named the command line's options (``--seq-len``, ``--data``, ``--split``, ``--held-out``,
``--baseline``, ``--resamples``, ``--seed``, ``--no-ttt``) to a Python caller, who gave ``seq_len=``,
``paths=``, ``split=``... One mechanism now names them (:func:`innerloop.config.load.argument_name`,
:func:`~innerloop.config.load.given_argument`): the Python parameter, unless the command line runs the
call within :func:`~innerloop.config.load.command_line_options`, which ``innerloop eval`` and
``innerloop compare`` do (their messages are as before: other tests pin them).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from innerloop.cli import EVAL_AND_COMPARE_OPTIONS, main
from innerloop.config.load import (
    ConfigError,
    argument_name,
    command_line_options,
    given_argument,
    load_config,
    save_config,
)
from innerloop.train.checkpoint import save_checkpoint
from innerloop.train.compare import compare
from innerloop.train.data import DataError, dataset_tokens
from innerloop.train.module import LanguageModelModule
from innerloop.train.run import evaluate

MODEL = ["model.hidden_size=16", "model.num_heads=2", "model.num_layers=1", "model.intermediate_size=32"]


def _run(folder: Path, mixer: str, data: list[str]) -> Path:
    """A run folder as `innerloop train` leaves it: config.yaml and an (untrained) last.safetensors."""
    extra = ["model.ttt.mini_batch_size=4"] if mixer == "ttt" else ["model.window=4"]
    text = (
        ["data.seq_len=16", "data.batch_size=2", "data.val_batches=1"]
        if "data.name=recall" not in data
        else []
    )
    overrides = [*MODEL, f"model.mixer={mixer}", *extra, *text, f"out_dir={folder}", *data]
    run, cfg = load_config("tiny", overrides)
    torch.manual_seed(0)
    seq_len = 16 if run.data.name != "recall" else None
    module = LanguageModelModule(model=asdict(run.model), seq_len=seq_len)
    tree = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "global_step": 0}
    save_checkpoint(tree, folder / "last.safetensors")
    save_config(cfg, folder / "config.yaml")
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("s50m")
    corpus = root / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over a lazy dog " * 40)
    text = [f"data.paths=[{corpus}]"]
    return {
        "corpus": corpus,
        "ttt": _run(root / "ttt", "ttt", text),
        "swa": _run(root / "swa", "swa", text),
        "recall": _run(root / "recall", "ttt", ["data.name=recall"]),
    }


def _cli_error(capsys, arguments: list[str]) -> str:
    assert main(arguments) == 2
    return capsys.readouterr().err


def test_the_names_are_the_parameters_from_python_and_the_options_within_the_command_line() -> None:
    assert (argument_name("seq_len"), given_argument("split", "x")) == ("seq_len", "split='x'")
    assert given_argument("paths", "FILES", placeholder=True) == "paths=FILES"
    with pytest.raises(RuntimeError), command_line_options(EVAL_AND_COMPARE_OPTIONS):
        assert (argument_name("seq_len"), given_argument("split", "x")) == ("--seq-len", "--split 'x'")
        assert given_argument("paths", "FILES", placeholder=True) == "--data FILES"
        raise RuntimeError  # an error inside leaves the names as they were
    assert argument_name("paths") == "paths"


@pytest.mark.slow  # a checkpoint loaded per call (0.2-0.5 s)
def test_split_without_data_names_split_and_paths_from_python(runs) -> None:
    with pytest.raises(ConfigError) as err:
        evaluate(runs["ttt"] / "last.safetensors", split="test", progress_bar=False)
    assert "split='test' names a split of paths, and no paths was given" in str(err.value)
    with pytest.raises(ConfigError) as err:
        compare([runs["ttt"]], split="test")
    assert "split='test' names a split of paths, and no paths was given" in str(err.value)


def test_split_without_data_names_the_options_on_the_command_line(runs, capsys) -> None:
    line = _cli_error(capsys, ["eval", str(runs["ttt"] / "last.safetensors"), "--split", "test"])
    assert "--split 'test' names a split of --data, and no --data was given" in line


@pytest.mark.slow  # a checkpoint loaded per call (0.2-0.5 s)
def test_split_of_text_and_held_out_test_with_data_name_the_parameters(runs, tmp_path) -> None:
    checkpoint, paths = runs["ttt"] / "last.safetensors", [str(runs["corpus"])]
    with pytest.raises(ConfigError) as err:
        evaluate(checkpoint, paths, split="test", progress_bar=False)
    assert "split='test' names a split of records" in str(err.value)
    assert "this model's paths is read as text" in str(err.value) and "leave split out" in str(err.value)
    with pytest.raises(ConfigError) as err:
        evaluate(checkpoint, paths, held_out="test", progress_bar=False)
    assert "held_out='test' scores the run's own test windows, and paths gives other text" in str(err.value)
    with pytest.raises(ConfigError) as err:
        evaluate(checkpoint, held_out="test", progress_bar=False)
    assert "held_out='test': the run (data.test_fraction=0)" in str(err.value)
    assert "(held_out='val')" in str(err.value) and "--" not in str(err.value)


def test_held_out_test_with_data_names_the_options_on_the_command_line(runs, capsys) -> None:
    checkpoint = str(runs["ttt"] / "last.safetensors")
    line = _cli_error(capsys, ["eval", checkpoint, "--data", str(runs["corpus"]), "--held-out", "test"])
    assert "--held-out test scores the run's own test windows, and --data gives other text" in line
    line = _cli_error(capsys, ["eval", checkpoint, "--held-out", "test"])
    assert "--held-out test: the run (data.test_fraction=0)" in line and "(--held-out val)" in line


def test_seq_len_errors_name_seq_len_from_python(runs) -> None:
    with pytest.raises(ConfigError) as err:
        evaluate(runs["recall"] / "last.safetensors", seq_len=8, progress_bar=False)
    assert "evaluate it without seq_len" in str(err.value) and "--" not in str(err.value)
    with pytest.raises(DataError) as err:  # the validation text holds no window of 4000 bytes
        evaluate(runs["ttt"] / "last.safetensors", seq_len=4000, progress_bar=False)
    assert "a shorter seq_len" in str(err.value) and "--seq-len" not in str(err.value)
    with pytest.raises(DataError) as err:  # nor does the file given
        evaluate(runs["ttt"] / "last.safetensors", [str(runs["corpus"])], seq_len=4000, progress_bar=False)
    assert f"paths={str(runs['corpus'])!r}" in str(err.value) and "--" not in str(err.value)


@pytest.mark.slow  # a checkpoint loaded per call (0.2-0.5 s)
def test_seq_len_errors_name_the_option_on_the_command_line(runs, capsys) -> None:
    checkpoint = str(runs["ttt"] / "last.safetensors")
    line = _cli_error(capsys, ["eval", str(runs["recall"] / "last.safetensors"), "--seq-len", "8"])
    assert "evaluate it without --seq-len" in line
    line = _cli_error(capsys, ["eval", checkpoint, "--seq-len", "4000"])
    assert "a shorter --seq-len" in line
    line = _cli_error(capsys, ["eval", checkpoint, "--data", str(runs["corpus"]), "--seq-len", "4000"])
    assert f"--data {str(runs['corpus'])!r}" in line and "a shorter --seq-len" in line


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({"baseline": "nope"}, "baseline='nope' is none of the models compared"),
        ({"baseline": 1}, "baseline must be a model's name or path, got 1"),
        ({"seq_lens": [0]}, "seq_lens must be one or more integers >= 1"),
        ({"resamples": 0}, "resamples must be an integer >= 1, got 0"),
        ({"resamples": 10**9}, "resamples=1000000000 must be an integer in [1, "),
        ({"seed": "0"}, "seed must be an integer, got '0'"),
        ({"seed": 2**64}, "seed=18446744073709551616 must be an integer in"),
        ({"no_ttt": True}, "no_ttt: none of the models compared has test-time training"),
    ],
    ids=lambda a: str(a)[:30],
)
def test_compare_errors_name_its_parameters_from_python(runs, arguments, expected) -> None:
    with pytest.raises(ConfigError) as err:
        compare([runs["swa"], runs["swa"] / "last.safetensors"], **arguments)
    assert expected in str(err.value) and "--" not in str(err.value)


@pytest.mark.slow  # a checkpoint loaded per call (0.2-0.5 s)
def test_compare_errors_name_the_options_on_the_command_line(runs, capsys, tmp_path) -> None:
    command = ["compare", str(runs["swa"]), str(runs["ttt"]), "--out", str(tmp_path / "cmp")]
    line = _cli_error(capsys, [*command, "--baseline", "nope"])
    assert "--baseline 'nope' is none of the models compared" in line
    line = _cli_error(capsys, ["compare", str(runs["swa"]), "--out", str(tmp_path / "c2"), "--no-ttt"])
    assert "--no-ttt: none of the models compared has test-time training" in line


@pytest.mark.slow  # saves a DatasetDict and reads it (1 s)
def test_the_records_of_paths_name_paths_and_split_from_python_and_the_options_on_the_command_line(
    tmp_path,
) -> None:
    """``dataset_tokens`` (evaluate's and compare's ``paths`` of a data.name='hf' run) named ``--data``
    and ``--split`` to a Python caller too."""
    datasets = pytest.importorskip("datasets")
    saved = tmp_path / "both"
    splits = {name: datasets.Dataset.from_dict({"text": [name]}) for name in ("test", "train")}
    datasets.DatasetDict(splits).save_to_disk(str(saved))
    for split, said in [(None, "name the one to read with split"), ("valid", "split='valid' is not a split")]:
        with pytest.raises(DataError) as err:
            dataset_tokens([str(saved)], "text", split=split)
        assert str(err.value).startswith(f"paths={[str(saved)]!r}, read as") and said in str(err.value)
        assert "--" not in str(err.value)
    with command_line_options(EVAL_AND_COMPARE_OPTIONS), pytest.raises(DataError) as err:
        dataset_tokens([str(saved)], "text", split="valid")
    assert str(err.value).startswith(f"--data {[str(saved)]!r}, read as") and "--split 'valid'" in str(
        err.value
    )
