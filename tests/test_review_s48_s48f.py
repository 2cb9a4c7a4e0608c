"""Review s48f: fair comparisons (issue 14), against cases nobody listed.

- ``innerloop compare``'s size note judged "more than 5%" of the smaller count but printed its
  percentage of the baseline's: a model 5.29% smaller than the baseline was named as "5.03% fewer",
  and one 5.10% smaller than a 1,051-parameter baseline as "4.85% fewer", below the tolerance it broke.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from innerloop.train.compare import ComparedModel, size_notes


def _model(name: str, parameters: int, tokens: int | None = None) -> ComparedModel:
    return ComparedModel(name, Path(f"{name}.safetensors"), None, parameters, tokens, None)  # type: ignore[arg-type]


@pytest.mark.parametrize("baseline", [0, 1])
def test_the_size_note_gives_its_percentage_of_the_smaller_count_as_its_verdict_does(baseline) -> None:
    pair = [_model("ttt", 9_788), _model("swa", 9_296)]  # 492 apart: 5.29% of swa's, 5.03% of ttt's
    (note,) = size_notes(pair, baseline)
    assert "5.29% more" in note and "5.03%" not in note
    pair = [_model("a", 1_000), _model("b", 1_051)]  # 5.10% of a's, 4.85% of b's: named, so past 5%
    (note,) = size_notes(pair, baseline)
    assert "5.10% more" in note and "4.85%" not in note


def test_the_size_note_says_which_model_is_larger_whichever_is_the_baseline() -> None:
    models = [_model("ttt", 118_760), _model("attn", 302_720), _model("small", 112_000)]
    assert size_notes(models, 0) == [
        "attn has 302,720 parameters, 2.55x the baseline ttt's 118,760: its difference is also one of size",
        "small has 112,000 parameters; the baseline ttt has 6.04% more, 118,760: its "
        "difference is also one of size",
    ]
    assert size_notes(models[:2], 1) == [
        "ttt has 118,760 parameters; the baseline attn has 2.55x as many, 302,720: its "
        "difference is also one of size",
    ]
