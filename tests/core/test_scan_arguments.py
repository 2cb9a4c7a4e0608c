"""``innerloop.ops.scan``: one rule for every path. What a kernel refuses, every path refuses (with
the argument named); low-precision inputs compute in float32 whichever path runs; meta tensors trace."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from innerloop.kernels.dispatch import KernelUnavailableError
from innerloop.ops import scan

MATRIX = {"inner_model": "matrix", "inner_norm": False, "inner_residual": False}  # DeltaNet's options


def _inputs(dtype=torch.float64, tokens=6, head_dim=4, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, tokens, head_dim, generator=generator, dtype=dtype) for _ in range(3))
    lr = torch.rand(1, 2, tokens, generator=generator, dtype=dtype)
    return [t.to(device) for t in (q, k, v, lr)]


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
@pytest.mark.parametrize(
    ("mini_batch_size", "kernel"), [(1, "auto"), (1, "torch"), (2, "auto"), (2, "torch")]
)
def test_a_decay_outside_0_1_is_refused_on_every_path(value, mini_batch_size, kernel) -> None:
    q, k, v, lr = _inputs()
    decay = torch.full(lr.shape, 0.5, dtype=lr.dtype)
    decay[0, 1, 3] = value
    with pytest.raises(ValueError, match=r"decay must lie in \[0, 1\].* 1 values outside it, e\.g\. "):
        scan(q, k, v, lr, mini_batch_size=mini_batch_size, decay=decay, kernel=kernel, **MATRIX)


def test_decay_at_the_ends_of_its_range_runs() -> None:
    q, k, v, lr = _inputs()
    decay = torch.rand(lr.shape, dtype=lr.dtype)
    decay[..., 0], decay[..., 1] = 0.0, 1.0
    out, _ = scan(q, k, v, lr, mini_batch_size=2, decay=decay, **MATRIX)
    assert torch.isfinite(out).all()


def test_a_non_finite_momentum_is_refused() -> None:
    q, k, v, lr = _inputs()
    momentum = torch.full(lr.shape, 0.9, dtype=lr.dtype)
    momentum[0, 0, 2] = float("inf")
    with pytest.raises(ValueError, match="momentum must be finite"):
        scan(q, k, v, lr, mini_batch_size=1, update_rule="momentum", momentum=momentum, **MATRIX)


@pytest.mark.parametrize("norm_eps", [-1.0, 0.0, float("nan"), float("inf"), "1e-6", None, True])
def test_a_bad_norm_eps_is_named(norm_eps) -> None:
    q, k, v, lr = _inputs()
    with pytest.raises(ValueError, match=r"norm_eps must be a finite number in \(0, 1\), got"):
        scan(q, k, v, lr, mini_batch_size=2, norm_eps=norm_eps)


def test_a_numpy_integer_mini_batch_size_is_an_integer() -> None:
    q, k, v, lr = _inputs()
    by_numpy, _ = scan(q, k, v, lr, mini_batch_size=np.int64(4))
    by_int, _ = scan(q, k, v, lr, mini_batch_size=4)
    assert torch.equal(by_numpy, by_int)
    with pytest.raises(ValueError, match=r"mini_batch_size must be a positive integer <= 65536, got"):
        scan(q, k, v, lr, mini_batch_size=np.float64(4.0))


@pytest.mark.parametrize(("options", "mini_batch_size"), [(MATRIX, 1), ({}, 4), ({"inner_model": "mlp"}, 4)])
def test_meta_tensors_trace_the_torch_path_and_a_named_kernel_is_refused(options, mini_batch_size) -> None:
    q, k, v, lr = _inputs(dtype=torch.float32, head_dim=8, device="meta")
    dispatches: list[tuple[str, str]] = []
    out, weights = scan(q, k, v, lr, mini_batch_size=mini_batch_size, dispatches=dispatches, **options)
    assert out.device.type == "meta" and out.shape == q.shape
    assert all(w.device.type == "meta" for w in weights.values())
    assert dispatches and all(path == "torch" for path, _ in dispatches)
    assert any("meta tensors hold no values" in reason for _, reason in dispatches)
    with pytest.raises(KernelUnavailableError, match=r"kernel='cpu_ttt_linear' cannot run on meta tensors"):
        scan(q, k, v, lr, mini_batch_size=4, kernel="cpu_ttt_linear")


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize(("options", "mini_batch_size"), [(MATRIX, 1), ({}, 4), ({}, 3)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_compute_in_float32_on_every_path(options, mini_batch_size, dtype) -> None:
    """The same low-precision inputs give float32 numbers whichever path runs (a kernel computes in
    float32; the torch path did in bf16, 5x further from the truth), under autocast too."""
    q, k, v, lr = _inputs(dtype=dtype, tokens=12, head_dim=8)
    truth, truth_weights = scan(
        *(t.float() for t in (q, k, v, lr)), mini_batch_size=mini_batch_size, **options
    )
    for kernel in ("auto", "torch"):
        out, weights = scan(q, k, v, lr, mini_batch_size=mini_batch_size, kernel=kernel, **options)
        assert out.dtype == dtype and all(w.dtype == torch.float32 for w in weights.values())
        assert torch.equal(out, truth.to(dtype)) or _relative(out, truth.to(dtype)) < 1e-6
        for name, weight in weights.items():
            assert _relative(weight, truth_weights[name]) < 1e-5, (kernel, name)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under_autocast, _ = scan(q, k, v, lr, mini_batch_size=mini_batch_size, kernel=kernel, **options)
        assert torch.equal(under_autocast, out)


def test_a_low_precision_scan_continues_from_its_float32_weights_or_their_rounding() -> None:
    q, k, v, lr = _inputs(dtype=torch.bfloat16, tokens=8, head_dim=8)
    whole, _ = scan(q, k, v, lr, mini_batch_size=4)
    first, weights = scan(q[:, :, :4], k[:, :, :4], v[:, :, :4], lr[:, :, :4], mini_batch_size=4)
    second, _ = scan(q[:, :, 4:], k[:, :, 4:], v[:, :, 4:], lr[:, :, 4:], mini_batch_size=4, initial=weights)
    assert torch.equal(torch.cat([first, second], dim=2), whole)
    rounded = {name: w.to(torch.bfloat16) for name, w in weights.items()}
    scan(q[:, :, 4:], k[:, :, 4:], v[:, :, 4:], lr[:, :, 4:], mini_batch_size=4, initial=rounded)  # accepted
    with pytest.raises(
        TypeError, match=r"initial\['W1'\] is torch.float16; valid: torch.bfloat16 or torch.float32"
    ):
        scan(q, k, v, lr, mini_batch_size=4, initial={n: w.half() for n, w in weights.items()})


def test_the_value_checks_leave_vmap_working() -> None:
    """The decay/momentum value checks read values, which vmap cannot: they broke vmap over scan."""
    q, k, v, lr = _inputs()
    decay = 0.3 * torch.rand(lr.shape, dtype=lr.dtype)

    def one(q, k, v, lr, decay):  # one sequence: add the batch dimension scan takes
        out, _ = scan(q[None], k[None], v[None], lr[None], mini_batch_size=2, decay=decay[None], **MATRIX)
        return out[0]

    stacked = torch.stack([q[0], q[0] * 2]), torch.stack([k[0]] * 2), torch.stack([v[0]] * 2)
    mapped = torch.func.vmap(one)(*stacked, torch.stack([lr[0]] * 2), torch.stack([decay[0]] * 2))
    looped = torch.stack([one(stacked[0][i], k[0], v[0], lr[0], decay[0]) for i in range(2)])
    torch.testing.assert_close(mapped, looped, rtol=1e-12, atol=1e-12)
    # a tensor norm_eps is refused with one message, as TTTLayer's real options (tests/test_review_s49_s49a.py)
    with pytest.raises(ValueError, match=r"norm_eps must be .* \(a tensor: pass a Python number"):
        scan(q, k, v, lr, mini_batch_size=2, norm_eps=torch.tensor(1e-5, dtype=torch.float64))


@pytest.mark.parametrize("inner_model", ["linear", "mlp"])
def test_needs_double_backward_gives_the_torch_paths_gradients_of_gradients(inner_model) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 6, 8, dtype=torch.float64, generator=generator, requires_grad=True)
    lr = torch.full((1, 2, 6), 0.1, dtype=torch.float64)

    def second_derivative(**options):
        out, _ = scan(x, x.flip(-1), x, lr, inner_model=inner_model, mini_batch_size=3, **options)
        (gradient,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        return torch.autograd.grad(gradient.square().sum(), x)[0]

    expected = second_derivative(kernel="torch")
    torch.testing.assert_close(second_derivative(needs_double_backward=True), expected, rtol=1e-12, atol=0)
    with pytest.raises(RuntimeError, match=r"pass needs_double_backward=True to the TTTLayer or ops\.scan"):
        second_derivative()
    with pytest.raises(TypeError, match=r"needs_double_backward must be True or False, got 1"):
        scan(x, x, x, lr, needs_double_backward=1)
