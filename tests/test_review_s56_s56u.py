"""Review s56u: the command line under hostile input (repeated flags, the examples its help prints)."""

from __future__ import annotations

import shlex

import pytest

from innerloop.cli import _TRAIN_EPILOG, _parse_intermixed, _parser
from innerloop.config.load import load_config


@pytest.mark.parametrize(
    ("argv", "dest", "expected"),
    [
        (["eval", "ck", "--data", "a.txt", "--data", "b.txt"], "data", ["a.txt", "b.txt"]),
        (["compare", "x", "y", "--data", "a.txt", "--data", "b", "c"], "data", ["a.txt", "b", "c"]),
        (["compare", "x", "y", "--seq-len", "8", "--seq-len", "16"], "seq_len", [8, 16]),
    ],
)
def test_a_repeated_option_of_several_values_keeps_every_value(argv, dest, expected) -> None:
    """``eval ck --data a.txt --data b.txt`` evaluated b.txt alone and said nothing (argparse's store
    replaces the first list): a perplexity of other data than asked. Each use now adds its values."""
    assert getattr(_parse_intermixed(_parser(), argv), dest) == expected


def test_an_option_of_several_values_given_once_or_not_keeps_its_default() -> None:
    parser = _parser()
    assert _parse_intermixed(parser, ["eval", "ck"]).data == []
    assert _parse_intermixed(parser, ["compare", "x", "y"]).seq_len is None
    assert _parse_intermixed(parser, ["compare", "x", "y"]).data == []
    assert _parse_intermixed(parser, ["compare", "x", "y", "--seq-len", "8", "16"]).seq_len == [8, 16]


def test_every_train_example_the_help_prints_parses_and_loads() -> None:
    """The examples of ``innerloop train --help``'s epilog parse and give a valid config (parse only: a
    run takes seconds)."""
    examples = [line.strip() for line in _TRAIN_EPILOG.splitlines() if line.strip().startswith("innerloop ")]
    assert len(examples) == 3
    for example in examples:
        args = _parse_intermixed(_parser(), shlex.split(example)[1:])
        assert args.command == "train"
        load_config(args.config or "tiny", args.overrides)
