"""The family's trainable layers (innerloop.core.family_layers): each equals its recurrence, written
token by token in float64 on the layer's own q, k, v and gates (FLA's order of operations: Gated
DeltaNet decays before its gradient), decoding one token at a time equals reading the sequence whole,
the gradients reach every gate, and bad options and configs are refused by name."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from innerloop import TTTLayer
from innerloop.core.family_layers import (
    DECAY_FACTOR_FLOOR,
    DeltaNetLayer,
    FamilyLayer,
    GatedDeltaNetLayer,
    LinearAttentionLayer,
    TitansLayer,
)
from innerloop.core.functional import layer_norm
from innerloop.models import ModelConfig, build_model
from innerloop.models.config import FAMILY_MIXERS, validate_model_config

D, H, T = 16, 2, 21
MEMBERS = {  # (width, heads) -> the member's layer
    "linear_attention": lambda d, h: LinearAttentionLayer(d, h, mini_batch_size=4),
    "deltanet": lambda d, h: DeltaNetLayer(d, h),
    "gated_deltanet": lambda d, h: GatedDeltaNetLayer(d, h),
    "titans": lambda d, h: TitansLayer(d, h, mini_batch_size=4),
    "titans_mlp": lambda d, h: TitansLayer(d, h, inner_model="mlp", mini_batch_size=4),
}


def _layer(member: str, width: int = D, heads: int = H) -> FamilyLayer:
    torch.manual_seed(0)
    layer = MEMBERS[member](width, heads).double()
    with torch.no_grad():  # non-zero starts and gate logits, so every term of the recurrences counts
        for parameter in layer.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return layer


def _inputs(layer: FamilyLayer, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v [B, H, T, f] and beta/lr [B, H, T] as FamilyLayer reads them (before Gated DeltaNet's map)."""
    views, lr, _, _ = FamilyLayer._read(layer, x, layer.init_state(x.shape[0]))
    return views.query, views.key, views.value, lr


def _delta_recurrence(layer, x, decay_factor=None) -> torch.Tensor:
    """FLA's (gated) delta rule: S' = a S; S = S' + beta k^T (v - k S'); o = q S."""
    q, k, v, beta = _inputs(layer, x)
    S = layer.initial_params["W"].unsqueeze(0).expand(x.shape[0], -1, -1, -1)
    outputs = []
    for t in range(x.shape[1]):
        if decay_factor is not None:
            S = decay_factor[:, :, t, None, None] * S
        k_t, v_t = k[:, :, t, None], v[:, :, t, None]  # [B, H, 1, f]
        S = S + beta[:, :, t, None, None] * k_t.transpose(-1, -2) @ (v_t - k_t @ S)
        outputs.append(q[:, :, t, None] @ S)
    return torch.cat(outputs, dim=2)


def _titans_recurrence(layer: TitansLayer, x: torch.Tensor) -> torch.Tensor:
    """S_t = eta_t S_{t-1} - theta_t grad_t(M_b); M_t = (1 - alpha_t) M_{t-1} + S_t; o_t = q + LN(q M_t),
    the gradient of 1/2 ||k + LN(k M) - v||^2 at the chunk start M_b, by autograd."""
    q, k, v, theta = _inputs(layer, x)
    alpha, eta = layer.forgetting(x)
    weights = {
        n: p.unsqueeze(0).expand(x.shape[0], *p.shape).clone() for n, p in layer.initial_params.items()
    }
    surprise = {n: torch.zeros_like(w) for n, w in weights.items()}
    norm = (layer.ttt_norm_weight[:, None], layer.ttt_norm_bias[:, None])

    def memory(params, inputs):
        return inputs + layer_norm(layer.inner_model.forward(params, inputs), *norm, layer.norm_eps)

    outputs, start = [], weights
    for t in range(x.shape[1]):
        if t % layer.mini_batch_size == 0:
            start = {n: w.detach().requires_grad_() for n, w in weights.items()}
        loss = 0.5 * (memory(start, k[:, :, t, None]) - v[:, :, t, None]).pow(2).sum()
        grads = torch.autograd.grad(loss, list(start.values()))
        for (name, w), g in zip(start.items(), grads, strict=True):
            shape = (-1, layer.num_heads) + (1,) * (w.dim() - 2)
            surprise[name] = eta[:, :, t].reshape(shape) * surprise[name] - theta[:, :, t].reshape(shape) * g
            weights[name] = (1 - alpha[:, :, t]).reshape(shape) * weights[name] + surprise[name]
        outputs.append(memory(weights, q[:, :, t, None]))
    return torch.cat(outputs, dim=2)


