"""TTTLayer reaches the kernels (compiled CPU, Triton) through the registry, takes the one that fits the
call (inference or training), and falls back with a readable reason."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from innerloop import TTTLayer
from innerloop.core.functional import relative_error


@pytest.mark.triton_interpreter
@pytest.mark.slow  # the interpreter's child process (tests/kernels/test_triton_kernels.py says why)
@pytest.mark.parametrize("model", ["linear", "mlp"])
def test_layer_runs_the_triton_kernel_and_equals_torch(model):
    """One batch row: dispatch, the split and the plumbing of perturbed parameters are the question
    (batch rows and heads through the kernel: test_review_s56_s56t_triton's heads3-batch3 and
    test_triton_kernels.py). Two rows of a fresh layer's weights, the same in each, made the first-use
    check probe twice (test_first_use.py says why): three interpreted forwards and backwards of
    four programs each, where one row runs two of two."""
    torch.manual_seed(0)
    reference = TTTLayer(32, 2, inner_model=model, mini_batch_size=4, kernel="torch")
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    fast = TTTLayer(32, 2, inner_model=model, mini_batch_size=4, kernel="auto")
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(1, 10, 32, requires_grad=True)  # 2 whole mini-batches + a tail of 2 tokens

    y_ref, state_ref = reference(x)
    y_fast, state_fast = fast(x)
    (whole, _), (tail, reason) = fast.dispatches  # the tail inside a mini-batch runs on torch
    assert whole == f"triton_ttt_{model}" and tail == "torch" and "a part of 2 tokens" in reason
    assert relative_error(y_fast, y_ref) <= 1e-4
    for key in state_ref.params:
        assert relative_error(state_fast.params[key], state_ref.params[key]) <= 1e-4
    grads_ref = torch.autograd.grad(y_ref.square().sum(), [x, *reference.parameters()])
    grads_fast = torch.autograd.grad(y_fast.square().sum(), [x, *fast.parameters()])
    names = ["x", *(n for n, _ in fast.named_parameters())]
    for name, g_fast, g_ref in zip(names, grads_fast, grads_ref, strict=True):
        assert relative_error(g_fast, g_ref) <= 1e-4, name


@pytest.mark.triton_interpreter
@pytest.mark.slow  # the interpreter's child process (tests/kernels/test_triton_kernels.py says why)
def test_unsupported_head_dim_falls_back_with_the_reason():
    layer = TTTLayer(16, 2, mini_batch_size=4)  # head_dim 8: below the Triton kernels' minimum
    layer(torch.randn(1, 8, 16))
    path, reason = layer.last_dispatch
    assert path in (
        "cpu_ttt_linear",
        "fused_torch_linear",
    )  # the next that verifies (compiled, where it builds)
    assert "refused before it: triton_ttt_linear: head_dim 8" in reason
    forced = TTTLayer(16, 2, mini_batch_size=4, kernel="triton_ttt_linear")
    with pytest.raises(RuntimeError, match="head_dim 8 must be a power of two in \\[16, 128\\]"):
        forced(torch.randn(1, 8, 16))


def _assert_decoded_on_the_decode_kernel(model: str, mini_batch_size: int, tokens: int) -> None:
    """A layer (kernel="auto") fed ``tokens`` tokens one at a time runs each on the Triton decode kernel
    and gives the torch layer's one-call outputs. One batch row: the layer's decoding is the question;
    rows and heads through the decode kernel, each with its own weights and pending sums, are
    test_triton_kernels.py's test_kernel_decode_matches_naive_decode (2 rows, 2 heads) and
    test_review_s20_triton.py's test_decode_strided_and_shared_state (3 rows); each row here was one more
    interpreted program per token."""
    torch.manual_seed(1)
    reference = TTTLayer(32, 2, inner_model=model, mini_batch_size=mini_batch_size, kernel="torch")
    fast = TTTLayer(32, 2, inner_model=model, mini_batch_size=mini_batch_size, kernel="auto")
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(1, tokens, 32)
    with torch.no_grad():
        whole, _ = reference(x)
        state, outputs = None, []
        for t in range(x.shape[1]):
            y, state = fast(x[:, t : t + 1], state)
            outputs.append(y)
            assert fast.last_dispatch[0] == f"triton_ttt_{model}.decode", fast.last_dispatch
    assert relative_error(torch.cat(outputs, dim=1), whole) <= 1e-4


@pytest.mark.triton_interpreter
@pytest.mark.slow  # the interpreter's child process (tests/kernels/test_triton_kernels.py says why)
@pytest.mark.parametrize("model", ["linear", "mlp"])
def test_token_by_token_decoding_uses_the_decode_kernel(model):
    """11 tokens: two whole mini-batches (their updates), then three tokens of the next (pending sums).
    A 6-token run (one update, two tokens) decided nothing these do not: it was dropped."""
    _assert_decoded_on_the_decode_kernel(model, mini_batch_size=4, tokens=11)


@pytest.mark.triton_interpreter
@pytest.mark.slow  # the interpreter's child process (tests/kernels/test_triton_kernels.py says why)
def test_decode_kernel_is_refused_when_gradients_are_needed():
    layer = TTTLayer(32, 2, mini_batch_size=4)
    layer(torch.randn(1, 1, 32))
    path, reason = layer.last_dispatch
    assert path == "torch" and "decode kernel is inference-only" in reason


@pytest.mark.triton_interpreter
@pytest.mark.slow  # the interpreter's child process; ~1 s of it
@pytest.mark.parametrize("model", ["linear", "mlp"])
def test_a_layer_with_mini_batches_beyond_the_chunk_kernels_still_decodes_on_the_decode_kernel(model):
    """Review s44a: the decode kernel reads one token (its scale tau_i, never the mini-batch), but verify
    held decoded tokens to the chunk kernels' mini_batch_size <= 64, so a layer of mini_batch_size 80
    decoded on torch ("mini_batch_size 80 (len(tau)) unsupported")."""
    _assert_decoded_on_the_decode_kernel(model, mini_batch_size=80, tokens=3)


@pytest.mark.slow  # 6 examples through the interpreter (~3 s); the tail is covered above
@pytest.mark.triton_interpreter
@settings(max_examples=6, deadline=None)
@given(
    model=st.sampled_from(["linear", "mlp"]),
    mini_batch=st.sampled_from([4, 8, 16]),
    head_dim=st.sampled_from([16, 32, 64]),
    tokens=st.integers(1, 40),
    seed=st.integers(0, 2**16),
)
def test_layer_through_triton_equals_torch_for_any_length(model, mini_batch, head_dim, tokens, seed):
    """Whole mini-batches go to the Triton kernel, the remainder to torch; together they equal torch.
    One head: the split is the question (heads and batch rows through the kernel: the test above, and
    test_review_s56_s56t_triton's heads3-batch3), and each head is one more interpreted program."""
    torch.manual_seed(seed)
    config = dict(hidden_size=head_dim, num_heads=1, inner_model=model, mini_batch_size=mini_batch)
    reference = TTTLayer(**config, kernel="torch")
    fast = TTTLayer(**config, kernel="auto")
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(1, tokens, head_dim, requires_grad=True)
    y_ref, _ = reference(x)
    y_fast, _ = fast(x)
    assert relative_error(y_fast, y_ref) <= 1e-4
    if tokens >= mini_batch:
        assert f"triton_ttt_{model}" in [path for path, _ in fast.dispatches]
    (g_ref,) = torch.autograd.grad(y_ref.square().sum(), x)
    (g_fast,) = torch.autograd.grad(y_fast.square().sum(), x)
    assert relative_error(g_fast, g_ref) <= 1e-4


@pytest.mark.usefixtures("cpu_kernels")
@pytest.mark.parametrize("model", ["linear", "mlp"])
def test_auto_takes_the_kernel_for_inference_and_for_training(model):
    """The compiled kernel both ways: its chunk function without autograd, its training scan with."""
    layer = TTTLayer(16, 2, inner_model=model, mini_batch_size=4)
    x = torch.randn(1, 8, 16)
    with torch.no_grad():
        layer(x)
    assert layer.last_dispatch[0] == f"cpu_ttt_{model}"
    layer(x)
    assert layer.last_dispatch[0] == f"cpu_ttt_{model}"


@pytest.mark.usefixtures("cpu_kernels")
@pytest.mark.parametrize("model", ["linear", "mlp"])
def test_training_any_parameter_takes_a_path_with_its_gradient(model):
    """Even when only the token-index scales or the inner LN bias train, the path chosen is one that
    trains (the compiled training scan) and they get their gradients, equal to the torch path's."""
    expected = f"cpu_ttt_{model}"
    for trained in ("learnable_token_idx", "ttt_norm_bias"):
        torch.manual_seed(0)
        layer = TTTLayer(16, 2, inner_model=model, mini_batch_size=4)
        reference = TTTLayer(16, 2, inner_model=model, mini_batch_size=4, kernel="torch")
        reference.load_state_dict(layer.state_dict())
        x = torch.randn(1, 8, 16)
        for module in (layer, reference):
            for name, p in module.named_parameters():
                p.requires_grad_(name == trained)
            y, _ = module(x)
            y.square().sum().backward()
        assert layer.last_dispatch[0] == expected, (trained, layer.last_dispatch)
        torch.testing.assert_close(getattr(layer, trained).grad, getattr(reference, trained).grad)


@pytest.mark.usefixtures("cpu_kernels")
@pytest.mark.parametrize("switch", ["inner_residual", "inner_norm"])
def test_forcing_the_kernel_on_a_layer_without_its_fused_parts_is_an_error(switch):
    """Refused when the layer is built (its arguments cannot work together), not at its first call."""
    with pytest.raises(
        ValueError,
        match=f"fuses the inner LayerNorm and residual, which need both on; this layer has.*{switch}=False",
    ):
        TTTLayer(16, 2, mini_batch_size=4, kernel="cpu_ttt_linear", **{switch: False})


@pytest.mark.parametrize(
    ("tokens", "mini_batch_size", "update_rule", "recorded"),
    [
        (8, 3, "dual_form", "a part of 2 tokens inside a mini-batch"),  # two whole mini-batches, then 2
        (6, 16, "dual_form", "a part of 6 tokens inside a mini-batch"),  # no whole mini-batch at all
        (8, 4, "minibatch_gd", "minibatch_gd is the primal form"),
    ],
)
def test_every_part_of_a_call_is_in_dispatches(tokens, mini_batch_size, update_rule, recorded) -> None:
    layer = TTTLayer(16, 2, mini_batch_size=mini_batch_size, update_rule=update_rule)
    with torch.no_grad():
        layer(torch.randn(1, tokens, 16))
    assert layer.last_dispatch[0] == "torch" and recorded in layer.last_dispatch[1]


# Review s13 (moved from tests/core/test_review_s13_paths.py, where it started a child process of its own)
@pytest.mark.triton_interpreter
@pytest.mark.slow  # the interpreter's child process
def test_a_double_backward_layer_runs_a_named_triton_kernel_without_a_graph():
    torch.manual_seed(0)
    reference = TTTLayer(32, 2, mini_batch_size=4, kernel="torch")
    layer = TTTLayer(32, 2, mini_batch_size=4, kernel="triton_ttt_linear", needs_double_backward=True)
    layer.load_state_dict(reference.state_dict())
    x = torch.randn(1, 8, 32)
    with torch.no_grad():
        y, _ = layer(x)
        want, _ = reference(x)
    assert layer.dispatches[0][0] == "triton_ttt_linear", layer.dispatches
    error = ((y - want).norm() / want.norm()).item()
    assert error < 1e-5, error


def _transposed_or_every_second_token(x: torch.Tensor, how: str) -> torch.Tensor:
    """``x`` (float64) as a float32 non-contiguous input: transposed storage, or every second token."""
    if how == "transposed":
        return x.float().transpose(0, 1).contiguous().transpose(0, 1)
    T = x.shape[1]
    return torch.zeros(x.shape[0], 2 * T, x.shape[2]).index_copy_(1, torch.arange(0, 2 * T, 2), x.float())[
        :, ::2
    ]


# Review s22 (moved from tests/core/test_review_s22_shapes.py, where it started a child process of its own;
# that file's docstring says how its bounds were measured: Triton within FACTOR 10 of the torch path's own
# float32 error against float64, floor 1e-6)
@pytest.mark.triton_interpreter
@pytest.mark.slow  # the interpreter's child process
def test_triton_interpreter_paths_match_float64():
    for model, K, T, how in [("linear", 4, 9, "strided"), ("mlp", 2, 5, "transposed")]:
        torch.manual_seed(0)
        base = TTTLayer(16, 1, inner_model=model, mini_batch_size=K, kernel="torch")
        with torch.no_grad():
            for p in base.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        ref = copy.deepcopy(base).double()
        x = torch.randn(2, T, 16, dtype=torch.float64)
        y_ref, s_ref = ref(x)
        errors = {}
        for kernel in ["torch", f"triton_ttt_{model}"]:
            layer = copy.deepcopy(base)
            layer.kernel = kernel
            xx = _transposed_or_every_second_token(x, how)
            xx.requires_grad_()
            y, s = layer(xx)
            (gx,) = torch.autograd.grad((y.double() ** 2).sum(), xx)
            xr = x.clone().requires_grad_()
            (gr,) = torch.autograd.grad((ref(xr)[0] ** 2).sum(), xr)
            errors[kernel] = max(
                (y.double() - y_ref).norm() / y_ref.norm(), (gx.double() - gr).norm() / gr.norm()
            ).item()
            assert kernel == "torch" or any(p == kernel for p, _ in layer.dispatches), layer.dispatches
        assert errors[f"triton_ttt_{model}"] <= 10 * max(errors["torch"], 1e-6), errors
