"""Review s50i of s50's two rule changes (bf16-true float32 islands; config kinds; '~' in every reader)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from innerloop.checkpoints import is_safetensors_file, load_checkpoint, save_checkpoint
from innerloop.config.load import ConfigError, load_config, validate_run_config
from innerloop.config.schema import RunConfig
from innerloop.core.functional import user_path
from innerloop.data.text import resolve_files

NO_SUCH_USER = "~nosuchuser-s50i"  # '~NAME' of a user that does not exist: os.path.expanduser leaves it


@pytest.mark.parametrize("given", ["./~x/m.safetensors", "~x", f"{NO_SUCH_USER}/m.safetensors", "a/~b"])
def test_user_path_keeps_a_tilde_name_that_names_no_home_folder(given):
    # os.path.expanduser's rule: only a leading '~' or '~USER' of a known user is a home folder; pathlib's
    # expanduser raised RuntimeError('Could not determine home directory.') for './~x' (it drops the './')
    assert user_path(given) == Path(os.path.expanduser(given))


def test_user_path_reads_a_leading_tilde_as_the_home_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert user_path("~/m.safetensors") == tmp_path / "m.safetensors"


def test_a_checkpoint_in_a_folder_named_tilde_something_is_written_and_read(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    written = save_checkpoint({"state_dict": {}}, "./~runs/last.safetensors")
    assert written.resolve() == (tmp_path / "~runs" / "last.safetensors").resolve()
    assert is_safetensors_file("./~runs/last.safetensors")
    assert load_checkpoint("./~runs/last.safetensors")["state_dict"] == {}


def test_is_safetensors_file_is_false_for_an_unknown_users_folder():
    assert is_safetensors_file(f"{NO_SUCH_USER}/m.safetensors") is False  # 'False for anything unreadable'


def test_a_data_file_whose_name_starts_with_tilde_is_found(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "~notes.txt").write_text("hello", encoding="utf-8")
    assert [p.name for p in resolve_files(["./~notes.txt"])] == ["~notes.txt"]


@pytest.mark.parametrize("key", ["grad_clip", "lr"])
def test_an_integer_too_large_for_a_float_key_is_named(key):
    run = RunConfig()
    setattr(run.optim, key, 10**400)  # int(float('inf')) cannot be; math.isfinite raised OverflowError
    with pytest.raises(ConfigError, match=rf"optim\.{key}=\d+ \(int\) must be a finite number"):
        validate_run_config(run)


@pytest.mark.parametrize("text", ["9" * 400, "-" + "9" * 400], ids=["positive", "negative"])
def test_an_override_integer_too_large_for_a_float_key_is_named(monkeypatch, tmp_path, text):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("hello world " * 400, encoding="utf-8")
    # omegaconf's float(...) of the text raised a bare OverflowError before any check of innerloop's
    with pytest.raises(
        ConfigError, match=r"config key 'optim\.grad_clip' in override .* is not a decimal number"
    ):
        load_config("tiny", ["data.paths=[a.txt]", f"optim.grad_clip={text}"])
