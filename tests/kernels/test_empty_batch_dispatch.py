"""A call on a batch of 0 runs the torch path without checking any kernel on it: a first-use check on
no values failed (delta_chunk's raised on the empty reduction) and turned the kernel off for the rest of
the process, with a warning."""

from __future__ import annotations

import warnings

import pytest
import torch

from innerloop import TTTLayer
from innerloop.core.family_layers import GatedDeltaNetLayer
from innerloop.kernels import first_use


@pytest.fixture(autouse=True)
def fresh_verdicts():
    first_use.forget_verdicts()
    yield
    first_use.forget_verdicts()


@pytest.mark.parametrize(
    ("make", "kernel"),
    [
        (lambda kernel: GatedDeltaNetLayer(16, 2, kernel=kernel), "delta_chunk"),
        (lambda kernel: TTTLayer(16, 2, mini_batch_size=4, kernel=kernel), "fused_torch_linear"),
    ],
    ids=["gated_deltanet", "ttt_linear"],
)
@pytest.mark.parametrize("forced", [False, True], ids=["auto", "forced"])
def test_an_empty_batch_runs_the_torch_path_and_leaves_the_kernel_on(make, kernel, forced) -> None:
    torch.manual_seed(0)
    layer = make(kernel if forced else "auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no KernelCheckWarning
        out, _ = layer(torch.randn(0, 8, 16))
    assert out.shape == (0, 8, 16)
    assert {path for path, _ in layer.dispatches} == {"torch"}
    assert "empty batch" in layer.dispatches[0][1]
    if not forced:
        return
    out, _ = layer(torch.randn(2, 8, 16))  # the next call still runs the kernel
    assert kernel in [path for path, _ in layer.dispatches]
