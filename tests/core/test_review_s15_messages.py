"""Review s15 (dtype), LOW-1: the non-finite message of a layer names the layer's own class (it said
"TTTLayer" for the family's layers too), advises what changes the dtype that overflowed (under
autocast that is the autocast, not ``layer.float()`` on weights already float32; float32 has
bfloat16's range), and names linear attention's feature map when that, not the projections, overflowed.
"""

from __future__ import annotations

import pytest
import torch

from innerloop import TTTLayer
from innerloop.core.family_layers import DeltaNetLayer, LinearAttentionLayer

K = 4


def error_of(layer: torch.nn.Module, x: torch.Tensor, state=None, autocast: torch.dtype | None = None) -> str:
    with pytest.raises(ValueError) as raised:
        if autocast is None:
            layer(x, state)
        else:
            with torch.autocast("cpu", dtype=autocast):
                layer(x, state)
    return str(raised.value)


def test_a_family_layers_message_names_its_class() -> None:
    torch.manual_seed(0)
    layer = DeltaNetLayer(32, 2).half()
    with torch.no_grad():
        layer.v_proj.weight.mul_(1e3)
    x = (torch.randn(1, 8, 32) * 1e3).half()  # finite in float16; v's projection overflows
    message = error_of(layer, x)
    assert message.startswith("DeltaNetLayer produced non-finite outputs from finite input"), message
    assert "TTTLayer" not in message


def test_a_family_layers_message_for_a_non_finite_state_names_its_class() -> None:
    torch.manual_seed(0)
    layer = DeltaNetLayer(32, 2)
    x = torch.randn(1, 8, 32)
    _, state = layer(x)
    state.params["W"].fill_(float("nan"))
    message = error_of(layer, x, state)
    assert message.startswith("DeltaNetLayer produced non-finite outputs: the state passed in already holds")


def test_float32_weights_under_float16_autocast_are_told_about_the_autocast() -> None:
    torch.manual_seed(0)
    layer = TTTLayer(32, 2, mini_batch_size=K)  # float32 weights
    message = error_of(layer, torch.randn(1, 2 * K, 32) * 7e4, autocast=torch.float16)
    assert message.startswith("TTTLayer produced non-finite outputs")
    assert "the projections Q, K, V overflowed float16" in message
    assert "run the layer without float16 autocast, or under bfloat16 autocast" in message
    assert "layer.float()" not in message


def test_linear_attentions_feature_map_is_named_when_it_overflowed() -> None:
    torch.manual_seed(0)
    layer = LinearAttentionLayer(32, 2)
    message = error_of(layer, torch.randn(1, 16, 32) * 300, autocast=torch.float16)
    assert message.startswith("LinearAttentionLayer produced non-finite outputs")
    assert (
        "the feature map 'elementwise_product' on Q and K overflowed float16, from finite projections"
        in message
    )
    assert "the projections Q, K, V overflowed" not in message
    assert "without float16 autocast" in message and "layer.float()" not in message


def test_a_float16_output_under_autocast_is_told_about_the_autocast() -> None:
    torch.manual_seed(0)
    layer = TTTLayer(16, 2, mini_batch_size=K)
    with torch.no_grad():  # float32 weights whose product with the post-norm overflows float16
        layer.post_norm.weight.mul_(1e3)
        layer.o_proj.weight.mul_(1e3)
    message = error_of(layer, torch.randn(1, 2 * K, 16), autocast=torch.float16)
    assert "state stayed finite, so the post-norm, gate or o_proj overflowed float16" in message
    assert "run the layer without float16 autocast" in message and "layer.float()" not in message


def test_bfloat16_weights_that_overflow_are_told_float64_not_float32() -> None:
    """float32's largest value is bfloat16's (3.4e38): ``layer.float()`` would overflow as well."""
    torch.manual_seed(0)
    layer = TTTLayer(32, 2, mini_batch_size=K).to(torch.bfloat16)
    x = ((torch.rand(1, 2 * K, 32) * 2 - 1) * 3e38).to(torch.bfloat16)
    message = error_of(layer, x)
    assert "the projections Q, K, V overflowed bfloat16" in message
    assert "run in float64 (layer.double())" in message and "layer.float()" not in message
