"""Review s54d: every numeric config key under hostile values, from the command line and from Python.

A table of keys x bad values: each must be refused before anything is built, in one line that names the
key and the value given. The float32 rows: a rate, a std or a RoPE base past float32's largest number
(3.4e38) was taken by the config and then was inf in the model (silently 0 RoPE frequencies; all-inf
weights; an inner lr refused only by the layer's first forward, after the data loaded).
"""

from __future__ import annotations

import math
import re

import pytest

from innerloop.config.load import load_config
from innerloop.config.schema import FIELD_BOUNDS, OptimConfig, RunConfig
from innerloop.core.functional import MAX_ROPE_THETA, rope_inverse_frequencies
from innerloop.core.layer import TTTLayer
from innerloop.models import ModelConfig, build_model
from innerloop.models.attention import CausalSelfAttention

# the preset each key is read under (its mixer or dataset reads it); the rest: tiny (TTT-Linear)
_PRESET_OF = {"model.e2e.": "e2e-tiny", "model.family.": "titans-tiny", "model.window": "tiny-swa"}
_PRESET_OF |= {"data.recall.": "recall-ttt"}


def _preset(key: str) -> str:
    return next((preset for prefix, preset in _PRESET_OF.items() if key.startswith(prefix)), "tiny")


def _refusal(preset: str, overrides: list[str]) -> str:
    with pytest.raises(ValueError) as caught:
        load_config(preset, overrides, model_only=True)
    return str(caught.value)


# Values no numeric key takes, and for each key the first number past each end of its range.
_NOT_A_NUMBER = ("nan", "inf", "-inf", "1e400", "true", "abc", "''", "[1, 2]", "{a: 1}", "'???'")


def _default(key: str) -> object:
    node: object = RunConfig()
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _past_the_ends(key: str) -> list[str]:
    """The nearest value outside each end of ``key``'s range (an int key's as an integer)."""
    bounds, values = FIELD_BOUNDS[key], []
    if isinstance(_default(key), int):
        if bounds.low is not None:
            values.append(str(int(bounds.low) - 1))
        if bounds.high is not None:
            values.append(str(int(bounds.high) + 1))
        return values
    if bounds.low is not None:
        values.append(repr(bounds.low) if bounds.low_open else repr(math.nextafter(bounds.low, -math.inf)))
    if bounds.high is not None:
        values.append(repr(bounds.high) if bounds.high_open else repr(math.nextafter(bounds.high, math.inf)))
    return values


# Written out, not derived from FIELD_BOUNDS (a table derived from it passes whatever it says): every
# numeric key refuses -1; these refuse 0 too; these fractions refuse 1 (or 1.5 where 1 is valid).
_REFUSE_0 = """model.vocab_size model.hidden_size model.num_layers model.num_heads model.intermediate_size
model.window model.rope_theta model.pre_conv_kernel model.norm_eps model.init_std model.ttt.mini_batch_size
model.ttt.conv_kernel model.family.mini_batch_size model.family.conv_kernel model.e2e.chunk_size
model.e2e.suffix_fraction data.seq_len data.batch_size data.val_batches data.recall.num_pairs optim.lr
optim.decay_fraction trainer.max_steps trainer.val_every trainer.checkpoint_every trainer.devices
trainer.log_every trainer.num_position_buckets""".split()
_REFUSE_1 = (
    "model.norm_eps optim.beta1 optim.beta2 optim.warmup_fraction data.val_fraction data.test_fraction"
)
_REFUSE_1_5 = "optim.decay_fraction model.e2e.suffix_fraction model.e2e.inner_lr_warmup_fraction"
_WRITTEN_OUT = [(key, "-1") for key in FIELD_BOUNDS] + [(key, "0") for key in _REFUSE_0]
_WRITTEN_OUT += [(key, "1.0") for key in _REFUSE_1.split()] + [(key, "1.5") for key in _REFUSE_1_5.split()]

_CASES = [(key, bad) for key in FIELD_BOUNDS for bad in _NOT_A_NUMBER] + _WRITTEN_OUT
_CASES += [(key, bad) for key in FIELD_BOUNDS for bad in _past_the_ends(key)]


@pytest.mark.parametrize(("key", "bad"), _CASES)
def test_every_numeric_key_refuses_a_bad_value_in_one_line_naming_it(key: str, bad: str) -> None:
    message = _refusal(_preset(key), [f"{key}={bad}"])
    assert "\n" not in message.strip(), message
    assert key in message, message


