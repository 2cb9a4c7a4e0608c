"""Review s15 (the state API under unusual use): full attention's in-place room, selecting and joining the
batch rows of every kind of state, and the copy / move / save helpers of the model-level states.

Every comparison is in float64 against a whole-sequence forward of the same rows, to 1e-12."""

from __future__ import annotations

import copy
import dataclasses
import io

import pytest
import torch
from lm_testing import state_tensors

from innerloop.core.layer import TTTLayer
from innerloop.core.protocol import HalfSquaredError, LossPairs
from innerloop.core.state import StateSignature, TTTState
from innerloop.models import BlockState, CausalLM, E2EState, KVCache, LMState, build_model
from innerloop.models.config import E2EConfig, FamilyConfig, ModelConfig, TTTConfig
from innerloop.models.e2e import ChunkKVCache
from innerloop.registry import get_registry

VOCAB = 64
TOLERANCE = 1e-12
BASE = {"vocab_size": VOCAB, "hidden_size": 16, "num_layers": 2, "num_heads": 2, "intermediate_size": 32}
KINDS: dict[str, dict] = {
    "ttt-linear-share_qk": {"ttt": TTTConfig(mini_batch_size=4, share_qk=True)},
    "ttt-mlp-mamba": {
        "backbone": "mamba",
        "ttt": TTTConfig(inner_model="mlp", mini_batch_size=4, base_lr=0.1),
    },
    "ttt-momentum": {
        "ttt": TTTConfig(
            update_rule="momentum",
            inner_model="matrix",
            mini_batch_size=3,
            inner_norm=False,
            inner_residual=False,
        )
    },
    "ttt-next_token": {"ttt": TTTConfig(inner_loss="next_token", mini_batch_size=4)},
    "ttt-minibatch_gd": {"ttt": TTTConfig(update_rule="minibatch_gd", mini_batch_size=5)},
    "swa": {"mixer": "swa", "window": 5},
    "attention": {"mixer": "attention"},
    "linear_attention": {
        "mixer": "linear_attention",
        "family": FamilyConfig(mini_batch_size=4, short_conv=False),
    },
    "deltanet": {"mixer": "deltanet", "family": FamilyConfig()},
    "gated_deltanet": {"mixer": "gated_deltanet"},
    "titans-matrix": {"mixer": "titans", "family": FamilyConfig(mini_batch_size=3)},
    "titans-mlp": {"mixer": "titans", "family": FamilyConfig(memory="mlp", mini_batch_size=4)},
    "e2e": {"mixer": "e2e", "window": 6, "e2e": E2EConfig(chunk_size=3, suffix_fraction=0.5)},
    "e2e-abs-within": {
        "mixer": "e2e",
        "window": 6,
        "e2e": E2EConfig(
            chunk_size=4, suffix_fraction=0.5, rope_positions="absolute", chunk_targets="within_chunk"
        ),
    },
    "e2e-nottt": {"mixer": "e2e", "window": 6, "e2e": E2EConfig(chunk_size=4, test_time_training=False)},
}
"""The model kinds of the review's t3/t5 scripts, smaller (each state kind and option that carries
something: conv history, loss carry, momentum, decay, the attention room, E2E caches and fast weights)."""
FAST_KINDS = ("ttt-next_token", "gated_deltanet", "attention", "e2e")


def build(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(**{**BASE, **KINDS[kind]})).double().eval()


