"""benchmarks/science.py (issue 14): a quick study trains its points, records the commit that trained
them, reads finished runs back instead of training them again, and its table's differences to sliding
window are bucket by bucket."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).parents[2] / "benchmarks" / "science.py"


def _science():
    """The benchmark script as a module (registered first: its dataclasses look their module up)."""
    if "science_benchmark" not in sys.modules:
        spec = importlib.util.spec_from_file_location("science_benchmark", BENCHMARK)
        sys.modules[spec.name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules["science_benchmark"]


def _result(name: str, losses: list[float], seq_len: int = 64) -> dict:
    step = seq_len // len(losses)
    buckets = [[i * step, (i + 1) * step, loss] for i, loss in enumerate(losses)]
    return {"name": name, "params": 1000, "val_loss": sum(losses) / len(losses), "val_ppl": 9.0,
            "buckets": buckets, "inner_before": [], "inner_after": []}  # fmt: skip


def test_the_table_subtracts_sliding_window_bucket_by_bucket():
    science = _science()
    table = science.lm_table([_result("swa 64", [2.0, 1.5, 1.0]), _result("linear", [2.5, 1.75, 0.5])])
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[2:]}
    assert "+0.500 / +0.250 / -0.500" in rows["linear"]
    assert "+0.000 / +0.000 / +0.000" in rows["swa 64"]
    # another window length has no sliding-window run to subtract: no difference is invented
    other = science.lm_table(
        [_result("swa 64", [2.0, 1.5]), _result("linear seq 128", [2.0, 1.0], seq_len=128)]
    )
    assert other.splitlines()[-1].count("|  |") == 1


def test_every_result_says_which_commit_trained_it():
    commit = _science().source_commit()
    assert commit and commit != "unknown"  # this is a git checkout
    head = subprocess.run(["git", "-C", str(BENCHMARK.parent), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    assert commit.removesuffix("+modified") == head


#: ``python -m innerloop ARGUMENTS`` as a job of the block server: its ``__main__`` run as ``-m`` runs it.
_INNERLOOP_MAIN = """
import runpy, sys
sys.argv = {argv!r}
runpy.run_module("innerloop", run_name="__main__", alter_sys=True)
"""


def _forked_innerloop(server, run_dir: Path):
    """A stand-in for science.py's ``subprocess.run`` that runs its ``python -m innerloop ...`` in a
    child forked from the warm ``server`` (tests/block_server.py: torch, innerloop and Lightning imported
    once, ~10 s of CPU a fresh interpreter pays) instead, its output appended to the ``stdout`` file
    science.py gives (after the command line it wrote), the exit status returned as
    ``subprocess.run``'s; any other command (git) runs as before."""
    real_run = subprocess.run

    def run(command, *args, stdout=None, env=None, **kwargs):
        if list(command[:3]) != [sys.executable, "-m", "innerloop"]:
            return real_run(command, *args, stdout=stdout, env=env, **kwargs)
        script, output = run_dir / "innerloop_main.py", run_dir / "innerloop_main.log"
        script.write_text(_INNERLOOP_MAIN.format(argv=["innerloop", *command[3:]]))
        added = {k: v for k, v in (env or {}).items() if os.environ.get(k) != v}  # OMP_NUM_THREADS=1
        status, printed = server.run(script, output, Path.cwd(), added, timeout_s=600)
        stdout.write(printed)
        stdout.flush()
        return subprocess.CompletedProcess(command, status)

    return run


@pytest.mark.slow  # ~10 s: a tiny training run in a process of its own, then the study again
def test_a_quick_study_trains_each_point_once_and_reads_it_back(tmp_path, capsys, monkeypatch, block_server):
    # The study in this process (science.py as a script, its exit status and its one-line errors, is
    # tests/benchmarks/test_cli_args.py's); the point it trains is still `python -m innerloop train` in a
    # process of its own: forked from the block server where it forks (~10 s of imports saved), else fresh.
    # Two fresh interpreters here cost ~8 s of imports and checked nothing more.
    if block_server.forks:
        scratch = tmp_path.parent / f"{tmp_path.name}-jobs"
        scratch.mkdir()
        monkeypatch.setattr(_science().subprocess, "run", _forked_innerloop(block_server, scratch))
    argv = ["sweep", "--quick", "--out", str(tmp_path), "--jobs", "1", "--points", "linear"]
    _science().main(argv)
    first = capsys.readouterr().out
    log = tmp_path / "runs" / "linear" / "train.log"
    assert (tmp_path / "runs" / "linear" / "result.json").exists(), (first, log.read_text()[-2000:])
    result = json.loads((tmp_path / "runs" / "linear" / "result.json").read_text())
    assert result["commit"] == _science().source_commit()
    assert result["buckets"] and result["val_loss"] > 0
    assert "| linear |" in first
    for name in ("sweep.md", "sweep.csv", "sweep.png"):
        assert (tmp_path / name).stat().st_size > 0
    written = log.stat().st_mtime_ns
    _science().main(argv)
    again = capsys.readouterr().out
    assert log.stat().st_mtime_ns == written  # read back, not trained again
    assert first.endswith(again)  # the same table (the first run also reported each point)


@pytest.mark.slow  # loads four configs and sizes a model to the budget: ~3 s as a process's first model
def test_each_override_key_is_given_once_with_its_last_value(recwarn):
    science = _science()
    assert science.merged(["a=1", "b=2"], ["a=3"], ["c=4", "b = 5"]) == ["a=3", "b = 5", "c=4"]
    budget = science.budget_of(
        science.BUDGET_PRESET[0], science.merged(science.BUDGET_PRESET[1], science.FULL)
    )
    point = science.Point("p", "tiny", ("seed=3", "model.num_layers=2", "model.intermediate_size=64"))
    for full in (
        science.sized_overrides(point, science.FULL, None),
        science.sized_overrides(point, science.FULL, budget),
    ):
        keys = [item.partition("=")[0] for item in full]
        assert len(keys) == len(set(keys)) and "seed=3" in full and "model.num_layers=2" in full, full
    assert full[-1] != "model.intermediate_size=64"  # sized to the budget: the point's own width replaced
    assert not [w for w in recwarn if "given twice" in str(w.message)]
