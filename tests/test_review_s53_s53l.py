"""Review s53l: the torchmetrics metrics as a Lightning user drives them (``metric(batch)``, the
``forward`` Lightning's docs log with; ``merge_state``; a process group's sync)."""

from __future__ import annotations

import pytest
import torch

from innerloop.train.metrics import Float64Perplexity, InnerLossDiagnostics, LossByPosition


def _sums(metric) -> dict[str, torch.Tensor]:
    return {name: getattr(metric, name).clone() for name in metric._defaults}


def _refused_batches():
    """``(metric, a good batch, a batch its update refuses)`` for each of innerloop's metrics."""
    torch.manual_seed(0)
    yield (
        Float64Perplexity(ignore_index=-100),
        (torch.randn(2, 3, 5), torch.randint(0, 5, (2, 3))),
        (torch.randn(2, 3, 5), torch.full((2, 3), 7)),  # id 7 outside the vocabulary of 5
    )
    yield LossByPosition(2), (torch.rand(2, 4),), (torch.rand(2, 4).long(),)  # integer losses
    yield InnerLossDiagnostics(2), (0, torch.rand(3), torch.rand(3)), (5, torch.rand(3), torch.rand(3))


@pytest.mark.parametrize("metric, good, refused", list(_refused_batches()))
def test_a_batch_forward_refuses_keeps_what_the_metric_had_accumulated(metric, good, refused) -> None:
    """torchmetrics' forward resets the metric before its update: a batch the update refused left the
    metric reset, every earlier batch's sums lost (a user who skips a bad batch then logs the mean of
    the later ones only, as if of all), and its sync switched off (``_to_sync``: under several
    processes, compute() then logged this process's shard)."""
    metric(*good)
    before, count = _sums(metric), metric._update_count
    with pytest.raises(ValueError):
        metric(*refused)
    after = _sums(metric)
    assert all(torch.equal(before[name], after[name]) for name in before), (before, after)
    assert metric._update_count == count
    assert metric._to_sync and metric._should_unsync and not metric._enable_grad
    metric(*good)  # and it goes on accumulating
    assert metric._update_count == count + 1


def test_loss_by_position_of_one_length_refuses_another_through_forward_and_merge_state() -> None:
    """Without varying_lengths the first update fixes the length and another is refused; forward and
    merge_state took one silently (forward's update runs on a reset metric), re-bucketing every
    earlier position (4 positions in 2 buckets became 9 positions in 2), after which an update of the
    first length was refused as 'set up for length 9'."""
    metric = LossByPosition(2)
    metric(torch.rand(2, 4))
    with pytest.raises(ValueError, match="set up for length 4, got length 9.*varying_lengths=True"):
        metric(torch.rand(2, 9))
    assert metric.seq_len == 4
    other = LossByPosition(2)
    other.update(torch.rand(1, 6))
    with pytest.raises(ValueError, match="lengths 4 and 6.*varying_lengths=True"):
        metric.merge_state(other)
    assert metric.seq_len == 4
    metric.merge_state(LossByPosition(2))  # a metric with no data merges into any
    varying = LossByPosition(2, varying_lengths=True)
    varying(torch.rand(2, 4))
    varying(torch.rand(2, 9))  # kept: the per-position sums of both
    assert varying.seq_len == 9 and varying.count_by_position.tolist() == [4.0] * 4 + [2.0] * 5


def test_loss_by_position_of_one_length_refuses_processes_of_other_lengths() -> None:
    """Synced across processes (a fake gather of two), one process's length-4 sums and another's
    length-6 ones were summed into 6 positions silently; without varying_lengths they are refused, on
    every process alike (each sees the same gathered lengths)."""
    mine = LossByPosition(2)
    mine.update(torch.rand(1, 4, dtype=torch.float64))
    theirs = [torch.tensor([6]), torch.rand(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)]

    def gather(tensor: torch.Tensor, group=None) -> list[torch.Tensor]:
        return [tensor, theirs.pop(0)]

    with pytest.raises(ValueError, match="lengths 4 and 6"):
        mine.sync(dist_sync_fn=gather, distributed_available=lambda: True)
    assert mine.seq_len == 4 and not mine._is_synced


def test_perplexity_without_ignore_index_names_the_setting_to_give() -> None:
    """A target of -100 on a metric built without ignore_index said 'or ignore_index=None for unscored
    tokens': the setting it has, not the one to give."""
    metric = Float64Perplexity()
    with pytest.raises(ValueError, match="id -100, outside") as error:
        metric.update(torch.randn(1, 2, 4), torch.tensor([[1, -100]]))
    assert "construct it with ignore_index=-100 (it has none)" in str(error.value)
    assert "ignore_index=None for" not in str(error.value)
    with pytest.raises(ValueError, match=r"id 9, .*ignore_index=-100 for unscored tokens"):
        Float64Perplexity(ignore_index=-100).update(torch.randn(1, 2, 4), torch.tensor([[1, 9]]))


def test_inner_diagnostics_of_other_layer_counts_are_refused_by_name() -> None:
    """merge_state of a diagnostics metric of 3 layers into one of 2 was torch's bare 'The size of tensor
    a (3) must match the size of tensor b (2)'."""
    mine, theirs = InnerLossDiagnostics(2), InnerLossDiagnostics(3)
    theirs.update(2, torch.rand(2), torch.rand(2))
    with pytest.raises(ValueError, match="of 2 layers cannot combine the states of 3 layers"):
        mine.merge_state(theirs)
    assert mine.count.tolist() == [0.0, 0.0]


@pytest.mark.slow  # 0.8 s: the module's construction
def test_a_module_of_a_one_token_vocabulary_is_built_and_validated() -> None:
    """model.vocab_size=1 is a valid model (its bounds start at 1), but LanguageModelModule (and so
    save_model_checkpoint of such a model) failed in torchmetrics with 'Expected argument `num_classes`
    to be an integer larger than 1, but got 1', naming nothing of innerloop's. Every next token is then
    token 0: accuracy 1, loss 0."""
    from dataclasses import replace

    from trainer_testing import SMALL_MODEL

    from innerloop.train import LanguageModelModule

    module = LanguageModelModule(replace(SMALL_MODEL, vocab_size=1), diagnostics_batches=0).eval()
    targets = torch.zeros(2, 5, dtype=torch.long)
    targets[0, 0] = -100
    with torch.no_grad():
        module._evaluate_batch((torch.zeros(2, 5, dtype=torch.long), targets), 0)
    assert float(module._accuracy()) == 1.0 and float(module.val_ppl.mean_loss()) == 0.0
    assert module.val_ppl.scored_tokens() == 9


def test_validation_accuracy_of_argmax_ids_counts_as_of_logits() -> None:
    """val_acc is given the logits' argmax ids (a one-token vocabulary has no two classes of logits):
    the same counts as torchmetrics' own argmax of the logits, ties (argmax takes the first) and NaN
    rows included."""
    from torchmetrics.classification import MulticlassAccuracy

    torch.manual_seed(0)
    logits = torch.randint(0, 3, (64, 6)).float()  # many ties
    logits[5] = float("nan")
    logits[7, 2] = float("nan")
    targets = torch.randint(0, 6, (64,))
    targets[:4] = -100
    of_logits, of_ids = (MulticlassAccuracy(6, average="micro", ignore_index=-100) for _ in range(2))
    of_logits.update(logits, targets)
    of_ids.update(logits.argmax(dim=-1), targets)
    assert (of_logits.tp.sum(), of_logits.fn.sum()) == (of_ids.tp.sum(), of_ids.fn.sum())
