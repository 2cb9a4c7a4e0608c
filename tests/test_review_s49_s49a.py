"""Review s49a of the core: cases nobody listed (empty pieces of a sequence, numpy flags, the op's and
the layers' checks made to agree)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from innerloop import TTTLayer
from innerloop.core.family_layers import DeltaNetLayer, GatedDeltaNetLayer, LinearAttentionLayer, TitansLayer
from innerloop.models import CausalLM, CausalSelfAttention, ModelConfig, validate_model_config
from innerloop.ops import scan

# ---------------------------------------------------------------------------------------------------
# T = 0: an empty piece of a sequence, everywhere (TTTLayer, the family layers, CausalLM, ops.scan), as
# E2ELM already took it. Before: TTTLayer, CausalLM and ops.scan refused it, so a split of a sequence
# with an empty piece (a hypothesis split drawing a cut twice, or at 0 or T) failed.
# ---------------------------------------------------------------------------------------------------

_LAYER_CONFIGS = {
    "linear_dual": {},
    "mlp_dual": {"inner_model": "mlp"},
    "linear_primal": {"update_rule": "minibatch_gd"},
    "next_token": {"inner_loss": "next_token", "update_rule": "minibatch_gd"},
    "mamba_gate": {"share_qk": True, "use_gate": True},
}


def _run_pieces(module: torch.nn.Module, x: torch.Tensor, cuts: list[int], state=None):
    """``module`` over ``x [B, T, ...]`` cut at the sorted ``cuts`` (repeats and 0 / T give empty pieces)."""
    bounds = [0, *cuts, x.shape[1]]
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        y, state = module(x[:, start:end], state)
        outputs.append(y)
    return torch.cat(outputs, dim=1), state


@st.composite
def _cuts_with_empty_pieces(draw: st.DrawFn, length: int) -> list[int]:
    return sorted(draw(st.lists(st.integers(0, length), min_size=1, max_size=5)))


@pytest.mark.slow  # 5 configs x 6 hypothesis examples (~2 s)
@pytest.mark.parametrize("name", sorted(_LAYER_CONFIGS))
@given(data=st.data())
@settings(max_examples=6, deadline=None)
def test_layer_split_with_empty_pieces_equals_the_whole(name: str, data) -> None:
    torch.manual_seed(0)
    layer = TTTLayer(16, 2, mini_batch_size=3, **_LAYER_CONFIGS[name]).double()
    length = data.draw(st.integers(1, 8), label="length")
    x = torch.randn(2, length, 16, dtype=torch.float64)
    whole, whole_state = layer(x)
    split, state = _run_pieces(layer, x, data.draw(_cuts_with_empty_pieces(length), label="cuts"))
    torch.testing.assert_close(split, whole, rtol=1e-10, atol=1e-12)
    assert state.position == whole_state.position == length


@pytest.mark.slow  # the first family layer's first call pays its kernels' first-use checks (~1.2 s)
@pytest.mark.parametrize("family", [LinearAttentionLayer, DeltaNetLayer, GatedDeltaNetLayer, TitansLayer])
def test_family_layer_empty_pieces_equal_the_whole(family) -> None:
    torch.manual_seed(0)
    layer = family(16, 2).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    whole, _ = layer(x)
    split, _ = _run_pieces(layer, x, [0, 2, 2, 5])
    torch.testing.assert_close(split, whole, rtol=1e-10, atol=1e-12)


def test_layer_empty_piece_keeps_the_state_and_the_graph() -> None:
    """An empty piece: output [B, 0, D] in the graph of the output weights, the state given back as it
    came (gradients through it reach the earlier piece)."""
    torch.manual_seed(0)
    layer = TTTLayer(16, 2, mini_batch_size=4).double()
    x = torch.randn(2, 3, 16, dtype=torch.float64, requires_grad=True)
    _, state = layer(x)
    empty, after = layer(x[:, 3:], state)
    assert empty.shape == (2, 0, 16) and empty.requires_grad
    assert after is state
    y, _ = layer(torch.randn(2, 2, 16, dtype=torch.float64), after)
    y.sum().backward()  # through the empty piece's state into x
    assert x.grad is not None and x.grad.abs().sum() > 0
    fresh, first = layer(torch.randn(3, 0, 16, dtype=torch.float64))
    assert fresh.shape == (3, 0, 16) and first.position == 0 and first.batch_size == 3


@pytest.mark.slow  # two backbones x three mixers of a small LM (~1.5 s)
@pytest.mark.parametrize("backbone", ["transformer", "mamba"])
@pytest.mark.parametrize("mixer", ["ttt", "attention", "deltanet"])
def test_causal_lm_empty_pieces_equal_the_whole(backbone: str, mixer: str) -> None:
    torch.manual_seed(0)
    config = ModelConfig(mixer=mixer, backbone=backbone, hidden_size=32, num_heads=2, num_layers=2, window=4)
    model = CausalLM(config).double()
    ids = torch.randint(0, 256, (2, 9))
    whole, _ = model(ids)
    split, _ = _run_pieces(model, ids, [0, 4, 4, 9])
    torch.testing.assert_close(split, whole, rtol=1e-10, atol=1e-12)


def test_causal_lm_empty_piece_logits_are_empty() -> None:
    model = CausalLM(ModelConfig(hidden_size=16, num_heads=2, num_layers=1))
    logits, state = model(torch.zeros(3, 0, dtype=torch.long))
    assert logits.shape == (3, 0, 256) and state.batch_size == 3


@pytest.mark.parametrize("rule", ["dual_form", "minibatch_gd", "momentum"])
def test_scan_empty_piece_returns_the_initial_weights(rule: str) -> None:
    torch.manual_seed(0)
    q = torch.randn(2, 2, 0, 4, dtype=torch.float64, requires_grad=True)
    lr = torch.rand(2, 2, 0, dtype=torch.float64)
    w1 = torch.randn(2, 4, 4, dtype=torch.float64, requires_grad=True)
    initial = {"W1": w1, "b1": torch.zeros(2, 1, 4, dtype=torch.float64)}
    momentum = lr if rule == "momentum" else None
    given = (
        w1.detach().clone()
    )  # (s50d) what is returned is a view of w1: compared with a copy, not with itself
    outputs, weights = scan(q, q, q, lr, update_rule=rule, initial=initial, momentum=momentum)
    assert outputs.shape == (2, 2, 0, 4) and outputs.requires_grad
    torch.testing.assert_close(weights["W1"], given.expand(2, 2, 4, 4), rtol=0, atol=0)
    assert type(weights) is dict  # no partial mini-batch, no dropped carry: it continues exactly
    if rule == "momentum":  # as a call with tokens returns it: the momentum S (zero, none was given)
        assert weights["momentum.W1"].abs().sum() == 0
    weights["W1"].sum().backward()  # the weights are in the graph of initial
    assert torch.equal(w1.grad, torch.full_like(w1, 2.0))


def test_scan_split_with_an_empty_piece_equals_the_whole() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 4, dtype=torch.float64) for _ in range(3))
    lr = torch.rand(1, 2, 8, dtype=torch.float64)
    whole, whole_weights = scan(q, k, v, lr, mini_batch_size=4)
    first, weights = scan(q[:, :, :4], k[:, :, :4], v[:, :, :4], lr[:, :, :4], mini_batch_size=4)
    empty, weights = scan(
        q[:, :, 4:4], k[:, :, 4:4], v[:, :, 4:4], lr[:, :, 4:4], mini_batch_size=4, initial=weights
    )
    last, weights = scan(
        q[:, :, 4:], k[:, :, 4:], v[:, :, 4:], lr[:, :, 4:], mini_batch_size=4, initial=weights
    )
    torch.testing.assert_close(torch.cat([first, empty, last], 2), whole, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(weights["W1"], whole_weights["W1"], rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# numpy bools (np.True_, what numpy comparisons and arrays' items give) as flags: ModelConfig converted
# them, TTTLayer, the family layers, CausalSelfAttention and ops.scan refused them. Now taken as Python's.
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag", ["use_gate", "share_qk", "inner_norm", "inner_residual", "needs_double_backward"]
)
def test_layer_takes_numpy_bools(flag: str) -> None:
    value = np.bool_(flag != "inner_norm")  # inner_norm=np.False_, the others np.True_
    layer = TTTLayer(16, 2, **{flag: value})
    assert type(getattr(layer, flag)) is bool and getattr(layer, flag) == bool(value)
    reference = TTTLayer(16, 2, **{flag: bool(value)})
    assert layer.extra_repr() == reference.extra_repr()


def test_setting_a_built_flag_to_its_numpy_value_is_a_no_op() -> None:
    """The constructor takes np.True_, so setting a built flag to the numpy bool of the value it holds
    changes nothing (as an equal numpy int does for an int option); another value is still refused."""
    layer = TTTLayer(16, 2, use_gate=True)
    layer.use_gate = np.True_
    assert layer.use_gate is True
    with pytest.raises(AttributeError, match=r"TTTLayer.use_gate is fixed when the layer is built"):
        layer.use_gate = np.False_
    with pytest.raises(AttributeError, match=r"TTTLayer.use_gate is fixed when the layer is built"):
        layer.use_gate = 1  # an int is no flag


def test_family_layer_and_attention_take_numpy_bools() -> None:
    layer = DeltaNetLayer(16, 2, output_gate=np.True_, short_conv=np.False_, qk_l2norm=np.True_)
    assert layer.output_gate is True and layer.short_conv is False and layer.qk_l2norm is True
    attention = CausalSelfAttention(16, 2, qk_norm=np.True_)
    assert attention.q_norm is not None


def test_scan_takes_numpy_bools() -> None:
    torch.manual_seed(0)
    q = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    lr = torch.rand(1, 2, 4, dtype=torch.float64)
    flags = {"inner_norm": np.False_, "inner_residual": np.True_, "needs_double_backward": np.False_}
    by_numpy, _ = scan(q, q, q, lr, mini_batch_size=2, **flags)
    by_python, _ = scan(q, q, q, lr, mini_batch_size=2, **{k: bool(v) for k, v in flags.items()})
    assert torch.equal(by_numpy, by_python)


@pytest.mark.parametrize("value", ["False", 0, 1, torch.tensor(True), None])
def test_flags_still_refuse_strings_ints_and_tensors(value) -> None:
    q = torch.randn(1, 2, 4, 4)
    with pytest.raises(TypeError, match=r"inner_norm must be True or False"):
        scan(q, q, q, torch.rand(1, 2, 4), inner_norm=value)
    with pytest.raises(TypeError, match=r"use_gate must be True or False"):
        TTTLayer(16, 2, use_gate=value)


# ---------------------------------------------------------------------------------------------------
# ops.scan and the layers agree: a tensor norm_eps is refused by both (the layers refused it, the op took
# a 0-d one); heads of one feature under the inner LayerNorm are refused by both (the op took them: a
# LayerNorm over one feature outputs its bias, so every output was the same whatever the data).
# ---------------------------------------------------------------------------------------------------


def test_scan_refuses_a_tensor_norm_eps_as_the_layers_do() -> None:
    q = torch.randn(1, 2, 4, 4)
    message = (
        r"norm_eps must be a finite number in \(0, 1\), got tensor\(1.0000e-06\) \(a tensor: pass a Python"
    )
    with pytest.raises(ValueError, match=message):
        scan(q, q, q, torch.rand(1, 2, 4), norm_eps=torch.tensor(1e-6))
    with pytest.raises(ValueError, match=r"\(a tensor: pass a Python number"):
        TTTLayer(16, 2, norm_eps=torch.tensor(1e-6))


def test_scan_refuses_one_feature_heads_under_the_inner_norm() -> None:
    q = torch.randn(1, 2, 4, 1)
    lr = torch.rand(1, 2, 4)
    with pytest.raises(
        ValueError, match=r"inner LayerNorm \(inner_norm=True\) needs heads of 2 or more features"
    ):
        scan(q, q, q, lr)
    outputs, _ = scan(q, q, q, lr, inner_norm=False)  # no LayerNorm: one feature is a valid head
    assert outputs.shape == (1, 2, 4, 1)


def test_model_config_refuses_a_norm_eps_that_rounds_to_zero_in_float32() -> None:
    """model.norm_eps=1e-320 was taken: in float32 it rounds to 0, and the RMSNorm of a zero row (an
    embedding row of zeros) gave NaN, which the TTT layer then blamed on its input ('Clean the input')."""
    with pytest.raises(
        ValueError, match=r"model.norm_eps=1e-320 must be in \[1.17549.*e-38, 1\).*divides 0 by 0"
    ):
        validate_model_config(ModelConfig(norm_eps=1e-320))
    validate_model_config(ModelConfig(norm_eps=torch.finfo(torch.float32).tiny))  # the smallest normal: taken


@pytest.mark.slow  # three configs, two backward passes each (~1 s)
@pytest.mark.parametrize("name", ["linear_dual", "mamba_gate", "next_token"])
def test_gradients_through_empty_pieces_equal_the_whole(name: str) -> None:
    """Every parameter's gradient (and x's) of a split with empty pieces, the state carried through them,
    equals the whole sequence's: the empty pieces pass the graph on."""
    torch.manual_seed(0)
    layer = TTTLayer(8, 2, mini_batch_size=3, **_LAYER_CONFIGS[name]).double()
    x = torch.randn(2, 7, 8, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 7, 8, dtype=torch.float64)

    def gradients(cuts: list[int]) -> list[torch.Tensor]:
        y, _ = _run_pieces(layer, x, cuts)
        return list(torch.autograd.grad((y * weights).sum(), [x, *layer.parameters()]))

    for split, whole in zip(gradients([0, 2, 2, 5, 7]), gradients([]), strict=True):
        torch.testing.assert_close(split, whole, rtol=1e-10, atol=1e-10)
