"""A TTT-E2E model with its own LM head (``model.tie_embeddings=false``, as official checkpoints with
``tie_word_embeddings=false`` convert to) exports as untied: the config took every TTT-E2E model for tied,
so transformers saved the embedding alone and tied the head to it on load (logits 0.4 off, silently).
The round trip of such a model is in test_modeling.py / test_export.py (``e2e_untied``); here, an export
an earlier innerloop wrote that way is refused, saying what happened."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hf_testing import MODEL_KINDS
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from innerloop.hf import InnerloopConfig
from innerloop.hf.export import export_model
from innerloop.models import ModelConfig, build_model


def test_the_config_of_an_untied_e2e_model_says_untied() -> None:
    assert not InnerloopConfig(model=MODEL_KINDS["e2e_untied"]).tie_word_embeddings
    assert InnerloopConfig(model=MODEL_KINDS["e2e"]).tie_word_embeddings


def test_an_export_without_the_untied_head_is_refused_saying_how_it_came_about(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_dict(MODEL_KINDS["e2e_untied"])).eval()
    folder = export_model(model, tmp_path / "exported", tokenizer=None)
    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    del tensors["model.lm_head.weight"]  # what transformers saved when the config said tied
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(
        ValueError, match=r"missing_keys: model.lm_head.weight; an earlier innerloop exported"
    ):
        AutoModelForCausalLM.from_pretrained(folder)
