"""``torch.compile(model)`` against eager on whole language models (issue 13): a training step, scoring a
sequence, and decoding one token at a time.

A user compiles the model itself, ``torch.compile(model)``: everything in it compiles except what runs
eagerly by design (a TTT layer's inner scan, a fused kernel already; TTT-E2E's suffix, whose chunks take
their inner step's gradient and start where the pending tokens end). This script builds one language
model per ``--models`` entry, a compiled copy of it (``--backend``, default inductor), and times both on
the same inputs:

- ``training step``: the forward of ``--seq-len`` tokens and the gradient of the next-token loss w.r.t.
  every parameter (no optimizer);
- ``scoring``: the same forward without gradients;
- ``decoding``: ``--tokens`` tokens one at a time after a prefill of ``--seq-len`` tokens, as
  ``innerloop generate`` feeds them (the time per token).

The warm-up runs every workload on both copies (its seconds are mostly the compiles, reported per model);
then each round times every workload eagerly and compiled, back to back, and the table gives the median
of ``--repeats`` rounds, the speed-up (eager time / compiled time) and how far the compiled output is from
eager's (relative RMS error of the logits, and for the training step of each parameter's gradient too: the
largest). It also prints which path each TTT model's layers took in each workload and copy (``kernel="auto"``
runs the next path where a kernel is missing or refused). Run it on a quiet machine.

    python benchmarks/compile_speed.py                     # TTT-Linear, TTT-MLP, TTT-E2E: minutes on 2 cores
    python benchmarks/compile_speed.py --models ttt --backend aot_eager
    python benchmarks/compile_speed.py --quick             # CI-sized: a tiny TTT-Linear model, aot_eager
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from innerloop.core.functional import relative_error
from innerloop.core.wording import counted
from innerloop.models import E2EConfig, build_model
from innerloop.models.config import TTTConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))  # cli_args.py beside this script
from cli_args import check_compile_backend, check_heads, json_path, machine_line, positive_int, write_json  # noqa: E402
from generate_speed import common_config  # noqa: E402
from ttt_paths import model_paths, path_lines, paths_taken  # noqa: E402

MODELS = {  # --models name -> table label
    "ttt": "TTT-Linear",
    "ttt_mlp": "TTT-MLP",
    "e2e": "TTT-E2E",
}
WORKLOADS = ("training step", "scoring", "decoding")


def build_models(args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    """One language model per requested entry of ``--models``, same shape, random weights."""
    base = common_config(args)
    changes = {
        "ttt": {"mixer": "ttt"},
        "ttt_mlp": {"mixer": "ttt", "ttt": TTTConfig(inner_model="mlp", base_lr=0.1)},
        "e2e": {"mixer": "e2e", "e2e": E2EConfig(chunk_size=args.chunk)},
    }
    models = {}
    for name in args.models:
        torch.manual_seed(0)
        models[MODELS[name]] = build_model(replace(base, **changes[name]))
    return models


def workloads(
    model: torch.nn.Module, ids: torch.Tensor, args: argparse.Namespace
) -> dict[str, Callable[[], tuple[torch.Tensor, ...]]]:
    """Each workload of ``model`` as a call that returns what it computed: the logits (and for the
    training step each parameter's gradient after them)."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    prompt, continuation = ids[:, : args.seq_len], ids[:, args.seq_len :]

    def training_step() -> tuple[torch.Tensor, ...]:
        logits, _ = model(prompt)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), prompt[:, 1:].flatten())
        return (logits.detach(), *torch.autograd.grad(loss, parameters))

    @torch.no_grad()
    def scoring() -> tuple[torch.Tensor, ...]:
        return (model(prompt)[0],)

    with torch.no_grad():
        _, prefilled = model(prompt)  # every round decodes from this state (a model never changes it)

    @torch.no_grad()
    def decoding() -> tuple[torch.Tensor, ...]:
        state, steps = prefilled, []
        for index in range(continuation.shape[1]):
            logits, state = model(continuation[:, index : index + 1], state)
            steps.append(logits)
        return (torch.cat(steps, dim=1),)

    return {"training step": training_step, "scoring": scoring, "decoding": decoding}


def output_error(compiled: tuple[torch.Tensor, ...], eager: tuple[torch.Tensor, ...]) -> float:
    """The largest relative error of a compiled workload's outputs (logits, gradients) against eager's,
    each on its own scale: the logits' norm would hide a wrong gradient."""
    return max(relative_error(c, e) for c, e in zip(compiled, eager, strict=True))


def timed(call: Callable[[], tuple[torch.Tensor, ...]]) -> tuple[float, tuple[torch.Tensor, ...]]:
    """Seconds of one call, and what it returned."""
    start = time.perf_counter()
    out = call()
    return time.perf_counter() - start, out


