"""The family's layers take TTTLayer's options only where they honour them: ``use_gate``, ``share_qk``
and ``rope_theta`` (stored and ignored before) are refused by name with what to use instead, so is a
``conv_kernel`` without short convs, and every option they take reaches the computation."""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest
import torch

from innerloop import TTTLayer
from innerloop.config.load import ConfigError, load_config
from innerloop.core.family_layers import (
    REFUSED_TTT_OPTIONS,
    DeltaNetLayer,
    FamilyLayer,
    GatedDeltaNetLayer,
    LinearAttentionLayer,
    TitansLayer,
)
from innerloop.models import ModelConfig, build_model
from innerloop.models.config import FAMILY_MIXERS, FAMILY_OPTIONS_USED, FamilyConfig

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


# (member, argument, a value it does not take, the value it fixes, why): each member's fixed arguments
FIXED = [
    (DeltaNetLayer, "mini_batch_size", 4, 1, "the delta rule takes one step per token"),
    (DeltaNetLayer, "update_rule", "momentum", "dual_form", "the delta rule is the dual form"),
    (DeltaNetLayer, "inner_model", "mlp", "matrix", "the delta rule's state is one matrix"),
    (LinearAttentionLayer, "short_conv", True, False, "FLA's linear attention has no short convs"),
    (LinearAttentionLayer, "qk_l2norm", True, False, "shapes q and k by feature_map only"),
    (
        LinearAttentionLayer,
        "inner_loss",
        "reconstruction",
        "dot_product",
        "the dual form under the dot_product",
    ),
    # Before: accepted, and the layer was no longer linear attention (K = 1 and K = 16 differed by 2.0).
    (LinearAttentionLayer, "inner_norm", True, False, "mini_batch_size changes the model"),
    (LinearAttentionLayer, "inner_residual", True, False, "the inner residual would add q"),
    (TitansLayer, "inner_norm", False, True, "read through the inner LayerNorm"),
    (TitansLayer, "scale_query", True, False, "FLA's Titans op does not scale q"),
    (GatedDeltaNetLayer, "inner_norm", True, False, "equals it only without the inner LayerNorm"),
    (GatedDeltaNetLayer, "inner_residual", True, False, "equals it only without the inner residual"),
    (GatedDeltaNetLayer, "mini_batch_size", 2, 1, "the delta rule takes one step per token"),
]


@pytest.mark.parametrize(
    ("member", "name", "given", "fixed", "why"), FIXED, ids=lambda v: getattr(v, "__name__", str(v))
)
def test_an_argument_a_member_fixes_is_refused_with_its_value_and_why(
    member, name, given, fixed, why
) -> None:
    # Before: Python's "got multiple values for keyword argument" (Gated DeltaNet's inner_norm and
    # inner_residual: accepted, and the layer computed neither FLA's rule nor a documented one).
    match = rf"{member.__name__} fixes {name}={fixed!r}, got {name}={given!r}: .*{why}.*; drop {name}$"
    with pytest.raises(ValueError, match=match):
        member(D, H, **{name: given})
    layer = member(D, H, **{name: fixed})  # the value it fixes is no conflict
    assert (getattr(layer, name, None) == fixed) or name in ("inner_loss", "update_rule", "inner_model")


def test_the_fixed_arguments_are_the_ones_the_members_set() -> None:
    assert set(DeltaNetLayer.fixed_options) == {"inner_model", "update_rule", "mini_batch_size"}
    assert set(GatedDeltaNetLayer.fixed_options) == set(DeltaNetLayer.fixed_options) | {
        "inner_norm",
        "inner_residual",
    }
    gated = GatedDeltaNetLayer(D, H, mini_batch_size=np.int64(1), inner_norm=False, inner_residual=False)
    assert (gated.mini_batch_size, gated.inner_norm, gated.inner_residual) == (1, False, False)
    titans = TitansLayer(D, H, inner_model="mlp", inner_norm=True)
    assert (titans.inner_model.name, titans.update_rule.name, titans.scale_query) == (
        "mlp",
        "momentum",
        False,
    )


