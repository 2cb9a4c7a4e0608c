"""Review s54i: a mapping ``trainer.max_time`` given again replaces the earlier one (it was merged into
it); ``model.init_std`` draws finite weights at every valid value; a stopped run's ``trainer.max_time``
advice without Lightning's private Timer attributes."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch

from innerloop import InnerLoss, LossPairs
from innerloop.config.load import load_config, save_config
from innerloop.train.module import LanguageModelModule, TrainingDivergedError


@pytest.mark.parametrize(
    ("first", "again", "limit"),
    [
        ("{hours: 1}", "trainer.max_time={minutes: 30}", timedelta(minutes=30)),  # was 1 h 30 min
        ("{hours: 1}", "trainer.lightning.max_time={minutes: 30}", timedelta(minutes=30)),
        ("{hours: 1}", "trainer.lightning={max_time: {minutes: 30}}", timedelta(minutes=30)),
        ("00:01:00:00", "trainer.max_time={minutes: 30}", timedelta(minutes=30)),
        ("{hours: 1}", "trainer.max_time=00:00:30:00", "00:00:30:00"),
    ],
)
def test_a_max_time_mapping_given_again_replaces_the_earlier_one(first, again, limit) -> None:
    run, _ = load_config("tiny", [f"trainer.max_time={first}", again])
    given = run.trainer.lightning["max_time"]
    assert (given if isinstance(given, str) else timedelta(**given)) == limit, given


def test_a_resumed_runs_max_time_mapping_is_replaced_not_added_to(tmp_path) -> None:
    from dataclasses import replace

    from innerloop.config.load import validate_run_config

    # a Python caller's timedelta, kept in config.yaml as {days, seconds, microseconds} (s54a)
    run, _ = load_config("tiny", [f"out_dir={tmp_path / 'out'}"])
    run = replace(run, trainer=replace(run.trainer, lightning={"max_time": timedelta(hours=1)}))
    validate_run_config(run)
    save_config(run, tmp_path / "config.yaml")
    resumed, _ = load_config(str(tmp_path / "config.yaml"), ["trainer.max_time={hours: 2}"])
    # was {days: 0, seconds: 3600, microseconds: 0, hours: 2}: 3 hours
    assert timedelta(**resumed.trainer.lightning["max_time"]) == timedelta(hours=2)


def test_one_part_of_a_max_time_mapping_can_still_be_set_by_its_dotted_key() -> None:
    run, _ = load_config("tiny", ["trainer.max_time={hours: 1}", "trainer.max_time.minutes=30"])
    assert timedelta(**run.trainer.lightning["max_time"]) == timedelta(hours=1, minutes=30)


def _timer_without_private_attributes(limit: float, elapsed: float):
    """A Lightning Timer whose public API (time_elapsed, time_remaining) answers as Lightning's does, but
    without the private ``_duration`` and ``_offset`` innerloop read: another Lightning version's names."""
    from lightning.pytorch.callbacks import Timer

    class DriftedTimer(Timer):
        def __init__(self) -> None:
            super().__init__(duration=timedelta(seconds=limit))
            del self._duration, self._offset

        def time_elapsed(self, stage: str = "train") -> float:
            return elapsed

        def time_remaining(self, stage: str = "train") -> float:
            return limit - elapsed

    return DriftedTimer()


def test_a_max_time_stop_is_told_without_lightnings_private_timer_attributes() -> None:
    from types import SimpleNamespace

    from innerloop.train import run as run_module

    trainer = SimpleNamespace(callbacks=[_timer_without_private_attributes(60, 61)])
    # was: AttributeError ('DriftedTimer' object has no attribute '_duration'), after the run had stopped
    assert "trainer.max_time" in run_module._stop_reason(trainer)
    said = run_module._continuing(SimpleNamespace(out_dir="runs/x"), trainer)
    assert "trainer.max_time=00:00:02:01" in said, said  # 61 s spent + the whole limit: never stops at once


@pytest.mark.parametrize("std", [3.0e38, 1.0e38])  # ~26% and ~0.07% of float32 normal draws were inf
def test_an_init_std_whose_draws_overflow_float32_is_refused_by_the_config(std) -> None:
    from innerloop.models import ModelConfig, build_model

    config = ModelConfig(
        vocab_size=16, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=8, init_std=std
    )
    # was: taken (the bound was float32's largest number itself), the model built with inf weights
    with pytest.raises(ValueError, match=r"model\.init_std") as err:
        build_model(config)
    assert "\n" not in str(err.value) and repr(std) in str(err.value), err.value


def test_the_largest_valid_init_std_draws_finite_weights() -> None:
    from innerloop.models.config import MODEL_FIELD_BOUNDS

    largest = MODEL_FIELD_BOUNDS["model.init_std"].high
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        weights = torch.empty(2**12, dtype=dtype).normal_(std=largest)
        assert bool(torch.isfinite(weights).all()), dtype


