"""Review s37b: training, data and no-lost-work (issues 3, 9, 11), as a demanding user would use them."""

from __future__ import annotations

import pytest

from innerloop.config import load_config
from innerloop.config.load import ConfigError
from innerloop.models import ModelConfig
from innerloop.train.module import LanguageModelModule
from innerloop.train.schedules import make_schedule

SMALL = ModelConfig(hidden_size=16, num_heads=2, num_layers=1, intermediate_size=32)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        # wsd's decay starting inside the warm-up: lr dropped from its peak to 0.2 lr in one step at step 900
        # (the config refuses warmup_fraction + decay_fraction > 1; from Python it was taken without a word)
        (
            {"schedule": "wsd", "warmup_steps": 900, "decay_steps": 500, "max_steps": 1000},
            "warmup_steps=900 + decay_steps=500 must be <= max_steps=1000",
        ),
    ],
)
def test_module_refuses_a_wsd_decay_inside_its_warmup(arguments, message):
    with pytest.raises(ValueError) as caught:
        LanguageModelModule(SMALL, **arguments)
    assert message in str(caught.value)


def test_module_keeps_a_schedule_that_fits():
    module = LanguageModelModule(SMALL, schedule="wsd", warmup_steps=500, decay_steps=500, max_steps=1000)
    assert module.hparams.warmup_steps == 500
    # a warm-up longer than the run stays a warning (test_s34_boundaries), its decay never reached
    LanguageModelModule(SMALL, schedule="wsd", warmup_steps=100, decay_steps=10, max_steps=40)


def test_schedule_of_a_huge_step_count_is_a_number():
    """10**400 warm-up steps: OverflowError 'int too large to convert to float' in configure_optimizers."""
    for name in ("cosine", "linear", "constant", "wsd"):
        schedule = make_schedule(
            name, 10**400, 10**401, 1e-3, 0.0, decay_steps=10**400 if name == "wsd" else 0
        )
        assert schedule(0) == 1e-3 * (1 / 10**400) and schedule(10**400) == 1e-3


@pytest.mark.parametrize(
    ("key", "value"),
    [
        # each crashed `innerloop train` with a bare traceback: OverflowError in the schedule,
        # OverflowError in Lightning's device parser, ValueError in torch.set_num_threads
        ("trainer.max_steps", 10**30),
        ("trainer.devices", 10**30),
        ("trainer.threads", 10**30),
    ],
)
def test_config_bounds_step_device_and_thread_counts(key, value):
    with pytest.raises(ConfigError) as caught:
        load_config("tiny", [f"{key}={value}"])
    said = str(caught.value)
    assert key in said and str(value) in said and "must be in [" in said
