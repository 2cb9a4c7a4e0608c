"""Review s35c: no lost work, and one clear line before any long work (issue 9, issue 3's training)."""

from __future__ import annotations

import argparse
import errno
import importlib
import importlib.util
import json
import os
import shutil
import stat
import sys
from collections import namedtuple
from pathlib import Path
from typing import Any

import pytest
from lm_testing import TINY

from innerloop.cli import main
from innerloop.config import load_config
from innerloop.data.atomic import atomic_write_text
from innerloop.models import ModelConfig, build_model
from innerloop.train import train
from innerloop.train.module import save_model_checkpoint
from innerloop.train.run_dir import RunDirError

REPO = Path(__file__).resolve().parents[1]
run_module = importlib.import_module("innerloop.train.run")  # `innerloop.train.run` the attribute is not it

_Usage = namedtuple("_Usage", "total used free")


@pytest.mark.slow  # builds the run's LanguageModelModule from a preset: ~0.3 s
def test_a_disk_without_room_for_one_checkpoint_is_refused_before_training(tmp_path, monkeypatch) -> None:
    """A full disk was found at the first checkpoint, after trainer.checkpoint_every steps of work
    (safetensors' 'No space left on device'); now one line before the Trainer is built or a step is taken,
    and nothing is left in out_dir but what was there."""
    (tmp_path / "corpus.txt").write_text("abcdefgh " * 400)
    out = tmp_path / "run"
    run, cfg = load_config("tiny", [*TINY, f"data.paths=[{tmp_path / 'corpus.txt'}]", f"out_dir={out}"])
    monkeypatch.setattr(shutil, "disk_usage", lambda path: _Usage(10**9, 10**9 - 4096, 4096))
    monkeypatch.setattr(run_module, "build_trainer", lambda *a, **k: pytest.fail("built a Trainer"))
    refused = (
        r"out_dir='.*run' has 4,096 bytes free, and a checkpoint of this model needs at least [\d,]+; free"
    )
    with pytest.raises(RunDirError, match=refused):
        train(run, cfg)
    assert not (out / "config.yaml").exists() and not (out / "last.safetensors").exists()


def test_an_atomic_write_syncs_its_folder_after_the_rename(tmp_path, monkeypatch) -> None:
    """The file was fsync-ed before the rename, the folder never after it: a power cut could lose the
    rename (a resumed run then finds the previous checkpoint, not the one its log says it wrote)."""
    synced: list[bool] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    atomic_write_text(tmp_path / "config.yaml", "a: 1\n")
    assert synced == [False, True]  # the temporary file, then the folder holding its new name


