"""What TTTLayer says when finite input gives non-finite numbers, and the inputs it refuses first
(review s14: MED-1, LOW-1, LOW-2, LOW-3).

The error must name the actual cause: the inner weights overflowing (a huge inner learning rate), a
float16 layer's own projections or output, a NaN parameter, and only then the plugins (with the
built-in ones named as unlikely). ``norm_eps`` that is 0 in the scan's dtype is refused before it
can divide 0 by 0, and a state made under ``torch.inference_mode`` is refused by name (not by torch,
on some paths only) where the call records a graph.
"""

from __future__ import annotations

import pytest
import torch

from innerloop import TTTLayer
from innerloop.core.layer import check_layer_arguments
from innerloop.core.protocol import InnerLoss, LossPairs

HIDDEN, HEADS, K = 16, 2, 4


def error_of(layer: TTTLayer, x: torch.Tensor, state=None) -> str:
    with pytest.raises(ValueError) as raised:
        layer(x, state)
    return str(raised.value)


# ---- MED-1: the inner weights overflowing, not the plugins ----------------------------------------


@pytest.mark.parametrize("kernel", ["torch", "auto"])
def test_a_huge_inner_learning_rate_is_named_as_the_inner_weights_overflowing(kernel):
    torch.manual_seed(0)
    layer = TTTLayer(HIDDEN, HEADS, inner_model="mlp", mini_batch_size=K, base_lr=1e20, kernel=kernel)
    message = error_of(layer, torch.randn(1, 3 * K, HIDDEN))
    assert "the inner weights overflowed float32 (largest |W|" in message
    assert "lower base_lr (now 1e+20)" in message and "learnable_ttt_lr_weight" in message
    assert "run in float64 (layer.double())" in message
    assert "check the q, k and v projections' weights (largest |weight|" in message
    assert "plugins" not in message and "likely source" not in message


def test_a_shared_qk_layers_overflow_is_named_too():
    torch.manual_seed(0)
    layer = TTTLayer(HIDDEN, HEADS, inner_model="mlp", mini_batch_size=K, base_lr=1e20, share_qk=True)
    assert "the inner weights overflowed float32" in error_of(layer, torch.randn(1, 3 * K, HIDDEN))


def test_a_float64_layer_is_not_told_to_run_in_float64():
    torch.manual_seed(0)
    layer = TTTLayer(HIDDEN, HEADS, inner_model="mlp", mini_batch_size=K, base_lr=1e300).double()
    message = error_of(layer, torch.randn(1, 3 * K, HIDDEN, dtype=torch.float64))
    assert "the inner weights overflowed float64" in message and "float64 (layer.double())" not in message


class InfiniteRates(TTTLayer):
    """A layer whose own inner learning rates overflow (a base_lr that overflows float32 is refused up
    front, so only a layer's own inner_learning_rates can get here)."""

    def inner_learning_rates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lr, tau = super().inner_learning_rates(x)
        return lr * float("inf"), tau


def test_an_inner_learning_rate_that_is_inf_in_float32_is_named():
    torch.manual_seed(0)
    layer = InfiniteRates(HIDDEN, HEADS, mini_batch_size=K)
    message = error_of(layer, torch.randn(1, 2 * K, HIDDEN))
    assert "the inner learning rate is not finite in float32; lower base_lr (now 1)" in message


def test_a_nan_parameter_is_named():
    torch.manual_seed(0)
    layer = TTTLayer(HIDDEN, HEADS, mini_batch_size=K)
    with torch.no_grad():
        layer.ttt_norm_weight[0, 0] = float("nan")
    message = error_of(layer, torch.randn(1, 2 * K, HIDDEN))
    assert "the layer's parameters ['ttt_norm_weight'] hold NaN or inf" in message


