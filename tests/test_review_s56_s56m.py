"""Review s56m: the invariances of every mixer, under hypothesis, at shapes the suite's property tests did
not draw.

Before this file the hypothesis tests drew ``TTTLayer`` configs (``layer_configs``: even head dims 4 to 8,
batch 2, no empty pieces) and the CPU kernels' layers (one cut, batch 1); the family's layers (linear
attention, DeltaNet, Gated DeltaNet, Titans, the generic ``FamilyLayer``), attention's KV cache, TTT-E2E
and the language models were checked at a few fixed shapes only. Drawn here: odd head dims and head dim
1 (the family has no RoPE), mini-batches ``K = 1`` and ``K > T``, batches of 1 to 4, every family option
(short convs and their kernel, feature maps, activations, the output gate), inference chunking, several
cuts in a row with empty pieces among them, prefill then one token at a time, each with and without
autograd; E2E windows, chunk sizes, trained-block fractions and its inner-loop options; and the states'
handling (another layer's, another batch's or dtype's state, a state after a ``NonFiniteRowsError``, a
state read twice, rows selected and joined) and the gradient through a carried state.

Tolerance: 1e-10 relative RMS (``FLOAT64_TOLERANCE``), float64 throughout. Measured worst cases (CPU,
float64, relative max-abs): family layers 8.5e-11 over 300 random configs (Titans' MLP memory on 14
tokens, the inner LayerNorm's division amplifying rounding), 2.6e-11 over 200 with inference chunks and
up to 40 tokens, the delta rule's chunked kernel across 64-token chunk boundaries 2.0e-14; ``TTTLayer``
on every kernel with gates 2.7e-12; the language models of every mixer 4.4e-14, TTT-E2E with all its
options 1.0e-13. Every one of them ten or more times inside the tolerance, and a wrong carry (a dropped
pending sum, conv history or decay product) is an O(1) error.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from innerloop import TTTLayer
from innerloop.core.family_layers import (
    DeltaNetLayer,
    FamilyLayer,
    GatedDeltaNetLayer,
    LinearAttentionLayer,
    TitansLayer,
)
from innerloop.core.layer import NonFiniteRowsError
from innerloop.models import ModelConfig, build_model
from innerloop.models.config import E2EConfig, FamilyConfig, TTTConfig
from innerloop.testing.checks import FLOAT64_TOLERANCE, assert_close
from innerloop.testing.strategies import GatedTTTLayer, seeds

MEMBERS = ("titans", "titans_mlp", "gated_deltanet", "deltanet", "linear_attention", "family")
MIXERS = ("ttt", "attention", "swa", "linear_attention", "deltanet", "gated_deltanet", "titans", "e2e")


# ---- helpers --------------------------------------------------------------------------------------


def _perturbed(layer: torch.nn.Module, seed: int, scale: float = 0.3) -> torch.nn.Module:
    """``layer`` in float64 with every parameter moved off its init, so that every term counts."""
    layer = layer.double()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return layer


def _family_layer(member: str, width: int, heads: int, mini_batch: int, **options) -> FamilyLayer:
    builders = {
        "linear_attention": lambda: LinearAttentionLayer(width, heads, mini_batch_size=mini_batch, **options),
        "deltanet": lambda: DeltaNetLayer(width, heads, **options),
        "gated_deltanet": lambda: GatedDeltaNetLayer(width, heads, **options),
        "titans": lambda: TitansLayer(width, heads, mini_batch_size=mini_batch, **options),
        "titans_mlp": lambda: TitansLayer(
            width, heads, inner_model="mlp", mini_batch_size=mini_batch, **options
        ),
        "family": lambda: FamilyLayer(width, heads, mini_batch_size=mini_batch, **options),
    }
    return builders[member]()


@st.composite
def family_options(draw: st.DrawFn, member: str) -> dict:
    """The options a member takes (linear attention has no short convs or activations)."""
    if member == "linear_attention":
        return {"feature_map": draw(st.sampled_from(["elementwise_product", "identity", "elu", "relu"]))}
    short_conv = draw(st.booleans())
    options = {
        "short_conv": short_conv,
        "qk_activation": draw(st.sampled_from(["silu", "identity"])),
        "feature_map": draw(st.sampled_from(["identity", "elu", "relu", "elementwise_product"])),
        "output_gate": draw(st.booleans()),
    }
    if short_conv:
        options["conv_kernel"] = draw(st.integers(1, 5))
    if member == "family":  # the generic layer: any rule and inner model it runs (no inner norm: head dim 1)
        options["update_rule"] = draw(st.sampled_from(["dual_form", "minibatch_gd"]))
        options["inner_model"] = draw(st.sampled_from(["matrix", "linear"]))
        options["inner_residual"] = draw(st.booleans())
    return options


def _pieces(draw: st.DrawFn, tokens: int, max_cuts: int = 4) -> list[int]:
    """Bounds ``[0, ..., tokens]`` of pieces read one after the other: cuts anywhere, repeats (empty
    pieces) and cuts at 0 or ``tokens`` included."""
    cuts = draw(st.lists(st.integers(0, tokens), max_size=max_cuts))
    return [0, *sorted(cuts), tokens]


def _read_in_pieces(call, inputs: torch.Tensor, bounds: list[int], state=None):
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        output, state = call(inputs[:, start:end], state)
        outputs.append(output)
    return torch.cat(outputs, dim=1), state


def _assert_states_equal(actual, expected, what: str) -> None:
    """Every tensor of two layer states (``tensors()``) within the float64 tolerance, and the positions."""
    actual_tensors, expected_tensors = actual.tensors(), expected.tensors()
    assert set(actual_tensors) == set(expected_tensors), what
    for name, tensor in expected_tensors.items():
        if tensor.is_floating_point() and tensor.numel():
            assert_close(actual_tensors[name], tensor, f"{what}: {name}", FLOAT64_TOLERANCE)
    assert actual.position == expected.position, what


def _tiny_model(mixer: str, seed: int, window: int = 4, **sections) -> torch.nn.Module:
    options = {
        "mixer": mixer,
        "vocab_size": 13,
        "hidden_size": 8,
        "num_heads": 2,
        "num_layers": 2,
        "intermediate_size": 6,
        "window": window,
        "init_std": 0.3,
        **sections,
    }
    if mixer == "e2e" and "e2e" not in options:
        options["e2e"] = E2EConfig(chunk_size=3, suffix_fraction=0.5, inner_lr_warmup_fraction=0.0)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a one-chunk E2E warns; the numbers are what is checked
        return build_model(ModelConfig(**options)).double()


# ---- 2. any split (empty pieces too) = the whole, for every mixer ---------------------------------


@settings(max_examples=6, deadline=None)
@given(
    member=st.sampled_from(MEMBERS),
    heads=st.integers(1, 3),
    head_dim=st.sampled_from([3, 1, 2, 5, 7]),
    mini_batch=st.sampled_from([3, 1, 2, 5, 16]),
    batch=st.integers(1, 4),
    tokens=st.integers(1, 14),
    chunked=st.sampled_from([None, 1, 2, 5]),
    grad=st.booleans(),
    seed=seeds(),
    data=st.data(),
)
@pytest.mark.slow  # 0.5 s of CPU (6 examples; 4.6 s of wall on the shared, loaded machine)
def test_a_family_layer_read_in_any_pieces_equals_the_whole(
    member, heads, head_dim, mini_batch, batch, tokens, chunked, grad, seed, data
):
    """Outputs and state (inner weights, momentum, decay product, conv histories, position) of any cut,
    empty pieces included, with or without autograd and inference chunks, = one call."""
    if member.startswith("titans") and head_dim < 2:
        head_dim = 2  # Titans' inner LayerNorm needs two features (refused by name below that)
    options = data.draw(family_options(member))
    if chunked:
        options["inference_chunk_size"] = chunked
    torch.manual_seed(seed % 1000)
    layer = _perturbed(_family_layer(member, heads * head_dim, heads, mini_batch, **options), seed % 1000)
    x = torch.randn(
        batch, tokens, heads * head_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
    )
    bounds = _pieces(data.draw, tokens)
    with torch.set_grad_enabled(grad):
        whole, whole_state = layer(x)
        pieces, pieces_state = _read_in_pieces(layer, x, bounds)
    assert_close(pieces, whole, f"{member} cut at {bounds}", FLOAT64_TOLERANCE)
    _assert_states_equal(pieces_state, whole_state, f"{member} cut at {bounds}")


@settings(max_examples=10, deadline=None)
@given(
    model=st.sampled_from(["linear", "mlp"]),
    kernel_choice=st.sampled_from(["cpu", "auto", "torch"]),
    heads=st.integers(1, 3),
    head_dim=st.sampled_from([4, 2, 6, 10]),
    mini_batch=st.sampled_from([3, 1, 2, 5, 16]),
    batch=st.integers(1, 4),
    tokens=st.integers(1, 20),
    chunked=st.sampled_from([None, 1, 3, 7]),
    share_qk=st.booleans(),
    use_gate=st.booleans(),
    seed=seeds(),
    data=st.data(),
)
@pytest.mark.slow  # 0.1 s of CPU, 3.8 s of wall on the shared, loaded machine
def test_a_ttt_layer_on_each_cpu_kernel_read_in_any_pieces_equals_the_whole(
    model, kernel_choice, heads, head_dim, mini_batch, batch, tokens, chunked, share_qk, use_gate, seed, data
):
    """The compiled CPU kernels (``cpu_ttt_linear`` / ``cpu_ttt_mlp``, inference only) with the state
    carried through several cuts, empty pieces and inference chunks included: the whole call's numbers."""
    kernel = f"cpu_ttt_{model}" if kernel_choice == "cpu" else kernel_choice
    config = {"inner_model": model, "mini_batch_size": mini_batch, "share_qk": share_qk, "use_gate": use_gate}
    if chunked:
        config["inference_chunk_size"] = chunked
    torch.manual_seed(seed % 1000)
    layer = _perturbed(TTTLayer(heads * head_dim, heads, kernel=kernel, **config), seed % 1000, scale=0.1)
    x = torch.randn(
        batch, tokens, heads * head_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
    )
    bounds = _pieces(data.draw, tokens, max_cuts=5)
    with torch.no_grad():
        whole, whole_state = layer(x)
        pieces, pieces_state = _read_in_pieces(layer, x, bounds)
    assert_close(pieces, whole, f"{kernel} cut at {bounds}", FLOAT64_TOLERANCE)
    _assert_states_equal(pieces_state, whole_state, f"{kernel} cut at {bounds}")


