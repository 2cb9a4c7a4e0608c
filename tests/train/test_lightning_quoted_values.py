"""A quoted value of one of Lightning's own Trainer arguments is read on its text, as a quoted value of
innerloop's own keys is (tests/train/test_config_kinds.py): ``trainer.num_sanity_val_steps: "2"`` is
the int 2, ``deterministic: "true"`` is true; a quoted value whose text is not of the argument's kind
(``"2.5"`` for an int, ``"yes"`` for a bool) is refused, naming the key, the value and what is valid.
"""

from __future__ import annotations

import re
import typing

import pytest

from innerloop.config.load import ConfigError, _text_fits, load_config, read_run_config, save_config
from innerloop.config.trainer_args import value_of_its_kind

# Loading a config with Lightning's arguments imports lightning.Trainer for their types (seconds).
LIGHTNING_IMPORT = pytest.mark.slow  # reason: the first use of trainer_arguments() imports Lightning

TEXTS = [
    *("0", "2", "-1", "+7", "10_000", "007", "0x10", "0o7", "0b1", "1_", "２", "1e3", "2.5", ".5", "5."),
    *("3e-4", "-.5E+2", "inf", "-Infinity", "nan", "1:30", "true", "True", "TRUE", "false", "FALSE"),
    *("yes", "no", "on", "off", "y", "tRUE", "null", "~", "", " 2", "2 ", "warn"),
]


@pytest.mark.parametrize("kind", [int, float, bool])
def test_a_text_is_read_as_its_kind_exactly_when_innerloops_own_keys_take_it(kind) -> None:
    """value_of_its_kind reads a quoted text exactly where load.py takes it for its own keys."""
    for text in TEXTS:
        value = value_of_its_kind(text, kind | None)
        assert (value is not text) == _text_fits(text, (kind, type(None)), quoted=True), text
        if value is not text:
            assert type(value) is kind, text


def test_a_text_becomes_the_value_it_reads_as() -> None:
    assert value_of_its_kind("10_000", int) == 10_000 and value_of_its_kind("+7", int | None) == 7
    assert value_of_its_kind("2", float) == 2.0 and type(value_of_its_kind("2", float)) is float
    assert (
        value_of_its_kind("2", int | float | None) == 2 and type(value_of_its_kind("2", int | float)) is int
    )
    assert value_of_its_kind("3e-4", float) == 3e-4
    assert value_of_its_kind("FALSE", bool) is False and value_of_its_kind("True", bool | None) is True
    warn = bool | typing.Literal["warn"] | None
    assert value_of_its_kind("warn", warn) == "warn" and value_of_its_kind("true", warn) is True
    assert value_of_its_kind("16", typing.Literal[64, 32, 16]) == 16
    for text, annotation in [("null", int | None), ("", int | None), ("2", str | int), ("2", list[int])]:
        assert value_of_its_kind(text, annotation) == text  # a quoted null, or a type with strings in it
    assert value_of_its_kind(2, int) == 2 and value_of_its_kind(True, int) is True  # not text: as it is


@LIGHTNING_IMPORT
def test_a_quoted_lightning_argument_of_its_kind_loads_as_that_kind(tmp_path) -> None:
    config = tmp_path / "mine.yaml"
    config.write_text(
        'trainer:\n  num_sanity_val_steps: "2"\n  deterministic: "true"\n  accumulate_grad_batches: \'3\'\n'
        '  lightning:\n    benchmark: "false"\n    enable_model_summary: False\n'
    )
    expected = {
        "num_sanity_val_steps": 2,
        "deterministic": True,
        "accumulate_grad_batches": 3,
        "benchmark": False,
        "enable_model_summary": False,
    }
    run, cfg = load_config(str(config), [f"out_dir={tmp_path / 'run'}"])
    assert run.trainer.lightning == expected
    assert all(type(run.trainer.lightning[k]) is type(v) for k, v in expected.items())
    saved = save_config(cfg, tmp_path / "config.yaml")  # what a resume reads: the same values
    assert read_run_config(saved).trainer.lightning == expected
    override, _ = load_config(
        "tiny", ['trainer.num_sanity_val_steps="2"', "trainer.lightning.benchmark='true'"]
    )
    assert override.trainer.lightning == {"num_sanity_val_steps": 2, "benchmark": True}


@LIGHTNING_IMPORT
def test_an_interpolation_of_text_of_its_kind_loads_as_that_kind(monkeypatch) -> None:
    """An environment variable's value is text, as a quoted value is: read the same way."""
    monkeypatch.setenv("INNERLOOP_TEST_SANITY_STEPS", "3")
    run, _ = load_config("tiny", ["trainer.num_sanity_val_steps=${oc.env:INNERLOOP_TEST_SANITY_STEPS}"])
    assert run.trainer.lightning == {"num_sanity_val_steps": 3}


@LIGHTNING_IMPORT
@pytest.mark.parametrize(
    ("override", "valid"),
    [
        (
            'trainer.num_sanity_val_steps="2.5"',
            "must be int or null (lightning.Trainer's num_sanity_val_steps)",
        ),
        (
            "trainer.accumulate_grad_batches='0x10'",
            "must be int (lightning.Trainer's accumulate_grad_batches)",
        ),
        ("trainer.deterministic='yes'", "must be bool or 'warn' or null (lightning.Trainer's deterministic)"),
        ("trainer.lightning.benchmark='on'", "must be bool or null (lightning.Trainer's benchmark)"),
        ("trainer.num_sanity_val_steps='null'", "must be int or null"),
    ],
)
def test_a_quoted_lightning_argument_not_of_its_kind_is_refused(override, valid) -> None:
    key, _, value = override.partition("=")
    name = key.split(".")[-1]
    with pytest.raises(ConfigError, match=re.escape(f"trainer.{name}={value[1:-1]!r} {valid}")) as caught:
        load_config("tiny", [override])
    assert "a quoted value is read on its text, which must be of that kind" in str(caught.value)
    if value[1:-1] == "null":
        assert "a quoted null is a string: write null unquoted" in str(caught.value)
