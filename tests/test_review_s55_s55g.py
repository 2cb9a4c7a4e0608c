"""Review s55g of the benchmark scripts (benchmarks/*.py) and benchmarks/RESULTS.md: do the scripts
measure what the page says? Each test here was seen failing before its fix, or pins a number a script
computes (not only that it runs)."""

from __future__ import annotations

import pytest
import torch
from benchmark_testing import benchmark_script

import innerloop


@pytest.fixture
def threads():
    """The scripts' main() sets torch's thread count: restore it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# ---- the GPU scripts on a machine without one ---------------------------------------------------------


def test_kernel_speed_without_cuda_fails_and_says_why(capsys, monkeypatch):
    # s55g (MED): it printed "... Skipping." and exited 0, as if it had timed the kernels
    script = benchmark_script("kernel_speed")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert script.main(["--min-len", "64", "--max-len", "64"]) == 1
    captured = capsys.readouterr()
    assert "no CUDA device" in captured.err and "nothing was timed" in captured.err
    assert captured.out == ""


def test_triton_gpu_check_without_cuda_fails_and_says_why(capsys, monkeypatch):
    # s55g (MED): it exited 0, which reads as "every check passed" when none ran
    script = benchmark_script("triton_gpu_check")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert script.main([]) == 1
    error = capsys.readouterr().err
    assert "no CUDA device" in error and "--dry-run-on-cpu" in error


# reason: two TTT-MLP layers' forward, gradients, decoding and bf16 at a small shape (~1 s)
@pytest.mark.slow
def test_triton_gpu_check_fails_every_check_whose_kernel_did_not_run(monkeypatch):
    """s55g (HIGH): the check compared ``kernel="auto"`` with ``kernel="torch"`` whatever auto picked. Where
    the kernel it checks is missing or refused by its first-use check (Triton not installed on the GPU
    machine; here the CPU kernels turned off, INNERLOOP_DISABLE_CPU_KERNELS=1), auto runs the next
    path (fused_torch_*, torch for decoding) and every line said ok: "every check passed" with the kernel
    never run. Now a check whose calls did not run the kernel fails, naming it."""
    script = benchmark_script("triton_gpu_check")
    monkeypatch.setattr(script, "DEVICE", "cpu")  # the dry run: the kernel checked is cpu_ttt_mlp

    def pair_on_another_path(model, hidden, heads, mini_batch):
        torch.manual_seed(0)
        options = dict(hidden_size=hidden, num_heads=heads, inner_model=model, mini_batch_size=mini_batch)
        reference = innerloop.TTTLayer(**options, kernel="torch")
        fast = innerloop.TTTLayer(**options, kernel=f"fused_torch_{model}")  # what auto fell back to
        fast.load_state_dict(reference.state_dict())
        return reference, fast

    monkeypatch.setattr(script, "pair", pair_on_another_path)
    failures: list = []
    lines: list[str] = []
    report = script.reporter("mlp", (2, 11, 2, 8, 4), failures)
    monkeypatch.setattr("builtins.print", lambda *a, **k: lines.append(" ".join(map(str, a))))
    script.check_float32("mlp", (2, 11, 2, 8, 4), report)
    failed = [what for _, _, what in failures]
    assert failed == ["forward", "final state", "every gradient", "prefill + decode", "bf16 autocast"], lines
    assert all("cpu_ttt_mlp did not run" in line for line in lines[:5]), lines


class _FakeCudaEvent:
    """``torch.cuda.Event`` on a fake clock: ``record`` reads it, ``elapsed_time`` is in its units."""

    clock = [0.0]

    def __init__(self, enable_timing: bool = False) -> None:
        self.at = None

    def record(self) -> None:
        self.at = self.clock[0]

    def elapsed_time(self, end: _FakeCudaEvent) -> float:
        return end.at - self.at


@pytest.mark.parametrize(("costs", "median"), [([100.0, 1.0, 4.0], 2.5), ([100.0, 3.0, 1.0, 2.0], 2.0)])
def test_kernel_speed_times_the_median_of_its_rounds_after_the_warm_up(costs, median, monkeypatch):
    # s55g (LOW): sorted(times)[n // 2] is the larger middle value for an even --repeats (4.0 for 1 and 4)
    script = benchmark_script("kernel_speed")
    monkeypatch.setattr(_FakeCudaEvent, "clock", [0.0])
    monkeypatch.setattr(torch.cuda, "Event", _FakeCudaEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    spent = iter(costs)  # the warm-up first

    def call() -> None:
        _FakeCudaEvent.clock[0] += next(spent)

    assert script.cuda_time_ms(call, repeats=len(costs) - 1) == median
