"""``trainer.test``: the validation metrics of held-out batches under ``test_`` names."""

from __future__ import annotations

import math
import warnings

import lightning as L
import torch
import torch.nn.functional as F
from trainer_testing import SMALL_MODEL

from innerloop.train import LanguageModelModule, TextDataModule


def _trainer() -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)


def test_trainer_test_logs_the_validation_metrics_of_its_batches_under_test_names() -> None:
    torch.manual_seed(0)
    module = LanguageModelModule(SMALL_MODEL, diagnostics_batches=1)
    data = TextDataModule(seq_len=16, batch_size=3, val_batches=2)
    data.setup("validate")
    pairs = list(data.val_dataloader())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on workers
        (validated,) = _trainer().validate(module, dataloaders=data.val_dataloader())
        (tested,) = _trainer().test(module, dataloaders=data.val_dataloader())
    with torch.no_grad():  # the mean over every scored token of both batches, in float64
        losses = [
            F.cross_entropy(module(x).double().flatten(0, 1), y.flatten(), reduction="sum") for x, y in pairs
        ]
    tokens = sum(y.numel() for _, y in pairs)
    expected = float(sum(losses)) / tokens
    assert math.isclose(tested["test_loss"], expected, rel_tol=1e-6)
    assert math.isclose(tested["test_ppl"], math.exp(expected), rel_tol=1e-6)
    for name, value in validated.items():
        test_name = "test_" + name.removeprefix("val_") if name.startswith("val_") else f"test_{name}"
        if name == "val_step":
            assert "test_step" not in tested  # a test runs no training step
            continue
        assert tested[test_name] == value, name
    assert {n for n in tested if n.startswith("test_inner_loss_")} == {
        f"test_inner_loss_{when}/{layer}"
        for when in ("before", "after")
        for layer in range(SMALL_MODEL.num_layers)
    }
