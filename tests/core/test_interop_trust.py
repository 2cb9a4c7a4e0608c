"""innerloop.interop.ttt_lm_pytorch refuses what it cannot load faithfully, with one line naming the
field or key: unknown or misspelt config fields, ill-typed or out-of-range values, and state dicts
with missing or unexpected keys, wrong shapes, mixed or non-float dtypes, or non-finite values.
Real saved configs (every field transformers writes) load."""

from __future__ import annotations

import json
import math

import pytest
import torch

from innerloop.core.layer import TTTLayer
from innerloop.interop.ttt_lm_pytorch import (
    TTT_CONFIG_FIELDS,
    check_config,
    layer_kwargs,
    layer_state_dict,
    load_layer,
)

CONFIG = {
    "hidden_size": 16,
    "num_attention_heads": 2,
    "mini_batch_size": 4,
    "ttt_layer_type": "linear",
    "use_gate": True,
    "share_qk": False,
}


def reference_state_dict(config=CONFIG) -> dict[str, torch.Tensor]:
    """A state dict with the reference layer's names and shapes (random weights)."""
    torch.manual_seed(0)
    layer = TTTLayer(**layer_kwargs(config))
    return {k.removeprefix("initial_params."): torch.randn_like(v) for k, v in layer.state_dict().items()}


def one_line_error(call, *fragments: str) -> str:
    with pytest.raises((ValueError, TypeError)) as error:
        call()
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def test_a_valid_config_and_state_dict_load_exactly() -> None:
    state_dict = reference_state_dict()
    layer = load_layer(CONFIG, state_dict)
    assert torch.equal(layer.state_dict()["initial_params.W1"], state_dict["W1"])
    assert layer.use_gate is True and layer.mini_batch_size == 4


def test_misspelt_fields_are_named_with_their_likely_spelling_and_the_valid_fields() -> None:
    config = dict(CONFIG, ttt_base_Lr=0.1, rope_thetta=500000.0)
    message = one_line_error(
        lambda: load_layer(config, reference_state_dict()),
        "'rope_thetta'",
        "'ttt_base_Lr'",
        "'ttt_base_Lr' -> 'ttt_base_lr'",
        "'rope_thetta' -> 'rope_theta'",
    )
    assert all(repr(field) in message for field in TTT_CONFIG_FIELDS)  # the valid fields, listed


@pytest.mark.parametrize("field", ["num_key_value_heads", "rope_scaling", "not_a_field", "hidden"])
def test_fields_outside_ttt_config_are_refused(field) -> None:
    one_line_error(lambda: check_config(dict(CONFIG, **{field: None})), repr(field), "unknown")


BAD_VALUES = [
    ("hidden_size", 16.7),
    ("hidden_size", True),
    ("hidden_size", "16"),
    ("hidden_size", 0),
    ("num_attention_heads", 2.5),
    ("mini_batch_size", 0),
    ("mini_batch_size", 4.5),
    ("conv_kernel", False),
    ("use_gate", "false"),
    ("use_gate", 0),
    ("share_qk", "true"),
    ("pre_conv", "no"),  # not used by the layer, still a TTTConfig field: checked
    ("ttt_base_lr", math.nan),
    ("ttt_base_lr", math.inf),
    ("ttt_base_lr", "1.0"),
    ("ttt_base_lr", -1.0),
    ("rope_theta", math.nan),
    ("rope_theta", 0.0),
    ("rope_theta", -math.inf),
    ("ttt_layer_type", "Linear"),
    ("vocab_size", 300.5),
    ("rms_norm_eps", math.nan),
    ("scan_checkpoint_group_size", -1),
    ("bos_token_id", "1"),
]


@pytest.mark.parametrize(("field", "value"), BAD_VALUES, ids=[f"{f}={v!r}" for f, v in BAD_VALUES])
def test_ill_typed_or_out_of_range_values_are_refused_naming_the_field(field, value) -> None:
    config = dict(CONFIG, **{field: value})
    one_line_error(lambda: load_layer(config, reference_state_dict()), f"'{field}'", repr(value))


@pytest.mark.parametrize(
    ("hidden", "heads", "problem"),
    [
        (16, 3, "does not divide 'hidden_size'=16"),
        (20, 4, "splits 'hidden_size'=20 into heads of the odd width 5"),
    ],
)
def test_heads_that_do_not_split_the_width_evenly_name_the_config_fields(hidden, heads, problem) -> None:
    config = dict(CONFIG, hidden_size=hidden, num_attention_heads=heads)
    message = one_line_error(
        lambda: layer_kwargs(config), f"config field 'num_attention_heads'={heads} {problem}"
    )
    assert "num_heads" not in message


