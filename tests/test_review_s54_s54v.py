"""Review s54v: a model made real by ``to_empty`` and then initialised the standard ways, and TTT-E2E's
diagnosis of an overflow in a chunk that is only scored."""

from __future__ import annotations

import pytest
import torch

from innerloop.hf import InnerloopConfig, InnerloopForCausalLM
from innerloop.models import build_model
from innerloop.models.config import ModelConfig

SHAPE = dict(vocab_size=64, hidden_size=32, num_heads=2, num_layers=2)


def _reset_each(module: torch.nn.Module) -> None:
    if hasattr(module, "reset_parameters"):
        module.reset_parameters()


def _on_meta_made_real(mixer: str) -> torch.nn.Module:
    with torch.device("meta"):
        model = build_model(ModelConfig(mixer=mixer, **SHAPE))
    return model.to_empty(device="cpu")


def _same_weights(model: torch.nn.Module, reference: torch.nn.Module) -> list[str]:
    ours = model.state_dict()
    return [name for name, value in reference.state_dict().items() if not torch.equal(ours[name], value)]


@pytest.mark.parametrize("mixer", ["ttt", "gated_deltanet", "titans", "e2e"])
def test_reset_parameters_after_to_empty_is_the_fresh_build_bit_for_bit(mixer: str) -> None:
    """to_empty leaves garbage (NaN, 1e30); the model's reset_parameters draws what a fresh build does."""
    model = _on_meta_made_real(mixer)
    torch.manual_seed(3)
    fresh = build_model(ModelConfig(mixer=mixer, **SHAPE))
    torch.manual_seed(3)
    model.reset_parameters()
    assert _same_weights(model, fresh) == []
    assert all(
        torch.equal(ours, theirs) for ours, theirs in zip(model.buffers(), fresh.buffers(), strict=True)
    )


@pytest.mark.parametrize("mixer", ["ttt", "gated_deltanet", "titans"])
def test_apply_reset_parameters_after_to_empty_leaves_no_garbage(mixer: str) -> None:
    """``model.apply(reset)`` reaches the layers' inner parameters (they had no reset_parameters: NaN,
    ~1e30 stayed) and ends with the model's own, which draws as a fresh build does."""
    model = _on_meta_made_real(mixer)
    model.apply(_reset_each)
    fresh = build_model(ModelConfig(mixer=mixer, **SHAPE))
    for (name, ours), theirs in zip(model.named_parameters(), fresh.parameters(), strict=True):
        assert torch.isfinite(ours).all(), name
        assert ours.abs().max() <= 4 * theirs.abs().max().clamp_min(1.0), name


def test_layer_reset_parameters_draws_its_inner_parameters_as_its_constructor() -> None:
    """A TTT layer's own reset_parameters (the inner lr gate, token offsets, norms, initial inner weights)."""
    model = _on_meta_made_real("ttt")
    layer = model.blocks[0].mixer
    layer.reset_parameters()
    assert torch.equal(layer.learnable_token_idx, torch.zeros_like(layer.learnable_token_idx))
    assert torch.equal(layer.ttt_norm_weight, torch.ones_like(layer.ttt_norm_weight))
    assert 0.01 < float(layer.learnable_ttt_lr_weight.detach().std()) < 0.03
    assert all(torch.isfinite(p).all() for p in layer.initial_params.values())


def test_reset_parameters_on_the_meta_device_is_refused() -> None:
    with torch.device("meta"):
        model = build_model(ModelConfig(mixer="ttt", **SHAPE))
    with pytest.raises(ValueError, match="to_empty"):
        model.reset_parameters()


@pytest.mark.parametrize("mixer", ["ttt", "e2e"])
@pytest.mark.parametrize("how", ["init_weights", "post_init"])
def test_hf_init_weights_after_to_empty_is_the_fresh_build_bit_for_bit(mixer: str, how: str) -> None:
    """HF's init_weights / post_init did nothing (``_init_weights`` was empty): garbage stayed."""
    config = InnerloopConfig(model=dict(mixer=mixer, **SHAPE))
    torch.manual_seed(5)
    fresh = InnerloopForCausalLM(config)
    with torch.device("meta"):
        model = InnerloopForCausalLM(config)
    model.to_empty(device="cpu")
    torch.manual_seed(5)
    getattr(model, how)()
    assert _same_weights(model, fresh) == []
    assert all(
        torch.equal(ours, theirs) for ours, theirs in zip(model.buffers(), fresh.buffers(), strict=True)
    )


def test_hf_build_draws_once() -> None:
    """post_init in __init__ does not draw the network a second time: the HF build is innerloop's."""
    config = InnerloopConfig(model=dict(mixer="ttt", **SHAPE))
    torch.manual_seed(7)
    model = InnerloopForCausalLM(config)
    torch.manual_seed(7)
    network = build_model(ModelConfig(mixer="ttt", **SHAPE))
    assert _same_weights(model.model, network) == []
