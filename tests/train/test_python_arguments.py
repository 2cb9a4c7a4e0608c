"""The Python API's training objects check their arguments as the config schema does for the CLI:
each bad value is refused by name, with what is valid (nothing else would check it: a NaN ``lr`` trains
to NaN, ``paths="data.txt"`` read as letters, a ``beta`` of 1.5 diverges)."""

from __future__ import annotations

import numpy as np
import pytest

from innerloop.models import ModelConfig
from innerloop.train import LanguageModelModule, TextDataModule
from innerloop.train.data import HFDataModule, RecallDataModule

SMALL = ModelConfig(hidden_size=16, num_heads=2, num_layers=1, intermediate_size=32)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"lr": float("nan")}, r"lr=nan \(float\) must be a finite number > 0"),
        ({"lr": "1e-3"}, r"lr='1e-3' \(str\) must be a finite number > 0"),
        ({"lr": 0.0}, r"lr=0.0 must be > 0"),
        ({"weight_decay": float("inf")}, r"weight_decay=inf \(float\) must be a finite number >= 0"),
        ({"min_lr": -1e-5}, r"min_lr=-1e-05 must be >= 0"),
        ({"min_lr": 1.0, "lr": 0.1}, r"min_lr=1.0 must be <= lr=0.1"),
        ({"betas": (0.9, 1.5)}, r"betas\[1\]=1.5 must be in \[0, 1\)"),
        ({"betas": (0.9,)}, r"betas=\(0.9,\) must be a pair \(beta1, beta2\)"),
        ({"warmup_steps": 2.5}, r"warmup_steps=2.5 \(float\) must be an integer >= 0"),
        (
            {"max_steps": float("inf")},
            r"max_steps=inf \(float\) must be an integer in \[1, 9007199254740992\]",
        ),
        ({"max_steps": True}, r"max_steps=True \(bool\) must be an integer in \[1, 9007199254740992\]"),
        ({"decay_steps": 20, "max_steps": 10}, r"decay_steps=20 must be in \[0, max_steps=10\]"),
        ({"num_position_buckets": 0}, r"num_position_buckets=0 must be >= 1"),
        ({"diagnostics_batches": -1}, r"diagnostics_batches=-1 must be >= 0"),
        ({"seq_len": 0}, r"seq_len=0 must be in \[1, 1073741824\]"),
        ({"schedule": "cosinus"}, r"cosinus"),
    ],
)
def test_bad_module_arguments_are_refused_by_name(arguments, message) -> None:
    with pytest.raises(ValueError, match=message):
        LanguageModelModule(SMALL, **arguments)


def test_module_arguments_are_stored_as_plain_values() -> None:
    module = LanguageModelModule(SMALL, max_steps=np.int64(10), lr=np.float32(0.5), betas=[0.9, 0.99])
    assert type(module.hparams.max_steps) is int and module.hparams.max_steps == 10
    assert type(module.hparams.lr) is float and module.hparams.lr == 0.5
    assert module.hparams.betas == (0.9, 0.99)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: TextDataModule(seq_len=8.5),
            r"seq_len=8.5 \(float\) must be an integer in \[1, 1073741824\]",
        ),
        (lambda: TextDataModule(batch_size=0), r"batch_size=0 must be in \[1, 16777216\]"),
        (lambda: TextDataModule(val_batches=-1), r"val_batches=-1 must be in \[1, 16777216\]"),
        (lambda: TextDataModule(val_fraction=1.0), r"val_fraction=1.0 must be in \[0, 1\)"),
        (lambda: TextDataModule(seed=-1), r"seed=-1 must be in \[0, 4294967295\]"),
        (lambda: TextDataModule(paths=3), r"paths=3 must be a path or a list of paths"),
        (lambda: RecallDataModule(num_pairs=65), r"num_pairs=65 must be in \[1, 64\]"),
        (lambda: RecallDataModule(gap=-1), r"gap=-1 must be in \[0, 1073741569\]"),
        (
            lambda: RecallDataModule(batch_size=2.0),
            r"batch_size=2.0 \(float\) must be an integer in \[1, 16777216\]",
        ),
        (lambda: HFDataModule(["x"], val_batches=0), r"val_batches=0 must be in \[1, 16777216\]"),
        (
            lambda: HFDataModule(["x"], val_fraction=float("nan")),
            r"val_fraction=nan \(float\) must be a finite",
        ),
    ],
)
def test_bad_data_module_arguments_are_refused_by_name(build, message) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_one_path_is_a_list_of_one(tmp_path) -> None:
    text = tmp_path / "data.txt"
    assert TextDataModule(str(text)).paths == [str(text)]
    assert TextDataModule(text).paths == [str(text)]  # a Path too
    assert HFDataModule(str(text)).paths == [str(text)]