@settings(max_examples=8, deadline=None)
@given(
    mixer=st.sampled_from(MIXERS),
    backbone=st.sampled_from(["transformer", "mamba"]),
    window=st.integers(1, 7),
    inner_mini_batch=st.integers(1, 5),
    batch=st.integers(1, 3),
    tokens=st.integers(1, 14),
    grad=st.booleans(),
    seed=seeds(),
    data=st.data(),
)
@pytest.mark.slow  # 0.13 s of CPU, 5 s of wall on the shared, loaded machine
def test_a_language_model_of_any_mixer_read_in_any_pieces_equals_the_whole(
    mixer, backbone, window, inner_mini_batch, batch, tokens, grad, seed, data
):
    sections = {}
    if mixer == "ttt":
        sections["ttt"] = TTTConfig(mini_batch_size=inner_mini_batch)
    elif mixer == "titans":
        sections["family"] = FamilyConfig(mini_batch_size=inner_mini_batch)
    if mixer != "e2e":
        sections["backbone"] = backbone
    model = _tiny_model(mixer, seed % 1000, window=window, **sections)
    ids = torch.randint(13, (batch, tokens), generator=torch.Generator().manual_seed(seed))
    bounds = _pieces(data.draw, tokens)
    with torch.set_grad_enabled(grad):
        whole, _ = model(ids)
        pieces, _ = _read_in_pieces(model, ids, bounds)
    assert_close(pieces, whole, f"{mixer} ({backbone}, window {window}) cut at {bounds}", FLOAT64_TOLERANCE)


