"""Review s55p: leftovers of the s55 reviews (benchmark exit codes and path lines, the non-finite rows
recipe, export / tokenizer-cache / error-text details). Each test was seen failing before its fix."""

from __future__ import annotations

import pytest
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


# ---- generate_speed / compile_speed say which path each TTT column ran --------------------------------


@pytest.fixture
def threads():
    """The scripts' main() sets torch's thread count: restore it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.slow  # reason: loads generate_speed.py (imports innerloop.models, ~0.6 s); the models are tiny
def test_generate_speed_says_which_path_each_ttt_model_ran(capsys, monkeypatch, threads):
    """s55p (LOW): train_speed and step_profile print the path each TTT column took (``kernel="auto"``
    runs the next path where a kernel is missing or refused, timed under the same label); generate_speed
    did not. The stand-in for such a fallback: the TTT-Linear model on fused_torch_linear."""
    from innerloop.models.config import TTTConfig

    script = benchmark_script("generate_speed")
    fallback = ("TTT-Linear", {"mixer": "ttt", "ttt": TTTConfig(kernel="fused_torch_linear")})
    monkeypatch.setitem(script.MIXERS, "ttt", fallback)
    argv = ["--mixers", "ttt", "attention", "--contexts", "16", "40", "--tokens", "2", "--repeats", "1"]
    argv += ["--hidden", "8", "--heads", "2", "--layers", "1", "--window", "8", "--prefill-chunk", "32"]
    script.main([*argv, "--threads", "1"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("# ")]
    assert lines == [  # 40 = 32 + 8: the last chunk's remainder of 8 tokens runs on torch
        "# TTT-Linear ran fused_torch_linear: prefill @16",
        "# TTT-Linear ran torch: prefill @40, decoding",
    ]


@pytest.mark.slow  # reason: loads compile_speed.py (imports innerloop.models, ~0.6 s); tiny models, no compile
def test_compile_speed_says_which_path_each_ttt_model_ran(capsys, monkeypatch, threads):
    """s55p (LOW): as generate_speed, compile_speed did not say which path its TTT columns took. Here
    ``torch.compile`` stands aside (the copy runs eagerly) and the TTT-Linear model is on
    fused_torch_linear, the stand-in for ``kernel="auto"``'s fallback; attention has no TTT layer: no line."""
    from dataclasses import replace

    from innerloop.models import build_model
    from innerloop.models.config import TTTConfig

    script = benchmark_script("compile_speed")
    monkeypatch.setattr(torch, "compile", lambda model, backend: model)

    def fallback_models(args):
        base = script.common_config(args)
        torch.manual_seed(0)
        ttt = build_model(replace(base, mixer="ttt", ttt=TTTConfig(kernel="fused_torch_linear")))
        return {"TTT-Linear": ttt, "attention": build_model(replace(base, mixer="attention"))}

    monkeypatch.setattr(script, "build_models", fallback_models)
    script.main(["--quick", "--threads", "1"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("# ")]
    steps = "training step eager, training step compiled, scoring eager, scoring compiled"
    assert lines == [  # --quick: sequences of 32 tokens (2 mini-batches of 16), tokens decoded one by one
        f"# TTT-Linear ran fused_torch_linear: {steps}",
        "# TTT-Linear ran torch: decoding eager, decoding compiled",
    ]
