"""A config source and its overrides are parsed once per process and kept by their text: every load
still sees a file's current text, and what one caller changes in its config never reaches the next."""

from __future__ import annotations

import pytest

from innerloop.config import ConfigError, load_config


def test_a_file_edited_between_two_loads_gives_its_new_values(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  hidden_size: 32\n")
    run, _ = load_config(str(path), ["model.num_heads=2"])
    assert run.model.hidden_size == 32
    path.write_text("model:\n  hidden_size: 48\n")
    run, _ = load_config(str(path), ["model.num_heads=2"])
    assert run.model.hidden_size == 48


def test_changing_a_loaded_config_changes_no_later_load():
    run, cfg = load_config("tiny", ["trainer.max_steps=7"])
    hidden, steps = run.model.hidden_size, run.trainer.max_steps
    cfg.model.hidden_size = hidden + 16
    cfg.trainer.max_steps = 1000
    cfg.model.ttt.mini_batch_size = 3
    run, cfg = load_config("tiny", ["trainer.max_steps=7"])
    assert (run.model.hidden_size, run.trainer.max_steps) == (hidden, steps)
    assert cfg.model.hidden_size == hidden and cfg.trainer.max_steps == steps
    assert cfg.model.ttt.mini_batch_size == run.model.ttt.mini_batch_size != 3


def test_a_source_that_fails_fails_every_time(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  hidden_sise: 32\n")
    for _ in range(2):
        with pytest.raises(ConfigError, match="hidden_sise"):
            load_config(str(path))
    for _ in range(2):
        with pytest.raises(ConfigError, match="hidden_sise"):
            load_config("tiny", ["model.hidden_sise=32"])
