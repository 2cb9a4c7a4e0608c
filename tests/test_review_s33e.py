"""Review s33e: the last look at session 33's change (checks that refused input that worked before)."""

from __future__ import annotations

import pytest

from innerloop.checkpoints import CheckpointError
from innerloop.config.load import ConfigError
from innerloop.train.compare import compare
from innerloop.train.run import evaluate


def test_evaluate_takes_paths_none_as_the_runs_own_windows(tmp_path) -> None:
    """paths=None meant 'no paths: the run's validation windows' before session 33's path check, which
    refused it ('paths=None must be a path or a list of paths'): the checkpoint is what is wrong here."""
    with pytest.raises(CheckpointError, match="does not exist"):
        evaluate(str(tmp_path / "missing.ckpt"), paths=None)


def test_compare_takes_paths_none_as_the_baselines_windows(tmp_path) -> None:
    with pytest.raises(ConfigError, match="missing.ckpt' is neither a run folder"):
        compare([str(tmp_path / "missing.ckpt")], paths=None)
