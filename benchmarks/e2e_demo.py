"""TTT-E2E demonstration on the built-in corpus (the Python standard library's source, bytes).

Two parts, both CPU-only:

1. ``streaming``: an e2e-tiny-shaped model reads a sequence and a 4x longer one in streaming mode;
   reports the peak CPU tensor memory of each (``innerloop.testing.memory``), the state's size, and
   the wall time per chunk by position in the sequence.
2. ``train``: three models trained one after another for the same CPU time (not wall-clock time)
   through ``innerloop.train`` (the same path as ``innerloop train --config e2e-tiny``):
   ``e2e`` (TTT-E2E), ``swa`` (the same sliding-window network without test-time training,
   ``model.e2e.test_time_training=false``) and ``full`` (the same, with a window as long as the
   sequence: full attention). Each run's max_steps is set from its measured step time so that its
   learning-rate schedule ends when its time is up, and a callback stops it at the budget anyway.
   Time is the process's CPU time (``time.process_time``, summed over its threads), not wall-clock
   time, single-threaded by default: the machine is shared, and wall time would measure the
   neighbours' load as much as the model. Validation and the step-time estimate come on top of it.
   Reports the validation loss by position of each, a plot and a JSON file.

Reproduce (from the repository root)::

    python benchmarks/e2e_demo.py --minutes 3 --out benchmarks/results/e2e_demo

The numbers, plot and command are recorded in ``benchmarks/RESULTS.md`` (section "TTT-E2E").
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from innerloop.config import load_config
from innerloop.core.wording import counted
from innerloop.data.atomic import atomic_write, atomic_write_text
from innerloop.models import build_model
from innerloop.testing.memory import peak_cpu_allocation

sys.path.insert(0, str(Path(__file__).resolve().parent))  # cli_args.py beside this script
from cli_args import (  # noqa: E402
    check_replaceable_runs,
    mark_benchmark_run,
    output_folder,
    positive_float,
    positive_int,
)

# The demo's shape: e2e-tiny at 4 blocks with MLP 172 (248,384 parameters; the preset itself is now
# 2 blocks, matched to tiny's budget), with 256-byte sequences (8 windows of 32, 16 chunks of 16).
SHAPE = ["model.num_layers=4", "model.intermediate_size=172"]
COMMON = [
    *SHAPE,
    "data.seq_len=256",
    "data.batch_size=8",
    "data.val_batches=16",
    "trainer.progress_bar=false",
]
MODELS = {
    "e2e": [],
    "swa": ["model.e2e.test_time_training=false"],
    "full": ["model.e2e.test_time_training=false", "model.window=256"],
}
LABELS = {
    "e2e": "TTT-E2E (SWA 32 + prime MLP learning per 16-token chunk)",
    "swa": "same SWA-32 model, no test-time training",
    "full": "same model, full attention",
}


# --------------------------------------------------------------------------------------------------
# Streaming: memory and time per chunk
# --------------------------------------------------------------------------------------------------


def streaming(short_tokens: int, chunks_timed: int, threads: int) -> dict:
    """Peak memory of streaming ``short_tokens`` and ``4 * short_tokens``; time per chunk by position."""
    torch.set_num_threads(threads)
    run, _ = load_config("e2e-tiny", SHAPE)
    torch.manual_seed(0)
    model = build_model(run.model).eval()
    chunk = run.model.e2e.chunk_size
    gen = torch.Generator().manual_seed(0)

    def stream(ids: torch.Tensor) -> None:
        for losses in model.stream_losses(ids.split(chunk, dim=1)):
            del losses

    result: dict = {"chunk_size": chunk, "window": run.model.window}
    short = torch.randint(256, (1, short_tokens), generator=gen)
    long = torch.randint(256, (1, 4 * short_tokens), generator=gen)
    stream(short)  # warm-up
    result["peak_bytes_short"] = peak_cpu_allocation(lambda: stream(short))
    result["peak_bytes_long"] = peak_cpu_allocation(lambda: stream(long))
    result["tokens_short"], result["tokens_long"] = short_tokens, 4 * short_tokens
    result["peak_ratio"] = result["peak_bytes_long"] / result["peak_bytes_short"]
    with torch.no_grad():
        result["state_bytes_short"] = model(short)[1].nbytes()
        result["state_bytes_long"] = model(long)[1].nbytes()

    # Time per chunk, chunk by chunk, over a long stream (median of each quarter of the positions).
    ids = torch.randint(256, (1, chunks_timed * chunk), generator=gen)
    times, state = [], None
    with torch.no_grad():
        for piece in ids.split(chunk, dim=1):
            start = time.perf_counter()
            _, state = model(piece, state)
            times.append(time.perf_counter() - start)
    quarter = len(times) // 4
    result["ms_per_chunk_by_quarter"] = [
        1e3 * statistics.median(times[q * quarter : (q + 1) * quarter]) for q in range(4)
    ]
    result["chunks_timed"] = len(times)
    return result


# --------------------------------------------------------------------------------------------------
# Training for equal time
# --------------------------------------------------------------------------------------------------


class CPUTimeLimit(Callback):
    """Stop training once the process has used ``seconds`` of CPU time since training started."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = 0.0
        self.used = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.used = time.process_time() - self.start
        if self.used >= self.seconds:
            trainer.should_stop = True