def test_the_diagnosis_leaves_the_calls_dispatches_as_they_were():
    torch.manual_seed(0)
    layer = TTTLayer(HIDDEN, HEADS, inner_model="mlp", mini_batch_size=K, base_lr=1e20, kernel="torch")
    x = torch.randn(1, 3 * K, HIDDEN)
    layer.non_finite = "ignore"
    layer(x)
    expected = list(layer.dispatches)
    layer.non_finite = "raise"
    error_of(layer, x)
    assert layer.dispatches == expected


class LogOfTarget(InnerLoss):
    """Finite on random targets, NaN on an all-zero input row (``0 * log 0``)."""

    name = "log_of_target_s14"

    def pairs(self, views, carry):
        return LossPairs(views.key, views.value)

    def token_loss(self, prediction, target):
        return 0.5 * (prediction - target).pow(2).sum(-1) * (1 + 0 * target.abs().sum(-1).log())


@pytest.mark.slow  # ~1-2 s: the registrar's checks of the plugin instance (check_instance)
def test_a_plugin_nan_names_the_plugin_that_is_not_built_in_and_calls_the_built_in_ones_unlikely():
    layer = TTTLayer(8, 2, mini_batch_size=K, inner_loss=LogOfTarget())  # an instance: not registered
    message = error_of(layer, torch.zeros(1, 2 * K, 8))
    assert "the inner weights turned NaN or inf in one update from largest |W|" in message
    assert "stayed moderate" not in message
    assert "plugins that are not built in, inner loss 'log_of_target_s14' (not registered" in message
    assert message.index("log_of_target_s14") < message.index("lower base_lr")  # the likelier cause first
    assert "the built-in inner model 'linear'" in message and "unlikely the cause" in message


# ---- MED-1: a norm_eps that is 0 in the scan's dtype ----------------------------------------------


@pytest.mark.parametrize("norm_eps", [1e-300, 1e-39])
def test_a_norm_eps_that_rounds_to_zero_or_a_subnormal_in_float32_is_refused_at_construction(norm_eps):
    with pytest.raises(ValueError) as raised:
        TTTLayer(HIDDEN, HEADS, norm_eps=norm_eps)
    message = str(raised.value)
    assert f"norm_eps={norm_eps!r} rounds to 0 or to a subnormal in float32" in message
    assert ">= 1.18e-38 in float32" in message
    with pytest.raises(ValueError, match="norm_eps=1e-300 rounds to 0"):
        check_layer_arguments(HIDDEN, HEADS, norm_eps=1e-300)


def test_the_smallest_normal_float32_norm_eps_is_taken():
    TTTLayer(HIDDEN, HEADS, norm_eps=torch.finfo(torch.float32).tiny)


def test_a_float64_layer_takes_a_tiny_norm_eps_until_it_is_cast_to_float32():
    torch.set_default_dtype(torch.float64)  # the conftest fixture restores it
    layer = TTTLayer(HIDDEN, HEADS, mini_batch_size=K, norm_eps=1e-300)
    y, _ = layer(torch.zeros(1, K, HIDDEN))  # a constant row: LayerNorm of 0 with eps 1e-300
    assert torch.isfinite(y).all()
    layer.float()
    with pytest.raises(ValueError, match=r"norm_eps=1e-300 rounds to 0 or to a subnormal in float32"):
        layer(torch.zeros(1, K, HIDDEN, dtype=torch.float32))


# ---- LOW-2: a float16 layer's own overflow ----------------------------------------------------------


def test_float16_projections_that_overflow_are_named_in_float16():
    torch.manual_seed(0)
    layer = TTTLayer(32, 2, mini_batch_size=K).to(torch.float16)
    x = ((torch.rand(1, 2 * K, 32) * 2 - 1) * 65000).to(torch.float16)  # finite in float16
    message = error_of(layer, x)
    assert "the projections Q, K, V overflowed float16" in message and "float32 (layer.float())" in message
    assert "overflowed float32" not in message


