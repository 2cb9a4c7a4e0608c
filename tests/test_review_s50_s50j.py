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
    from innerloop.config.load import PRESET_OR_FILE, command_line_options

    with pytest.raises(ConfigError, match=r"^--config 'no-such-preset-s50j' is neither a file nor a preset"):
        with command_line_options({PRESET_OR_FILE: "--config"}):  # as the command line calls it
            load_config("no-such-preset-s50j")


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


def _checkpoint_in(path: Path, dtype) -> Path:
    """A TTT-E2E checkpoint whose floating weights are stored in ``dtype`` (a ``*-true`` run's)."""
    import torch

    from innerloop.checkpoints import MODEL_PREFIX, save_checkpoint
    from innerloop.models import build_model
    from innerloop.models.config import ModelConfig

    torch.manual_seed(0)
    config = ModelConfig(
        mixer="e2e", hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, window=4
    )
    model = build_model(config)
    state_dict = {
        MODEL_PREFIX + k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()
    }
    save_checkpoint({"hyper_parameters": {"model": config.to_dict()}, "state_dict": state_dict}, path)
    return path


@pytest.mark.slow  # a model built, saved three times, loaded and sampled: ~1.2 s
def test_generate_of_a_bf16_checkpoint_says_it_runs_in_float32(tmp_path: Path, capsys) -> None:
    import torch

    from innerloop.checkpoints import dtype_note, load_model, stored_weights_dtype
    from innerloop.cli import main

    bf16 = _checkpoint_in(tmp_path / "bf16.safetensors", torch.bfloat16)
    assert stored_weights_dtype(bf16) == torch.bfloat16
    loaded = load_model(bf16)
    assert (
        loaded.embed.weight.dtype == torch.float32 and loaded.outer_progress.dtype == torch.float64
    )  # as docs say
    assert main(["generate", str(bf16), "--prompt", "a", "--tokens", "2", "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    assert (
        "innerloop generate: note: the checkpoint's weights are stored in bfloat16; they run upcast to float32"
        in err
    )
    fp32 = _checkpoint_in(tmp_path / "fp32.safetensors", torch.float32)
    assert stored_weights_dtype(fp32) == torch.float32 and dtype_note(fp32) is None
    assert dtype_note(_checkpoint_in(tmp_path / "fp64.safetensors", torch.float64)) is None  # runs as stored
