"""Registering plugins from several threads at once: each registration is whole before the next."""

import threading

import pytest

import innerloop
from innerloop.core.protocol import InnerLoss, LossPairs
from innerloop.registry import PluginError, get_registry, isolated_registry


def _scaled_reconstruction(name: str, scale: float) -> InnerLoss:
    """A reconstruction loss named ``name``; every call makes a new class of one qualified name (as a
    factory in a user's module would)."""

    class ScaledReconstruction(InnerLoss):
        def pairs(self, views, carry):
            return LossPairs(inputs=views.key, targets=views.value, valid=None, carry={})

        def token_loss(self, prediction, target):
            return scale * (prediction - target).pow(2).sum(dim=-1)

    loss = ScaledReconstruction()
    loss.name = name
    return loss


def _in_threads(work, count: int) -> list[BaseException | None]:
    """``work(i)`` for i < count, each in its own thread started together: what each raised, or None."""
    outcomes: list[BaseException | None] = [None] * count
    start = threading.Barrier(count)

    def run(i: int) -> None:
        start.wait()
        try:
            work(i)
        except BaseException as error:  # noqa: BLE001 - reported to the test
            outcomes[i] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def test_instances_of_one_class_registered_from_threads_all_register():
    """Each takes its own default origin (``module.QualName:name`` after the first): they raced for the
    same one and all but one were refused as 'already registered'."""
    with isolated_registry():
        get_registry()  # built before the threads start, as a user's first layer would have
        outcomes = _in_threads(
            lambda i: innerloop.register_inner_loss(_scaled_reconstruction(f"t_{i}", 1 + i)), 4
        )
        assert outcomes == [None] * 4
        assert {f"t_{i}" for i in range(4)} <= set(get_registry().names("inner_loss"))
        origins = {
            entry.origin for entry in get_registry().entries("inner_loss") if entry.name.startswith("t_")
        }
        assert len(origins) == 4


@pytest.mark.slow  # 0.6 s: the plugin checks in two threads
def test_one_name_registered_from_two_threads_is_registered_once():
    """Two plugins offering one name at once: one is registered, the other is refused by name. Each
    plugin's hook waits, after its object passed the clash check, for the other to pass it too (half a
    second at most): without a lock around registration both passed and the second silently replaced
    the first."""
    both_checked = threading.Barrier(2)

    class Plugin:
        def __init__(self, scale: float) -> None:
            self.scale = scale

        @innerloop.hookimpl
        def register_inner_losses(self, register):
            register(_scaled_reconstruction("same", self.scale))
            try:
                both_checked.wait(timeout=0.5)
            except threading.BrokenBarrierError:  # the other waits for this registration to end
                pass

    with isolated_registry():
        get_registry()
        outcomes = _in_threads(lambda i: innerloop.register(Plugin(1 + i), origin=f"origin_{i}"), 2)
        refused = [error for error in outcomes if error is not None]
        assert len(refused) == 1 and isinstance(refused[0], PluginError)
        assert "'same'" in str(refused[0]) and "already registered" in str(refused[0])
        winner = outcomes.index(None)
        [entry] = [e for e in get_registry().entries("inner_loss") if e.name == "same"]
        assert entry.origin == f"origin_{winner}"
