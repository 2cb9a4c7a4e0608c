"""The Triton TTT kernels on a CUDA GPU against the torch path of the same layer (what CI, which has no
GPU, runs only through Triton's interpreter on the CPU).

For TTT-Linear and TTT-MLP at a few shapes (lengths that end inside a mini-batch included), a
``TTTLayer(kernel="auto")`` that runs the Triton kernel and a ``TTTLayer(kernel="torch")`` with the same
weights are compared on:

- the forward output and the final state, and every gradient (input and parameters), in float32;
- prefill then token-by-token decoding against the whole sequence (the decode kernel);
- bf16 autocast: the kernel's output against the torch path's under the same autocast;
- a ``create_graph=True`` backward through the kernel, which must raise (the kernels are differentiable
  once), never return second derivatives without the kernel's part.

Prints one line per check with its relative error and the paths that ran; exits 1 if any check fails,
and a check whose calls did not run the kernel (``auto`` fell back to another path) fails.

Usage: python benchmarks/triton_gpu_check.py [--dry-run-on-cpu]   (without CUDA and the flag: says so, exits 1)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch

from innerloop import TTTLayer

SHAPES = [  # (batch, tokens, heads, head_dim, mini_batch)
    (2, 256, 4, 64, 16),
    (1, 203, 2, 32, 16),
    (3, 64, 12, 64, 8),
]
DEVICE = (
    "cuda"  # `--dry-run-on-cpu`: the same checks against the CPU kernels (to try this script without a GPU)
)
FLOAT32_TOLERANCE = 1e-4  # relative, against the torch path in float32 (TF32 off)
BF16_TOLERANCE = 3e-2  # relative, against the torch path under the same bf16 autocast


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    got, want = got.detach(), want.detach()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def pair(model: str, hidden: int, heads: int, mini_batch: int) -> tuple[TTTLayer, TTTLayer]:
    """The torch-path layer and the auto-path layer (the Triton kernel on CUDA), with the same weights."""
    torch.manual_seed(0)
    options = dict(hidden_size=hidden, num_heads=heads, inner_model=model, mini_batch_size=mini_batch)
    reference = TTTLayer(**options, kernel="torch").to(DEVICE)
    fast = TTTLayer(**options, kernel="auto").to(DEVICE)
    fast.load_state_dict(reference.state_dict())
    return reference, fast


def check_float32(model: str, shape: tuple[int, ...], report) -> None:
    batch, tokens, heads, head_dim, mini_batch = shape
    reference, fast = pair(model, heads * head_dim, heads, mini_batch)
    x = torch.randn(batch, tokens, heads * head_dim, device=DEVICE, requires_grad=True)
    y_ref, state_ref = reference(x)
    y, state = fast(x)
    paths = sorted({path for path, _ in fast.dispatches})
    report("forward", relative_error(y, y_ref), FLOAT32_TOLERANCE, paths)
    weights = max(relative_error(state.params[k], state_ref.params[k]) for k in state_ref.params)
    report("final state", weights, FLOAT32_TOLERANCE, paths)
    grads_ref = torch.autograd.grad(y_ref.square().mean(), [x, *reference.parameters()])
    grads = torch.autograd.grad(y.square().mean(), [x, *fast.parameters()])
    worst = max(relative_error(g, r) for g, r in zip(grads, grads_ref, strict=True) if r.norm() > 0)
    report("every gradient", worst, FLOAT32_TOLERANCE, paths)

    prefill = tokens // 2 + 1
    with torch.no_grad():
        pieces, carried = [], None
        first, carried = fast(x[:, :prefill])
        pieces.append(first)
        for t in range(prefill, min(tokens, prefill + 2 * mini_batch + 3)):
            step, carried = fast(x[:, t : t + 1], carried)
            pieces.append(step)
        decoded = torch.cat(pieces, 1)
    decode_paths = sorted({path for path, _ in fast.dispatches})
    report(
        "prefill + decode",
        relative_error(decoded, y_ref[:, : decoded.shape[1]]),
        FLOAT32_TOLERANCE,
        decode_paths,
    )

    with torch.autocast(DEVICE, dtype=torch.bfloat16), torch.no_grad():
        low_ref, _ = reference(x)
        low, _ = fast(x)
    report(
        "bf16 autocast", relative_error(low, low_ref), BF16_TOLERANCE, sorted({p for p, _ in fast.dispatches})
    )

    y, _ = fast(x)
    try:
        (gx,) = torch.autograd.grad(y.square().mean(), x, create_graph=True)
        torch.autograd.grad(gx.square().sum(), x)
    except RuntimeError as err:
        report("double backward refused", 0.0, 0.0, [str(err).split("\n")[0][:70]], dispatched=False)
    else:
        report(
            "double backward refused", float("inf"), 0.0, ["returned second derivatives"], dispatched=False
        )


def reporter(
    model: str, shape: tuple[int, ...], failures: list
) -> Callable[[str, float, float, list[str]], None]:
    """Prints one check's line; records a failure in ``failures``: an error above the tolerance, or, for a
    check whose ``paths`` are the dispatched paths (``dispatched``), calls that did not run the kernel
    checked (:func:`kernel_checked`): ``kernel="auto"`` runs the next path where that kernel is missing
    or refused, and a comparison of that path with the torch path says nothing about the kernel."""

    def report(what: str, error: float, tolerance: float, paths: list[str], dispatched: bool = True) -> None:
        kernel = kernel_checked(model)
        ran = not dispatched or any(path.split(".")[0] == kernel for path in paths)
        ok = error <= tolerance and ran
        if not ok:
            failures.append((model, shape, what))
        missing = "" if ran else f"  ({kernel} did not run: nothing of it was checked)"
        print(
            f"{'ok  ' if ok else 'FAIL'} {model:6s} {str(shape):22s} {what:24s} {error:9.2e}  {paths}{missing}"
        )

    return report


def kernel_checked(model: str) -> str:
    """The kernel whose numbers the checks are about: the Triton kernel on CUDA, the CPU kernel in the dry
    run (the name its dispatches record; a decoded token's is ``<name>.decode``)."""
    return f"{'triton' if DEVICE == 'cuda' else 'cpu'}_ttt_{model}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dry-run-on-cpu",
        action="store_true",
        help="run the same checks against the CPU kernels (to try this script on a machine without a GPU)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    global DEVICE
    if parse_args(argv).dry_run_on_cpu:
        DEVICE = "cpu"
    elif not torch.cuda.is_available():
        print(
            f"triton_gpu_check: no CUDA device (torch {torch.__version__}): nothing was checked; the Triton "
            "kernels run on a GPU only (CI checks them through the interpreter; --dry-run-on-cpu runs "
            "these checks against the CPU kernels)",
            file=sys.stderr,
        )
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU (dry run)"
    print(f"{name}, torch {torch.__version__}")
    failures: list[tuple[str, tuple[int, ...], str]] = []
    for model in ("linear", "mlp"):
        for shape in SHAPES:
            check_float32(model, shape, reporter(model, shape, failures))
    print(f"{len(failures)} failure(s)" if failures else "every check passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