def load_science() -> Any:
    """benchmarks/science.py as a module (registered first: its dataclasses look their module up)."""
    if "science_benchmark" not in sys.modules:
        spec = importlib.util.spec_from_file_location("science_benchmark", REPO / "benchmarks" / "science.py")
        sys.modules[spec.name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules["science_benchmark"]


def _science_study(out: Path, study: str) -> argparse.Namespace:
    points = ["linear"] if study == "sweep" else None  # compare reads the sweep's point 'linear'
    return argparse.Namespace(study=study, points=points, out=str(out), quick=True, jobs=1)


@pytest.mark.slow  # run_study sizes the study's models to its parameter budget (budget_of): ~0.5 s
def test_a_study_refuses_to_read_back_a_point_another_command_trained(tmp_path) -> None:
    """`science.py sweep --out D` after `science.py sweep --quick --out D` read the 3-step quick result
    back as the full point (val loss 5.036 at 64-byte windows, in the full study's table), and so did
    `compare`, which reads sweep points; now one line before anything trains."""
    science = load_science()
    recorded = tmp_path / "runs" / "linear" / "result.json"
    recorded.parent.mkdir(parents=True)
    recorded.write_text(json.dumps({"name": "linear", "command": "innerloop train --config tiny out_dir=x"}))
    for study in ("sweep", "compare"):
        with pytest.raises(SystemExit, match=r"holds a result of point 'linear' trained by another command"):
            science.run_study(_science_study(tmp_path, study))


@pytest.mark.slow  # run_study sizes the study's models to its parameter budget (budget_of): ~0.5 s
def test_a_study_refuses_a_finished_run_another_command_trained(tmp_path) -> None:
    """A finished run without its result.json (the driver stopped after the training) was collected and
    recorded under this study's command; its train.log now says which command trained it."""
    science = load_science()
    run_dir = tmp_path / "runs" / "linear"
    run_dir.mkdir(parents=True)
    (run_dir / "train.log").write_text(
        "command: innerloop train --config tiny out_dir=x\n...\nloss by position: x\n"
    )
    (run_dir / "loss_by_position.csv").write_text("start,end,loss\n0,64,5.0\n")
    with pytest.raises(SystemExit, match=r"holds a result of point 'linear' trained by another command"):
        science.run_study(_science_study(tmp_path, "sweep"))


@pytest.mark.slow  # one Lightning validation of a tiny model: ~0.5 s
def test_an_evaluation_whose_files_cannot_be_written_still_gives_its_numbers(tmp_path, monkeypatch) -> None:
    """A full disk at the end of `innerloop eval` lost the evaluation: the error named the file, and the
    perplexity (printed after the files were written) was never shown."""
    model = build_model(ModelConfig(hidden_size=16, num_heads=2, num_layers=1, intermediate_size=32))
    checkpoint = save_model_checkpoint(model, tmp_path / "m.safetensors")
    (tmp_path / "text.txt").write_text("abcdefgh " * 200)

    def full(path, *args):
        raise OSError(errno.ENOSPC, f"writing {str(path)!r} failed: No space left on device")

    monkeypatch.setattr(run_module, "write_loss_by_position_csv", full)
    with pytest.raises(
        OSError, match=r"No space left on device; the evaluation had finished: perplexity \d+\.\d{3}"
    ):
        run_module.evaluate(checkpoint, [str(tmp_path / "text.txt")], 16, 2, 1, tmp_path / "out", False)


def test_a_comparison_prints_its_table_before_writing_its_files(tmp_path, monkeypatch, capsys) -> None:
    """`innerloop compare` printed its table only after writing its files: a full disk lost minutes of
    evaluation. The evaluation is stubbed here: what is checked is the order."""
    import innerloop.train.compare as compare_module

    def full(comparison, out):
        raise OSError(errno.ENOSPC, f"writing {str(out)!r} failed: No space left on device")

    monkeypatch.setattr(compare_module, "compare", lambda *args, **kwargs: "the comparison")
    monkeypatch.setattr(compare_module, "windows_line", lambda comparison: "the windows")
    monkeypatch.setattr(compare_module, "format_table", lambda comparison: "| the table |\n")
    monkeypatch.setattr(compare_module, "write_comparison", full)
    assert main(["compare", str(tmp_path / "a.safetensors"), "--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert "| the table |" in captured.out and "No space left on device" in captured.err


@pytest.mark.parametrize("command", [["diagnose", "{missing}"], ["growth", "{missing}", "{missing}"]])
def test_science_inspections_refuse_a_missing_checkpoint_in_one_line(tmp_path, capsys, command) -> None:
    """`science.py diagnose` / `growth` of a missing checkpoint or run folder ended in a traceback
    (CheckpointError, ConfigError); `reference` of a missing ttt.py too (FileNotFoundError)."""
    science = load_science()
    missing = str(tmp_path / "missing.safetensors")
    with pytest.raises(SystemExit) as exit_info:
        science.main([word.format(missing=missing) for word in command])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and missing in error and f": error: {command[0]}: " in error


@pytest.mark.parametrize("script", ["recall", "family"])
def test_benchmark_overrides_a_preset_refuses_are_one_line_before_any_run(script, tmp_path, capsys) -> None:
    """`recall.py model.hiden=3` and `family.py model.hidden_size=abc` ended in a ConfigError traceback,
    and an override only a later preset refuses surfaced after the runs before it had trained."""
    spec = importlib.util.spec_from_file_location(
        f"review_s35c_{script}", REPO / "benchmarks" / f"{script}.py"
    )
    module = sys.modules.setdefault(
        spec.name, importlib.util.module_from_spec(spec)
    )  # its dataclasses look it up
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(["--out", str(tmp_path / "out"), "model.hiden=3"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and ": error: " in error and "unknown config key 'model.hiden'" in error
    assert not (tmp_path / "out").exists()


def test_an_evaluation_of_data_rewritten_with_its_old_time_gets_its_own_file_name(tmp_path):
    # cp -p / rsync -t of other content of the same size keeps the modification time: the evaluation's
    # file name (its data hash) stayed the same, and the new evaluation wrote over the old one's results.
    import os
    import time

    from innerloop.train.run import evaluation_stem

    data = tmp_path / "data.txt"
    data.write_text("first content\n", encoding="utf-8")
    before = evaluation_stem("last-1a2b3c4d", [str(data)], 32, 4)
    stat = data.stat()
    time.sleep(
        0.03
    )  # past the file system's coarse clock tick (up to 10 ms): the rewrite's change time differs
    data.write_text("other content\n", encoding="utf-8")  # the same size
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert data.stat().st_size == stat.st_size and data.stat().st_mtime_ns == stat.st_mtime_ns
    assert evaluation_stem("last-1a2b3c4d", [str(data)], 32, 4) != before


@pytest.mark.parametrize(
    "text", ['{"command": "python -m innerloop', "[1, 2]", "\udcff"], ids=["cut", "list", "bad"]
)
def test_a_damaged_result_of_a_study_is_one_line_naming_its_folder(tmp_path, text):
    science = load_science()
    run_dir = tmp_path / "runs" / "p"
    run_dir.mkdir(parents=True)
    (run_dir / "result.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(
        SystemExit, match=r"science.py: error: cannot read the run in .*runs/p.*remove the folder"
    ):
        science.recorded_command(run_dir)


def test_the_numbers_added_to_a_write_error_keep_its_file_and_need_no_errno():
    from innerloop.train.run import _with_words

    full = _with_words(OSError(errno.ENOSPC, "No space left on device", "/out/eval.csv"), "ppl 7.030")
    assert str(full) == "[Errno 28] No space left on device; ppl 7.030: '/out/eval.csv'"
    assert str(_with_words(OSError("disk gone"), "ppl 7.030")) == "disk gone; ppl 7.030"
