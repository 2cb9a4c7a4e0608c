"""Review s55d: decoding through every path.

``innerloop.models.generate`` takes its numeric arguments by one rule (a Python number, a numpy scalar
or a 0-d tensor, for each of them), refuses a batch of 0 prompts as transformers' ``generate()`` does,
and the Hugging Face paths (greedy, beams, left padding, a cache continued) give the full forward's
tokens for every mixer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from innerloop.models import ModelConfig, build_model, generate, sample_next

_PROMPT = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
_TINY = {"hidden_size": 16, "num_heads": 2, "num_layers": 1, "intermediate_size": 32, "vocab_size": 40}


@pytest.fixture(scope="module")
def tiny_lm():
    torch.manual_seed(0)
    model = build_model(ModelConfig(**_TINY)).eval()
    list(generate(model, _PROMPT, 2, temperature=0.0))  # the kernels' first-use checks, once, here
    return model


def _tokens(model, prompt, **arguments) -> torch.Tensor:
    return torch.stack([token for token, _state in generate(model, prompt, **arguments)], 1)


@pytest.mark.parametrize(
    "temperature", [torch.tensor(0.5), torch.tensor(0.5, dtype=torch.float64), np.float32(0.5)]
)
def test_a_temperature_is_taken_as_a_0d_tensor_or_numpy_scalar_as_max_new_tokens_is(
    tiny_lm, temperature
) -> None:
    """max_new_tokens=torch.tensor(2) was taken while temperature=torch.tensor(0.5) was refused
    ('temperature=tensor(0.5000) (Tensor) must be a finite real number'): one rule for both now."""
    expected = _tokens(
        tiny_lm, _PROMPT, max_new_tokens=3, temperature=0.5, generator=torch.Generator().manual_seed(3)
    )
    given = _tokens(
        tiny_lm,
        _PROMPT,
        max_new_tokens=torch.tensor(3),
        temperature=temperature,
        top_k=np.int64(40),
        generator=torch.Generator().manual_seed(3),
    )
    assert torch.equal(given, expected)


def test_sample_next_takes_a_0d_tensor_temperature() -> None:
    logits = torch.randn(3, 9, generator=torch.Generator().manual_seed(0))
    draw = sample_next(logits, torch.tensor(0.7), torch.tensor(4), torch.Generator().manual_seed(1))
    assert torch.equal(draw, sample_next(logits, 0.7, 4, torch.Generator().manual_seed(1)))


@pytest.mark.parametrize(
    ("name", "value", "error", "words"),
    [
        ("temperature", torch.tensor([0.5]), TypeError, "temperature=tensor([0.5000]) (Tensor)"),
        ("temperature", torch.tensor(True), TypeError, "temperature=tensor(True) (Tensor)"),
        ("temperature", torch.tensor(float("nan")), ValueError, "temperature=nan must be a finite"),
        ("temperature", torch.tensor(-1.0), ValueError, "temperature=-1.0 must be"),
        ("top_k", torch.tensor(3.0), TypeError, "top_k=tensor(3.) (Tensor)"),
        ("max_new_tokens", torch.tensor(-1), ValueError, "max_new_tokens=-1 must be an int >= 0"),
    ],
)
def test_a_tensor_argument_that_is_no_number_of_its_kind_is_refused_by_name(
    tiny_lm, name, value, error, words
) -> None:
    arguments = {"max_new_tokens": 2, "temperature": 0.5} | {name: value}
    with pytest.raises(error) as caught:
        generate(tiny_lm, _PROMPT, **arguments)
    assert words in str(caught.value)


@pytest.mark.parametrize(
    "ids", [torch.tensor([3, 4]), np.array([3, 4]), torch.tensor([3, 4], dtype=torch.int32)]
)
def test_eos_ids_given_as_a_1d_tensor_or_array_are_the_list_of_them(tiny_lm, ids) -> None:
    """transformers' generate() takes ``eos_token_id`` as a tensor of ids; models.generate refused one
    ('must be a token id, a non-empty list of them') though it takes each of its 0-d elements."""
    expected = _tokens(tiny_lm, _PROMPT, max_new_tokens=4, temperature=0.0, eos_token_id=[3, 4])
    assert torch.equal(
        _tokens(tiny_lm, _PROMPT, max_new_tokens=4, temperature=0.0, eos_token_id=ids), expected
    )


@pytest.mark.parametrize(
    "ids", [torch.tensor([[3, 4]]), torch.tensor([3.0]), torch.tensor([], dtype=torch.long)]
)
def test_eos_ids_in_a_tensor_of_another_shape_or_dtype_are_refused(tiny_lm, ids) -> None:
    with pytest.raises(TypeError, match="eos_token_id"):
        generate(tiny_lm, _PROMPT, max_new_tokens=2, eos_token_id=ids)


@pytest.mark.parametrize("max_new_tokens", [0, 2])
def test_a_batch_of_no_prompts_is_refused_when_called(tiny_lm, max_new_tokens) -> None:
    """A [0, P] prompt yielded empty [0] tokens at every step (the model run on no rows);
    transformers' generate() (and the wrapper's) refuse it: now refused here too, naming prompt_ids."""
    with pytest.raises(ValueError, match=r"prompt_ids of batch size 0 \(shape \[0, 5\]\)"):
        generate(tiny_lm, torch.zeros(0, 5, dtype=torch.long), max_new_tokens)


# -- Hugging Face beam search against a beam search over whole forwards ----------------------------------

_VOCAB = 7
_BEAM_PROMPT_SEED = 2  # one whose beams cross in every mixer: without the reorder each fails
_FAMILY = {
    "swa": {"mixer": "swa", "window": 5},
    "linear_attention": {"mixer": "linear_attention", "family": {"mini_batch_size": 4}},
    "deltanet": {"mixer": "deltanet"},
    "gated_deltanet": {"mixer": "gated_deltanet"},
    "titans": {"mixer": "titans", "family": {"mini_batch_size": 4}},
}


def _hf_model(mixer: str):
    from innerloop.hf import InnerloopConfig, InnerloopForCausalLM

    shape = _TINY | {"vocab_size": _VOCAB}
    torch.manual_seed(0)
    model = InnerloopForCausalLM(InnerloopConfig(model=shape | _FAMILY[mixer])).eval().double()
    with torch.no_grad():  # away from the initialisation, so that the beams' scores are well apart
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    return model


def _beams_over_whole_forwards(
    model, prompt: list[int], beams: int, steps: int
) -> list[tuple[list[int], float]]:
    """Beam search by hand: each step reads every beam's whole sequence again (no cache), keeps the
    ``beams`` best of beams x vocabulary by summed log-probability (float32 log-softmax, as transformers)."""
    kept = [(prompt, 0.0)]
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([seq for seq, _ in kept]), use_cache=False).logits[:, -1]
        scores = torch.log_softmax(logits.float(), -1).double()
        grown = [
            (seq + [t], score + scores[i, t].item())
            for i, (seq, score) in enumerate(kept)
            for t in range(_VOCAB)
        ]
        kept = sorted(grown, key=lambda beam: -beam[1])[:beams]
    return kept


@pytest.mark.slow  # two float64 beam searches and a search by hand: 0.5-2 s each on a loaded CPU
@pytest.mark.parametrize("mixer", sorted(_FAMILY))
def test_hf_beam_search_of_each_family_member_is_the_search_over_whole_forwards(mixer) -> None:
    """The cache reordered per beam (state of each family member), left padding read row by row:
    measured, every mixer (TTT linear/MLP, attention, E2E, these) gives the by-hand search's sequences,
    scores within 6e-8 (float32 log-softmax), and a left-padded row the sequences of the row alone."""
    model = _hf_model(mixer)
    prompt = torch.randint(0, _VOCAB, (2, 9), generator=torch.Generator().manual_seed(_BEAM_PROMPT_SEED))
    mask = torch.ones_like(prompt)
    mask[0, :3] = 0  # row 0: 3 pads, then its prompt of 6 tokens
    search = {"num_beams": 3, "num_return_sequences": 2, "max_new_tokens": 4, "do_sample": False}
    out = model.generate(
        prompt, attention_mask=mask, return_dict_in_generate=True, output_scores=True, **search
    )
    for row, start in ((0, 3), (1, 0)):
        expected = _beams_over_whole_forwards(model, prompt[row, start:].tolist(), 3, 4)[:2]
        for k, (sequence, score) in enumerate(expected):
            assert out.sequences[2 * row + k, start:].tolist() == sequence
            assert abs(out.sequences_scores[2 * row + k].item() - score / 4) < 1e-6  # length penalty 1


def _held_by(cache) -> tuple[int, int]:
    """(bytes of the storages the cache's tensors keep alive, its nbytes()), the cache walked whole."""
    found: dict[int, int] = {}
    pending, seen = [cache], set()
    while pending:
        item = pending.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            found[item.untyped_storage().data_ptr()] = item.untyped_storage().nbytes()
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif hasattr(item, "__dict__") and not isinstance(item, type):
            pending.extend(vars(item).values())
    return sum(found.values()), cache.nbytes()


@pytest.mark.slow  # a 2,048-token prompt read by the wrapper, beams of 2: 0.5-3 s on a loaded CPU
@pytest.mark.parametrize("mixer", ["ttt-linear", "gated_deltanet", "attention"])
def test_the_hf_generate_cache_is_flat_in_the_prompt_length_but_full_attentions(mixer) -> None:
    """The cache transformers' generate() returns (left padded, beams of 2: a LeftPaddedCache) holds as
    many bytes after a 2,048-token prompt as after 128; full attention's grows, so the measure can fail.
    Measured too (not kept, minutes): 128 vs 8,000 tokens equal for TTT linear/MLP, swa, every family
    member (Titans, Titans-MLP to 512) and E2E (chunk 64, to 512); attention 196,480 -> 5,119,616 bytes
    held (a key-value buffer of some room: 196,480 -> 1,310,336 at 2,048)."""
    from innerloop.hf import InnerloopConfig, InnerloopForCausalLM

    kinds = {"ttt-linear": {"mixer": "ttt", "ttt": {"mini_batch_size": 4}}} | {
        name: {"mixer": name} for name in ("gated_deltanet", "attention")
    }
    torch.manual_seed(0)
    model = InnerloopForCausalLM(InnerloopConfig(model=_TINY | kinds[mixer])).eval()
    held = []
    for length in (128, 2048):
        prompt = torch.randint(0, 40, (2, length), generator=torch.Generator().manual_seed(2))
        mask = torch.ones_like(prompt)
        mask[0, :3] = 0
        search = {"num_beams": 2, "max_new_tokens": 3, "do_sample": False, "return_dict_in_generate": True}
        held.append(_held_by(model.generate(prompt, attention_mask=mask, **search).cache))
    if mixer == "attention":
        assert held[1][0] > 4 * held[0][0] and held[1][1] > 8 * held[0][1], held  # 6.7x, 16x measured
    else:
        assert held[0] == held[1], held


@pytest.mark.parametrize(
    ("setting", "search"),
    [
        ({"length_penalty": float("nan")}, {"num_beams": 2}),
        ({"length_penalty": float("inf")}, {"num_beams": 2}),
        ({"repetition_penalty": float("inf")}, {}),
        ({"exponential_decay_length_penalty": (1, float("nan"))}, {"eos_token_id": 3}),
    ],
)
def test_a_penalty_that_is_not_finite_is_refused_by_name(tiny_hf_model, setting, search) -> None:
    """transformers ran each silently: length_penalty=nan in a beam search returned 2 of the 3 tokens asked
    with scores nan, inf scores -0.0 for every beam; repetition_penalty=inf and a nan decay factor
    generated without a word. Refused now, naming the setting, as a temperature that is not finite."""
    name = next(iter(setting))
    prompt = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    with pytest.raises(ValueError, match=rf"generate\({name}="):
        tiny_hf_model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3, **setting, **search
        )


def test_finite_penalties_still_run(tiny_hf_model) -> None:
    prompt = torch.tensor([[1, 2, 3, 4]])
    settings = {
        "length_penalty": -1.0,
        "repetition_penalty": 1.3,
        "exponential_decay_length_penalty": (1, 1.5),
    }
    out = tiny_hf_model.generate(prompt, max_new_tokens=2, num_beams=2, eos_token_id=3, **settings)
    assert out.shape[0] == 1
