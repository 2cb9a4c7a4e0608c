"""Review s48a: the core against cases nobody listed (the three left-over LOW findings and their siblings).

Checked and found right (scripts in the session's report, not kept: each repeats a cell an earlier test
holds at other shapes): 190 random float64 TTTLayer configs (linear/mlp, reconstruction/next_token, K in
1..40, T in 1..33, B in 1..3, gate, share_qk with conv kernels 1/2/4, inner LN/residual off) whole =
primal = token by token = random splits on the CPU kernels = each row alone, to 1e-14 (head_dim 2 to
1e-10: a LayerNorm over two features is ill-conditioned, as in fused_torch); outer gradients of every
parameter and of x through splits, auto against torch, to 1e-14; gradcheck of every parameter through a
carried state on the CPU kernels and of every state tensor passed back; gradcheck and gradgradcheck of
ops.scan in every tensor argument; 120 random ops.scan cases (head_dim 1..33, K up to 64 > T, decay,
matrix model) dual = primal = auto = split = rows; inference_chunk_size 1..7 = whole; a third-party
3-layer StackModel (SiLU, tanh, a bias-less layer) dual = primal = decoded; every conformance vector
(ours fp32 within the reference's own fp32 error of output_fp64, gradients 4e-6 relative, fp64 6e-16);
NaN / inf in x, the state or any parameter named; the caller's state and weights never modified.
"""

from __future__ import annotations

import pytest
import torch

import innerloop
from innerloop.ops import scan
from innerloop.testing import twin_layers
from innerloop.testing.kernel_checks import check_kernel


def _views(tokens: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.randn(1, 2, tokens, 4, generator=torch.Generator().manual_seed(0))
    return q, torch.full((1, 2, tokens), 0.1)


@pytest.mark.parametrize("norm_eps", [5.0, 1e30, 1.0, 1e-300])
def test_scan_norm_eps_checked_without_inner_norm(norm_eps: float) -> None:
    """norm_eps out of (0, 1) (or rounding to 0 in the scan's dtype) was accepted by scan silently when
    inner_norm=False and refused when True: one rule, as TTTLayer's, which checks it whatever inner_norm."""
    q, lr = _views()
    with pytest.raises(ValueError, match="norm_eps"):
        scan(q, q, q, lr, inner_norm=False, norm_eps=norm_eps)


def test_setting_the_held_plugins_name_is_a_no_op() -> None:
    """``layer.inner_model = "linear"`` on a layer holding the registered ``linear`` keeps it (as an equal
    value of any other built option does), not an error telling the user to build the layer they have."""
    layer = innerloop.TTTLayer(8, 2)
    held = layer.inner_model
    layer.inner_model = "linear"
    layer.inner_loss = "reconstruction"
    layer.update_rule = "dual_form"
    assert layer.inner_model is held
    with pytest.raises(AttributeError, match="inner_model is fixed when the layer is built.*'mlp'"):
        layer.inner_model = "mlp"


@pytest.mark.parametrize("seed", ["0", 0.5, True, None])
def test_twin_layers_refuses_a_seed_that_is_no_integer(seed: object) -> None:
    """twin_layers(seed="0") (and 0.5, True) seeded torch with int(seed), silently; make_problem and the
    check_* functions refuse them, naming seed."""
    with pytest.raises(TypeError, match="seed must be an int"):
        twin_layers({"hidden_size": 8, "num_heads": 2}, seed, "auto")


def test_twin_layers_refuses_an_integer_dtype() -> None:
    with pytest.raises(TypeError, match="dtype must be a floating-point"):
        twin_layers({"hidden_size": 8, "num_heads": 2}, 0, "auto", dtype=torch.int64)


@pytest.mark.parametrize("seed", ["0", 0.5, True])
def test_check_kernel_names_a_bad_seed(seed: object) -> None:
    """check_kernel(seed="0") raised torch's 'manual_seed expected a long, but got str' from inside."""
    with pytest.raises(TypeError, match="seed must be an int"):
        check_kernel("cpu_ttt_linear", seed=seed)


def _saved_state() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    layer = innerloop.TTTLayer(8, 2, mini_batch_size=4)
    with torch.no_grad():
        _, state = layer(torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(0)))
    return state.tensors(), state.metadata()


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("mini_batch_size", "0"),  # was ZeroDivisionError: integer modulo by zero
        ("position", "-4"),  # was 'pending ... nonzero at a mini-batch boundary (position -4 ...)'
        ("position", "-1"),
        ("position", 6.7),  # was read as 6, silently
        ("num_heads", "0"),
        ("head_dim", "-4"),
        ("batch_size", "-2"),
    ],
)
def test_state_metadata_numbers_are_checked_by_from_tensors(key: str, value: object) -> None:
    """TTTState.from_tensors read each number of the metadata with int() alone: mini_batch_size '0'
    crashed in a modulo, a negative position was blamed on the pending tensors, a float was truncated."""
    tensors, metadata = _saved_state()
    with pytest.raises(ValueError, match=rf"state metadata {key}="):
        innerloop.TTTState.from_tensors(tensors, {**metadata, key: value})


def test_state_metadata_of_an_empty_batch_is_read() -> None:
    tensors, metadata = _saved_state()
    empty = {name: tensor[:0] for name, tensor in tensors.items()}
    state = innerloop.TTTState.from_tensors(empty, {**metadata, "batch_size": "0"})
    assert state.batch_size == 0 and state.position == 6


def test_index_select_of_an_empty_batch_says_it_has_no_rows() -> None:
    """The message of a row outside a state of batch 0 read 'valid rows are 0..-1'."""
    layer = innerloop.TTTLayer(8, 2, mini_batch_size=4)
    _, state = layer(torch.randn(0, 5, 8))
    with pytest.raises(ValueError, match=r"batch of 0 sequences: it has no rows to take") as caught:
        state.index_select(torch.tensor([0]))
    assert "0..-1" not in str(caught.value)


@pytest.mark.parametrize("kernel", ["fused_torch_mlp", "nope", "Auto"])
def test_a_kernel_set_on_a_built_layer_is_checked_as_the_constructor_checks_it(kernel: str) -> None:
    """TTTLayer.__setattr__ says a new call option is checked as the constructor checks it; a kernel name
    was only type-checked, and refused (KernelUnavailableError) at the next forward."""
    layer = innerloop.TTTLayer(16, 2, mini_batch_size=4)
    with pytest.raises(ValueError, match=rf"kernel='{kernel}' is not a kernel for \(inner_model='linear'"):
        layer.kernel = kernel
    assert layer.kernel == "auto"  # left as it was
    layer.kernel = "fused_torch_linear"  # a kernel of this layer is taken
    assert layer.kernel == "fused_torch_linear"
