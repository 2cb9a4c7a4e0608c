"""Sliding-window attention reads long inputs block by block: the numbers of the dense ``[T, S + T]``
mask, in memory and time linear in ``T`` (innerloop.models.attention)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from innerloop.models import CausalLM, ModelConfig, attention
from innerloop.models.attention import CausalSelfAttention, rotate_with_rope
from innerloop.testing.memory import peak_cpu_allocation

BLOCK = 8  # the query block the tests use, so that short inputs span many blocks


def dense_reference(layer: CausalSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """The layer's output for ``x [B, T, D]`` read from position 0, from the dense ``[T, T]`` mask and
    the attention formula written out (scores, masked softmax, weighted values)."""
    batch, length, hidden = x.shape
    q, k, v = layer.qkv_proj(x).view(batch, length, 3, layer.num_heads, layer.head_dim).unbind(2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # each [B, H, T, f]
    if layer.q_norm is not None and layer.k_norm is not None:
        q, k = layer.q_norm(q), layer.k_norm(k)
    positions = torch.arange(length)
    q, k = (rotate_with_rope(t, positions, layer.rope_theta, layer.float64_rope_angles) for t in (q, k))
    window = layer.window if layer.window is not None else length
    offsets = positions[:, None] - positions[None, :]  # [T, T]: query minus key position
    visible = (offsets >= 0) & (offsets < window)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(layer.head_dim)).masked_fill(~visible, -math.inf)
    y = scores.softmax(dim=-1) @ v  # [B, H, T, f]
    return layer.o_proj(y.transpose(1, 2).reshape(batch, length, hidden))


def swa_layer(window: int, hidden: int = 16, heads: int = 2, qk_norm: bool = True) -> CausalSelfAttention:
    torch.manual_seed(0)
    return CausalSelfAttention(hidden, heads, window=window, qk_norm=qk_norm).double()


def read_in_pieces(layer: CausalSelfAttention, x: torch.Tensor, first: int) -> torch.Tensor:
    """``x`` read as ``x[:, :first]`` and then the rest with the cache carried (one call if first=0)."""
    if first == 0:
        return layer(x)[0]
    head, cache = layer(x[:, :first])
    return torch.cat((head, layer(x[:, first:], cache)[0]), dim=1)


# (window, T, tokens read before the rest with the cache): T < window, T = window, T > window, T not a
# multiple of the block, windows shorter and longer than the block, a cache that ends inside a block.
CASES = [
    (16, 5, 0),
    (16, 16, 0),
    (16, 45, 0),
    (4, 37, 0),
    (3, 8, 0),
    (1, 19, 0),
    (16, 45, 13),
    (4, 37, 21),
    (16, 40, 3),
    (5, 33, 8),
]


@pytest.mark.parametrize(("window", "length", "first"), CASES)
def test_blocked_sliding_window_equals_the_dense_mask(monkeypatch, window, length, first) -> None:
    monkeypatch.setattr(attention, "QUERY_BLOCK", BLOCK)
    layer = swa_layer(window)
    x = torch.randn(3, length, 16, dtype=torch.float64, requires_grad=True)  # batch 3
    weights = torch.randn(3, length, 16, dtype=torch.float64)
    got = read_in_pieces(layer, x, first)
    (got * weights).sum().backward()
    got_grads = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    x.grad = None
    layer.zero_grad()

    want = dense_reference(layer, x)
    (want * weights).sum().backward()
    want_grads = [x.grad] + [p.grad for p in layer.parameters()]
    assert (got - want).abs().max() <= 1e-12
    for got_grad, want_grad in zip(got_grads, want_grads, strict=True):
        assert (got_grad - want_grad).abs().max() <= 1e-12


def test_blocked_sliding_window_under_bf16_autocast(monkeypatch) -> None:
    layer = swa_layer(12, hidden=32, heads=4, qk_norm=False)  # (nn.RMSNorm warns under bf16 autocast)
    x = torch.randn(2, 70, 32, dtype=torch.float64)
    with torch.no_grad():
        want = dense_reference(layer, x).float()
        layer, x = layer.float(), x.float()
        monkeypatch.setattr(attention, "QUERY_BLOCK", 10**9)  # one block: the dense [T, T] mask
        with torch.autocast("cpu", torch.bfloat16):
            dense = read_in_pieces(layer, x, 0)
        monkeypatch.setattr(attention, "QUERY_BLOCK", BLOCK)
        with torch.autocast("cpu", torch.bfloat16):
            blocked, carried = read_in_pieces(layer, x, 0), read_in_pieces(layer, x, 29)
    assert blocked.dtype == dense.dtype == torch.bfloat16
    scale = want.abs().max()
    for y in (dense, blocked, carried):
        assert (y.float() - want).abs().max() <= 2e-2 * scale
    assert (blocked.float() - dense.float()).abs().max() <= 2e-2 * scale


def test_a_decoding_step_is_one_attention_call_over_the_cache(monkeypatch) -> None:
    """T = 1 after a cache: one SDPA call, the query against the ``window`` keys, no block split."""
    layer = swa_layer(16)
    x = torch.randn(2, 301, 16, dtype=torch.float64)
    _, cache = layer(x[:, :300])
    calls, sdpa = [], F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, attn_mask=None, **kwargs):
        calls.append((q.shape[2], k.shape[2], None if attn_mask is None else tuple(attn_mask.shape)))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", recording_sdpa)
    y, after = layer(x[:, 300:], cache)
    assert calls == [(1, 16, (1, 16))]
    assert after.key.shape[2] == 15 and after.position == 301
    assert (y - dense_reference(layer, x)[:, 300:]).abs().max() <= 1e-12


def no_grad_peak(layer: CausalSelfAttention, length: int) -> int:
    x = torch.randn(1, length, 64)
    with torch.no_grad():
        return peak_cpu_allocation(lambda: layer(x))


def test_sliding_window_prefill_memory_grows_linearly() -> None:
    """A window-64 layer of width 64 reads 8192 tokens in about twice the memory of 4096 (the dense
    [T, T] mask took 202 MB at 8192 and 53 MB at 4096)."""
    torch.manual_seed(0)
    layer = CausalSelfAttention(64, 4, window=64).eval()
    no_grad_peak(layer, 256)  # warm-up (lazy initialisations)
    short, long = no_grad_peak(layer, 4096), no_grad_peak(layer, 8192)
    assert short > 0
    assert long < 2.5 * short, (short, long)
    assert long < 24 * 2**20, long  # the input, q/k/v, the output and one block's scores: about 13 MB


def _decode(layer: CausalSelfAttention, x: torch.Tensor, prefill: int, state=None):
    """``layer`` over ``x [B, T, D]``: the first ``prefill`` tokens at once, then one token per call;
    the outputs ``[B, T, D]`` and every state returned."""
    outputs, states = [], []
    for start, end in [(0, prefill), *((t, t + 1) for t in range(prefill, x.shape[1]))]:
        y, state = layer(x[:, start:end], state)
        outputs.append(y)
        states.append(state)
    return torch.cat(outputs, dim=1), states


def test_decoding_writes_each_token_into_the_cache_in_place_and_equals_the_whole() -> None:
    """Without autograd, full attention's cache grows in place: a decoded token writes its own keys, not
    a copy of the cache (at 32k tokens the copy cost 8x the attention itself). The numbers are the
    whole call's, and every step's keys live in the buffer the first step made (a call without a state
    keeps its keys as they are: an evaluation pays nothing for the room)."""
    torch.manual_seed(0)
    layer = CausalSelfAttention(16, 2, None).double()
    x = torch.randn(2, 40, 16, dtype=torch.float64)
    with torch.no_grad():
        whole, _ = layer(x)
        stepped, states = _decode(layer, x, prefill=9)
    assert (stepped - whole).abs().max().item() <= 1e-12
    assert states[0]._room is None
    assert len({state.key.data_ptr() for state in states[1:]}) == 1  # one buffer: 30 steps, no copy
    assert [state.key.shape[2] for state in states] == list(range(9, 41))


def test_a_cache_stays_a_value_when_decoded_from_twice() -> None:
    """Two continuations of one cache (beam search, a benchmark's rounds) each see that cache only: the
    second, finding the next positions written by the first, copies; neither changes the cache."""
    torch.manual_seed(0)
    layer = CausalSelfAttention(16, 2, None).double()
    x, other = torch.randn(2, 12, 16, dtype=torch.float64), torch.randn(2, 3, 16, dtype=torch.float64)
    with torch.no_grad():
        _, state = layer(x[:, :9])
        kept = state.key.clone(), state.value.clone()
        first, _ = layer(other, state)
        second, _ = layer(x[:, 9:], state)
        again, _ = layer(other, state)
        whole, _ = layer(x)
    assert torch.equal(state.key, kept[0]) and torch.equal(state.value, kept[1])
    assert (second - whole[:, 9:]).abs().max().item() <= 1e-12
    assert torch.equal(first, again)


def test_a_decoded_cache_continued_twice_keeps_the_first_continuations_keys() -> None:
    """A cache that lives in a room (a token decoded without autograd) continued twice: the second
    continuation finds the room's next positions written by the first and copies, so the first one's
    cache still holds its own keys when it is continued (without the room's fill check the second wrote
    over them, and the first continuation read the other token's key and value: review s61, mutant A3)."""
    torch.manual_seed(0)
    layer = CausalSelfAttention(16, 2, None).double()
    x, other = torch.randn(2, 12, 16, dtype=torch.float64), torch.randn(2, 1, 16, dtype=torch.float64)
    with torch.no_grad():
        whole, _ = layer(x)
        _, state = layer(x[:, :8])
        _, state = layer(x[:, 8:9], state)  # the cache now lives in a room
        assert state._room is not None
        _, first = layer(x[:, 9:10], state)  # written in place into the room
        _, second = layer(other, state)  # the same next position: must not be written over
        continued, _ = layer(x[:, 10:], first)
    assert (continued - whole[:, 10:]).abs().max().item() <= 1e-12
    assert first.key.data_ptr() != second.key.data_ptr()


def test_with_autograd_the_cache_is_concatenated_and_gradients_flow() -> None:
    torch.manual_seed(0)
    layer = CausalSelfAttention(16, 2, None).double()
    x = torch.randn(1, 10, 16, dtype=torch.float64, requires_grad=True)
    stepped, states = _decode(layer, x, prefill=6)
    assert states[-1]._room is None
    (grad,) = torch.autograd.grad(stepped.sum(), x)
    (expected,) = torch.autograd.grad(layer(x)[0].sum(), x)
    assert (grad - expected).abs().max().item() <= 1e-12


@pytest.mark.slow  # reason: torch.compile of a layer and 12 decoding steps, ~4 s
def test_compiled_sliding_window_decoding_does_not_recompile_at_every_position() -> None:
    """Blocks are counted from each call's first query: a decoding step's graph does not depend on its
    position (blocks at multiples of 256 made dynamo recompile at every token, then give up).

    Recompiles are dynamo's (its guards), whatever the backend: aot_eager, not inductor, whose C++ for
    the three graphs took 30-40 s from CI's empty cache."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    layer = CausalSelfAttention(16, 2, 8).eval()
    compiled = torch.compile(layer, backend="aot_eager")
    x = torch.randn(1, 30, 16)
    with torch.no_grad():
        whole, _ = layer(x)
        _, state = compiled(x[:, :18])
        steps = []
        for t in range(18, 30):
            y, state = compiled(x[:, t : t + 1], state)
            steps.append(y)
    assert (torch.cat(steps, dim=1) - whole[:, 18:]).abs().max().item() <= 1e-5
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 3  # prefill, first step, later steps


@pytest.mark.parametrize("mixer", ["swa", "attention"])
def test_a_non_finite_token_reaches_only_the_positions_that_see_it(mixer: str) -> None:
    """Found by probing a model whose embedding row of one token is inf: the whole sequence gave NaN
    logits at every position, those before the token (and, with a window, those past it) too, while the
    same tokens read one at a time were finite there. The math kernel (which runs on non-finite inputs)
    adds -inf to a masked NaN score, which stays NaN; a masked key now never reaches a query's row."""
    torch.manual_seed(0)
    config = ModelConfig(
        mixer=mixer,
        window=2,
        hidden_size=16,
        num_heads=2,
        num_layers=2,
        intermediate_size=24,
        vocab_size=20,
        tie_embeddings=False,
    )
    model = CausalLM(config).eval()
    with torch.no_grad():
        model.embed.weight[7] = float("inf")
        ids = torch.tensor([[1, 2, 7, 3, 4, 5, 6, 8]])
        whole = torch.isfinite(model(ids)[0][0]).all(-1)
        state, alone = None, []
        for t in range(ids.shape[1]):
            logits, state = model(ids[:, t : t + 1], state)
            alone.append(bool(torch.isfinite(logits).all()))
    assert whole.tolist() == alone
    assert alone[:2] == [True, True] and not alone[2]  # the positions before the token stay finite
    assert alone[-1] == (mixer == "swa")  # past the window (2 blocks of window 2) again finite
