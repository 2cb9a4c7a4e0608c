"""Review s51m: model.init_std against the dtype the Hugging Face model's added rows are drawn in, and
the cache batch check's message for inputs_embeds."""

from __future__ import annotations

import pytest
import torch
from hf_testing import TINY, tiny_hf_model

from innerloop.hf import InnerloopConfig, InnerloopForCausalLM


@pytest.mark.slow  # builds a model: ~0.7 s on a loaded CPU
def test_resizing_a_float16_models_vocabulary_refuses_an_init_std_it_would_draw_as_zeros():
    """The rows resize_token_embeddings adds without mean_resizing are drawn with model.init_std, in the
    embedding's dtype: in a model cast to float16, init_std=1e-8 drew them as zeros."""
    torch.manual_seed(0)
    config = InnerloopConfig(model={**TINY, "ttt": {"mini_batch_size": 4}, "init_std": 1e-8})
    model = InnerloopForCausalLM(config).half()
    vocab = model.get_input_embeddings().num_embeddings
    with pytest.raises(ValueError, match=r"model\.init_std=1e-08 .*float16"):
        model.resize_token_embeddings(vocab + 16, mean_resizing=False)
    assert model.get_input_embeddings().num_embeddings == vocab  # nothing changed


@pytest.mark.slow  # builds and prefills a model: ~1.4 s on a loaded CPU
def test_a_cache_of_another_batch_size_with_inputs_embeds_names_inputs_embeds():
    """s51f's message said 'input_ids has 2 row(s)' to a caller who passed inputs_embeds (the ids stand
    for them inside forward): the argument named must be the one given."""
    model = tiny_hf_model("ttt_linear")
    with torch.no_grad():
        cache = model(torch.arange(12).reshape(3, 4)).cache
    embeds = model.get_input_embeddings()(torch.full((2, 1), 7))
    with pytest.raises(
        ValueError, match=r"holds 3 sequence.*inputs_embeds has 2 row.*pass inputs_embeds of 3"
    ):
        model(inputs_embeds=embeds, past_key_values=cache)


@pytest.mark.slow  # saves and loads a model: ~1 s on a loaded CPU
def test_a_trained_model_of_a_small_init_std_loads_in_float16(tmp_path):
    """from_pretrained builds the model on the meta device, then loads its weights: init_std draws
    nothing there, so the float16 check of init_std must not refuse a trained model."""
    torch.manual_seed(0)
    config = InnerloopConfig(model={**TINY, "ttt": {"mini_batch_size": 4}, "init_std": 1e-5})
    InnerloopForCausalLM(config).save_pretrained(tmp_path)
    loaded = InnerloopForCausalLM.from_pretrained(tmp_path, dtype=torch.float16)
    assert loaded.get_input_embeddings().weight.dtype == torch.float16
