"""The TTT-E2E model's states and options are checked where they are used: a state made by another model
is refused by name rather than continued into other numbers, a state cut from the graph (truncated
backpropagation) or frozen weights still train, options changed on a built model are validated, an
enclosing autocast is obeyed, and the fast weights keep float32 under a bf16 model (review s7)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from test_e2e import VOCAB, tiny_model, with_options

from innerloop.core.functional import relative_error
from innerloop.models import ModelConfig, build_model


def ids(batch: int = 2, length: int = 11, seed: int = 1) -> torch.Tensor:
    return torch.randint(VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_a_state_cut_from_the_graph_continues_with_gradients():
    """Truncated backpropagation: the next segment trains from a detached state (and from a state read
    under no_grad); its gradients equal those of a model that starts from the same fast weights."""
    model = tiny_model()
    tokens = ids(length=14)
    _, state = model(tokens[:, :6])
    logits, _ = model(tokens[:, 6:-1], state.detach())
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 7:].flatten())
    loss.backward()
    assert model.embed.weight.grad is not None  # (the prime MLPs' initial weights get none: the
    # state's fast weights were cut from them)
    with torch.no_grad():
        _, state = model(tokens[:, :6])
    logits_no_grad_prefix, _ = model(tokens[:, 6:-1], state)
    torch.testing.assert_close(logits_no_grad_prefix, logits)


def test_frozen_weights_still_train_their_fast_weights_under_grad():
    model = tiny_model()
    model.requires_grad_(False)
    tokens = ids()
    with torch.no_grad():
        expected, _ = model(tokens)
    logits, _ = model(tokens)  # grad mode on, nothing requires grad: the inner loop still steps
    torch.testing.assert_close(logits, expected)
    for block in model.blocks:
        if block.prime is not None:
            block.prime.requires_grad_(False)
    model.embed.requires_grad_(True)
    logits, _ = model(tokens)
    logits.sum().backward()
    assert model.embed.weight.grad is not None


@pytest.mark.parametrize(
    ("other", "match"),
    [
        ({"chunk_size": 3}, r"state was made by a model with e2e.chunk_size=4, this one has 3"),
        ({"chunk_size": 2}, r"state was made by a model with e2e.chunk_size=4, this one has 2"),
    ],
)
def test_a_state_of_a_model_with_other_chunks_is_refused(other, match):
    model = tiny_model()
    _, state = model(ids(length=7))  # 3 tokens pending
    with pytest.raises(ValueError, match=match):
        with_options(model, **other)(ids(length=2), state)


def test_a_state_whose_fast_weights_have_another_shape_is_refused():
    model = tiny_model(prime_intermediate_size=6)
    _, state = model(ids(length=7))
    other = tiny_model(prime_intermediate_size=10)
    with pytest.raises(
        ValueError, match=r"state's fast weight blocks.1.prime.gate_proj.weight is \[2, 6, 8\]"
    ):
        other(ids(length=2), state)


def config_with_window(window: int) -> ModelConfig:
    return replace(tiny_model().config, window=window)


def test_an_e2e_state_of_a_smaller_window_is_refused():
    torch.manual_seed(0)
    small = build_model(config_with_window(4)).double()
    large = build_model(config_with_window(8)).double()
    large.load_state_dict(small.state_dict())
    _, state = small(ids(length=9))
    with pytest.raises(ValueError, match=r"state.caches\[0\]"):
        large(ids(length=2), state)


@pytest.mark.parametrize("mixer", ["swa", "attention"])
def test_a_sliding_window_cache_with_too_few_keys_is_refused(mixer):
    """A window-4 cache keeps 3 keys; a model with a longer window (or none) needs more at position 9."""
    base = {"vocab_size": VOCAB, "hidden_size": 8, "num_layers": 1, "num_heads": 2, "intermediate_size": 12}
    torch.manual_seed(0)
    small = build_model(ModelConfig(mixer="swa", window=4, **base)).double()
    large = build_model(ModelConfig(mixer=mixer, window=8, **base)).double()
    large.load_state_dict(small.state_dict())
    _, state = small(ids(length=9))
    with pytest.raises(
        ValueError, match=r"caches 3 keys and 3 values, but at position 9 .* keeps (7|9) of each"
    ):
        large(ids(length=2), state)


def test_a_state_in_another_dtype_continues_in_the_models_dtype():
    model = tiny_model()
    tokens = ids(length=11)
    _, state = model(tokens[:, :7])
    expected, _ = model.float()(tokens[:, 7:], state.detach())  # a float64 state, a float32 model
    model.double()
    reference, _ = model(tokens[:, 7:], state)
    assert expected.dtype == torch.float32
    torch.testing.assert_close(expected.double(), reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("chunk_targets", "next-token"),
        ("chunk_targets", "Within_chunk"),
        ("compute_dtype", "bf16"),
        ("compute_dtype", "float64"),
        ("chunk_size", 0),
    ],
)
def test_an_option_changed_on_a_built_model_is_validated_at_the_call(key, value):
    model = tiny_model()
    setattr(model.config.e2e, key, value)
    with pytest.raises(ValueError, match=rf"model.e2e.{key}={value!r}"):
        model(ids())


def test_an_enclosing_autocast_is_obeyed_under_the_default_compute_dtype():
    model = tiny_model().float()
    tokens = ids()
    with torch.no_grad():
        full, _ = model(tokens)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed, _ = model(tokens)
    assert not torch.equal(full, mixed)  # the matrix products ran in bf16
    assert relative_error(mixed, full) < 0.05  # bf16 rounding, not another model


def test_a_bf16_model_keeps_its_fast_weights_in_float32():
    """A bf16 fast weight would lose every inner update smaller than its rounding step."""
    model = tiny_model().bfloat16()
    with torch.no_grad():
        _, state = model(ids(length=9))
    assert {v.dtype for v in state.fast.values()} == {torch.float32}
    reference = tiny_model().bfloat16().float()  # the same bf16-rounded weights, in float32
    with torch.no_grad():
        _, reference_state = reference(ids(length=9))
    for name, weights in state.fast.items():
        moved = weights - model.initial_fast_weights(2)[name]
        expected = reference_state.fast[name] - reference.initial_fast_weights(2)[name]
        assert (moved != 0).float().mean() > 0.99, name  # every weight took its (small) update
        assert torch.nn.functional.cosine_similarity(moved.flatten(), expected.flatten(), dim=0) > 0.9


def test_decoding_scores_each_token_once_until_its_chunk_trains():
    """Per decoded token the suffix blocks run over that token only (the pending tokens' caches are in
    the state), and over the whole chunk once, when it trains: the same work for every token of a chunk."""
    model = tiny_model(chunk_size=4)
    tokens = ids(length=14)
    scored = []
    score = model._score
    model._score = lambda h, caches, fast: scored.append(h.shape[1]) or score(h, caches, fast)
    with torch.no_grad():
        expected, _ = model(tokens)
        _, state = model(tokens[:, :5])  # chunk 0 waits for token 4, its next token: trained; 1 pending
        scored.clear()
        pieces = []
        for t in range(5, 14):
            logits, state = model(tokens[:, t : t + 1], state)
            pieces.append(logits)
    # tokens 5..7 complete chunk 1 (scored one at a time), token 8 trains it (the chunk again, then 8
    # alone); the same for chunk 2 (9..11, then 12), and 13 starts chunk 3
    assert scored == [1, 1, 1, 4, 1, 1, 1, 1, 4, 1, 1]
    torch.testing.assert_close(torch.cat(pieces, dim=1), expected[:, 5:])
