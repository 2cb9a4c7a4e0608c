"""Review s38c: batched decoding, padding and interop (issues 3, 11, 13, 15)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def tiny_hf():
    """Built in setup, with one generate() run: the first imports much of transformers (about 1.5 s)."""
    from innerloop.hf import InnerloopConfig, InnerloopForCausalLM

    torch.manual_seed(0)
    model = InnerloopForCausalLM(InnerloopConfig(model={"hidden_size": 32, "num_heads": 2, "num_layers": 1}))
    with torch.no_grad():
        model.eval().generate(torch.tensor([[1, 2]]), max_new_tokens=1, do_sample=False)
    return model


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ({"prompt_lookup_num_tokens": 3}, r"generate\(prompt_lookup_num_tokens=3\)"),
        ({"assistant_model": "self"}, r"generate\(assistant_model=InnerloopForCausalLM\)"),
        ({"assistant_model": "self", "do_sample": True}, r"generate\(assistant_model=InnerloopForCausalLM\)"),
    ],
)
def test_assisted_generation_is_one_error_naming_its_setting(tiny_hf, setting, named) -> None:
    """review s38c (LOW): assisted (speculative) generation, asked by assistant_model= or
    prompt_lookup_num_tokens=, met transformers' bare "RuntimeError: Assisted decoding requires a cache"
    (innerloop's cache is made in forward): it needs a cache cropped back to the accepted draft tokens,
    which a recurrent state cannot be. Now one ValueError naming the setting and what works instead."""
    kwargs = {k: tiny_hf if v == "self" else v for k, v in setting.items()}
    ids = torch.tensor([[5, 6, 7, 5, 6, 7, 5, 6]])
    with pytest.raises(
        ValueError, match=named + r": assisted \(speculative\) generation is not supported.*cropped"
    ):
        tiny_hf.generate(ids, max_new_tokens=4, **{"do_sample": False, **kwargs})
