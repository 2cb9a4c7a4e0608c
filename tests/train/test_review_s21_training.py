"""Review s21 (training through the LightningModule and ``innerloop train``): defects found where the
model trained, or the run resumed, is not what the config and the docs say.

- A resume sets the learning rate of its first step to ``schedule(step)`` directly, where the
  uninterrupted run's ``LambdaLR`` computes ``lr * (schedule(step) / lr)``: the two differ by an ulp at
  some steps, so a resume from such a step is not bit-identical (float64 weights differ).
- ``trainer.precision=16-mixed`` on a CPU trains under bfloat16 autocast (Lightning substitutes it with
  a warning), while the run's config.yaml and checkpoint record ``16-mixed``.
- ``trainer.threads`` changes torch's process-wide thread count and leaves it changed after ``train``
  returns (``trainer.deterministic`` and ``trainer.benchmark`` are put back).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lm_testing import TINY, RecordLosses

from innerloop.config import load_config
from innerloop.config.load import ConfigError
from innerloop.models import ModelConfig
from innerloop.train import load_checkpoint, train
from innerloop.train.module import LanguageModelModule
from innerloop.train.run import build_trainer

SMALL_MODEL = ModelConfig(hidden_size=16, num_heads=2, num_layers=1, intermediate_size=32)


def _stepped(module: LanguageModelModule, steps: int):
    """The module's optimizer and schedule after ``steps`` scheduler steps (no gradients: only the lr)."""
    config = module.configure_optimizers()
    optimizer, schedule = config["optimizer"], config["lr_scheduler"]["scheduler"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()"
        for _ in range(steps):
            schedule.step()
    return optimizer, schedule


def test_a_resumed_step_uses_the_lr_bits_of_the_uninterrupted_run() -> None:
    """max_steps=6, no warm-up, cosine: step 5's lr is 0.0002102920213422641 uninterrupted and
    0.00021029202134226414 after a resume from step 5's checkpoint."""
    hyper = dict(lr=3e-3, warmup_steps=0, max_steps=6, min_lr=1e-5, diagnostics_batches=0)
    uninterrupted, _ = _stepped(LanguageModelModule(SMALL_MODEL, **hyper), 5)
    saved, saved_schedule = _stepped(LanguageModelModule(SMALL_MODEL, **hyper), 5)

    resumed_module = LanguageModelModule(SMALL_MODEL, **hyper)
    optimizer, schedule = _stepped(resumed_module, 0)
    optimizer.load_state_dict(saved.state_dict())  # what Lightning restores from the checkpoint
    schedule.load_state_dict(saved_schedule.state_dict())
    resumed_module._trainer = SimpleNamespace(
        optimizers=[optimizer], lr_scheduler_configs=[SimpleNamespace(scheduler=schedule)]
    )
    resumed_module._apply_optimizer_hyperparameters()  # on_train_start of the resumed run
    expected = [group["lr"] for group in uninterrupted.param_groups]
    assert [group["lr"] for group in optimizer.param_groups] == expected


class _RecordLR(L.Callback):
    def __init__(self):
        self.lrs: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.lrs[trainer.global_step] = optimizer.param_groups[0]["lr"]


@pytest.mark.slow  # three short float64 training runs (~3 s)
def test_a_float64_run_resumed_from_its_last_but_one_step_is_bit_identical(tmp_path) -> None:
    overrides = [*TINY, "trainer.precision=64-true", "trainer.max_steps=6", "trainer.checkpoint_every=1"]
    run, cfg = load_config("tiny", [*overrides, f"out_dir={tmp_path / 'whole'}"])
    whole = _RecordLR()
    train(run, cfg, callbacks=[whole])

    run, cfg = load_config("tiny", [*overrides, f"out_dir={tmp_path / 'cut'}"])
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(run, cfg, callbacks=[RecordLosses(crash_after=6)])  # before step 6 is saved
    resumed = _RecordLR()
    train(run, cfg, resume=True, callbacks=[resumed])
    assert sorted(resumed.lrs) == [5]  # it went on from step 5's checkpoint
    assert resumed.lrs[5] == whole.lrs[5]
    a = load_checkpoint(tmp_path / "whole" / "last.safetensors")["state_dict"]
    b = load_checkpoint(tmp_path / "cut" / "last.safetensors")["state_dict"]
    assert all(torch.equal(a[key], b[key]) for key in a), [
        key for key in a if not torch.equal(a[key], b[key])
    ]


def test_16_mixed_on_a_cpu_is_refused_or_trains_in_float16(tmp_path) -> None:
    """Either a ConfigError that names bf16-mixed (as the refusal of 16-true names 16-mixed), or a
    Trainer whose precision is the 16-mixed the run records."""
    overrides = [*TINY, "trainer.precision=16-mixed", f"out_dir={tmp_path}"]
    if not torch.cuda.is_available():  # auto trains on the CPU here: refused, naming what to use
        with pytest.raises(ConfigError, match=r"'16-mixed' .* is not run on a CPU.* use bf16-mixed"):
            load_config("tiny", overrides)
        with pytest.raises(ConfigError, match=r"'16-mixed' .* is not run on a CPU"):
            load_config("tiny", [*overrides, "trainer.accelerator=cpu"])
        return
    run, _ = load_config("tiny", overrides)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            trainer = build_trainer(run)
        except ConfigError:
            return
    substituted = [w for w in caught if "precision='bf16-mixed'" in str(w.message)]
    assert trainer.precision == "16-mixed" and not substituted, (
        trainer.precision,
        [str(w.message) for w in caught],
    )


@pytest.mark.slow  # a one-step training run (~0.5 s)
def test_trainer_threads_is_put_back_when_the_run_returns(tmp_path: Path) -> None:
    before = torch.get_num_threads()
    threads = 2 if before == 1 else 1
    run, cfg = load_config(
        "tiny", [*TINY, "trainer.max_steps=1", f"trainer.threads={threads}", f"out_dir={tmp_path}"]
    )
    try:
        train(run, cfg)
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)