def test_integral_floats_and_defaults_are_accepted() -> None:
    kwargs = layer_kwargs(
        dict(CONFIG, hidden_size=16.0, mini_batch_size=4.0, ttt_base_lr=1, rope_theta=10000)
    )
    assert kwargs["hidden_size"] == 16 and isinstance(kwargs["hidden_size"], int)
    assert kwargs["mini_batch_size"] == 4 and isinstance(kwargs["base_lr"], float)
    one_line_error(lambda: check_config({"hidden_size": 16}), "num_attention_heads", "lacks")


def test_other_models_configs_and_config_objects_are_refused_clearly() -> None:
    one_line_error(lambda: check_config({**CONFIG, 5: 1}), "unknown", "[5]")
    one_line_error(lambda: load_layer(CONFIG, list(reference_state_dict().items())), "dict of tensors")
    one_line_error(lambda: check_config(dict(CONFIG, model_type="llama")), "model_type", "'llama'")

    class SavedConfig:  # transformers' PretrainedConfig is not a Mapping
        def to_dict(self):
            return dict(CONFIG)

    one_line_error(lambda: check_config(SavedConfig()), "config.to_dict()")


def _with(state_dict, **changes):
    return {**state_dict, **changes}


STATE_DICT_CASES = {
    "missing key": (lambda sd: {k: v for k, v in sd.items() if k != "W1"}, ["missing keys ['W1']"]),
    "unexpected key": (lambda sd: _with(sd, extra=torch.zeros(1)), ["unexpected keys ['extra']"]),
    "wrong shape": (lambda sd: _with(sd, W1=torch.zeros(2, 8, 4)), ["'W1'", "(2, 8, 4)", "(2, 8, 8)"]),
    "NaN": (lambda sd: _with(sd, b1=sd["b1"].index_fill(-1, torch.tensor([0]), math.nan)), ["'b1'", "NaN"]),
    "inf": (lambda sd: _with(sd, **{"q_proj.weight": sd["q_proj.weight"] / 0}), ["'q_proj.weight'", "inf"]),
    "integer tensor": (lambda sd: _with(sd, learnable_token_idx=torch.zeros(4, dtype=torch.long)), ["int64"]),
    "not a tensor": (lambda sd: _with(sd, W1=sd["W1"].tolist()), ["'W1'", "list"]),
    "mixed dtypes": (lambda sd: _with(sd, W1=sd["W1"].double()), ["mixes dtypes", "float64", "'W1'"]),
    "prefixed twice": (lambda sd: _with(sd, **{"param.W1": sd["W1"]}), ["'W1' twice"]),
    "a whole model": (
        lambda sd: {f"model.layers.0.seq_modeling_block.{k}": v for k, v in sd.items()},
        ["layer_state_dict"],
    ),
}


@pytest.mark.parametrize("case", list(STATE_DICT_CASES))
def test_a_broken_state_dict_is_refused_naming_the_key(case) -> None:
    corrupt, fragments = STATE_DICT_CASES[case]
    one_line_error(lambda: load_layer(CONFIG, corrupt(reference_state_dict())), *fragments)


def test_layer_state_dict_takes_one_layer_out_of_a_model_state_dict() -> None:
    layer = reference_state_dict()
    model = {"model.embed_tokens.weight": torch.zeros(3, 16)}
    model |= {f"model.layers.1.seq_modeling_block.{k}": v for k, v in layer.items()}
    assert layer_state_dict(model, 1).keys() == layer.keys()
    one_line_error(lambda: layer_state_dict(model, 0), "no TTT layer 0", "present: [1]")


def test_full_saved_configs_load(conformance_dir) -> None:
    """``TTTConfig.to_dict()`` (every PretrainedConfig field of transformers 4.57) gives the same layer
    as the layer fields alone."""
    meta = json.loads((conformance_dir / "linear_c5_h128_nh2_mb16_shareqk_gate_T48.json").read_text())
    assert layer_kwargs(meta["full_TTTConfig_to_dict"]) == layer_kwargs(meta["layer_config"])


@pytest.mark.parametrize("folder", ["ttt_linear_transformer", "ttt_mlp_mamba"])
def test_saved_reference_models_load_layer_by_layer(folder, reference_models_dir) -> None:
    safetensors = pytest.importorskip("safetensors.torch", reason="the reference models are safetensors")
    config = json.loads((reference_models_dir / folder / "config.json").read_text())
    weights = safetensors.load_file(str(reference_models_dir / folder / "model.safetensors"))
    for index in range(config["num_hidden_layers"]):
        layer = load_layer(config, layer_state_dict(weights, index))
        assert layer.inner_model.name == config["ttt_layer_type"] and layer.share_qk == config["share_qk"]
