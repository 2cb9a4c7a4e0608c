"""Review s48i (mutation testing of the core math): tests for planted defects the suite let through.

Each test here failed with one small defect planted in the library (named in its comment) and passes on
the real code. The metrics promise float64 sums "whatever the model's precision" (train/metrics.py);
summing a low-precision batch first and casting the sum afterwards kept every existing test green.
"""

from __future__ import annotations

import pytest
import torch

from innerloop.models import E2EConfig, ModelConfig
from innerloop.models.e2e import num_suffix_blocks
from innerloop.train.metrics import Float64Perplexity, InnerLossDiagnostics, LossByPosition


def test_perplexity_sums_the_token_losses_of_float32_logits_in_float64() -> None:
    # Planted: `negative_log_probs.sum().double()` (a float32 sum, cast after). One token's loss is
    # 1e8 nats and 4095 are log 2: a float32 sum (ulp 8 at 1e8) loses 0.013 nats of the mean.
    logits = torch.zeros(1, 4096, 2)
    logits[0, 0, 1] = -1e8
    target = torch.ones(1, 4096, dtype=torch.long)
    metric = Float64Perplexity()
    metric.update(logits, target)
    exact = (torch.logsumexp(logits.double(), -1) - logits.double()[..., 1]).mean()
    assert float(metric.mean_loss()) == pytest.approx(float(exact), rel=1e-12)


def test_loss_by_position_sums_bfloat16_losses_over_the_batch_in_float64() -> None:
    # Planted: the batch's losses summed in bfloat16, then cast. 511 losses of 1 and one of 300 at a
    # position: bfloat16 (8 significant bits) rounds their sum 811 to 812.
    token_loss = torch.ones(512, 2, dtype=torch.bfloat16)
    token_loss[0] = 300
    metric = LossByPosition(num_buckets=1)
    metric.update(token_loss)
    assert float(metric.compute()) == pytest.approx(811 / 512, rel=1e-6)


@pytest.mark.parametrize("which", ["before", "after"])
def test_inner_loss_diagnostics_sum_bfloat16_losses_in_float64(which: str) -> None:
    # Planted: `after.detach().sum().to(torch.float64)`. The same 811 that bfloat16 rounds to 812.
    losses = torch.ones(512, dtype=torch.bfloat16)
    losses[0] = 300
    other = torch.ones(512, dtype=torch.bfloat16)
    metric = InnerLossDiagnostics(num_layers=1)
    metric.update(0, losses if which == "before" else other, losses if which == "after" else other)
    result = metric.compute()
    assert float(result[which]) == pytest.approx(811 / 512, rel=1e-6)
    assert float(result["after" if which == "before" else "before"]) == 1.0


@pytest.mark.parametrize(("num_layers", "suffix_blocks"), [(10, 2), (14, 4), (2, 1), (12, 3)])
def test_the_suffix_blocks_are_the_fraction_of_layers_rounded_half_to_even(
    num_layers: int, suffix_blocks: int
) -> None:
    # Planted: `int(fraction * num_layers + 0.5)` (half up): 10 layers at 0.25 then gave 3 prime blocks,
    # and no test saw it; docs/e2e.md promises Python's round, 2.5 -> 2 and 3.5 -> 4, at least 1.
    config = ModelConfig(
        mixer="e2e",
        vocab_size=11,
        hidden_size=8,
        num_layers=num_layers,
        num_heads=2,
        intermediate_size=12,
        window=4,
        e2e=E2EConfig(chunk_size=4, suffix_fraction=0.25),
    )
    assert num_suffix_blocks(config) == suffix_blocks
