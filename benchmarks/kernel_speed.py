"""Speed of the Triton TTT kernels against the naive torch reference and torch SDPA.

For each sequence length T in 2k..32k, times (on CUDA) the chunk forward of:
- the fused Triton kernel (``innerloop.kernels.triton.<model>.forward``),
- the naive torch reference of the same computation (``<model>.naive.forward``),
- causal ``torch.nn.functional.scaled_dot_product_attention`` at the same width (B, H, T, f),
and, with ``--backward``, forward + backward of each. Prints one table row per (T, method).

``--dtype`` is the activations' dtype given to the Triton kernel and to SDPA. The default, float32, is
what ``TTTLayer`` hands the kernel (its inner scan is float32 at any weight dtype); bfloat16 / float16
time the kernel's lower-precision build, called directly. The naive reference always reads float32
(it takes one dtype).

Usage: python benchmarks/kernel_speed.py [--model linear|mlp|both] [--batch 1] [--heads 12]
       [--head-dim 64] [--mini-batch 16] [--dtype float32] [--backward] [--max-len 32768]

On a machine without CUDA (or without Triton) it says so on stderr and exits with status 1: nothing timed.
A row that raises (a kernel error, out of memory) prints ``failed`` and why, the other rows still run,
and the run then names the failed rows on stderr and exits with status 1.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

# Host-side modules only: none of them imports Triton.
from innerloop.kernels.triton.common import MAX_MINI_BATCH, shape_problem
from innerloop.kernels.triton.ttt_linear.fused import MAX_HEAD_DIM as LINEAR_MAX_HEAD_DIM
from innerloop.kernels.triton.ttt_mlp.fused import MAX_HEAD_DIM as MLP_MAX_HEAD_DIM

sys.path.insert(0, str(Path(__file__).resolve().parent))  # cli_args.py beside this script
from cli_args import int_range, non_negative_int, positive_int  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MAX_HEAD_DIMS = {"linear": LINEAR_MAX_HEAD_DIM, "mlp": MLP_MAX_HEAD_DIM}
LABELS = {"linear": "TTT-Linear", "mlp": "TTT-MLP"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["linear", "mlp", "both"], default="both")
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--heads", type=positive_int, default=12)
    p.add_argument(
        "--head-dim",
        type=positive_int,
        default=64,
        help=f"a power of two from 16 to {LINEAR_MAX_HEAD_DIM} (linear) or {MLP_MAX_HEAD_DIM} (mlp)",
    )
    p.add_argument("--mini-batch", type=int_range(1, MAX_MINI_BATCH), default=16)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--backward", action="store_true", help="time forward + backward")
    p.add_argument(
        "--min-len", type=positive_int, default=2048, help="first T, a multiple of --mini-batch; doubled"
    )
    p.add_argument("--max-len", type=positive_int, default=32768, help="last T at most, >= --min-len")
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument(
        "--skip-naive-above",
        type=non_negative_int,
        default=32768,
        help="skip the naive reference above this T (0: at every T)",
    )
    args = p.parse_args(argv)
    for model in ["linear", "mlp"] if args.model == "both" else [args.model]:
        reason = shape_problem(args.head_dim, args.mini_batch, MAX_HEAD_DIMS[model])
        if reason is not None:
            p.error(f"--head-dim {args.head_dim}: the Triton {LABELS[model]} kernel's {reason}")
    if args.min_len % args.mini_batch:
        p.error(f"--min-len {args.min_len} must be a multiple of --mini-batch {args.mini_batch}")
    if args.min_len > args.max_len:
        p.error(f"--min-len {args.min_len} must be <= --max-len {args.max_len}")
    return args


def cuda_time_ms(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` in milliseconds, measured with CUDA events after one warm-up."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)  # the mean of the middle two for an even --repeats, as the other scripts


def make_inputs(model: str, B: int, H: int, T: int, f: int, K: int, dtype, requires_grad: bool):
    """Random inputs at realistic scales on CUDA (weights in float32, activations in ``dtype``)."""
    dev = "cuda"

    def leaf(t):
        return t.requires_grad_(requires_grad)

    xq, xk, xv = (leaf(torch.randn(B, H, T, f, device=dev, dtype=dtype)) for _ in range(3))
    lr = leaf((torch.rand(B, H, T, device=dev) / f).to(dtype))
    tau = leaf(1.0 / torch.arange(1, K + 1, device=dev, dtype=torch.float32))
    lnw = leaf(torch.ones(H, f, device=dev))
    lnb = leaf(torch.zeros(H, f, device=dev))
    if model == "linear":
        params = {"W1": 0.02 * torch.randn(B, H, f, f, device=dev), "b1": torch.zeros(B, H, 1, f, device=dev)}
    else:
        params = {
            "W1": 0.02 * torch.randn(B, H, f, 4 * f, device=dev),
            "b1": torch.zeros(B, H, 1, 4 * f, device=dev),
            "W2": 0.02 * torch.randn(B, H, 4 * f, f, device=dev),
            "b2": torch.zeros(B, H, 1, f, device=dev),
        }
    params = {k: leaf(v) for k, v in params.items()}
    return xq, xk, xv, lr, tau, params, lnw, lnb


def runner(forward, inputs, backward: bool):
    """A closure running ``forward(*inputs)`` (and a backward of its output's sum when asked)."""

    def run():
        if backward:
            out, _ = forward(*inputs)
            out.float().sum().backward()
        else:
            with torch.no_grad():
                forward(*inputs)

    return run


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(
            f"kernel_speed: no CUDA device (torch {torch.__version__}): nothing was timed; the Triton kernels "
            "run on CUDA only (run this on a GPU machine)",
            file=sys.stderr,
        )
        return 1
    from innerloop.kernels.triton.common import triton_missing

    if triton_missing() is not None:
        print(f"kernel_speed: {triton_missing()}", file=sys.stderr)
        return 1
    from innerloop.kernels.triton import ttt_linear, ttt_mlp

    modules = {"linear": ttt_linear, "mlp": ttt_mlp}
    models = ["linear", "mlp"] if args.model == "both" else [args.model]
    mode = "fwd+bwd" if args.backward else "fwd"
    print(
        f"device: {torch.cuda.get_device_name()}  B={args.batch} H={args.heads} f={args.head_dim} "
        f"K={args.mini_batch} dtype={args.dtype} ({mode})"
    )
    print(f"{'T':>7} {'method':<16} {'ms':>10} {'Mtok/s':>9}")
    failed: list[str] = []
    T = args.min_len
    while T <= args.max_len:
        failed += [f"{name} at T={T}" for name in time_rows(T, timed_rows(args, T, modules, models), args)]
        T *= 2
    if failed:  # a kernel that raises is a finding, not a row to read past: the run fails
        print(f"kernel_speed: {len(failed)} row(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def timed_rows(
    args: argparse.Namespace, T: int, modules: dict, models: list[str]
) -> list[tuple[str, object]]:
    """``(method, closure)`` for every row at length ``T``: SDPA, then each model's kernel and reference."""
    B, H, f, K = args.batch, args.heads, args.head_dim, args.mini_batch
    dtype = DTYPES[args.dtype]
    q, k, v = (
        torch.randn(B, H, T, f, device="cuda", dtype=dtype, requires_grad=args.backward) for _ in range(3)
    )

    def sdpa(q=q, k=k, v=v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True), None

    rows = [("sdpa", runner(sdpa, (), args.backward))]
    for model in models:
        inputs = make_inputs(model, B, H, T, f, K, dtype, args.backward)
        rows.append((f"triton_{model}", runner(modules[model].forward, inputs, args.backward)))
        if T <= args.skip_naive_above:  # the reference reads float32 only
            reference_inputs = make_inputs(model, B, H, T, f, K, torch.float32, args.backward)
            rows.append(
                (f"naive_{model}", runner(modules[model].naive.forward, reference_inputs, args.backward))
            )
    return rows


def time_rows(T: int, rows: list[tuple[str, object]], args: argparse.Namespace) -> list[str]:
    """Time and print every row (a row that raises prints ``failed`` and why, and the others still run,
    e.g. past the naive reference out of memory at 32k); returns the methods that failed."""
    failed = []
    for name, fn in rows:
        try:
            ms = cuda_time_ms(fn, args.repeats)
            print(f"{T:>7} {name:<16} {ms:>10.3f} {args.batch * T / ms / 1e3:>9.2f}")
        except Exception as exc:
            print(f"{T:>7} {name:<16} {'failed':>10} ({type(exc).__name__}: {exc})")
            failed.append(name)
            torch.cuda.empty_cache()
    return failed


if __name__ == "__main__":
    sys.exit(main())
