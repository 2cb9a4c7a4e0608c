"""A resume of a run whose model uses a plugin that is no longer installed fails on the run's saved config
(it names the plugin, ``model.ttt.inner_loss=...``) before the checkpoint is read; the error then says
where the plugin came from, as the checkpoint records it (its distribution and version), as ``innerloop
eval``, ``export`` and ``load_model`` do (review s11, resume)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from plugin_testing import NAME, TargetsAsGiven

from innerloop.cli import main
from innerloop.config import load_config
from innerloop.config.load import ConfigError, save_config
from innerloop.models import build_model
from innerloop.registry import hookimpl, isolated_registry, manager, reset_registry
from innerloop.train.module import save_model_checkpoint
from innerloop.train.run import PENDING_CHECKPOINT, with_missing_plugins_named

SMALL = ["model.hidden_size=16", "model.num_heads=2", "model.intermediate_size=32", "model.num_layers=1"]
FROM_WHERE = "was registered by plugin 'origins_pkg (origins-dist)' from distribution 'origins-dist' 1.0"


class _LossPlugin:
    @hookimpl
    def register_inner_losses(self, register) -> None:
        register(TargetsAsGiven())


class _EntryPoint:
    """The ``innerloop`` entry point of the installed package ``origins-dist`` 1.0."""

    name, value, group = "origins_pkg", "origins_pkg:plugin", "innerloop"
    dist = SimpleNamespace(name="origins-dist", version="1.0")

    def load(self) -> _LossPlugin:
        return _LossPlugin()


def _installed(monkeypatch, installed: bool) -> None:
    monkeypatch.setattr(manager, "_entry_points", lambda: [_EntryPoint()] if installed else [])
    monkeypatch.delenv(manager.DISABLE_ENV, raising=False)
    monkeypatch.delenv(manager.ALLOW_ENV, raising=False)
    reset_registry()


@pytest.fixture
def run_without_its_plugin(monkeypatch, tmp_path: Path):
    """A run's out_dir (config.yaml, last.safetensors) whose inner loss came from ``origins-dist``, which
    is uninstalled since."""
    with isolated_registry():
        _installed(monkeypatch, True)
        out = tmp_path / "run"
        out.mkdir()
        run, cfg = load_config("tiny", [*SMALL, f"model.ttt.inner_loss={NAME}", f"out_dir={out}"])
        save_config(cfg, out / "config.yaml")
        save_model_checkpoint(build_model(run.model), out / "last.safetensors")
        _installed(monkeypatch, False)
        yield out


def test_the_error_of_reading_the_runs_config_names_the_plugins_distribution(run_without_its_plugin) -> None:
    out = run_without_its_plugin
    with pytest.raises(ConfigError) as error:
        load_config(str(out / "config.yaml"))
    assert "distribution" not in str(error.value)  # the config alone cannot say
    named = str(with_missing_plugins_named(error.value, out))
    assert named.startswith(f"model.ttt.inner_loss={NAME!r} is not a registered inner_loss")
    assert f"when it was saved, its inner loss {NAME!r} {FROM_WHERE}: install or register it here" in named
    (out / "last.safetensors").rename(out / PENDING_CHECKPOINT)  # a resume would start from this one
    assert FROM_WHERE in str(with_missing_plugins_named(error.value, out))


def test_without_a_checkpoint_that_records_it_the_error_is_left_as_it_is(run_without_its_plugin) -> None:
    out = run_without_its_plugin
    (out / "last.safetensors").unlink()
    error = ConfigError("model.ttt.inner_loss='x' is not a registered inner_loss")
    assert with_missing_plugins_named(error, out) is error


@pytest.mark.slow  # ~0.6 s: a training run, then a resume through the CLI
def test_innerloop_train_resume_names_the_plugins_distribution(run_without_its_plugin, capsys) -> None:
    out = run_without_its_plugin
    assert main(["train", "--resume", f"out_dir={out}"]) == 2
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and said[0].startswith("innerloop train: error: model.ttt.inner_loss=")
    assert FROM_WHERE in said[0]
