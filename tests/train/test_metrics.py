"""Metrics: loss by position, inner-loss diagnostics; the learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch

from innerloop.train.metrics import Float64Perplexity, InnerLossDiagnostics, LossByPosition, position_buckets
from innerloop.train.module import warmup_cosine


def test_buckets_cover_every_position_once() -> None:
    assert position_buckets(10, 4) == [(0, 2), (2, 5), (5, 7), (7, 10)]
    assert position_buckets(3, 8) == [(0, 1), (1, 2), (2, 3)]


def test_loss_by_position_is_the_mean_of_the_scored_tokens_in_each_bucket() -> None:
    metric = LossByPosition(num_buckets=2)
    loss = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    metric.update(loss, mask)
    metric.update(torch.full((1, 4), 10.0))
    expected = torch.tensor([(1 + 2 + 5 + 10 + 10) / 5, (3 + 10 + 10) / 3])
    torch.testing.assert_close(metric.compute(), expected)
    assert metric.buckets() == [(0, 2), (2, 4)]


def test_an_empty_bucket_is_nan_and_a_new_length_is_an_error() -> None:
    metric = LossByPosition(num_buckets=2)
    metric.update(torch.ones(1, 4), torch.tensor([[True, False, False, False]]))
    assert math.isnan(metric.compute()[1])
    with pytest.raises(ValueError, match="set up for length 4, got length 5"):
        metric.update(torch.ones(1, 5))


def test_inner_diagnostics_average_per_layer() -> None:
    metric = InnerLossDiagnostics(num_layers=2)
    metric.update(0, torch.tensor([4.0, 2.0]), torch.tensor([1.0, 1.0]))
    metric.update(0, torch.tensor([6.0]), torch.tensor([4.0]))
    result = metric.compute()
    torch.testing.assert_close(result["before"][0], torch.tensor(4.0))
    torch.testing.assert_close(result["after"][0], torch.tensor(2.0))
    assert math.isnan(result["before"][1])
    with pytest.raises(ValueError, match=r"layer=2 must be in \[0, 2\)"):
        metric.update(2, torch.ones(1), torch.ones(1))


def test_the_inner_loop_lowers_the_inner_loss_of_a_ttt_layer() -> None:
    from innerloop import TTTLayer
    from innerloop.core import diagnostics

    torch.manual_seed(0)
    layer = TTTLayer(32, 2, mini_batch_size=8)
    x = torch.randn(3, 64, 32)
    before, after = diagnostics.inner_loss_before_after(layer, x)
    assert before.shape == after.shape == (3,)
    assert bool((after < before).all())


def test_warmup_then_cosine_to_the_minimum() -> None:
    lrs = [warmup_cosine(s, warmup_steps=10, max_steps=110, lr=1.0, min_lr=0.1) for s in range(130)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.55)
    assert lrs[110] == pytest.approx(0.1) and lrs[129] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))


@pytest.mark.parametrize("cast", [torch.bfloat16, torch.float16])
def test_metrics_sum_in_float64_after_their_module_is_cast(cast) -> None:
    # Lightning's bf16-true / 16-true cast the whole LightningModule, its metrics with it: a bf16
    # count stops at 256, so the states must stay float64 (and exact).
    tokens, vocab = 1000, 7
    logits = torch.randn(1, tokens, vocab, generator=torch.Generator().manual_seed(0))
    target = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(1))
    perplexity = Float64Perplexity().to(cast)
    perplexity.update(logits.to(cast).float(), target)
    expected = torch.nn.functional.cross_entropy(logits.to(cast).double()[0], target[0]).exp()
    assert perplexity.count.dtype == torch.float64 and perplexity.count.item() == tokens
    assert torch.allclose(perplexity.compute().double(), expected, rtol=1e-6)

    by_position = LossByPosition(num_buckets=1).to(cast)
    by_position.update(torch.full((4, tokens), 0.1))
    assert by_position.count.item() == 4 * tokens
    assert by_position.compute().item() == pytest.approx(0.1, rel=1e-6)
    diagnostics = InnerLossDiagnostics(num_layers=1).to(cast)
    for _ in range(300):
        diagnostics.update(0, torch.ones(1), torch.ones(1))
    assert diagnostics.count.item() == 300
    for metric in (perplexity, by_position, diagnostics):
        metric.reset()
        assert all(getattr(metric, name).dtype == torch.float64 for name in metric._defaults), metric


def test_perplexity_is_the_exponential_of_the_mean_token_loss_however_unlikely_a_target() -> None:
    """torchmetrics took softmax then log: a target probability below ~1e-45 was log(0), and a checkpoint
    with a finite loss read an infinite perplexity."""
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    logits[1, 4] = torch.tensor([0.0] * 10 + [-200.0])  # the target, id 10, has probability ~e^-200
    target = torch.randint(0, 10, (3, 7))
    target[1, 4], target[0, 2] = 10, -100
    perplexity = Float64Perplexity(ignore_index=-100)
    perplexity.update(logits, target)
    scored = target != -100
    loss = torch.nn.functional.cross_entropy(logits.double()[scored], target[scored])
    assert math.isfinite(float(perplexity.compute()))
    assert float(perplexity.compute()) == pytest.approx(math.exp(float(loss)), rel=1e-6)


def test_perplexity_of_float64_logits_is_computed_in_float64() -> None:
    torch.manual_seed(0)
    logits, target = torch.randn(2, 5, 7, dtype=torch.float64), torch.randint(0, 7, (2, 5))
    perplexity = Float64Perplexity()
    perplexity.update(logits, target)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())
    assert float(perplexity.compute()) == pytest.approx(math.exp(float(loss)), rel=1e-13)
