"""Review s50e: one precision rule for a model cast to bfloat16 and one integer rule for arguments.

- Precision. A model cast whole to bfloat16 (``model.to(torch.bfloat16)``, Lightning's ``bf16-true``)
  keeps the float32 islands that ``torch.autocast`` keeps: whatever writes the inner state (the inner
  learning rate's gate, the token index tau, the RoPE tables of the views, the family's gates), the
  state itself and the language-model loss are computed in at least float32. TTTLayer computed its
  learning-rate gate (sigmoid, times base_lr / head dim) and tau in bfloat16, from a token-index table
  ``1 / (i + 1)`` and RoPE inverse frequencies that the cast had rounded to bfloat16, and the loss
  helpers computed the cross-entropy in bfloat16. The tests hold the islands by value: with weights
  that bfloat16 represents exactly, a bfloat16 layer's state equals the state the same layer reaches
  under autocast, bit for bit.
- Integers. An integer argument is a Python int, a numpy integer or a 0-d integer tensor, read as the
  int it holds (``core.functional.as_integer``); a bool, a float (4.0 too) and a string are refused.
  The state and cache objects refused a numpy position (``TTTState``, ``KVCache``, ``E2EState``),
  ``check_positive_int`` (the layers' sizes, ``chunk_size``) and ``ModelConfig`` a 0-d tensor, and the
  Hugging Face model a numpy ``logits_to_keep`` or cache length, where ``as_integer``'s sites took them.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch

from innerloop.core.family_layers import DeltaNetLayer, GatedDeltaNetLayer, TitansLayer
from innerloop.core.functional import (
    check_positive_int,
    chunk_mean_cross_entropy,
    is_integer,
    mean_scored_cross_entropy,
    relative_error,
)
from innerloop.core.layer import TTTLayer
from innerloop.data.packing import is_test, is_validation
from innerloop.models import E2EConfig, ModelConfig, build_model
from innerloop.models.attention import CausalSelfAttention, KVCache

LAYERS = {
    "ttt_linear": lambda: TTTLayer(32, 2, inner_model="linear", mini_batch_size=8),
    "ttt_mlp_share_qk": lambda: TTTLayer(32, 2, inner_model="mlp", mini_batch_size=16, share_qk=True),
    "deltanet": lambda: DeltaNetLayer(32, 2),
    "gated_deltanet": lambda: GatedDeltaNetLayer(32, 2),
    "titans": lambda: TitansLayer(32, 2),
}


def _bf16_representable(layer: torch.nn.Module) -> torch.nn.Module:
    """``layer`` (float32) with every parameter rounded to bfloat16: a float32 layer whose weights a
    bfloat16 cast keeps exactly."""
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.copy_(parameter.to(torch.bfloat16).float())
    return layer


def _trained_gates(layer: torch.nn.Module) -> torch.nn.Module:
    """Gates and token index away from their initial zeros, so that a rounding of them shows."""
    with torch.no_grad():
        for name, parameter in layer.named_parameters():
            if "ttt_lr_bias" in name:
                parameter.copy_(torch.randn_like(parameter) * 0.3)
            elif "token_idx" in name:  # small: tau = 1 / (i + 1) + delta stays > 0, each token updates
                parameter.copy_(torch.randn_like(parameter) * 0.01)
    return layer


@pytest.mark.slow  # 2.2 s for the first (the CPU kernel's first-use check), 0.3 s each after
@pytest.mark.parametrize("kind", list(LAYERS))
def test_a_bf16_layer_writes_the_state_autocast_writes_bit_for_bit(kind):
    torch.manual_seed(0)
    layer = _bf16_representable(_trained_gates(LAYERS[kind]()))
    x = torch.randn(2, 20, 32).to(torch.bfloat16)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, mixed = layer(x.float())
        _, plain = copy.deepcopy(layer).to(torch.bfloat16)(x)
    for key, value in mixed.tensors().items():
        assert plain.tensors()[key].dtype == value.dtype == torch.float32, key
        assert torch.equal(plain.tensors()[key], value), (kind, key)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_a_bf16_layer_computes_its_gates_and_tables_in_float32(kind):
    torch.manual_seed(0)
    layer = LAYERS[kind]().to(torch.bfloat16)
    x = torch.randn(2, 8, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        lr, tau = layer.inner_learning_rates(x)
        gates = [g for g in layer.forgetting(x) if g is not None]
    assert {t.dtype for t in (lr, tau, *gates)} == {torch.float32}
    tables = {name: buffer.dtype for name, buffer in layer.named_buffers()}
    assert set(tables.values()) == {torch.float32}, tables


@pytest.mark.parametrize(
    "loss", [mean_scored_cross_entropy, lambda *a: chunk_mean_cross_entropy(a[0], a[1], 3, a[2])]
)
def test_the_loss_of_bf16_logits_is_computed_in_float32(loss):
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 50).mul(4).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 50, (2, 7))
    got, want = loss(logits, targets, -100), loss(logits.detach().float(), targets, -100)
    assert got.dtype == torch.float32
    assert torch.equal(got.detach(), want)
    got.backward()
    assert logits.grad.dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------------
# One integer rule: an integer argument is a Python int, a numpy integer or a 0-d integer tensor, read
# as the Python int it holds; a bool (True is no size), a float (4.0 too: a float where an integer is
# meant is refused, not truncated) and a string are refused, naming the argument.
# --------------------------------------------------------------------------------------------------

INTEGERS = {"numpy": np.int64(4), "0-d tensor": torch.tensor(4)}
NOT_INTEGERS = {"bool": True, "integral float": 4.0, "numpy float": np.float64(4.0)}


def _tiny_e2e() -> torch.nn.Module:
    torch.manual_seed(0)
    config = ModelConfig(
        mixer="e2e", vocab_size=64, hidden_size=16, num_heads=2, intermediate_size=16,
        num_layers=1, window=4, e2e=E2EConfig(chunk_size=4),
    )  # fmt: skip
    return build_model(config).eval()


def _ttt_states():
    torch.manual_seed(0)
    layer = TTTLayer(16, 2, mini_batch_size=4)
    x = torch.randn(1, 5, 16)
    with torch.no_grad():
        _, state = layer(x[:, :4])
    return lambda position: layer(x[:, 4:], replace(state, position=position))[1].position


def _kv_caches():
    torch.manual_seed(0)
    attention = CausalSelfAttention(16, 2)
    x = torch.randn(1, 5, 16)
    with torch.no_grad():
        _, cache = attention(x[:, :4])
    return lambda position: attention(x[:, 4:], KVCache(cache.key, cache.value, position))[1].position


def _e2e_states():
    model, ids = _tiny_e2e(), torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        _, state = model(ids[:, :4])
    return lambda position: model(ids[:, 4:], replace(state, position=position))[1].position


STATES = {"TTTState": _ttt_states, "KVCache": _kv_caches, "E2EState": _e2e_states}
SLOW_STATES = {"E2EState"}  # builds a TTT-E2E model: 0.5 s


@pytest.mark.parametrize(
    "kind", [pytest.param(kind, marks=[pytest.mark.slow] if kind in SLOW_STATES else []) for kind in STATES]
)
def test_a_state_takes_its_position_as_any_integer_and_refuses_the_rest(kind):
    continue_from = STATES[kind]()
    with torch.no_grad():
        assert continue_from(4) == 5
        for name, position in INTEGERS.items():
            got = continue_from(position)
            assert type(got) is int and got == 5, (kind, name, got)
        for name, position in NOT_INTEGERS.items():
            with pytest.raises(ValueError, match="position must be an integer"):
                continue_from(position)
            assert name


@pytest.mark.parametrize("name", list(INTEGERS))
def test_the_size_checks_take_a_0d_tensor_as_the_int_it_holds(name):
    size = INTEGERS[name]
    layer = TTTLayer(32, size // 2, mini_batch_size=size)
    assert (type(layer.num_heads), layer.num_heads, type(layer.mini_batch_size)) == (int, 2, int)
    assert layer.init_state(size).batch_size == 4
    attention = CausalSelfAttention(32, size // 2, window=size)
    assert (type(attention.num_heads), type(attention.window)) == (int, int)
    logits, targets = torch.randn(2, 7, 5), torch.randint(0, 5, (2, 7))
    assert torch.equal(
        chunk_mean_cross_entropy(logits, targets, size, -100),
        chunk_mean_cross_entropy(logits, targets, 4, -100),
    )
    assert is_integer(size) and check_positive_int("size", size) == 4


@pytest.mark.parametrize("name", list(NOT_INTEGERS))
def test_the_size_checks_refuse_bools_and_floats_naming_the_argument(name):
    value = NOT_INTEGERS[name]
    assert not is_integer(value)
    with pytest.raises(ValueError, match="mini_batch_size must be a positive integer"):
        TTTLayer(32, 2, mini_batch_size=value)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        chunk_mean_cross_entropy(torch.randn(1, 4, 5), torch.zeros(1, 4, dtype=torch.long), value, -100)


@pytest.mark.slow  # imports transformers (7.6 s in a fresh process, 0.8 s once imported)
def test_the_hf_model_reads_a_numpy_logits_to_keep_and_cache_length_as_ints():
    from hf.hf_testing import tiny_hf_model

    from innerloop.hf.modeling import InnerloopCache

    model, ids = tiny_hf_model("ttt_linear"), torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        kept = model(ids, logits_to_keep=np.int64(2)).logits
        assert torch.equal(kept, model(ids, logits_to_keep=2).logits)
        out = model(ids[:, :4], use_cache=True)
        cache = InnerloopCache(out.cache.state, np.int64(4))
        assert type(cache.get_seq_length()) is int
        model(ids[:, 4:], cache=cache)
    with pytest.raises(ValueError, match="logits_to_keep must be an int"):
        model(ids, logits_to_keep=2.0)


@pytest.mark.parametrize("name", list(INTEGERS))
def test_a_model_config_reads_its_integer_fields_by_the_same_rule(name):
    model = build_model(
        ModelConfig(hidden_size=32, num_heads=INTEGERS[name] // 2, num_layers=1, vocab_size=64)
    )
    assert type(model.config.num_heads) is int and model.config.num_heads == 2
    with pytest.raises(ValueError, match="num_heads"):
        build_model(ModelConfig(hidden_size=32, num_heads=2.0, num_layers=1, vocab_size=64))


@pytest.mark.slow  # 2.8 s: the CPU kernel's first-use check; 0.1 s after
def test_a_bf16_layer_is_as_close_to_float32_as_the_same_layer_under_autocast():
    """The output of a layer cast to bfloat16 against float32's, beside autocast's: measured over 4 seeds
    at K = 64, 1.04 to 1.08 times autocast's error (5.1e-3 to 5.2e-3, 1.3 bfloat16 units 2^-8) with the
    float32 islands, 1.15 to 1.19 times with the gate, tau and tables in bfloat16."""
    torch.manual_seed(0)
    layer = TTTLayer(64, 4, inner_model="linear", mini_batch_size=64)
    with torch.no_grad():
        layer.learnable_ttt_lr_bias.normal_(0, 0.5)
        layer.learnable_token_idx.normal_(0, 0.002)
        x = torch.randn(1, 64, 64)
        y32, _ = layer(x)
        y, _ = copy.deepcopy(layer).to(torch.bfloat16)(x.bfloat16())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed, _ = layer(x)
    plain_error, mixed_error = relative_error(y, y32), relative_error(mixed, y32)
    assert mixed_error <= 2 * 2.0**-8
    assert plain_error <= 1.12 * mixed_error, (plain_error, mixed_error)


def test_a_0d_tensor_document_number_is_split_as_its_int():
    documents = [16_777_217 + n for n in range(40)]  # past 2**24, where float32 arithmetic rounds
    for val_fraction, test_fraction in ((0.1, 0.0), (0.1, 0.3), (0.37, 0.2)):
        for n in documents:
            assert is_validation(torch.tensor(n), val_fraction) == is_validation(n, val_fraction)
            assert is_test(torch.tensor(n), val_fraction, test_fraction) == is_test(
                n, val_fraction, test_fraction
            )


def test_weights_loaded_in_bf16_give_the_numbers_of_the_model_cast_to_bf16():
    """``load_weights(keep_dtype=True)`` casts the model it loads into as Lightning's ``bf16-true`` cast
    the trained one: the token-index and RoPE tables stay float32 in both."""
    from innerloop.checkpoints import load_weights

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, hidden_size=32, num_heads=2, num_layers=1, intermediate_size=32)
    trained = build_model(config).to(torch.bfloat16).eval()
    loaded = build_model(config).eval()
    load_weights(loaded, trained.state_dict(), keep_dtype=True)
    mixer = loaded.blocks[0].mixer
    assert mixer.token_idx.dtype == mixer.rope_inv_freq.dtype == torch.float32
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids)[0], trained(ids)[0])