@settings(max_examples=8, deadline=None)
@given(
    chunk_size=st.integers(2, 5),
    suffix_fraction=st.sampled_from([0.25, 0.34, 0.5, 1.0]),
    num_layers=st.integers(1, 4),
    window=st.integers(1, 7),
    chunk_targets=st.sampled_from(["next_token", "within_chunk"]),
    rope_positions=st.sampled_from(["relative", "absolute"]),
    inner_grad_clip=st.sampled_from([1.0, 0.0, 0.01]),
    test_time_training=st.booleans(),
    skip_target_id=st.sampled_from([None, 0]),
    tokens=st.integers(1, 16),
    seed=seeds(),
    data=st.data(),
)
@pytest.mark.slow  # 0.12 s of CPU, 3.2 s of wall on the shared, loaded machine
def test_ttt_e2e_read_in_any_pieces_equals_the_whole_for_its_options(
    chunk_size, suffix_fraction, num_layers, window, chunk_targets, rope_positions, inner_grad_clip,
    test_time_training, skip_target_id, tokens, seed, data,
):  # fmt: skip
    """Pieces that end inside a chunk, on a chunk's last token (scored, not yet trained on), or are
    empty; any share of trained blocks and window against the chunk size."""
    e2e = E2EConfig(
        chunk_size=chunk_size, suffix_fraction=suffix_fraction, inner_lr_warmup_fraction=0.0,
        chunk_targets=chunk_targets, rope_positions=rope_positions, inner_grad_clip=inner_grad_clip,
        test_time_training=test_time_training, skip_target_id=skip_target_id,
    )  # fmt: skip
    model = _tiny_model("e2e", seed % 1000, window=window, num_layers=num_layers, e2e=e2e)
    ids = torch.randint(13, (2, tokens), generator=torch.Generator().manual_seed(seed))
    bounds = _pieces(data.draw, tokens)
    with torch.no_grad():
        whole, _ = model(ids)
        pieces, _ = _read_in_pieces(model, ids, bounds)
    assert_close(pieces, whole, f"E2E cut at {bounds}", FLOAT64_TOLERANCE)


