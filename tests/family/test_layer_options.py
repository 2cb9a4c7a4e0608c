"""The family's layers take TTTLayer's options only where they honour them: ``use_gate``, ``share_qk``
and ``rope_theta`` (stored and ignored before) are refused by name with what to use instead, so is a
``conv_kernel`` without short convs, and every option they take reaches the computation."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from innerloop import TTTLayer
from innerloop.core.family_layers import (
    REFUSED_TTT_OPTIONS,
    DeltaNetLayer,
    FamilyLayer,
    GatedDeltaNetLayer,
    LinearAttentionLayer,
    TitansLayer,
)
from innerloop.models import ModelConfig, build_model

D, H = 8, 2
MEMBERS = (LinearAttentionLayer, DeltaNetLayer, GatedDeltaNetLayer, TitansLayer)


@pytest.mark.parametrize("member", MEMBERS, ids=lambda m: m.__name__)
@pytest.mark.parametrize(
    ("option", "value", "instead"),
    [
        ("use_gate", True, "use output_gate instead"),
        ("use_gate", False, "use output_gate instead"),
        ("share_qk", True, r"always project q and k separately.*TTTLayer\(share_qk=True\)"),
        ("rope_theta", 5.0, "have no RoPE"),
    ],
)
def test_ttt_options_the_family_does_not_implement_are_refused(member, option, value, instead) -> None:
    match = rf"{member.__name__} does not take {option} \(got {option}={value!r}\): .*{instead}"
    with pytest.raises(TypeError, match=match):
        member(D, H, **{option: value})


def test_the_share_qk_state_bug_is_gone_with_the_option() -> None:
    # Before: share_qk=True built a layer whose own state it refused (conv_history {'shared_qk': ...}).
    for build in (
        lambda: LinearAttentionLayer(D, H, share_qk=True),
        lambda: DeltaNetLayer(D, H, share_qk=True, short_conv=False),
    ):
        with pytest.raises(TypeError, match="does not take share_qk"):
            build()
    for layer in (LinearAttentionLayer(D, H), DeltaNetLayer(D, H, short_conv=False)):
        x = torch.randn(2, 5, D)
        _, state = layer(x)
        assert state.conv_history == {}
        layer(x, state)  # the layer continues its own state


def test_a_conv_kernel_without_short_convs_is_refused() -> None:
    with pytest.raises(ValueError, match=r"LinearAttentionLayer got conv_kernel=3 with short_conv=False"):
        LinearAttentionLayer(D, H, conv_kernel=3)
    with pytest.raises(
        ValueError, match=r"DeltaNetLayer got conv_kernel=2 with short_conv=False.*drop conv_kernel"
    ):
        DeltaNetLayer(D, H, short_conv=False, conv_kernel=2)
    assert (
        DeltaNetLayer(D, H, short_conv=False, conv_kernel=4).short_conv is False
    )  # the default: no conflict
    config = {
        "hidden_size": D,
        "num_heads": H,
        "mixer": "deltanet",
        "family": {"short_conv": False, "conv_kernel": 3},
    }
    with pytest.raises(
        ValueError, match=r"model.family: DeltaNetLayer got conv_kernel=3 with short_conv=False"
    ):
        build_model(ModelConfig.from_dict(config))


def _inference_chunks(layer: FamilyLayer) -> int:
    x = torch.randn(1, 10, D)
    with torch.no_grad():
        return len(layer._inference_chunks(x, layer.init_state(1)))


def _nan_input_passes(layer: FamilyLayer) -> bool:
    x = torch.randn(1, 3, D)
    x[0, 1, 0] = float("nan")
    y, _ = layer(x)
    return not torch.isfinite(y).all()


# Every TTTLayer option a family layer takes: a layer given it, and what shows it was honoured.
HONOURED = {
    "hidden_size": (lambda: DeltaNetLayer(12, H), lambda m: m.q_proj.in_features == 12),
    "num_heads": (lambda: DeltaNetLayer(D, 4), lambda m: m.b_proj.out_features == 4),
    "inner_model": (lambda: TitansLayer(D, H, inner_model="mlp"), lambda m: set(m.initial_params) == {"W1", "b1", "W2", "b2"}),
    "inner_loss": (lambda: DeltaNetLayer(D, H, inner_loss="dot_product"), lambda m: m.inner_loss.name == "dot_product"),
    "update_rule": (lambda: FamilyLayer(D, H, update_rule="minibatch_gd"), lambda m: m.update_rule.name == "minibatch_gd"),
    "mini_batch_size": (lambda: LinearAttentionLayer(D, H, mini_batch_size=3), lambda m: m.init_state(1).signature.mini_batch_size == 3),
    "base_lr": (
        lambda: LinearAttentionLayer(D, H, base_lr=0.5),
        lambda m: bool(torch.all(m.inner_learning_rates(torch.randn(1, 2, D))[0] == 0.5)),
    ),
    "conv_kernel": (lambda: DeltaNetLayer(D, H, conv_kernel=2), lambda m: m.q_conv.kernel_size == (2,)),
    "inner_norm": (lambda: DeltaNetLayer(D, H, inner_norm=True), lambda m: m.inner_task().norm_weight is not None),
    "inner_residual": (lambda: DeltaNetLayer(D, H, inner_residual=True), lambda m: m.inner_task().residual),
    "norm_eps": (lambda: DeltaNetLayer(D, H, norm_eps=1e-3), lambda m: m.post_norm.eps == m.inner_task().norm_eps == 1e-3),
    "kernel": (lambda: DeltaNetLayer(D, H, kernel="torch"), lambda m: m.inner_task().kernel == "torch"),
    "non_finite": (lambda: DeltaNetLayer(D, H, non_finite="ignore"), _nan_input_passes),
    "needs_double_backward": (
        lambda: DeltaNetLayer(D, H, needs_double_backward=True),
        lambda m: m.inner_task().needs_double_backward,
    ),
    "inference_chunk_size": (lambda: DeltaNetLayer(D, H, inference_chunk_size=4), lambda m: _inference_chunks(m) == 3),
}  # fmt: skip


def test_every_ttt_option_is_honoured_or_refused() -> None:
    options = set(inspect.signature(TTTLayer.__init__).parameters) - {"self"}
    assert set(HONOURED) | set(REFUSED_TTT_OPTIONS) == options
    assert not set(HONOURED) & set(REFUSED_TTT_OPTIONS)


@pytest.mark.parametrize("option", list(HONOURED))
def test_each_ttt_option_a_family_layer_takes_reaches_the_computation(option) -> None:
    build, honoured = HONOURED[option]
    assert honoured(build())


def test_numpy_scalars_are_numbers_for_the_family_too() -> None:
    layer = DeltaNetLayer(np.int64(D), np.int64(H), base_lr=np.float32(0.5), conv_kernel=np.int64(3))
    assert (layer.hidden_size, layer.num_heads, layer.base_lr, layer.conv_kernel) == (D, H, 0.5, 3)
    assert type(layer.conv_kernel) is int and layer.q_conv.kernel_size == (3,)
    assert LinearAttentionLayer(D, H, conv_kernel=np.int64(4)).conv_kernel == 4  # the default, no conflict
