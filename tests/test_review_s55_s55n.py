"""Review s55n: hostile inputs at the public entry points (a generator walked every public callable's
signature with one hostile value per parameter; these are the kinds it found)."""

from __future__ import annotations

import pytest
import torch

from innerloop.models import SwiGLU
from innerloop.testing import causal_linear_attention


@pytest.mark.parametrize(
    ("hidden_size", "intermediate_size", "named"),
    [
        (None, 8, "hidden_size"),
        (True, 8, "hidden_size"),
        (0, 8, "hidden_size"),
        (-1, 8, "hidden_size"),
        (4.0, 8, "hidden_size"),
        (4, "8", "intermediate_size"),
        (4, 0, "intermediate_size"),
        (4, False, "intermediate_size"),
    ],
)
def test_swiglu_refuses_sizes_naming_the_argument(hidden_size, intermediate_size, named):
    """SwiGLU(None, 8) failed inside nn.Linear ("empty(): argument 'size' ...") and SwiGLU(0, 8) or
    SwiGLU(True, 8) built a layer of width 0 or 1: its siblings (CausalDepthwiseConv, CausalSelfAttention)
    refuse these naming the argument."""
    with pytest.raises(ValueError, match=named):
        SwiGLU(hidden_size, intermediate_size)


def test_swiglu_numpy_and_tensor_sizes_are_read_as_ints():
    import numpy as np

    layer = SwiGLU(np.int64(4), torch.tensor(6))
    assert layer.gate_proj.weight.shape == (6, 4)


@pytest.mark.parametrize(
    ("x", "error", "message"),
    [
        (None, TypeError, "x must be a torch.Tensor"),
        (torch.zeros(2, 3, 4, dtype=torch.long), TypeError, "x must be a floating-point tensor"),
        (torch.zeros(2, 3, 4, dtype=torch.float64), TypeError, "x is torch.float64"),
        (torch.zeros(2, 3, 5), ValueError, r"x must have .*hidden_size=4.*got \(2, 3, 5\)"),
        (torch.zeros(()), ValueError, r"x must have .*hidden_size=4.*got \(\)"),
    ],
)
def test_swiglu_forward_names_x(x, error, message):
    """SwiGLU's forward raised torch's 'expected m1 and m2 to have the same dtype' or 'linear(): argument
    'input' must be Tensor, not NoneType', naming neither x nor what the layer takes."""
    with pytest.raises(error, match=message):
        SwiGLU(4, 6)(x)


def test_swiglu_forward_keeps_any_leading_shape():
    """Checked inputs of any leading shape still run (an MLP maps the last dim only)."""
    layer = SwiGLU(4, 6)
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(layer(x.reshape(6, 4)), layer(x).reshape(6, 4), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["query", "key", "value"])
@pytest.mark.parametrize("dtype", [torch.long, torch.float16])
def test_causal_linear_attention_names_the_tensor_of_another_dtype(name, dtype):
    """causal_linear_attention(q.long(), k, v) raised torch's 'expected scalar type Long but found Float'
    from its matmul, naming no argument."""
    tensors = {n: torch.randn(1, 2, 5, 3) for n in ("query", "key", "value")}
    tensors[name] = tensors[name].to(dtype)
    with pytest.raises(TypeError, match=f"{name} is {dtype}"):
        causal_linear_attention(**tensors)


def _block(mixer: str = "ttt"):
    from innerloop.models import Block, ModelConfig, TTTConfig

    config = ModelConfig(
        mixer=mixer, vocab_size=32, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16,
        window=4, ttt=TTTConfig(mini_batch_size=4),
    )  # fmt: skip
    return Block(config)


@pytest.mark.parametrize(
    ("h", "error", "message"),
    [
        (None, TypeError, "h must be a torch.Tensor"),
        (torch.zeros(2, 3, 8, dtype=torch.long), TypeError, "h must be a floating-point tensor"),
        (torch.zeros(2, 3, 8, dtype=torch.float64), TypeError, "h is torch.float64"),
        (torch.zeros(3, 8), ValueError, r"h must have shape \[B, T, hidden_size=8\], got \(3, 8\)"),
        (torch.zeros(2, 3, 5), ValueError, r"h must have shape \[B, T, hidden_size=8\], got \(2, 3, 5\)"),
    ],
)
@pytest.mark.parametrize("mixer", ["ttt", "swa"])
def test_block_forward_names_h(mixer, h, error, message):
    """Block(config)(h) with an integer h failed in torch's rms_norm ('"rms_norm" not implemented for
    'Long''), and with h of another width or rank in the mixer as 'x must have shape ...': no message named
    the argument given, h."""
    with pytest.raises(error, match=message):
        _block(mixer)(h)


