"""Review s15 (metrics): under several processes each validation example is scored exactly once (Lightning's
DistributedSampler repeated the first ones, which the summed metrics scored twice; a 2-process run against
a 1-process evaluation: tests/train/test_train.py), and a mean loss past
float64's exp range is reported as the loss it is, not inf (eval), nor a crash (compare)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from innerloop.config import load_config
from innerloop.train.compare import LengthResult
from innerloop.train.data import IGNORE_INDEX, FixedExamples, validation_loader
from innerloop.train.metrics import Float64Perplexity
from innerloop.train.run import build_module


def _examples(rows: int, length: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = torch.arange(rows * length).reshape(rows, length) % 50
    targets = inputs + 1000 * torch.arange(rows)[:, None]  # each row's targets say which row they are
    return inputs, targets


@pytest.mark.parametrize("world", [2, 3, 4, 8])
@pytest.mark.parametrize(("rows", "batch_size"), [(11, 5), (15, 5), (3, 2), (16, 4)])
def test_every_validation_example_is_scored_once_across_the_ranks(world, rows, batch_size) -> None:
    inputs, targets = _examples(rows)
    seen, batch_counts = [], set()
    for rank in range(world):
        trainer = SimpleNamespace(world_size=world, global_rank=rank)
        batches = list(validation_loader(inputs, targets, batch_size, trainer))
        batch_counts.add(len(batches))
        for batch_inputs, batch_targets in batches:
            assert batch_inputs.shape[1:] == inputs.shape[1:] and batch_targets.shape[0] <= batch_size
            for row in batch_targets:
                if (row != IGNORE_INDEX).any():
                    assert (row != IGNORE_INDEX).all()  # a padding row scores nothing at all
                    seen.append(int(row[0]) // 1000)
    assert sorted(seen) == list(range(rows))
    assert len(batch_counts) == 1  # the same number of batches on every rank (a collective at each)


def test_one_process_reads_the_examples_in_order() -> None:
    inputs, targets = _examples(7)
    for trainer in (None, SimpleNamespace(world_size=1, global_rank=0)):
        loader = validation_loader(inputs, targets, 3, trainer)
        assert isinstance(loader.dataset, FixedExamples)
        assert torch.equal(torch.cat([t for _, t in loader]), targets)


def _huge_logits() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, dtype=torch.float64) * 1500
    targets = logits.argmin(-1)  # the least likely token: a loss of thousands of nats
    return logits, targets


def test_a_mean_loss_past_exps_range_is_logged_as_itself() -> None:
    logits, targets = _huge_logits()
    want = float((torch.logsumexp(logits, -1) - logits.gather(-1, targets[..., None])[..., 0]).mean())
    assert want > 800
    metric = Float64Perplexity(ignore_index=IGNORE_INDEX)
    metric.update(logits, targets)
    assert math.isinf(float(metric.compute())) and float(metric.mean_loss()) == pytest.approx(want, rel=1e-12)

    run, _ = load_config("tiny", ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2"])
    module = build_module(run).double()
    with torch.no_grad():
        module.model.norm.weight.mul_(3000.0)  # logits of thousands: a badly diverged model
    inputs = torch.randint(0, 256, (2, 12))
    targets = inputs.roll(-1, dims=1)
    with torch.no_grad():
        logits = module.model(inputs)[0]
    want = float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets))
    assert want > 710
    logged = {}
    module.log = lambda name, value, **kwargs: logged.__setitem__(name, float(value))
    module.validation_step((inputs, targets), 0)
    module.on_validation_epoch_end()
    assert logged["val_loss"] == pytest.approx(want, rel=1e-6) and math.isinf(logged["val_ppl"])


def test_compares_perplexity_of_a_huge_loss_is_inf_not_an_overflow_error() -> None:
    result = LengthResult(
        seq_len=4,
        buckets=[(0, 4)],
        loss_sums=torch.tensor([[[3000.0]], [[8.0]]], dtype=torch.float64),
        counts=torch.tensor([[4.0]], dtype=torch.float64),
        windows=1,
    )
    assert math.isinf(result.perplexity(0)) and result.perplexity(1) == pytest.approx(math.exp(2.0))
    nan = LengthResult(4, [(0, 4)], torch.full((1, 1, 1), math.nan, dtype=torch.float64), result.counts, 1)
    assert math.isnan(nan.perplexity(0))  # a diverged model reads nan, not inf


def test_rows_that_score_nothing_are_left_out_of_the_inner_loss_diagnostics() -> None:
    # the padding rows of a rank's validation shard (review s15 last commits, MED)
    run, _ = load_config("tiny", ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2"])
    torch.manual_seed(0)
    module = build_module(run).double()
    inputs = torch.randint(0, 256, (3, 16))
    targets = inputs.roll(-1, dims=1)
    module.validation_step((inputs[:2], targets[:2]), 0)
    want = module.inner_diagnostics.compute()
    module.inner_diagnostics.reset()
    padded = targets.clone()
    padded[2] = IGNORE_INDEX
    module.validation_step((inputs, padded), 0)
    got = module.inner_diagnostics.compute()
    assert want and want.keys() == got.keys()
    assert all(torch.equal(got[key], want[key]) for key in want)