@settings(max_examples=6, deadline=None)
@given(mixer=st.sampled_from(MIXERS), prefill=st.integers(0, 9), decode=st.integers(1, 6), seed=seeds())
@pytest.mark.slow  # 0.1 s of CPU, up to 9 s of wall on the shared, loaded machine
def test_prefill_of_any_length_then_one_token_at_a_time_equals_the_whole(mixer, prefill, decode, seed):
    model = _tiny_model(mixer, seed % 1000, window=3)
    ids = torch.randint(13, (2, prefill + decode), generator=torch.Generator().manual_seed(seed))
    bounds = [0, *range(prefill, prefill + decode + 1)]
    with torch.no_grad():
        whole, _ = model(ids)
        stepped, _ = _read_in_pieces(model, ids, bounds)
    assert_close(stepped, whole, f"{mixer}: prefill {prefill} + decode {decode}", FLOAT64_TOLERANCE)


# ---- dual form = primal form = token by token, at the layer, with forgetting gates ---------------


@settings(max_examples=8, deadline=None)
@given(
    model=st.sampled_from(["linear", "mlp", "matrix"]),
    loss=st.sampled_from(["reconstruction", "next_token"]),
    heads=st.integers(1, 3),
    head_dim=st.sampled_from([4, 2, 6]),
    mini_batch=st.sampled_from([3, 1, 2, 5, 8]),
    tokens=st.integers(1, 12),
    wrapping=st.sampled_from([(True, True), (False, False), (True, False), (False, True)]),
    seed=seeds(),
)
@pytest.mark.slow  # 1.1 s of CPU: each example runs four layers, two token by token
def test_dual_equals_primal_equals_token_by_token_with_a_decay_gate(
    model, loss, heads, head_dim, mini_batch, tokens, wrapping, seed
):
    """GatedTTTLayer's decay gate (per token and head, of the input): the dual form = the primal form =
    each one fed a token per call. (K > T and T % K != 0 are drawn.)"""
    inner_norm, inner_residual = wrapping
    config = dict(
        inner_model=model, inner_loss=loss, mini_batch_size=mini_batch, momentum_gate=False,
        inner_norm=inner_norm and head_dim > 2, inner_residual=inner_residual,
    )  # fmt: skip
    x = torch.randn(
        2, tokens, heads * head_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
    )
    outputs = {}
    for rule in ("dual_form", "minibatch_gd"):
        torch.manual_seed(seed % 1000)
        layer = _perturbed(
            GatedTTTLayer(heads * head_dim, heads, update_rule=rule, **config), seed % 1000, 0.1
        )
        with torch.no_grad():
            outputs[rule] = layer(x)[0]
            outputs[f"{rule} token by token"] = _read_in_pieces(layer, x, list(range(tokens + 1)))[0]
    for name, output in outputs.items():
        assert_close(output, outputs["minibatch_gd"], f"{name} vs primal", FLOAT64_TOLERANCE)


