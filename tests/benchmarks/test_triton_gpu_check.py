"""benchmarks/triton_gpu_check.py, whose checks run on a GPU only in a lent session: the same checks
against the CPU kernels here (its --dry-run-on-cpu), at one small shape per model, so that the script
cannot rot between GPU runs."""

from __future__ import annotations

import pytest
from benchmark_testing import benchmark_script


@pytest.mark.slow  # ~0.6 s for the first: the CPU kernels' first-use checks of the shape
@pytest.mark.parametrize("model", ["linear", "mlp"])
def test_every_check_runs_and_passes_on_the_cpu_kernels(model, monkeypatch) -> None:
    script = benchmark_script("triton_gpu_check")
    monkeypatch.setattr(script, "DEVICE", "cpu")
    failures: list = []
    lines: list[str] = []
    report = script.reporter(model, (2, 11, 2, 8, 4), failures)
    monkeypatch.setattr("builtins.print", lambda *a, **k: lines.append(" ".join(map(str, a))))
    script.check_float32(model, (2, 11, 2, 8, 4), report)
    assert not failures, lines
    assert len(lines) == 6 and all(line.startswith("ok") for line in lines), lines
    assert f"cpu_ttt_{model}" in lines[0] and "differentiable once" in lines[-1], lines
