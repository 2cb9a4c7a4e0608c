"""Review s47j (issue 14, fair comparisons): cases of the compare study and ``innerloop compare`` that
nobody listed."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from lm_testing import untrained_run

SCIENCE = Path(__file__).parents[1] / "benchmarks" / "science.py"


def _science():
    """benchmarks/science.py as a module (registered under the name tests/benchmarks/test_science.py uses)."""
    if "science_benchmark" not in sys.modules:
        spec = importlib.util.spec_from_file_location("science_benchmark", SCIENCE)
        sys.modules[spec.name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules["science_benchmark"]


def test_the_compare_study_refuses_before_training_when_the_sweeps_runs_are_missing(tmp_path, monkeypatch):
    # The compare study compares its own runs with six of the sweep's (same --out). Without them it
    # trained its points and then wrote a comparison table silently missing those models (or, without
    # `swa 64`, a table saying only that compare failed).
    science = _science()
    trained = []
    monkeypatch.setattr(science, "budget_of", lambda *args: 1000)  # no model built: nothing trains here
    monkeypatch.setattr(science, "run_points", lambda points, *args: trained.extend(points) or [])
    monkeypatch.setattr(science, "check_recorded_results", lambda *args: None)  # sizes models: seconds
    monkeypatch.setattr(science, "compare_checkpoints", lambda *args: "")
    monkeypatch.setattr(science, "plot_png", lambda *args: None)
    done = tmp_path / "runs" / science.slug("linear") / "result.json"
    done.parent.mkdir(parents=True)
    result = {"name": "linear", "params": 1000, "val_loss": 2.0, "val_ppl": 7.4, "buckets": [[0, 64, 2.0]],
              "inner_before": [], "inner_after": [], "command": "innerloop train"}  # fmt: skip
    done.write_text(json.dumps(result))  # one sweep point present: the others are still named
    with pytest.raises(SystemExit) as refused:
        science.main(["compare", "--quick", "--out", str(tmp_path), "--points", "full attention"])
    message = str(refused.value)
    assert not trained  # refused before any point trains
    missing = [name for name in science.COMPARE_FROM_SWEEP if name != "linear"]
    assert all(f"'{name}'" in message for name in missing), message
    assert "'linear'" not in message and "science.py sweep --quick" in message, message


@pytest.mark.slow  # two tiny run folders and their models loaded: ~1 s
@pytest.mark.parametrize("command", ["growth", "diagnose"])
def test_growth_and_diagnose_on_too_little_validation_text_are_one_line_errors(tmp_path, capsys, command):
    # A --seq-len past the run's validation text raised innerloop's DataError, which science.py's main
    # did not catch: a traceback instead of the one-line error its other bad inputs get.
    corpus = tmp_path / "corpus.py"
    corpus.write_text("".join(f"def f{i}(x):\n    return x * {i}\n" for i in range(60)))
    ttt = untrained_run(tmp_path / "ttt", corpus, "ttt", 0, 16, 3, 2)
    swa = untrained_run(tmp_path / "swa", corpus, "swa", 1, 16, 3, 2)
    given = [str(ttt), str(swa)] if command == "growth" else [str(ttt / "last.safetensors")]
    with pytest.raises(SystemExit) as stopped:
        _science().main([command, *given, "--seq-len", "4096"])
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f": error: {command}: the run's validation text" in error, error
    assert "too few for one window of --seq-len 4096, which needs 4097" in error, error
    assert "paths" not in error  # science.py has no option for other text: not told to give one


def test_a_study_rerun_keeps_an_interrupted_points_log_and_says_how_to_go_on(tmp_path, monkeypatch, capsys):
    # A point whose training was stopped (its run folder holds a checkpoint, its log no final report)
    # was trained again into the same folder: its train.log was replaced by the new process's output,
    # which `innerloop train` refuses (the folder holds a run), so the interrupted run's log was lost and
    # the point failed on every rerun with only "training failed; see train.log".
    science = _science()
    point = science.Point("linear", "tiny", matched=False)
    run_dir = tmp_path / "runs" / "linear"
    run_dir.mkdir(parents=True)
    (run_dir / "last.safetensors").write_bytes(b"a checkpoint")
    log = "command: innerloop train --config tiny\nstep 100/300 loss 2.5\n"
    (run_dir / "train.log").write_text(log)
    started = []

    def refused_training(command, **kwargs):  # what `innerloop train` does in a folder holding a run
        started.append(command)
        return subprocess.CompletedProcess(command, 1)

    monkeypatch.setattr(science.subprocess, "run", refused_training)
    assert science.run_point(point, tmp_path, [], None) is None
    assert (run_dir / "train.log").read_text() == log and not started
    said = capsys.readouterr().out
    assert str(run_dir) in said and "--resume" in said and "remove" in said, said
