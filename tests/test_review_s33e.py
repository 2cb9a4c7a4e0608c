"""Review s33e: the last look at session 33's change (checks that refused input that worked before)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from innerloop.checkpoints import CheckpointError
from innerloop.config.load import ConfigError
from innerloop.train.compare import compare
from innerloop.train.metrics import InnerLossDiagnostics, LossByPosition, position_buckets
from innerloop.train.run import evaluate


def test_evaluate_takes_paths_none_as_the_runs_own_windows(tmp_path) -> None:
    """paths=None meant 'no paths: the run's validation windows' before session 33's path check, which
    refused it ('paths=None must be a path or a list of paths'): the checkpoint is what is wrong here."""
    with pytest.raises(CheckpointError, match="does not exist"):
        evaluate(str(tmp_path / "missing.ckpt"), paths=None)


def test_compare_takes_paths_none_as_the_baselines_windows(tmp_path) -> None:
    with pytest.raises(ConfigError, match="missing.ckpt' is neither a run folder"):
        compare([str(tmp_path / "missing.ckpt")], paths=None)


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: InnerLossDiagnostics(num_layers=torch.tensor(2.0)), "num_layers"),
        (lambda: LossByPosition(num_buckets=torch.tensor(2.5)), "num_buckets"),
        (lambda: position_buckets(torch.tensor(True), 3), "seq_len"),
        (lambda: position_buckets(8, torch.tensor(True)), "num_buckets"),
    ],
)
def test_metric_counts_refuse_float_and_bool_tensors_by_name(make, name) -> None:
    """A float tensor has ``__index__`` (which raises when called): InnerLossDiagnostics failed inside
    torch.zeros, LossByPosition took 2.5 buckets; a bool tensor was read as one position or bucket."""
    with pytest.raises(ValueError, match=f"{name}=tensor.* must be .*integer"):
        make()


def test_metric_counts_take_numpy_and_0d_integer_tensors() -> None:
    assert InnerLossDiagnostics(num_layers=torch.tensor(2)).num_layers == 2
    assert LossByPosition(num_buckets=np.int64(3)).num_buckets == 3
    assert position_buckets(torch.tensor(4), np.int32(2)) == [(0, 2), (2, 4)]


def test_check_update_rule_takes_a_numpy_float32_tolerance() -> None:
    """Session 33's tolerance check took only int and float: np.float32(1e-6), which worked before, was
    refused as 'not a finite number'."""
    from innerloop.testing.checks import _refuse_variant_kwargs

    _refuse_variant_kwargs("check_update_rule", {}, np.float32(1e-6))
    with pytest.raises(ValueError, match="tolerance must be a finite number >= 0.*nan"):
        _refuse_variant_kwargs("check_update_rule", {}, np.float32("nan"))


def test_check_flag_takes_numpys_bool_and_names_other_types() -> None:
    """check_flag took numpy's bool before session 33 (no_ttt=np.False_ from an array's element) and
    refused it after; it takes it again. A string, a tensor or a list is refused naming its type."""
    from innerloop.core.functional import check_flag

    check_flag("no_ttt", np.False_)
    check_flag("no_ttt", np.bool_(True))
    assert LossByPosition(varying_lengths=np.True_).varying_lengths is True  # stored as Python's bool
    with pytest.raises(TypeError, match=r"resume='false' \(str\) must be True or False"):
        check_flag("resume", "false")
    with pytest.raises(TypeError, match=r"resume=tensor\(False\) \(torch.Tensor\) must be True or False"):
        check_flag("resume", torch.tensor(False))
    with pytest.raises(TypeError, match=r"resume=\[False\] \(list\) must be True or False"):
        check_flag("resume", [False])


def test_evaluate_takes_a_0d_integer_tensor_size_again(tmp_path) -> None:
    """Session 33's integer check (numbers.Integral) refused seq_len=torch.tensor(16), which evaluated
    before (perplexity as at seq_len=16); a float or bool tensor is still refused by name."""
    missing = str(tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointError, match="does not exist"):
        evaluate(missing, seq_len=torch.tensor(16), batch_size=np.int64(2), batches=torch.tensor(1))
    for bad in (torch.tensor(16.0), torch.tensor(True), 16.0):
        with pytest.raises(ValueError, match=r"seq_len=.* must be an integer in \[1, 1073741824\]"):
            evaluate(missing, seq_len=bad)


def test_auto_names_training_only_not_a_missing_decode_step_for_a_decoded_token() -> None:
    """c46d324: a decoded token without a graph whose only kernel with a decode step is ``training_only``
    was told 'no kernel registered ... has a decode step', naming the wrong reason."""
    from types import SimpleNamespace

    from innerloop.kernels.dispatch import _best

    task = SimpleNamespace(model=SimpleNamespace(name="m"), loss=SimpleNamespace(name="l"))
    inputs = SimpleNamespace(extra={"decode": True}, requires_grad=False)
    with_decode = SimpleNamespace(name="k_decode", decode=object(), training_only=True)
    without = SimpleNamespace(name="k_plain", decode=None, training_only=False)
    rule = SimpleNamespace(name="r")
    _, reason = _best([], inputs, task, rule, [with_decode, without])
    assert "train only and this block records no graph" in reason, reason
    _, reason = _best([], inputs, task, rule, [without])
    assert "has a decode step" in reason, reason
