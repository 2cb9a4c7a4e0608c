"""Review s47b: training through Lightning, configs, metrics, the CLI (issue 3)."""

from __future__ import annotations

import math

import pytest
import torch

from innerloop.config import ConfigError, load_config
from innerloop.models import ModelConfig
from innerloop.train import IGNORE_INDEX, LanguageModelModule


def _tiny_module() -> LanguageModelModule:
    torch.manual_seed(0)
    config = ModelConfig(hidden_size=16, num_heads=2, num_layers=1, intermediate_size=32)
    return LanguageModelModule(config, diagnostics_batches=0)


def _logged_evaluation(module: LanguageModelModule, batches, monkeypatch) -> dict[str, float]:
    logged: dict[str, float] = {}
    monkeypatch.setattr(module, "log", lambda name, value, **_: logged.__setitem__(name, float(value)))
    module.on_validation_epoch_start()
    for index, batch in enumerate(batches):
        module.validation_step(batch, index)
    module.on_validation_epoch_end()
    return logged


def test_the_accuracy_of_an_evaluation_that_scored_no_token_is_nan_as_its_loss(monkeypatch) -> None:
    # every target IGNORE_INDEX (a loader of padding only): the loss and perplexity read NaN, "no number",
    # and the accuracy read 0.0, as if every prediction had been wrong (torchmetrics' 0/0 -> 0)
    module = _tiny_module()
    inputs = torch.randint(0, 256, (2, 8))
    logged = _logged_evaluation(module, [(inputs, torch.full_like(inputs, IGNORE_INDEX))], monkeypatch)
    assert math.isnan(logged["val_loss"]) and math.isnan(logged["val_ppl"])
    assert math.isnan(logged["val_acc"])


def test_the_accuracy_of_scored_tokens_beside_padding_is_the_share_predicted(monkeypatch) -> None:
    module = _tiny_module()
    inputs = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        predicted = module.model(inputs)[0].argmax(-1)  # [2, 8]
    targets = predicted.clone()
    targets[0, :3] = (predicted[0, :3] + 1) % 256  # 3 wrong
    targets[1] = IGNORE_INDEX  # a padding row
    padding_only = (inputs, torch.full_like(inputs, IGNORE_INDEX))
    logged = _logged_evaluation(module, [(inputs, targets), padding_only], monkeypatch)
    assert logged["val_acc"] == 5 / 8


def test_a_bad_accelerator_lists_only_accelerators_a_run_takes() -> None:
    # the list named 'mps' as valid, which the next check refuses ("innerloop does not support" it)
    with pytest.raises(ConfigError, match=r"trainer.accelerator='gpu' is not valid; valid: \[") as raised:
        load_config("tiny", ["trainer.accelerator=gpu"])
    assert "'cpu'" in str(raised.value) and "'mps'" not in str(raised.value)
    with pytest.raises(ConfigError, match=r"trainer.accelerator='mps' would train on Apple's MPS"):
        load_config("tiny", ["trainer.accelerator=mps"])