# ---- 3. state handling -----------------------------------------------------------------------------

LAYERS = {
    "ttt": lambda: TTTLayer(8, 2, mini_batch_size=3),
    "ttt_cpu_linear": lambda: TTTLayer(8, 2, mini_batch_size=3, kernel="cpu_ttt_linear"),
    "ttt_cpu_mlp": lambda: TTTLayer(8, 2, inner_model="mlp", mini_batch_size=3, kernel="cpu_ttt_mlp"),
    "ttt_k4": lambda: TTTLayer(8, 2, mini_batch_size=4),
    "ttt_share_qk": lambda: TTTLayer(8, 2, mini_batch_size=3, share_qk=True),
    "ttt_momentum": lambda: GatedTTTLayer(8, 2, update_rule="momentum", mini_batch_size=3),
    "linear_attention": lambda: LinearAttentionLayer(8, 2, mini_batch_size=3),
    "deltanet": lambda: DeltaNetLayer(8, 2),
    "deltanet_conv2": lambda: DeltaNetLayer(8, 2, conv_kernel=2),
    "gated_deltanet": lambda: GatedDeltaNetLayer(8, 2),
    "titans": lambda: TitansLayer(8, 2, mini_batch_size=3),
    "titans_mlp": lambda: TitansLayer(8, 2, inner_model="mlp", mini_batch_size=3),
}


def _layer(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return _perturbed(LAYERS[name](), seed=1, scale=0.1)


X = torch.randn(3, 7, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))


#: Layers of one model that differ in how they compute it alone (the kernel): their states are one.
SAME_MODEL = {"ttt": "ttt_cpu_linear", "ttt_cpu_linear": "ttt"}


@pytest.mark.parametrize("given_by", list(LAYERS))
def test_a_state_of_another_layer_config_is_refused_by_name(given_by):
    """Each layer's state passed to every other one of the same width: refused, never read (they differ in
    rule, model, mini-batch, convolution history or the member's recurrence); a layer of the same model on
    another kernel goes on from it to the whole call's numbers."""
    with torch.no_grad():
        _, state = _layer(given_by)(X[:, :4])
        for name in LAYERS:
            if name == given_by:
                continue
            if SAME_MODEL.get(given_by) == name:
                whole, _ = _layer(name)(X)
                assert_close(_layer(name)(X[:, 4:], state)[0], whole[:, 4:], name, FLOAT64_TOLERANCE)
                continue
            with pytest.raises((ValueError, TypeError), match=r"state"):
                _layer(name)(X[:, 4:], state)


@pytest.mark.parametrize("name", list(LAYERS))
def test_a_state_of_another_batch_size_or_dtype_is_refused_by_name(name):
    layer = _layer(name)
    with torch.no_grad():
        _, state = layer(X[:, :4])
        with pytest.raises(ValueError, match=r"batch size 3.*has 1|batch"):
            layer(X[:1, 4:], state)
        with pytest.raises(
            TypeError,
            match=r"state tensor .* is torch.float32 but the layer keeps its state in torch.float64",
        ):
            layer(X[:, 4:], state.to(torch.float32))


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_a_state_read_twice_is_not_changed_by_the_first_read(name, grad):
    """A state is a value: reading it again (a piece inside a mini-batch, one that completes it, one
    token) gives the same numbers, on the torch path and through the CPU kernels' in-place decode."""
    layer = _layer(name)
    with torch.set_grad_enabled(grad):
        _, state = layer(X[:, :4])
        before = {key: tensor.detach().clone() for key, tensor in state.tensors().items()}
        for piece in (X[:, 4:5], X[:, 4:7], X[:, 4:6]):
            first, _ = layer(piece, state)
            again, _ = layer(piece, state)
            assert torch.equal(first, again)
        after = state.tensors()
        assert all(torch.equal(after[key].detach(), tensor) for key, tensor in before.items())