def test_a_float16_output_that_overflows_while_the_scan_stays_finite_is_named_in_float16():
    torch.manual_seed(0)
    layer = TTTLayer(HIDDEN, HEADS, mini_batch_size=K).to(torch.float16)
    with torch.no_grad():  # finite float16 weights whose product with the post-norm overflows float16
        layer.post_norm.weight.mul_(1e3)
        layer.o_proj.weight.mul_(1e3)
    message = error_of(layer, torch.randn(1, 2 * K, HIDDEN).to(torch.float16))
    assert "state stayed finite, so the post-norm, gate or o_proj overflowed float16" in message
    assert "overflowed float32" not in message


# ---- LOW-1: non_finite='ignore' spreads a NaN to its whole mini-batch ------------------------------


def test_ignore_spreads_a_nan_to_earlier_tokens_of_its_mini_batch_as_the_docstring_says():
    torch.manual_seed(0)
    layer = TTTLayer(HIDDEN, HEADS, mini_batch_size=K, non_finite="ignore")
    x = torch.randn(1, 2 * K, HIDDEN)
    x[0, K + 2, 0] = float("nan")
    with torch.no_grad():
        y, _ = layer(x)
        before, _ = layer(x[:, : K + 2])
    finite = torch.isfinite(y[0]).all(-1).tolist()
    assert finite == [True] * K + [False] * K  # tokens K and K + 1 come before the NaN
    assert torch.isfinite(before).all()  # a call that ends before it returns them finite
    doc = " ".join(TTTLayer.__doc__.split())
    assert "spreads to the outputs of its whole mini-batch" in doc and "earlier tokens included" in doc


# ---- LOW-3: a state made under torch.inference_mode -------------------------------------------------


@pytest.mark.parametrize("kernel", ["torch", "auto"])
def test_an_inference_mode_state_is_refused_by_name_where_the_call_records_a_graph(kernel):
    torch.manual_seed(0)
    layer = TTTLayer(HIDDEN, HEADS, mini_batch_size=K, kernel=kernel)
    x = torch.randn(1, 2 * K + 1, HIDDEN)
    with torch.inference_mode():
        _, state = layer(x[:, : 2 * K])
    message = error_of(layer, x[:, 2 * K :], state)
    assert message.startswith("state holds inference tensors (params.W1")
    assert "torch.no_grad()" in message and "state.clone() called outside inference mode" in message
    with torch.no_grad():  # the remedies named
        layer(x[:, 2 * K :], state)
    y, _ = layer(x[:, 2 * K :], state.clone())
    assert y.requires_grad


def test_scan_refuses_a_norm_eps_that_rounds_to_zero_in_its_dtype() -> None:
    # Before: innerloop.ops.scan(..., norm_eps=1e-300) in float32 returned NaN without a word.
    from innerloop.ops import scan

    q = torch.randn(1, 2, 8, 4)
    lr = torch.full((1, 2, 8), 0.1)
    with pytest.raises(ValueError, match=r"norm_eps=1e-300 rounds to 0 or to a subnormal in float32"):
        scan(q, q, q, lr, inner_model="linear", mini_batch_size=4, norm_eps=1e-300)
    outputs = scan(
        *(t.double() for t in (q, q, q, lr)), inner_model="linear", mini_batch_size=4, norm_eps=1e-300
    )[0]
    assert torch.isfinite(outputs).all()  # float64 represents it


@pytest.mark.parametrize("member", ["TTTLayer", "LinearAttentionLayer"])
def test_a_base_lr_that_overflows_the_scan_dtype_is_refused_by_name(member) -> None:
    # Before: inf inner learning rates (TTTLayer), or torch's "value cannot be converted to type float
    # without overflow" (the family's layers).
    from innerloop.core.family_layers import LinearAttentionLayer

    build = {"TTTLayer": TTTLayer, "LinearAttentionLayer": LinearAttentionLayer}[member]
    with pytest.raises(ValueError, match=r"base_lr=1e\+300 overflows float32, the layer's scan dtype"):
        build(8, 2, base_lr=1e300)(torch.randn(1, 4, 8))
    build(8, 2, base_lr=1e300).double()(torch.randn(1, 4, 8, dtype=torch.float64))  # fits float64


