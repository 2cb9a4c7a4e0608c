"""Parameter counts by part, sizing to a budget, and the tiny presets matched in parameters."""

from __future__ import annotations

import pytest
import torch

from innerloop.config.load import load_config
from innerloop.models import CausalLM, ModelConfig, build_model
from innerloop.models.params import (
    count_config_parameters,
    count_parameters,
    size_to_budget,
)

SMALL = {"hidden_size": 16, "num_layers": 2, "num_heads": 2, "intermediate_size": 24}


def _by_prefix(model: torch.nn.Module, *prefixes: str) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefixes))


@pytest.mark.parametrize("mixer", ["ttt", "attention", "swa", "e2e"])
def test_parts_add_up_to_the_distinct_parameters(mixer) -> None:
    config = ModelConfig.from_dict({**SMALL, "mixer": mixer})
    model = build_model(config)
    counts = count_parameters(model)
    assert counts.total == model.num_parameters() == sum(counts.parts.values())
    assert counts.embedding == 256 * 16  # the tied head is counted once, with the embedding
    assert sum(counts.per_block) == _by_prefix(model, "blocks.")
    assert counts.per_block_mixer == tuple(
        _by_prefix(model, f"blocks.{i}.mixer.", f"blocks.{i}.attn.") for i in range(2)
    )
    assert counts.mixer == sum(counts.per_block_mixer)
    assert counts.parts["mlp"] == 2 * 3 * 16 * 24
    if mixer == "e2e":  # the last block's prime MLP, apart from the mixer
        assert counts.parts["prime"] == _by_prefix(model, "blocks.1.prime.") == 3 * 16 * 24
    assert count_config_parameters(config) == counts  # counted on the meta device, the same


def test_an_untied_head_and_a_pre_conv_are_their_own_parts() -> None:
    model = CausalLM(ModelConfig.from_dict({**SMALL, "tie_embeddings": False, "backbone": "mamba"}))
    counts = count_parameters(model)
    assert counts.parts["head"] == 256 * 16 and counts.embedding == 2 * 256 * 16
    assert counts.parts["pre_conv"] == 2 * (16 * 4 + 16)  # depthwise weight and bias per block
    assert "pre_conv 160" in counts.describe() and counts.describe().startswith(
        f"{counts.total:,} parameters"
    )


@pytest.mark.parametrize("adjust", ["intermediate_size", "hidden_size"])
@pytest.mark.parametrize("mixer", ["ttt", "swa", "e2e"])
def test_size_to_budget_finds_the_closest_width(mixer, adjust) -> None:
    config = ModelConfig.from_dict({**SMALL, "mixer": mixer})
    budget = 50_000
    sized = size_to_budget(config, budget, adjust)
    total = count_config_parameters(sized).total
    step = 1 if adjust == "intermediate_size" else 2 * config.num_heads
    value = getattr(sized, adjust)
    # No valid neighbour is closer (the brute-force check of the bisection).
    for other in (value - step, value + step):
        if other >= step:
            neighbour = count_config_parameters(
                ModelConfig.from_dict({**SMALL, "mixer": mixer, adjust: other})
            )
            assert abs(total - budget) <= abs(neighbour.total - budget)
    assert value % step == 0
    unchanged = {k: v for k, v in vars(sized).items() if k != adjust}
    assert unchanged == {k: v for k, v in vars(config).items() if k != adjust}


def test_size_to_budget_refuses_bad_arguments() -> None:
    config = ModelConfig.from_dict(SMALL)
    with pytest.raises(ValueError, match="adjust='num_layers'.*valid"):
        size_to_budget(config, 1000, "num_layers")
    for budget in (0, -5, 1.5, True):
        with pytest.raises(ValueError, match="budget=.*positive integer"):
            size_to_budget(config, budget)


TINY_PRESETS = ["tiny-attention", "tiny-mlp", "tiny-swa", "e2e-tiny"]


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_tiny_presets_are_matched_to_tiny_within_5_percent_and_say_so(preset) -> None:
    from importlib.resources import files

    tiny = count_config_parameters(load_config("tiny")[0].model).total
    run, _ = load_config(preset)
    total = count_config_parameters(run.model).total
    assert abs(total - tiny) <= 0.05 * tiny, f"{preset}: {total:,} parameters, tiny {tiny:,}"
    comments = (files("innerloop.config") / "presets" / f"{preset}.yaml").read_text()
    assert f"{total:,} parameters" in comments and f"{tiny:,}" in comments