@pytest.mark.parametrize("name", [n for n in LAYERS if not n.startswith(("deltanet", "gated", "titans"))])
def test_a_state_after_a_non_finite_rows_error_is_unchanged_and_goes_on(name):
    """An input that overflows one row raises NonFiniteRowsError naming it; the state given to the call
    is unchanged, goes on to the whole sequence's numbers, and the finite rows run again from
    ``state.index_select(finite_rows)`` give their numbers.

    (DeltaNet, Gated DeltaNet and Titans read q and k l2-normalised or through RMSNorms: an input of
    1e300 does not overflow them.)"""
    layer = _layer(name)
    with torch.no_grad():
        whole, _ = layer(X)
        _, state = layer(X[:, :4])
        before = {key: tensor.clone() for key, tensor in state.tensors().items()}
        bad = X[:, 4:].clone()
        bad[1, 1] = 1e300
        with pytest.raises(NonFiniteRowsError) as error:
            layer(bad, state)
        assert (error.value.rows, error.value.finite_rows) == ([1], [0, 2])
        assert all(torch.equal(state.tensors()[key], tensor) for key, tensor in before.items())
        after, _ = layer(X[:, 4:], state)
        assert_close(after, whole[:, 4:], f"{name} after the error", FLOAT64_TOLERANCE)
        rows = torch.tensor(error.value.finite_rows)
        rerun, _ = layer(bad[rows], state.index_select(rows))
        assert_close(rerun, whole[rows, 4:], f"{name}: the finite rows again", FLOAT64_TOLERANCE)


@pytest.mark.parametrize("mixer", MIXERS)
def test_model_states_reordered_joined_copied_or_read_twice_go_on_as_the_whole(mixer):
    """From one model state after a prefill: decoded token by token (full attention's cache grows in
    place), then read again; its rows selected with repeats and decoded; rows cut apart by
    ``index_select``, copied, detached and joined again by ``cat``: each equals the whole call's rows."""
    model = _tiny_model(mixer, seed=3, window=3)
    ids = torch.randint(13, (3, 9), generator=torch.Generator().manual_seed(4))
    rows, order = torch.tensor([2, 0, 2]), torch.tensor([1, 0, 2])
    with torch.no_grad():
        whole, _ = model(ids)
        _, state = model(ids[:, :5])
        decoded, _ = _read_in_pieces(model, ids[:, 5:], [0, 1, 2, 3, 4], state)
        again, _ = model(ids[:, 5:], state)
        selected, _ = _read_in_pieces(model, ids[rows, 5:], [0, 1, 2, 3, 4], state.index_select(rows))
        pieces = [state.index_select(torch.tensor([1])), state.index_select(torch.tensor([0])).clone()]
        joined = type(state).cat([*pieces, state.detach().index_select(torch.tensor([2]))])
        rejoined, _ = model(ids[order, 5:], joined)
    assert_close(decoded, whole[:, 5:], f"{mixer} decoded", FLOAT64_TOLERANCE)
    assert_close(again, whole[:, 5:], f"{mixer} read again", FLOAT64_TOLERANCE)
    assert_close(selected, whole[rows, 5:], f"{mixer} rows selected", FLOAT64_TOLERANCE)
    assert_close(rejoined, whole[order, 5:], f"{mixer} rows joined", FLOAT64_TOLERANCE)


# ---- 4. gradients through the carried state ----------------------------------------------------------

