"""Review s33c (dispatch): forward-mode AD with ``torch.autograd.forward_ad``'s dual tensors.

``torch.func.jvp`` was routed to the torch path (its tensors are functorch wrappers), but dual tensors made
with ``forward_ad.make_dual`` are plain tensors: ``kernel="auto"`` picked a fast path whose
autograd.Function has no ``jvp`` and torch raised a bare ``NotImplementedError`` ("You must implement the
jvp function..."). Now ``auto`` runs the torch path there, with its tangents, and a named kernel is
refused with the reason. Through ``ops.scan`` without gradients it was worse: the fast path ran on
the values and the output had no tangent at all, silently.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as forward_ad

from innerloop import TTTLayer
from innerloop.kernels.dispatch import KernelUnavailableError


def _tangent(layer: TTTLayer, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    with forward_ad.dual_level():
        y, _ = layer(forward_ad.make_dual(x, t))
        return forward_ad.unpack_dual(y).tangent


@pytest.mark.slow  # ~2.5 s: the plain call runs the fast path's first-use check in float64
@pytest.mark.parametrize("model", ["linear", "mlp"])
def test_auto_gives_the_torch_paths_tangent_on_dual_tensors(model) -> None:
    torch.manual_seed(0)
    reference = TTTLayer(32, 2, inner_model=model, mini_batch_size=4, kernel="torch").double()
    layer = TTTLayer(32, 2, inner_model=model, mini_batch_size=4, kernel="auto").double()
    layer.load_state_dict(reference.state_dict())
    x, t = torch.randn(1, 8, 32, dtype=torch.float64), torch.randn(1, 8, 32, dtype=torch.float64)
    layer(x)  # a plain call: a fast path is taken here
    assert layer.last_dispatch[0] != "torch"
    tangent = _tangent(layer, x, t)
    assert layer.last_dispatch == ("torch", layer.last_dispatch[1])
    assert "forward-mode AD" in layer.last_dispatch[1]
    torch.testing.assert_close(tangent, _tangent(reference, x, t), rtol=1e-12, atol=1e-12)


def test_a_named_kernel_on_dual_tensors_is_refused_with_the_reason() -> None:
    layer = TTTLayer(32, 2, mini_batch_size=4, kernel="fused_torch_linear")
    x = torch.randn(1, 8, 32)
    with pytest.raises(KernelUnavailableError, match="fused_torch_linear.*forward-mode AD's dual tensors"):
        _tangent(layer, x, torch.randn_like(x))


@pytest.mark.slow  # ~2 s: ops.scan's first float64 call builds its paths
def test_ops_scan_on_dual_tensors_keeps_the_tangent() -> None:
    """Without gradients the fast paths ran their inference code on the dual tensors' values and
    returned outputs without a tangent: ``unpack_dual(y).tangent`` was None, silently."""
    from innerloop.ops import scan

    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 8, 16, generator=generator, dtype=torch.float64)
    lr = torch.rand(1, 2, 8, generator=generator, dtype=torch.float64) / 16
    t = torch.randn(q.shape, generator=generator, dtype=torch.float64)
    tangents = {}
    for kernel in ("torch", "auto"):
        with forward_ad.dual_level():
            y = scan(
                forward_ad.make_dual(q, t), q.flip(-1), q.roll(1, -1), lr, mini_batch_size=4, kernel=kernel
            )[0]
            tangents[kernel] = forward_ad.unpack_dual(y).tangent
    assert tangents["auto"] is not None
    torch.testing.assert_close(tangents["auto"], tangents["torch"], rtol=1e-12, atol=1e-12)
