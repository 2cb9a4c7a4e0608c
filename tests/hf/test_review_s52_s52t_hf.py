"""Review s52t: a cache's pads against the prompt's mask in generate().

A cache's fingerprints hash a pad as a zero (the id 0, or an embedding of zeros), so they could not tell
a pad from a real token 0 or a real embedding of zeros: a cache of a left-padded prompt continued by a
prompt that reads those columns (or the other way round) was taken, and the tokens silently continued
what the cache had read (measured: [214, 214], the padded prompt's continuation, where the prompt read
whole gives [239, 239]). generate() now also compares the cache's pads with the prompt's mask.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hf_testing import tiny_hf_model

# each test runs generate() or a forward (0.2-2 s each on the loaded 2-core host): all slow
pytestmark = pytest.mark.slow

PADS, CACHED = 2, 4


@pytest.fixture(scope="module")
def model():
    """One tiny TTT-Linear model, only read."""
    return tiny_hf_model("ttt_linear")


@pytest.fixture(scope="module")
def prompt():
    """Token ids [2, 6] whose row 0 starts with PADS ids 0, and the mask that makes them pads."""
    ids = torch.randint(1, 200, (2, 6), generator=torch.Generator().manual_seed(3))
    ids[0, :PADS] = 0
    mask = torch.ones_like(ids)
    mask[0, :PADS] = 0
    return ids, mask


def _generate(model, **arguments):
    with torch.no_grad():
        return model.generate(**{"max_new_tokens": 1, "do_sample": False, **arguments})


def _cache(model, **arguments):
    with torch.no_grad():
        return model(use_cache=True, **arguments).cache


REFUSED = rf"cache that has not read the first {CACHED} tokens"
PADDING_REFUSED = rf"{REFUSED}|attention_mask has left padding"


def test_a_padded_cache_continued_by_embeddings_of_zeros_read_is_refused(model, prompt) -> None:
    # regression review s52t: the zeros were hashed as the cache's pads: taken, A's continuation
    ids, mask = prompt
    cache = _cache(model, input_ids=ids[:, :CACHED], attention_mask=mask[:, :CACHED])
    embeds = model.get_input_embeddings()(ids).detach()
    embeds[0, :PADS] = 0.0  # read as tokens: no mask
    with pytest.raises(ValueError, match=REFUSED):
        _generate(model, cache=copy.deepcopy(cache), inputs_embeds=embeds, pad_token_id=0)


def test_a_padded_cache_continued_by_ids_0_read_is_refused(model, prompt) -> None:
    # regression review s52t: the ids 0 read (mask of ones; pad_token_id another id) were hashed as pads
    ids, mask = prompt
    cache = _cache(model, input_ids=ids[:, :CACHED], attention_mask=mask[:, :CACHED])
    ones = torch.ones_like(mask)
    with pytest.raises(ValueError, match=REFUSED):
        _generate(model, cache=copy.deepcopy(cache), input_ids=ids, attention_mask=ones, pad_token_id=5)


@pytest.mark.parametrize("prompt_as", ["input_ids", "inputs_embeds"])
def test_a_cache_that_read_ids_0_continued_with_them_as_pads_is_refused(model, prompt, prompt_as) -> None:
    # the state read the ids 0; the prompt's mask makes them pads: refused (held before: a plain cache
    # continued by a left-padded mask is refused as padding it cannot skip; pinned)
    ids, mask = prompt
    cache = _cache(model, input_ids=ids[:, :CACHED])
    given = ids if prompt_as == "input_ids" else model.get_input_embeddings()(ids).detach()
    with pytest.raises(ValueError, match=PADDING_REFUSED):
        _generate(
            model, cache=copy.deepcopy(cache), attention_mask=mask, pad_token_id=5, **{prompt_as: given}
        )


@pytest.mark.parametrize("prompt_as", ["input_ids", "inputs_embeds"])
def test_the_padded_prompt_the_cache_read_still_continues_it(model, prompt, prompt_as) -> None:
    ids, mask = prompt
    cache = _cache(model, input_ids=ids[:, :CACHED], attention_mask=mask[:, :CACHED])
    given = ids if prompt_as == "input_ids" else model.get_input_embeddings()(ids).detach()
    tokens = _generate(model, cache=cache, attention_mask=mask, pad_token_id=5, **{prompt_as: given})
    expected = _generate(model, input_ids=ids, attention_mask=mask, pad_token_id=5)
    assert torch.equal(tokens[:, -1], expected[:, -1])


@pytest.mark.parametrize("width", [8, 1024])
def test_embeddings_a_few_ulps_apart_in_two_features_hash_apart(width) -> None:
    # regression review s52t: each token's hash was linear in its numbers' bits (weights (2h+1)*G): +3 ulp
    # in feature 0 and -1 ulp in feature 1 (3*1 - 1*3 = 0) hashed alike, so "bit for bit" was not kept
    from innerloop.hf.modeling import embedding_fingerprint

    first = torch.randn(1, 3, width, generator=torch.Generator().manual_seed(0))
    second = first.clone()
    bits = second.view(torch.int32)
    bits[0, 1, 0] += 3
    bits[0, 1, 1] -= 1
    assert not torch.equal(embedding_fingerprint(first), embedding_fingerprint(second))
