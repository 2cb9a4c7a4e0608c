"""Long-distance associative recall: a tiny TTT-Linear model against a sliding-window model of the
same width and depth.

Each sequence holds 8 key-value pairs, then 64 distractor tokens, then every key again; only the value
after each repeated key is scored. A sliding window of 16 tokens (two blocks with a short pre-conv see
at most ~40 tokens back) cannot reach the pairs from the queries, so it can only guess (1 in 64);
the TTT layer writes the pairs into its inner weights and can read them back at any distance.

    python benchmarks/recall.py                      # both presets, the preset's steps
    python benchmarks/recall.py --steps 300 trainer.threads=2
    python benchmarks/recall.py --seeds 0 1 2          # the seeds RESULTS.md reports

Extra ``key=value`` arguments override both presets. Prints a Markdown table (recall accuracy on the
fixed validation set, loss on the scored tokens, parameters, wall time) and writes it to
``<out>/recall.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from innerloop.config import load_config
from innerloop.core.wording import counted
from innerloop.data.atomic import atomic_write_text
from innerloop.train import load_model, train

sys.path.insert(0, str(Path(__file__).resolve().parent))  # cli_args.py beside this script
from cli_args import (
    SEED_MAX,
    check_distinct,
    check_replaceable_runs,
    check_run_configs,
    mark_benchmark_run,
    output_folder,
    refuse_set_keys,
    seed_int,
    steps_int,
)  # noqa: E402

PRESETS = ("recall-ttt", "recall-swa")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--steps", type=steps_int, default=None, help="training steps (default: the presets')"
    )
    parser.add_argument(
        "--out", type=output_folder, default="runs/recall-benchmark", help="folder for the runs and the table"
    )
    parser.add_argument(
        "--seeds",
        type=seed_int,
        nargs="+",
        default=[0],
        help=f"seeds to train each preset with, distinct, each 0 to {SEED_MAX} (default: 0)",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for both presets")
    args = parser.parse_args(argv)
    check_distinct(parser, "--seeds", args.seeds)  # a seed's runs go to one folder per preset
    refuse_set_keys(parser, args.overrides, {"seed": "give --seeds", "out_dir": "give --out"})
    if args.steps is not None:
        refuse_set_keys(parser, args.overrides, {"trainer.max_steps": "--steps gives it"})
    check_run_configs(
        parser, [(preset, run_overrides(args, preset, seed)) for seed in args.seeds for preset in PRESETS]
    )
    return args


def run_overrides(args: argparse.Namespace, preset: str, seed: int) -> list[str]:
    """The overrides of ``preset``'s run with ``seed``."""
    out_dir = Path(args.out) / f"{preset}-seed{seed}"
    overrides = [*args.overrides, f"seed={seed}", f"out_dir={out_dir}", "trainer.progress_bar=false"]
    return overrides + ([f"trainer.max_steps={args.steps}"] if args.steps is not None else [])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_replaceable_runs(
        [Path(args.out) / f"{preset}-seed{seed}" for seed in args.seeds for preset in PRESETS]
    )
    rows = []
    for seed in args.seeds:
        for preset in PRESETS:
            out_dir = Path(args.out) / f"{preset}-seed{seed}"
            run, cfg = load_config(preset, run_overrides(args, preset, seed))
            start = time.perf_counter()
            result = train(run, cfg, overwrite=True)  # a rerun replaces its own runs (check_replaceable_runs)
            mark_benchmark_run(out_dir)
            seconds = time.perf_counter() - start
            model = load_model(result.checkpoint)
            mixer = run.model.mixer + (f" (window {run.model.window})" if run.model.mixer == "swa" else "")
            rows.append(
                f"| {preset} | {mixer} | {seed} | {model.num_parameters():,} | {run.trainer.max_steps} | "
                f"{result.metrics['val_acc']:.3f} | {result.metrics['val_loss']:.3f} | {seconds:.0f} s |"
            )
            print(rows[-1], flush=True)

    recall = run.data.recall
    table = "\n".join(
        [
            f"Recall of {counted(recall.num_pairs, 'pair')} after {counted(recall.gap, 'distractor')} "
            f"(chance 1/64 = 0.016); validation set of {run.data.val_batches * run.data.batch_size} sequences.",
            "",
            "| preset | mixer | seed | parameters | steps | recall accuracy | loss (scored tokens) | wall time |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    print("\n" + table)
    atomic_write_text(Path(args.out) / "recall.md", table + "\n")  # a kill keeps the previous table


if __name__ == "__main__":
    main()
