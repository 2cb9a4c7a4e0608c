"""Review s31a: the grader of issues 2, 4, 9 and 12, with shapes, options and inputs the other tests do
not use (report: /work/notes/review_s31a.md).

The first tests are regression tests of a finding (an allocation failure of the inner scan reached the
user as the CPU allocator's bare line, naming no argument). The others cover promises no other test
checks the same way: the layer and ``innerloop.ops.scan`` against float64 oracles written here from
../shared/REFERENCE.md and ../shared/ZOO.md alone (not from innerloop's own naive loop), over option
combinations, odd mini-batch sizes and splits the other tests leave out.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import innerloop
from innerloop.ops import scan
from innerloop.plugins.optimizers.dual_form import DualForm


@pytest.fixture(autouse=True, scope="module")
def _registry_loaded() -> None:
    """The registry's first-use checks (about 0.8 s, once per process) run here, not in a test's call."""
    with torch.no_grad():
        innerloop.TTTLayer(8, 2)(torch.randn(1, 2, 8))
        innerloop.TTTLayer(8, 2, update_rule="minibatch_gd")(torch.randn(1, 2, 8))  # torch.func's first use


# ------------------------------------------------------------------------------------------------
# Finding 1: a mini_batch_size the machine cannot allocate (issue 9, item 17)
# ------------------------------------------------------------------------------------------------

ALLOCATOR_LINE = (
    "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried "
    "to allocate 3600000000 bytes. Error code 12 (Cannot allocate memory)"
)


def _fail_to_allocate(*args: object, **kwargs: object) -> None:
    raise RuntimeError(ALLOCATOR_LINE)


@pytest.mark.parametrize("entry", ["layer", "scan"])
def test_an_allocation_failure_of_the_scan_names_mini_batch_size_and_the_fix(monkeypatch, entry):
    """The scan's [B, H, K, K] matrices of a mini_batch_size under the cap (65536) but too large for the
    machine failed with torch's allocator line alone (`DefaultCPUAllocator: can't allocate memory`),
    which names no argument; issue 9 asks for the argument and the fix. The type stays (a caller that
    catches RuntimeError / torch.OutOfMemoryError still does) and the allocator's line is kept."""
    monkeypatch.setattr(DualForm, "forward", _fail_to_allocate)
    with pytest.raises(RuntimeError) as caught:
        if entry == "layer":
            innerloop.TTTLayer(8, 2, mini_batch_size=3000, kernel="torch")(torch.randn(2, 3000, 8))
        else:
            q = torch.randn(2, 2, 3000, 4)
            scan(q, q, q, torch.rand(2, 2, 3000), mini_batch_size=3000, kernel="torch")
    message = str(caught.value)
    assert type(caught.value) is RuntimeError
    assert "mini_batch_size=3000" in message and "[B, H, 3000, 3000]" in message
    assert "(2, 2, 3000, 4)" in message  # the call's [B, H, T, f]
    assert "smaller mini_batch_size" in message and ALLOCATOR_LINE in message


def test_other_errors_of_the_scan_are_not_reworded(monkeypatch):
    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("some other failure")

    monkeypatch.setattr(DualForm, "forward", fail)
    with pytest.raises(RuntimeError, match="^some other failure$"):
        innerloop.TTTLayer(8, 2, mini_batch_size=4, kernel="torch")(torch.randn(1, 5, 8))


OUT_OF_MEMORY_SCRIPT = textwrap.dedent(
    """
    import resource, torch, innerloop
    layer = innerloop.TTTLayer(8, 1, mini_batch_size=30000)
    x = torch.randn(1, 30000, 8)
    size = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize"))
    resource.setrlimit(resource.RLIMIT_AS, (size + 2**30, resource.RLIM_INFINITY))  # 1 GiB more
    with torch.no_grad():
        layer(x)
    """
)


@pytest.mark.slow  # a child process (torch's start-up, ~3 s) under a 1 GiB address-space limit
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux's")
def test_a_real_allocation_failure_names_mini_batch_size():
    """The same, with the CPU allocator really failing (a [30000, 30000] matrix under a 1 GiB limit, in a
    child process so that nothing else runs under the limit)."""
    result = subprocess.run(
        [sys.executable, "-c", OUT_OF_MEMORY_SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: the inner scan ran out of memory"), result.stderr[-2000:]
    assert "mini_batch_size=30000" in last and "can't allocate memory" in last
