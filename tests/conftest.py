"""Shared test setup: hypothesis profiles and paths."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# Bytecode caches are written even where the environment asks for none (PYTHONDONTWRITEBYTECODE=1, as on
# the project's machines): without them every run re-parsed and assertion-rewrote the ~300 test modules,
# ~4.5 s of each worker's collection (the fast tests' collection in one process: 14.2 s of CPU without the
# caches, 9.9 s with). The caches go to the __pycache__ folders beside the sources (ignored by git), and
# pytest writes them atomically (a concurrent worker reads a whole file or none). Set here, before any test
# module is imported.
sys.dont_write_bytecode = False

# torch.compile's inductor, at its first compile in each process, builds and loads one probe program per
# vector instruction set the CPU's flags name (a g++ build and a `python -c` that imports torch, each), to
# choose the one its generated code uses: ~10 s of CPU in every worker and every subprocess that compiles
# (a first compile: 19 s without this, 8.7 s with it). Trusting the flags chooses the same set here
# (AMX, then AVX-512 VNNI, AVX-512, AVX2 on this project's machines; torch._inductor.cpu_vec_isa's
# valid_vec_isa_list is the same either way). On a machine whose compiler cannot build what its CPU claims,
# run with TORCHINDUCTOR_VEC_ISA_OK set empty: inductor probes again (0 would turn its vector code off).
# This only fills the variable where it is unset; the tests' subprocesses inherit it.
os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "1")

settings.register_profile(
    "ci", max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


#: What a run takes from pytest-xdist unless its command line says otherwise (``-n``, ``--maxprocesses``,
#: ``--dist``): one worker per core, at most 8 (each imports torch, Lightning and transformers: ~1 GB),
#: sharing one queue (xdist's default hands each worker its own queue: one worker sat idle for minutes at
#: the end). Set here rather than in pyproject.toml's addopts, where they made ``-p no:xdist``, and any
#: pytest without pytest-xdist, a usage error ("unrecognized arguments: -n").
XDIST_DEFAULTS = {"numprocesses": "auto", "maxprocesses": 8}


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which turns "auto" into a count of workers
def pytest_cmdline_main(config: pytest.Config) -> None:
    """The suite's xdist defaults (:data:`XDIST_DEFAULTS`, ``--dist worksteal``), where xdist is loaded,
    in pytest's main process only (an xdist worker runs this hook too, with ``-n`` cleared)."""
    if not config.pluginmanager.hasplugin("xdist") or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    for option, value in XDIST_DEFAULTS.items():
        if getattr(config.option, option) is None:
            setattr(config.option, option, value)
    if config.option.dist == "no" and config.option.numprocesses != 0:
        config.option.dist = "worksteal"


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``-n``, on by default: :data:`XDIST_DEFAULTS`), each worker takes its share of the
    cores for torch's threads: two workers of two threads each on two cores ran the fast tests four
    times slower than one process. ``OMP_NUM_THREADS`` passes the same count to the training runs
    that tests start in subprocesses, which must round as the in-process run they are compared with."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers and os.environ.get("PYTEST_XDIST_WORKER"):
        import torch  # here, not at the top: the xdist controller, which runs no test, never imports torch

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // int(workers))
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        _rebuild_worker_warnings_one_at_a_time()
        if config.getoption("numprocesses", default=0):
            _start_cpu_kernel_build()


_KERNEL_BUILD: list[subprocess.Popen] = []


def _start_cpu_kernel_build() -> None:
    """In the xdist controller, with no compiled CPU kernel in the cache: build it in a child process while
    the workers start and collect (~14 s). The first tests of every worker need the library; from an empty
    cache one worker built it (~8 s of g++) and the other waited on its lock, idle: the fast loop took 60 s
    instead of about 54. The child builds under the same lock as a worker (innerloop/kernels/cpu/build.py),
    so the library is built once either way, and a worker whose library is not ready waits for it as before.
    The cache folder is found as build.cache_dir() finds it (the controller imports no innerloop)."""
    configured = os.environ.get("INNERLOOP_CACHE_DIR", "")
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(os.path.expanduser(xdg if xdg.strip() else "~/.cache")) / "innerloop"
    folder = Path(os.path.expanduser(configured)) if configured.strip() else base
    if any(not p.name.startswith(".") for p in (folder / "cpu_kernels").glob("*.so")):
        return  # built before (for this source or an older one: then the workers build it, as they did)
    command = [sys.executable, "-c", "from innerloop.kernels.cpu import build; build.load_library()"]
    _KERNEL_BUILD.append(
        subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
    )


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """An xdist worker has reported every result and its end of session by now; it leaves at once
    rather than tearing down an interpreter holding torch, Lightning and transformers (about 4,700
    modules), which took 4-9 s at the end of every run, the controller waiting for it. The controller
    stops the CPU kernels' build it started (:func:`_start_cpu_kernel_build`) if the run ended first."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    for build in _KERNEL_BUILD:  # a short run may end before the build: stop it (and its compiler) with it
        if build.poll() is None:
            try:
                os.killpg(build.pid, signal.SIGTERM)
            except ProcessLookupError:  # it ended in between
                pass
        build.wait()


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist, the slow tests first (in their files' order), then the fast ones. The workers
    take tests from one shared queue as they finish: with the longest first, what is left at the end
    is short, and no worker waits for another's 20 s test (the suite's tail). Every worker sorts the
    same collection the same way, as xdist requires. Without xdist the order is the files' own."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: False first


def _rebuild_worker_warnings_one_at_a_time() -> None:
    """pytest-xdist's controller rebuilds each warning a worker reports in that worker's receiving
    thread, importing the module of the warning's class (``innerloop.train.throughput``, Lightning's
    ``PossibleUserWarning``). Two workers reporting at once made two threads import Lightning together,
    and its circular imports failed half-way: "cannot import name 'BitsandbytesPrecision' from partially
    initialized module", every worker down, the run failed. One lock makes those imports one at a time."""
    try:
        from xdist import workermanage
    except ImportError:  # no xdist: warnings are never rebuilt in another thread
        return
    rebuild = workermanage.unserialize_warning_message
    if getattr(rebuild, "one_at_a_time", False):
        return
    lock = threading.Lock()

    def rebuild_one_at_a_time(data):
        with lock:
            return rebuild(data)

    rebuild_one_at_a_time.one_at_a_time = True
    workermanage.unserialize_warning_message = rebuild_one_at_a_time


