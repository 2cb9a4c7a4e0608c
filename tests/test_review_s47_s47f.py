"""Review s47f: the official TTT-E2E checkpoints (innerloop.interop.ttt_e2e), hostile inputs.

``model_from_arrays`` and ``convert_weights`` take the official tensors already read (a mapping of
orbax names to arrays, e.g. ``safetensors.numpy.load_file(path)``) and, for ``convert_weights``,
innerloop's ``ModelConfig``. Given something else (the safetensors file's path, the official config
dict), they answered with a message about the checkpoint's contents built from the characters of the
path, or a bare AttributeError: now one TypeError naming the parameter, what was given and what is
valid.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from innerloop.interop.ttt_e2e import (
    OfficialConfigError,
    convert_weights,
    expected_shapes,
    model_config,
    model_from_arrays,
)

DATA = Path(__file__).resolve().parent / "data" / "e2e"
CONFIG = json.loads((DATA / "config.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    "given",
    [str(DATA / "weights.safetensors"), DATA / "weights.safetensors", None, [1, 2]],
    ids=["path-str", "path", "none", "list"],
)
def test_arrays_that_are_not_a_mapping_are_refused_naming_the_parameter(given) -> None:
    with pytest.raises(TypeError, match=r"arrays must be a mapping of the official tensor names") as info:
        model_from_arrays(given, CONFIG)
    assert type(given).__name__ in str(info.value)
    assert "load_file" in str(info.value)  # what to do with a safetensors file


def test_an_array_that_is_not_an_array_is_refused_by_name() -> None:
    arrays = dict(load_file(DATA / "weights.safetensors"))
    arrays["language_model.model.ln_f.weight"] = arrays["language_model.model.ln_f.weight"].tolist()
    with pytest.raises(
        OfficialConfigError, match=r"checkpoint tensor language_model\.model\.ln_f\.weight is a list"
    ):
        model_from_arrays(arrays, CONFIG)


def test_convert_weights_and_expected_shapes_name_the_config_they_need() -> None:
    arrays = load_file(DATA / "weights.safetensors")
    for call in (lambda: convert_weights(arrays, CONFIG), lambda: expected_shapes(CONFIG)):
        with pytest.raises(TypeError, match=r"config must be innerloop's ModelConfig .*model_config") as info:
            call()
        assert "dict" in str(info.value)
    # the documented way works
    state = convert_weights(arrays, model_config(CONFIG))
    assert np.array_equal(state["norm.weight"].numpy(), arrays["language_model.model.ln_f.weight"])


def test_a_checkpoint_holding_no_arrays_says_so_without_an_empty_listing(tmp_path) -> None:
    with pytest.raises(OfficialConfigError, match=r"it holds none\b") as info:
        model_from_arrays({}, CONFIG)
    assert ": :" not in str(info.value)


@pytest.mark.parametrize("batch_size", [-1, -3, 1.5, True, "2", None])
def test_initial_fast_weights_refuses_a_batch_size_that_is_not_a_count(batch_size) -> None:
    """``expand(-1, ...)`` keeps the parameter's size: a batch of -1 gave one row without a word, and 1.5
    torch's bare "expand() takes 1 positional argument"."""
    from innerloop.models import E2EConfig, ModelConfig, build_model

    model = build_model(
        ModelConfig(
            mixer="e2e",
            vocab_size=11,
            hidden_size=8,
            num_heads=2,
            num_layers=2,
            intermediate_size=12,
            window=4,
            e2e=E2EConfig(chunk_size=4),
        )
    )
    with pytest.raises((TypeError, ValueError), match=r"batch_size=.* must be an integer >= 0"):
        model.initial_fast_weights(batch_size)
    assert all(w.shape[0] == 0 for w in model.initial_fast_weights(0).values())
    assert all(w.shape[0] == 3 for w in model.initial_fast_weights(np.int64(3)).values())


@pytest.mark.parametrize("name", ["fp64", "float64"])
def test_an_official_float64_compute_dtype_is_refused_saying_how_to_run_in_float64(name) -> None:
    """The official code names float64 ``fp64``/``float64`` (``get_float_dtype_by_name``); the error said
    only "must be one of [...]" without it, as if the config were misspelt."""
    config = json.loads(json.dumps(CONFIG))
    config["model"]["compute_dtype"] = name
    with pytest.raises(OfficialConfigError, match=rf"model\.compute_dtype='{name}'.*model\.double\(\)"):
        model_config(config)


def test_a_file_holding_the_config_one_level_down_is_refused_naming_where_it_is(tmp_path) -> None:
    """A fixture or run record that holds the resolved config under a key (the shared vectors'
    ``fixture.json``: ``resolved_config_meta``) was refused listing its keys only: the error now names
    the key that holds a config with both sections."""
    path = tmp_path / "fixture.json"
    path.write_text(json.dumps({"name": "x", "resolved_config_meta": CONFIG}), encoding="utf-8")
    with pytest.raises(
        OfficialConfigError, match=r"no 'model' section.*its 'resolved_config_meta' holds one with both"
    ):
        model_config(path)


def test_a_mapping_with_keys_of_mixed_types_is_refused_with_the_config_error() -> None:
    """Its keys were listed with ``sorted``, which raised a bare TypeError comparing str with int."""
    from innerloop.interop.ttt_e2e import read_config

    with pytest.raises(OfficialConfigError, match=r"no 'model' section.*got keys \[1, 'a'\]"):
        read_config({1: 2, "a": 3})


def test_unknown_fields_and_extra_tensors_of_mixed_key_types_are_named() -> None:
    config = json.loads(json.dumps(CONFIG))
    config["model"].update({3: 1, "zzz": 2})
    with pytest.raises(OfficialConfigError, match=r"unknown: \[3, 'zzz'\]"):
        model_config(config)
    arrays = dict(load_file(DATA / "weights.safetensors"))
    arrays.update(
        {3: arrays["language_model.model.ln_f.weight"], "zzz": arrays["language_model.model.ln_f.weight"]}
    )
    with pytest.raises(OfficialConfigError, match=r"does not describe: \[3, 'zzz'\]"):
        model_from_arrays(arrays, CONFIG)
