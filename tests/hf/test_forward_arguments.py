"""The arguments of ``InnerloopForCausalLM.forward`` besides the ids (``innerloop/hf/arguments.py``): the
cache under transformers' names, the mask's shape, ``logits_to_keep``, ``output_hidden_states``,
positions, what is refused; and generate()'s chunked prefill and a cache of another dtype."""

from __future__ import annotations

import pytest
import torch
from hf_testing import TINY, tiny_hf_model

from innerloop.testing import FLOAT64_TOLERANCE

IDS = torch.tensor([list(b"hello!"), list(b"0123-5")])  # [2, 6]


def float64_model(kind: str):
    """A tiny float64 model of ``kind`` (exact comparisons)."""
    return tiny_hf_model(kind).double()


def largest_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --- The cache under transformers' names --------------------------------------------------------------


@pytest.mark.parametrize("name", ["past_key_values", "cache_params"])
@pytest.mark.parametrize("kind", ["ttt_linear", "e2e"])
def test_a_cache_passed_under_transformers_names_continues_its_sequence(name: str, kind: str) -> None:
    model = float64_model(kind)
    with torch.no_grad():
        full = model(IDS).logits
        cache = model(IDS[:, :4]).cache
        step = model(IDS[:, 4:], **{name: cache})
        alone = model(IDS[:, 4:]).logits
    assert largest_difference(step.logits, full[:, 4:]) <= FLOAT64_TOLERANCE
    assert largest_difference(step.logits, alone) > 1e-3  # the context matters: the check can fail
    assert step.cache.seq_length == 6


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_the_manual_decode_idiom_of_transformers_reads_the_context() -> None:
    model = float64_model("ttt_linear")
    with torch.no_grad():
        full = model(IDS).logits
        out = model(IDS[:, :4], use_cache=True)
        for t in (4, 5):
            out = model(IDS[:, t : t + 1], past_key_values=out.past_key_values)
            assert largest_difference(out.logits[:, 0], full[:, t]) <= FLOAT64_TOLERANCE


def test_two_different_caches_are_refused_and_one_cache_under_two_names_is_one() -> None:
    model = tiny_hf_model("swa")
    first, second = model(IDS[:, :4]).cache, model(IDS[:, :4]).cache
    with pytest.raises(
        ValueError,
        match=r"two different caches, cache=InnerloopCache and past_key_values=InnerloopCache: pass one",
    ):
        model(IDS[:, 4:], cache=first, past_key_values=second)
    with pytest.raises(ValueError, match=r"past_key_values=InnerloopCache and cache_params=InnerloopCache"):
        model(IDS[:, 4:], past_key_values=first, cache_params=second)
    with torch.no_grad():
        twice = model(IDS[:, 4:], cache=first, past_key_values=first).logits
        once = model(IDS[:, 4:], cache=first).logits
    assert torch.equal(twice, once)


# --- Arguments the model does not use -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"token_type_ids": torch.ones_like(IDS)}, r"token_type_ids holds segments other than 0"),
        (
            {"reduction": "sum", "head_mask": torch.ones(2)},  # num_items_in_batch is read (the Trainer's)
            r"does not use: reduction, head_mask",
        ),
        ({"output_attentions": True}, r"output_attentions=True is not supported"),
        (
            {"position_ids": torch.tensor([[1, 2, 3, 4, 5, 6]])},
            r"position_ids must be .* 0..5 .*got \[\[1, 2",
        ),
        ({"cache_position": torch.arange(6.0)}, r"cache_position must be the positions .* 0..5"),
        ({"position_ids": torch.zeros(2, 40, dtype=torch.long)}, r"position_ids .*got shape \[2, 40\]"),
    ],
    ids=["token_type_ids", "two_unknown", "output_attentions", "shifted_positions", "float", "long"],
)
def test_arguments_the_model_does_not_use_are_refused_naming_them(arguments: dict, named: str) -> None:
    model = tiny_hf_model("ttt_linear")
    with pytest.raises(ValueError, match=named):
        model(IDS, **arguments)


