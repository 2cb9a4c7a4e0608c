"""Which member of the test-time-regression family wins what: the family's tiny presets against TTT-Linear,
TTT-MLP, full attention and sliding-window attention, all matched to tiny's 118,760 parameters (within
0.2%), trained on the same tokens with the same seed.

Two tasks, each model trained from scratch on each:

(a) the built-in corpus (the Python standard library's source, bytes) at ``seq_len`` 512: validation
    loss, loss by position (one PNG overlaying every model's curve, ``innerloop compare``'s, on the
    same validation windows), training tokens/s;
(b) multi-query associative recall (``innerloop/data/recall.py``): 8 key-value pairs, 64 distractors,
    then every key again, only the recalled values scored. Sliding-window attention (window 32, two
    blocks: it reaches at most 62 tokens back, and every value lies 65 or more tokens before its query)
    can only guess, 1 in 64: recall accuracy, loss on the recalled values, training tokens/s.

    python benchmarks/family.py trainer.threads=1    # the full run (FULL below), ~4 minutes on 2 cores (RESULTS.md)
    python benchmarks/family.py --quick              # CI-sized: a few steps of each, tiny windows
    python benchmarks/family.py trainer.threads=2 --only deltanet-tiny tiny   # overrides before --only

Extra ``key=value`` arguments override every run. Writes ``<out>/family.md`` (the table), and the
comparison of task (a) as ``<out>/compare-<id>.{png,csv,md}``; prints the table.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from innerloop.config import load_config
from innerloop.core.wording import counted
from innerloop.data.atomic import atomic_write_text
from innerloop.train import train
from innerloop.train.compare import compare, load_compared_model, write_comparison

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
)  # noqa: E402

PRESETS = (
    "tiny",
    "tiny-mlp",
    "tiny-attention",
    "tiny-swa",
    "linear-attention-tiny",
    "deltanet-tiny",
    "gated-deltanet-tiny",
    "titans-tiny",
)
BASELINE = "tiny"


@dataclass(frozen=True)
class Setting:
    """Steps and sizes of one run of the benchmark (every model gets the same)."""

    corpus_steps: int
    corpus_batch_size: int
    seq_len: int
    corpus_val_batches: int
    recall_steps: int
    recall_batch_size: int
    num_pairs: int
    gap: int
    recall_val_batches: int


FULL = Setting(
    corpus_steps=60,
    corpus_batch_size=4,
    seq_len=512,
    corpus_val_batches=8,
    recall_steps=240,
    recall_batch_size=16,
    num_pairs=8,
    gap=64,
    recall_val_batches=4,
)
QUICK = Setting(
    corpus_steps=2,
    corpus_batch_size=2,
    seq_len=64,
    corpus_val_batches=1,
    recall_steps=2,
    recall_batch_size=4,
    num_pairs=2,
    gap=8,
    recall_val_batches=1,
)


def _common(steps: int, seed: int, out_dir: Path) -> list[str]:
    return [
        f"trainer.max_steps={steps}",
        f"trainer.val_every={steps}",
        f"trainer.checkpoint_every={steps}",
        "trainer.progress_bar=false",
        f"seed={seed}",
        f"out_dir={out_dir}",
    ]


def corpus_overrides(setting: Setting, seed: int, out_dir: Path) -> list[str]:
    """Task (a): the preset's model on the built-in corpus at ``setting.seq_len``."""
    return [
        f"data.seq_len={setting.seq_len}",
        f"data.batch_size={setting.corpus_batch_size}",
        f"data.val_batches={setting.corpus_val_batches}",
        "trainer.num_position_buckets=16",
        *_common(setting.corpus_steps, seed, out_dir),
    ]


def recall_overrides(setting: Setting, seed: int, out_dir: Path) -> list[str]:
    """Task (b): the preset's model on the recall task (its length follows from pairs and gap)."""
    return [
        "data.name=recall",
        f"data.recall.num_pairs={setting.num_pairs}",
        f"data.recall.gap={setting.gap}",
        f"data.batch_size={setting.recall_batch_size}",
        f"data.val_batches={setting.recall_val_batches}",
        "optim.lr=0.01",  # the recall presets'
        *_common(setting.recall_steps, seed, out_dir),
    ]


def train_preset(preset: str, overrides: list[str]) -> tuple[dict[str, float], Path, float]:
    """Train ``preset`` with ``overrides``; ``(final validation metrics, checkpoint, wall seconds)``."""
    run, cfg = load_config(preset, overrides)
    start = time.perf_counter()
    result = train(run, cfg, overwrite=True)  # a rerun replaces its own runs (check_replaceable_runs)
    mark_benchmark_run(Path(run.out_dir))
    return result.metrics, result.checkpoint, time.perf_counter() - start