_FLOAT32_KEYS = {
    "model.rope_theta": "tiny",
    "model.init_std": "tiny",
    "model.ttt.base_lr": "tiny",
    "model.family.base_lr": "titans-tiny",
    "model.e2e.inner_lr": "e2e-tiny",
    "model.e2e.inner_lr_start": "e2e-tiny",
    "optim.lr": "tiny",
    "optim.ttt_base_lr_init": "tiny",
}


@pytest.mark.parametrize("bad", ["1e39", "1e308"])
@pytest.mark.parametrize("key", sorted(_FLOAT32_KEYS))
def test_a_number_past_float32_is_refused_by_the_config(key: str, bad: str) -> None:
    """Seen failing before the fix: every one of these was taken (optim.lr=1e39 with weight_decay=0)."""
    overrides = [f"{key}={bad}", "optim.weight_decay=0"]
    message = _refusal(_FLOAT32_KEYS[key], overrides)
    assert f"{key}={float(bad)!r}" in message, message
    assert repr(FIELD_BOUNDS[key].high) in message, (
        message
    )  # what is valid (init_std: FLOAT32_MAX / 16, s54i)


@pytest.mark.parametrize("key", sorted(_FLOAT32_KEYS))
def test_float32_largest_number_is_still_taken(key: str) -> None:
    largest = FIELD_BOUNDS[key].high  # FLOAT32_MAX; init_std's FLOAT32_MAX / 16 (s54i: 3e38 drew inf weights)
    overrides = [f"{key}={largest!r}", "optim.weight_decay=0"]
    if key == "optim.ttt_base_lr_init":
        overrides.append("optim.ttt_base_lr_warmup=10")
    run, _ = load_config(_FLOAT32_KEYS[key], overrides, model_only=True)
    node = run
    for part in key.split("."):
        node = getattr(node, part)
    assert node == largest


@pytest.mark.parametrize("field", ["rope_theta", "init_std"])
def test_the_python_api_refuses_them_too(field: str) -> None:
    largest = re.escape(repr(FIELD_BOUNDS[f"model.{field}"].high))
    with pytest.raises(ValueError, match=rf"model\.{field}=1e\+39 .*{largest}"):
        build_model(ModelConfig(**{field: 1e39}))
    with pytest.raises(ValueError, match=r"optim\.lr=1e\+39"):
        from innerloop.config.load import validate_run_config

        validate_run_config(RunConfig(optim=OptimConfig(lr=1e39, weight_decay=0.0)))


def test_a_rope_base_past_float32_made_its_frequencies_zero() -> None:
    """Why the bound: 1e39 is inf in float32, and 1/inf**x is 0 where it should be 1.3e-5 (head_dim 16)."""
    assert rope_inverse_frequencies(16, 1e39)[1].item() == 0.0
    assert rope_inverse_frequencies(16, MAX_ROPE_THETA)[1].item() == pytest.approx(
        MAX_ROPE_THETA ** (-2 / 16), rel=1e-5
    )


def test_the_layers_refuse_such_a_rope_base() -> None:
    with pytest.raises(ValueError, match=r"rope_theta=1e\+39 must be a finite number >= 1 and <= 3\.40"):
        CausalSelfAttention(64, 4, None, 1e39)
    with pytest.raises(
        ValueError, match=r"rope_theta must be a finite number >= 1, got 1e\+39 .*at most 3\.40"
    ):
        TTTLayer(64, 4, rope_theta=1e39)


@pytest.mark.parametrize(
    ("key", "interpolation", "resolved"),
    [
        ("data.paths", "${optim.lr}", "0.003 (float)"),
        ("data.paths", "${data.tokenizer}", "'bytes' (str)"),
        ("trainer.lightning", "${optim.lr}", "0.003 (float)"),
        ("trainer.lightning", "${data.tokenizer}", "'bytes' (str)"),
    ],
)
def test_a_list_or_mapping_key_given_an_interpolation_of_another_kind_names_it(
    key: str, interpolation: str, resolved: str
) -> None:
    """Seen failing before the fix: "config key '?' in preset 'tiny': Invalid value assigned: float is not
    a ListConfig, TupleConfig, list, or tuple" -- no key, the preset blamed for the override, no value."""
    message = _refusal("tiny", [f"{key}={interpolation}"])
    assert message.startswith(f"config key {key!r} in override '{key}={interpolation}'"), message
    assert f"resolves to {resolved}" in message, message
    assert "takes a " in message and "\n" not in message, message


def test_a_list_key_given_an_interpolation_in_a_file_names_the_file(tmp_path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("data:\n  paths: ${optim.lr}\n")
    message = _refusal(str(config), [])
    assert f"config key 'data.paths' in file '{config}'" in message, message
    assert "resolves to 0.003 (float)" in message, message
