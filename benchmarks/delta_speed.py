"""Training speed (forward + backward) of a DeltaNet layer on the chunked delta rule, against TTT-Linear.

Issue 12's goal: a DeltaNet layer (D=768, H=12, head dim 64) at T=2048 trains within 2x the time of
innerloop's TTT-Linear layer. Timed here, float32, B=1, each a forward and a backward of the mean
squared output (median of --repeats rounds after a warm-up; each round runs every layer once, so a slow
spell of the machine hits all of them alike):

- ``DeltaNet (chunk C)``: nn.Linear q/k/v/beta projections, L2-normalised q and k (q scaled by
  ``d ** -0.5``), ``beta = sigmoid``, ``chunk_delta_rule`` with chunk size C, the output projection;
- ``Gated DeltaNet (chunk 64)``: the same with Gated DeltaNet's gate (FLA's parametrisation,
  ``log a = -exp(A_log) * softplus(x W_a + dt_bias)``), decayed before the error;
- ``DeltaNet (token loop)``: the same layer on ``delta_rule_loop``, at ``--loop-tokens`` (a Python loop
  over tokens is too slow at T=2048 to time in every round); its ratio is to TTT-Linear at that length;
- ``innerloop DeltaNetLayer`` / ``GatedDeltaNetLayer``: the library's layers (``innerloop.core.family_layers``,
  FLA's defaults: short convolutions, gates, output norm), on whatever path dispatch picks;
- ``TTT-Linear``: ``innerloop.TTTLayer(hidden_size=768, num_heads=12, inner_model="linear")`` as a user
  gets it (kernel="auto": the path it ran is printed).

    python benchmarks/delta_speed.py
    python benchmarks/delta_speed.py --chunk-sizes 32 64 128 --repeats 7 --threads 2

torch.compile is off. Wall and process CPU times are both printed: on a machine shared with other work
the CPU time is the steadier of the two. Run it on a quiet machine (see layer_speed.py on busy 2-core
machines); the numbers of this machine are in innerloop/kernels/delta_chunk/README.md.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import innerloop
from innerloop.core import family_layers
from innerloop.kernels.delta_chunk import chunk_delta_rule, delta_rule_loop

sys.path.insert(0, str(Path(__file__).resolve().parent))  # cli_args.py beside this script
from cli_args import (
    add_layer_arguments,
    check_distinct,
    check_heads,
    json_path,
    machine_line,  # noqa: E402
    non_negative_int,
    positive_int,
    write_json,
)
from ttt_paths import paths_taken, record_paths  # noqa: E402


class DeltaNetLayer(nn.Module):
    """The DeltaNet mixer (Gated DeltaNet's with ``gated``) on a delta-rule function; no short convolutions."""

    def __init__(self, hidden_size: int, num_heads: int, rule: Callable, gated: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.beta = nn.Linear(hidden_size, num_heads, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.rule = rule
        self.gate = None
        if gated:  # Gated DeltaNet's gate: log a = -exp(A_log) * softplus(x W_a + dt_bias)
            self.gate = nn.Linear(hidden_size, num_heads, bias=False)
            self.A_log = nn.Parameter(torch.empty(num_heads).uniform_(0, 16).log())
            self.dt_bias = nn.Parameter(torch.zeros(num_heads))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B, T, D] -> (y [B, T, D], final state [B, H, f, f])``, like ``TTTLayer``'s (y, state)."""
        batch, tokens, width = x.shape
        q, k, v = (
            self.qkv(x).view(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        )  # [B, H, T, f]
        q = F.normalize(q, dim=-1) * self.head_dim**-0.5
        k = F.normalize(k, dim=-1)
        beta = self.beta(x).sigmoid().transpose(1, 2)  # [B, H, T]
        if self.gate is None:
            out, state = self.rule(q, k, v, beta)
        else:
            decay_log = -self.A_log.exp() * F.softplus(self.gate(x) + self.dt_bias)  # [B, T, H]
            out, state = self.rule(q, k, v, beta, decay_log=decay_log.transpose(1, 2))
        return self.o_proj(out.transpose(1, 2).reshape(batch, tokens, width)), state


def train_step(layer: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """One forward + backward of the layer's mean squared output (gradients reset each call)."""

    def step() -> None:
        layer.zero_grad(set_to_none=True)
        y, _ = layer(x)
        y.square().mean().backward()

    return step


def build_steps(args: argparse.Namespace) -> tuple[dict[str, Callable[[], None]], dict[str, int], nn.Module]:
    """The timed calls by label, the length each runs at, and the TTT-Linear layer (for its dispatch)."""
    steps: dict[str, Callable[[], None]] = {}
    lengths: dict[str, int] = {}

    def add(label: str, layer: nn.Module, tokens: int) -> None:
        steps[label], lengths[label] = train_step(layer, torch.randn(args.batch, tokens, args.hidden)), tokens

    for size in args.chunk_sizes:
        rule = functools.partial(chunk_delta_rule, chunk_size=size)
        add(f"DeltaNet (chunk {size})", DeltaNetLayer(args.hidden, args.heads, rule), args.tokens)
    add(
        "Gated DeltaNet (chunk 64)",
        DeltaNetLayer(args.hidden, args.heads, chunk_delta_rule, gated=True),
        args.tokens,
    )
    # The library's own layers, as a user gets them (short convolutions, gates, norms; kernel="auto"
    # dispatches their K = 1 blocks to the registered delta_chunk kernel).
    add("innerloop DeltaNetLayer", family_layers.DeltaNetLayer(args.hidden, args.heads), args.tokens)
    add(
        "innerloop GatedDeltaNetLayer", family_layers.GatedDeltaNetLayer(args.hidden, args.heads), args.tokens
    )
    ttt = innerloop.TTTLayer(hidden_size=args.hidden, num_heads=args.heads, inner_model="linear")
    add("TTT-Linear", ttt, args.tokens)
    if args.loop_tokens:
        add(
            "DeltaNet (token loop)", DeltaNetLayer(args.hidden, args.heads, delta_rule_loop), args.loop_tokens
        )
    if args.loop_tokens and args.loop_tokens != args.tokens:
        ttt_short = innerloop.TTTLayer(hidden_size=args.hidden, num_heads=args.heads, inner_model="linear")
        add("TTT-Linear (loop length)", ttt_short, args.loop_tokens)
    return steps, lengths, ttt


def interleaved_medians(steps: dict[str, Callable[[], None]], repeats: int) -> dict[str, tuple[float, float]]:
    """Median (wall, process CPU) seconds per call of each step, timed round-robin after a warm-up.

    The CPU time (all threads of this process) is the steadier number on a machine shared with other
    work: it does not count the time other processes hold the cores.
    """
    for step in steps.values():
        step()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            wall, cpu = time.perf_counter(), time.process_time()
            step()
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {
        name: (statistics.median(w for w, _ in pairs), statistics.median(c for _, c in pairs))
        for name, pairs in times.items()
    }


def print_results(results: dict[str, dict], args: argparse.Namespace) -> None:
    """The machine line, then one markdown row per layer."""
    print(
        f"\n{machine_line(args.threads)}; B={args.batch} D={args.hidden} H={args.heads} "
        f"fp32, forward + backward; median of {args.repeats}"
        f"{'; flush_denormal' if args.flush_denormal else ''}\n"
    )
    print("| layer | T | wall ms | wall / TTT-Linear's | CPU ms | CPU / TTT-Linear's |")
    print("|---|---|---|---|---|---|")
    for name, row in results.items():
        print(
            f"| {name} | {row['T']} | {row['wall_ms']:.0f} | {row['wall_ratio']:.2f} | "
            f"{row['cpu_ms']:.0f} | {row['cpu_ratio']:.2f} |"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=positive_int, default=2048, help="sequence length T (default: 2048)")
    add_layer_arguments(parser, mini_batch=False)  # the delta rule's unit is --chunk-sizes
    parser.add_argument(
        "--chunk-sizes",
        type=positive_int,
        nargs="+",
        default=[32, 64, 128],
        help="chunk sizes C of the chunked delta rule, one DeltaNet row each (default: 32 64 128)",
    )
    parser.add_argument(
        "--loop-tokens", type=non_negative_int, default=256, help="length for the token loop (0: skip it)"
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=5,
        help="timed rounds, each running every layer once (default: 5)",
    )
    parser.add_argument(
        "--flush-denormal",
        action="store_true",
        help="torch.set_flush_denormal(True): subnormal numbers become 0 (strong gates make them)",
    )
    parser.add_argument("--json", type=json_path, help="write the numbers to this file")
    args = parser.parse_args(argv)
    check_heads(parser, args.hidden, args.heads)  # the TTT-Linear layer's RoPE wants an even head size
    check_distinct(parser, "--chunk-sizes", args.chunk_sizes)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(args.flush_denormal)
    torch.manual_seed(0)
    steps, lengths, ttt = build_steps(args)
    taken = record_paths(ttt)
    medians = interleaved_medians(steps, args.repeats)
    print(f"# TTT-Linear ran {paths_taken(taken, '?')}", flush=True)
    baseline = {args.loop_tokens: medians.get("TTT-Linear (loop length)"), args.tokens: medians["TTT-Linear"]}
    results = {}
    for name, (wall, cpu) in medians.items():
        base_wall, base_cpu = baseline[lengths[name]]
        results[name] = {
            "T": lengths[name],
            "wall_ms": 1000 * wall,
            "wall_ratio": wall / base_wall,
            "cpu_ms": 1000 * cpu,
            "cpu_ratio": cpu / base_cpu,
        }
    print_results(results, args)
    if args.json:
        write_json(args.json, {"args": {**vars(args), "json": str(args.json)}, "results": results})


if __name__ == "__main__":
    main()
