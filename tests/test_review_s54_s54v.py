"""Review s54v: a model made real by ``to_empty`` and then initialised the standard ways, and TTT-E2E's
diagnosis of an overflow in a chunk that is only scored."""

from __future__ import annotations

import pytest
import torch
from test_review_s54_s54r import _e2e

from innerloop.hf import InnerloopConfig, InnerloopForCausalLM
from innerloop.models import E2EConfig, NonFiniteInnerStepError, build_model
from innerloop.models.config import ModelConfig
from innerloop.models.generate import generate

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


def _e2e_inner_lr(inner_lr: float) -> torch.nn.Module:
    return _e2e(inner_lr=inner_lr)  # s54r's tiny TTT-E2E model


@pytest.mark.parametrize("prompt", [2, 4, 5, 6, 7])
def test_generate_names_the_inner_lr_when_a_scored_only_chunk_overflows(prompt: int) -> None:
    """A 5-token prompt (chunk 4): chunk 1 is trained on (fast weights huge, finite), the pending token only
    scored: its NaN logits stopped generate with "weights or state overflowed", not naming inner_lr. Other
    prompt lengths put the first training on a decoded token's call, with the token scored after it."""
    model = _e2e_inner_lr(1e30)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt))
    with pytest.raises(NonFiniteInnerStepError, match=r"lower model\.e2e\.inner_lr \(configured 1e\+30\)"):
        list(generate(model, ids, max_new_tokens=8))


def test_forward_names_the_inner_lr_when_its_scored_only_chunk_overflows() -> None:
    """The same in a forward that trains on a chunk (and so reads its checks back already): the trailing
    chunk, only scored, is diagnosed too, named as such."""
    model = _e2e_inner_lr(1e30)
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    with torch.no_grad(), pytest.raises(NonFiniteInnerStepError) as caught:
        model(ids)
    said = str(caught.value)
    assert "only scored" in said and "lower model.e2e.inner_lr (configured 1e+30)" in said


def test_a_finite_generate_of_a_short_prompt_raises_nothing() -> None:
    model = _e2e_inner_lr(E2EConfig().inner_lr)
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    assert len(list(generate(model, ids, max_new_tokens=3))) == 3
