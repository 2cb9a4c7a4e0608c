"""Decoding speed of whole language models after a long prompt: tokens/s and state size by context.

``innerloop generate`` reads the prompt, then feeds one token at a time with the state of the previous
step (``innerloop.models.generate``). A TTT model's state is its inner weights, the same size after 1k or
32k tokens, so its tokens/s should not depend on the context; full attention keeps a KV cache that grows
with the context and reads all of it for every token; sliding-window attention keeps the last
``window`` tokens. This script builds one model per mixer (same width, depth, heads and vocabulary;
random weights: speed does not depend on them), reads a random prompt of each context length in
chunks (carrying the state, which equals one call), then times greedy decoding of ``--tokens`` tokens.

    python benchmarks/generate_speed.py                       # contexts 1k and 32k, ~5 minutes on 2 cores
    python benchmarks/generate_speed.py --contexts 1024 8192 --mixers ttt attention --tokens 32
    python benchmarks/generate_speed.py --quick               # CI-sized: tiny model, short contexts

Prints which path each TTT model's layers took (prefill, decoding: ``kernel="auto"`` runs the next path
where a kernel is missing or refused), then one markdown table (tokens/s and the state's size per mixer and context, median of --repeats
rounds; one model at a time, its rounds alternating between the contexts), and with ``--json`` writes
the numbers atomically. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from innerloop.core.wording import counted
from innerloop.models import ModelConfig, build_model
from innerloop.models.config import TTTConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))  # cli_args.py, ttt_paths.py: beside this script
from cli_args import check_distinct, check_heads, json_path, machine_line, positive_int, write_json  # noqa: E402
from ttt_paths import model_paths, path_lines, paths_taken  # noqa: E402

MIXERS = {  # --mixers name -> (table label, model config changes over the common shape)
    "ttt": ("TTT-Linear", {"mixer": "ttt"}),
    "ttt_mlp": ("TTT-MLP", {"mixer": "ttt", "ttt": TTTConfig(inner_model="mlp", base_lr=0.1)}),
    "attention": ("attention (KV cache)", {"mixer": "attention"}),
    "swa": ("sliding window", {"mixer": "swa"}),
}


def common_config(args: argparse.Namespace) -> ModelConfig:
    """The shape every compared model shares: a byte vocabulary, ``--hidden`` wide (MLPs 4x), ``--layers``
    blocks of ``--heads`` heads, a ``--window`` for the mixers that keep one."""
    return ModelConfig(
        vocab_size=256,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        intermediate_size=4 * args.hidden,
        window=args.window,
    )


def build_models(args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    """One language model per requested mixer, in eval mode, same shape."""
    base = common_config(args)
    models = {}
    for name in args.mixers:
        label, changes = MIXERS[name]
        torch.manual_seed(0)
        models[label] = build_model(replace(base, **changes)).eval()
    return models


@torch.no_grad()
def prefill(model: torch.nn.Module, prompt: torch.Tensor, chunk: int):
    """The state after ``prompt [1, P]``, read ``chunk`` tokens at a time; and the last logits."""
    state = None
    for start in range(0, prompt.shape[1], chunk):
        logits, state = model(prompt[:, start : start + chunk], state)
    return logits[:, -1], state


@torch.no_grad()
def decode_seconds(
    model: torch.nn.Module, last_logits: torch.Tensor, state, tokens: int
) -> tuple[float, float]:
    """Wall and process CPU seconds to decode ``tokens`` greedy tokens from ``state`` (the state is
    not kept). On a machine shared with other work the CPU time is the steadier of the two.

    One token is decoded first, untimed: every round starts from the same prefilled state, and a
    cache decoded from twice is copied on its first step (attention's KV cache, which
    ``innerloop generate``, decoding once, never copies)."""
    token = last_logits.argmax(dim=-1, keepdim=True)  # [1, 1]
    logits, state = model(token, state)
    last_logits = logits[:, -1]
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(tokens):
        token = last_logits.argmax(dim=-1, keepdim=True)  # [1, 1]
        logits, state = model(token, state)
        last_logits = logits[:, -1]
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(
    args: argparse.Namespace,
) -> tuple[dict[str, dict[int, dict[str, float]]], dict[str, dict[str, str]]]:
    """``(results, paths)``: ``results[model][context]``, the median tokens/s over the rounds and the
    state's MiB after the prompt; ``paths[TTT model]``, the paths its TTT layers took reading the last
    prompt chunk of each context (``prefill @<context>``) and decoding the last token (``decoding``):
    ``kernel="auto"`` runs the next path where a kernel is missing or refused, under the same label.

    One model at a time: its prompts of every length are read, then each round decodes once after
    each of them, so the machine's slow spells hit every context alike (the flatness ratio is read
    within one model); its states are freed before the next model's prompts. (Keeping every model's
    states alive at once would let attention's KV cache of 32k tokens, 512 MiB at the default size,
    slow the others through the memory system.)"""
    models = build_models(args)
    generator = torch.Generator().manual_seed(0)
    prompts = {c: torch.randint(0, 256, (1, c), generator=generator) for c in args.contexts}
    results: dict[str, dict[int, dict[str, float]]] = {label: {} for label in models}
    paths: dict[str, dict[str, str]] = {}
    for label, model in models.items():
        prefilled, taken = {}, {}
        for c in args.contexts:
            prefilled[c] = prefill(model, prompts[c], args.prefill_chunk)
            taken[f"prefill @{c}"] = model_paths(model)
        for c in args.contexts:  # warm-up
            decode_seconds(model, *prefilled[c], tokens=2)
        times: dict[int, list[tuple[float, float]]] = {c: [] for c in args.contexts}
        for _ in range(args.repeats):
            for c in args.contexts:
                times[c].append(decode_seconds(model, *prefilled[c], tokens=args.tokens))
        taken["decoding"] = model_paths(model)
        if taken["decoding"] is not None:  # a model with TTT layers
            paths[label] = {setting: paths_taken(seen, "?") for setting, seen in taken.items()}
        for c in args.contexts:
            results[label][c] = {
                "tokens_per_s": args.tokens / statistics.median(wall for wall, _ in times[c]),
                "tokens_per_cpu_s": args.tokens / statistics.median(cpu for _, cpu in times[c]),
                "state_mib": prefilled[c][1].nbytes() / 2**20,
            }
        del prefilled
        gc.collect()
    return results, paths


def print_table(
    args: argparse.Namespace,
    results: dict[str, dict[int, dict[str, float]]],
    paths: dict[str, dict[str, str]],
) -> None:
    print(
        f"\n{machine_line(args.threads)}; float32, batch 1, width {args.hidden}, "
        f"{counted(args.layers, 'block')}, {counted(args.heads, 'head')}, window {args.window}; {counted(args.tokens, 'greedy token')} "
        f"after each context, median of {args.repeats}"
    )
    for line in path_lines(paths):
        print(line)
    print()
    contexts = args.contexts
    columns = {"tokens_per_s": "tok/s", "tokens_per_cpu_s": "tok/CPU-s"}
    header = [f"{name} @{c}" for name in columns.values() for c in contexts]
    header += [f"state MiB @{c}" for c in contexts]
    if len(contexts) > 1:
        header += [f"{name} {contexts[-1]} / {contexts[0]}" for name in columns.values()]
    print("| model | " + " | ".join(header) + " |")
    print("|---|" + "---|" * len(header))
    for label, row in results.items():
        cells = [f"{row[c][key]:,.1f}" for key in columns for c in contexts]
        cells += [f"{row[c]['state_mib']:.2f}" for c in contexts]
        if len(contexts) > 1:
            cells += [f"{row[contexts[-1]][key] / row[contexts[0]][key]:.2f}" for key in columns]
        print(f"| {label} | " + " | ".join(cells) + " |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--contexts", type=positive_int, nargs="+", default=[1024, 32768], help="prompt lengths, distinct"
    )
    parser.add_argument("--mixers", nargs="+", choices=list(MIXERS), default=list(MIXERS))
    parser.add_argument("--tokens", type=positive_int, default=64, help="tokens decoded per round")
    parser.add_argument("--repeats", type=positive_int, default=3, help="rounds (the median is reported)")
    parser.add_argument("--hidden", type=positive_int, default=512, help="model width")
    parser.add_argument("--layers", type=positive_int, default=4, help="blocks")
    parser.add_argument("--heads", type=positive_int, default=8, help="heads of every mixer")
    parser.add_argument("--window", type=positive_int, default=1024, help="the sliding window's length")
    parser.add_argument(
        "--prefill-chunk", type=positive_int, default=2048, help="prompt tokens per forward call"
    )
    parser.add_argument("--threads", type=positive_int, default=2, help="torch threads")
    parser.add_argument("--json", type=json_path, default=None, help="also write the numbers to this file")
    parser.add_argument("--quick", action="store_true", help="CI-sized: a tiny model, contexts 64 and 256")
    args = parser.parse_args(argv)
    if args.quick:
        args.contexts, args.tokens, args.repeats = [64, 256], 4, 1
        args.hidden, args.layers, args.heads, args.window, args.prefill_chunk = 32, 1, 2, 32, 64
    check_heads(parser, args.hidden, args.heads)  # every mixer rotates pairs of channels (RoPE)
    check_distinct(parser, "--contexts", args.contexts)  # a context is a column of the table
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results, paths = measure(args)
    print_table(args, results, paths)
    if args.json:
        write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