def seconds_per_step(overrides: list[str], steps: int = 4) -> float:
    """Median CPU time of a training step (forward, backward, AdamW) of the run's model and batch shape."""
    run, _ = load_config("e2e-tiny", COMMON + overrides)
    torch.manual_seed(0)
    model = build_model(run.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(256, (run.data.batch_size, run.data.seq_len + 1))
    times = []
    for _ in range(steps + 1):
        start = time.process_time()
        logits, _ = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.process_time() - start)
    return statistics.median(times[1:])


def train_for(name: str, seconds: float, out: Path, threads: int) -> dict:
    """Train model ``name`` for ``seconds`` of CPU time; return its steps, times and validation numbers."""
    from innerloop.train import train

    step_time = seconds_per_step(MODELS[name])
    max_steps = max(10, int(seconds / step_time))
    overrides = [
        *COMMON,
        *MODELS[name],
        f"trainer.max_steps={max_steps}",
        f"trainer.val_every={max_steps}",
        f"trainer.checkpoint_every={max_steps}",
        f"trainer.threads={threads}",
        f"out_dir={out / name}",
    ]
    run, cfg = load_config("e2e-tiny", overrides)
    limit = CPUTimeLimit(seconds)
    start = time.perf_counter()
    result = train(run, cfg, callbacks=[limit], overwrite=True)  # a rerun replaces its own runs
    mark_benchmark_run(out / name)
    wall = time.perf_counter() - start
    from innerloop.train.plots import read_loss_by_position_csv

    buckets, losses = read_loss_by_position_csv(result.csv)
    from innerloop.train import load_checkpoint

    steps = int(load_checkpoint(result.checkpoint)["global_step"])
    return {
        "overrides": overrides,
        "estimated_seconds_per_step": step_time,
        "planned_steps": max_steps,
        "steps": steps,
        "train_cpu_seconds": limit.used,
        "wall_seconds_incl_validation": wall,
        "val_loss": result.metrics["val_loss"],
        "val_ppl": result.metrics["val_ppl"],
        "buckets": buckets,
        "loss_by_position": losses,
    }


def plot(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results.items():
        middles = [(a + b - 1) / 2 for a, b in r["buckets"]]
        ax.plot(
            middles,
            r["loss_by_position"],
            marker="o",
            label=f"{LABELS[name]} ({counted(r['steps'], 'step')})",
        )
    ax.axvline(32, color="grey", linestyle=":", label="window (32)")
    ax.set_xlabel("position in the 256-byte context (bucket middle)")
    ax.set_ylabel("validation loss (nats per byte)")
    ax.set_title("Equal training CPU time: validation loss by position")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--minutes",
        type=positive_float,
        default=3.0,
        help="training budget of each model in minutes of process CPU time, summed over its threads; "
        "not wall-clock time (default: %(default)s)",
    )
    parser.add_argument(
        "--out", type=output_folder, default="benchmarks/results/e2e_demo", help="output folder"
    )
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads")
    parser.add_argument("--skip-train", action="store_true", help="only the streaming measurements")
    parser.add_argument(
        "--short-tokens",
        type=positive_int,
        default=512,
        help="length of the shorter stream (the longer one is 4x; at least the window plus a chunk)",
    )
    args = parser.parse_args(argv)
    shape = load_config("e2e-tiny", SHAPE)[0].model
    least = (
        shape.window + shape.e2e.chunk_size
    )  # the state grows until then: a peak there is not the flat one
    if args.short_tokens < least:
        parser.error(
            f"argument --short-tokens: must be >= {least} (the window, {shape.window}, plus a chunk, "
            f"{shape.e2e.chunk_size}: the streaming state fills up until then), got {args.short_tokens}"
        )
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out)

    if not args.skip_train:
        check_replaceable_runs([out / name for name in MODELS])
    report: dict = {"streaming": streaming(args.short_tokens, 64, args.threads)}
    s = report["streaming"]
    print(
        f"streaming peak memory: {s['peak_bytes_short']} B ({counted(s['tokens_short'], 'token')}) vs "
        f"{s['peak_bytes_long']} B ({counted(s['tokens_long'], 'token')}): ratio {s['peak_ratio']:.3f}; "
        f"state {s['state_bytes_short']} B vs {s['state_bytes_long']} B"
    )
    print("ms per chunk by quarter of the positions:", [f"{t:.2f}" for t in s["ms_per_chunk_by_quarter"]])
    atomic_write_text(out / "results.json", json.dumps(report, indent=2))

    if not args.skip_train:
        report["train"] = {}
        for name in MODELS:  # one after another: equal time means the machine is not shared between them
            report["train"][name] = train_for(name, 60 * args.minutes, out, args.threads)
            r = report["train"][name]
            print(
                f"{name}: {r['steps']} steps in {r['train_cpu_seconds']:.0f} CPU s, val loss {r['val_loss']:.4f} "
                f"(ppl {r['val_ppl']:.3f})"
            )
            atomic_write_text(out / "results.json", json.dumps(report, indent=2))
        plot(report["train"], out / "loss_by_position.png")
        header = "| position | " + " | ".join(report["train"]) + " |"
        print(header + "\n|" + "---|" * (len(report["train"]) + 1))
        first = next(iter(report["train"].values()))
        for b, (a, e) in enumerate(first["buckets"]):
            cells = [report["train"][n]["loss_by_position"][b] for n in report["train"]]
            print(
                f"| {a}-{e - 1} | " + " | ".join("nan" if math.isnan(c) else f"{c:.3f}" for c in cells) + " |"
            )
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
