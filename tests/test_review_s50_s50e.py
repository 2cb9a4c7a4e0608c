"""Review s50e: one precision rule for a model cast to bfloat16 and one integer rule for arguments.

- Precision. A model cast whole to bfloat16 (``model.to(torch.bfloat16)``, Lightning's ``bf16-true``)
  keeps the float32 islands that ``torch.autocast`` keeps: whatever writes the inner state (the inner
  learning rate's gate, the token index tau, the RoPE tables of the views, the family's gates), the
  state itself and the language-model loss are computed in at least float32. TTTLayer computed its
  learning-rate gate (sigmoid, times base_lr / head dim) and tau in bfloat16, from a token-index table
  ``1 / (i + 1)`` and RoPE inverse frequencies that the cast had rounded to bfloat16, and the loss
  helpers computed the cross-entropy in bfloat16. The tests hold the islands by value: with weights
  that bfloat16 represents exactly, a bfloat16 layer's state equals the state the same layer reaches
  under autocast, bit for bit.
"""

from __future__ import annotations

import copy

import pytest
import torch

from innerloop.core.family_layers import DeltaNetLayer, GatedDeltaNetLayer, TitansLayer
from innerloop.core.functional import chunk_mean_cross_entropy, mean_scored_cross_entropy
from innerloop.core.layer import TTTLayer

LAYERS = {
    "ttt_linear": lambda: TTTLayer(32, 2, inner_model="linear", mini_batch_size=8),
    "ttt_mlp_share_qk": lambda: TTTLayer(32, 2, inner_model="mlp", mini_batch_size=16, share_qk=True),
    "deltanet": lambda: DeltaNetLayer(32, 2),
    "gated_deltanet": lambda: GatedDeltaNetLayer(32, 2),
    "titans": lambda: TitansLayer(32, 2),
}


def _bf16_representable(layer: torch.nn.Module) -> torch.nn.Module:
    """``layer`` (float32) with every parameter rounded to bfloat16: a float32 layer whose weights a
    bfloat16 cast keeps exactly."""
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.copy_(parameter.to(torch.bfloat16).float())
    return layer


def _trained_gates(layer: torch.nn.Module) -> torch.nn.Module:
    """Gates and token index away from their initial zeros, so that a rounding of them shows."""
    with torch.no_grad():
        for name, parameter in layer.named_parameters():
            if "ttt_lr_bias" in name:
                parameter.copy_(torch.randn_like(parameter) * 0.3)
            elif "token_idx" in name:  # small: tau = 1 / (i + 1) + delta stays > 0, each token updates
                parameter.copy_(torch.randn_like(parameter) * 0.01)
    return layer


@pytest.mark.slow  # 2.2 s for the first (the CPU kernel's first-use check), 0.3 s each after
@pytest.mark.parametrize("kind", list(LAYERS))
def test_a_bf16_layer_writes_the_state_autocast_writes_bit_for_bit(kind):
    torch.manual_seed(0)
    layer = _bf16_representable(_trained_gates(LAYERS[kind]()))
    x = torch.randn(2, 20, 32).to(torch.bfloat16)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, mixed = layer(x.float())
        _, plain = copy.deepcopy(layer).to(torch.bfloat16)(x)
    for key, value in mixed.tensors().items():
        assert plain.tensors()[key].dtype == value.dtype == torch.float32, key
        assert torch.equal(plain.tensors()[key], value), (kind, key)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_a_bf16_layer_computes_its_gates_and_tables_in_float32(kind):
    torch.manual_seed(0)
    layer = LAYERS[kind]().to(torch.bfloat16)
    x = torch.randn(2, 8, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        lr, tau = layer.inner_learning_rates(x)
        gates = [g for g in layer.forgetting(x) if g is not None]
    assert {t.dtype for t in (lr, tau, *gates)} == {torch.float32}
    tables = {name: buffer.dtype for name, buffer in layer.named_buffers()}
    assert set(tables.values()) == {torch.float32}, tables


@pytest.mark.parametrize(
    "loss", [mean_scored_cross_entropy, lambda *a: chunk_mean_cross_entropy(a[0], a[1], 3, a[2])]
)
def test_the_loss_of_bf16_logits_is_computed_in_float32(loss):
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 50).mul(4).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 50, (2, 7))
    got, want = loss(logits, targets, -100), loss(logits.detach().float(), targets, -100)
    assert got.dtype == torch.float32
    assert torch.equal(got.detach(), want)
    got.backward()
    assert logits.grad.dtype == torch.bfloat16
