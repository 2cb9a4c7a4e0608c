"""Review s51m: the config value rules of s51c and the HF cache batch check of s51f.

- A float field's build-time conversion (:func:`~innerloop.models.config.with_plain_values`) read "a
  real number" as ``numbers.Real`` and called ``float()`` on it, a second rule beside the core's
  :func:`~innerloop.core.layer.is_real`: a real past float's range (``Fraction(10**400)``) raised a bare
  ``OverflowError`` as the section was built, naming nothing. The conversion now takes what ``is_real``
  takes and leaves anything else to the type check, which names the key.
- A float field given a float tensor (``ModelConfig(init_std=torch.tensor(0.02))``) was refused as "must
  be a finite number >= ...", which reads as a valid number refused; it now says a tensor is not taken.
"""

from __future__ import annotations

import warnings
from fractions import Fraction

import pytest
import torch

from innerloop.config.load import ConfigError, load_config, validate_run_config
from innerloop.config.schema import OptimConfig, RunConfig
from innerloop.models import build_model
from innerloop.models.config import ModelConfig, validate_model_config


@pytest.fixture(scope="module")
def tiny_run():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run, _ = load_config("tiny")
    return run


def test_a_real_past_floats_range_in_a_model_float_field_is_refused_naming_the_key():
    config = ModelConfig(init_std=Fraction(10**400))  # was: OverflowError from float() as it was built
    with pytest.raises(ValueError, match=r"^model\.init_std=Fraction\(.*must be a finite number"):
        validate_model_config(config)


def test_a_real_past_floats_range_in_a_run_float_field_is_refused_naming_the_key(tiny_run):
    run = RunConfig(model=tiny_run.model, optim=OptimConfig(lr=Fraction(10**400)))
    with pytest.raises(ConfigError, match=r"^optim\.lr=Fraction\(.*must be a finite number"):
        validate_run_config(run)


@pytest.mark.parametrize(
    ("make", "key"),
    [
        (lambda: ModelConfig(init_std=torch.tensor(0.02)), "model.init_std"),
        (lambda: ModelConfig(norm_eps=torch.tensor(1e-6, dtype=torch.float64)), "model.norm_eps"),
    ],
    ids=["init_std", "norm_eps"],
)
def test_a_float_tensor_in_a_float_field_is_told_to_be_converted(make, key):
    with pytest.raises(ValueError, match=rf"^{key}=tensor\(.*not a tensor.*float\(\.\.\.\)"):
        validate_model_config(make())


def test_a_float_tensor_in_a_run_float_field_is_told_to_be_converted(tiny_run):
    run = RunConfig(model=tiny_run.model, optim=OptimConfig(lr=torch.tensor(1e-3)))
    with pytest.raises(ConfigError, match=r"^optim\.lr=tensor\(.*not a tensor.*float\(\.\.\.\)"):
        validate_run_config(run)


# -- model.init_std against the dtype the weights are drawn in --------------------------------------------

TINY_MODEL = {"hidden_size": 16, "num_heads": 2, "num_layers": 1, "intermediate_size": 32, "vocab_size": 64}
TINY_MODELS = {
    "ttt": {**TINY_MODEL, "ttt": {"mini_batch_size": 4}},
    "e2e": {**TINY_MODEL, "mixer": "e2e", "num_layers": 4, "e2e": {"chunk_size": 4}},
}


@pytest.fixture
def default_dtype():
    """Set torch's default dtype for one test (the dtype a model is built in), restored after it."""
    before = torch.get_default_dtype()
    yield torch.set_default_dtype
    torch.set_default_dtype(before)


@pytest.mark.parametrize("kind", sorted(TINY_MODELS))
def test_an_init_std_below_the_build_dtypes_smallest_normal_is_refused(default_dtype, kind):
    """model.init_std's bound is float32's smallest normal (1.2e-38); a model built in float16, whose
    smallest normal is 6.1e-5, drew 99.8% of its weights as exact zeros at init_std=1e-8, silently."""
    default_dtype(torch.float16)
    config = ModelConfig.from_dict({**TINY_MODELS[kind], "init_std": 1e-8})
    with pytest.raises(ValueError, match=r"model\.init_std=1e-08 .*float16.*>= 6\.10e-05"):
        build_model(config)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_an_init_std_normal_in_the_build_dtype_builds(default_dtype, dtype):
    """bfloat16 has float32's exponents: 1e-8 is a normal number there; 1e-4 is one in float16."""
    default_dtype(dtype)
    std = 1e-8 if dtype == torch.bfloat16 else 1e-4
    model = build_model(ModelConfig.from_dict({**TINY_MODELS["ttt"], "init_std": std}))
    weight = model.embed.weight
    assert weight.dtype == dtype and (weight != 0).float().mean() > 0.98
