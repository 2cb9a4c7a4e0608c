"""Inside torch.func transforms (vmap, grad, jacrev, jvp, jacfwd, hessian) no kernel runs: the tensors there are wrappers
without storage (the C++ kernels read raw pointers) and autograd.Functions without ``setup_context``
cannot be transformed. ``kernel="auto"`` runs the torch path there, with the torch path's numbers, and a
named kernel is refused with the reason."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from innerloop.kernels.dispatch import KernelUnavailableError
from innerloop.ops import scan

MODELS = [{"inner_model": "linear"}, {"inner_model": "mlp"}, {"inner_model": "matrix", "mini_batch_size": 1}]


def _inputs():
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(3, 2, 8, 16, generator=generator, dtype=torch.float64)
    lr = torch.rand(3, 2, 8, generator=generator, dtype=torch.float64) / 16
    return q, lr


def _scan_sum(q, lr, **options):
    options = {"mini_batch_size": 4, **options}
    return scan(q, q.flip(-1), q.roll(1, -1), lr, **options)[0].square().sum()


@pytest.mark.parametrize("options", MODELS, ids=lambda o: o["inner_model"])
def test_auto_inside_vmap_and_grad_gives_the_torch_paths_numbers(options) -> None:
    q, lr = _inputs()
    _scan_sum(q, lr, **options)  # a plain call first: the kernels' first-use checks are done
    per_row = torch.func.vmap(lambda q, lr: _scan_sum(q[None], lr[None], **options))(q, lr)
    per_row_torch = torch.stack(
        [_scan_sum(q[i : i + 1], lr[i : i + 1], kernel="torch", **options) for i in range(3)]
    )
    torch.testing.assert_close(per_row, per_row_torch, rtol=1e-12, atol=1e-12)
    gradient = torch.func.grad(lambda q: _scan_sum(q, lr, **options))(q)
    expected = torch.func.grad(lambda q: _scan_sum(q, lr, kernel="torch", **options))(q)
    torch.testing.assert_close(gradient, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("options", MODELS, ids=lambda o: o["inner_model"])
def test_forward_mode_transforms_equal_reverse_mode(options) -> None:
    # forward mode (jvp, jacfwd, and hessian, which is forward over reverse) through every model,
    # TTT-MLP's tanh-GELU included (its autograd.Function has a jvp with the backward's derivative).
    # Random initial weights: from zeros (ops.scan's default) an MLP's hidden layer stays zero, and
    # its GELU would never reach the outputs.
    q, lr = _inputs()
    q, lr = q[:1, :1, :, :6], lr[:1, :1]  # [1, 1, 8, 6]: a Jacobian of 48 x 48
    options = {"mini_batch_size": 4, **options}
    generator = torch.Generator().manual_seed(1)
    _, shapes = scan(q, q, q, lr, **options)
    initial = {
        name: torch.randn(w.shape, generator=generator, dtype=q.dtype) / 2 for name, w in shapes.items()
    }

    def outputs(q):
        return scan(q, q.flip(-1), q.roll(1, -1), lr, initial=initial, **options)[0]

    jacobian = torch.func.jacrev(outputs)(q)
    torch.testing.assert_close(torch.func.jacfwd(outputs)(q), jacobian, rtol=1e-10, atol=1e-12)
    tangent = torch.randn_like(q)
    _, pushed = torch.func.jvp(outputs, (q,), (tangent,))
    torch.testing.assert_close(
        pushed.flatten(), jacobian.flatten(4).flatten(0, 3) @ tangent.flatten(), rtol=1e-10, atol=1e-12
    )
    loss = lambda q: outputs(q).square().sum()  # noqa: E731
    torch.testing.assert_close(
        torch.func.hessian(loss)(q), torch.func.jacrev(torch.func.jacrev(loss))(q), rtol=1e-10, atol=1e-10
    )


def test_the_gelus_jvp_is_its_derivative() -> None:
    # the reference's derivative polynomial, as the backward takes it (mutation review s18, G01)
    from innerloop.core.functional import gelu_tanh, gelu_tanh_derivative

    x = torch.linspace(-4, 4, 17, dtype=torch.float64)
    tangent = torch.randn(17, dtype=torch.float64)
    _, pushed = torch.func.jvp(gelu_tanh, (x,), (tangent,))
    torch.testing.assert_close(pushed, tangent * gelu_tanh_derivative(x), rtol=1e-12, atol=1e-12)


def test_the_gelu_with_forward_mode_still_compiles_into_one_graph() -> None:
    # torch.compile cannot trace an autograd.Function with a jvp (one graph break per call, the
    # compiled TTT-MLP step 1.7x slower): compiled code takes the GELU without it, with the same numbers
    from innerloop.core.functional import gelu_tanh

    x = torch.randn(7, dtype=torch.float64, requires_grad=True)
    compiled = torch.compile(gelu_tanh, fullgraph=True, backend="eager")
    (eager_grad,) = torch.autograd.grad(gelu_tanh(x).sum(), x)
    (compiled_grad,) = torch.autograd.grad(compiled(x).sum(), x)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=0, atol=0)


def test_a_named_kernel_inside_a_transform_is_refused_with_the_reason() -> None:
    q, lr = _inputs()
    with pytest.raises(
        KernelUnavailableError, match=r"kernel='cpu_ttt_linear' cannot run inside a torch\.func"
    ):
        torch.func.grad(lambda q: _scan_sum(q, lr, kernel="cpu_ttt_linear"))(q)


FIRST_USE_INSIDE_VMAP = """
import torch
from innerloop.ops import scan
q, lr = torch.randn(2, 1, 8, 16, dtype=torch.float64), torch.rand(2, 1, 8, dtype=torch.float64) / 16
out = torch.func.vmap(lambda q, lr: scan(q[None], q[None], q[None], lr[None], mini_batch_size=4)[0][0])(q, lr)
expected = torch.cat([scan(q[i : i + 1], q[i : i + 1], q[i : i + 1], lr[i : i + 1], mini_batch_size=4)[0] for i in range(2)])
assert torch.allclose(out, expected, rtol=1e-12, atol=1e-12)
"""


# reason: a process of its own (~4 s: torch and innerloop imported afresh), so that the registry is first
# built, and the plugins' registration checks first run, inside the caller's vmap
@pytest.mark.slow
def test_a_first_use_of_innerloop_inside_vmap_builds_the_registry_outside_it() -> None:
    result = subprocess.run(
        [sys.executable, "-c", FIRST_USE_INSIDE_VMAP], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
