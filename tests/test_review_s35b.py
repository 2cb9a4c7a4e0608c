"""Review s35b: dtypes across the mixers (issue 9's "never a silent wrong number", issue 13's precision).

A state passed back in must not carry a narrower dtype's rounding into a wider model's result: the TTT
layer, the family's layers and TTT-E2E refuse it; the attention layers' KV cache did not (a float32
cache into a float64 model gave float64 logits with float32 keys in them, silently).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from innerloop.models import CausalLM, ModelConfig
from innerloop.models.blocks import CausalDepthwiseConv

_TINY = dict(hidden_size=8, num_heads=2, intermediate_size=16, num_layers=1, vocab_size=11)


# reason: two models of each kind and an autocast call (0.2 s warm, 1 s when it is the first to run SDPA)
@pytest.mark.slow
@pytest.mark.parametrize("mixer", ["attention", "swa"])
def test_an_attention_cache_narrower_than_the_model_is_refused_naming_it(mixer):
    torch.manual_seed(0)
    lm32 = CausalLM(ModelConfig(mixer=mixer, window=3, **_TINY))
    lm64 = CausalLM(ModelConfig(mixer=mixer, window=3, **_TINY)).double()
    ids = torch.randint(0, 11, (1, 4))
    with torch.no_grad():
        _, state32 = lm32(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast leaves a float64 model in float64
            _, state64 = lm64(ids)
        assert state64.blocks[0].mixer.key.dtype == torch.float64
        with pytest.raises(TypeError, match=r"state.blocks\[0\].mixer.key is torch.float32, narrower than this "
                           r"layer's torch.float64 weights"):  # fmt: skip
            lm64(ids[:, :1], state32)
        lm32(ids[:, :1], state64)  # a wider cache is used in float32: what the call computes in
        with torch.autocast("cpu", dtype=torch.bfloat16):  # a cache written under autocast is taken back
            _, state_bf16 = lm32(ids)
            lm32(ids[:, :1], state_bf16)


def test_a_pre_conv_history_narrower_than_the_conv_is_refused_naming_it():
    # the sibling of the cache's check: the mamba backbone's pre-conv history carried between calls
    conv = CausalDepthwiseConv(4, 3).double()
    x = torch.randn(1, 2, 4, dtype=torch.float64)
    with pytest.raises(
        TypeError, match=r"history is torch.float32, narrower than this layer's torch.float64"
    ):
        conv(x, torch.zeros(1, 2, 4))
    conv(x, torch.zeros(1, 2, 4, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # written under autocast: taken back
        conv.float()(x.float(), torch.zeros(1, 2, 4, dtype=torch.bfloat16))


def test_an_e2e_state_with_float32_caches_is_refused_by_a_float64_model():
    from innerloop.models import build_model

    torch.manual_seed(0)
    config = ModelConfig.from_dict({**_TINY, "mixer": "e2e", "window": 4, "e2e": {"chunk_size": 4}})
    model = build_model(config).double()
    ids = torch.randint(0, 11, (1, 6))
    with torch.no_grad():
        _, state = model(ids)
        state = dataclasses.replace(state.to(torch.float32), fast=state.fast)  # only the caches narrowed
        with pytest.raises(TypeError, match=r"state.caches\[0\].key is torch.float32, narrower than"):
            model(ids[:, :2], state)
