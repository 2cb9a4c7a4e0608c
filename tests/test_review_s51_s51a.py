"""Review s51a: every message names an argument as its caller gave it -- the whole kind.

s50m made ``evaluate`` and ``compare`` name ``seq_len=`` / ``--seq-len`` as their caller gave it
(:func:`innerloop.config.load.argument_name`, :func:`~innerloop.config.load.given_argument`). Its
siblings still named the command line to a Python caller: ``train(run, resume=True, overwrite=True)``
said "--resume and --overwrite contradict each other", a run folder refused "pass --resume ... --overwrite",
a stopped run said "continue with `innerloop train --resume ...`", compare's few-resamples note said "use
--resamples 400", an evaluation's window count "(--batches x --batch-size)", an export "pass --overwrite";
and compare's too-short text named ``seq_len`` where compare's parameter is ``seq_lens``. Flags now have
a flag form (:func:`~innerloop.config.load.given_flag`: ``--resume`` / ``resume=True``), a function
called for another names the caller's argument
(:func:`~innerloop.config.load.arguments_of_the_caller`), and ``innerloop train`` / ``export`` run within
:func:`~innerloop.config.load.command_line_options` (their messages are as before: other tests pin them).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from innerloop.cli import EXPORT_OPTIONS, TRAIN_OPTIONS, main
from innerloop.config.load import (
    ConfigError,
    argument_name,
    arguments_of_the_caller,
    check_resume_or_overwrite,
    command_line_options,
    from_command_line,
    given_flag,
    load_config,
    save_config,
)
from innerloop.hf.export import ExportError, check_target
from innerloop.train.bootstrap import few_resamples_note
from innerloop.train.checkpoint import save_checkpoint
from innerloop.train.compare import compare, length_key
from innerloop.train.data import DataError, checked_window_sizes
from innerloop.train.module import LanguageModelModule
from innerloop.train.run import continuing_call, resume_command, train
from innerloop.train.run_dir import RunDirError, refuse_previous_run

MODEL = ["model.hidden_size=16", "model.num_heads=2", "model.num_layers=1", "model.intermediate_size=32"]


def _overrides(folder: Path, corpus: Path) -> list[str]:
    return [
        *MODEL,
        "model.ttt.mini_batch_size=4",
        "data.seq_len=16",
        "data.batch_size=2",
        "data.val_batches=1",
        f"data.paths=[{corpus}]",
        f"out_dir={folder}",
    ]


def _run(folder: Path, corpus: Path, checkpoint: bool = True) -> Path:
    """A run folder as `innerloop train` leaves it: config.yaml and an (untrained) last.safetensors."""
    run, cfg = load_config("tiny", _overrides(folder, corpus))
    if checkpoint:
        torch.manual_seed(0)
        module = LanguageModelModule(model=asdict(run.model), seq_len=16)
        tree = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "global_step": 0}
        save_checkpoint(tree, folder / "last.safetensors")
    save_config(cfg, folder / "config.yaml")
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("s51a") / "corpus.txt"
    path.write_text("the quick brown fox jumps over a lazy dog " * 40)
    return path


def test_a_flag_is_named_as_its_caller_turns_it_on() -> None:
    assert (given_flag("resume"), from_command_line("resume")) == ("resume=True", False)
    with command_line_options(TRAIN_OPTIONS):
        assert (given_flag("resume"), from_command_line("resume")) == ("--resume", True)
        with command_line_options({"preset_or_file": "--config"}):  # nested: adds, keeps the outer
            assert (given_flag("overwrite"), argument_name("preset_or_file")) == ("--overwrite", "--config")
        with arguments_of_the_caller({"seq_len": "seq_lens"}):  # seq_lens is no option here
            assert argument_name("seq_len") == "seq_lens"
    with arguments_of_the_caller({"seq_len": "seq_lens"}):
        assert argument_name("seq_len") == "seq_lens"
    with command_line_options({"seq_lens": "--seq-len"}), arguments_of_the_caller({"seq_len": "seq_lens"}):
        assert argument_name("seq_len") == "--seq-len"
    assert argument_name("seq_len") == "seq_len"


def test_resume_and_overwrite_together_name_the_parameters_from_python(tmp_path, corpus) -> None:
    run, cfg = load_config("tiny", _overrides(tmp_path / "run", corpus))
    with pytest.raises(ConfigError) as err:
        train(run, cfg, resume=True, overwrite=True)
    assert "resume=True and overwrite=True contradict each other" in str(err.value)
    with command_line_options(TRAIN_OPTIONS), pytest.raises(ConfigError) as err:
        check_resume_or_overwrite(True, True)
    assert "--resume and --overwrite contradict each other" in str(err.value)


def test_a_folder_holding_a_run_names_resume_and_overwrite_as_the_caller_gave_them(
    tmp_path, corpus, capsys
) -> None:
    folder = _run(tmp_path / "run", corpus)
    run, cfg = load_config("tiny", _overrides(folder, corpus))
    with pytest.raises(RunDirError) as err:
        train(run, cfg)
    message = str(err.value)
    assert "pass resume=True to continue it, overwrite=True to replace it" in message and "--" not in message
    assert main(["train", *_overrides(folder, corpus)]) == 2
    assert "pass --resume to continue it, --overwrite to replace it" in capsys.readouterr().err
    (folder / "last.safetensors").unlink()  # a run killed before its first checkpoint
    with pytest.raises(RunDirError) as err:
        refuse_previous_run(folder)
    assert "pass overwrite=True to start the run again there" in str(err.value)


def test_a_resume_without_a_checkpoint_names_the_parameters_from_python(tmp_path, corpus) -> None:
    folder = _run(tmp_path / "run", corpus, checkpoint=False)
    run, cfg = load_config("tiny", _overrides(folder, corpus))
    with pytest.raises(Exception) as err:  # noqa: PT011 -- CheckpointError; the message is the point
        train(run, cfg, resume=True)
    message = str(err.value)
    assert message.startswith("resume=True: there is no checkpoint") and "--" not in message
    assert message.endswith("start the run again with overwrite=True")


def test_the_call_that_continues_a_run_is_the_callers(tmp_path, corpus) -> None:
    folder = _run(tmp_path / "my run", corpus)
    call = continuing_call(folder, " optim.lr=0.001")
    assert call.startswith("`train(*load_config(") and call.endswith(", resume=True)`") and "--" not in call
    run, _ = eval(call.strip("`").removeprefix("train(*").removesuffix(", resume=True)"))  # it runs
    assert (run.out_dir, run.optim.lr) == (str(folder), 0.001)
    with command_line_options(TRAIN_OPTIONS):
        assert continuing_call(folder, " optim.lr=0.001") == f"`{resume_command(folder, ' optim.lr=0.001')}`"


def test_the_few_resamples_note_names_resamples_as_the_caller_gave_it() -> None:
    note = few_resamples_note(10, 0.95)
    assert note is not None and "use resamples=400 or more" in note and "--" not in note
    with command_line_options({"resamples": "--resamples"}):
        assert "use --resamples 400 or more" in str(few_resamples_note(10, 0.95))


def test_too_many_windows_name_batches_and_batch_size_as_the_caller_gave_them() -> None:
    with pytest.raises(DataError) as err:
        checked_window_sizes(batch_size=10**5, batches=10**5)
    assert str(err.value).startswith("batches=100000 x batch_size=100000 = ") and "--" not in str(err.value)
    with command_line_options({"batches": "--batches", "batch_size": "--batch-size"}):
        with pytest.raises(DataError) as err:
            checked_window_sizes(batch_size=10**5, batches=10**5)
    assert str(err.value).startswith("--batches 100000 x --batch-size 100000 = ")


def test_an_export_names_out_dir_and_overwrite_as_the_caller_gave_them(tmp_path) -> None:
    (tmp_path / "mine.txt").write_text("x")
    with pytest.raises(ExportError) as err:
        check_target(tmp_path, overwrite=False)
    assert f"out_dir {str(tmp_path)!r} is not empty; pass overwrite=True" in str(err.value)
    with command_line_options(EXPORT_OPTIONS), pytest.raises(ExportError) as err:
        check_target(tmp_path, overwrite=True)
    assert f"OUT_DIR {str(tmp_path)!r} holds files that are not an innerloop export" in str(err.value)
    assert "--overwrite replaces only an earlier export" in str(err.value)


@pytest.mark.slow  # two checkpoints loaded (0.5 s)
def test_compare_names_seq_lens_and_resamples_from_python(tmp_path, corpus) -> None:
    folder = _run(tmp_path / "run", corpus)
    with pytest.raises(DataError) as err:  # the validation text holds no window of 4000 bytes
        compare([folder, folder / "last.safetensors"], seq_lens=[4000])
    assert "a shorter seq_lens" in str(err.value) and "--" not in str(err.value)
    comparison = compare([folder, folder / "last.safetensors"], resamples=10, batch_size=2, batches=1)
    assert any("use resamples=400 or more" in note for note in comparison.notes)


def test_the_scores_key_holds_the_thread_count(monkeypatch) -> None:
    """Measured (tiny TTT models, hidden 128, 16 windows of 64 bytes, s51a): the torch path's per-token
    losses at 3 threads differ bitwise from those at 1, 2 and 4 (TTT-MLP's CPU kernel path too), so a
    compare run again at another thread count must not reuse the kept scores as those it would compute.
    ``INNERLOOP_KEEP_SCAN_BUFFERS`` changed no bit on any path (it is for the training scans): not in it."""
    inputs = torch.arange(32).reshape(2, 16)
    keys = set()
    for threads in (2, 3):
        monkeypatch.setattr(torch, "get_num_threads", lambda threads=threads: threads)
        keys.add(length_key([], inputs, inputs, 2, 4))
    monkeypatch.setenv("INNERLOOP_KEEP_SCAN_BUFFERS", "0")
    keys.add(length_key([], inputs, inputs, 2, 4))
    assert len(keys) == 2
