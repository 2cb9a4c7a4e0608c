"""Review s54s: language models built on the meta device, then made real (``to_empty`` + a load,
``load_state_dict(assign=True)``), must be the model built normally: the embedding/LM-head tie kept
(one Parameter, both gradients in it) and every derived buffer no state dict holds made again."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from innerloop.core.family_layers import DeltaNetLayer, TitansLayer
from innerloop.core.layer import TTTLayer
from innerloop.models import E2EConfig, ModelConfig, build_model
from innerloop.models.config import FamilyConfig

MIXERS: dict[str, dict[str, Any]] = {
    "ttt": {"mixer": "ttt"},
    "attention": {"mixer": "attention"},
    "deltanet": {"mixer": "deltanet"},
    "titans": {"mixer": "titans", "family": FamilyConfig(mini_batch_size=4)},
    "e2e": {"mixer": "e2e", "window": 6, "e2e": E2EConfig(chunk_size=4)},
}


def _config(mixer: str, tie: bool = True) -> ModelConfig:
    base = {"vocab_size": 17, "hidden_size": 8, "num_heads": 2, "num_layers": 1, "intermediate_size": 12}
    return ModelConfig(tie_embeddings=tie, **base, **MIXERS[mixer])


def _built(config: ModelConfig, device: str | None = None) -> nn.Module:
    torch.manual_seed(0)
    with torch.device(device or "cpu"):
        return build_model(config).double()


def _made_real(config: ModelConfig, state: dict[str, torch.Tensor], how: str) -> nn.Module:
    model = _built(config, "meta")
    if how == "to_empty":
        model.to_empty(device="cpu")
        model.load_state_dict(state)
    else:
        model.load_state_dict(state, assign=True)
    return model


def _logits_and_grads(model: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    ids = torch.tensor([[1, 5, 3, 16, 0, 2, 9, 4, 7]])
    logits, _ = model(ids)
    logits.square().mean().backward()
    return logits.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.slow  # 0.1-0.6 s each under this machine's load (a tiny model, forward and backward twice)
@pytest.mark.parametrize("how", ["to_empty", "assign"])
@pytest.mark.parametrize("mixer", list(MIXERS))
def test_a_meta_built_model_made_real_is_the_normally_built_one(mixer: str, how: str) -> None:
    """Seen failing: the tied head a Parameter of its own after either path (1612 vs 1476 parameters
    for TTT; the embedding's gradient without the head's share), and after ``assign`` the TTT and
    family layers' token index / RoPE / tau tables still on the meta device ("Tensor on device cpu is
    not on the expected device meta!" at the first forward)."""
    config = _config(mixer)
    normal = _built(config)
    model = _made_real(config, normal.state_dict(), how)
    assert model.lm_head.weight is model.embed.weight
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in normal.parameters())
    for (name, buffer), (_, wanted) in zip(model.named_buffers(), normal.named_buffers(), strict=True):
        assert buffer.dtype == wanted.dtype and torch.equal(buffer, wanted), name
    logits, grads = _logits_and_grads(model)
    wanted_logits, wanted_grads = _logits_and_grads(normal)
    assert torch.equal(logits, wanted_logits)
    assert grads.keys() == wanted_grads.keys()
    assert all(torch.equal(grads[name], wanted_grads[name]) for name in grads)


@pytest.mark.parametrize("how", ["to_empty", "assign"])
def test_an_untied_model_made_real_stays_untied(how: str) -> None:
    config = _config("ttt", tie=False)
    normal = _built(config)
    model = _made_real(config, normal.state_dict(), how)
    assert model.lm_head.weight is not model.embed.weight
    assert torch.equal(model.lm_head.weight, normal.lm_head.weight)


def test_training_after_an_assign_load_keeps_the_tie() -> None:
    """One optimizer step moves the one tensor both the embedding and the head read."""
    config = _config("attention")
    model = _made_real(config, _built(config).state_dict(), "assign")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _logits_and_grads(model)
    optimizer.step()
    assert model.lm_head.weight is model.embed.weight
    assert len(optimizer.param_groups[0]["params"]) == len(list(model.parameters()))


def test_an_assign_load_of_two_different_tied_tensors_is_refused() -> None:
    """A tied model given different embed.weight and lm_head.weight: refused, naming both keys, not one
    of them silently dropped."""
    config = _config("attention")
    state = dict(_built(config).state_dict())
    state["lm_head.weight"] = state["lm_head.weight"] + 1.0
    model = _built(config, "meta")
    with pytest.raises(ValueError, match=r"embed\.weight and lm_head\.weight different values"):
        model.load_state_dict(state, assign=True)


@pytest.mark.parametrize("layer_class", [TTTLayer, DeltaNetLayer, TitansLayer])
def test_a_bare_layer_assign_loaded_from_meta_remakes_its_derived_buffers(
    layer_class: type[TTTLayer],
) -> None:
    """Seen failing: a layer built alone under ``torch.device("meta")`` and ``assign``-loaded kept its
    token index / RoPE / tau tables on meta ("Tensor on device cpu is not on the expected device meta!")."""
    options = {"hidden_size": 8, "num_heads": 2} | (
        {} if layer_class is DeltaNetLayer else {"mini_batch_size": 4}
    )
    torch.manual_seed(0)
    normal = layer_class(**options).double()
    with torch.device("meta"):
        layer = layer_class(**options).double()
    layer.load_state_dict(normal.state_dict(), assign=True)
    for (name, buffer), (_, wanted) in zip(layer.named_buffers(), normal.named_buffers(), strict=True):
        assert buffer.dtype == wanted.dtype and torch.equal(buffer, wanted), name
    x = torch.randn(1, 6, 8, dtype=torch.float64)
    assert torch.equal(layer(x)[0], normal(x)[0])


def test_a_cast_that_makes_new_parameters_keeps_the_tie(monkeypatch: pytest.MonkeyPatch) -> None:
    """Seen failing: with ``torch.__future__.set_overwrite_module_params_on_conversion(True)`` every cast
    (``.double()``, ``.to()``) gives each module its own new Parameter, as ``to_empty`` does: the tie broke."""
    wanted = sum(p.numel() for p in _built(_config("attention")).parameters())
    monkeypatch.setattr(torch.__future__, "_overwrite_module_params_on_conversion", True)
    model = _built(_config("attention"))
    assert model.lm_head.weight is model.embed.weight
    assert sum(p.numel() for p in model.parameters()) == wanted
