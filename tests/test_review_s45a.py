"""Review s45a: the grader of issues 2 (core, registry, TTT-Linear/MLP) and 12 (the family against FLA).

Checked and found right (scripts in the session's report, not kept: each repeats a cell an earlier
test holds at other shapes or options): FLA's chunked TTT-Linear and Titans (parenthesis restored)
with initial states against scan in float64, outputs, final states and the autograd gradients of every
input (q, k, v, LN affine, h0 / hb0 / M0, the per-mini-batch lr and tau; theta, alpha, eta), 1e-15;
layer states handed back transposed, strided or expanded over the batch, through the torch path and
the CPU kernels; every ``ops.scan`` argument (and ``initial``) as a T-major, f-major, strided or
expanded view, on the CPU kernels and on ``delta_chunk`` with gradients; decays of exactly 0, 1 and
1 - 1e-12 on ``delta_chunk`` with gradients; ``torch.func.vmap`` / ``grad`` over a layer, reentrant
checkpoints, deepcopy, pickling and state_dict round trips of built-in and plugin-built layers; a
plugin removed and another registered under its name (the old layer continues); a plugin whose hook or
checks raise (named); the conformance vectors read at prefixes, one batch row, reversed rows and
prefill then decode; family layers at conv kernels 1 / 2 / 5, every feature map and gate, split,
decoded, row by row, and through ``TTTState.cat`` / ``index_select``; small ``inference_chunk_size``
on random option combinations of every model, loss and rule; empty batches on every layer and scan.

The defects kept here, each a regression test seen failing without its fix:

- a ``TTTLayer`` option read only when the layer is built (its modules, parameters and tables are made
  from it), set on the built layer, was taken in silently and ignored: ``layer.rope_theta = 10.0``
  left the outputs as they were until the next ``.to()`` / ``.double()`` remade the RoPE tables from it
  (the same layer then computed another function), ``layer.norm_eps`` reached the inner LayerNorm but
  not the post-norm, and ``mini_batch_size``, ``use_gate``, ``share_qk``, ``num_heads`` failed later
  with bare torch errors; so did a family layer's reading options (``qk_activation = "gelu"`` read as
  identity, ``TitansLayer.scale_query = True`` undid an option Titans fixes) and the resolved plugins
  (``update_rule = "minibatch_gd"``). Such an edit is now refused where it is made, naming the option;
- an option read at every call, set on the built layer, was taken unchecked: ``layer.non_finite =
  "rasie"`` switched the NaN checks off silently, ``base_lr = -1.0`` ran gradient ascent,
  ``inference_chunk_size = 0`` was kept; each new value is now checked as the constructor checks it.
"""

from __future__ import annotations

import re

import pytest
import torch

from innerloop import TTTLayer
from innerloop.core.family_layers import DeltaNetLayer, TitansLayer


@pytest.mark.parametrize(
    ("option", "value"),
    [("rope_theta", 10.0), ("norm_eps", 1e-3), ("mini_batch_size", 4), ("use_gate", True), ("num_heads", 4)],
)
def test_an_option_read_only_at_construction_cannot_be_changed_on_the_built_layer(option, value) -> None:
    layer = TTTLayer(16, 2)
    before = getattr(layer, option)
    with pytest.raises(
        AttributeError, match=rf"TTTLayer\.{option} is fixed when the layer is built"
    ) as error:
        setattr(layer, option, value)
    assert f"TTTLayer(..., {option}={value!r})" in str(error.value)
    assert getattr(layer, option) == before


@pytest.mark.parametrize(
    ("layer_class", "option", "value"),
    [(DeltaNetLayer, "conv_kernel", 2), (TitansLayer, "output_gate", False), (TitansLayer, "norm_eps", 1e-3)],
)
def test_a_family_layer_refuses_its_own_built_options_too(layer_class, option, value) -> None:
    layer = layer_class(8, 2)
    with pytest.raises(
        AttributeError, match=rf"{layer_class.__name__}\.{option} is fixed when the layer is built"
    ):
        setattr(layer, option, value)


