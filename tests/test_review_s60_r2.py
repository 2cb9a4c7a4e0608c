"""Review s60 r2 (language models, generation, Hugging Face, checkpoints, CLI): the defects found, each
with the test that failed before its fix."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from innerloop.models import ModelConfig, build_model
from innerloop.models.params import count_parameters

SMALL = {"hidden_size": 16, "num_heads": 2, "intermediate_size": 24, "vocab_size": 50}


@pytest.mark.parametrize(
    "model",
    [
        {**SMALL, "mixer": "ttt", "backbone": "mamba", "tie_embeddings": False},
        {**SMALL, "mixer": "e2e", "num_layers": 4, "window": 8, "e2e": {"chunk_size": 4}},
    ],
    ids=["ttt_mamba_untied", "e2e"],
)
def test_a_compiled_model_is_counted_by_parts_as_the_uncompiled_one(model) -> None:
    """Seen failing: ``count_parameters(torch.compile(model))`` read the wrapper's names
    (``_orig_mod.embed.weight``) as no part's, and reported ``embedding 0; mixer 2 x 0; other N`` (the
    throughput callback prints and logs these at fit start for a ``module.model`` compiled in place); a
    block compiled in place (``blocks.1._orig_mod.mixer...``) lost its mixer, MLP and norms to ``other``.
    (torch.compile only wraps here: nothing is compiled before a call.)"""
    torch.manual_seed(0)
    plain = build_model(ModelConfig.from_dict(model))
    expected = dataclasses.asdict(count_parameters(plain))
    assert expected["parts"]["other"] == 0 and expected["parts"]["mixer"] > 0
    assert dataclasses.asdict(count_parameters(torch.compile(plain))) == expected
    plain.blocks[1] = torch.compile(plain.blocks[1])
    assert dataclasses.asdict(count_parameters(plain)) == expected


@pytest.mark.slow  # torch.compile's first call imports torch._dynamo: seconds
def test_an_e2e_model_with_a_suffix_block_compiled_in_place_runs_as_the_plain_one() -> None:
    """Seen failing (``KeyError: 'blocks.3.prime.gate_proj.weight'``): the TTT-E2E model looked its fast
    weights up in ``named_parameters()``, where a suffix block compiled in place
    (``model.blocks[3] = torch.compile(...)``, as a CausalLM's block may be: tests/test_review_s57_s57o.py)
    names them ``blocks.3._orig_mod.prime...``; it crashed at the first call and at a state's check.
    Compiled with the eager backend: the names, not the compilation, are under test."""
    config = ModelConfig.from_dict(
        {**SMALL, "mixer": "e2e", "num_layers": 4, "window": 6, "e2e": {"chunk_size": 4}}
    )
    torch.manual_seed(0)
    plain = build_model(config).double()
    torch.manual_seed(0)
    partly = build_model(config).double()
    partly.blocks[3] = torch.compile(partly.blocks[3], backend="eager")
    ids = torch.randint(0, SMALL["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, expected_state = plain(ids[:, :9])
        got, state = partly(ids[:, :9])
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
        continued, _ = partly(ids[:, 9:], state)  # the state's shapes are checked against the weights
        torch.testing.assert_close(continued, plain(ids[:, 9:], expected_state)[0], rtol=0, atol=1e-12)
