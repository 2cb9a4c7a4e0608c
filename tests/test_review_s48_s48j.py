"""Review s48j: every config key under hostile values (the sweep is /tmp/s48j/walk.py; its table is in
the session's report). These are the defects it found."""

from __future__ import annotations

import pytest

from innerloop.config import ConfigError, load_config

# -- a string key given an unquoted scalar that YAML reads as a number or a bool --------------------------
# OmegaConf stored str() of what YAML made of it: out_dir=010 trained into runs '8' (octal), 1.10 into
# '1.1', 1:30 into '90' (sexagesimal), on into 'True'. Silently another folder, path or name.


@pytest.mark.parametrize(
    ("override", "stored"),
    [
        ("out_dir=010", "8"),
        ("out_dir=1.10", "1.1"),
        ("out_dir=1:30", "90"),
        ("out_dir=on", "True"),
        ("out_dir=1_000", "1000"),
        ("out_dir=1e3", "1000.0"),
        ("data.paths=[1.10]", "1.1"),
        ("data.tokenizer=0x1F", "31"),
    ],
)
def test_string_key_given_a_yaml_number_or_bool_that_changes_its_text_is_refused(override, stored, tmp_path):
    key, _, text = override.partition("=")
    text = text.strip("[]")
    with pytest.raises(ConfigError) as caught:
        load_config("tiny", [override, f"out_dir={tmp_path}" if key != "out_dir" else "seed=0"])
    message = str(caught.value)
    assert "\n" not in message
    assert key in message and text in message and repr(stored) in message and "quote" in message


@pytest.mark.parametrize("value", ["7", "2024-01-15", "'010'", '"1.10"', "abc", "nan"])
def test_string_key_given_a_scalar_that_keeps_its_text_is_accepted(value):
    run, _ = load_config("tiny", [f"out_dir={value}"], model_only=True)  # model_only: no Lightning import
    assert run.out_dir == value.strip("'\"")


def test_string_key_in_a_yaml_file_given_a_yaml_number_is_refused(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("out_dir: 010\n")
    with pytest.raises(ConfigError, match=r"out_dir.*010.*'8'.*quote"):
        load_config(str(config))