GRADIENT_LAYERS = {
    # TTT's heads of 4 features: the inner LayerNorm over 2 is a constant, through which nothing carries
    "ttt_share_qk_gate": lambda: TTTLayer(4, 1, mini_batch_size=2, use_gate=True, share_qk=True),
    "ttt_primal": lambda: TTTLayer(
        4, 1, mini_batch_size=2, update_rule="minibatch_gd"
    ),  # ~0.25 s: slow below
    "ttt_mlp": lambda: TTTLayer(4, 1, inner_model="mlp", mini_batch_size=2),
    "ttt_momentum": lambda: GatedTTTLayer(4, 1, update_rule="momentum", mini_batch_size=2),
    "linear_attention": lambda: LinearAttentionLayer(4, 2, mini_batch_size=2),
    "deltanet": lambda: DeltaNetLayer(4, 2),
    "gated_deltanet": lambda: GatedDeltaNetLayer(4, 2),
    "titans": lambda: TitansLayer(4, 2, mini_batch_size=2),
    "titans_mlp": lambda: TitansLayer(4, 2, inner_model="mlp", mini_batch_size=2),
}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n == "ttt_primal" else n for n in GRADIENT_LAYERS]
)
def test_the_gradient_through_a_carried_state_is_the_whole_ones_and_a_detached_state_cuts_it(name):
    """A loss on the second piece (3 tokens, after a first of 3: a cut inside a mini-batch of 2): its
    gradient w.r.t. the first piece's input, through the state carried with its graph, = the whole call's
    (float64, 1e-10) = central finite differences (eps 1e-6: truncation ~1e-12, rounding ~1e-10 of the
    loss); through ``state.detach()`` there is none (truncated backpropagation, as documented)."""
    torch.manual_seed(0)
    layer = _perturbed(GRADIENT_LAYERS[name](), seed=1, scale=0.3)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(1, 6, 4, dtype=torch.float64, generator=generator)
    weights = torch.randn(1, 3, 4, dtype=torch.float64, generator=generator)

    def second_piece_loss(first: torch.Tensor, detach: bool = False) -> torch.Tensor:
        _, state = layer(first)
        output, _ = layer(x[:, 3:], state.detach() if detach else state)
        return (output * weights).sum()

    first = x[:, :3].clone().requires_grad_()
    (whole_gradient,) = torch.autograd.grad(
        (layer(torch.cat([first, x[:, 3:]], 1))[0][:, 3:] * weights).sum(), first
    )
    (carried_gradient,) = torch.autograd.grad(second_piece_loss(first), first)
    assert_close(carried_gradient, whole_gradient, f"{name}: carried vs whole", FLOAT64_TOLERANCE)
    assert whole_gradient.abs().max() > 1e-3  # the state carries the first piece's influence
    steps = torch.eye(first.numel(), dtype=torch.float64).reshape(-1, *first.shape) * 1e-6
    with torch.no_grad():
        differences = torch.stack(
            [second_piece_loss(first + s) - second_piece_loss(first - s) for s in steps]
        )
    assert_close(carried_gradient.flatten(), differences / 2e-6, f"{name}: vs finite differences", 1e-7)
    detached = second_piece_loss(first, detach=True)
    assert torch.autograd.grad(detached, first, allow_unused=True) == (None,)


# ---- rows of different lengths (left padding, the masks innerloop.hf takes) ------------------------


@settings(max_examples=4, deadline=None)
@given(
    mixer=st.sampled_from(MIXERS),
    lengths=st.lists(st.integers(1, 7), min_size=2, max_size=3),
    decode=st.integers(1, 3),
    seed=seeds(),
)
@pytest.mark.slow  # 3.2 s of CPU: InnerloopForCausalLM, one forward per prompt length and token, each row alone
def test_a_left_padded_batch_then_decoding_gives_each_row_its_own_numbers(mixer, lengths, decode, seed):
    """``InnerloopForCausalLM`` reads a left-padded batch (``attention_mask`` zeros then ones) and then
    decodes a token at a time with its cache: each row's logits are those of its prompt read alone."""
    from innerloop.hf import InnerloopConfig, InnerloopForCausalLM

    sections = {"e2e": {"chunk_size": 3, "suffix_fraction": 0.5, "inner_lr_warmup_fraction": 0.0}}
    options = {"mixer": mixer, "vocab_size": 13, "hidden_size": 8, "num_heads": 2, "num_layers": 2}
    options.update(intermediate_size=6, window=3, init_std=0.3, **(sections if mixer == "e2e" else {}))
    torch.manual_seed(seed % 1000)
    model = InnerloopForCausalLM(InnerloopConfig(model=options)).eval().double()
    generator = torch.Generator().manual_seed(seed)
    longest, batch = max(lengths), len(lengths)
    prompts = [torch.randint(1, 13, (n,), generator=generator) for n in lengths]
    ids, mask = torch.zeros(batch, longest, dtype=torch.long), torch.zeros(batch, longest, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt) :], mask[row, longest - len(prompt) :] = prompt, 1
    new = torch.randint(1, 13, (batch, decode), generator=generator)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        logits, cache = [out.logits], out.cache
        for step in range(decode):
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.long)], dim=1)
            out = model(new[:, step : step + 1], attention_mask=mask, cache=cache, use_cache=True)
            logits.append(out.logits)
            cache = out.cache
        read = torch.cat(logits, dim=1)
        for row, prompt in enumerate(prompts):
            alone = model(torch.cat([prompt, new[row]])[None]).logits[0]
            assert_close(read[row, longest - len(prompt) :], alone, f"{mixer} row {row}", FLOAT64_TOLERANCE)