_SMALL = {"vocab_size": 32, "hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 16}


@pytest.mark.slow  # ~0.5 s each: a module built and one training step
@pytest.mark.parametrize(
    ("model", "named"),
    [
        # TTT-E2E's inner steps overflow (fast weights ~1e30): logits inf, the loss NaN at the first step
        (
            {
                **_SMALL,
                "mixer": "e2e",
                "window": 8,
                "e2e": {"chunk_size": 4, "inner_lr": 1e30, "inner_lr_start": 1e30},
            },
            "the model config's e2e.inner_lr",  # a module built in Python: its ModelConfig's field
        ),
        (
            {**_SMALL, "mixer": "attention", "init_std": 1e15},
            "the model config's init_std",
        ),  # weights finite, logits inf
    ],
)
def test_a_loss_non_finite_before_any_optimizer_step_does_not_blame_the_outer_lr(model, named) -> None:
    torch.manual_seed(0)
    module = LanguageModelModule(model=model, max_steps=10, warmup_steps=1)
    ids = torch.randint(0, 32, (1, 13))
    with pytest.raises(TrainingDivergedError) as err:
        module.training_step((ids[:, :-1], ids[:, 1:]), 0)
    text = str(err.value)
    # was: "try a lower optim.lr (now 0.003 ...), gradient clipping ... or a longer warm-up": none has acted
    assert "try a lower" not in text, text
    assert "no optimizer step" in text and named in text, text


class _NaNGradientLoss(InnerLoss):
    """An inner loss whose gradient is NaN once ``armed`` (after registration, which checks it): a plugin
    fault, from finite input of moderate size."""

    name = "review_s54i_nan_gradient"
    armed = False

    def pairs(self, views, carry):
        return LossPairs(views.key, views.value)

    def token_loss(self, prediction, target):
        return 0.5 * (prediction - target).pow(2).sum(-1)

    def token_loss_grad(self, prediction, target):
        return (prediction - target) * (float("nan") if self.armed else 1.0)


@pytest.mark.slow  # ~0.9 s: a module built and one training step
def test_a_plugins_nan_in_a_layer_without_the_diagnosis_method_is_still_told(
    fresh_global_registry, monkeypatch
) -> None:
    """A TTT layer kind without ``plugin_nan_diagnosis`` (another layer class of a checked kind, an older
    subclass): training's NonFiniteLayerOutputError was an AttributeError raised while it was built."""
    import innerloop
    from innerloop.core.layer import TTTLayer
    from innerloop.models import ModelConfig, TTTConfig
    from innerloop.train.module import NonFiniteLayerOutputError

    innerloop.register_inner_loss(_NaNGradientLoss())
    monkeypatch.setattr(_NaNGradientLoss, "armed", True)
    monkeypatch.delattr(TTTLayer, "plugin_nan_diagnosis")
    torch.manual_seed(0)
    ttt = TTTConfig(mini_batch_size=8, inner_loss=_NaNGradientLoss.name)
    config = ModelConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, ttt=ttt)
    module = LanguageModelModule(config, max_steps=2, warmup_steps=0)
    ids = torch.randint(0, 64, (2, 17))
    with pytest.raises(NonFiniteLayerOutputError) as err:  # was: AttributeError 'plugin_nan_diagnosis'
        module.training_step((ids[:, :-1], ids[:, 1:]), 0)
    text = str(err.value)
    assert _NaNGradientLoss.name in text and "model.ttt.base_lr" in text, text


@pytest.mark.parametrize(
    ("limit", "at_launch", "elapsed", "suggested"),
    [
        (30, 61, 61.2, "00:00:01:32"),  # resumed with a SMALLER limit than spent: stops at once, + 30 s
        (182, 61, 183, "00:00:05:04"),  # leg 3 resumed from leg 1's checkpoint (61 s): given 121 s, + 121
    ],
)
def test_a_max_time_stop_after_a_smaller_limit_or_an_earlier_checkpoint(
    limit, at_launch, elapsed, suggested
) -> None:
    """Holds (s54i, not a defect): the rule of s54a's _continuing on the legs it did not pin."""
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import Timer
    from lightning.pytorch.trainer.states import RunningStage

    from innerloop.train import run as run_module

    timer = Timer(duration=timedelta(seconds=limit))
    timer.load_state_dict({"time_elapsed": {RunningStage.TRAINING.value: at_launch}})
    timer._start_time[RunningStage.TRAINING] = 100.0
    timer._end_time[RunningStage.TRAINING] = 100.0 + elapsed - at_launch
    said = run_module._continuing(SimpleNamespace(out_dir="runs/x"), SimpleNamespace(callbacks=[timer]))
    assert f"trainer.max_time={suggested}" in said, said
