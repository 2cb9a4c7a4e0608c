"""Peak memory of the tensors a function allocates on the CPU, from the PyTorch profiler.

``peak_cpu_allocation(fn)`` replays the profiler's allocation and free events in time order and
returns the highest total of bytes allocated during ``fn`` and alive at once (tensors that existed
before the call do not count). Unlike peak RSS it does not see the allocator's caching, the Python
heap or other threads, so it can compare two runs of the same code exactly.
"""

from __future__ import annotations

from collections.abc import Callable

from torch.autograd.profiler import profile


def peak_cpu_allocation(fn: Callable[[], object]) -> int:
    """Peak bytes of CPU tensor memory allocated by ``fn()`` and alive at the same time."""
    # The legacy (non-Kineto) profiler: the Kineto one is many times slower on long runs of small ops.
    with profile(profile_memory=True, use_kineto=False) as prof:
        fn()
    # An op's allocations are its self memory (children report their own); "[memory]" events are
    # allocations and frees outside any recorded op (most frees).
    deltas = sorted(
        (e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
        for e in prof.function_events
    )
    alive = peak = 0
    for _, delta in deltas:
        alive += delta
        peak = max(peak, alive)
    return peak
