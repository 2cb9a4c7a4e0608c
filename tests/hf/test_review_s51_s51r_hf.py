"""Review s51r: every argument error of forward() / generate() names the sequence argument the caller
passed, input_ids or inputs_embeds, with its shape (inside forward, ids of 0 stand for the embeddings,
and the messages of attention_mask's shape, labels, position_ids and logits_to_keep named those)."""

from __future__ import annotations

import re

import pytest
import torch
from hf_testing import tiny_hf_model


@pytest.fixture(scope="module")
def model():
    """One tiny TTT-Linear model (hidden 32) the tests only read."""
    return tiny_hf_model("ttt_linear")


@pytest.fixture(scope="module")
def embeds(model):
    """inputs_embeds [2, 3, 32]."""
    with torch.no_grad():
        return model.get_input_embeddings()(torch.arange(6).reshape(2, 3))


WRONG_WITH_EMBEDDINGS = {
    "attention_mask": {"attention_mask": torch.ones(2, 5)},
    "labels": {"labels": torch.zeros(2, 4, dtype=torch.int64)},
    "position_ids": {"position_ids": torch.arange(1, 4)},
    "cache_position": {"cache_position": torch.arange(1, 4)},
    "logits_to_keep": {"logits_to_keep": torch.tensor([7])},
}


@pytest.mark.parametrize("argument", list(WRONG_WITH_EMBEDDINGS))
def test_an_argument_error_with_inputs_embeds_names_inputs_embeds_and_its_shape(model, embeds, argument):
    """With inputs_embeds [2, 3, 32], each message named 'input_ids [2, 3]', which were not passed."""
    with pytest.raises(ValueError) as raised:
        model(inputs_embeds=embeds, **WRONG_WITH_EMBEDDINGS[argument])
    message = str(raised.value)
    assert argument in message
    assert "input_ids" not in message, message
    assert "inputs_embeds [2, 3, 32]" in message, message


@pytest.mark.parametrize("argument", list(WRONG_WITH_EMBEDDINGS))
def test_an_argument_error_with_input_ids_names_input_ids_and_its_shape(model, argument):
    """The same errors with input_ids [2, 3] name them (and never inputs_embeds)."""
    with pytest.raises(ValueError) as raised:
        model(torch.arange(6).reshape(2, 3), **WRONG_WITH_EMBEDDINGS[argument])
    message = str(raised.value)
    assert "input_ids [2, 3]" in message, message
    assert "inputs_embeds" not in message, message


def test_both_or_neither_sequence_argument_names_what_was_given(model, embeds):
    """Both given / neither given: the message says which, with the shapes given."""
    ids = torch.arange(6).reshape(2, 3)
    with pytest.raises(ValueError, match=re.escape("input_ids [2, 3] and inputs_embeds [2, 3, 32]")):
        model(ids, inputs_embeds=embeds)
    with pytest.raises(ValueError, match="got neither"):
        model()


@pytest.mark.parametrize(
    ("given", "shown"),
    [
        (torch.zeros(2, 3, 16), r"shape \[2, 3, 16\]"),
        (torch.zeros(2, 3, 32, dtype=torch.int64), r"shape \[2, 3, 32\] of torch\.int64"),
        (torch.zeros(3, 32), r"shape \[3, 32\] of torch\.float32"),
        ([[0.0] * 32], "list"),
    ],
)
def test_inputs_embeds_of_a_wrong_width_dtype_or_ndim_is_named(model, given, shown):
    """Width, dtype and ndim refused, naming inputs_embeds, what was given and hidden_size=32."""
    with pytest.raises(ValueError, match=rf"inputs_embeds must be .*hidden_size=32.*got {shown}"):
        model(inputs_embeds=given)


@pytest.mark.slow  # builds a TTT-E2E model: ~0.5 s on a loaded CPU
def test_generate_with_inputs_embeds_for_the_e2e_model_names_the_refusal():
    """generate(inputs_embeds=...) for TTT-E2E: refused naming inputs_embeds, the model and input_ids."""
    e2e = tiny_hf_model("e2e")
    embeds = e2e.get_input_embeddings()(torch.arange(4).reshape(1, 4)).detach()
    with pytest.raises(ValueError, match=r"inputs_embeds \[1, 4, 32\] is not supported for the TTT-E2E"):
        e2e.generate(inputs_embeds=embeds, max_new_tokens=2, do_sample=False)


def test_generate_refuses_a_mask_of_another_shape_than_its_inputs_embeds(model, embeds):
    """generate(inputs_embeds [2, 3, 32], attention_mask=ones [2, 5]) generated: transformers drops a mask
    of ones before forward sees it, and only input_ids' mask was checked before that."""
    with pytest.raises(
        ValueError, match=re.escape("generate(): attention_mask must be [batch, cached + length] = [2, 3]")
    ) as raised:
        model.generate(
            inputs_embeds=embeds, attention_mask=torch.ones(2, 5, dtype=torch.int64), max_new_tokens=1
        )
    assert "inputs_embeds [2, 3, 32]" in str(raised.value)


def test_generate_of_an_empty_batch_of_inputs_embeds_names_inputs_embeds(model):
    """generate(inputs_embeds [0, 3, 32]) said 'generate() got input_ids of batch size 0 (shape (0, 0))'."""
    with pytest.raises(
        ValueError, match=re.escape("generate() got inputs_embeds of batch size 0 (shape [0, 3, 32])")
    ):
        model.generate(inputs_embeds=torch.zeros(0, 3, 32), max_new_tokens=1)
