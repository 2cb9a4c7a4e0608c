"""Review s57i: constant-memory decoding for every mixer, through every decoding entry.

The README, docs/architecture.md and docs/e2e.md promise that a TTT layer and the family members
decode in memory that does not grow with the context. The tests here count the bytes of the storages
a state (or Hugging Face cache) keeps alive after prompts of two lengths and after two numbers of
generated tokens, for every mixer but full attention (whose cache grows, as the docs say), in float32
and bfloat16, through ``innerloop.models.generate`` and transformers' ``generate``. Sliding-window
attention is also held to its window. The lengths differ by multiples of 16 (the mini-batch and the
chunk), so that each state has read the same part of a mini-batch or chunk at both."""

from __future__ import annotations

import pytest
import torch

from innerloop.models import MIXERS, ModelConfig, build_model, generate
from innerloop.models.lm import _tensors

SMALL = {"vocab_size": 64, "hidden_size": 16, "num_layers": 1, "num_heads": 2, "window": 5}
KINDS = {
    **{mixer: {"mixer": mixer} for mixer in MIXERS},
    "ttt_mlp": {"mixer": "ttt", "ttt": {"inner_model": "mlp"}},
    "titans_mlp": {"mixer": "titans", "family": {"memory": "mlp"}},
    "e2e": {"mixer": "e2e", "num_layers": 2, "e2e": {"chunk_size": 16}},
}
BOUNDED = [kind for kind in KINDS if kind != "attention"]
PROMPTS, TOKENS = (24, 152), (1, 17)  # prompt lengths and generated tokens: 128 and 16 apart


def held_bytes(state: object) -> int:
    """Bytes of the storages the tensors of ``state`` keep alive, each storage once."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in _tensors(state)}
    return sum(storages.values())


def state_bytes(kind: str, dtype: torch.dtype, measure=held_bytes) -> list[int]:
    """``measure(state)`` (the bytes it holds) of the state of ``generate`` after each prompt of
    :data:`PROMPTS` and each number of tokens of :data:`TOKENS`."""
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_dict({**SMALL, **KINDS[kind]})).eval().to(dtype)
    sizes = []
    for length in PROMPTS:
        prompt = torch.randint(0, 64, (1, length))
        for i, (_token, state) in enumerate(generate(model, prompt, TOKENS[-1] + 1, temperature=0)):
            if i in TOKENS:  # the state has read the prompt and i tokens
                sizes.append(measure(state))
    return sizes


@pytest.mark.slow  # ~0.5 s each (up to 30 s on the loaded 2-core machine): 2 prompts, 18 tokens each
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", BOUNDED)
def test_generate_holds_the_same_bytes_after_any_prompt_and_any_number_of_tokens(kind, dtype) -> None:
    sizes = state_bytes(kind, dtype)
    assert len(sizes) == 4 and len(set(sizes)) == 1, sizes


@pytest.mark.slow  # ~0.3 s each (7 s on the loaded 2-core machine): 2 prompts, 18 tokens each
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_sliding_window_state_holds_only_its_window(dtype) -> None:
    # keys and values of window - 1 tokens per block: the next query sees them and itself
    window_bytes = 2 * (SMALL["window"] - 1) * SMALL["hidden_size"] * dtype.itemsize * SMALL["num_layers"]
    assert state_bytes("swa", dtype, lambda state: state.nbytes()) == [window_bytes] * 4


@pytest.mark.slow  # ~0.3 s (7 s on the loaded 2-core machine): 2 prompts, 18 tokens each
def test_the_measurement_sees_full_attentions_cache_grow() -> None:
    sizes = state_bytes("attention", torch.float32, lambda state: state.nbytes())
    assert sizes[1] > sizes[0] and sizes[2] > sizes[1], sizes


@pytest.mark.slow  # ~1 s each (up to 30 s on the loaded 2-core machine): 4 generate calls
@pytest.mark.parametrize("kind", BOUNDED)
def test_hugging_face_generate_keeps_a_cache_of_the_same_bytes_at_any_length(kind) -> None:
    pytest.importorskip("transformers")
    from innerloop.hf import InnerloopConfig, InnerloopForCausalLM

    torch.manual_seed(0)
    model = InnerloopForCausalLM(InnerloopConfig(model={**SMALL, **KINDS[kind]})).eval()
    sizes = []
    for length in PROMPTS:
        prompt = torch.randint(0, 64, (1, length))
        for tokens in TOKENS:
            out = model.generate(
                prompt, max_new_tokens=tokens + 1, do_sample=False, return_dict_in_generate=True
            )
            sizes.append(held_bytes(out.cache.state))  # has read the prompt and `tokens` new ones
    assert len(set(sizes)) == 1, sizes
