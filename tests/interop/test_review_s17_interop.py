"""Review s17 (mutation round 4): what the reference-model converter (ttt-lm-pytorch) carries over.

Token id 0 is a real id (Llama-style tokenizers often make it the pad or BOS token): an export must keep
it, or transformers' ``generate`` lacks the pad or BOS id (mutant L10 dropped it). Only a negative id or
a missing one means "none".

The backbone is named ``mamba`` only for the paper's Mamba backbone (pre-conv, shared Q/K and the output
gate); a model with the pre-conv and shared Q/K but no gate is the same network under the name
``transformer``, with those options set (mutant L4 named it ``mamba``, which describe_model and the
loss-by-position plot print).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from innerloop.interop.ttt_lm_pytorch import SPECIAL_TOKEN_FIELDS, model_config, special_token_ids

MAMBA_FIXTURE = Path(__file__).parents[1] / "data" / "models" / "ttt_mlp_mamba" / "config.json"


def test_token_id_zero_is_kept_and_negative_or_missing_ids_are_dropped():
    config = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": -1}
    assert special_token_ids(config) == {"bos_token_id": 0, "eos_token_id": 2}
    config = {"bos_token_id": None, "eos_token_id": 0, "pad_token_id": 0}
    assert special_token_ids(config) == {"eos_token_id": 0, "pad_token_id": 0}
    assert special_token_ids({"bos_token_id": 1}) == {"bos_token_id": 1}
    assert special_token_ids({"bos_token_id": True, "eos_token_id": 2.0}) == {}  # a bool or float is no id


@pytest.mark.parametrize("field", SPECIAL_TOKEN_FIELDS)
def test_each_special_token_field_keeps_id_zero(field):
    assert special_token_ids({field: 0}) == {field: 0}
    assert special_token_ids({field: -1}) == {}
    assert special_token_ids({field: None}) == {}


@pytest.mark.parametrize("use_gate", [True, False])
def test_the_backbone_is_mamba_only_with_the_gate(use_gate):
    reference = json.loads(MAMBA_FIXTURE.read_text(encoding="utf-8"))
    assert reference["pre_conv"] and reference["share_qk"]
    config = model_config({**reference, "use_gate": use_gate})
    assert config.backbone == ("mamba" if use_gate else "transformer")
    assert (config.pre_conv, config.ttt.share_qk, config.ttt.use_gate) == (True, True, use_gate)
