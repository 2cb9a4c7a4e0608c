"""``innerloop.testing.memory.peak_cpu_allocation``, which the streaming-memory tests rely on, counts
the tensors alive at once during a call (and nothing that existed before it)."""

from __future__ import annotations

import torch

from innerloop.testing.memory import peak_cpu_allocation

KB8 = 1000 * 8  # one float64 tensor of 1000 elements


def test_the_peak_counts_tensors_alive_at_the_same_time() -> None:
    def three_at_once() -> float:
        a = torch.ones(1000, dtype=torch.float64)
        b = torch.ones(1000, dtype=torch.float64)
        return float((a + b).sum())  # a, b and a + b alive together, then a scalar

    def one_at_a_time() -> None:
        for _ in range(3):
            float(torch.ones(1000, dtype=torch.float64).sum())

    existing = torch.ones(100_000)
    assert 3 * KB8 <= peak_cpu_allocation(three_at_once) < 3 * KB8 + 64
    assert KB8 <= peak_cpu_allocation(one_at_a_time) < KB8 + 64
    assert peak_cpu_allocation(lambda: existing.sum()) < 64  # what existed before the call is not counted


def test_the_peak_from_the_raw_events_is_the_profilers_own() -> None:
    """peak_cpu_allocation reads the profiler's raw events (building its ``function_events`` cost ~20 s
    for a profiled decode of 17 tokens); its number is the one ``function_events`` give: ops nested in
    ops, an op nested in one of its own name (merged into it), allocations and frees outside any op, a
    backward pass."""
    from torch.autograd.profiler import profile

    from innerloop.testing.memory import _peak_from_raw_events, peak_from_function_events

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.GELU(), torch.nn.Linear(32, 16)
    )
    x = torch.randn(3, 16, requires_grad=True)
    with profile(profile_memory=True, use_kineto=False) as prof:
        y = net(x).double()
        y.square().sum().backward()
        del y
    assert _peak_from_raw_events(prof.kineto_results) == peak_from_function_events(prof) > 0
