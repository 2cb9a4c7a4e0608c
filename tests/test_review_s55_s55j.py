"""s55j: adversarial review of s55b (the --no-ttt lr-0 probe, Gated DeltaNet's measured value map), s55f
(metrics' all-or-nothing update) and s55d (generate's numbers)."""

from __future__ import annotations

import pytest
import torch

from innerloop import HalfSquaredError, LossPairs
from innerloop.core.family_layers import GatedDeltaNetLayer, value_map_mismatch
from innerloop.core.layer import TTTLayer
from innerloop.models.ablation import weights_moved_at_zero_lr
from innerloop.train.metrics import AllOrNothingAccuracy

# -- Gated DeltaNet's value map: the valid weights of the pairs were not compared ---------------------------


class _OutlierValuesSkipped(HalfSquaredError):
    """Reconstruction that skips a token whose value is an outlier (norm above 1.5 sqrt(f)): its valid
    weights read the values, so the map's values v / a make other tokens valid than the values given."""

    name = "s55j_outlier_values_skipped"

    def pairs(self, views, carry):
        limit = 1.5 * views.value.shape[-1] ** 0.5
        valid = (views.value.norm(dim=-1) < limit).to(views.value.dtype)
        return LossPairs(views.key, views.value, valid=valid)


def test_value_map_mismatch_compares_the_valid_weights_of_the_pairs():
    """Its docstring asks of pairs of v / a "the same inputs and valid"; only inputs and targets were
    compared, so a loss whose valid weights read the values passed, and Gated DeltaNet ran it on other
    tokens than its definition (the tokens whose v / a is an outlier, not v)."""
    assert value_map_mismatch(_OutlierValuesSkipped(), 8) == (
        "its valid weights read the values (pairs of v / a gave other valid weights than of v)"
    )


@pytest.mark.slow  # reason: the process registry's first build (~2 s in a fresh process; 2 ms warm)
def test_gated_deltanet_refuses_a_loss_whose_valid_weights_read_the_values(monkeypatch):
    monkeypatch.setattr("innerloop.registry.check_instance", lambda kind, instance: None)  # not under test
    with pytest.raises(ValueError, match=r"inner_loss='s55j_outlier_values_skipped', .*its valid weights"):
        GatedDeltaNetLayer(16, 2, inner_loss=_OutlierValuesSkipped(), kernel="torch")


# -- the lr-0 probe -------------------------------------------------------------------------------------


def test_weights_moved_at_zero_lr_measures_at_lr_0_whatever_the_layers_base_lr():
    """Called on a layer at base_lr 1 (its name and docstring: the rule measured at learning rate 0), it
    ran the built-in dual form at lr 1 and said it 'moves the inner weights at inner learning rate 0'."""
    torch.manual_seed(0)
    layer = TTTLayer(8, 2, mini_batch_size=2, kernel="torch")
    assert weights_moved_at_zero_lr(layer) is None
    assert layer.base_lr == 1.0


def test_the_lr_0_probe_leaves_the_layers_dispatch_record_as_it_was():
    """``dispatches`` is the last call's fast-path record; the probe's two scans appended theirs to it."""
    torch.manual_seed(0)
    layer = TTTLayer(8, 2, mini_batch_size=2, kernel="torch")
    layer.dispatches = before = [("cpu_ttt_linear", "the last call's record")]
    weights_moved_at_zero_lr(layer)
    assert layer.dispatches == before == [("cpu_ttt_linear", "the last call's record")]


# -- val_acc's class: all or nothing in update(), but a refused forward() wiped what it had ----------------


def test_all_or_nothing_accuracy_keeps_its_counts_when_a_forward_batch_is_refused():
    """Float64States.forward keeps the sums over a refused batch (torchmetrics resets the metric before
    the batch's update); AllOrNothingAccuracy (val_acc's class) is no Float64States, and its forward left
    every earlier batch's counts at 0, silently, with its settings switched (sync off)."""
    accuracy = AllOrNothingAccuracy(num_classes=5, average="micro", ignore_index=-100)
    accuracy.update(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 0, 4]))
    with pytest.raises(ValueError, match="same shape"):
        accuracy(torch.tensor([1, 2]), torch.tensor([1]))
    assert (accuracy.tp.sum().item(), accuracy.fn.sum().item(), accuracy._update_count) == (3, 1, 1)
    assert accuracy._should_unsync and accuracy._to_sync  # compute's sync on again
    assert accuracy.compute().item() == 0.75


