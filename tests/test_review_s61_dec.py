"""Review s61 (helper dec): decoding and state."""

from __future__ import annotations

import threading

import torch

from innerloop.hf import InnerloopConfig, InnerloopForCausalLM
from innerloop.hf.arguments import recording_hidden_states
from innerloop.hf.modeling import embeddings_given
from innerloop.models import CausalLM, ModelConfig
from innerloop.models import attention as attention_module


def test_two_threads_continuing_one_attention_cache_each_get_their_own_keys(monkeypatch):
    """review s61 dec (MED, silent wrong numbers): full attention's cache, decoded without autograd, grows
    in place in a buffer (its room) when nobody has written past it. Two threads continuing one cache at
    once (a server answering two requests from one prompt's state) both passed that check before either
    wrote, both wrote the same next positions, and one of them attended to the other's keys, then and at
    every later token. The check and the claim of the positions are now one step under the room's lock:
    the second thread copies the cache. Here both threads are held between the check and the write (the
    barrier times out with the fix, the second thread then waiting on the lock)."""
    torch.manual_seed(0)
    config = ModelConfig(mixer="attention", vocab_size=32, hidden_size=16, num_layers=1, num_heads=2)
    model = CausalLM(config).double().eval()
    prompt = torch.randint(0, 32, (2, 6))
    with torch.no_grad():
        _, state = model(prompt[:, :-1])
        _, state = model(prompt[:, -1:], state)  # a decoded step: the cache is a view of its room
        plain = state.clone()  # the same cache without a room: the reference continues from it
        tokens = {0: torch.tensor([[3], [4]]), 1: torch.tensor([[7], [9]])}
        after = torch.tensor([[1], [2]])
        wanted = {}
        for name, token in tokens.items():
            logits, continued = model(token, plain)
            wanted[name] = (logits, model(after, continued)[0])
    assert state.blocks[0].mixer._room is not None

    fits = attention_module._room_fits
    barrier = threading.Barrier(2)

    def held_after_the_check(*args):
        result = fits(*args)
        try:
            barrier.wait(timeout=0.5)
        except threading.BrokenBarrierError:
            pass  # the other thread waits on the room's lock: it checks once this one has claimed
        return result

    monkeypatch.setattr(attention_module, "_room_fits", held_after_the_check)
    got, errors = {}, []

    def decode(name):
        try:
            with torch.no_grad():
                logits, continued = model(tokens[name], state)
                got[name] = (logits, model(after, continued)[0])
        except BaseException as error:  # noqa: BLE001 (reported below)
            errors.append(error)

    threads = [threading.Thread(target=decode, args=(name,)) for name in tokens]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for name in tokens:
        for got_logits, wanted_logits in zip(got[name], wanted[name], strict=True):
            torch.testing.assert_close(got_logits, wanted_logits, rtol=0, atol=1e-12)


def _in_another_thread(function):
    """``function()`` run in a new thread, its result (or its error raised here)."""
    result = {}

    def run():
        try:
            result["value"] = function()
        except BaseException as error:  # noqa: BLE001 (raised below)
            result["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def test_another_threads_forward_is_not_changed_by_a_call_with_inputs_embeds_or_hidden_states():
    """review s61 dec (MED, silent wrong numbers, the kind of the cache fix above): InnerloopForCausalLM
    reads inputs_embeds by a forward hook on the shared embedding, and records hidden states by forward
    hooks on the shared blocks. A forward of the same model in another thread meanwhile (a server's other
    request) had its embeddings replaced by this call's (same shape: silently other logits), and its hidden
    states appended to this call's. The hooks now act in the thread that set them only."""
    torch.manual_seed(0)
    config = InnerloopConfig(model={"hidden_size": 16, "num_heads": 2, "num_layers": 2, "vocab_size": 32})
    model = InnerloopForCausalLM(config).double().eval()
    ids = torch.randint(0, 32, (2, 5))
    with torch.no_grad():
        wanted = model(ids).logits
        other = torch.randn(2, 5, 16, dtype=torch.float64)
        with embeddings_given(model.model.embed, other):
            mine = model.model(torch.zeros_like(ids))[0]  # this thread: the embeddings given
            theirs = _in_another_thread(lambda: model(ids).logits)
        with recording_hidden_states(model.model) as recorded:
            _in_another_thread(lambda: model(ids).logits)
    torch.testing.assert_close(theirs, wanted, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(mine, model(inputs_embeds=other).logits, rtol=0, atol=0)
    assert recorded == []
