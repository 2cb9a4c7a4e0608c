"""Review s15 (dtype), MED-1: ``trainer.precision=16-true`` was accepted, then every run diverged at its
first step, with an error that blamed the learning rate. It casts the whole model and AdamW's states to
float16, where AdamW's eps (1e-8) rounds to 0 and the second moments underflow, so a step is 0/0 at
any lr. It is refused up front now, at every entry that takes a precision (a config, a resume's
overrides, a run built in Python), and a float16 module that diverges says float16 is why.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from lm_testing import TINY

from innerloop.cli import main
from innerloop.config import ConfigError, load_config, save_config
from innerloop.models import ModelConfig, TTTConfig
from innerloop.train import LanguageModelModule, TrainingDivergedError, train

FLOAT16_PRECISIONS = ["16-true", "transformer-engine-float16"]
TRAINABLE = ["16-mixed", "bf16-true", "bf16-mixed", "32-true", "64-true"]


def _assert_refusal(message: str, precision: str) -> None:
    assert f"trainer.precision={precision!r}" in message
    assert "float16" in message and "eps" in message and "AdamW" in message
    for alternative in TRAINABLE:
        assert alternative in message


@pytest.mark.parametrize("precision", FLOAT16_PRECISIONS)
def test_a_float16_weight_precision_is_refused_with_why_and_what_to_use(tmp_path, precision) -> None:
    with pytest.raises(ConfigError) as error:
        load_config("tiny", [*TINY, f"trainer.precision={precision}", f"out_dir={tmp_path / 'run'}"])
    _assert_refusal(str(error.value), precision)


def test_the_valid_precisions_listed_for_a_wrong_name_leave_16_true_out(tmp_path) -> None:
    with pytest.raises(ConfigError) as error:
        load_config("tiny", [*TINY, "trainer.precision=16", f"out_dir={tmp_path / 'run'}"])
    message = str(error.value)
    assert "trainer.precision='16' is not valid" in message
    assert "'16-mixed'" in message and "'16-true'" not in message


def test_a_resume_that_switches_to_16_true_is_refused(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    run, cfg = load_config("tiny", [*TINY, f"out_dir={out}"])
    out.mkdir()
    save_config(cfg, out / "config.yaml")  # the run's saved config, as a run writes it
    assert main(["train", "--resume", f"out_dir={out}", "trainer.precision=16-true"]) != 0
    _assert_refusal(capsys.readouterr().err, "16-true")


def test_a_run_built_in_python_with_16_true_is_refused_before_writing(tmp_path) -> None:
    run, cfg = load_config("tiny", [*TINY, "trainer.max_steps=1", f"out_dir={tmp_path / 'run'}"])
    run = dataclasses.replace(run, trainer=dataclasses.replace(run.trainer, precision="16-true"))
    with pytest.raises(ConfigError) as error:
        train(run)
    _assert_refusal(str(error.value), "16-true")
    assert not any(Path(run.out_dir).glob("*"))


def _module() -> LanguageModelModule:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, ttt=TTTConfig(mini_batch_size=8)
    )
    return LanguageModelModule(config, lr=1e-3, max_steps=2, warmup_steps=0)


def _divergence(module: LanguageModelModule) -> str:
    ids = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        module.model.norm.weight.fill_(float("inf"))  # the logits, after every layer: a divergence
    # of a run that had trained (a finite loss before): at its first step, with no finite loss yet, the
    # optimizer has not acted and the model as built is named instead (s54i)
    module._last_finite_loss = (0, torch.tensor(4.0))
    with pytest.raises(TrainingDivergedError) as error:
        module.training_step((ids[:, :-1], ids[:, 1:]), 0)
    return str(error.value)


def test_a_float16_module_that_diverges_names_float16_before_the_learning_rate() -> None:
    message = _divergence(_module().half())
    assert message.startswith("training diverged: the training loss is nan")
    assert "the module's weights are float16" in message
    assert message.index("float16") < message.index("lower lr (now")
    assert "16-mixed" in message and "bf16-true" in message
    # a module built in Python names its own arguments and the Trainer's, not innerloop's config keys
    assert "optim." not in message and "trainer.precision" not in message
    assert "at any lr (its eps" in message and "the Trainer's precision=16-mixed" in message


def test_a_float32_module_that_diverges_does_not_blame_float16() -> None:
    message = _divergence(_module())
    assert "float16" not in message and "lower lr (now" in message


def test_a_python_module_that_diverges_at_its_first_step_names_its_model_config_fields() -> None:
    # s58: a module built in Python (not from a run config) was told to check model.init_std and
    # model.ttt.base_lr, config keys its user never wrote
    module = _module()
    ids = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        module.model.norm.weight.fill_(float("inf"))
    with pytest.raises(TrainingDivergedError) as error:
        module.training_step((ids[:, :-1], ids[:, 1:]), 0)
    message = str(error.value)
    assert "no optimizer step has run, so lr," in message, message
    assert "the model config's init_std (now" in message and "the model config's ttt.base_lr (now" in message
    assert "model.init_std" not in message and "optim." not in message