# -- Hugging Face generate(): the settings that score tokens, not finite, ran without a word ---------------


@pytest.mark.parametrize(
    ("setting", "search"),
    [
        # a NaN bias made token 7's logit NaN, which greedy's argmax takes at every step
        ({"sequence_bias": {(7,): float("nan")}}, {}),
        ({"sequence_bias": [[[7], float("nan")]]}, {}),
        # NaN scaled every logit to NaN: token 0 at every step
        ({"guidance_scale": float("nan")}, {}),
        ({"guidance_scale": float("inf")}, {}),
        # a start that is NaN never starts the decay, silently
        ({"exponential_decay_length_penalty": (float("nan"), 1.5)}, {"eos_token_id": 3}),
        # a 0-d tensor passed the checks that took Python and numpy numbers only: 2 of the 4 tokens asked
        ({"length_penalty": torch.tensor(float("nan"))}, {"num_beams": 2}),
        ({"top_p": torch.tensor(float("nan"))}, {"do_sample": True}),
    ],
    ids=["bias-dict", "bias-list", "guidance-nan", "guidance-inf", "decay-start", "length-0d", "top_p-0d"],
)
def test_a_scoring_setting_that_is_not_a_finite_number_is_refused_by_name(tiny_hf_model, setting, search):
    name = next(iter(setting))
    prompt = torch.tensor([[1, 2, 3, 4]])
    with pytest.raises(ValueError, match=rf"generate\({name}="):
        tiny_hf_model.generate(prompt, max_new_tokens=4, **setting, **search)


@pytest.mark.slow  # reason: a beam search with three processors (~1 s on this loaded machine)
def test_finite_scoring_settings_and_a_banning_bias_still_run(tiny_hf_model):
    prompt = torch.tensor([[1, 2, 3, 4]])
    greedy = tiny_hf_model.generate(prompt, max_new_tokens=2)
    banned = int(greedy[0, 4])
    out = tiny_hf_model.generate(
        prompt,
        max_new_tokens=2,
        sequence_bias={(banned,): float("-inf")},
        length_penalty=torch.tensor(0.5),
        num_beams=2,
        exponential_decay_length_penalty=(1, 1.5),
        eos_token_id=3,
    )
    assert banned not in out[0, 4:].tolist()


# -- innerloop.models.generate: one rule for its numbers, but a 0-d numpy array only as an integer ----------


def test_generate_takes_a_0d_numpy_temperature_as_it_takes_a_0d_numpy_max_new_tokens():
    """max_new_tokens=numpy.array(2) and eos_token_id=numpy.array(3) were taken (as_integer), but
    temperature=numpy.array(0.5) was refused as '(ndarray) must be a finite real number'."""
    import numpy

    from innerloop.models.generate import _checked_sampling

    assert _checked_sampling(numpy.array(0.5), numpy.array(3), None) == (0.5, 3)
    assert _checked_sampling(numpy.array(2, dtype=numpy.int64), None, None) == (2.0, None)
    with pytest.raises(TypeError, match=r"temperature=array\(True\) \(ndarray\)"):
        _checked_sampling(numpy.array(True), None, None)
    with pytest.raises(ValueError, match=r"temperature=nan must be"):
        _checked_sampling(numpy.array(float("nan")), None, None)


def test_a_no_repeat_ngram_size_that_is_no_integer_is_refused_by_name(tiny_hf_model):
    """transformers applies it only where ``no_repeat_ngram_size > 0``, and checks it is an int there: NaN
    (not > 0) repeated n-grams freely, without a word."""
    prompt = torch.tensor([[1, 2, 3, 4]])
    with pytest.raises(ValueError, match=r"generate\(no_repeat_ngram_size=nan\): .*integer >= 0"):
        tiny_hf_model.generate(prompt, max_new_tokens=4, no_repeat_ngram_size=float("nan"))