def test_a_copied_or_reloaded_layers_built_in_plugins_are_still_named_built_in() -> None:
    # Review s14: after copy.deepcopy (or torch.save / torch.load) the plugins were "not registered",
    # so the error blamed them as a third party's.
    import copy
    import io

    from innerloop.core.layer import is_built_in, plugin_label

    layer = TTTLayer(HIDDEN, HEADS, inner_model="mlp", mini_batch_size=K)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    for twin in (copy.deepcopy(layer), torch.load(buffer, weights_only=False)):
        for kind in ("inner_model", "inner_loss", "update_rule"):
            assert is_built_in(kind, getattr(twin, kind))
            assert "origin 'builtin:" in plugin_label(kind, getattr(twin, kind))


def test_the_diagnosis_rereads_a_long_call_in_a_bounded_number_of_pieces(monkeypatch) -> None:
    # Review s14: one piece per mini-batch made the error path 2.5x the call at mini_batch_size=1.
    from innerloop.core.layer import DIAGNOSIS_PIECES

    torch.manual_seed(0)
    layer = TTTLayer(HIDDEN, HEADS, inner_model="mlp", mini_batch_size=1, base_lr=1e20)
    pieces = []
    original = TTTLayer._forward_chunk

    def counted(self, x, state):
        pieces.append(x.shape[1])
        return original(self, x, state)

    monkeypatch.setattr(TTTLayer, "_forward_chunk", counted)
    message = error_of(layer, torch.randn(1, 64, HIDDEN))
    assert "the inner weights overflowed float32" in message
    assert len(pieces) - 1 <= DIAGNOSIS_PIECES + 1  # the call itself, then the diagnosis's pieces


# ---- the state's check reads one sum per tensor; the exact check settles an overflowing sum -------------


def _layer_and_call(dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    layer = TTTLayer(HIDDEN, HEADS, mini_batch_size=K).to(dtype)
    x = torch.randn(2, 6, HIDDEN, dtype=dtype)
    with torch.no_grad():
        y, state = layer(x)
    return layer, x, y, state


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_state_values_whose_sum_overflows_pass_the_output_check(dtype):
    layer, x, y, state = _layer_and_call(dtype)
    huge = torch.finfo(dtype).max / 2
    state.params["W1"].fill_(huge)  # every element finite, their sum inf
    assert not torch.isfinite(state.params["W1"].sum()) and state.is_finite()
    layer._check_output(x, None, y, state)  # no error: the exact check settles it


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("group", ["params", "pending"])
def test_one_non_finite_state_element_fails_the_output_check(bad, group):
    layer, x, y, state = _layer_and_call()
    tensor = next(iter(getattr(state, group).values()))
    tensor.view(-1)[-1] = bad
    with pytest.raises(ValueError, match="produced a non-finite state from finite input"):
        layer._check_output(x, None, y, state)


def test_a_state_of_mixed_dtypes_is_checked_too():
    layer, x, y, state = _layer_and_call()
    state.params["b1"] = state.params["b1"].double()  # a state whose tensors differ in dtype
    layer._check_output(x, None, y, state)
    state.params["b1"].view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="produced a non-finite state from finite input"):
        layer._check_output(x, None, y, state)


def test_a_half_precision_state_is_summed_in_float32():
    """A float16 state whose sum leaves float16's range (65504) still reads as finite by its sums, not
    only by the exact check after them."""
    from innerloop.core.layer import _sums_are_finite

    layer, x, y, state = _layer_and_call()
    state.params["W1"] = torch.full_like(state.params["W1"], 1000.0, dtype=torch.float16)
    assert not torch.isfinite(state.params["W1"].sum())  # its own dtype's sum overflows
    assert bool(_sums_are_finite(state))
    state.params["W1"].view(-1)[0] = float("inf")
    assert not bool(_sums_are_finite(state))
