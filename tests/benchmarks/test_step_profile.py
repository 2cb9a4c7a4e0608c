"""benchmarks/step_profile.py (issue 13's bounds in RESULTS.md): one quick run prints a table per setting
with every layer's time split into parts; the compiled kernels' entry points are what the split reads."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import innerloop

BENCHMARK = Path(__file__).parents[2] / "benchmarks" / "step_profile.py"


def _script() -> dict:
    return runpy.run_path(str(BENCHMARK))


def test_each_kind_of_event_goes_to_its_part():
    part_of = _script()["part_of"]
    assert part_of("innerloop_stack_scan_backward") == "inner scan"
    assert part_of("innerloop_stack_forward") == "inner scan"
    assert part_of("innerloop_hoist_forward") == "hoisting"
    assert part_of("innerloop_output_norm_backward") == "output LN"
    assert part_of("aten::mm") == "products"
    assert part_of("aten::_scaled_dot_product_flash_attention_for_cpu_backward") == "SDPA"
    assert part_of("aten::_to_copy") == "casts, copies"
    assert part_of("aten::mul") == part_of("CompiledStackScanBackward") == "other ops"


@pytest.mark.slow  # reason: a process's first profiler session starts kineto (1-2 s)
@pytest.mark.usefixtures("cpu_kernels")
def test_a_profiled_training_step_names_the_kernels_entry_points():
    layer = innerloop.TTTLayer(16, 2, inner_model="mlp", mini_batch_size=4)
    x = torch.randn(1, 8, 16, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU]) as recorded:
        layer(x)[0].square().sum().backward()
    names = {event.key for event in recorded.key_averages()}
    for entry_point in ("stack_scan", "hoist", "output_norm"):
        assert {f"innerloop_{entry_point}_forward", f"innerloop_{entry_point}_backward"} <= names


@pytest.mark.slow  # reason: profiles four layers in four settings (16 calls, each with a warm-up)
def test_a_quick_run_prints_a_split_per_setting_and_writes_json(tmp_path, capsys):
    out = tmp_path / "profile.json"
    results = _script()["main"](["--quick", "--threads", "1", "--json", str(out)])
    output = capsys.readouterr().out
    for row in (
        "inference fp32",
        "inference bf16 autocast",
        "training fwd+bwd fp32",
        "training bf16 autocast",
    ):
        assert f"| {row}, ms per call | inner scan |" in output
        split = results[row]
        for name in ("TTT-Linear", "TTT-MLP"):
            assert split[name]["inner scan"] > 0 and split[name]["SDPA"] == 0
        assert split["attention (SDPA)"]["SDPA"] > 0 and split["attention (SDPA)"]["inner scan"] == 0
        assert split["projections alone"]["products"] > 0
        for parts in split.values():  # the parts add up to the profiled call
            total = sum(value for part, value in parts.items() if part not in ("total", "unprofiled"))
            assert total == pytest.approx(parts["total"], rel=1e-6)
    assert results["training fwd+bwd fp32"]["TTT-MLP"]["hoisting"] > 0
    # s55g: the path each TTT layer's profiled calls took (a fallback from the CPU kernel shows as an
    # inner scan of 0 ms, its work in other columns)
    for name, model in (("TTT-Linear", "linear"), ("TTT-MLP", "mlp")):
        assert f"# {name} ran cpu_ttt_{model}: inference fp32, inference bf16 autocast, training" in output
    assert json.loads(out.read_text())["ms_per_call"] == results
    assert [p.name for p in tmp_path.iterdir()] == ["profile.json"]


def test_a_length_off_the_mini_batch_grid_names_both_options(capsys):
    with pytest.raises(SystemExit):
        _script()["main"](["--length", "100"])
    assert "--length must be a multiple of --mini-batch 16, got 100" in capsys.readouterr().err
