"""Training and low-precision throughput of TTT-Linear, TTT-MLP and a causal attention layer (issue 13).

One run prints the path each TTT column ran in each setting (``kernel='auto'`` takes the next path where
the CPU kernel is missing or refused) and the issue's table, tokens/s per layer (columns) and setting (rows):

- ``inference fp32`` and ``inference bf16 autocast``: forward only, no autograd;
- ``training fwd+bwd fp32`` and ``training bf16 autocast``: forward, then backward of a scalar loss
  into every parameter and the input;
- ``training fp32 torch.compile``: the training row with each layer wrapped in ``torch.compile``
  (static shapes, one wrapper per length, compiled in the warm-up), against the eager row above it
  (skipped with ``--no-compile``);
- ``training fp32 compiled step``: the TTT layers on the opt-in path ``kernel="compiled_torch_<model>"``
  (the fused dual form with each mini-batch's step compiled; skipped with ``--no-compile``).

Columns: TTT-Linear and TTT-MLP (``kernel='auto'``: what a user gets), the attention layer of
``layer_speed.py`` (q/k/v/o projections + SDPA, same width), the four D x D projections alone (what
every one of those layers spends most of its products on: the machine's limit for them, and its
bf16 / fp32 ratio the bound on theirs), and the reference implementation
(test-time-training/ttt-lm-pytorch's ``TTTLinear`` / ``TTTMLP``) when ``--reference`` names a checkout
of it (its ``ttt.py`` is imported from there; nothing is downloaded), else "not available".

Defaults from the issue: CPU, 2 threads, float32 weights, B=1, D=768, H=12, K=16, T=2048, median of
``--repeats`` rounds after a warm-up; each round times every (setting, layer, length) once, so that
the machine's slow spells hit all of them alike. ``--lengths 2048 4096 8192`` adds a table per length
and the training rows' spread across lengths (flatness). ``--quick``: tiny sizes for CI.

    python benchmarks/train_speed.py
    python benchmarks/train_speed.py --lengths 2048 4096 8192 --repeats 3
    python benchmarks/train_speed.py --reference ~/src/ttt-lm-pytorch --json train_speed.json

Run it on a quiet machine: on 2 cores, any other busy process slows OpenMP's thread barriers down by
orders of magnitude.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch._dynamo
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # cli_args, layer_speed, ttt_paths: beside this
from cli_args import (
    add_layer_arguments,
    apply_quick,
    check_compile_backend,
    check_distinct,
    check_heads,
    cpu_description,
    json_path,
    machine_line,  # noqa: E402
    positive_int,
    write_json,
)
from layer_speed import CausalAttention  # noqa: E402
from ttt_paths import path_lines, paths_taken  # noqa: E402

import innerloop  # noqa: E402
import innerloop.kernels.fused_torch.compiled as compiled_step  # noqa: E402

ROWS = (
    "inference fp32",
    "inference bf16 autocast",
    "training fwd+bwd fp32",
    "training bf16 autocast",
)
COMPILE_ROW = "training fp32 torch.compile"
STEP_ROW = "training fp32 compiled step"
TTT_MODELS = {"TTT-Linear": "linear", "TTT-MLP": "mlp"}
LAYERS = ("TTT-Linear", "TTT-MLP", "attention (SDPA)")
PROJECTIONS = "projections alone"
COLUMNS = (*LAYERS, PROJECTIONS)
REFERENCE = "reference ttt-lm-pytorch"
QUICK = {"hidden": 64, "heads": 4, "mini_batch": 16, "lengths": [64], "repeats": 1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--lengths", type=positive_int, nargs="+", default=[2048], help="sequence lengths T (default: 2048)"
    )
    add_layer_arguments(parser)
    parser.add_argument(
        "--repeats", type=positive_int, default=5, help="timed rounds; the median is reported (default: 5)"
    )
    parser.add_argument(
        "--reference",
        type=Path,
        default=None,
        help="a ttt-lm-pytorch checkout (its ttt.py) for the reference column",
    )
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    parser.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile's backend for the compiled row (default: %(default)s; the tests use 'eager', "
        "which skips inductor's C++ compile)",
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"CI-sized run: {QUICK} (overrides those options)"
    )
    parser.add_argument(
        "--json", type=json_path, default=None, help="also write the numbers to this file (atomically)"
    )
    args = parser.parse_args(argv)
    apply_quick(args, QUICK)
    check_heads(parser, args.hidden, args.heads)
    check_distinct(parser, "--lengths", args.lengths)  # a length is a table of its own
    bad = [t for t in args.lengths if t % args.mini_batch]
    if bad:
        parser.error(f"--lengths must be positive multiples of --mini-batch {args.mini_batch}, got {bad}")
    if args.reference is not None and not (args.reference / "ttt.py").is_file():
        parser.error(f"--reference {args.reference}: no ttt.py there (a ttt-lm-pytorch checkout has one)")
    if not args.no_compile:
        check_compile_backend(parser, "--compile-backend", args.compile_backend, " (or --no-compile)")
    return args


def load_reference_layers(checkout: Path, hidden: int, heads: int, mini_batch: int) -> dict[str, nn.Module]:
    """The reference's ``TTTLinear`` and ``TTTMLP`` layers, imported from ``checkout/ttt.py``."""
    spec = importlib.util.spec_from_file_location("reference_ttt", checkout / "ttt.py")
    module = importlib.util.module_from_spec(spec)
    try:  # its imports (transformers, ...) are the checkout's business: say which one failed
        spec.loader.exec_module(module)
    except Exception as error:
        message = f"--reference {checkout}: importing its ttt.py failed: {type(error).__name__}: {error}"
        raise SystemExit(message) from error
    layers = {}
    for label, kind, base_lr in (("Linear", "linear", 1.0), ("MLP", "mlp", 0.1)):
        config = module.TTTConfig(
            hidden_size=hidden,
            num_attention_heads=heads,
            mini_batch_size=mini_batch,
            ttt_layer_type=kind,
            ttt_base_lr=base_lr,
        )
        layers[label] = getattr(module, f"TTT{label}")(config, layer_idx=0)
    return layers


