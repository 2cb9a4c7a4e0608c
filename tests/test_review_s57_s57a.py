"""Review s57a: the scan's autocast guard (s56b) for gradients of gradients and across threads.

``core.scan.run_scan_without_autocast`` turns autocast off in the backward of every node the scan
recorded, when ``backward()`` runs inside a ``torch.autocast`` region. Two holes, measured at width 32,
2 heads, 64 tokens, 2 sequences (bfloat16 CPU autocast, the error against float64 inside / outside):

- MED: the nodes a ``create_graph=True`` backward records (a gradient penalty, TTT-E2E's meta-gradient)
  were not guarded, so the double backward ran the scan's part in bfloat16: TTT-MLP's token scale 1.25x
  (1.00e-2 -> 1.25e-2), TTT-Linear's 1.20x, ``minibatch_gd`` 1.12x, ``momentum``'s learning-rate bias 3.1x
  (0.15 -> 0.47), Titans 1.06x, DeltaNet 1.05x. Each guarded node now guards the
  nodes it records: inside equals outside, bit for bit.
- LOW: the walk told the scan's nodes by sequence number, which torch counts per thread: an input
  recorded on a thread whose counter was ahead of the scan's thread's was taken for the scan's, and the
  caller's backward below it ran in float32 inside the region. The walk now stops at the scan's inputs'
  nodes by identity.
"""

from __future__ import annotations

import threading

import pytest
import torch

from innerloop import TTTLayer
from innerloop.ops import scan

WIDTH, HEADS, TOKENS = 16, 2, 16


def _second_order_gradients(layer: torch.nn.Module, x: torch.Tensor, inside: bool) -> list[torch.Tensor]:
    """The gradients of ``|d sum(y^2) / dx|^2`` for every parameter, the forward under bfloat16 autocast,
    both backwards inside the region (``inside``) or after it."""
    x = x.clone().requires_grad_(True)

    def backwards() -> list[torch.Tensor]:
        (grad_x,) = torch.autograd.grad(y.double().square().sum(), x, create_graph=True)
        return list(torch.autograd.grad(grad_x.square().sum(), list(layer.parameters()), allow_unused=True))

    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)[0]
        if inside:
            return backwards()
    return backwards()


# reason: a layer's build (its kernel checks) and two double backwards (2-13 s a case on a loaded 2-core
# machine, over the fast loop's 0.3 s); before the fix each case's gradients differed from those outside
@pytest.mark.slow
@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: TTTLayer(WIDTH, HEADS, needs_double_backward=True), id="ttt_linear_default"),
        pytest.param(
            lambda: TTTLayer(WIDTH, HEADS, inner_model="mlp", base_lr=0.1, kernel="torch"), id="ttt_mlp_torch"
        ),
    ],
)
def test_a_second_order_backward_inside_autocast_equals_one_outside(make):
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(1, TOKENS, WIDTH, generator=torch.Generator().manual_seed(1))
    inside, outside = (_second_order_gradients(layer, x, where) for where in (True, False))
    for (name, _), got, want in zip(layer.named_parameters(), inside, outside, strict=True):
        assert (got is None) == (want is None), name
        assert got is None or torch.equal(got, want), name


def _as_recorded_ahead(node: torch.autograd.graph.Node) -> None:
    """Numbers ``node`` and the nodes below it as a thread that has recorded 2**40 nodes would have."""
    while node is not None and node.name() != "torch::autograd::AccumulateGrad":
        node._set_sequence_nr(2**40 + node._sequence_nr())
        node = node.next_functions[0][0]


# reason: the process's first ops.scan call (its checks) on a worker thread: 0.5-1.9 s alone on a loaded
# 2-core machine, over the fast loop's 0.3 s
@pytest.mark.slow
def test_an_input_recorded_on_another_thread_keeps_the_callers_autocast():
    """The scan runs on a fresh thread (its sequence counter at 0); its learning rate is a float32 product
    recorded, autocast off, on this thread, whose nodes' numbers (set here: this thread's counter depends on
    the tests run before) are ahead of the worker's. Its backward inside the region is the caller's: bfloat16."""
    weight = torch.randn(8, 1, requires_grad=True)
    q, k, v = torch.randn(3, 1, 2, 16, 8, generator=torch.Generator().manual_seed(0))
    results = []

    def run() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(scan(q, k, v, lr, kernel="torch", mini_batch_size=8)[0])

    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.autocast("cpu", enabled=False):
            lr = (q @ weight)[..., 0] * 0.01
        _as_recorded_ahead(lr.grad_fn)
        worker = threading.Thread(target=run)
        worker.start()
        worker.join()
        grad, grad_lr = torch.autograd.grad(results[0].square().sum(), (weight, lr))
    rows, grad_rows = q.reshape(-1, 8), grad_lr.reshape(-1, 1) * 0.01
    assert torch.equal(grad, (rows.bfloat16().T @ grad_rows.bfloat16()).float())
    assert not torch.equal(grad, rows.T @ grad_rows)  # (not the float32 product)
