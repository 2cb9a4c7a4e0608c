"""Review s50j: carried small items.

- innerloop's own tokenizers (:class:`innerloop.data.tokenizer.Tokenizer`) read a path as every other
  innerloop writer and reader does (:func:`innerloop.core.functional.user_path`): ``save_pretrained('~/x')``
  wrote ``./~/x`` while ``load_tokenizer('~/x')`` reads the home folder's ``x``.
- :func:`innerloop.config.load_config` called from Python named its argument ``--config`` (the CLI's
  name) in its errors; it names the parameter as the caller gave it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from innerloop.config.load import ConfigError, load_config
from innerloop.data.tokenizer import ByteTokenizer, load_tokenizer


def test_tokenizer_save_pretrained_expands_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    written = ByteTokenizer().save_pretrained("~/tok")
    assert (home / "tok" / "tokenizer.json").is_file(), written
    assert not (work / "~").exists()
    assert all(path.parent == home / "tok" for path in written)
    assert load_tokenizer("~/tok").vocab_size >= 256  # the reader finds what the writer wrote


def test_load_config_names_its_python_parameter() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config("no-such-preset-s50j")
    message = str(caught.value)
    assert "--config" not in message, message
    assert "preset_or_file='no-such-preset-s50j'" in message, message


def test_load_config_names_the_cli_option_when_told() -> None:
    with pytest.raises(ConfigError, match=r"^--config 'no-such-preset-s50j' is neither a file nor a preset"):
        load_config("no-such-preset-s50j", option="--config")


def test_loss_by_position_csv_expands_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from innerloop.train.plots import read_loss_by_position_csv, write_loss_by_position_csv

    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    written = write_loss_by_position_csv("~/loss.csv", [(0, 4)], [1.5])
    assert written == home / "loss.csv" and written.is_file()
    assert not (work / "~").exists()
    assert read_loss_by_position_csv("~/loss.csv") == ([(0, 4)], [1.5])


def test_load_config_names_a_shadowed_preset_as_its_caller_gave_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").write_text("trainer: {max_steps: 3}\n")
    with pytest.raises(ConfigError) as caught:
        load_config("tiny")
    message = str(caught.value)
    assert "--config" not in message, message
    assert "preset_or_file='tiny' is both a preset and a file" in message, message
    assert "write preset_or_file='./tiny' for the file" in message, message
