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
