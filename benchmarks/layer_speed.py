"""Forward throughput of TTT-Linear, TTT-MLP and a causal attention layer of the same width.

Defaults follow issue 2: CPU, 2 threads, float32, B=1, D=768, H=12, K=16, forward only (no grad),
T = 512 ... 8192. Prints a markdown table of tokens/s (median of --repeats rounds after a warm-up;
each round times every layer at every length once, so the machine's slow spells hit all of them
alike) and, with --json, writes the raw numbers atomically.

    python benchmarks/layer_speed.py
    python benchmarks/layer_speed.py --lengths 2048 --paths auto fused_torch torch --repeats 3

Paths: ``auto`` (what a user gets: the compiled CPU kernel for inference), ``cpu_ttt`` and
``fused_torch`` (those kernels forced), ``torch`` (the reference path).

Run it on a quiet machine: on 2 cores, any other busy process slows OpenMP's thread barriers
down by orders of magnitude.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # cli_args.py, ttt_paths.py: beside this script
from cli_args import add_layer_arguments, check_distinct, check_heads, json_path, positive_int, write_json  # noqa: E402
from ttt_paths import PATHS, paths_taken, print_table, record_paths, ttt_layers  # noqa: E402


class CausalAttention(nn.Module):
    """q/k/v/o projections + RoPE-free torch SDPA: the attention baseline of the same width."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, f]
        return self.o_proj(out.transpose(1, 2).reshape(batch, tokens, width))


def interleaved_median_seconds(fns: dict, repeats: int) -> dict:
    """Median seconds per call of each function, timed round-robin (one call of each per round), so
    that a slow spell of the machine hits every layer and length alike instead of whichever ran then."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", type=positive_int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    add_layer_arguments(parser)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument(
        "--paths",
        nargs="+",
        default=["auto"],
        choices=PATHS,
        help="TTT dispatch paths to time",
    )
    parser.add_argument("--json", type=json_path, help="write the numbers to this file")
    args = parser.parse_args(argv)
    check_heads(parser, args.hidden, args.heads)
    check_distinct(parser, "--lengths", args.lengths)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layers: dict[str, nn.Module] = ttt_layers(args.hidden, args.heads, args.mini_batch, args.paths)
    layers["attention (SDPA)"] = CausalAttention(args.hidden, args.heads).eval()

    taken = {name: record_paths(layer) for name, layer in layers.items()}
    results: dict[str, dict[int, float]] = {name: {} for name in layers}
    # Every (layer, length) pair in each round: the tokens/s of one layer across lengths (its flatness)
    # and of different layers are compared under the same conditions.
    inputs = {tokens: torch.randn(args.batch, tokens, args.hidden) for tokens in args.lengths}
    calls = {
        (name, tokens): (lambda layer=layer, x=x: layer(x))
        for tokens, x in inputs.items()
        for name, layer in layers.items()
    }
    with torch.inference_mode():
        seconds = interleaved_median_seconds(calls, args.repeats)
    for (name, tokens), median in seconds.items():
        results[name][tokens] = args.batch * tokens / median
    for name in layers:  # every path a layer's calls took (a remainder's torch beside a kernel too)
        print(f"# {name:24s} ran {paths_taken(taken[name], 'torch SDPA')}", flush=True)

    print_table(
        "layer",
        {t: f"T={t}" for t in args.lengths},
        results,
        ",.0f",
        f"B={args.batch} D={args.hidden} H={args.heads} K={args.mini_batch} fp32 forward; median of {args.repeats}",
        args.threads,
    )
    if args.json:
        write_json(args.json, {"args": {**vars(args), "json": str(args.json)}, "tokens_per_second": results})


if __name__ == "__main__":
    main()
