"""Review s47j (issue 14, fair comparisons): cases of the compare study and ``innerloop compare`` that
nobody listed."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

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
