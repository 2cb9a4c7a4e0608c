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