def _reference_output(member: str, layer: FamilyLayer, x: torch.Tensor) -> torch.Tensor:
    if member == "linear_attention":  # S_t = S_0 + sum_{s<=t} k_s^T v_s
        q, k, v, _ = _inputs(layer, x)
        S = layer.initial_params["W"][:, None] + torch.cumsum(k.unsqueeze(-1) * v.unsqueeze(-2), dim=2)
        inner = (q.unsqueeze(-2) @ S).squeeze(-2)
    elif member == "deltanet":
        inner = _delta_recurrence(layer, x)
    elif member == "gated_deltanet":
        inner = _delta_recurrence(layer, x, layer.decay_factor(x))
    else:
        with torch.enable_grad():
            inner = _titans_recurrence(layer, x).detach()
    return layer._output(x, inner)


@pytest.mark.parametrize("member", list(MEMBERS))
def test_each_member_equals_its_recurrence_in_float64(member) -> None:
    layer = _layer(member)
    x = torch.randn(2, T, D, dtype=torch.float64)
    with torch.no_grad():
        y, _ = layer(x)
        expected = _reference_output(member, layer, x)
    assert torch.allclose(y, expected, rtol=1e-10, atol=1e-10), (y - expected).abs().max()


@pytest.mark.parametrize("member", list(MEMBERS))
def test_an_odd_head_width_is_valid_without_rope(member) -> None:
    # No member rotates q and k, so no member needs an even head width (TTT's layer, with RoPE, does).
    layer = _layer(member, width=15, heads=3)
    x = torch.randn(2, 9, 15, dtype=torch.float64)
    with torch.no_grad():
        y, _ = layer(x)
        expected = _reference_output(member, layer, x)
    assert torch.allclose(y, expected, rtol=1e-10, atol=1e-10), (y - expected).abs().max()


def test_odd_head_widths_in_model_configs_follow_the_mixer() -> None:
    for mixer in FAMILY_MIXERS:
        validate_model_config(ModelConfig(mixer=mixer, hidden_size=15, num_heads=3))
    with pytest.raises(ValueError, match=r"model.hidden_size / model.num_heads = 5 must be even"):
        validate_model_config(ModelConfig(mixer="ttt", hidden_size=15, num_heads=3))
    with pytest.raises(ValueError, match=r"head_dim = hidden_size / num_heads = 5 must be even"):
        TTTLayer(15, 3)


@pytest.mark.parametrize("member", list(MEMBERS))
def test_decoding_token_by_token_and_in_pieces_equals_the_whole(member) -> None:
    layer = _layer(member)
    x = torch.randn(2, T, D, dtype=torch.float64)
    with torch.no_grad():
        whole, final = layer(x)
        prefix, state = layer(x[:, :7])  # a prefill that ends inside a mini-batch
        decoded = [prefix]
        for t in range(7, T):
            y, state = layer(x[:, t : t + 1], state)
            decoded.append(y)
    assert torch.allclose(torch.cat(decoded, dim=1), whole, rtol=1e-10, atol=1e-12)
    for name, tensor in final.tensors().items():
        assert torch.allclose(state.tensors()[name], tensor, rtol=1e-10, atol=1e-12), name


