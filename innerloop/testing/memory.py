"""Peak memory of the tensors a function allocates on the CPU, from the PyTorch profiler.

``peak_cpu_allocation(fn)`` replays the profiler's allocation and free events in time order and
returns the highest total of bytes allocated during ``fn`` and alive at once (tensors that existed
before the call do not count). Unlike peak RSS it does not see the allocator's caching, the Python
heap or other threads, so it can compare two runs of the same code exactly.

The number is the one the profiler's ``function_events`` give (each op's self memory at its start,
the allocations outside any op at their own time), computed from the profiler's raw events: building
``function_events`` (a ``FunctionEvent`` of ~40 fields per op, the op tree, the backward stack traces)
took ~20 s of Python for the 17 decoded tokens of a small TTT-E2E model, the decoding itself 1 s.
:func:`peak_from_function_events` is the profiler's own way, which the tests compare this one with.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Iterable

import torch
from torch.autograd import DeviceType, _ProfilerResult
from torch.autograd.profiler import profile

_MEMORY, _OUT_OF_MEMORY = "[memory]", "[OutOfMemory]"
# the ops the profiler leaves out of its events (torch.autograd.profiler_util._filter_name)
_LEFT_OUT = {
    _MEMORY,
    _OUT_OF_MEMORY,
    "profiler::_record_function_enter",
    "profiler::_record_function_enter_new",
    "profiler::_record_function_exit",
    "aten::is_leaf",
    "aten::output_nr",
    "aten::_version",
}
_CPU_MEMORY = (DeviceType.CPU, DeviceType.MKLDNN, DeviceType.IDEEP)


def peak_cpu_allocation(fn: Callable[[], object]) -> int:
    """Peak bytes of CPU tensor memory allocated by ``fn()`` and alive at the same time."""
    # The legacy (non-Kineto) profiler: the Kineto one is many times slower on long runs of small ops.
    with profile(profile_memory=True, use_kineto=False) as prof:
        fn()
    peak = _peak_from_raw_events(prof.kineto_results)
    return peak_from_function_events(prof) if peak is None else peak


def peak_from_function_events(prof: profile) -> int:
    """The peak from the profiler's ``function_events``: an op's allocations are its self memory
    (children report their own); "[memory]" events are allocations and frees outside any recorded op
    (most frees)."""
    deltas = sorted(
        (e.time_range.start, e.cpu_memory_usage if e.name == _MEMORY else e.self_cpu_memory_usage)
        for e in prof.function_events
    )
    return _peak(delta for _, delta in deltas)


def _peak(deltas: Iterable[int]) -> int:
    alive = peak = 0
    for delta in deltas:
        alive += delta
        peak = max(peak, alive)
    return peak


class _Op:
    """An op event as the profiler's parsing sees it: its name, times, memory and place in the tree."""

    __slots__ = ("name", "start", "end", "thread", "usage", "tree", "parent", "children")

    def __init__(self, name: str, start: float, end: float, thread: int, usage: int, tree: bool) -> None:
        self.name, self.start, self.end, self.thread, self.usage = name, start, end, thread, usage
        self.tree = tree  # a synchronous CPU event: in the op tree, with self memory
        self.parent: _Op | None = None
        self.children: list[_Op] = []


def _peak_from_raw_events(result: _ProfilerResult) -> int | None:
    """What :func:`peak_from_function_events` gives, from the raw events; None where the events hold
    what this does not follow (an out-of-memory record, an op on another device)."""
    events = result.events()
    names = [event.name() for event in events]
    if _OUT_OF_MEMORY in names:
        return None
    memory = [event for event, name in zip(events, names, strict=True) if name == _MEMORY]
    # the memory records by time (as MemRecordsAcc): an op holds those that start inside [start, end]
    order = sorted(range(len(memory)), key=lambda i: (memory[i].start_ns(), i))
    starts = [memory[i].start_ns() for i in order]
    sizes = [memory[i].nbytes() if memory[i].device_type() in _CPU_MEMORY else 0 for i in order]
    before = [0, *itertools.accumulate(sizes)]
    covered = [0] * (len(order) + 1)
    origin = result.trace_start_ns()
    ops = []
    for event, name in zip(events, names, strict=True):
        if name in _LEFT_OUT or getattr(event, "is_hidden_event", lambda: False)():
            continue
        if event.device_type() != DeviceType.CPU:
            return None
        first, last = (
            bisect.bisect_left(starts, event.start_ns()),
            bisect.bisect_right(starts, event.end_ns()),
        )
        covered[first] += 1
        covered[last] -= 1
        synchronous = not event.is_async() and event.start_thread_id() == event.end_thread_id()
        start, end = (event.start_ns() - origin) / 1000, (event.end_ns() - origin) / 1000
        ops.append(_Op(name, start, end, event.start_thread_id(), before[last] - before[first], synchronous))
    for position, depth in enumerate(itertools.accumulate(covered[:-1])):
        if depth == 0:  # in no op: an event of its own, at its time
            at = (starts[position] - origin) / 1000
            ops.append(_Op(_MEMORY, at, at, memory[order[position]].start_thread_id(), sizes[position], True))
    ops.sort(key=lambda op: (op.start, -op.end))  # the profiler's order of its events
    _build_tree([op for op in ops if op.tree])
    ops = _without_duplicate_nodes(ops)
    deltas = sorted((op.start, _self_memory(op)) for op in ops)
    return _peak(delta for _, delta in deltas)


def _self_memory(op: _Op) -> int:
    if op.name == _MEMORY:
        return op.usage
    return op.usage - sum(child.usage for child in op.children) if op.tree else 0


def _build_tree(ops: list[_Op]) -> None:
    """EventList._populate_cpu_children: per thread, an event's parent is the innermost earlier event
    whose interval holds it."""
    for _, group in itertools.groupby(sorted(ops, key=lambda op: op.thread), key=lambda op: op.thread):
        stack: list[_Op] = []
        for op in sorted(group, key=lambda op: (op.start, -op.end)):
            while stack:
                parent = stack[-1]
                if op.start >= parent.end or op.end > parent.end:
                    stack.pop()
                else:
                    parent.children.append(op)
                    op.parent = parent
                    break
            stack.append(op)


def _without_duplicate_nodes(ops: list[_Op]) -> list[_Op]:
    """EventList._remove_dup_nodes: an only child of the same name as its parent is merged into it."""
    while True:
        removed = set()
        for index, op in enumerate(ops):
            parent = op.parent
            if parent is not None and _shown(parent.name) == _shown(op.name) and len(parent.children) == 1:
                parent.children = op.children
                for child in op.children:
                    child.parent = parent
                removed.add(index)
        if not removed:
            return ops
        ops = [op for index, op in enumerate(ops) if index not in removed]


_SHOWN: dict[str, str] = {}


def _shown(name: str) -> str:
    """The name the profiler gives an event (demangled; ProfilerStep#n as ProfilerStep*)."""
    if name not in _SHOWN:
        shown = torch._C._demangle(name) if len(name) > 1 else name
        _SHOWN[name] = "ProfilerStep*" if shown.startswith("ProfilerStep#") else shown
    return _SHOWN[name]
