"""Review s55p: leftovers of the s55 reviews (benchmark exit codes and path lines, the non-finite rows
recipe, export / tokenizer-cache / error-text details). Each test was seen failing before its fix."""

from __future__ import annotations

import torch
from benchmark_testing import benchmark_script

import innerloop.kernels.triton.common as triton_common

# ---- kernel_speed: a row that raises fails the run --------------------------------------------------


def _kernel_speed_on_a_fake_gpu(monkeypatch, failing: set[int]) -> tuple[object, list[int]]:
    """kernel_speed with CUDA, Triton and the timing stubbed (CPU tensors, no kernel run): its timed
    calls are numbered from 0 and those in ``failing`` raise as a kernel error would."""
    script = benchmark_script("kernel_speed")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "fake GPU")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(triton_common, "triton_missing", lambda: None)
    real_randn = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *shape, device=None, **kw: real_randn(*shape, **kw))
    monkeypatch.setattr(script, "make_inputs", lambda *a: ())
    calls: list[int] = []

    def fake_time_ms(fn, repeats: int) -> float:
        calls.append(len(calls))
        if calls[-1] in failing:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return 2.0

    monkeypatch.setattr(script, "cuda_time_ms", fake_time_ms)
    return script, calls


ARGS = ["--model", "linear", "--skip-naive-above", "0", "--min-len", "64", "--max-len", "128"]


def test_kernel_speed_exits_non_zero_when_a_row_failed_after_printing_the_rest(capsys, monkeypatch):
    # s55p (LOW-MED): every per-row exception printed "failed" and the run still exited 0
    script, calls = _kernel_speed_on_a_fake_gpu(monkeypatch, failing={1})  # triton_linear at T=64
    assert script.main(ARGS) == 1
    captured = capsys.readouterr()
    assert len(calls) == 4  # sdpa and triton_linear at 64 and 128: the rows after the failure still ran
    rows = [line.split()[:3] for line in captured.out.splitlines()[2:]]
    assert rows == [["64", "sdpa", "2.000"], ["64", "triton_linear", "failed"]] + [
        ["128", "sdpa", "2.000"],
        ["128", "triton_linear", "2.000"],
    ]
    assert "1 row(s) failed: triton_linear at T=64" in captured.err


def test_kernel_speed_exits_zero_when_every_row_ran(capsys, monkeypatch):
    script, calls = _kernel_speed_on_a_fake_gpu(monkeypatch, failing=set())
    assert script.main(ARGS) == 0
    assert len(calls) == 4 and capsys.readouterr().err == ""
