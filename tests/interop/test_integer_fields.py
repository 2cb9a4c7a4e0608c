"""Every integer field of both converters' configs is read one way within each converter: a Python or
numpy integer and a 0-d integer tensor are the same integer (the way innerloop's own config reads them,
``checked_number``); a bool, a fraction or a one-element tensor that is not 0-d is refused by name.
ttt-lm-pytorch's ``config.json`` also takes an integral float (``16.0``) for a size, as it did before (not for a
token id)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from innerloop.interop import ttt_e2e, ttt_lm_pytorch

REFERENCE = {"hidden_size": 16, "num_attention_heads": 2, "mini_batch_size": 4, "conv_kernel": 2}
MODEL = {
    **REFERENCE,
    "vocab_size": 32,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "pad_token_id": 3,
    "eos_token_id": 2,
}
OFFICIAL = json.loads((Path(__file__).resolve().parents[1] / "data" / "e2e" / "config.json").read_text())
SAME_INTEGER = [np.int64, np.int32, torch.tensor]  # each makes the same integer another way


@pytest.mark.parametrize("make", SAME_INTEGER)
def test_reference_integers_of_any_kind_read_as_the_plain_int(make) -> None:
    plain = ttt_lm_pytorch.model_config(MODEL)
    other = ttt_lm_pytorch.model_config({k: make(v) for k, v in MODEL.items()})
    assert other == plain and type(other.ttt.mini_batch_size) is int and type(other.padding_id) is int
    ids = ttt_lm_pytorch.special_token_ids({k: make(v) for k, v in MODEL.items()})
    assert ids == {"eos_token_id": 2, "pad_token_id": 3} and all(type(v) is int for v in ids.values())


@pytest.mark.parametrize(
    ("value", "shown"), [(True, "True"), (4.5, "4.5"), (torch.tensor([4]), "tensor"), ("4", "'4'")]
)
def test_reference_non_integers_are_refused_by_name(value, shown) -> None:
    for key in ("mini_batch_size", "pad_token_id", "pretraining_tp"):
        with pytest.raises(ValueError, match=rf"config field '{key}' must be .*, got {shown}"):
            ttt_lm_pytorch.check_config({**MODEL, key: value})


def with_fields(**fields) -> dict:
    config = copy.deepcopy(OFFICIAL)
    for dotted, value in fields.items():
        section, key = dotted.split("__")
        config[section][key] = value
    return config


@pytest.mark.parametrize("make", SAME_INTEGER)
def test_official_integers_of_any_kind_read_as_the_plain_int(make) -> None:
    fields = {"model__suffix_len": 1, "model__bos_token_id": 1, "model__eos_token_id": 2}
    fields |= {"training__ilr_warmup_steps": 2, "training__total_steps": 8, "model__mini_batch_size": 16}
    plain = ttt_e2e.model_config(with_fields(**fields))
    other = with_fields(**{k: make(v) for k, v in fields.items()})
    assert ttt_e2e.model_config(other) == plain and plain.e2e.inner_lr_warmup_fraction == 0.25
    assert type(ttt_e2e.model_config(other).e2e.skip_target_id) is int
    ids = ttt_e2e.special_token_ids(other)
    assert ids == {"bos_token_id": 1, "eos_token_id": 2} and all(type(v) is int for v in ids.values())


@pytest.mark.parametrize("value", [True, 2.5, "2", [2]])
def test_an_official_eos_that_is_not_an_integer_is_refused_not_dropped(value) -> None:
    """It was dropped silently: an export's generate then never stopped at the end of a text."""
    with pytest.raises(ttt_e2e.OfficialConfigError, match=r"model\.eos_token_id=.* must be an integer"):
        ttt_e2e.special_token_ids(with_fields(model__eos_token_id=value))


def test_an_official_negative_token_id_means_none() -> None:
    assert ttt_e2e.special_token_ids(with_fields(model__eos_token_id=-1, model__bos_token_id=-1)) == {}