def _tokens_per_s(checkpoint: Path, name: str) -> str:
    speed = load_compared_model(checkpoint, name, no_ttt=False).tokens_per_s
    return "?" if speed is None else f"{speed:,.0f}"


def preset_runs(
    setting: Setting, preset: str, seed: int, out: Path, extra: list[str]
) -> list[tuple[str, list[str]]]:
    """``(preset, overrides)`` of ``preset``'s two runs: task (a), the corpus, then task (b), recall."""
    return [
        (preset, [*corpus_overrides(setting, seed, out / "corpus" / preset), *extra]),
        (preset, [*recall_overrides(setting, seed, out / "recall" / preset), *extra]),
    ]


def run_benchmark(setting: Setting, presets: tuple[str, ...], seed: int, out: Path, extra: list[str]) -> str:
    """Train every preset on both tasks, compare them on task (a)'s windows; the Markdown table."""
    rows = []
    corpus_runs = []
    for preset in presets:
        corpus_dir = out / "corpus" / preset
        (_, corpus_run), (_, recall_run) = preset_runs(setting, preset, seed, out, extra)
        corpus, corpus_ckpt, corpus_s = train_preset(preset, corpus_run)
        recall, recall_ckpt, recall_s = train_preset(preset, recall_run)
        corpus_runs.append(corpus_dir)
        model = load_compared_model(corpus_ckpt, preset, no_ttt=False)
        mixer = load_config(preset)[0].model.mixer
        rows.append(
            f"| {preset} | {mixer} | {model.parameters:,} | {corpus['val_loss']:.3f} | "
            f"{math.exp(corpus['val_loss']):.2f} | {_tokens_per_s(corpus_ckpt, preset)} | "
            f"{recall['val_acc']:.3f} | {recall['val_loss']:.3f} | {_tokens_per_s(recall_ckpt, preset)} | "
            f"{corpus_s + recall_s:.0f} s |"
        )
        print(rows[-1], flush=True)
    baseline = BASELINE if BASELINE in presets else None
    comparison = compare(corpus_runs, baseline=baseline)
    _, png, _ = write_comparison(comparison, out)
    return "\n".join(
        [
            f"(a) corpus: seq_len {setting.seq_len}, {counted(setting.corpus_steps, 'step')} of {setting.corpus_batch_size} "
            f"windows; validation on {setting.corpus_val_batches * setting.corpus_batch_size} windows. "
            f"(b) recall: {counted(setting.num_pairs, 'pair')}, gap {setting.gap}, {counted(setting.recall_steps, 'step')} of "
            f"{setting.recall_batch_size} sequences, chance 1/64 = 0.016. Seed {seed}. "
            f"Loss by position: {png.name}.",
            "",
            "| preset | mixer | parameters | (a) val loss | (a) val ppl | (a) train tok/s | (b) recall acc "
            "| (b) loss (recalled) | (b) train tok/s | wall time |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="CI-sized run: a few steps, short windows")
    parser.add_argument(
        "--out", type=output_folder, default="runs/family-benchmark", help="folder for the runs and the table"
    )
    parser.add_argument(
        "--seed", type=seed_int, default=0, help=f"seed of every run, 0 to {SEED_MAX} (default: 0)"
    )
    parser.add_argument(
        "--only", nargs="+", default=list(PRESETS), choices=PRESETS, metavar="PRESET",
        help=f"presets to train (default: all of {', '.join(PRESETS)})",
    )  # fmt: skip
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for every run")
    args = parser.parse_args(argv)
    check_distinct(parser, "--only", args.only)
    fixed = "the table's header reports the benchmark's setting (edit FULL/QUICK in this script to change it)"
    refuse_set_keys(
        parser,
        args.overrides,
        {
            "seed": "give --seed",
            "out_dir": "give --out",
            **dict.fromkeys(
                ["data.name", "data.seq_len", "data.batch_size", "data.val_batches", "data.recall.",
                 "trainer.max_steps", "trainer.val_every", "trainer.checkpoint_every", "optim.lr"],
                fixed,
            ),
        },
    )  # fmt: skip
    setting, out = (QUICK if args.quick else FULL), Path(args.out)
    check_run_configs(
        parser,
        [run for preset in args.only for run in preset_runs(setting, preset, args.seed, out, args.overrides)],
    )
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    check_replaceable_runs([out / task / preset for preset in args.only for task in ("corpus", "recall")])
    table = run_benchmark(QUICK if args.quick else FULL, tuple(args.only), args.seed, out, args.overrides)
    print("\n" + table)
    atomic_write_text(out / "family.md", table + "\n")


if __name__ == "__main__":
    main()
