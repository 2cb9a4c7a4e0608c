"""Review s36d: regression tests for the defects found in the last look at 255129e..HEAD."""

from __future__ import annotations

from innerloop.core import layer as core_layer


def test_the_containers_bound_counts_the_swap_its_cgroup_allows(tmp_path, monkeypatch) -> None:
    """cgroup v2's memory.max bounds RAM only; memory.swap.max beside it is more the group may use. The
    bound took memory.max alone, against the host's MemTotal + SwapTotal: a model that fits in the
    container's RAM and swap was refused."""
    limit = tmp_path / "memory.max"
    limit.write_text("1000000\n")
    monkeypatch.setattr(core_layer, "CGROUP_MEMORY_LIMITS", (str(limit),))
    assert core_layer.machine_memory_bytes() == 1_000_000  # no memory.swap.max: RAM only
    (tmp_path / "memory.swap.max").write_text("3000000\n")
    assert core_layer.machine_memory_bytes() == 4_000_000
    (tmp_path / "memory.swap.max").write_text("max\n")  # unlimited swap: no bound from the cgroup
    assert core_layer.machine_memory_bytes() > 4_000_000
