"""Parameter counts by part, sizing to a budget, the tiny presets matched in parameters, and the same
models with test-time training switched off."""

from __future__ import annotations

import pytest
import torch

from innerloop.config.load import load_config
from innerloop.models import CausalLM, ModelConfig, build_model
from innerloop.models.ablation import modules_learning_at_test_time, no_test_time_training
from innerloop.models.params import (
    count_config_parameters,
    count_parameters,
    same_size,
    size_to_budget,
)
from innerloop.registry import available

SMALL = {"hidden_size": 16, "num_layers": 2, "num_heads": 2, "intermediate_size": 24}


def _by_prefix(model: torch.nn.Module, *prefixes: str) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefixes))


@pytest.mark.parametrize("mixer", ["ttt", "attention", "swa", "e2e", "linear_attention", "titans"])
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
@pytest.mark.parametrize(  # the bisection is the same for every mixer; each counts its own parameters
    "mixer", ["ttt", pytest.param("swa", marks=pytest.mark.slow), pytest.param("e2e", marks=pytest.mark.slow)]
)  # swa, e2e: ~0.2-0.4 s each
@pytest.mark.slow  # ~0.8 s in all: a search over widths
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


@pytest.mark.slow  # reason: ~1.5 s: sizes models up to the largest valid width
def test_a_budget_past_the_largest_valid_width_gives_that_width() -> None:
    """The search stops at the field's own limit (2**24): past it no width is valid, and a huge budget
    raised a traceback instead of the closest model there is."""
    config = ModelConfig.from_dict(SMALL)
    sized = size_to_budget(config, 10**13, "intermediate_size")
    assert sized.intermediate_size == 2**24


def test_size_to_budget_refuses_bad_arguments() -> None:
    config = ModelConfig.from_dict(SMALL)
    with pytest.raises(ValueError, match="adjust='num_layers'.*valid"):
        size_to_budget(config, 1000, "num_layers")
    for budget in (0, -5, 1.5, True):
        with pytest.raises(ValueError, match="budget=.*positive integer"):
            size_to_budget(config, budget)


TINY_PRESETS = [
    "tiny-attention",
    "tiny-mlp",
    "tiny-swa",
    "e2e-tiny",
    "linear-attention-tiny",
    "deltanet-tiny",
    "gated-deltanet-tiny",
    "titans-tiny",
]


@pytest.mark.slow  # ~0.8 s in all: every tiny preset built
@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_tiny_presets_are_matched_to_tiny_within_5_percent_and_say_so(preset) -> None:
    from importlib.resources import files

    tiny = count_config_parameters(load_config("tiny")[0].model).total
    run, _ = load_config(preset)
    total = count_config_parameters(run.model).total
    # the same size as innerloop compare judges it (5% of the smaller count), so compare names none
    assert same_size(total, tiny), f"{preset}: {total:,} parameters, tiny {tiny:,}"
    comments = (files("innerloop.config") / "presets" / f"{preset}.yaml").read_text()
    assert f"{total:,} parameters" in comments and f"{tiny:,}" in comments


# --------------------------------------------------------------------------------------------------
# no_test_time_training: the same weights, test-time training switched off
# --------------------------------------------------------------------------------------------------

TTT_COMBINATIONS = [(model, rule) for model in available("inner_model") for rule in available("update_rule")]


def _ttt_model(inner_model: str, update_rule: str) -> CausalLM:
    torch.manual_seed(0)
    ttt = {"inner_model": inner_model, "update_rule": update_rule, "mini_batch_size": 4}
    return CausalLM(ModelConfig.from_dict({**SMALL, "mixer": "ttt", "ttt": ttt})).double()


@pytest.mark.parametrize(("inner_model", "update_rule"), TTT_COMBINATIONS)
def test_without_ttt_the_inner_weights_stay_at_their_initial_values(inner_model, update_rule) -> None:
    model = _ttt_model(inner_model, update_rule)
    ids = torch.randint(256, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        on, on_state = model(ids)
        with no_test_time_training(model) as switched:
            off, off_state = model(ids)
        again, _ = model(ids)
    assert switched == 2 and modules_learning_at_test_time(model) == ["blocks.0.mixer", "blocks.1.mixer"]
    for block, state in zip(model.blocks, off_state.blocks, strict=True):
        initial = block.mixer.initial_params
        for name, value in state.mixer.params.items():  # [B, H, ...]: every sequence's, still the init
            assert torch.equal(value, initial[name].expand_as(value)), name
        assert all(not p.any() for p in state.mixer.pending.values())  # no update pending either
    moved = [not torch.equal(v, model.blocks[0].mixer.initial_params[k].expand_as(v))
             for k, v in on_state.blocks[0].mixer.params.items()]  # fmt: skip
    assert any(moved)  # with TTT on, 13 tokens of mini-batches of 4 did move them
    assert not torch.allclose(on, off)
    assert torch.equal(on, again) and all(b.mixer.base_lr == 1.0 for b in model.blocks)  # restored


# With RoPE at absolute positions both runs rotate every token at the same angle: equal to float64
# precision. At positions relative to each chunk's window (the official default) the off mode and the
# chunked run take their angles from different float32 RoPE tables (docs/e2e.md): equal to ~1e-7.
@pytest.mark.parametrize(("rope_positions", "tolerance"), [("absolute", 1e-10), ("relative", 1e-6)])
def test_without_ttt_e2e_keeps_its_prime_weights_fixed(rope_positions, tolerance) -> None:
    torch.manual_seed(0)
    e2e = {"chunk_size": 4, "rope_positions": rope_positions}
    config = ModelConfig.from_dict({**SMALL, "mixer": "e2e", "window": 8, "e2e": e2e})
    model = build_model(config).double().eval()
    ids = torch.randint(256, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        on, on_state = model(ids)
        with no_test_time_training(model) as switched:
            off, off_state = model(ids)
        # The same chunked inner loop with inner lr 0: the prime weights never move from the initial.
        model.inner_lr = lambda: 0.0
        fixed, fixed_state = model(ids)
        del model.inner_lr
    assert switched == 1 and model.config.e2e.test_time_training  # restored after the block
    assert off_state.fast == {}
    for name, value in fixed_state.fast.items():
        assert torch.equal(value, dict(model.named_parameters())[name].expand_as(value))
    torch.testing.assert_close(off, fixed, rtol=tolerance, atol=tolerance)
    assert any(not torch.equal(v, fixed_state.fast[k]) for k, v in on_state.fast.items())
    assert not torch.allclose(on, off)


def test_without_ttt_a_model_without_ttt_is_unchanged() -> None:
    model = build_model(ModelConfig.from_dict({**SMALL, "mixer": "swa", "window": 4}))
    ids = torch.randint(256, (1, 9))
    with torch.no_grad(), no_test_time_training(model) as switched:
        off, _ = model(ids)
    assert switched == 0 and modules_learning_at_test_time(model) == []
    assert torch.equal(off, model(ids)[0].detach())


@pytest.mark.slow  # ~0.6 s: two bisections over model sizes; size_to_budget stays fast
def test_cli_params_counts_and_sizes_to_a_budget(capsys) -> None:
    from innerloop.cli import main

    assert main(["params", "--config", "tiny-mlp", "model.intermediate_size=172", "--budget", "118760"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("tiny-mlp: 133,608 parameters (embedding 16,384; mixer 2 x 25,428;")
    assert "model.intermediate_size=133: 118,632 parameters (-0.1% of the budget 118,760)" in printed
    assert main(["params", "--budget", "0"]) == 2
    assert "--budget: must be an integer >= 1, got '0'" in capsys.readouterr().err