def test_e2e_lm_runs_an_empty_batch_as_causal_lm_does():
    """CausalLM(input_ids [0, T]) returns logits [0, T, V]; E2ELM raised torch's 'amax(): Expected
    reduction dim to be specified for input.numel() == 0' from its inner-step magnitude check (the
    largest |h| of no element). Now an empty batch has magnitude 0 and runs, in whole and in pieces."""
    from innerloop.models import E2ELM

    model = E2ELM(
        dict(
            mixer="e2e", vocab_size=16, hidden_size=8, num_layers=2, num_heads=2, intermediate_size=8,
            window=4, e2e=dict(chunk_size=4),
        )
    )  # fmt: skip
    logits, state = model(torch.zeros(0, 9, dtype=torch.long))
    assert logits.shape == (0, 9, 16)
    logits, _ = model(torch.zeros(0, 3, dtype=torch.long), state)
    assert logits.shape == (0, 3, 16)


def _naive_arguments():
    from innerloop.testing import make_problem

    problem = make_problem(
        "linear", "reconstruction", batch=2, heads=2, head_dim=3, tokens=6, mini_batch_size=4
    )
    return dict(state=problem.state, task=problem.task, views=problem.views, lr=problem.lr, tau=problem.tau)


@pytest.mark.parametrize(
    ("name", "bad", "message"),
    [
        ("lr", lambda a: a["lr"][:, :, :3], r"lr must be a floating-point tensor \[B, H, T\].*\(2, 2, 6\), got torch.float64 \(2, 2, 3\)"),
        ("lr", lambda a: a["lr"][0], r"lr must be .*got torch.float64 \(2, 6\)"),
        ("lr", lambda a: (a["lr"] * 10).long(), r"lr must be a floating-point tensor .*got torch.int64"),
        ("lr", lambda a: None, r"lr must be a torch.Tensor"),
        ("tau", lambda a: a["tau"][:2], r"tau must be a floating-point tensor \[mini_batch_size\] = \(4,\), got torch.float64 \(2,\)"),
        ("decay", lambda a: a["lr"][:, :1], r"decay must be .*\[B, H, T\].*got torch.float64 \(2, 1, 6\)"),
        ("momentum", lambda a: a["lr"][..., :5], r"momentum must be .*got torch.float64 \(2, 2, 5\)"),
    ],
)  # fmt: skip
def test_naive_token_loop_names_a_gate_of_the_wrong_shape(name, bad, message):
    """innerloop.testing.naive_token_loop (the token-by-token oracle) took lr, tau, decay and momentum
    unchecked: lr [B, H, 3] for 6 tokens failed as 'IndexError: index 3 is out of bounds for dimension 2',
    tau [2] for mini-batches of 4 as 'index 2 is out of bounds', an integer lr ran with truncated rates."""
    arguments = _naive_arguments()
    arguments[name] = bad(arguments)
    from innerloop.testing import naive_token_loop

    with pytest.raises((TypeError, ValueError), match=message):
        naive_token_loop(**arguments)


@pytest.mark.slow  # two token-by-token loops with autograd: 0.6 s on the loaded machine
def test_naive_token_loop_still_takes_legal_gates():
    from innerloop.testing import naive_token_loop

    arguments = _naive_arguments()
    outputs, _ = naive_token_loop(**arguments, decay=arguments["lr"] * 0)
    reference, _ = naive_token_loop(**arguments)
    torch.testing.assert_close(outputs, reference, rtol=0, atol=0)


def test_run_layer_in_chunks_names_a_layer_that_cannot_be_called():
    """run_layer_in_chunks(None, x, ...) raised "'NoneType' object is not callable" from its loop."""
    from innerloop.testing import run_layer_in_chunks

    with pytest.raises(
        TypeError, match=r"run_layer_in_chunks: layer must be a callable module.*got NoneType"
    ):
        run_layer_in_chunks(None, torch.zeros(1, 4, 8), [2])


@pytest.mark.parametrize("config", [None, [("hidden_size", 8)], "hidden_size=8"])
def test_twin_layers_names_a_config_that_is_not_a_mapping(config):
    """twin_layers(None, ...) raised 'TTTLayer() argument after ** must be a mapping, not NoneType'."""
    from innerloop.testing import twin_layers

    with pytest.raises(TypeError, match=r"twin_layers: config must be a mapping of TTTLayer's arguments"):
        twin_layers(config, seed=0, kernel="torch")
