"""Review s52p: generate() from inputs_embeds with a cache passed in, at the inputs s52b did not try.

A cache continues the sequence it has read: with input_ids, generate() compared the prompt's first tokens
with the cache's fingerprint and refused another prompt; with inputs_embeds (and with input_ids after a
cache made from embeddings) nothing was compared, and the tokens silently continued the cache's text
(measured: [174, 174, 174] / [53, 53, 53], the continuation of prompt A, for prompt B's [156, 156, 156] /
[118, 118, 118]). The cache now also keeps a hash of the embeddings it has read (bit for bit; the ids'
embeddings where it read ids), and both paths compare the prompt's first tokens with it.
"""

from __future__ import annotations

import pytest
import torch
from hf_testing import tiny_hf_model

# each test runs generate() once or twice (0.2-2.8 s each on the loaded 2-core host, load 18): all slow
pytestmark = pytest.mark.slow

PROMPT_LENGTH, CACHED = 6, 4


@pytest.fixture(scope="module")
def model():
    """One tiny TTT-Linear model, only read."""
    return tiny_hf_model("ttt_linear")


@pytest.fixture(scope="module")
def prompts():
    """Two prompts of token ids [2, 6] that differ in every row's first tokens, and a left-padded mask
    (row 0: two pads)."""
    generator = torch.Generator().manual_seed(1)
    first = torch.randint(1, 200, (2, PROMPT_LENGTH), generator=generator)
    second = torch.randint(1, 200, (2, PROMPT_LENGTH), generator=generator)
    mask = torch.ones_like(first)
    mask[0, :2] = 0
    return first, second, mask


def _generate(model, **arguments):
    with torch.no_grad():
        return model.generate(**{"max_new_tokens": 1, "pad_token_id": 0, "do_sample": False, **arguments})


def _cache(model, **arguments):
    with torch.no_grad():
        return model(use_cache=True, **arguments).cache


@pytest.mark.parametrize("cache_from", ["input_ids", "inputs_embeds"])
@pytest.mark.parametrize("prompt_as", ["input_ids", "inputs_embeds"])
def test_a_prompt_the_cache_has_not_read_is_refused_however_given(model, prompts, cache_from, prompt_as):
    """A cache of prompt A continued by prompt B (same length): refused whichever way each was given
    (only ids with an ids cache was refused before; the three others continued A silently)."""
    first, second, _ = prompts
    embed = model.get_input_embeddings()
    read = first[:, :CACHED] if cache_from == "input_ids" else embed(first[:, :CACHED]).detach()
    cache = _cache(model, **{cache_from: read})
    prompt = second if prompt_as == "input_ids" else embed(second).detach()
    with pytest.raises(
        ValueError, match=rf"cache that has not read the first {CACHED} tokens of {prompt_as}"
    ):
        _generate(model, cache=cache, **{prompt_as: prompt})


@pytest.mark.parametrize("cache_from", ["input_ids", "inputs_embeds"])
@pytest.mark.parametrize("prompt_as", ["input_ids", "inputs_embeds"])
def test_the_prompt_the_cache_has_read_continues_it_however_given(model, prompts, cache_from, prompt_as):
    """The same prompt, given either way, left padded: accepted, and the tokens of a generate() of the
    whole prompt without a cache."""
    first, _, mask = prompts
    embed = model.get_input_embeddings()
    read = first[:, :CACHED] if cache_from == "input_ids" else embed(first[:, :CACHED]).detach()
    cache = _cache(model, attention_mask=mask[:, :CACHED], **{cache_from: read})
    prompt = first if prompt_as == "input_ids" else embed(first).detach()
    tokens = _generate(model, cache=cache, attention_mask=mask, **{prompt_as: prompt})[:, -1]
    assert torch.equal(tokens, _generate(model, input_ids=first, attention_mask=mask)[:, -1])