def measure_model(
    model: torch.nn.Module, args: argparse.Namespace
) -> tuple[dict[str, dict[str, float]], dict[str, str] | None]:
    """``(results, paths)``. ``results[workload]``: eager and compiled milliseconds (per token for
    decoding), the largest relative error of its outputs (logits, and gradients where it trains:
    :func:`output_error`), and (under the key ``warm-up``) the seconds of the first calls of both copies.
    ``paths["<workload> <eager|compiled>"]``: the paths the TTT layers' last call took there
    (``kernel="auto"`` runs the next path where a kernel is missing or refused); None without TTT layers."""
    model.train()  # as a training step runs it; a TTT model's inner updates do not depend on the mode
    compiled = torch.compile(copy.deepcopy(model), backend=args.backend)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (args.batch, args.seq_len + args.tokens), generator=generator)
    calls = {"eager": workloads(model, ids, args), "compiled": workloads(compiled, ids, args)}
    start = time.perf_counter()
    for _ in range(2):  # the second call of each still compiles (another state, a filled window)
        for by_workload in calls.values():
            for call in by_workload.values():
                call()
    warm_up = time.perf_counter() - start
    seconds: dict[str, dict[str, list[float]]] = {w: {"eager": [], "compiled": []} for w in WORKLOADS}
    errors: dict[str, float] = {}
    taken: dict[str, set[str] | None] = {}
    copies = {"eager": model, "compiled": compiled}
    for _ in range(args.repeats):
        for workload in WORKLOADS:
            outputs = {}
            for copy_name, by_workload in calls.items():
                elapsed, outputs[copy_name] = timed(by_workload[workload])
                seconds[workload][copy_name].append(elapsed)
                taken[f"{workload} {copy_name}"] = model_paths(copies[copy_name])
            errors[workload] = max(
                errors.get(workload, 0.0), output_error(outputs["compiled"], outputs["eager"])
            )
    results: dict[str, dict[str, float]] = {"warm-up": {"seconds": warm_up}}
    for workload in WORKLOADS:
        per = args.tokens if workload == "decoding" else 1
        eager, compiled_ms = (
            1e3 * statistics.median(seconds[workload][c]) / per for c in ("eager", "compiled")
        )
        results[workload] = {
            "eager_ms": eager,
            "compiled_ms": compiled_ms,
            "speed_up": eager / compiled_ms,
            "relative_error": errors[workload],
        }
    if any(seen is None for seen in taken.values()):  # no TTT layers
        return results, None
    return results, {setting: paths_taken(seen, "?") for setting, seen in taken.items()}


def print_table(
    args: argparse.Namespace,
    results: dict[str, dict[str, dict[str, float]]],
    paths: dict[str, dict[str, str]],
) -> None:
    print(
        f"\n{machine_line(args.threads)}; backend {args.backend}; float32, batch "
        f"{args.batch}, width {args.hidden}, {counted(args.layers, 'block')}, {counted(args.heads, 'head')}, sequences of "
        f"{counted(args.seq_len, 'token')}, {args.tokens} decoded; median of {args.repeats}"
    )
    for line in path_lines(paths):
        print(line)
    print()
    print("| model | workload | eager ms | compiled ms | speed-up (eager / compiled) | relative error |")
    print("|---|---|---|---|---|---|")
    for label, rows in results.items():
        for workload in WORKLOADS:
            row = rows[workload]
            unit = " per token" if workload == "decoding" else ""
            print(
                f"| {label} | {workload}{unit} | {row['eager_ms']:.2f} | {row['compiled_ms']:.2f} | "
                f"{row['speed_up']:.2f} | {row['relative_error']:.1e} |"
            )
    warm_ups = ", ".join(f"{label} {rows['warm-up']['seconds']:.0f} s" for label, rows in results.items())
    print(f"\nwarm-up (both copies' first two calls of every workload, mostly compiling): {warm_ups}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--backend", default="inductor", help="torch.compile's backend")
    parser.add_argument(
        "--seq-len", type=positive_int, default=512, help="tokens trained on, scored, prefilled"
    )
    parser.add_argument("--tokens", type=positive_int, default=32, help="tokens decoded per round")
    parser.add_argument("--batch", type=positive_int, default=1, help="sequences per call")
    parser.add_argument("--repeats", type=positive_int, default=5, help="rounds (the median is reported)")
    parser.add_argument("--hidden", type=positive_int, default=256, help="model width")
    parser.add_argument("--layers", type=positive_int, default=4, help="blocks")
    parser.add_argument("--heads", type=positive_int, default=4, help="heads of every mixer")
    parser.add_argument("--window", type=positive_int, default=64, help="TTT-E2E's sliding window")
    parser.add_argument("--chunk", type=positive_int, default=16, help="TTT-E2E's tokens per inner step")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch threads")
    parser.add_argument("--json", type=json_path, default=None, help="also write the numbers to this file")
    parser.add_argument("--quick", action="store_true", help="CI-sized: a tiny TTT-Linear model, aot_eager")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.backend, args.seq_len, args.tokens, args.repeats = ["ttt"], "aot_eager", 32, 2, 1
        args.hidden, args.layers, args.heads = 32, 1, 2
    check_heads(parser, args.hidden, args.heads)  # every mixer rotates pairs of channels (RoPE)
    check_compile_backend(parser, "--backend", args.backend)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results, paths = {}, {}
    for label, model in build_models(args).items():
        results[label], model_paths_taken = measure_model(model, args)
        if model_paths_taken is not None:
            paths[label] = model_paths_taken
    print_table(args, results, paths)
    if args.json:
        write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
