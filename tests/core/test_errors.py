"""Bad input gets one clear error naming the parameter, the value and what is valid."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import innerloop
from innerloop import TTTLayer


@pytest.fixture(scope="module")
def layer():
    return TTTLayer(16, 4, mini_batch_size=4)


def test_wrong_feature_size(layer):
    with pytest.raises(ValueError, match=r"x must have shape \[B, T, hidden_size=16\], got \(2, 5, 12\)"):
        layer(torch.randn(2, 5, 12))


def test_wrong_rank(layer):
    with pytest.raises(ValueError, match="x must have shape"):
        layer(torch.randn(5, 16))


def test_integer_dtype(layer):
    with pytest.raises(TypeError, match="floating-point tensor, got dtype torch.int64"):
        layer(torch.ones(1, 3, 16, dtype=torch.long))


def test_empty_sequence_is_an_empty_piece(layer):
    """T = 0 reads no token: an empty output and the state unchanged (tests/test_review_s49_s49a.py)."""
    y, state = layer(torch.randn(1, 0, 16))
    assert y.shape == (1, 0, 16) and state.position == 0


def test_state_from_another_batch_size(layer):
    _, state = layer(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match=r"batch_size': \(2, 3\)"):
        layer(torch.randn(3, 1, 16), state)


def test_state_from_another_config(layer):
    other = TTTLayer(16, 4, mini_batch_size=8)
    _, state = other(torch.randn(1, 5, 16))
    with pytest.raises(ValueError, match=r"mini_batch_size': \(8, 4\)"):
        layer(torch.randn(1, 1, 16), state)
    mlp = TTTLayer(16, 4, inner_model="mlp", mini_batch_size=4)
    _, state = mlp(torch.randn(1, 5, 16))
    with pytest.raises(ValueError, match=r"inner_model': \('mlp', 'linear'\)"):
        layer(torch.randn(1, 1, 16), state)


def test_state_of_wrong_type(layer):
    with pytest.raises(TypeError, match="state must be a TTTState"):
        layer(torch.randn(1, 1, 16), {"W1": torch.zeros(1)})


@pytest.mark.parametrize("value", [0, -3, 2.5, True])
def test_mini_batch_size_below_one(value):
    with pytest.raises(
        ValueError, match=f"mini_batch_size must be a positive integer <= 65536, got {value!r}"
    ):
        TTTLayer(16, 4, mini_batch_size=value)


def test_hidden_not_divisible_by_heads():
    with pytest.raises(
        ValueError, match=r"hidden_size \(10\) must be divisible by num_heads \(4\); valid num_heads"
    ):
        TTTLayer(10, 4)


def test_the_head_counts_an_error_lists_come_at_once_for_any_width():
    """The valid head counts were found by a loop over every number up to hidden_size: TTTLayer(2**31 - 1,
    2) ran for minutes before its error. They are the width's divisors now (at most 24 listed, smallest
    first), and a width too large to build is refused for its size first."""
    import signal

    from innerloop.core.layer import ModelTooLargeError, check_head_split

    def too_slow(signum, frame):
        raise TimeoutError("the head counts took more than 5 s")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(5)
    try:
        with pytest.raises(
            ValueError, match=r"valid num_heads for this width: \[1, 2, 3, 6, 7, 9, 11, .*, \.\.\.\]$"
        ):
            check_head_split(2**31 - 2, 4, rotary=False)
        with pytest.raises(ValueError, match="no num_heads splits an odd hidden_size"):
            check_head_split(2**31 - 1, 2, rotary=True)
        with pytest.raises(ValueError, match=r"\(7\); num_heads must divide it into heads of an even width$"):
            check_head_split(10**18 + 1, 7, rotary=True)  # too wide to list them (and to build)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    with pytest.raises(ValueError, match=r"valid num_heads for this width: \[1, 2, 4, 8, 16, 32\]$"):
        check_head_split(64, 3, rotary=True)
    with pytest.raises(ValueError, match=r"valid num_heads for this width: \[1, 3, 5, 15\]$"):
        check_head_split(30, 4, rotary=True)  # head widths 30, 10, 6, 2
    with pytest.raises(ModelTooLargeError, match="hidden_size=2147483646"):
        TTTLayer(2**31 - 2, 4)


def test_a_conv_kernel_without_share_qk_is_warned_of():
    with pytest.warns(UserWarning, match=r"conv_kernel=3 has no effect: .* share_qk=True") as caught:
        TTTLayer(8, 2, conv_kernel=3)
    assert caught[0].filename == __file__  # points at the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TTTLayer(8, 2, conv_kernel=3, share_qk=True)  # its convolutions' kernel
        TTTLayer(8, 2)  # the default


def test_odd_head_dim():
    with pytest.raises(ValueError, match="head_dim = hidden_size / num_heads = 3 must be even"):
        TTTLayer(12, 4)


def test_unknown_plugin_lists_registered():
    with pytest.raises(
        ValueError,
        match=r"unknown inner loss 'l1'; registered: \['dot_product', 'next_token', 'reconstruction'",
    ):
        TTTLayer(16, 4, inner_loss="l1")


def test_dual_form_needs_a_stack_model():
    from innerloop.core.protocol import InnerModel

    class Opaque(InnerModel):
        name = "opaque"

        def param_shapes(self, head_dim):
            return {"W": (head_dim, head_dim)}

        def init_params(self, num_heads, head_dim, generator=None):
            return {"W": torch.zeros(num_heads, head_dim, head_dim)}

        def forward(self, params, x):
            return torch.tanh(x @ params["W"])

    with pytest.raises(ValueError, match="dual form needs; use update_rule='minibatch_gd'"):
        TTTLayer(16, 4, inner_model=Opaque())
    layer = TTTLayer(16, 4, inner_model=Opaque(), update_rule="minibatch_gd")
    assert layer(torch.randn(1, 3, 16))[0].shape == (1, 3, 16)


def test_non_finite_input_is_rejected_before_the_state(layer):
    x = torch.randn(1, 6, 16)
    x[0, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        layer(x)


def test_non_finite_input_names_where_it_is_so_that_those_sequences_can_be_left_out(layer):
    x = torch.randn(12, 6, 16)
    for sequence, token in [(3, 4), (5, 1), (5, 2), *((i, 0) for i in range(7, 12))]:
        x[sequence, token, 0] = float("inf") if sequence == 3 else float("nan")
    with pytest.raises(ValueError, match=r"first at x\[3, 4\]; sequences 3, 5, 7, 8, 9, 10, 11 of the batch"):
        layer(x)
    x[0, 0, 0] = x[1, 5, 15] = float("nan")  # nine sequences: the first eight named, then how many more
    with pytest.raises(ValueError, match=r"first at x\[0, 0\]; sequences 0, 1, 3, 5, 7, 8, 9, 10 and 1 more"):
        layer(x)
    keep = [i for i in range(12) if i not in (0, 1, 3, 5, 7, 8, 9, 10, 11)]
    assert torch.isfinite(layer(x[keep])[0]).all()  # the rest compute on their own


def test_non_finite_ignore_propagates_detectably():
    layer = TTTLayer(16, 4, mini_batch_size=4, non_finite="ignore")
    x = torch.randn(1, 6, 16)
    x[0, 2, 3] = float("inf")
    y, state = layer(x)
    assert not torch.isfinite(y).all()
    assert not state.is_finite()


def test_bad_policy_and_kernel_names():
    with pytest.raises(ValueError, match="non_finite must be one of"):
        TTTLayer(16, 4, non_finite="zero")
    for value in (0, -4, 2.5, True):
        with pytest.raises(
            ValueError, match=f"inference_chunk_size must be a positive integer or None, got {value!r}"
        ):
            TTTLayer(16, 4, inference_chunk_size=value)
    # an unknown kernel fails at construction (test_layer_trust.py checks the message in full)
    with pytest.raises(ValueError, match="kernel='no_such_kernel' is not a kernel for"):
        TTTLayer(16, 4, kernel="no_such_kernel")


def test_numpy_scalars_are_numbers():
    # numpy's scalars (what a sweep over np.linspace / np.arange hands over) are real numbers: accepted,
    # and the layer keeps them as Python ints and floats, with the numbers of the plain arguments.
    numpy_args = {
        "mini_batch_size": np.int32(4),
        "base_lr": np.float32(0.5),
        "conv_kernel": np.int64(3),
        "rope_theta": np.float32(500.0),
        "norm_eps": np.float32(1e-5),
        "inference_chunk_size": np.uint16(8),
    }
    plain_args = {k: v.item() for k, v in numpy_args.items()}
    torch.manual_seed(0)
    numpy_layer = TTTLayer(np.int64(16), np.int64(4), share_qk=True, **numpy_args)
    torch.manual_seed(0)
    plain_layer = TTTLayer(16, 4, share_qk=True, **plain_args)
    for name in ("hidden_size", "num_heads", "head_dim", *numpy_args):
        value = getattr(numpy_layer, name)
        assert type(value) in (int, float) and value == getattr(plain_layer, name), name
    x = torch.randn(2, 6, 16)
    assert torch.equal(numpy_layer(x)[0], plain_layer(x)[0])


@pytest.mark.parametrize(
    ("name", "value", "valid"),
    [
        ("base_lr", np.bool_(True), "a finite number >= 0"),
        ("base_lr", np.float32("nan"), "a finite number >= 0"),
        ("base_lr", np.float64(-1.0), "a finite number >= 0"),
        ("base_lr", torch.tensor(1.0), "a finite number >= 0"),
        ("base_lr", 10**400, "a finite number >= 0"),
        ("rope_theta", np.float32(0.0), "a finite number >= 1"),
        ("norm_eps", np.float32("inf"), r"a finite number in \(0, 1\)"),
        ("mini_batch_size", np.float64(4.0), "a positive integer <= 65536"),
        ("mini_batch_size", np.bool_(True), "a positive integer <= 65536"),
        ("conv_kernel", np.int64(0), "a positive integer <= 1024"),
        ("inference_chunk_size", np.int8(-1), "a positive integer or None"),
    ],
    ids=lambda v: type(v).__name__ if not isinstance(v, str) else v.split()[0],
)
def test_numbers_that_are_not_valid_are_still_refused_by_name(name, value, valid):
    with pytest.raises(ValueError, match=rf"{name} must be {valid}, got "):
        TTTLayer(16, 4, **{name: value})


@pytest.mark.parametrize("inner_model", ["linear", "mlp"])
def test_a_batch_of_no_sequences_runs_without_warnings(inner_model):
    """B = 0 (an empty shard, a filtered batch) is no mistake: empty outputs and gradients, no warning
    (torch.var warns about degrees of freedom on an empty tensor)."""
    layer = innerloop.TTTLayer(16, 2, inner_model=inner_model, mini_batch_size=4)
    x = torch.randn(0, 8, 16, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, state = layer(x)
        out.sum().backward()
        decoded, _ = layer(torch.randn(0, 1, 16), state)
    assert out.shape == (0, 8, 16) and decoded.shape == (0, 1, 16) and x.grad.shape == x.shape
