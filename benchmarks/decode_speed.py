"""Decoding speed: milliseconds per generated token after a prefill, per layer: the median over
``--repeats`` rounds of each round's mean over its ``--tokens`` decoded tokens (the mini-batches'
inner-weight updates included), every round from the state after the prefill (and one warm-up token),
so attention's KV cache holds the context the table names at every round.

TTT layers decode in constant time and memory (the state is the inner weights); attention with a
KV cache reads the whole cache for every token, so its cost grows with the context. Defaults: CPU,
2 threads, float32, B=1, D=768, H=12, K=16, contexts of 2048 and 8192 tokens, 128 decoded tokens.

    python benchmarks/decode_speed.py
    python benchmarks/decode_speed.py --contexts 2048 --paths auto torch --tokens 64

Paths as in layer_speed.py: ``auto`` (the compiled CPU kernel's decode path), ``fused_torch`` /
``cpu_ttt`` (forced), ``torch`` (the reference). ``fused_torch`` has no decode step: a layer that names
it decodes on torch ops, and the line printed for each layer says so. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from innerloop.core.wording import counted

sys.path.insert(0, str(Path(__file__).resolve().parent))  # cli_args.py, ttt_paths.py: beside this script
from cli_args import add_layer_arguments, check_distinct, check_heads, positive_int  # noqa: E402
from ttt_paths import PATHS, paths_taken, print_table, record_paths, ttt_layers  # noqa: E402


class CachedAttention(nn.Module):
    """q/k/v/o projections + SDPA over a KV cache: the attention baseline for decoding.

    The cache is preallocated for ``capacity`` tokens and written in place (no copy per token)."""

    def __init__(self, hidden_size: int, num_heads: int, capacity: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.capacity = capacity
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cache: tuple | None = None) -> tuple[torch.Tensor, tuple]:
        batch, tokens, width = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        if cache is None:
            keys = k.new_empty(batch, self.num_heads, self.capacity, k.shape[-1])
            cache = (keys, torch.empty_like(keys), 0)
        keys, values, length = cache
        keys[:, :, length : length + tokens] = k
        values[:, :, length : length + tokens] = v
        length += tokens
        out = F.scaled_dot_product_attention(
            q, keys[:, :, :length], values[:, :, :length], is_causal=tokens > 1
        )  # [B, H, T, f]; one new token attends to the whole cache
        return self.o_proj(out.transpose(1, 2).reshape(batch, tokens, width)), (keys, values, length)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--contexts",
        type=positive_int,
        nargs="+",
        default=[2048, 8192],
        help="prompt lengths prefilled before decoding, one column each (default: 2048 8192)",
    )
    parser.add_argument(
        "--tokens", type=positive_int, default=128, help="tokens decoded per round (default: 128)"
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=5,
        help="rounds, each from the state after the prefill and a warm-up token (default: 5)",
    )
    add_layer_arguments(parser, batch=False)  # B=1: one stream decoding
    parser.add_argument(
        "--paths",
        nargs="+",
        default=["auto", "torch"],
        choices=PATHS,
        help="TTT paths to time, one row each (default: auto torch)",
    )
    args = parser.parse_args(argv)
    check_heads(parser, args.hidden, args.heads)
    check_distinct(parser, "--contexts", args.contexts)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layers: dict[str, nn.Module] = ttt_layers(args.hidden, args.heads, args.mini_batch, args.paths)
    capacity = max(args.contexts) + 1 + args.tokens  # the prompt, the warm-up token, a round
    layers["attention (KV cache)"] = CachedAttention(args.hidden, args.heads, capacity).eval()

    results: dict[str, dict[int, float]] = {name: {} for name in layers}
    taken = {name: record_paths(layer) for name, layer in layers.items()}
    for context in args.contexts:
        prompt = torch.randn(1, context, args.hidden)
        steps = torch.randn(args.tokens, 1, 1, args.hidden)
        for name, layer in layers.items():
            with torch.inference_mode():
                _, state = layer(prompt)
                _, state = layer(steps[0], state)  # warm-up
                after_prompt = copy.deepcopy(state)
                taken[name].clear()  # the paths of the decoded tokens only, not the prefill's
                # Per round, the mean over its tokens, not a median per token: the token that closes a
                # mini-batch also updates the inner weights (several times a plain token's cost on the
                # kernel's path), and a median would leave those updates out. Then the median round.
                rounds = []
                for _ in range(args.repeats):
                    # every round from the same state, at the context the table names: continuing the
                    # last round grew attention's cache by --tokens a round (2049-2689 tokens at 2048)
                    state = copy.deepcopy(after_prompt)
                    start = time.perf_counter()
                    for step in steps:
                        _, state = layer(step, state)
                    rounds.append((time.perf_counter() - start) / args.tokens)
            results[name][context] = statistics.median(rounds) * 1e3
            path = f"  ({paths_taken(taken[name], '')})" if taken[name] else ""
            print(
                f"# {name:26s} context={context:5d}: {results[name][context]:7.3f} ms/token{path}", flush=True
            )

    print_table(
        "layer (ms per token)",
        {c: f"context {c}" for c in args.contexts},
        results,
        ".3f",
        f"B=1 D={args.hidden} H={args.heads} K={args.mini_batch} fp32; the median over {counted(args.repeats, 'round')} of the mean "
        f"over {counted(args.tokens, 'decoded token')}, {_updates(args.tokens, args.mini_batch)} of them closing a mini-batch "
        "(the inner weights' update)",
        args.threads,
    )


def _updates(tokens: int, mini_batch: int) -> str:
    """How many of ``tokens`` consecutive tokens close a mini-batch of ``mini_batch``: "8", or "8-9"."""
    low, high = tokens // mini_batch, -(-tokens // mini_batch)
    return str(low) if low == high else f"{low}-{high}"


if __name__ == "__main__":
    main()