def test_the_options_read_at_every_call_stay_editable_and_take_effect() -> None:
    torch.manual_seed(0)
    layer, x = TTTLayer(8, 2, mini_batch_size=4).double(), torch.randn(1, 6, 8, dtype=torch.float64)
    layer.kernel, layer.non_finite, layer.inference_chunk_size, layer.base_lr = "torch", "ignore", None, 0.5
    torch.manual_seed(0)
    fresh = TTTLayer(8, 2, mini_batch_size=4, base_lr=0.5, kernel="torch").double()
    torch.testing.assert_close(layer(x)[0], fresh(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("option", "value", "said"),
    [
        ("non_finite", "rasie", "non_finite must be one of ('raise', 'ignore'), got 'rasie'"),
        ("base_lr", -1.0, "base_lr must be a finite number >= 0, got -1.0"),
        ("base_lr", "0.5", "base_lr must be a finite number >= 0, got '0.5'"),
        ("inference_chunk_size", 0, "inference_chunk_size must be a positive integer or None, got 0"),
        ("needs_double_backward", "yes", "needs_double_backward must be True or False, got 'yes'"),
    ],
)
def test_an_option_read_at_every_call_is_checked_when_set_as_the_constructor_checks_it(
    option, value, said
) -> None:
    """A typo ``layer.non_finite = "rasie"`` switched the NaN checks off silently (anything but "raise"
    read as "ignore"), ``base_lr = -1.0`` ran gradient ascent, ``inference_chunk_size = 0`` and a str
    base_lr were taken (the latter failing at the next call with a bare comparison error)."""
    layer = DeltaNetLayer(8, 2)
    before = getattr(layer, option)
    with pytest.raises((ValueError, TypeError), match=re.escape(said)):
        setattr(layer, option, value)
    assert getattr(layer, option) == before


@pytest.mark.parametrize(
    ("layer_class", "option", "value"),
    [
        (DeltaNetLayer, "qk_activation", "gelu"),  # read as "identity", silently
        (TitansLayer, "scale_query", True),  # an option Titans fixes (FLA's op does not scale q)
        (TTTLayer, "update_rule", "minibatch_gd"),  # a name where the layer keeps the resolved plugin
    ],
)
def test_the_plugins_and_a_family_layers_reading_options_are_fixed_when_built(
    layer_class, option, value
) -> None:
    layer = layer_class(8, 2)
    with pytest.raises(
        AttributeError, match=rf"{layer_class.__name__}\.{option} is fixed when the layer is built"
    ):
        setattr(layer, option, value)


def test_setting_a_built_option_to_the_value_it_holds_changes_nothing_and_is_taken() -> None:
    """A refusal of code that sets an option to what the layer holds (a config applied again, a copy of
    another layer's settings) would be a false one: such a set is taken; a plugin as that object or a
    name registered for it (s48a: the name was refused, telling the user to build the layer they had)."""
    layer = TTTLayer(16, 2)
    for option in ("rope_theta", "norm_eps", "mini_batch_size", "use_gate", "num_heads", "inner_loss"):
        setattr(layer, option, getattr(layer, option))
    held = layer.inner_loss
    layer.inner_loss = "reconstruction"  # the name it resolved: the plugin object is kept
    assert layer.inner_loss is held
    with pytest.raises(AttributeError, match=r"TTTLayer\.inner_loss is fixed"):
        layer.inner_loss = "next_token"
    with pytest.raises(AttributeError, match=r"TTTLayer\.mini_batch_size is fixed"):
        layer.mini_batch_size = 16.0  # equal, but not the int the layer reads


def test_an_attention_layers_shape_window_and_rope_base_are_fixed_when_built() -> None:
    """s45a's LOW: ``CausalSelfAttention.rope_theta`` was read at every call and unchecked when set:
    ``attn.rope_theta = 0`` made the RoPE tables NaN, which SDPA turned into zero attention, a silent wrong
    number (the constructor refuses it); a changed ``window`` or base also misreads a cache made before."""
    from innerloop.models.attention import CausalSelfAttention

    attn = CausalSelfAttention(16, 2, window=4)
    for option, value in (("rope_theta", 0.0), ("window", 8), ("num_heads", 4)):
        with pytest.raises(
            AttributeError, match=rf"CausalSelfAttention\.{option} is fixed when the layer is built"
        ):
            setattr(attn, option, value)
    attn.rope_theta = attn.rope_theta  # the value it holds: nothing changes
    attn.float64_rope_angles = False  # not a built option (TTT-E2E's blocks set it)


def test_a_titans_state_from_inside_a_mini_batch_continues_with_test_time_training_off_and_on() -> None:
    """s45a's LOW: Titans' gates were none while ``base_lr == 0``, so a state from inside a mini-batch
    (holding the decay product and momentum) was refused inside ``no_test_time_training`` ("pass the state
    this layer returned", which it was), and a state made there could not continue with it on. The gates
    are zeros now (the memory kept as it is): the same numbers where no state is carried (bit for bit),
    split-invariant from inside a mini-batch, and the states continue either way."""
    from innerloop.models.ablation import no_test_time_training

    torch.manual_seed(0)
    layer = TitansLayer(8, 2, mini_batch_size=4).double()
    x = torch.randn(2, 13, 8, dtype=torch.float64)
    _, inside = layer(x[:, :6])  # position 6: inside the second mini-batch
    with no_test_time_training(layer):
        whole, _ = layer(x[:, 6:], inside)
        first, state = layer(x[:, 6:9], inside)
        rest, _ = layer(x[:, 9:], state)
        torch.testing.assert_close(torch.cat([first, rest], 1), whole, rtol=0, atol=1e-12)
        frozen, made_frozen = layer(x[:, :6])
        layer.forgetting = lambda x: (None, None)  # the gates as they were: no state carried, same numbers
        assert torch.equal(layer(x[:, :6])[0], frozen)
        del layer.forgetting
    layer(x[:, 6:], made_frozen)  # a state made with test-time training off continues with it on
