"""The training scans' kept buffers of starting weights (``kernels/cpu/buffers.py``): a buffer is
written again only when nothing else holds it, so a graph kept for a second backward, two forwards
before one backward and a user's tensors are never overwritten."""

from __future__ import annotations

import pytest
import torch

from innerloop import TTTLayer
from innerloop.kernels.cpu import buffers
from innerloop.kernels.cpu.buffers import KEPT_BUFFERS, release_buffers, scan_buffer

pytestmark = pytest.mark.usefixtures("cpu_kernels")  # skips, with the reason, where nothing compiles


@pytest.fixture(autouse=True)
def _no_kept_buffers():
    release_buffers()
    yield
    release_buffers()


def _layer(model: str, kernel: str = "auto") -> TTTLayer:
    torch.manual_seed(0)
    return TTTLayer(8, 2, inner_model=model, mini_batch_size=2, kernel=kernel).double()


def _gradients(layer: TTTLayer, loss: torch.Tensor, x: torch.Tensor, retain: bool = False):
    return torch.autograd.grad(loss, [x, *layer.parameters()], retain_graph=retain)


def test_a_free_buffer_is_reused_and_a_held_one_is_not():
    like = torch.zeros(1)
    first = scan_buffer(100, like)
    assert scan_buffer(80, like).data_ptr() != first.data_ptr()  # `first` (a view) still holds its buffer
    address = first.data_ptr()
    del first
    assert scan_buffer(100, like).data_ptr() == address  # the largest free one
    assert len(buffers._kept) <= KEPT_BUFFERS
    kept = scan_buffer(10, like.double())  # another dtype: a buffer of its own
    assert kept.dtype == torch.float64 and kept.numel() == 10


def test_release_frees_the_kept_buffers_and_the_environment_turns_keeping_off(monkeypatch):
    scan_buffer(10, torch.zeros(1))
    assert buffers._kept
    release_buffers()
    assert not buffers._kept
    monkeypatch.setenv("INNERLOOP_KEEP_SCAN_BUFFERS", "0")
    scan_buffer(10, torch.zeros(1))
    assert not buffers._kept


@pytest.mark.parametrize("model", ["linear", "mlp"])
def test_steps_that_reuse_the_buffers_equal_the_torch_path(model):
    """Three steps on the kernel (the second and third write into the first's buffer) give the torch
    path's gradients, step by step."""
    fast, reference = _layer(model), _layer(model, kernel="torch")
    kept_after = []
    for step in range(3):
        x = torch.randn(2, 6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        x.requires_grad_(True)
        got = _gradients(fast, fast(x)[0].square().sum(), x)
        want = _gradients(reference, reference(x)[0].square().sum(), x)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        kept_after.append([buffer.data_ptr() for buffer in buffers._kept])
    assert any(path == f"cpu_ttt_{model}" for path, _ in fast.dispatches)
    assert kept_after[0] and kept_after[0] == kept_after[1] == kept_after[2]  # no new buffer after step 0


@pytest.mark.parametrize("model", ["linear", "mlp"])
def test_a_retained_graph_keeps_its_buffer_through_later_steps(model):
    """``retain_graph=True``: a later forward must not write into the buffer the kept graph's second
    backward reads."""
    layer = _layer(model)
    x = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)
    loss = layer(x)[0].square().sum()
    first = _gradients(layer, loss, x, retain=True)
    other = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True) * 3
    _gradients(layer, layer(other)[0].square().sum(), other)  # a step in between
    again = _gradients(layer, loss, x)
    for a, b in zip(first, again, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("model", ["linear", "mlp"])
def test_two_forwards_before_one_backward(model):
    """Gradient accumulation over a summed loss: both graphs are alive at once (two buffers)."""
    fast, reference = _layer(model), _layer(model, kernel="torch")
    xs = [torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    for _ in range(2):  # the second round reuses both buffers
        got = _gradients(fast, sum(fast(x)[0].square().sum() for x in xs), xs[0])
        want = _gradients(reference, sum(reference(x)[0].square().sum() for x in xs), xs[0])
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_two_buffers_held_at_once_are_both_kept_and_reused(monkeypatch):
    # two forwards before one backward (a summed-loss gradient accumulation) hold two buffers at once:
    # both must be kept for the next step, not one of them allocated anew (mutation round 5, K18)
    monkeypatch.delenv("INNERLOOP_KEEP_SCAN_BUFFERS", raising=False)
    like = torch.zeros(1)
    first, second = scan_buffer(100, like), scan_buffer(50, like)
    storages = {first.untyped_storage().data_ptr(), second.untyped_storage().data_ptr()}
    del first, second
    again = scan_buffer(100, like), scan_buffer(50, like)
    assert {t.untyped_storage().data_ptr() for t in again} == storages
