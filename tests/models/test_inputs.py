"""The language models refuse bad token ids and foreign states up front, naming what is wrong (review
s6, item 8): an id outside the vocabulary, ids that are not integers, a state made for another batch,
by a model with another mixer or backbone, or of another type. Before these checks the embedding, the
pre-conv or the attention cache failed with a raw torch error (or an AttributeError) instead."""

from __future__ import annotations

import pytest
import torch

from innerloop.models import (
    E2ELM,
    CausalDepthwiseConv,
    CausalLM,
    CausalSelfAttention,
    E2EConfig,
    ModelConfig,
    build_model,
)

VOCAB = 64
# Every kind of model the checks must cover: each mixer family, and the mamba backbone's pre-conv.
KINDS = {
    "ttt": {"mixer": "ttt"},
    "attention": {"mixer": "attention"},
    "swa": {"mixer": "swa", "window": 4},
    "mamba": {"mixer": "ttt", "backbone": "mamba"},
    "mamba-swa": {"mixer": "swa", "window": 4, "backbone": "mamba"},
    "deltanet": {"mixer": "deltanet"},
    "e2e": {"mixer": "e2e", "window": 4, "e2e": E2EConfig(chunk_size=4, suffix_fraction=0.5)},
}


def tiny(kind: str) -> CausalLM | E2ELM:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=VOCAB, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, **KINDS[kind]
    )
    return build_model(config).eval()


def state_of(model: CausalLM | E2ELM, batch: int = 2, length: int = 6):
    with torch.no_grad():
        return model(torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1)))[1]


def ids(batch: int = 2, length: int = 3) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", [VOCAB, -1, 10**9])
def test_an_id_outside_the_vocabulary_is_named_with_the_valid_range(kind: str, bad: int) -> None:
    model = tiny(kind)
    given = torch.tensor([[1, bad, 2]])
    with pytest.raises(
        ValueError, match=rf"input_ids holds token id {bad}, .*vocab_size={VOCAB}.*0\.\.{VOCAB - 1}"
    ):
        model(given)
    with pytest.raises(ValueError, match=rf"input_ids holds token id {bad}"):  # also when continuing
        model(given[:, :2], state_of(model, batch=1))


@pytest.mark.parametrize("kind", KINDS)
def test_ids_that_are_not_an_integer_tensor_are_refused_by_type(kind: str) -> None:
    model = tiny(kind)
    for given, match in (
        (torch.tensor([[1.0, 2.0]]), r"input_ids must hold integer token ids .*got dtype torch.float32"),
        (torch.tensor([[True, False]]), r"input_ids must hold integer token ids .*got dtype torch.bool"),
        (torch.tensor([[1, 2]], dtype=torch.int16), r"got dtype torch.int16"),
        ([[1, 2]], r"input_ids must be a torch.Tensor of token ids \[batch, length\], got list"),
    ):
        with pytest.raises(TypeError, match=match):
            model(given)
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, length( >= 1)?\], got shape \(3,\)"):
        model(torch.tensor([1, 2, 3]))


@pytest.mark.parametrize("kind", KINDS)
def test_int32_ids_give_the_logits_of_int64_ids(kind: str) -> None:
    model = tiny(kind)
    given = ids(2, 9)  # two chunks of 4 trained on: the E2E inner loss reads the ids as targets
    with torch.no_grad():
        torch.testing.assert_close(model(given.int())[0], model(given)[0], rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_a_state_made_for_another_batch_size_is_named(kind: str) -> None:
    model = tiny(kind)
    state = state_of(model, batch=2)
    with pytest.raises(ValueError, match=r"state.* batch") as error:
        model(ids(batch=3), state)
    assert "(2," in str(error.value) or "batch size 2" in str(error.value)  # what was given


@pytest.mark.parametrize(
    ("model_kind", "state_kind", "error", "match"),
    [
        (
            "attention",
            "ttt",
            TypeError,
            r"state.blocks\[0\].mixer must be the KVCache .*'attention'.*got TTTState",
        ),
        ("swa", "ttt", TypeError, r"state.blocks\[0\].mixer must be the KVCache .*got TTTState"),
        ("ttt", "attention", TypeError, r"state.blocks\[0\].mixer must be the TTTState .*'ttt'.*got KVCache"),
        ("deltanet", "swa", TypeError, r"state.blocks\[0\].mixer must be the TTTState .*got KVCache"),
        (
            "mamba",
            "ttt",
            ValueError,
            r"state.blocks\[0\].conv is None, but this model's blocks have a pre-conv",
        ),
        ("ttt", "mamba", ValueError, r"state.blocks\[0\].conv holds a pre-conv history, but this model's"),
        (
            "swa",
            "attention",
            ValueError,
            r"state.blocks\[0\].mixer caches 6 keys .*window=4\) keeps 3 of each",
        ),
        ("ttt", "e2e", TypeError, r"state must be the LMState .*got E2EState"),
        ("mamba-swa", "e2e", TypeError, r"state must be the LMState .*got E2EState"),
        ("e2e", "ttt", TypeError, r"state must be the E2EState .*got LMState"),
        ("e2e", "attention", TypeError, r"state must be the E2EState .*got LMState"),
    ],
)
def test_a_state_of_another_kind_of_model_is_named(model_kind, state_kind, error, match) -> None:
    with pytest.raises(error, match=match):
        tiny(model_kind)(ids(), state_of(tiny(state_kind)))


@pytest.mark.parametrize("kind", KINDS)
def test_a_state_that_is_not_the_state_object_is_refused_by_type(kind: str) -> None:
    model = tiny(kind)
    state = state_of(model)
    inner = state.caches if isinstance(model, E2ELM) else state.blocks  # a tuple, not the state
    wanted = "E2EState" if isinstance(model, E2ELM) else "LMState"
    with pytest.raises(TypeError, match=rf"state must be the {wanted} .*got tuple"):
        model(ids(), inner)
    if isinstance(model, CausalLM):
        with pytest.raises(
            TypeError, match=r"state.blocks\[1\] must be a BlockState, got (TTTState|KVCache)"
        ):
            model(ids(), type(state)((state.blocks[0], state.blocks[1].mixer)))


def test_an_attention_cache_of_a_layer_of_another_shape_is_named() -> None:
    wide = tiny("attention")
    config = ModelConfig(vocab_size=VOCAB, hidden_size=16, num_layers=2, num_heads=4, mixer="attention")
    with pytest.raises(
        ValueError,
        match=r"mixer.key must be \[batch, heads, cached, head_dim\] .*\(2, 4, 4\), got \(2, 2, 6, 8\)",
    ):
        CausalLM(config)(ids(), state_of(wide))
    layer = CausalSelfAttention(16, 2)  # the layer on its own checks its cache too
    _, cache = layer(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match=r"state.key must be .*\(3, 2, 8\), got \(2, 2, 5, 8\)"):
        layer(torch.randn(3, 1, 16), cache)
    with pytest.raises(
        TypeError, match=r"state must be the KVCache this attention layer returned .*got tuple"
    ):
        layer(torch.randn(2, 1, 16), (cache.key, cache.value))


def test_a_pre_conv_history_of_another_batch_is_named() -> None:
    conv = CausalDepthwiseConv(16, 4)
    _, history = conv(torch.randn(2, 5, 16))
    with pytest.raises(
        ValueError, match=r"history must be the pre-conv history .* = \(3, 3, 16\), got \(2, 3, 16\)"
    ):
        conv(torch.randn(3, 1, 16), history)
