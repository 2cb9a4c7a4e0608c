"""benchmarks/generate_speed.py runs (CI-sized) and measures what it says: the state after the prompt
is the same size at every context for TTT and sliding-window models, and grows with it for attention."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "generate_speed.py"


def load_script():
    spec = importlib.util.spec_from_file_location("generate_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # ~2 s: four models read prompts of 64 and 256 tokens and decode
def test_quick_run_prints_every_model_and_state_sizes_follow_the_mixer(tmp_path, capsys) -> None:
    out = tmp_path / "speed.json"
    results = load_script().main(
        ["--quick", "--threads", "1", "--json", str(out)]
    )  # conftest restores threads
    table = capsys.readouterr().out
    for label in ("TTT-Linear", "TTT-MLP", "attention (KV cache)", "sliding window"):
        assert f"| {label} |" in table
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    short, long = 64, 256  # the --quick contexts; the window is 32
    for label in ("TTT-Linear", "TTT-MLP", "sliding window"):
        assert results[label][short]["state_mib"] == results[label][long]["state_mib"], label
    attention = results["attention (KV cache)"]
    assert attention[long]["state_mib"] > 3 * attention[short]["state_mib"]  # 4x the tokens cached
    assert all(row[c]["tokens_per_s"] > 0 for row in results.values() for c in (short, long))
