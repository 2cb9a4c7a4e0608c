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
