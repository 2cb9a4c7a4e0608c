"""s50k: check_kernel checks a kernel's ``decay_log`` path (the gate Gated DeltaNet and Titans give)."""

from __future__ import annotations

import dataclasses

import pytest

import innerloop
from innerloop.kernels.delta_chunk import adapter
from innerloop.testing import check_kernel

pytestmark = pytest.mark.usefixtures("fresh_global_registry")  # tests/conftest.py


def _drops_the_log_gate(
    xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps, decay=None, chunk_size=64, decay_log=None
):
    """delta_chunk, but a gate given as ``decay_log`` is dropped (no forgetting): wrong on the log path only."""
    return adapter.delta_rule_kernel_forward(
        xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps, decay=decay, chunk_size=chunk_size
    )


@pytest.mark.slow  # 1.1 s (load 7 on 2 cores): check_kernel fails at its first log-gate case
def test_check_kernel_checks_a_kernels_log_gate_path() -> None:
    """check_kernel's layer that forgets gave its gate as ``decay`` only, so a kernel that names
    ``decay_log`` (dispatch then gives it the log gate of Gated DeltaNet and Titans) passed however wrong
    it was there."""
    spec = dataclasses.replace(
        adapter.kernel_spec(), name="s50k_log_gate_dropped", forward=_drops_the_log_gate, priority=100
    )
    innerloop.register_kernel(spec)
    with pytest.raises(AssertionError, match="decay_log"):
        check_kernel("s50k_log_gate_dropped", mini_batch_size=1, head_dims=(4,))