class ReferenceLayer(nn.Module):
    """A reference layer called as ours are: ``layer(x)`` with the positions a model passes."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(x.shape[1], device=x.device)[None]
        out = self.layer(x, position_ids=positions)
        return out[0] if isinstance(out, tuple) else out


class Projections(nn.Module):
    """The q/k/v/o products of a layer of width D and nothing else: ``o(q(x) + k(x) + v(x))``. A layer
    built on them runs at most as fast as this, in either precision (the issue's "bf16 limit")."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(hidden_size, hidden_size, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(self.q(x) + self.k(x) + self.v(x))


def build_layers(args: argparse.Namespace) -> dict[str, nn.Module]:
    """Every timed layer by column label (the reference's as ``reference Linear`` / ``reference MLP``)."""
    torch.manual_seed(0)
    layers: dict[str, nn.Module] = {
        "TTT-Linear": innerloop.TTTLayer(
            args.hidden, args.heads, inner_model="linear", mini_batch_size=args.mini_batch
        ),
        "TTT-MLP": innerloop.TTTLayer(
            args.hidden, args.heads, inner_model="mlp", mini_batch_size=args.mini_batch, base_lr=0.1
        ),
        "attention (SDPA)": CausalAttention(args.hidden, args.heads),
        PROJECTIONS: Projections(args.hidden),
    }
    if args.reference is not None:
        for label, layer in load_reference_layers(
            args.reference, args.hidden, args.heads, args.mini_batch
        ).items():
            layers[f"reference {label}"] = ReferenceLayer(layer)
    return layers


def _output(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = layer(x)
    return out[0] if isinstance(out, tuple) else out  # a TTT layer returns (y, state)


def make_call(row: str, layer: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """One timed call of ``layer`` on ``x`` in the setting of ``row``."""
    precision = torch.autocast("cpu", dtype=torch.bfloat16) if "bf16" in row else contextlib.nullcontext()
    if row.startswith("inference"):

        def infer() -> None:
            with torch.inference_mode(), precision:
                _output(layer, x)

        return infer

    parameters = [p for p in layer.parameters() if p.requires_grad]
    x = x.detach().requires_grad_(True)

    def train() -> None:
        with precision:
            loss = _output(layer, x).float().square().mean()
        torch.autograd.grad(loss, [x, *parameters])

    return train


def timed_calls(
    args: argparse.Namespace, layers: dict[str, nn.Module]
) -> dict[tuple[int, str, str], Callable]:
    """Every (length, row, column) to time, as a call. The reference runs in the fp32 rows only (as in
    the issue's table); the compiled row wraps each of our layers in ``torch.compile``, the compiled-step
    row runs the TTT layers on ``kernel="compiled_torch_<model>"``."""
    stepped = {}
    if not args.no_compile:
        for name, model in TTT_MODELS.items():
            stepped[name] = copy.deepcopy(layers[name])
            stepped[name].kernel = f"compiled_torch_{model}"
    calls = {}
    for tokens in args.lengths:
        x = torch.randn(args.batch, tokens, args.hidden)
        for row in ROWS:
            for name, layer in layers.items():
                if name.startswith("reference") and "bf16" in row:
                    continue
                calls[tokens, row, name] = make_call(row, layer, x)
        for name in [] if args.no_compile else LAYERS:  # not the projections: nothing for compile to fuse
            # one static-shape compile per length, as a run at a fixed sequence length gets: a wrapper
            # shared by the lengths would recompile with dynamic shapes (slower generic code)
            layer = torch.compile(layers[name], backend=args.compile_backend, dynamic=False)
            calls[tokens, COMPILE_ROW, name] = make_call(COMPILE_ROW, layer, x)
        for name, layer in stepped.items():
            calls[tokens, STEP_ROW, name] = make_call(STEP_ROW, layer, x)
    return calls


def dispatched_paths(
    calls: dict[tuple[int, str, str], Callable], layers: dict[str, nn.Module], tokens: int
) -> dict[str, dict[str, str]]:
    """``{TTT column: {setting: the paths its call took}}`` at length ``tokens``, from one more call of each,
    untimed (a TTT layer's ``dispatches`` are its last call's): ``kernel="auto"`` runs the next path where
    the CPU kernel is missing or refused, and the table would time that path under the same label."""
    paths: dict[str, dict[str, str]] = {}
    for name in TTT_MODELS:
        paths[name] = {}
        for row in ROWS:
            calls[tokens, row, name]()
            paths[name][row] = paths_taken({path for path, _ in layers[name].dispatches}, "?")
    return paths


def interleaved_median_seconds(calls: dict, repeats: int) -> dict:
    """Median seconds per call of each function, timed round-robin after one warm-up call each."""
    for call in calls.values():
        call()
    times: dict = {key: [] for key in calls}
    for _ in range(repeats):
        for key, call in calls.items():
            start = time.perf_counter()
            call()
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in times.items()}


def table(results: dict[str, dict[str, float]], has_reference: bool) -> list[str]:
    """Markdown lines: one row per setting, one column per layer (tokens/s)."""
    lines = [
        "| tokens/s | " + " | ".join([*COLUMNS, REFERENCE]) + " |",
        "|---|" + "---|" * (len(COLUMNS) + 1),
    ]
    for row, speeds in results.items():
        cells = [f"{speeds[name]:,.0f}" if name in speeds else "-" for name in COLUMNS]
        if not has_reference:
            cells.append("not available")
        elif "reference Linear" in speeds:
            cells.append(f"Linear {speeds['reference Linear']:,.0f}, MLP {speeds['reference MLP']:,.0f}")
        else:
            cells.append("-")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines


def ratio_lines(results: dict[str, dict[str, float]]) -> list[str]:
    """The issue's goals as same-run ratios."""
    fp32, bf16 = results["inference fp32"], results["inference bf16 autocast"]
    train32, train16 = results["training fwd+bwd fp32"], results["training bf16 autocast"]
    attention = "attention (SDPA)"
    alone32, alone16 = fp32[PROJECTIONS], bf16[PROJECTIONS]
    lines = [
        f"training fp32: TTT-Linear / attention = {train32['TTT-Linear'] / train32[attention]:.2f} (goal >= 2), "
        f"TTT-MLP / attention = {train32['TTT-MLP'] / train32[attention]:.2f} (goal >= 1)",
        f"bf16 / fp32 inference: TTT-Linear {bf16['TTT-Linear'] / fp32['TTT-Linear']:.2f} (goal >= 3); "
        f"bf16 TTT-Linear / bf16 attention {bf16['TTT-Linear'] / bf16[attention]:.2f} (goal >= 3)",
        f"bf16 / fp32 training: TTT-Linear {train16['TTT-Linear'] / train32['TTT-Linear']:.2f} (goal >= 2), "
        f"TTT-MLP {train16['TTT-MLP'] / train32['TTT-MLP']:.2f}",
        f"this machine's bf16 / fp32 for the projections alone (the bound on a layer made of them): "
        f"inference {alone16 / alone32:.2f}, training {train16[PROJECTIONS] / train32[PROJECTIONS]:.2f}",
        f"share of the projections' limit: TTT-Linear inference fp32 {fp32['TTT-Linear'] / alone32:.0%}, "
        f"bf16 {bf16['TTT-Linear'] / alone16:.0%} (goal >= 70%); attention bf16 {bf16[attention] / alone16:.0%}",
    ]
    if "reference Linear" in train32:
        lines.append(
            f"training fp32: TTT-Linear / reference = {train32['TTT-Linear'] / train32['reference Linear']:.2f} "
            "(goal >= 3)"
        )
    if COMPILE_ROW in results:
        gains = ", ".join(f"{n} {results[COMPILE_ROW][n] / train32[n]:.2f}" for n in LAYERS)
        lines.append(f"torch.compile / eager training: {gains}")
    if STEP_ROW in results:
        step = results[STEP_ROW]
        gains = ", ".join(f"{n} {step[n] / train32[n]:.2f}" for n in TTT_MODELS)
        lines.append(
            f"compiled step / kernel='auto' training: {gains}; "
            f"TTT-MLP compiled step / attention = {step['TTT-MLP'] / train32[attention]:.2f} (goal >= 1)"
        )
    return lines


def flatness_lines(by_length: dict[int, dict[str, dict[str, float]]]) -> list[str]:
    """The fp32 training tokens/s of each layer across lengths, and its spread (max / min - 1)."""
    lengths = sorted(by_length)
    lines = ["| training fp32 tokens/s | " + " | ".join(f"T={t}" for t in lengths) + " | spread |"]
    lines.append("|---|" + "---|" * (len(lengths) + 1))
    for name in by_length[lengths[0]]["training fwd+bwd fp32"]:
        speeds = [by_length[t]["training fwd+bwd fp32"][name] for t in lengths]
        cells = " | ".join(f"{s:,.0f}" for s in speeds)
        lines.append(f"| {name} | {cells} | {max(speeds) / min(speeds) - 1:.0%} |")
    return lines


ALLOCATOR_VARIABLES = ("LD_PRELOAD", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
"""Settings that decide whether freed activations go back to the operating system between steps (and
come back as page faults in the next one): a preloaded allocator (jemalloc, tcmalloc) or glibc's
tunables. They change every column's speed, most of all the bf16 rows' (RESULTS.md)."""


def allocator_description() -> str:
    """The memory allocator settings of this process's environment, or glibc's defaults."""
    settings = [f"{name}={os.environ[name]}" for name in ALLOCATOR_VARIABLES if os.environ.get(name)]
    return ", ".join(settings) if settings else "the C library's default (no LD_PRELOAD or MALLOC_* settings)"


def main(argv: list[str] | None = None) -> dict[int, dict[str, dict[str, float]]]:
    """Time every setting and layer, print the tables; returns ``{T: {row: {column: tokens/s}}}``."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    layers = build_layers(args)
    # TTT-Linear and TTT-MLP run the same code (TTTLayer.forward): each length compiles it twice, and
    # past dynamo's recompile_limit (8 by default: 5 lengths) later lengths would run eagerly, unsaid
    recompiles = max(torch._dynamo.config.recompile_limit, 2 * len(args.lengths) + 2)
    with (
        compiled_step.compile_backend(args.compile_backend),
        torch._dynamo.config.patch(recompile_limit=recompiles),
    ):
        calls = timed_calls(args, layers)
        seconds = interleaved_median_seconds(calls, args.repeats)
    paths = dispatched_paths(calls, layers, args.lengths[0])
    by_length: dict[int, dict[str, dict[str, float]]] = {t: {} for t in args.lengths}
    for (tokens, row, name), median in seconds.items():
        by_length[tokens].setdefault(row, {})[name] = args.batch * tokens / median

    print(
        f"\n{machine_line(args.threads)}; "
        f"load average {os.getloadavg()[0]:.2f}; B={args.batch} D={args.hidden} "
        f"H={args.heads} K={args.mini_batch}, float32 weights; median of {args.repeats}"
    )
    print(f"memory allocator: {allocator_description()}")
    print("\n".join(path_lines(paths)))
    for tokens, results in by_length.items():
        print(f"\nT={tokens}\n")
        print("\n".join(table(results, args.reference is not None)))
        print("\n" + "\n".join(ratio_lines(results)))
    if len(args.lengths) > 1:
        print("\n" + "\n".join(flatness_lines(by_length)))
    if args.json is not None:
        data = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
        data["machine"] = {"cpu": cpu_description(), "allocator": allocator_description()}
        data["paths"] = paths
        data["tokens_per_second"] = {str(t): results for t, results in by_length.items()}
        write_json(args.json, data)
    return by_length


if __name__ == "__main__":
    main()
