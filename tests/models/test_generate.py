"""Sampling through the recurrent state: same tokens as a full forward, memory that does not grow."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from memory_testing import live_tensor_bytes

from innerloop.models import CausalLM, E2EConfig, ModelConfig, build_model, generate


def tiny(mixer: str, num_layers: int = 2) -> CausalLM:
    torch.manual_seed(0)
    config = ModelConfig(mixer=mixer, hidden_size=32, num_layers=num_layers, num_heads=2, window=8)
    return CausalLM(config).eval()


def memory_after(model: CausalLM, tokens: int) -> tuple[int, int]:
    """(state bytes, live tensor bytes) while the ``tokens``-th token is being produced."""
    prompt = torch.tensor([list(b"def ")])
    for i, (_token, state) in enumerate(generate(model, prompt, tokens, temperature=1.0, top_k=20)):
        if i == tokens - 1:
            return state.nbytes(), live_tensor_bytes()
    raise AssertionError("generate stopped early")


@pytest.mark.slow  # ~2 s in all: generates 330 tokens per mixer
@pytest.mark.parametrize("mixer", ["ttt", "swa"])
def test_memory_does_not_grow_with_generated_tokens(mixer: str) -> None:
    # mini-batches of 16, a window of 8: 30 tokens (34 positions) are past both. A cache that grew with
    # the tokens would show at once in the state's bytes, and in the live bytes by 300 tokens: a growing
    # buffer's first room (attention.appended: 5 positions + 256 at the first token after this prompt) is
    # full by then (304 positions). One block: the blocks are alike, and what one block's state or
    # buffers keep per token shows in the bytes the same (each token costs the model's blocks in turn).
    model = tiny(mixer, num_layers=1)
    state_30, live_30 = memory_after(model, 30)
    state_300, live_300 = memory_after(model, 300)
    assert state_300 == state_30
    assert live_300 == live_30


@pytest.mark.slow  # ~1 s: generates 310 tokens, scans every live object of the process twice
def test_the_measurement_sees_a_growing_cache() -> None:
    # Full attention keeps every key and value: the same measurement must see it grow. Its buffers grow
    # in steps (a quarter, at least 256 tokens), so at least half the cache's growth shows: at 304
    # positions the first room (261) has overflowed. One block, as the test above.
    model = tiny("attention", num_layers=1)
    state_10, live_10 = memory_after(model, 10)
    state_300, live_300 = memory_after(model, 300)
    assert state_300 > 20 * state_10  # 304 keys and values kept against 14
    assert live_300 - live_10 >= (state_300 - state_10) / 2


@pytest.mark.parametrize("mixer", ["ttt", "attention"])
def test_greedy_decoding_equals_argmax_of_a_full_forward(mixer: str) -> None:
    model = tiny(mixer).double()
    prompt = torch.tensor([list(b"import os\n")])
    tokens = [int(t) for t, _ in generate(model, prompt, 30, temperature=0)]
    sequence = torch.cat((prompt, torch.tensor([tokens])), dim=1)
    with torch.no_grad():
        logits, _ = model(sequence[:, :-1])
    expected = logits[0, prompt.shape[1] - 1 :].argmax(-1).tolist()
    assert tokens == expected


def test_sampling_is_reproducible_with_a_generator() -> None:
    model = tiny("ttt")
    prompt = torch.tensor([[100, 101]])

    def sample(seed: int) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        return [int(t) for t, _ in generate(model, prompt, 20, temperature=1.0, generator=g)]

    torch.manual_seed(0)
    first = sample(7)
    torch.manual_seed(1)  # the global RNG differs: only the generator may decide
    assert sample(7) == first
    greedy = [int(t) for t, _ in generate(model, prompt, 20, temperature=0)]
    assert sample(8) != first and first != greedy  # and it does sample (not argmax, not seed-blind)


def test_bad_arguments_are_named() -> None:
    model = tiny("swa")
    with pytest.raises(ValueError, match="max_new_tokens=-1"):
        list(generate(model, torch.tensor([[1]]), -1))
    with pytest.raises(ValueError, match=r"prompt_ids must be \[batch, length >= 1\]"):
        list(generate(model, torch.zeros(1, 0, dtype=torch.long), 3))
    with pytest.raises(ValueError, match="temperature=-1"):
        list(generate(model, torch.tensor([[1]]), 3, temperature=-1))


BAD_ARGUMENTS = [
    ({"max_new_tokens": -1}, ValueError, r"max_new_tokens=-1 must be an int >= 0"),
    ({"max_new_tokens": 2.5}, TypeError, r"max_new_tokens=2.5 \(float\) must be an int >= 0"),
    ({"max_new_tokens": "3"}, TypeError, r"max_new_tokens='3' \(str\) must be an int >= 0"),
    ({"max_new_tokens": True}, TypeError, r"max_new_tokens=True \(bool\) must be an int >= 0"),
    ({"temperature": "1"}, TypeError, r"temperature='1' \(str\) must be a finite real number >= 0"),
    (
        {"temperature": -0.5},
        ValueError,
        r"temperature=-0.5 must be a finite real number >= 0 \(0 is greedy\)",
    ),
    ({"temperature": float("nan")}, ValueError, r"temperature=nan must be a finite real number >= 0"),
    ({"temperature": False}, TypeError, r"temperature=False \(bool\) must be a finite real number"),
    ({"top_k": 2.5}, TypeError, r"top_k=2.5 \(float\) must be an int >= 1, or None"),
    ({"top_k": True}, TypeError, r"top_k=True \(bool\) must be an int >= 1, or None"),
    ({"top_k": 0}, ValueError, r"top_k=0 must be an int >= 1, or None"),
    ({"generator": 7}, TypeError, r"generator must be a torch.Generator or None, got int"),
    (
        {"prompt_ids": torch.tensor([[1, 256]])},
        ValueError,
        r"prompt_ids holds token id 256, .*vocab_size=256",
    ),
    ({"prompt_ids": torch.tensor([[-3, 1]])}, ValueError, r"prompt_ids holds token id -3, .*0\.\.255"),
    ({"prompt_ids": torch.tensor([[1.0, 2.0]])}, TypeError, r"prompt_ids must hold integer token ids"),
    ({"prompt_ids": [[1, 2]]}, TypeError, r"prompt_ids must be a torch.Tensor of token ids"),
    ({"prompt_ids": torch.tensor([1, 2])}, ValueError, r"prompt_ids must be \[batch, length >= 1\]"),
]


@pytest.mark.parametrize(("arguments", "error", "match"), BAD_ARGUMENTS)
def test_bad_arguments_are_refused_when_generate_is_called_not_when_it_is_read(
    arguments, error, match
) -> None:
    calls = []
    model = tiny("swa")
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    given = {"prompt_ids": torch.tensor([[1, 2]]), "max_new_tokens": 3, **arguments}
    with pytest.raises(error, match=match):
        generate(model, **given)  # not iterated: the check is eager
    assert not calls  # and nothing ran


def test_generate_runs_the_model_only_as_it_is_read_and_takes_numpy_numbers() -> None:
    calls = []
    model = tiny("swa")
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    tokens = generate(model, torch.tensor([[1, 2]]), np.int64(3), np.float32(0.5), np.int32(5))
    assert not calls
    assert len(list(tokens)) == 3 and len(calls) == 3  # the prompt and two single tokens


@pytest.mark.parametrize("temperature", [1e-40, 1e-300, 5e-324])
def test_a_tiny_positive_temperature_samples_the_greedy_token(temperature) -> None:
    """Any positive temperature is exact: a tiny one puts all the mass on the largest logit (it used to
    overflow to NaN probabilities, a RuntimeError from multinomial)."""
    from innerloop.models.generate import sample_next

    torch.manual_seed(0)
    logits = torch.randn(5, 256) * 30  # [B, V]
    generator = torch.Generator().manual_seed(0)
    for top_k in (None, 3):
        sampled = sample_next(logits, temperature, top_k, generator)
        assert torch.equal(sampled, logits.argmax(dim=-1))


@pytest.mark.parametrize("mixer", ["ttt", "swa", "attention", "e2e"])
def test_a_prompt_longer_than_a_chunk_is_read_in_chunks_equal_to_one_call(
    mixer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long prompt is read PROMPT_CHUNK_TOKENS at a time (constant memory): the same logits and state as
    one call, in float64, whatever the split (here chunks of 5 across 23 prompt tokens)."""
    generate_module = importlib.import_module("innerloop.models.generate")  # the package exports the function

    if mixer == "e2e":  # TTT-E2E's inner chunks of 4: the prompt's chunks of 5 split them
        torch.manual_seed(0)
        e2e = E2EConfig(chunk_size=4, suffix_fraction=0.5)
        model = build_model(
            ModelConfig(mixer="e2e", hidden_size=32, num_layers=2, num_heads=2, window=4, e2e=e2e)
        )
        model = model.eval().double()
    else:
        model = tiny(mixer).double()
    prompt = torch.tensor([list(b"import os, sys; x = 1\n\n")])  # 23 tokens
    with torch.no_grad():
        logits, whole_state = model(prompt)
    calls = []
    original_forward = model.forward

    def counting_forward(ids, state=None):
        calls.append(ids.shape[1])
        return original_forward(ids, state)

    monkeypatch.setattr(model, "forward", counting_forward)
    monkeypatch.setattr(generate_module, "PROMPT_CHUNK_TOKENS", 5)
    last, state = generate_module._read_prompt(model, prompt)
    assert calls == [5, 5, 5, 5, 3]
    torch.testing.assert_close(last, logits[:, -1], rtol=1e-10, atol=1e-10)
    assert state.position == whole_state.position == prompt.shape[1]
    tokens = [int(t) for t, _ in generate(model, prompt, 6, temperature=0)]
    monkeypatch.setattr(generate_module, "PROMPT_CHUNK_TOKENS", 4096)
    assert tokens == [int(t) for t, _ in generate(model, prompt, 6, temperature=0)]
