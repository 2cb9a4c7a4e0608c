"""A model config built in Python is range-checked as the CLI's is: a value outside a field's bounds
would not fail but build a model that computes NaN, or attention that is silently dead."""

from __future__ import annotations

import dataclasses
import re

import pytest

from innerloop.config.load import numeric_fields
from innerloop.config.schema import FIELD_BOUNDS
from innerloop.models import ModelConfig, build_model, validate_model_config
from innerloop.models.config import MODEL_FIELD_BOUNDS, E2EConfig, TTTConfig

SMALL = {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32, "window": 4}


@pytest.mark.parametrize(
    ("mixer", "changes", "message"),
    [
        ("attention", {"rope_theta": 0.0}, "model.rope_theta=0.0 must be >= 1"),
        ("swa", {"rope_theta": -5.0}, "model.rope_theta=-5.0 must be >= 1"),
        ("e2e", {"rope_theta": 0.0}, "model.rope_theta=0.0 must be >= 1"),
        ("ttt", {"norm_eps": -1.0}, "model.norm_eps=-1.0 must be in "),
        (
            "attention",
            {"init_std": -1.0},
            "model.init_std=-1.0 must be >= 1.17549",
        ),  # s51c: float32's smallest normal
        ("ttt", {"ttt": TTTConfig(base_lr=-1.0)}, "model.ttt.base_lr=-1.0 must be >= 0"),
        ("e2e", {"e2e": E2EConfig(chunk_size=0)}, "model.e2e.chunk_size=0 must be in \\[1, 1073741824\\]"),
        ("ttt", {"num_layers": 0}, "model.num_layers=0 must be in \\[1, 65536\\]"),
    ],
)
def test_a_value_out_of_range_is_refused_before_the_model_is_built(mixer, changes, message):
    config = ModelConfig(**{**SMALL, "mixer": mixer, **changes})
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        validate_model_config(config)
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        build_model(config)


def test_every_numeric_model_field_has_bounds_and_the_run_config_uses_them():
    model_keys = [key for key in numeric_fields() if key.startswith("model.")]
    assert sorted(model_keys) == sorted(MODEL_FIELD_BOUNDS)
    for key, bounds in MODEL_FIELD_BOUNDS.items():
        assert FIELD_BOUNDS[key] is bounds, key


def test_the_defaults_and_the_edges_of_the_ranges_are_accepted():
    validate_model_config(ModelConfig(**SMALL))
    validate_model_config(dataclasses.replace(ModelConfig(**SMALL), rope_theta=1.0, norm_eps=1e-12))
    validate_model_config(ModelConfig(**{**SMALL, "ttt": TTTConfig(base_lr=0.0)}))


@pytest.mark.parametrize(
    ("name", "value"),
    [("rope_theta", 0.0), ("rope_theta", -5.0), ("norm_eps", 0.0), ("rope_theta", float("nan"))],
)
def test_the_attention_layer_built_directly_refuses_what_would_compute_nan_or_zero(name, value):
    from innerloop.models.attention import CausalSelfAttention

    bound = ">= 1" if name == "rope_theta" else "in (0, 1)"
    with pytest.raises(ValueError, match=re.escape(f"{name}={value!r} must be a finite number {bound}")):
        CausalSelfAttention(16, 2, **{name: value})
