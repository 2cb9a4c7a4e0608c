"""ModelConfig from a user's dict (Python, JSON, a checkpoint's hyperparameters) refuses unknown keys
and values of the wrong type with one line naming the field, instead of reading ``"false"`` as true or
truncating ``16.7``."""

from __future__ import annotations

import math
import warnings

import pytest

from innerloop.models import E2EConfig, ModelConfig, TTTConfig, build_model, validate_model_config

BAD = [
    ({"hidden_size": 16.7}, "model.hidden_size=16.7"),
    ({"vocab_size": 99999999999}, "model.vocab_size=99999999999 must be in [1, 16777216]"),
    ({"num_layers": 10**8}, "model.num_layers=100000000 must be in [1, 65536]"),
    ({"num_layers": True}, "model.num_layers=True"),
    ({"vocab_size": "256"}, "model.vocab_size='256'"),
    ({"rope_theta": math.nan}, "model.rope_theta=nan"),
    ({"norm_eps": math.inf}, "model.norm_eps=inf"),
    ({"mixer": 3}, "model.mixer=3"),
    ({"ttt": {"base_lr": "1.0"}}, "model.ttt.base_lr='1.0'"),
    ({"ttt": {"mini_batch_size": 8.0}}, "model.ttt.mini_batch_size=8.0"),
    ({"ttt": {"inner_norm": "false"}}, "model.ttt.inner_norm='false'"),
    ({"e2e": {"first_order": "false"}}, "model.e2e.first_order='false'"),
    ({"e2e": {"test_time_training": 0}}, "model.e2e.test_time_training=0"),
]


@pytest.mark.parametrize(("data", "named"), BAD, ids=[b[1] for b in BAD])
def test_a_value_of_the_wrong_type_is_refused_naming_the_field(data, named) -> None:
    with pytest.raises(ValueError) as error:
        build_model(ModelConfig.from_dict(data))
    assert named in str(error.value) and "must be" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("data", "named"), [({"hiden_size": 3}, "hiden_size"), ({"ttt": {"base_Lr": 1}}, "base_Lr")]
)
def test_unknown_keys_are_refused_with_the_valid_ones(data, named) -> None:
    with pytest.raises(ValueError, match=f"unknown config key.*{named}.*valid keys"):
        ModelConfig.from_dict(data)


def test_an_int_where_a_float_is_declared_is_fine() -> None:
    model = build_model(ModelConfig.from_dict({"hidden_size": 16, "num_heads": 2, "rope_theta": 10000}))
    assert model.config.rope_theta == 10000


@pytest.mark.parametrize(
    ("section", "given", "attribute", "value"),
    [("ttt", {"mini_batch_size": 4}, "mini_batch_size", 4), ("family", {"base_lr": 0.5}, "base_lr", 0.5)],
)
def test_a_section_given_as_a_mapping_is_its_dataclass(section, given, attribute, value) -> None:
    """ModelConfig(ttt={...}) failed deep in validation with "'dict' object has no attribute ..."."""
    config = ModelConfig(hidden_size=16, num_heads=2, **{section: given})
    assert getattr(getattr(config, section), attribute) == value
    assert config == ModelConfig.from_dict({"hidden_size": 16, "num_heads": 2, section: given})
    validate_model_config(config)


def test_a_section_mapping_with_an_unknown_key_names_it() -> None:
    with pytest.raises(ValueError, match=r"unknown config key 'model.ttt.mini_batch' .*valid keys here"):
        ModelConfig(hidden_size=16, num_heads=2, ttt={"mini_batch": 4})


@pytest.mark.parametrize(
    ("config", "warned"),
    [
        (
            ModelConfig(mixer="attention", ttt=TTTConfig(inner_loss="hubber")),
            r"model\.ttt\.inner_loss='hubber'",
        ),
        (
            ModelConfig(mixer="ttt", e2e=E2EConfig(inner_loss="nexttoken")),
            r"model\.e2e\.inner_loss='nexttoken'",
        ),
        (ModelConfig(mixer="deltanet", ttt=TTTConfig(update_rule="dual")), r"model\.ttt\.update_rule='dual'"),
    ],
)
def test_an_unknown_plugin_name_in_a_section_the_mixer_does_not_read_is_warned_about(config, warned) -> None:
    with pytest.warns(
        UserWarning, match=warned + r" is not a registered .* it is ignored, since model\.mixer="
    ):
        validate_model_config(config)


def test_known_plugin_names_in_unread_sections_pass_quietly() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate_model_config(ModelConfig(mixer="attention", ttt=TTTConfig(inner_model="mlp")))


@pytest.mark.parametrize("wrapping", [(False, True), (True, False), (False, False)])
def test_the_inner_wrapping_is_a_model_option(wrapping) -> None:
    """model.ttt.inner_norm / inner_residual reach the layers (the paper's ablation, from a config); a
    fused kernel named with either off is refused when the config is checked, not at the first batch."""
    import torch

    norm, residual = wrapping
    config = ModelConfig.from_dict(
        {
            "hidden_size": 16,
            "num_heads": 2,
            "num_layers": 1,
            "ttt": {"inner_norm": norm, "inner_residual": residual},
        }
    )
    model = build_model(config)
    layer = model.blocks[0].mixer
    assert (layer.inner_norm, layer.inner_residual) == wrapping
    with torch.no_grad():
        model(torch.arange(20)[None])
    assert layer.last_dispatch[0] == "torch"
    named = ModelConfig.from_dict(
        {"ttt": {"inner_norm": norm, "inner_residual": residual, "kernel": "fused_torch_linear"}}
    )
    with pytest.raises(
        ValueError, match="fuses the inner LayerNorm and residual, which need both on; this layer has"
    ):
        validate_model_config(named)