DATA_DIR = Path(__file__).resolve().parent / "data"
CONFORMANCE_DIR = DATA_DIR / "conformance"  # the repository's own conformance vectors (see data/README.md)
SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"  # ../shared beside the checkout, when present


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    """Every test starts with the process's torch threads, default dtype and denormal setting: a test
    that changes one (a benchmark's ``main`` sets the threads) must not change the rounding of the
    tests after it (the resume tests compare runs bit for bit, some of them trained in a subprocess).
    Gradient mode too: a test that raises an interrupt inside ``torch.no_grad().__enter__`` leaves it off,
    and the tests after it in the process would run without graphs (kernels chosen for training skipped)."""
    import torch

    threads, dtype, grad_enabled = torch.get_num_threads(), torch.get_default_dtype(), torch.is_grad_enabled()
    yield
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)
    torch.set_flush_denormal(False)
    torch.set_grad_enabled(grad_enabled)


@pytest.fixture(scope="session")
def conformance_dir() -> Path:
    """The conformance vectors kept in the repository: always present, never a skip."""
    return CONFORMANCE_DIR


@pytest.fixture(scope="session")
def reference_models_dir() -> Path:
    """Whole models saved by the reference implementation, with their logits (see data/README.md)."""
    return DATA_DIR / "models"


@pytest.fixture(scope="session")
def shared_conformance_dir() -> Path:
    """The full shared vector set (../shared/conformance), larger than the repository keeps; skips,
    with the reason, where that folder is not beside the checkout."""
    directory = SHARED_DIR / "conformance"
    if not directory.is_dir():
        pytest.skip(f"the larger conformance vectors live in {directory}, which is not beside this checkout")
    return directory


@pytest.fixture(scope="session")
def cpu_kernels() -> None:
    """The compiled CPU kernels, built once. A machine without a C++ compiler skips the tests that need
    them; CI sets INNERLOOP_REQUIRE_CPU_KERNELS=1 so that a broken build fails instead of skipping."""
    from innerloop.core.environment import environment_flag
    from innerloop.kernels.cpu import build

    try:
        build.load_library()
    except build.CPUKernelUnavailable as error:
        if environment_flag("INNERLOOP_REQUIRE_CPU_KERNELS", False):
            raise
        pytest.skip(f"the CPU kernels cannot be built here: {error}")


@pytest.fixture
def fresh_global_registry() -> None:
    """The process-wide registry, reset for the test and put back as it was after it
    (:func:`innerloop.registry.isolated_registry`): what the test registers, and the kernels' first-use
    verdicts it earns, do not leak into later tests of the same worker. The registry is built when the
    test first asks for it (``get_registry()``), after any entry points it patches in. A module whose every
    test needs it says ``pytestmark = pytest.mark.usefixtures("fresh_global_registry")``."""
    from innerloop.registry import isolated_registry

    with isolated_registry():
        yield


@pytest.fixture(scope="module")
def recall_run():
    """The ``tiny`` preset's run config with the recall task (``data.name=recall``): a run whose data needs
    no file, for tests that build a :class:`~innerloop.config.schema.RunConfig` around it."""
    import warnings

    from innerloop.config.load import load_config  # here: the xdist controller imports no innerloop

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run, _ = load_config("tiny", ["data.name=recall"])
    return run


@pytest.fixture(scope="module")
def tiny_hf_model():
    """A 1-layer TTT :class:`~innerloop.hf.InnerloopForCausalLM` (width 16, 2 heads, vocabulary 50), seeded
    0, in eval mode: the model the ``generate()`` sampling tests share (one per test module)."""
    import torch

    from innerloop.hf import InnerloopConfig, InnerloopForCausalLM  # here: the controller imports none

    torch.manual_seed(0)
    model = {"hidden_size": 16, "num_heads": 2, "num_layers": 1, "intermediate_size": 32, "vocab_size": 50}
    return InnerloopForCausalLM(InnerloopConfig(model=model)).eval()


@pytest.fixture(scope="session")
def block_server():
    """The warm interpreter the tests that run scripts in processes of their own fork them from
    (tests/block_server.py, whose docstring names those tests): one per pytest process, started at its
    first use (its start imports torch, innerloop and Lightning: ~6 s of CPU, once)."""
    from block_server import BlockServer  # here: the xdist controller starts none

    server = BlockServer()
    yield server
    server.close()