@pytest.mark.parametrize("member", MEMBERS, ids=lambda m: m.__name__)
def test_an_unknown_keyword_is_named_against_the_member_with_the_valid_ones(member) -> None:
    # Before: "TTTLayer.__init__() got an unexpected keyword argument 'betaa'", no valid names.
    with pytest.raises(
        TypeError, match=rf"^{member.__name__} got unexpected keyword arguments \['betaa'\]; valid: "
    ):
        member(D, H, betaa=1)
    with pytest.raises(TypeError) as error:
        member(D, H, norm_epss=1e-5)
    valid = str(error.value).split("valid: ")[1]
    for name in ("norm_eps", "base_lr", "kernel", "output_gate"):
        assert repr(name) in valid
    for name in REFUSED_TTT_OPTIONS:
        assert repr(name) not in valid


def test_a_linear_attention_state_is_the_same_for_every_mini_batch_size() -> None:
    """The docstring's claim, which the fixed inner_norm and inner_residual keep true."""
    torch.manual_seed(0)
    x = torch.randn(2, 37, D, dtype=torch.float64)
    outputs = []
    for mini_batch_size in (1, 5, 16):
        torch.manual_seed(1)
        layer = LinearAttentionLayer(D, H, mini_batch_size=mini_batch_size).double()
        outputs.append(layer(x)[0])
    for other in outputs[1:]:
        torch.testing.assert_close(other, outputs[0], rtol=1e-12, atol=1e-12)


def test_gated_deltanet_options_a_config_cannot_reach_are_unknown_keys() -> None:
    """The language-model config has no model.family.inner_norm / inner_residual: refused by key."""
    for key in ("inner_norm", "inner_residual"):
        with pytest.raises(ConfigError, match=rf"unknown config key 'model.family.{key}'.*valid keys here"):
            load_config("gated-deltanet-tiny", [f"model.family.{key}=true"])


@pytest.mark.parametrize(
    ("preset", "override", "reads"),
    [
        ("deltanet-tiny", "mini_batch_size=8", "base_lr, short_conv, conv_kernel, output_gate"),
        ("gated-deltanet-tiny", "mini_batch_size=4", "base_lr, short_conv, conv_kernel, output_gate"),
        ("linear-attention-tiny", "short_conv=true", None),  # the default: no error
        ("linear-attention-tiny", "short_conv=false", None),  # "no short convs": what it does anyway
        ("linear-attention-tiny", "conv_kernel=7", "mini_batch_size, base_lr, output_gate"),
    ],
)
def test_a_family_key_the_member_does_not_read_is_refused_unless_at_its_default(
    preset, override, reads
) -> None:
    # Before: dropped without a word (deltanet-tiny with mini_batch_size=8 built a K = 1 model).
    if reads is None:
        load_config(preset, [f"model.family.{override}"])
        return
    key, _ = override.split("=")
    mixer = preset.removesuffix("-tiny").replace("-", "_")
    match = rf"^model.family.{key}=.* is not used by mixer '{mixer}' \(.*\); it reads model.family.\{{{reads}\}}: "
    with pytest.raises(ConfigError, match=match) as error:
        load_config(preset, [f"model.family.{override}"])
    assert "\n" not in str(error.value)
    config = {
        "hidden_size": D,
        "num_heads": H,
        "mixer": mixer,
        "family": {key: 8 if key != "short_conv" else False},
    }
    with pytest.raises(ValueError, match=rf"model.family.{key}=.* is not used by mixer '{mixer}'"):
        build_model(ModelConfig.from_dict(config))


def test_every_family_key_is_read_by_some_member_and_every_member_is_listed() -> None:
    assert set(FAMILY_OPTIONS_USED) == set(FAMILY_MIXERS)
    keys = {option.name for option in dataclasses.fields(FamilyConfig)}
    assert set().union(*FAMILY_OPTIONS_USED.values()) == keys
    titans = build_model(ModelConfig.from_dict({"hidden_size": D, "num_heads": H, "mixer": "titans",
                                                "family": {"mini_batch_size": 4, "short_conv": False}}))  # fmt: skip
    mixer = next(m for m in titans.modules() if isinstance(m, TitansLayer))
    assert (mixer.mini_batch_size, mixer.short_conv) == (4, False)  # titans reads them all