def test_one_changed_number_in_the_embeddings_read_is_refused(model, prompts):
    """The embeddings are compared bit for bit: one feature of one cached token moved by 1e-3 is another
    prompt to the cache."""
    first, _, _ = prompts
    embeds = model.get_input_embeddings()(first).detach()
    cache = _cache(model, inputs_embeds=embeds[:, :CACHED])
    moved = embeds.clone()
    moved[1, CACHED - 1, 5] += 1e-3
    with pytest.raises(ValueError, match=r"row 1 differs"):
        _generate(model, inputs_embeds=moved, cache=cache)


def test_the_pads_embeddings_are_not_compared(model, prompts):
    """A left pad is read by nothing: its embedding, whatever it holds, is not compared."""
    first, _, mask = prompts
    embeds = model.get_input_embeddings()(first).detach()
    cache = _cache(model, inputs_embeds=embeds[:, :CACHED], attention_mask=mask[:, :CACHED])
    other_pads = embeds.clone()
    other_pads[0, :2] = 7.0
    _generate(model, inputs_embeds=other_pads, cache=cache, attention_mask=mask)  # not refused


@pytest.mark.parametrize("padded", [False, True])
def test_generate_from_inputs_embeds_takes_the_mask_of_the_embeddings_alone(model, prompts, padded):
    """inputs_embeds in generate() are the whole sequence, the tokens the cache has read included, so
    their mask is [batch, length of inputs_embeds]; one of [batch, cached + length] was taken: a mask of
    ones passed unseen, a left-padded one failed in forward naming shapes of the embeddings transformers
    cut ([2, 2, 32]), not those passed. Now refused at once, naming inputs_embeds and what to pass."""
    first, _, mask = prompts
    embeds = model.get_input_embeddings()(first).detach()
    mask = mask if padded else torch.ones_like(mask)
    cache = _cache(model, input_ids=first[:, :CACHED], attention_mask=mask[:, :CACHED])
    too_long = torch.cat((mask[:, :CACHED], torch.ones_like(mask)), dim=1)  # [2, 4 + 6], left padded or ones
    with pytest.raises(
        ValueError,
        match=r"attention_mask must be \[batch, length\] = \[2, 6\] with inputs_embeds \[2, 6, 32\]",
    ) as refused:
        _generate(model, inputs_embeds=embeds, cache=cache, attention_mask=too_long)
    assert "got shape [2, 10]" in str(refused.value)


@pytest.mark.parametrize(
    "search",
    [{"num_beams": 2, "num_return_sequences": 2}, {"do_sample": True, "num_return_sequences": 3}],
    ids=["beams", "sampling"],
)
def test_another_prompt_is_refused_after_the_cache_is_repeated_per_sequence(model, prompts, search):
    """Beams and num_return_sequences repeat the cache's rows (and their embedding hash) with the prompt:
    another prompt is still refused, the one read still accepted."""
    first, second, _ = prompts
    embed = model.get_input_embeddings()
    cache = _cache(model, inputs_embeds=embed(first[:, :CACHED]).detach())
    with pytest.raises(
        ValueError, match=r"has not read the first 4 tokens of inputs_embeds \(row [23] differs"
    ):
        _generate(
            model, inputs_embeds=embed(torch.cat((first[:1], second[1:]))).detach(), cache=cache, **search
        )
    _generate(model, inputs_embeds=embed(first).detach(), cache=cache, **search)


def test_ids_padded_past_the_vocabulary_continue_a_cache_of_embeddings(model, prompts):
    """A tokenizer may pad with an id past the vocabulary (the byte tokenizer's 256): the ids' embeddings
    compared with a cache of embeddings are those of the ids forward reads, the pads' set to 0, not an
    IndexError of the embedding."""
    first, _, mask = prompts
    embeds = model.get_input_embeddings()(first).detach()
    cache = _cache(model, inputs_embeds=embeds[:, :CACHED], attention_mask=mask[:, :CACHED])
    padded = first.masked_fill(mask == 0, 256)
    tokens = _generate(model, input_ids=padded, cache=cache, attention_mask=mask)[:, -1]
    assert torch.equal(tokens, _generate(model, input_ids=first, attention_mask=mask)[:, -1])
