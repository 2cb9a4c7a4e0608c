"""Review s21 (decoding): the memory a model's recurrent state holds after a long prefill.

``LMState.nbytes`` says "the TTT and sliding-window states hold exactly this", attention.py says a
sliding-window layer "keeps only the last ``window - 1`` keys", ``E2EState.nbytes`` says the state is
"bounded: window, chunk and fast weights, not length". The states' tensors have those sizes, but some
of them are views (slices) of tensors as long as the prompt: the state returned by a prefill of ``T``
tokens keeps ``O(T)`` bytes alive (and ``torch.save`` writes them all) until a later call replaces it.
A test of a defect not yet fixed is a strict xfail whose reason says what is wrong
(report: notes/review_s21_decoding.md).
"""

from __future__ import annotations

import io

import torch

from innerloop.core.functional import causal_depthwise_conv
from innerloop.models import E2EConfig, ModelConfig, build_model
from innerloop.models.lm import _tensors  # every tensor a state reaches, as LMState.nbytes walks them

PROMPT = 1000  # tokens of the prefill; the states below hold a few hundred bytes per block of their own


def _held_bytes(state: object) -> int:
    """Bytes of the storages the state's tensors keep alive (each storage once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in _tensors(state)}
    return sum(storages.values())


def _own_bytes(state: object) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(state))


def _prefilled(config: ModelConfig, length: int = PROMPT):
    torch.manual_seed(0)
    model = build_model(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, length))
    with torch.no_grad():
        return model(ids)[1]


SMALL = {"hidden_size": 32, "num_heads": 2, "num_layers": 1, "intermediate_size": 64}


def test_a_sliding_window_state_after_a_long_prefill_holds_only_its_window():
    state = _prefilled(ModelConfig(mixer="swa", window=8, **SMALL))
    own = _own_bytes(state)
    assert own == state.nbytes()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    assert _held_bytes(state) <= 2 * own, (_held_bytes(state), own)
    assert len(buffer.getvalue()) <= 2 * own + 10_000, (len(buffer.getvalue()), own)


def test_a_conv_history_owns_only_its_kernel_minus_one_rows():
    x = torch.randn(1, PROMPT, 8)
    _, history = causal_depthwise_conv(x, torch.randn(8, 1, 4), None, torch.zeros(1, 3, 8))
    held, own = history.untyped_storage().nbytes(), history.numel() * history.element_size()
    assert held == own, (held, own)


def test_a_mamba_backbone_ttt_state_after_a_long_prefill_holds_constant_memory():
    config = ModelConfig(mixer="ttt", backbone="mamba", **SMALL)
    short, long = _prefilled(config, 20), _prefilled(config, PROMPT)
    assert _own_bytes(short) == _own_bytes(long) == long.nbytes()
    assert _held_bytes(long) <= 2 * _own_bytes(long), (_held_bytes(long), _own_bytes(long))


def test_an_e2e_state_after_a_long_prefill_holds_only_window_chunk_and_fast_weights():
    config = ModelConfig(mixer="e2e", window=8, e2e=E2EConfig(chunk_size=4), **{**SMALL, "num_layers": 2})
    state = _prefilled(config, 302)  # 2 pending tokens
    assert _own_bytes(state) == state.nbytes()
    assert _held_bytes(state) <= 2 * state.nbytes(), (_held_bytes(state), state.nbytes())
