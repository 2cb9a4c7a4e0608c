"""Review s24: threads, processes and environment variables.

The same layer or language model called from several Python threads at once, ``torch.set_num_threads``
changed between a forward and its backward, a layer used in a forked child (as DataLoader workers do)
after the parent loaded the CPU kernel and kept its scan buffers, and the environment variables the
library reads, with odd values. Every test that starts a process bounds it by a timeout.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from pathlib import Path

import pytest
import torch

from innerloop import TTTLayer
from innerloop.kernels.cpu import buffers, build
from innerloop.kernels.cpu.buffers import release_buffers, scan_buffer

pytestmark = pytest.mark.usefixtures("cpu_kernels")  # skips, with the reason, where nothing compiles

FORK = "fork" in multiprocessing.get_all_start_methods()


def _layer(model: str = "linear", width: int = 24, heads: int = 3) -> TTTLayer:
    torch.manual_seed(0)
    return TTTLayer(width, heads, inner_model=model, mini_batch_size=4, kernel="auto").double()


def _x(seed: int, tokens: int = 12, width: int = 24) -> torch.Tensor:
    return torch.randn(2, tokens, width, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _train(layer: TTTLayer, x: torch.Tensor) -> list[torch.Tensor]:
    """Output, final inner weights and every gradient of one training step (nothing is stepped)."""
    x = x.clone().requires_grad_(True)
    y, state = layer(x)
    grads = torch.autograd.grad(y.square().sum(), [x, *layer.parameters()])
    return [y.detach(), *(p.detach() for p in state.params.values()), *grads]


def _infer(layer: TTTLayer, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        y, state = layer(x)
    return [y, *state.params.values()]


def _kernel_ran(layer: TTTLayer, model: str) -> bool:
    return any(path.startswith(f"cpu_ttt_{model}") for path, _ in layer.dispatches)


def _in_threads(jobs) -> list:
    """Run each of ``jobs`` (callables) in its own thread, released together; their results in order
    (an exception in a thread is raised here)."""
    results: list = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def work(index: int) -> None:
        barrier.wait()
        try:
            results[index] = jobs[index]()
        except BaseException as error:  # noqa: BLE001  re-raised in the caller below
            results[index] = error

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


@pytest.fixture(autouse=True)
def _no_kept_buffers():
    release_buffers()
    yield
    release_buffers()


# --------------------------------------------------------------------------------------------------
# 1. One layer, one model, several Python threads
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("model", ["linear", "mlp"])
def test_threads_training_and_inferring_on_one_layer_get_the_single_threaded_numbers(model):
    """Four threads at once on one layer, two training (each holds a kept scan buffer from its forward
    to its backward) and two inferring, sequences of different lengths, three rounds (the later ones
    reuse the buffers): every output, state and gradient equals the one the same call gives alone."""
    layer = _layer(model)
    xs = [_x(seed, tokens=8 + 4 * seed) for seed in range(4)]
    calls = [_train, _infer, _train, _infer]
    alone = [call(layer, x) for call, x in zip(calls, xs, strict=True)]
    assert _kernel_ran(layer, model)
    for _ in range(3):
        together = _in_threads([lambda c=c, x=x: c(layer, x) for c, x in zip(calls, xs, strict=True)])
        for want, got in zip(alone, together, strict=True):
            for a, b in zip(want, got, strict=True):
                torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)
    assert len(buffers._kept) <= buffers.KEPT_BUFFERS


@pytest.mark.slow
def test_threads_training_one_language_model_get_the_single_threaded_gradients():
    """The language model (two TTT blocks on the CPU kernel) trained from three threads at once."""
    from innerloop.models import CausalLM, ModelConfig, TTTConfig

    torch.manual_seed(0)
    config = ModelConfig(
        hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, ttt=TTTConfig(mini_batch_size=4)
    )
    lm = CausalLM(config).double()
    ids = [
        torch.randint(0, 256, (2, 8 * (i + 1)), generator=torch.Generator().manual_seed(i)) for i in range(3)
    ]

    def step(tokens: torch.Tensor) -> list[torch.Tensor]:
        logits = lm(tokens)[0]
        return [logits.detach(), *torch.autograd.grad(logits.square().mean(), list(lm.parameters()))]

    alone = [step(t) for t in ids]
    assert _kernel_ran(lm.blocks[0].mixer, "linear")
    together = _in_threads([lambda t=t: step(t) for t in ids])
    for want, got in zip(alone, together, strict=True):
        for a, b in zip(want, got, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)


def test_threads_asking_for_buffers_at_once_never_share_one():
    """scan_buffer from eight threads at once, each holding what it got: no two share memory."""
    like = torch.zeros(1)
    scan_buffer(1000, like)  # one kept and free: every thread would like it
    got = _in_threads([lambda: scan_buffer(1000, like) for _ in range(8)])
    assert len({t.untyped_storage().data_ptr() for t in got}) == len(got)


@pytest.mark.slow
def test_a_calls_dispatches_are_its_own_while_another_thread_calls_the_layer():
    """Thread A calls the layer; in the middle of A's call (after it reset ``dispatches``) thread B makes
    a whole call. What A then reads in ``layer.dispatches`` must be A's call's paths only."""
    layer = _layer()
    x = _x(0)
    with torch.no_grad():
        layer(x)
    alone = list(layer.dispatches)
    seen_by = {}
    started = []

    def other_call() -> None:
        with torch.no_grad():
            layer(_x(1))
        seen_by["B"] = list(layer.dispatches)

    def in_the_middle(module, inputs, output):
        if not started:  # once: B's own call runs this hook too
            started.append(True)
            thread = threading.Thread(target=other_call)
            thread.start()
            thread.join(timeout=60)

    handle = layer.q_proj.register_forward_hook(in_the_middle)
    try:
        with torch.no_grad():
            layer(x)
    finally:
        handle.remove()
    assert seen_by["B"] == alone  # B (which ran whole) saw its own
    assert layer.dispatches == alone, layer.dispatches  # A: its own paths, not B's as well


# --------------------------------------------------------------------------------------------------
# 2. torch.set_num_threads, also changed between a forward and its backward
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("model", ["linear", "mlp"])
def test_thread_count_changed_between_forward_and_backward_gives_the_same_numbers(model):
    """Forward on one thread count, backward on another (1, 3, 5 on a 2-core machine): the kernel's
    numbers are bitwise those of 2 and 2 threads (it splits whole (batch, head) pairs over the threads);
    only the post-norm's gradients (torch's own LayerNorm backward, which reduces in a thread-dependent
    order) differ, by rounding."""
    layer = _layer(model)
    x = _x(3, tokens=16)
    names = ["y", *layer.init_state(1).params, "x", *(n for n, _ in layer.named_parameters()), "y infer"]
    previous = torch.get_num_threads()

    def run(forward: int, backward: int) -> list[torch.Tensor]:
        torch.set_num_threads(forward)
        xx = x.clone().requires_grad_(True)
        y, state = layer(xx)
        torch.set_num_threads(backward)
        grads = torch.autograd.grad(y.square().sum(), [xx, *layer.parameters()])
        torch.set_num_threads(forward)
        with torch.no_grad():
            inferred = layer(x)[0]
        return [y.detach(), *(p.detach() for p in state.params.values()), *grads, inferred]

    try:
        reference = run(2, 2)
        assert _kernel_ran(layer, model)
        for forward, backward in [(5, 1), (1, 5), (3, 2), (2, 3)]:
            got = run(forward, backward)
            for name, a, b in zip(names, got, reference, strict=True):
                if name.startswith("post_norm."):
                    torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
                else:
                    assert torch.equal(a, b), (forward, backward, name)
    finally:
        torch.set_num_threads(previous)


# --------------------------------------------------------------------------------------------------
# 3. Forked processes
# --------------------------------------------------------------------------------------------------


class _LayerSteps(torch.utils.data.Dataset):
    """A dataset whose items are a training step and an inference of ``layer`` (in a DataLoader worker)."""

    def __init__(self, layer: TTTLayer, xs: list[torch.Tensor]) -> None:
        self.layer, self.xs = layer, xs

    def __len__(self) -> int:
        return len(self.xs)

    def __getitem__(self, index: int):
        x = self.xs[index]
        return _train(self.layer, x) + _infer(self.layer, x), [p for p, _ in self.layer.dispatches]


@pytest.mark.slow
@pytest.mark.skipif(not FORK, reason="no fork start method here")
@pytest.mark.parametrize("model", ["linear", "mlp"])
def test_forked_dataloader_workers_use_the_layer_the_parent_trained(model):
    """The parent trains (the kernel library loaded, its scan buffers kept) and infers; then DataLoader
    workers forked from it train and infer with the same layer: the parent's numbers, the kernel's path,
    no hang (the DataLoader's timeout bounds each batch)."""
    layer = _layer(model)
    xs = [_x(seed) for seed in range(4)]
    expected = [_train(layer, x) + _infer(layer, x) for x in xs]
    assert buffers._kept and _kernel_ran(layer, model)
    loader = torch.utils.data.DataLoader(
        _LayerSteps(layer, xs),
        batch_size=None,
        num_workers=2,
        multiprocessing_context="fork",
        timeout=60,
    )
    results = list(loader)
    assert len(results) == len(xs)
    for (got, paths), want in zip(results, expected, strict=True):
        assert any(p.startswith(f"cpu_ttt_{model}") for p in paths), paths
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def _child_training_step(layer: TTTLayer, x: torch.Tensor, expected: list[torch.Tensor]) -> None:
    torch.set_num_threads(1)  # as a DataLoader worker does (torch's own OpenMP pool does not survive fork)
    got = _train(layer, x)
    ok = all(torch.allclose(a, b, rtol=1e-12, atol=1e-14) for a, b in zip(got, expected, strict=True))
    os._exit(0 if ok and _kernel_ran(layer, "linear") else 3)


@pytest.mark.slow
@pytest.mark.skipif(not FORK, reason="no fork start method here")
def test_a_fork_while_another_thread_is_in_scan_buffer_leaves_a_working_child():
    """A thread of the parent is inside ``scan_buffer`` (holds its lock) when the process forks; the
    child trains the layer. The lock's holder does not exist in the child: the child must not wait
    for it (``os.register_at_fork(after_in_child=...)`` giving the child a fresh lock)."""
    layer = _layer()
    x = _x(5, tokens=8)
    expected = _train(layer, x)
    held, release = threading.Event(), threading.Event()

    def inside_scan_buffer() -> None:
        with buffers._lock:
            held.set()
            release.wait(timeout=60)

    holder = threading.Thread(target=inside_scan_buffer)
    holder.start()
    held.wait(timeout=30)
    try:
        child = multiprocessing.get_context("fork").Process(
            target=_child_training_step, args=(layer, x, expected)
        )
        child.start()
        child.join(timeout=8)
        hung = child.is_alive()
        if hung:
            child.kill()
            child.join(timeout=10)
    finally:
        release.set()
        holder.join(timeout=30)
    assert not hung, "the forked child hung on the scan buffers' lock"
    assert child.exitcode == 0


# --------------------------------------------------------------------------------------------------
# 4. Environment variables
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("model", ["linear", "mlp"])
def test_disabling_the_cpu_kernels_after_a_forward_leaves_its_backward_running(model, monkeypatch):
    """The variable "is read on every use, so it can be set at any time" (build.py): a backward whose
    forward ran on the kernel must still run (it cannot switch path half-way), with the right gradients."""
    layer = _layer(model)
    x = _x(7).requires_grad_(True)
    expected = torch.autograd.grad(layer(x)[0].square().sum(), [x, *layer.parameters()])
    y = layer(x)[0]
    assert _kernel_ran(layer, model)
    monkeypatch.setenv(build.DISABLE_VARIABLE, "1")  # e.g. another thread, or a guard around evaluation
    got = torch.autograd.grad(y.square().sum(), [x, *layer.parameters()])
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.slow
def test_disabling_the_cpu_kernels_for_a_forward_runs_the_torch_path_and_names_the_variable(monkeypatch):
    """Set before a call (as documented): that call runs the fused torch path with the variable named in
    its dispatch reason, and the kernel is back once it is unset."""
    layer = _layer()
    x = _x(8)
    monkeypatch.setenv(build.DISABLE_VARIABLE, "1")
    with torch.no_grad():
        slow = layer(x)[0]
    assert not _kernel_ran(layer, "linear")
    assert any(f"{build.DISABLE_VARIABLE}=1" in reason for _, reason in layer.dispatches)
    monkeypatch.delenv(build.DISABLE_VARIABLE)
    with torch.no_grad():
        fast = layer(x)[0]
    assert _kernel_ran(layer, "linear")
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("value", ["false", "no", "off"])
def test_disable_cpu_kernels_set_to_a_false_word_does_not_disable_them(value, monkeypatch):
    """Either the kernels stay on, or the value is refused with an error naming the variable."""
    monkeypatch.setenv(build.DISABLE_VARIABLE, value)
    layer = _layer()
    try:
        with torch.no_grad():
            layer(_x(9))
    except (ValueError, RuntimeError) as error:  # a clear refusal is a fix too
        assert build.DISABLE_VARIABLE in str(error)
        return
    assert _kernel_ran(layer, "linear"), layer.dispatches


@pytest.mark.parametrize("value", ["false", "no", "off"])
def test_keep_scan_buffers_set_to_a_false_word_keeps_nothing(value, monkeypatch):
    monkeypatch.setenv("INNERLOOP_KEEP_SCAN_BUFFERS", value)
    try:
        scan_buffer(10, torch.zeros(1))
    except (ValueError, RuntimeError) as error:  # a clear refusal is a fix too
        assert "INNERLOOP_KEEP_SCAN_BUFFERS" in str(error)
        return
    assert not buffers._kept


@pytest.mark.parametrize("value", ["y", "2", "disable"])
def test_an_unrecognised_disable_external_plugins_value_does_not_load_them_silently(value, monkeypatch):
    """The safety switch must not fail open: an unrecognised value disables, or is refused naming it."""
    from innerloop.registry import manager

    monkeypatch.setenv(manager.DISABLE_ENV, value)
    try:
        enabled, _ = manager._allowed_external()
    except (ValueError, RuntimeError) as error:
        assert manager.DISABLE_ENV in str(error)
        return
    assert not enabled


@pytest.mark.parametrize("value", ["0", "", "false", "no", "off"])
def test_disable_external_plugins_false_values_keep_them(value, monkeypatch):
    from innerloop.registry import manager

    monkeypatch.delenv(manager.ALLOW_ENV, raising=False)
    monkeypatch.setenv(manager.DISABLE_ENV, value)
    assert manager._allowed_external() == (True, None)


def test_a_cache_dir_starting_with_a_tilde_is_the_home_folder(monkeypatch):
    monkeypatch.setenv("INNERLOOP_CACHE_DIR", "~/innerloop-cache")
    assert build.cache_dir() == Path.home() / "innerloop-cache"


def test_a_relative_cache_dir_builds_and_runs_the_kernel(cpu_kernels, tmp_path, monkeypatch):
    """A relative INNERLOOP_CACHE_DIR is taken from the current directory; the library found there is
    the one the process loaded (same file, by the hash in its name)."""
    # this process's library, found before the variable changes: looked up inside the fake compile, in a
    # process that had not loaded it yet (an xdist worker's first kernel test), it built into the relative
    # cache too and waited on that folder's lock, which the build around it held: 15 minutes, then a build
    loaded = build.library_path()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("INNERLOOP_CACHE_DIR", "relative/cache")
    monkeypatch.setattr(build, "_compile", lambda compiler, flags, target: _copy_of(loaded, target))
    path = build._build()
    assert not path.is_absolute() and (tmp_path / path).is_file()
    assert path.name == loaded.name


def _copy_of(library, target):  # no compile in a test: the loaded library
    import shutil
    import subprocess

    shutil.copyfile(library, target)
    return subprocess.CompletedProcess([], 0, "", "")


def test_an_unwritable_cache_dir_is_refused_naming_the_variable(tmp_path, monkeypatch):
    blocker = tmp_path / "a file"
    blocker.write_text("")
    monkeypatch.setenv("INNERLOOP_CACHE_DIR", str(blocker))
    with pytest.raises(build.CPUKernelUnavailable, match="INNERLOOP_CACHE_DIR"):
        build._build()


@pytest.mark.parametrize("value", ["/nonexistent/c++", "ccache g++"])
def test_a_cxx_that_does_not_run_is_named_as_cxx(value, tmp_path, monkeypatch):
    monkeypatch.setenv("INNERLOOP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", value)
    with pytest.raises(build.CPUKernelUnavailable) as caught:
        build._build()
    assert "CXX" in str(caught.value)


def test_dropping_the_verdicts_of_freed_plugins_survives_a_verdict_added_meanwhile(monkeypatch):
    """Another thread's dispatch may add a verdict while ``_drop_freed`` walks the table (simulated here,
    deterministically, by a key whose comparison adds one): the walk must not fail with "dictionary
    changed size during iteration", and the freed object's verdict goes."""
    from innerloop.kernels import first_use

    plugin = torch.nn.Linear(1, 1)  # holds tensors: held by a weak reference
    freed = first_use._Held(plugin)
    ref = freed.ref
    assert ref is not None

    class AddsAVerdict:
        @property
        def ref(self):  # read while the table is walked: as if another thread dispatched right then
            verdicts.setdefault(("added meanwhile",), None)
            return None

    verdicts: dict = {}
    monkeypatch.setattr(first_use, "_VERDICTS", verdicts)
    monkeypatch.setattr(first_use, "_DEFERRALS", {})
    monkeypatch.setattr(first_use, "_FREED", [ref])
    monkeypatch.setattr(first_use, "_Held", (first_use._Held, AddsAVerdict))  # isinstance takes a tuple
    verdicts[(AddsAVerdict(),)] = None
    verdicts[(freed,)] = "a verdict about the freed object"
    first_use._drop_freed()
    assert (freed,) not in verdicts and ("added meanwhile",) in verdicts
    first_use._drop_freed()  # nothing left to drop: returns


def test_an_unclear_keep_buffers_switch_at_the_kernels_first_use_is_the_users_error_not_a_kernel_verdict(
    monkeypatch,
):
    """The kernel's first-use check calls the kernel, which reads INNERLOOP_KEEP_SCAN_BUFFERS: a value that
    is neither yes nor no must reach the caller naming the variable, not be recorded as the kernel failing
    its check (which left every later call on the slower torch path, even once the value was fixed)."""
    from innerloop.core.environment import EnvironmentSwitchError
    from innerloop.kernels import first_use

    saved = first_use.saved_verdicts()
    first_use.forget_verdicts()
    try:
        layer = TTTLayer(16, 2, mini_batch_size=4)
        x = torch.randn(1, 8, 16, requires_grad=True)  # training: the compiled scan takes a kept buffer
        monkeypatch.setenv("INNERLOOP_KEEP_SCAN_BUFFERS", "maybe")
        with pytest.raises(EnvironmentSwitchError, match="INNERLOOP_KEEP_SCAN_BUFFERS='maybe'"):
            layer(x)[0].sum().backward()
        monkeypatch.setenv("INNERLOOP_KEEP_SCAN_BUFFERS", "1")
        layer(x)[0].sum().backward()
        assert layer.dispatches[-1][0] == "cpu_ttt_linear", layer.dispatches  # no verdict held against it
    finally:
        first_use.restore_verdicts(saved)
