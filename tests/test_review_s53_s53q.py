"""Review s53q: leftovers of the s53 reviews.

- Hugging Face ``generate(do_sample=True, temperature=1e-45)`` (and 1e-300) raised torch's "probability
  tensor contains either inf, nan or element < 0": transformers divides the float32 scores by the
  temperature, which overflows. The temperature warper now shifts an overflowing row by its largest
  score in float64 first, as ``innerloop.models.generate`` does: every positive temperature samples.
- ``Float64Perplexity.merge_state`` of a perplexity with another ``ignore_index`` added the sums without a
  word; refused now, naming both values.
"""

from __future__ import annotations

import re

import pytest
import torch


@pytest.mark.parametrize("temperature", [1e-45, 1e-300])
def test_temperature_warper_is_exact_for_a_tiny_temperature(temperature: float) -> None:
    """An overflowing row is shifted by its max (ties keep 0, the rest -inf); -inf stays -inf."""
    from innerloop.hf.modeling import ShiftedTemperatureLogitsWarper

    scores = torch.tensor([[1.0, 3.0, 3.0, float("-inf")], [2.0, -1.0, 0.5, 0.0]])
    out = ShiftedTemperatureLogitsWarper(temperature)(torch.zeros(2, 1, dtype=torch.long), scores)
    inf = float("inf")
    assert out.tolist() == [[-inf, 0.0, 0.0, -inf], [0.0, -inf, -inf, -inf]]
    assert torch.softmax(out, dim=-1)[0].tolist() == [0.0, 0.5, 0.5, 0.0]


def test_temperature_warper_keeps_transformers_scores_where_they_are_finite() -> None:
    """Rows transformers' division keeps finite are ``scores / temperature`` bit for bit (output_scores
    unchanged there), in a batch where another row overflows and is shifted."""
    from innerloop.hf.modeling import ShiftedTemperatureLogitsWarper

    scores = torch.tensor([[1e-8, -2e-8, 0.0], [5.0, 1.0, -3.0]])
    out = ShiftedTemperatureLogitsWarper(1e-40)(torch.zeros(2, 1, dtype=torch.long), scores)
    assert torch.equal(out[0], scores[0] / 1e-40)
    assert out[1].tolist() == [0.0, float("-inf"), float("-inf")]
    for temperature in (0.7, 1e-30):
        kept = ShiftedTemperatureLogitsWarper(temperature)(torch.zeros(2, 1, dtype=torch.long), scores)
        assert torch.equal(kept, scores / temperature)


@pytest.mark.slow  # three short generate() calls: about 1 s on a loaded CPU
def test_hf_generate_samples_the_most_likely_token_at_a_tiny_temperature(tiny_hf_model) -> None:
    """Seen failing: temperature=1e-45 and 1e-300 raised torch's 'probability tensor contains either
    inf, nan or element < 0'. Now they sample what greedy decoding picks, as innerloop.models.generate
    does, and the scores returned are the shifted ones (0 for the token sampled)."""
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    greedy = tiny_hf_model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    for temperature in (1e-45, 1e-300):
        out = tiny_hf_model.generate(
            ids,
            max_new_tokens=3,
            do_sample=True,
            temperature=temperature,
            pad_token_id=0,
            output_scores=True,
            return_dict_in_generate=True,
        )
        assert torch.equal(out.sequences, greedy)
        first = out.scores[0]  # [2, vocab]
        assert first.gather(-1, greedy[:, 3:4]).flatten().tolist() == [0.0, 0.0]
        assert bool(torch.isfinite(torch.softmax(first, dim=-1)).all())


def test_perplexity_merge_state_refuses_another_ignore_index() -> None:
    """Seen failing: merging a perplexity that skips id 0 into one that scores it added the sums without
    a word (a mean over tokens one of them never scored). Refused, naming both values; one setting alike
    still merges."""
    from innerloop.train.metrics import Float64Perplexity

    torch.manual_seed(0)
    logits, target = torch.randn(1, 4, 5), torch.tensor([[0, 1, 0, 2]])
    scoring, skipping, also_skipping = (
        Float64Perplexity(),
        Float64Perplexity(ignore_index=0),
        Float64Perplexity(0),
    )
    for metric in (scoring, skipping, also_skipping):
        metric.update(logits, target)
    with pytest.raises(ValueError, match=r"ignore_index=None and the incoming one ignore_index=0"):
        scoring.merge_state(skipping)
    assert scoring.scored_tokens() == 4
    skipping.merge_state(also_skipping)
    assert skipping.scored_tokens() == 4


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"init": float("nan")}, "TTTBaseLRWarmup: init=nan"),
        ({"init": -0.1}, "TTTBaseLRWarmup: init=-0.1"),
        ({"peak": float("inf")}, "TTTBaseLRWarmup: peak=inf"),
        ({"warmup_steps": 2.5}, "TTTBaseLRWarmup: warmup_steps=2.5"),
        ({"warmup_steps": -1}, "TTTBaseLRWarmup: warmup_steps=-1"),
    ],
)
def test_ttt_base_lr_warmup_checks_its_arguments_when_built(arguments, named) -> None:
    """Seen failing: each was taken, and a NaN init refused only by the layer at the first training
    batch ('base_lr must be a finite number >= 0, got nan'), naming neither the callback nor init."""
    from innerloop.train.schedules import TTTBaseLRWarmup

    with pytest.raises(ValueError, match=re.escape(named)):
        TTTBaseLRWarmup(**({"init": 0.0, "peak": 1.0, "warmup_steps": 10} | arguments))


def test_ttt_base_lr_and_make_schedule_check_their_arguments() -> None:
    """Seen failing: ttt_base_lr(0, nan, 1.0, 10) returned nan; make_schedule('cosine', lr=nan) was built
    and refused only at its first step. Both now name the argument; good ones keep their values."""
    from innerloop.train.schedules import TTTBaseLRWarmup, make_schedule, ttt_base_lr

    with pytest.raises(ValueError, match=re.escape("ttt_base_lr: init=nan")):
        ttt_base_lr(0, float("nan"), 1.0, 10)
    with pytest.raises(ValueError, match=re.escape("lr=nan")):
        make_schedule("cosine", 10, 100, float("nan"), 0.0)
    assert ttt_base_lr(5, 0.0, 1.0, 10) == 0.5
    assert ttt_base_lr(3, 0.25, 1.0, 0) == 1.0
    assert make_schedule("wsd", 10, 100, 1.0, 0.0, 20)(4) == 0.5
    warmup = TTTBaseLRWarmup(0, 1, 10)  # ints taken as the config gives them
    assert (warmup.init, warmup.peak, warmup.warmup_steps) == (0.0, 1.0, 10)


@pytest.mark.parametrize("factor", ["2", None, True, 1.0, float("nan")])
def test_training_throughput_names_a_bad_collapse_factor(factor) -> None:
    """Seen failing (all five): "2" and None raised a bare TypeError "'>' not supported between instances of 'str'
    and 'int'", naming nothing. Now a ValueError naming the callback, the parameter and the value."""
    from innerloop.train.throughput import TrainingThroughput

    with pytest.raises(
        ValueError, match=re.escape(f"TrainingThroughput: collapse_factor={factor!r} must be")
    ):
        TrainingThroughput(collapse_factor=factor)
    assert TrainingThroughput(collapse_factor=float("inf")).collapse_factor == float("inf")  # never warns