def test_positions_equal_to_the_ones_the_model_reads_change_nothing() -> None:
    model = tiny_hf_model("ttt_linear")
    with torch.no_grad():
        cache = model(IDS[:, :4]).cache
        plain = model(IDS[:, 4:], cache=cache).logits
        given = model(
            IDS[:, 4:],
            cache=cache,
            position_ids=torch.tensor([[4, 5], [4, 5]]),
            cache_position=torch.tensor([4, 5]),
            output_attentions=False,
            token_type_ids=None,
        ).logits
        with pytest.raises(
            ValueError, match=r"after the 4 tokens in the cache, 4..5 .*got \[0, 1\]"
        ) as plain_error:
            model(IDS[:, 4:], cache=cache, cache_position=torch.tensor([0, 1]))
        assert "packed" not in str(plain_error.value)
        # packed examples (DataCollatorWithFlattening): leaving the positions out would mix them (s45b's LOW)
        with pytest.raises(ValueError, match=r"restart inside a row .*one example per row"):
            model(IDS[:, :4], position_ids=torch.tensor([[0, 1, 0, 1], [0, 1, 2, 3]]))
    assert torch.equal(given, plain)


def test_a_subclass_takes_the_tokenizer_that_generate_passes_along() -> None:
    """s45e: ``generate(stop_strings=..., tokenizer=...)`` passes ``tokenizer`` to forward, accepted by
    the class's name since s45's refactor: a user's subclass of InnerloopForCausalLM refused it,
    "MyLM.forward got argument(s) it does not use: tokenizer", and could not generate with stop strings.
    InnerloopModel, which does not generate, still refuses it."""
    from innerloop.hf import InnerloopForCausalLM, InnerloopModel

    class MyLM(InnerloopForCausalLM):
        pass

    config = tiny_hf_model("swa").config
    with torch.no_grad():
        MyLM(config).eval()(IDS, tokenizer=object())
        with pytest.raises(ValueError, match=r"InnerloopModel.forward got argument\(s\) .*: tokenizer"):
            InnerloopModel(config).eval()(IDS, tokenizer=object())


def test_right_padded_rows_may_give_their_pads_any_position() -> None:
    """s45e: GPT-2's recipe for positions (``mask.cumsum(-1) - 1``, the pads set to 1) gives a right-padded
    row ``[0, 1, 2, 3, 1, 1]``: its pads' positions are read by nothing, so the batch is scored as
    without them; it was refused as examples packed into a row, telling the user to pad to the right."""
    model = tiny_hf_model("swa")
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        given = model(IDS, attention_mask=mask, position_ids=positions).logits
        assert torch.equal(given, model(IDS, attention_mask=mask).logits)
        with pytest.raises(ValueError, match=r"restart inside a row"):  # a kept token's position still read
            model(IDS, attention_mask=mask, position_ids=torch.tensor([0, 1, 0, 1, 2, 3]))


# --- The attention mask's shape -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mask", "given"),
    [
        (torch.tensor([0, 1, 1, 1, 1, 1]), r"\[6\]"),
        (torch.tensor([[[1, 1, 1, 1, 1, 0]]] * 2), r"\[2, 1, 6\]"),
        (torch.ones(2, 3), r"\[2, 3\]"),
        (torch.tensor([[0, 1, 1]] * 2), r"\[2, 3\]"),
        (torch.ones(1, 6), r"\[1, 6\]"),
    ],
    ids=["1d", "3d", "short_ones", "short_left_padded", "one_row"],
)
def test_a_mask_of_another_shape_than_the_ids_is_refused_naming_both(mask: torch.Tensor, given: str) -> None:
    model = tiny_hf_model("ttt_linear")
    expected = r"attention_mask must be \[batch, cached \+ length\] = \[2, 6\] \(input_ids \[2, 6\] after 0"
    with pytest.raises(ValueError, match=expected + r".*got shape " + given):
        model(IDS, attention_mask=mask)


def test_with_a_cache_the_mask_covers_the_cached_tokens_too_or_the_new_ones_alone() -> None:
    model = tiny_hf_model("ttt_linear")
    with torch.no_grad():
        cache = model(IDS[:, :4]).cache
        with pytest.raises(
            ValueError,
            match=r"= \[2, 6\], or \[batch, length\] = \[2, 2\] .*\(input_ids \[2, 2\] after 4 tokens .*got shape \[2, 3\]",
        ):
            model(IDS[:, 4:], cache=cache, attention_mask=torch.ones(2, 3))
        unmasked = model(IDS[:, 4:], cache=cache).logits
        assert torch.equal(model(IDS[:, 4:], cache=cache, attention_mask=torch.ones(2, 6)).logits, unmasked)
        assert torch.equal(model(IDS[:, 4:], cache=cache, attention_mask=torch.ones(2, 2)).logits, unmasked)