@pytest.mark.parametrize("member", list(MEMBERS))
def test_gradients_reach_every_parameter(member) -> None:
    layer = _layer(member)
    y, _ = layer(torch.randn(1, 9, D, dtype=torch.float64))
    y.square().sum().backward()
    missing = [n for n, p in layer.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_gated_deltanet_holds_the_decay_factor_at_its_floor() -> None:
    layer = _layer("gated_deltanet")
    with torch.no_grad():
        layer.A_log.fill_(5.0)  # exp(A_log) ~ 148: the factor underflows far below the floor
        layer.dt_bias.fill_(5.0)
        x = torch.randn(1, 8, D, dtype=torch.float64)
        assert torch.all(layer.decay_factor(x) == DECAY_FACTOR_FLOOR)
        y, state = layer(x)
        expected = _reference_output("gated_deltanet", layer, x)
    assert torch.isfinite(y).all() and state.is_finite()
    assert torch.allclose(y, expected, rtol=1e-8, atol=1e-10)


def test_a_bfloat16_gated_deltanet_keeps_its_long_memory_decays() -> None:
    """bf16 weights, long memories (decays 1e-4 to 3e-2): the decays equal the float32 layer's (same
    rounded weights and input) to bf16's precision. They were ``1 - a`` in bf16, where ``a`` near 1 has
    a spacing of 2^-8: half of them became exactly 0 (no forgetting), the rest 2^-8 multiples."""
    torch.manual_seed(0)
    layer = GatedDeltaNetLayer(64, 4)
    with torch.no_grad():
        layer.A_log.fill_(math.log(0.1))
        layer.a_proj.weight.mul_(0.5)  # |a_proj(x)| <~ 1: its bf16 rounding moves a decay by <= 2^-9 of it
    low = layer.to(torch.bfloat16)
    x = torch.randn(1, 512, 64).to(torch.bfloat16)
    with torch.no_grad():
        decay, _ = low.forgetting(x)
        expected, _ = copy.deepcopy(low).float().forgetting(x.float())
    assert expected.min() > 1e-4 and expected.max() < 3e-2
    assert bool((decay > 0).all())
    assert ((decay - expected).abs() / expected).max() <= torch.finfo(torch.bfloat16).eps
    assert decay.dtype == torch.float32  # the scan's dtype


def test_the_gates_start_where_fla_starts_them() -> None:
    torch.manual_seed(0)
    layer = GatedDeltaNetLayer(64, 8)
    assert torch.all((layer.A_log.exp() > 0) & (layer.A_log.exp() < 16))
    dt = torch.nn.functional.softplus(layer.dt_bias)
    assert torch.all((dt > 1e-3 * 0.999) & (dt < 0.1 * 1.001))
    assert torch.allclose(layer.initial_params["W"], torch.zeros(8, 8, 8))


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"qk_activation": "gelu"}, "qk_activation must be one of"),
        ({"feature_map": "hedgehog"}, "feature_map must be one of"),
        ({"short_conv": "yes"}, "short_conv must be True or False"),
        ({"output_gate": 1}, "output_gate must be True or False"),
        ({"conv_kernel": 0}, "conv_kernel must be a positive integer"),
    ],
)
def test_bad_options_are_refused_by_name(options, match) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        DeltaNetLayer(D, H, **options)


@pytest.mark.parametrize(
    ("mixer", "family", "match"),
    [
        ("deltanet", {"memory": "mlp"}, r"model.family.memory='mlp' is not a memory of mixer 'deltanet'"),
        (
            "titans",
            {"memory": "rnn"},
            r"model.family.memory='rnn' is not a registered inner_model.*'matrix', 'mlp'",
        ),
        ("titans", {"mini_batch_size": 0}, r"model.family.mini_batch_size=0 must be in \[1, 65536\]"),
        ("gated_deltanet", {"base_lr": -1.0}, r"model.family.base_lr=-1.0 must be"),
        ("linear_attention", {"output_gate": "on"}, r"model.family.output_gate='on'"),
    ],
)
def test_bad_family_configs_are_refused_by_name(mixer, family, match) -> None:
    with pytest.raises(ValueError, match=match):
        build_model(
            ModelConfig.from_dict({"hidden_size": 16, "num_heads": 2, "mixer": mixer, "family": family})
        )


def test_a_state_of_another_layer_is_refused() -> None:
    _, state = _layer("linear_attention")(torch.randn(1, 4, D, dtype=torch.float64))
    with pytest.raises(ValueError, match="differ in .*mini_batch_size.*inner_loss"):
        _layer("deltanet")(torch.randn(1, 4, D, dtype=torch.float64), state)
    _, state = _layer("deltanet")(torch.randn(1, 4, D, dtype=torch.float64))
    without_convs = DeltaNetLayer(D, H, short_conv=False).double()
    with pytest.raises(ValueError, match=r"state.conv_history must be \{\} .*short_conv=False"):
        without_convs(torch.randn(1, 4, D, dtype=torch.float64), state)
