"""Where one layer call's time goes: the split behind the bounds in RESULTS.md's training-speed section.

For each layer of ``train_speed.py`` (TTT-Linear, TTT-MLP, the attention layer, the projections alone)
and each of its four settings (inference and training, fp32 and bf16 autocast), ``torch.profiler``
records ``--repeats`` calls after a warm-up, and each op's self time (the time inside it, not inside
the ops it called) is put in one of these parts, in milliseconds per call:

- ``inner scan``: the compiled CPU kernel's scans (``innerloop_stack_forward`` for inference,
  ``innerloop_linear_scan_*`` / ``innerloop_stack_scan_*`` forward and backward for training);
- ``hoisting`` and ``output LN``: the compiled ends around a training scan
  (``innerloop_hoist_*``, ``innerloop_output_norm_*``);
- ``products``: torch's matrix products (``aten::mm``, ``addmm``, ``bmm``, ``baddbmm``): the projections;
- ``SDPA``: the attention kernel, forward and backward;
- ``casts, copies``: ``aten::_to_copy``, ``copy_``, ``clone`` (under bf16 autocast mostly the casts);
- ``other ops``: every other op's self time (RoPE, gates, adds, the loss, the autograd engine's nodes);
- ``outside ops``: the call's time not inside any op (Python, the dispatcher), by difference.

``total`` is the profiled call's own time (the profiler adds a few percent); ``unprofiled`` the median of
the same call without it. The kernel's entry points are profiler events because
``innerloop.kernels.cpu.library.run_entry_point`` names them while a profiler records.

    python benchmarks/step_profile.py                          # D=768, H=12, K=16, T=2048, 2 threads
    python benchmarks/step_profile.py --threads 1 --length 4096 --json profile.json

Run it on a quiet machine, as train_speed.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from innerloop.core.wording import counted

sys.path.insert(0, str(Path(__file__).resolve().parent))  # cli_args, train_speed: beside this
from cli_args import (  # noqa: E402
    add_layer_arguments,
    apply_quick,
    check_heads,
    cpu_description,
    json_path,
    machine_line,
    positive_int,
    write_json,
)
from train_speed import COLUMNS, ROWS, TTT_MODELS, build_layers, make_call  # noqa: E402
from ttt_paths import path_lines, paths_taken  # noqa: E402

PARTS = (
    "inner scan",
    "hoisting",
    "output LN",
    "products",
    "SDPA",
    "casts, copies",
    "other ops",
    "outside ops",
)
PRODUCTS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
CASTS = {"aten::_to_copy", "aten::copy_", "aten::clone"}
QUICK = {"hidden": 64, "heads": 4, "mini_batch": 16, "length": 64, "repeats": 1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--length", type=positive_int, default=2048, help="sequence length T (default: 2048)")
    add_layer_arguments(parser)
    parser.add_argument(
        "--repeats", type=positive_int, default=5, help="profiled and unprofiled calls each (default: 5)"
    )
    parser.add_argument("--quick", action="store_true", help=f"CI-sized run: {QUICK}")
    parser.add_argument(
        "--json", type=json_path, default=None, help="also write the numbers to this file (atomically)"
    )
    args = parser.parse_args(argv)
    apply_quick(args, QUICK)
    check_heads(parser, args.hidden, args.heads)
    if args.length % args.mini_batch:
        parser.error(f"--length must be a multiple of --mini-batch {args.mini_batch}, got {args.length}")
    args.reference = None  # train_speed's build_layers: no reference column here
    return args


def part_of(name: str) -> str:
    """The part of the split an op's self time belongs to, by the op's (or kernel entry point's) name."""
    if name.startswith("innerloop_hoist"):
        return "hoisting"
    if name.startswith("innerloop_output_norm"):
        return "output LN"
    if name.startswith("innerloop_"):
        return "inner scan"
    if name in PRODUCTS:
        return "products"
    if "scaled_dot_product" in name:
        return "SDPA"
    if name in CASTS:
        return "casts, copies"
    return "other ops"


def split_of_call(call: Callable[[], None], repeats: int) -> dict[str, float]:
    """Milliseconds per call in each part, the profiled ``total`` and the ``unprofiled`` median."""
    for _ in range(2):  # warm-up: the kernel library, buffers, allocator
        call()
    unprofiled = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        unprofiled.append(time.perf_counter() - start)
    with profile(activities=[ProfilerActivity.CPU]) as recorded:
        start = time.perf_counter()
        for _ in range(repeats):
            call()
        total = (time.perf_counter() - start) / repeats
    split = dict.fromkeys(PARTS, 0.0)
    for event in recorded.key_averages():
        split[part_of(event.key)] += event.self_cpu_time_total / 1e6 / repeats  # microseconds -> s
    split["outside ops"] = max(0.0, total - sum(split.values()))
    split["total"] = total
    split["unprofiled"] = statistics.median(unprofiled)
    return {part: 1000 * seconds for part, seconds in split.items()}


def table(row: str, splits: dict[str, dict[str, float]]) -> list[str]:
    """Markdown lines for one setting: a row per layer, a column per part (ms per call)."""
    lines = [
        f"| {row}, ms per call | " + " | ".join([*PARTS, "total", "unprofiled"]) + " |",
        "|---|" + "---|" * (len(PARTS) + 2),
    ]
    for name, split in splits.items():
        cells = [f"{split[part]:.1f}" for part in [*PARTS, "total", "unprofiled"]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def profile_every_call(
    layers: dict[str, torch.nn.Module], x: torch.Tensor, repeats: int
) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, dict[str, str]]]:
    """``({row: {layer: split}}, {TTT layer: {row: the paths its calls took}})``: a fallback from the CPU
    kernel (``kernel="auto"`` runs the next path where it is missing or refused) has no inner scan, its
    work in other parts, so the run says which path each TTT layer's profiled calls took."""
    results: dict[str, dict[str, dict[str, float]]] = {}
    paths: dict[str, dict[str, str]] = {name: {} for name in TTT_MODELS}
    for row in ROWS:
        results[row] = {}
        for name in COLUMNS:
            results[row][name] = split_of_call(make_call(row, layers[name], x), repeats)
            if name in paths:  # a TTT layer's dispatches are its last call's
                paths[name][row] = paths_taken({path for path, _ in layers[name].dispatches}, "?")
    return results, paths


def main(argv: list[str] | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """Profile every setting and layer, print a table per setting; returns ``{row: {layer: {part: ms}}}``."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    layers = build_layers(args)
    x = torch.randn(args.batch, args.length, args.hidden)
    results, paths = profile_every_call(layers, x, args.repeats)
    print(
        f"\n{machine_line(args.threads)}; "
        f"load average {os.getloadavg()[0]:.2f}; B={args.batch} T={args.length} "
        f"D={args.hidden} H={args.heads} K={args.mini_batch}, float32 weights; {counted(args.repeats, 'call')} each"
    )
    print("\n".join(path_lines(paths)))
    for row, splits in results.items():
        print("\n" + "\n".join(table(row, splits)))
    if args.json is not None:
        arguments = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        write_json(
            args.json,
            {"args": arguments, "machine": cpu_description(), "paths": paths, "ms_per_call": results},
        )
    return results


if __name__ == "__main__":
    main()
