"""Review s46b (issue 14's tools and issue 13's fast paths): the defects found, each with its test."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from innerloop.core.diagnostics import inner_loss_before_after
from innerloop.core.family_layers import GatedDeltaNetLayer, TitansLayer

SCIENCE = Path(__file__).parents[1] / "benchmarks" / "science.py"


def _science():
    """benchmarks/science.py as a module (as tests/benchmarks/test_science.py loads it)."""
    if "science_benchmark" not in sys.modules:
        spec = importlib.util.spec_from_file_location("science_benchmark", SCIENCE)
        sys.modules[spec.name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules["science_benchmark"]


@pytest.mark.parametrize("layer_class", [GatedDeltaNetLayer, TitansLayer])
def test_science_diagnose_reads_a_forgetting_layers_gates_as_the_layer_does(layer_class) -> None:
    """``science.py diagnose`` reports the family's TTT layers too; its inner losses by mini-batch ran
    the scan without Gated DeltaNet's decay and Titans' momentum gates (None for both), so the carried
    and updated weights were not the layer's. Averaged over the mini-batches they are now the library's
    diagnostics (``inner_loss_before_after``, the layer's own scan) to float32 rounding."""
    torch.manual_seed(0)
    layer = layer_class(16, 2, **({"mini_batch_size": 4} if layer_class is TitansLayer else {}))
    x = torch.randn(2, 3 * layer.mini_batch_size, 16)
    with torch.no_grad():
        rows = _science().inner_losses_by_mini_batch(layer, x)  # [3, mini-batches]
        before, after = inner_loss_before_after(layer, x)  # [B], over equal mini-batches
    assert rows[1].mean().item() == pytest.approx(before.mean().item(), rel=1e-5)
    assert rows[2].mean().item() == pytest.approx(after.mean().item(), rel=1e-5)


def test_science_diagnose_reports_a_family_layers_gate_without_the_ttt_layers_head_dim(monkeypatch) -> None:
    """diagnose reported every layer's gate as ``lr * head_dim / base_lr``, the sigmoid of a TTT layer
    (whose lr is ``base_lr * sigmoid / head_dim``): a Titans layer's ``sigmoid(theta)`` read as 8.0,
    head_dim times itself. A family layer's gate is ``lr / base_lr`` now, in [0, 1] for Titans."""
    from dataclasses import asdict
    from types import SimpleNamespace

    import innerloop.train
    import innerloop.train.run
    from innerloop.config import load_config
    from innerloop.models import build_model

    overrides = [
        "model.hidden_size=16",
        "model.num_heads=2",
        "model.intermediate_size=16",
        "model.num_layers=1",
    ]
    run, _ = load_config("titans-tiny", overrides)
    torch.manual_seed(0)
    model = build_model(run.model).eval()
    module = SimpleNamespace(model=model, hparams={"model": asdict(run.model)})
    monkeypatch.setattr(innerloop.train, "load_module", lambda checkpoint: module)
    ids = torch.randint(0, 256, (1, 16))  # the windows (reading the default corpus's takes seconds)
    monkeypatch.setattr(
        innerloop.train.run, "evaluation_windows", lambda *a, **k: SimpleNamespace(inputs=ids)
    )
    report = _science().diagnose("runs/none/last.safetensors", 1, 16)
    gate = float(report.split("gate lr/base_lr mean ")[1].split()[0])
    assert 0 < gate < 1, report
