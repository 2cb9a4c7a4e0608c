"""s51k: the public strategies' simplest example is a rich one, and the property tests built on them fail
under the mutations they guard against.

Hypothesis's first example is its simplest (``st.integers(1, n)`` gives 1, ``st.booleans()`` False,
``st.lists`` the empty list) and, under the suite's derandomized ``ci`` profile, a test with 2 or 3
examples spent one of them on one token, one head, a mini-batch of 1, no split: a layer that dropped
its state between chunks passed it. :func:`hypothesis.find` with an always-true condition returns that
simplest example.
"""

from __future__ import annotations

from hypothesis import Phase, find, settings
from hypothesis import strategies as st

from innerloop.testing.strategies import layer_configs, problems, rich_first_integers, split_points, views

#: The first example only: no shrinking (which ran ~10 s looking for a simpler one) and no database.
FIRST_EXAMPLE = settings(max_examples=1, phases=(Phase.generate,), database=None, derandomize=True)


def _simplest(strategy: st.SearchStrategy) -> object:
    return find(strategy, lambda _: True, settings=FIRST_EXAMPLE)


def test_the_simplest_layer_config_has_heads_a_mini_batch_and_every_option_on():
    config = _simplest(layer_configs())
    assert config["num_heads"] == 2 and config["mini_batch_size"] == 3
    assert config["use_gate"] and config["share_qk"] and config["conv_kernel"] == 3
    narrow = _simplest(layer_configs(max_heads=1, max_mini_batch=2))  # clipped into the range asked for
    assert narrow["num_heads"] == 1 and narrow["mini_batch_size"] == 2


def test_the_simplest_split_cuts_the_sequence():
    assert _simplest(split_points(8)) == [2, 5]
    assert _simplest(split_points(2)) == [1]
    assert _simplest(split_points(3, max_cuts=1)) == [1]
    assert _simplest(split_points(9, max_cuts=0)) == [] and _simplest(split_points(1)) == []


def test_the_simplest_problem_and_views_have_several_heads_tokens_and_mini_batches():
    assert _simplest(problems()) == {
        "batch": 2,
        "heads": 2,
        "head_dim": 5,
        "tokens": 13,
        "mini_batch_size": 3,
    }
    assert tuple(_simplest(views()).query.shape) == (2, 2, 13, 5)
    assert _simplest(problems(max_tokens=4, max_heads=1))["tokens"] == 4


def test_rich_first_integers_draws_every_value_of_the_range():
    assert _simplest(rich_first_integers(0, 10**9, 7)) == 7  # past the listed range: one_of
    every = settings(max_examples=200, phases=(Phase.generate,), database=None, derandomize=True)
    assert find(rich_first_integers(1, 6, 3), lambda value: value == 1, settings=every) == 1
    assert find(rich_first_integers(0, 10**9, 7), lambda value: value > 10**8, settings=every) > 10**8