def test_arguments_that_change_nothing_are_taken() -> None:
    """generate(stop_strings=..., tokenizer=...) passes the tokenizer to forward, and a tokenizer that
    returns token_type_ids passes them in model(**tokenizer(text)): both were refused."""
    model = tiny_hf_model("ttt_linear")
    with torch.no_grad():
        plain = model(IDS).logits
        assert torch.equal(model(IDS, token_type_ids=torch.zeros_like(IDS), tokenizer=object()).logits, plain)


def test_generate_refuses_a_mask_of_another_shape_than_the_ids() -> None:
    model = tiny_hf_model("ttt_linear")
    short = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(
        ValueError,
        match=r"generate\(\): attention_mask must be \[batch, cached \+ length\] = \[2, 6\] .*got shape \[2, 3\]",
    ):
        model.generate(IDS, attention_mask=short, max_new_tokens=2)
    cache = model(IDS[:, :4]).cache
    with pytest.raises(
        ValueError, match=r"= \[2, 10\], or \[batch, length\] = \[2, 6\] \(input_ids \[2, 6\] after 4"
    ):
        model.generate(IDS, cache=cache, attention_mask=short, max_new_tokens=2)


# --- logits_to_keep and output_hidden_states ------------------------------------------------------------


@pytest.mark.parametrize(
    ("keep", "positions"),
    [(0, [0, 1, 2, 3, 4, 5]), (1, [5]), (4, [2, 3, 4, 5]), (torch.tensor([0, 3]), [0, 3])],
    ids=["0_all", "last", "last_4", "tensor"],
)
@pytest.mark.parametrize("kind", ["ttt_linear", "e2e"])
def test_logits_to_keep_keeps_those_positions_of_the_full_logits(kind: str, keep, positions: list) -> None:
    model = tiny_hf_model(kind)
    labels = IDS.clone()
    with torch.no_grad():
        full = model(IDS, labels=labels)
        kept = model(IDS, labels=labels, logits_to_keep=keep)
    assert torch.equal(kept.logits, full.logits[:, positions])
    assert torch.equal(kept.loss, full.loss)  # the loss reads every position


@pytest.mark.parametrize(
    "keep", [-1, True, 1.0, torch.tensor([0.0])], ids=["negative", "bool", "float", "float_tensor"]
)
def test_a_bad_logits_to_keep_is_refused(keep) -> None:
    with pytest.raises(ValueError, match=r"logits_to_keep must be an int >= 0 .*, got"):
        tiny_hf_model("swa")(IDS, logits_to_keep=keep)


@pytest.mark.parametrize("kind", ["ttt_linear", "ttt_mlp_mamba_untied", "attention"])
def test_hidden_states_are_the_embedding_each_block_and_the_final_norm(kind: str) -> None:
    model = float64_model(kind)
    network = model.model
    with torch.no_grad():
        out = model(IDS, output_hidden_states=True)
        states = out.hidden_states
        assert len(states) == TINY["num_layers"] + 1
        assert torch.equal(states[0], network.embed(IDS))
        assert torch.equal(states[1], network.blocks[0](states[0])[0])
        assert torch.equal(network.lm_head(states[-1]), out.logits)  # the last is what the head reads
        cache = model(IDS[:, :4]).cache
        continued = model(IDS[:, 4:], cache=cache, output_hidden_states=True).hidden_states
    for whole, step in zip(states, continued, strict=True):
        assert largest_difference(step, whole[:, 4:]) <= FLOAT64_TOLERANCE
    assert model(IDS).hidden_states is None  # only when asked for


def test_generate_returns_the_hidden_states_of_each_step() -> None:
    model = tiny_hf_model("ttt_linear")
    out = model.generate(
        IDS, max_new_tokens=3, do_sample=False, output_hidden_states=True, return_dict_in_generate=True
    )
    assert [len(step) for step in out.hidden_states] == [TINY["num_layers"] + 1] * 3
    assert [step[-1].shape[1] for step in out.hidden_states] == [
        6,
        1,
        1,
    ]  # the prompt, then a token at a time


def test_hidden_states_refused_where_they_are_not_recorded() -> None:
    with pytest.raises(ValueError, match=r"output_hidden_states=True is not supported for the TTT-E2E model"):
        tiny_hf_model("e2e")(IDS, output_hidden_states=True)
    with pytest.raises(ValueError, match=r"output_hidden_states must be True or False .*got \[-1\]"):
        tiny_hf_model("swa")(IDS, output_hidden_states=[-1])