def largest_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def ids_of(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- MED-3: rows of every kind of state -------------------------------------------------------------


@pytest.mark.parametrize(
    "kind",
    [k if k in FAST_KINDS else pytest.param(k, marks=pytest.mark.slow) for k in KINDS],
    # reason (slow ones): the same check on the other kinds, 0.3 to 2 s each; the fast ones cover the
    # loss carry, decay, the attention room and the E2E caches and fast weights (the slow ones add the
    # conv histories of share_qk and the mamba pre-conv, and momentum)
)
def test_selected_reordered_and_joined_rows_continue_as_those_sequences(kind: str) -> None:
    model = build(kind)
    ids = ids_of(3, 14)
    cut = 6  # inside a mini-batch / chunk for every kind: pending sums and carries are not empty
    with torch.no_grad():
        full, _ = model(ids)
        _, state = model(ids[:, :cut])
        _, state = model(ids[:, cut : cut + 1], state)  # one decoded token (attention's cache: a room)
        for rows in ([2, 0, 0], [1]):
            index = torch.tensor(rows)
            selected = state.index_select(index)
            assert selected.batch_size == len(rows)
            logits, _ = model(ids[index, cut + 1 :], selected)
            assert largest_difference(logits, full[index, cut + 1 :]) <= TOLERANCE, rows
        logits, _ = model(ids[:, cut + 1 :], state)  # the state itself is unchanged
        assert largest_difference(logits, full[:, cut + 1 :]) <= TOLERANCE
        _, first = model(ids[:1, :cut])
        _, second = model(ids[1:, :cut])
        joined = type(first).cat([first, second])
        logits, _ = model(ids[:, cut:], joined)
    assert largest_difference(logits, full[:, cut:]) <= TOLERANCE
    assert joined.batch_size == 3


@pytest.mark.parametrize(
    ("rows", "error", "message"),
    [
        (torch.tensor([0.0]), TypeError, r"rows must hold integer row numbers .* got torch.float32"),
        (torch.tensor([[0]]), ValueError, r"non-empty 1-D tensor of row numbers, got shape \[1, 1\]"),
        (torch.tensor([], dtype=torch.int64), ValueError, r"non-empty 1-D tensor .* got shape \[0\]"),
        (
            torch.tensor([0, 2]),
            ValueError,
            r"holds row 2, outside the state's batch of 2 sequences: valid rows are 0..1",
        ),
        (torch.tensor([-1]), ValueError, r"holds row -1, .* valid rows are 0..1"),
        ({0, 1}, TypeError, r"rows must be a 1-D torch.Tensor \(or a list\) of batch row numbers .*got set"),
        ([0, 1.0], TypeError, r"rows must hold integer row numbers, got 1.0 in list \[0, 1.0\]"),
        ([0, 2], ValueError, r"holds row 2, outside the state's batch of 2 sequences"),
    ],
)
def test_rows_are_checked_naming_what_is_valid(rows, error, message) -> None:
    cache = KVCache(torch.zeros(2, 1, 3, 4), torch.zeros(2, 1, 3, 4), 3)
    state = LMState((BlockState(torch.zeros(2, 3, 4), cache),))
    with pytest.raises(error, match=message):
        state.index_select(rows)


def test_rows_given_as_a_list_of_ints_select_as_the_tensor_does() -> None:
    """s45d's LOW: a plain list of row numbers was refused (a clear message, but a needless one)."""
    _, state = build("ttt-next_token")(ids_of(3, 6))
    by_list, by_tensor = state.index_select([2, 0, 0]), state.index_select(torch.tensor([2, 0, 0]))
    for mine, theirs in zip(by_list.blocks, by_tensor.blocks, strict=True):
        assert mine.mixer.tensors().keys() == theirs.mixer.tensors().keys()
        assert all(torch.equal(mine.mixer.tensors()[k], t) for k, t in theirs.mixer.tensors().items())


def test_states_that_cannot_be_joined_are_refused_naming_why() -> None:
    ttt, attention = build("ttt-next_token"), build("attention")
    ids = ids_of(2, 6)
    with torch.no_grad():
        _, at_5 = ttt(ids[:, :5])
        _, at_6 = ttt(ids)
        _, other_model = attention(ids[:, :5])
    with pytest.raises(ValueError, match=r"cannot concatenate TTTStates at different positions \[5, 6\]"):
        LMState.cat([at_5, at_6])
    with pytest.raises(ValueError, match=r"in one dtype.*state\.to\(\.\.\.\)"):
        LMState.cat([at_5, at_5.to(torch.float32)])
    with pytest.raises(TypeError, match=r"mixer states of different kinds \['KVCache', 'TTTState'\]"):
        LMState.cat([at_5, other_model])
    with pytest.raises(TypeError, match=r"states\[1\] is an E2EState, not a LMState"):
        LMState.cat([at_5, E2EState((), {}, torch.zeros(1, 0, 1), torch.zeros(1, 0), 0)])
    with pytest.raises(ValueError, match="non-empty list of LMStates"):
        LMState.cat([])
    other_layer = dataclasses.replace(
        at_5.blocks[0].mixer,
        signature=dataclasses.replace(at_5.blocks[0].mixer.signature, mini_batch_size=2),
    )
    with pytest.raises(ValueError, match="TTTStates of different layers.*only batch_size may differ"):
        TTTState.cat([at_5.blocks[0].mixer, other_layer], get_registry().inner_loss("next_token"))


def test_next_token_carry_rows_are_chosen_by_the_loss_and_its_shared_flag_kept() -> None:
    """The loss decides which carry entries are per sequence: ``next_token``'s 0-d ``has_previous`` is
    the batch's, kept as it is; a TTTState alone asks for the loss."""
    torch.manual_seed(0)
    layer = TTTLayer(16, 2, mini_batch_size=4, inner_loss="next_token").double()
    x = torch.randn(3, 10, 16, dtype=torch.float64)
    rows, joined_rows = torch.tensor([2, 2, 0]), torch.tensor([0, 2, 2, 0])
    with torch.no_grad():
        whole, _ = layer(x)
        _, state = layer(x[:, :6])
        with pytest.raises(
            ValueError, match=r"loss_carry holds \['has_previous', 'previous_key'\].*inner_loss="
        ):
            state.index_select(rows)
        with pytest.raises(ValueError, match="inner_loss is 'reconstruction'"):
            state.index_select(rows, get_registry().inner_loss("reconstruction"))
        selected = state.index_select(rows, layer.inner_loss)
        assert selected.loss_carry["has_previous"].dim() == 0
        assert selected.signature.batch_size == 3
        out, _ = layer(x[rows, 6:], selected)
        joined = TTTState.cat(
            [state.index_select(torch.tensor([0]), layer.inner_loss), selected], layer.inner_loss
        )
        out_joined, _ = layer(x[joined_rows, 6:], joined)
        fresh = layer.init_state(1, like=x)  # has_previous 0: it has read no token
        with pytest.raises(
            ValueError, match=r"loss_carry\['has_previous'\] is shared by the batch and differs"
        ):
            TTTState.cat([dataclasses.replace(fresh, position=6), selected], layer.inner_loss)
    assert largest_difference(out, whole[rows, 6:]) <= TOLERANCE
    assert largest_difference(out_joined, whole[joined_rows, 6:]) <= TOLERANCE


class SharedCarry(HalfSquaredError):
    """A loss whose carry holds an entry per sequence and one shared by the batch (``[H, f]``), and says
    nothing about them: the default reads ``init_carry``."""

    name = "shared_carry_s15"

    def init_carry(self, batch_size, num_heads, head_dim, like):
        return {
            "rows": like.new_zeros(batch_size, num_heads, head_dim),
            "shared": like.new_ones(num_heads, head_dim),
        }

    def pairs(self, views, carry):
        return LossPairs(views.key, views.value)


class OddCarry(SharedCarry):
    name = "odd_carry_s15"

    def init_carry(self, batch_size, num_heads, head_dim, like):
        return {"heads_first": like.new_zeros(num_heads, batch_size, head_dim)}


def test_the_default_carry_convention_reads_init_carry_and_refuses_what_it_cannot_tell() -> None:
    like = torch.zeros((), dtype=torch.float64)
    # two heads: the shared [H, f] entry has the shape of a 2-sequence batch-first one, and is still shared
    assert SharedCarry().batched_carry_keys(2, 4, like) == {"rows"}
    assert get_registry().inner_loss("next_token").batched_carry_keys(2, 4, like) == {"previous_key"}
    with pytest.raises(
        ValueError, match=r"'heads_first' shapes \[2, 2, 4\] for 2 sequences and \[2, 1, 4\] for 1"
    ):
        OddCarry().batched_carry_keys(2, 4, like)
    loss = SharedCarry()
    signature = StateSignature(2, 2, 4, 4, "linear", loss.name)
    carry = {"rows": torch.arange(16.0).reshape(2, 2, 4), "shared": torch.ones(2, 4)}
    state = TTTState({}, {}, 3, signature, loss_carry=carry)
    selected = state.index_select(torch.tensor([1, 1, 0]), loss)
    assert torch.equal(selected.loss_carry["rows"], carry["rows"][[1, 1, 0]])
    assert selected.loss_carry["shared"] is carry["shared"]
    joined = TTTState.cat([state, selected], loss)
    assert joined.loss_carry["rows"].shape[0] == 5 and joined.signature.batch_size == 5


class LateCarry(SharedCarry):
    """A loss whose ``pairs`` adds a carry entry that ``init_carry`` does not make: the default cannot
    tell whether it holds a row per sequence."""

    name = "late_carry_s15"

    def init_carry(self, batch_size, num_heads, head_dim, like):
        return {}


def test_a_carry_entry_the_default_convention_cannot_see_is_refused_not_kept_whole() -> None:
    loss = LateCarry()
    signature = StateSignature(2, 2, 4, 4, "linear", loss.name)
    state = TTTState({}, {}, 3, signature, loss_carry={"last": torch.arange(16.0).reshape(2, 2, 4)})
    with pytest.raises(ValueError, match=r"loss_carry holds \['last'\], which .*init_carry does not make"):
        state.index_select(torch.tensor([1, 0]), loss)
    with pytest.raises(ValueError, match=r"override InnerLoss.batched_carry_keys"):
        TTTState.cat([state, state], loss)


# --- HIGH-1, MED-2, MED-1: full attention's room ---------------------------------------------------------


def attention_lm() -> CausalLM:
    torch.manual_seed(0)
    config = ModelConfig(mixer="attention", hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64)
    return CausalLM(config).double().eval()


def with_caches(state: LMState, make) -> LMState:
    """``state`` with each block's KVCache replaced by ``make(cache)``."""
    return LMState(tuple(BlockState(b.conv, make(b.mixer)) for b in state.blocks))


def prefill_and_decode_one(model: CausalLM, ids: torch.Tensor) -> tuple[torch.Tensor, LMState]:
    """The logits of ``ids`` in one call, and the state after a 9-token prefill and one decoded token
    (full attention's cache then lives in a room)."""
    full, _ = model(ids)
    _, state = model(ids[:, :9])
    _, state = model(ids[:, 9:10], state)
    return full, state


def test_an_edited_value_of_a_decoded_cache_is_the_one_attended_to() -> None:
    """HIGH-1: once a cache lives in a room (a token decoded without autograd), a cache holding another
    value tensor (dataclasses.replace) is attended with that value, as a KVCache built anew is."""
    model = attention_lm()
    ids = ids_of(2, 12, seed=3)
    with torch.no_grad():
        full, state = prefill_and_decode_one(model, ids)
        assert state.blocks[0].mixer._room is not None
        # first, while the room's next positions are free: a cache that keeps the room but holds another
        # value (built by hand) is not continued in place
        kept_room = with_caches(
            state, lambda c: KVCache.in_room(c.key, torch.zeros_like(c.value), c.position, c._room)
        )
        from_kept_room, _ = model(ids[:, 10:], kept_room)
        zeroed = with_caches(state, lambda c: dataclasses.replace(c, value=torch.zeros_like(c.value)))
        built = with_caches(state, lambda c: KVCache(c.key, torch.zeros_like(c.value), c.position))
        assert zeroed.blocks[0].mixer._room is None  # replace drops the room
        from_zeroed, _ = model(ids[:, 10:], zeroed)
        from_built, _ = model(ids[:, 10:], built)
        plain, _ = model(ids[:, 10:], state)
        # the same numbers in another tensor: the whole sequence's logits
        copied = with_caches(state, lambda c: dataclasses.replace(c, value=c.value.clone()))
        from_copied, _ = model(ids[:, 10:], copied)
    assert torch.equal(from_zeroed, from_built) and torch.equal(from_kept_room, from_built)
    assert largest_difference(from_zeroed, plain) > 1e-3
    assert largest_difference(from_copied, full[:, 10:]) <= TOLERANCE
    assert largest_difference(plain, full[:, 10:]) <= TOLERANCE


def test_selected_rows_of_a_decoded_cache_get_a_room_the_next_token_is_written_into() -> None:
    """Beam search selects rows between two tokens: the selection is copied once, into a room of the
    same capacity, and the next token goes into that room in place (regression review s15, LOW-3: it
    was copied a second time, into a room 256 positions larger, at every step)."""
    model = attention_lm()
    ids = ids_of(3, 12, seed=5)
    rows = torch.tensor([2, 0, 0])
    with torch.no_grad():
        _, state = prefill_and_decode_one(model, ids)
        full, _ = model(ids[rows])
        selected = state.index_select(rows)
        logits, after = model(ids[rows, 10:11], selected)
        cache, cache_after = selected.blocks[0].mixer, after.blocks[0].mixer
        assert cache._room is not None
        assert cache._room.key.shape[2] == state.blocks[0].mixer._room.key.shape[2]
        assert cache_after.key.data_ptr() == cache.key.data_ptr()  # written in place
        assert largest_difference(logits, full[:, 10:11]) <= TOLERANCE
        logits, _ = model(ids[rows, 11:], after)
        assert largest_difference(logits, full[:, 11:]) <= TOLERANCE
        logits, _ = model(ids[:, 10:], state)  # the batch's cache is untouched
        assert largest_difference(logits, model(ids)[0][:, 10:]) <= TOLERANCE


def test_sliced_and_expanded_rows_of_a_decoded_cache_continue_as_those_sequences() -> None:
    """MED-2: a row-0 slice of a decoded (room) cache, and a 1-row cache expanded to 3, are views of the
    room with another batch size: they are copied, not written into the room, and continue exactly."""
    model = attention_lm()
    ids = ids_of(3, 12, seed=4)
    with torch.no_grad():
        full, state = prefill_and_decode_one(model, ids)
        for make in (
            lambda c: dataclasses.replace(c, key=c.key[0:1], value=c.value[0:1]),
            lambda c: KVCache.in_room(c.key[0:1], c.value[0:1], c.position, c._room),  # the room kept
        ):
            logits, _ = model(ids[:1, 10:], with_caches(state, make))
            assert largest_difference(logits, full[:1, 10:]) <= TOLERANCE
        logits, _ = model(ids[:, 10:], state)  # the batch's cache is untouched
        assert largest_difference(logits, full[:, 10:]) <= TOLERANCE

        prompt = ids[:1, :10].expand(3, -1)
        expanded_full, _ = model(torch.cat((prompt, ids[:, 10:]), dim=1))
        _, one = model(prompt[:1, :9])
        _, one = model(prompt[:1, 9:10], one)
        for make in (
            lambda c: dataclasses.replace(
                c, key=c.key.expand(3, -1, -1, -1), value=c.value.expand(3, -1, -1, -1)
            ),
            lambda c: KVCache.in_room(
                c.key.expand(3, -1, -1, -1), c.value.expand(3, -1, -1, -1), c.position, c._room
            ),
        ):
            logits, _ = model(ids[:, 10:], with_caches(one, make))
            assert largest_difference(logits, expanded_full[:, 10:]) <= TOLERANCE


def test_a_cache_made_under_inference_mode_continues_under_no_grad() -> None:
    """MED-1: the room is an inference tensor, which cannot be written outside inference mode: the cache
    is copied into a new room instead."""
    model = attention_lm()
    ids = ids_of(2, 12, seed=5)
    with torch.inference_mode():
        _, state = model(ids[:, :8])
        _, state = model(ids[:, 8:9], state)
    with torch.no_grad():
        full, _ = model(ids)
        logits, state = model(ids[:, 9:11], state)
        last, _ = model(ids[:, 11:], state)  # and the new room is written in place from then on
    assert largest_difference(torch.cat((logits, last), dim=1), full[:, 9:]) <= TOLERANCE
    with torch.inference_mode():  # the inference-mode branch itself still decodes in place
        _, again = model(ids[:, :8])
        _, again = model(ids[:, 8:9], again)
        room = again.blocks[0].mixer._room
        _, again = model(ids[:, 9:10], again)
    assert again.blocks[0].mixer._room is room


# --- LOW-1, LOW-2, LOW-3: clone, to, save and copy --------------------------------------------------------


def test_a_model_state_made_under_inference_mode_continues_under_grad_after_clone() -> None:
    """LOW-1: the TTT layer's advice, ``state.clone()`` outside inference mode, works at model level."""
    model = build("ttt-linear-share_qk")
    ids = ids_of(2, 9)
    with torch.inference_mode():
        _, state = model(ids[:, :5])
    with pytest.raises(ValueError, match=r"state.clone\(\) called outside inference mode"):
        model(ids[:, 5:], state)
    logits, _ = model(ids[:, 5:], state.clone())
    full, _ = model(ids)
    assert largest_difference(logits, full[:, 5:]) <= TOLERANCE
    assert logits.requires_grad


def clone_continues_and_copies_every_tensor(model: torch.nn.Module) -> None:
    """A clone of a decoded state continues exactly and shares no memory with the state."""
    ids = ids_of(2, 9)
    with torch.no_grad():
        _, state = model(ids[:, :5])
        _, state = model(ids[:, 5:6], state)
        cloned = state.clone()
        logits, _ = model(ids[:, 6:], cloned)
        full, _ = model(ids)
    assert type(cloned) is type(state)
    assert largest_difference(logits, full[:, 6:]) <= TOLERANCE
    originals = {t.data_ptr() for t in _tensors(state) if t.numel()}
    assert not originals & {t.data_ptr() for t in _tensors(cloned) if t.numel()}


def test_clone_copies_every_tensor_of_a_state() -> None:
    clone_continues_and_copies_every_tensor(build("attention"))


def _tensors(state: object) -> list[torch.Tensor]:
    return list(state_tensors(state).values())


def test_an_e2e_state_and_its_caches_move_and_cast_like_tensors() -> None:
    """LOW-2: ``E2EState.to`` and ``ChunkKVCache.to``; the pending token ids keep their dtype. And
    LOW-1's ``clone`` for an E2E state."""
    model = build("e2e")
    clone_continues_and_copies_every_tensor(model)
    ids = ids_of(2, 8)
    with torch.no_grad():
        _, state = model(ids[:, :5])
    assert isinstance(state.caches[-1], ChunkKVCache) and state.pending.shape[1] > 0
    single = state.to(torch.float32)
    floats = {t.dtype for t in _tensors(single) if t.is_floating_point()}
    assert floats == {torch.float32} and single.pending_ids.dtype == torch.int64
    on_meta = state.to("meta")
    assert {t.device.type for t in _tensors(on_meta)} == {"meta"}
    assert on_meta.pending_ids.dtype == torch.int64
    cache = state.caches[-1].to(torch.float32)
    assert (cache.key.dtype, cache.value.dtype) == (torch.float32, torch.float32)
    with torch.no_grad():
        logits, _ = model(ids[:, 5:], state.to("cpu"))
        full, _ = model(ids)
    assert largest_difference(logits, full[:, 5:]) <= TOLERANCE


@pytest.mark.parametrize(
    "kind",
    ["ttt-next_token", "attention", pytest.param("e2e", marks=pytest.mark.slow)],
    # reason (e2e): an E2E model's inner steps, ~0.6 s; E2EState and ChunkKVCache are registered the same way
)
def test_saved_states_load_with_torch_load_defaults_and_deepcopy(kind: str) -> None:
    """LOW-3: ``torch.load`` (weights_only=True by default) loads a saved state; a deep copy of a decoded
    state, and of a state made with grad once detached, continue exactly."""
    model = build(kind)
    ids = ids_of(2, 9)
    full, _ = model(ids)
    _, with_grad = model(ids[:, :5])
    with torch.no_grad():
        _, state = model(ids[:, :5])
        _, state = model(ids[:, 5:6], state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer)
    for continued in (loaded, copy.deepcopy(state)):
        with torch.no_grad():
            logits, _ = model(ids[:, 6:], continued)
        assert largest_difference(logits, full[:, 6:]) <= TOLERANCE
    with torch.no_grad():
        logits, _ = model(ids[:, 5:], copy.deepcopy(with_grad.detach()))
    assert largest_difference(logits, full[:, 5:]) <= TOLERANCE
    if kind == "attention":
        assert loaded.blocks[0].mixer._room is None  # saved without its room: it owns its keys
