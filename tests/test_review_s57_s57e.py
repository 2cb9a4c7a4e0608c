"""Review s57e: the public layers on shapes and configs the other tests do not name, against references.

Each example (of 4: the kernels' first-use checks make each one cost seconds) builds a layer through its public constructor (TTTLayer and the four family members) with
a head width the other tests leave out (1, 3 and 17 for the family, whose heads need no RoPE pairs; 6
and 10 for TTTLayer), a mini-batch that does not divide the sequence or is longer than it, and cuts
that fall inside a mini-batch. The reference is the same layer on ``kernel="torch"`` in float64 over the
whole sequence; every kernel the layer takes on a CPU (the C++ kernels, the fused torch ones,
``delta_chunk``; the compiled ones: see CPU_KERNELS) must give its outputs and final state, whole and cut, and under
``inference_mode`` read in chunks of ``inference_chunk_size`` tokens.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from innerloop import TTTLayer
from innerloop.core.family_layers import DeltaNetLayer, GatedDeltaNetLayer, LinearAttentionLayer, TitansLayer
from innerloop.testing import FLOAT64_TOLERANCE
from innerloop.testing.checks import run_layer_in_chunks

#: compiled_torch_* are left out: torch.compile on a CPU compiles for each new shape (tens of seconds in
#: a sweep); they were swept outside the suite (review s57e's report) and have their own tests.
CPU_KERNELS = (
    "cpu_ttt_linear",
    "cpu_ttt_mlp",
    "fused_torch_linear",
    "fused_torch_mlp",
    "delta_chunk",
)


def _member(draw: st.DrawFn) -> tuple[type, dict]:
    """A family member and its options, with a head width of 1, 3 or 17 (2 at least where LN is on)."""
    name = draw(st.sampled_from(["linear_attention", "deltanet", "gated_deltanet", "titans"]))
    head_dim = draw(st.sampled_from([3, 17] if name == "titans" else [1, 3, 17]))
    heads = draw(st.sampled_from([1, 3]))
    options: dict = {"hidden_size": head_dim * heads, "num_heads": heads}
    if name in ("linear_attention", "titans"):
        options["mini_batch_size"] = draw(st.sampled_from([1, 3, 5, 64]))
    if name == "titans":
        options["inner_model"] = draw(st.sampled_from(["matrix", "mlp"]))
    layer_class = {
        "linear_attention": LinearAttentionLayer,
        "deltanet": DeltaNetLayer,
        "gated_deltanet": GatedDeltaNetLayer,
        "titans": TitansLayer,
    }[name]
    return layer_class, options


def _ttt(draw: st.DrawFn) -> tuple[type, dict]:
    """TTTLayer with a head width of 6 or 10 (RoPE needs an even one), any inner model, loss and rule."""
    heads = draw(st.sampled_from([1, 3]))
    return TTTLayer, {
        "hidden_size": draw(st.sampled_from([6, 10])) * heads,
        "num_heads": heads,
        "inner_model": draw(st.sampled_from(["linear", "mlp", "matrix"])),
        "inner_loss": draw(st.sampled_from(["reconstruction", "dot_product", "next_token"])),
        "update_rule": draw(st.sampled_from(["dual_form", "minibatch_gd", "momentum"])),
        "mini_batch_size": draw(st.sampled_from([1, 3, 5, 64])),
        "share_qk": draw(st.booleans()),
        "use_gate": draw(st.booleans()),
    }


@st.composite
def layer_cases(draw: st.DrawFn) -> tuple[type, dict, int, list[int]]:
    layer_class, options = _ttt(draw) if draw(st.booleans()) else _member(draw)
    tokens = draw(st.sampled_from([7, 13]))
    cuts = draw(st.lists(st.integers(1, tokens - 1), min_size=1, max_size=3, unique=True).map(sorted))
    return layer_class, options, tokens, cuts


def _layers(layer_class: type, options: dict, seed: int) -> list[tuple[str, torch.nn.Module]]:
    """The layer on kernel='torch' in float64, then on every CPU kernel it takes, with its weights."""
    torch.manual_seed(seed)
    reference = layer_class(**options, kernel="torch").double()
    built = [("torch", reference)]
    for kernel in CPU_KERNELS:
        try:
            layer = layer_class(**options, kernel=kernel).double()
        except ValueError as error:  # a kernel the layer does not take is refused by name, at construction
            assert kernel in str(error), str(error)
            continue
        layer.load_state_dict(reference.state_dict())
        built.append((kernel, layer))
    return built


def _assert_state_close(actual, expected, what: str) -> None:
    assert sorted(actual.params) == sorted(expected.params), what
    for name, tensor in expected.params.items():
        torch.testing.assert_close(actual.params[name], tensor, atol=FLOAT64_TOLERANCE, rtol=0, msg=what)


@pytest.mark.slow  # 4 examples of up to 6 layers each, whole, cut and chunked: about 10 s
@settings(max_examples=4, deadline=None)
@given(case=layer_cases(), seed=st.integers(0, 2**16))
def test_every_kernel_whole_cut_and_chunked_equals_the_float64_torch_path(case, seed: int) -> None:
    layer_class, options, tokens, cuts = case
    x = torch.randn(
        2, tokens, options["hidden_size"], dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
    )
    layers = _layers(layer_class, options, seed)
    expected, expected_state = layers[0][1](x)
    for kernel, layer in layers:
        what = f"{layer_class.__name__}({options}) kernel={kernel!r}"
        whole, state = layer(x)
        torch.testing.assert_close(whole, expected, atol=FLOAT64_TOLERANCE, rtol=0, msg=what)
        _assert_state_close(state, expected_state, what)
        cut, cut_state = run_layer_in_chunks(layer, x, cuts)
        torch.testing.assert_close(cut, expected, atol=FLOAT64_TOLERANCE, rtol=0, msg=f"{what} cut at {cuts}")
        _assert_state_close(cut_state, expected_state, f"{what} cut at {cuts}")
        chunked = copy.deepcopy(layer)
        chunked.inference_chunk_size = cuts[0]
        with torch.inference_mode():
            read, read_state = chunked(x)
        torch.testing.assert_close(
            read, expected, atol=FLOAT64_TOLERANCE, rtol=0, msg=f"{what} chunks of {cuts[0]}"
        )
        _assert_state_close(read_state, expected_state, f"{what} chunks of {cuts[0]}")