# --- generate(): sampling, chunked prefill --------------------------------------------------------------


def test_sampling_reads_innerloops_logits_at_every_step() -> None:
    model = float64_model("ttt_linear")
    seen: list[torch.Tensor] = []  # the float64 logits each forward of generate() returns
    hook = model.register_forward_hook(lambda module, args, out: seen.append(out.logits))
    torch.manual_seed(5)
    try:
        sequences = model.generate(IDS, max_new_tokens=6, do_sample=True, top_k=0)
    finally:
        hook.remove()
    with torch.no_grad():
        expected, _ = model.model(sequences[:, :-1])  # innerloop's own forward over the sequence
    assert [step.shape[1] for step in seen] == [1] * 6  # logits_to_keep=1: the last position only
    steps = torch.cat(seen, dim=1)  # [B, 6, V]
    assert largest_difference(steps, expected[:, IDS.shape[1] - 1 :]) <= FLOAT64_TOLERANCE


def test_chunked_prefill_without_a_cache_says_what_to_pass_and_that_works() -> None:
    model = float64_model("ttt_linear")
    with pytest.raises(
        ValueError,
        match=r"prefill_chunk_size=4\) reads the prompt in chunks into a cache.*"
        r"cache = model\(input_ids\[:, :1\]\)\.cache; model\.generate\(input_ids, cache=cache",
    ):
        model.generate(IDS, prefill_chunk_size=4, max_new_tokens=3, do_sample=False)
    cache = model(IDS[:, :1]).cache  # what the message says
    chunked = model.generate(IDS, cache=cache, prefill_chunk_size=4, max_new_tokens=3, do_sample=False)
    assert torch.equal(chunked, model.generate(IDS, max_new_tokens=3, do_sample=False))


def test_a_chunked_prompt_is_checked_whole_as_an_unchunked_one() -> None:
    # review s60: each chunk was checked alone, so a left-padded row whose first chunk is all pads was
    # refused as "an empty row" (a right padding's words) where the unchunked prompt names the cause
    model = float64_model("ttt_linear")
    mask = torch.ones_like(IDS)
    mask[0, :3] = 0  # row 0 left padded: its first chunk of 3 (after the cached token) is all pads
    plain_cache = model(IDS[:, :1]).cache  # has read row 0's pad as a token
    for chunk in (None, 3):
        with pytest.raises(ValueError, match=r"a cache that has not read the first 1 token of input_ids as "):
            model.generate(
                IDS, attention_mask=mask, cache=plain_cache, prefill_chunk_size=chunk, max_new_tokens=2,
                do_sample=False,
            )  # fmt: skip
    other = IDS.flip(0)  # a cache of other tokens: the chunked prompt names it as the unchunked one
    with pytest.raises(ValueError, match=r"a cache that has not read the first 1 token of input_ids \(row 0"):
        model.generate(
            IDS, cache=model(other[:, :1]).cache, prefill_chunk_size=3, max_new_tokens=2, do_sample=False
        )
    # a cache that read the left-padded prefix continues it, chunked or not, to the same tokens
    cache = model(IDS[:, :4], attention_mask=mask[:, :4]).cache
    chunked = model.generate(
        IDS, attention_mask=mask, cache=cache, prefill_chunk_size=1, max_new_tokens=3, do_sample=False
    )
    whole = model.generate(IDS, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert torch.equal(chunked, whole)


# --- A cache of another dtype -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ttt_linear", "swa"])
def test_a_cache_made_in_another_dtype_is_refused_without_advising_what_it_lacks(kind: str) -> None:
    model = tiny_hf_model(kind)
    with torch.no_grad():
        cache = model(IDS).cache
        model.double()
        with pytest.raises(
            ValueError,
            match=r"cache was made by the model in torch.float32 on cpu, and the model is now in "
            r"torch.float64 on cpu.*model\(input_ids\)\.cache.*model\.to\(device='cpu', dtype=torch.float32\)",
        ) as refused:
            model(IDS[:, :1], cache=cache)
    assert ".to(torch" not in str(refused.value)  # neither the cache nor its state has a .to
    model.float()
    with torch.no_grad():
        assert model(IDS[:, :1], cache=cache).cache.seq_length == 7  # the model put back continues it
