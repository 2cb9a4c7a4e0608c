"""Review s52b: generate() from inputs_embeds with a cache passed in, and the HF surface at inputs nobody
tried (each equal to what the same call with input_ids gives, or refused naming the argument)."""

from __future__ import annotations

import pytest
import torch
from hf_testing import tiny_hf_model

PROMPT_LENGTH, CACHED = 6, 4


@pytest.fixture(scope="module", params=["ttt_linear", "attention"])
def model(request):
    """A tiny TTT-Linear model and the attention baseline (hidden 32), only read."""
    return tiny_hf_model(request.param)


@pytest.fixture(scope="module")
def ttt_linear():
    """One tiny TTT-Linear model for the fast tests, only read."""
    return tiny_hf_model("ttt_linear")


@pytest.fixture(scope="module")
def prompt():
    """Token ids [2, 6] and a left-padded mask of them (row 0: two pads, their ids 0)."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 200, (2, PROMPT_LENGTH), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    return ids, mask


def _generated(model, *, seed=0, **arguments):
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(
            max_new_tokens=3, pad_token_id=0, output_logits=True, return_dict_in_generate=True, **arguments
        )


SEARCHES = {
    "greedy": {"do_sample": False},
    "beams": {"num_beams": 2, "num_return_sequences": 2, "do_sample": False},
    "sampling": {"do_sample": True, "num_return_sequences": 2, "top_k": 0},
}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("search", "masked"), [("greedy", False), ("greedy", True), ("beams", True), ("sampling", True)]
)
def test_generate_from_inputs_embeds_continues_a_cache_as_from_input_ids(model, prompt, search, masked):
    """generate(inputs_embeds=embed(ids), cache=model(ids[:, :4]).cache) was refused ('input_ids of 0
    tokens with a cache that has read 4'): transformers takes inputs_embeds of the whole sequence and
    reads those after the cache. Now its tokens are those of generate(ids, cache=...) (the new ones alone
    returned, as transformers' models do), its logits equal to float32 roundoff."""
    ids, mask = prompt
    if not masked:
        ids, mask = ids.masked_fill(ids == 0, 1), torch.ones_like(ids)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        cache = model(ids[:, :CACHED], attention_mask=mask[:, :CACHED], use_cache=True).cache
    given = {"attention_mask": mask, "cache": cache, **SEARCHES[search]}
    from_embeds = _generated(model, inputs_embeds=embeds, **given)
    from_ids = _generated(model, input_ids=ids, **given)
    assert torch.equal(from_embeds.sequences, from_ids.sequences[:, PROMPT_LENGTH:])
    for step_from_embeds, step_from_ids in zip(from_embeds.logits, from_ids.logits, strict=True):
        torch.testing.assert_close(step_from_embeds, step_from_ids, rtol=1e-5, atol=1e-5)
    assert cache.seq_length == CACHED  # the cache passed in is not changed


@pytest.mark.slow
def test_generate_from_inputs_embeds_no_longer_than_the_cache_names_inputs_embeds(model, prompt):
    """inputs_embeds of no more tokens than the cache has read: refused naming inputs_embeds, not
    'input_ids of 0 tokens', which the caller never passed."""
    ids, _ = prompt
    ids = ids.masked_fill(ids == 0, 1)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids[:, :CACHED])
        cache = model(ids[:, :CACHED], use_cache=True).cache
    with pytest.raises(ValueError, match=r"inputs_embeds of 4 tokens with a cache that has read 4") as raised:
        model.generate(inputs_embeds=embeds, cache=cache, max_new_tokens=1, pad_token_id=0)
    assert "input_ids" not in str(raised.value).split(":")[0]


LEGACY_KEYS_AND_VALUES = ((torch.zeros(2, 2, 3, 16), torch.zeros(2, 2, 3, 16)),)


@pytest.mark.parametrize("name", ["cache", "past_key_values", "cache_params"])
@pytest.mark.parametrize("foreign", ["DynamicCache", "legacy_tuple"])
def test_a_cache_not_innerloops_is_refused_naming_the_argument_it_came_as(ttt_linear, name, foreign):
    """forward(past_key_values=DynamicCache()) or a legacy tuple of keys and values said 'cache must be
    the InnerloopCache ...', naming an argument the caller did not pass, nor what to do instead."""
    from transformers import DynamicCache

    given = DynamicCache() if foreign == "DynamicCache" else LEGACY_KEYS_AND_VALUES
    with pytest.raises(
        ValueError, match=rf"^{name} must be the InnerloopCache .* got {type(given).__name__}"
    ):
        ttt_linear(torch.ones(2, 3, dtype=torch.int64), **{name: given})


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
# transformers calls past_key_values (given here on purpose) deprecated in favour of cache
@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
def test_generate_refuses_a_transformers_cache_saying_what_to_pass(ttt_linear, name):
    """generate(past_key_values=DynamicCache()) said only 'cache must be the InnerloopCache ..., got
    DynamicCache': now it names past_key_values too and says to pass none."""
    from transformers import DynamicCache

    with pytest.raises(
        ValueError, match=r"cache \(or past_key_values\) must be .* got DynamicCache.*pass none"
    ):
        ttt_linear.generate(torch.ones(1, 3, dtype=torch.int64), max_new_tokens=1, **{name: DynamicCache()})


FAMILY_MIXERS = ["linear_attention", "deltanet", "gated_deltanet", "titans"]


@pytest.mark.slow
@pytest.mark.parametrize("mixer", FAMILY_MIXERS)
def test_the_family_mixers_generate_from_inputs_embeds_as_from_input_ids(mixer, prompt):
    """Measured to hold (no fix needed): for each family mixer, generate(inputs_embeds=embed(ids)) of a
    left-padded prompt after a cache of its first 4 tokens (from scratch: measured too) gives the tokens of
    generate(ids) and its logits (equal at 0.0 when measured)."""
    from hf_testing import MODEL_KINDS, TINY

    from innerloop.hf import InnerloopConfig, InnerloopForCausalLM

    assert mixer not in MODEL_KINDS  # the shared kinds cover none of them
    torch.manual_seed(0)
    model = InnerloopForCausalLM(InnerloopConfig(model={**TINY, "mixer": mixer})).eval()
    ids, mask = prompt
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        cache = model(ids[:, :CACHED], attention_mask=mask[:, :CACHED]).cache
    from_embeds = _generated(model, inputs_embeds=embeds, attention_mask=mask, cache=cache)
    from_ids = _generated(model, input_ids=ids, attention_mask=mask, cache=cache)
    assert torch.equal(from_embeds.sequences, from_ids.sequences[:, PROMPT_LENGTH:])
    for step_from_embeds, step_from_ids in zip(from_embeds.logits, from_ids.logits, strict=True):
        torch.testing.assert_close(step_from_embeds, step_from_ids, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_forward_of_inputs_embeds_then_decoding_equals_the_whole_forward(model, prompt):
    """Measured to hold: forward(inputs_embeds[:, :4], mask) then its cache continued one token at a time
    (embeddings, then ids) gives the logits of the whole forward, left padding too (differences 1e-7)."""
    ids, mask = prompt
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        whole = model(inputs_embeds=embeds, attention_mask=mask).logits
        step = model(inputs_embeds=embeds[:, :CACHED], attention_mask=mask[:, :CACHED])
        pieces = [step.logits]
        step = model(inputs_embeds=embeds[:, CACHED:-1], attention_mask=mask[:, :-1], cache=step.cache)
        pieces.append(step.logits)
        pieces.append(model(ids[:, -1:], attention_mask=mask, cache=step.cache).logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("cached", [True, False], ids=["with_cache", "no_cache"])
def test_generate_refuses_inputs_embeds_with_prefill_chunk_size(ttt_linear, cached):
    """generate(inputs_embeds=..., cache=..., prefill_chunk_size=3) generated other tokens than
    generate(ids) (measured: [90, 90, 90] for [174, 174, 174]) once a cache with embeddings was read:
    transformers chunks input_ids, empty with embeddings, and the one empty chunk read the embeddings
    whole after the cache, the cached tokens again. Refused, naming both arguments."""
    ids = torch.arange(1, 19).reshape(2, 9)
    with torch.no_grad():
        embeds = ttt_linear.get_input_embeddings()(ids)
        given = {"cache": ttt_linear(ids[:, :1]).cache} if cached else {}
    with pytest.raises(ValueError, match=r"prefill_chunk_size=3.*inputs_embeds.*prefill_chunk_size=None"):
        ttt_linear.generate(
            inputs_embeds=embeds, prefill_chunk_size=3, max_new_tokens=2, do_sample=False, **given
        )
