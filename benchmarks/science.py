"""Why TTT-Linear/MLP train slower than sliding-window attention at CPU scale (issue 14, section 2).

Three studies, each a list of training runs of ``innerloop train`` (one process per run, ``--jobs``
at a time, one torch thread each), every model sized to the same parameter budget unless the point
varies the size on purpose:

    python benchmarks/science.py sweep --out runs/science            # what the TTT paper tunes
    python benchmarks/science.py compare --out runs/science          # issue 14's table, best settings
    python benchmarks/science.py recall --out runs/science           # MQAR accuracy vs pairs
    python benchmarks/science.py sweep --quick --out runs/science-q  # CI-sized: tiny shapes, 3 steps

``--points NAME ...`` runs only those points of a study (``--list`` names them); its files still hold
the study's other points finished in ``--out``. A finished run (its ``result.json``) is read back
instead of trained again, so an interrupted study resumes. Each study
prints a Markdown table and writes ``<study>.md``, ``<study>.csv`` and (sweep, recall) ``<study>.png``
into ``--out``, each written atomically. ``diagnose CHECKPOINT`` prints what a TTT model's inner loop
does on validation windows: the inner lr gate, the token-index scale, and the inner loss by mini-batch
at the learned initial weights W0 and at the weights carried from the earlier mini-batches.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from innerloop.checkpoints import CheckpointError
from innerloop.config import load_config
from innerloop.config.load import ConfigError, command_line_options
from innerloop.core.wording import counted
from innerloop.data.atomic import atomic_write
from innerloop.data.text import DataError
from innerloop.models.params import count_config_parameters, size_to_budget
from innerloop.train.run_dir import RUN_MARKERS

sys.path.insert(0, str(Path(__file__).resolve().parent))  # cli_args.py beside this script
from cli_args import output_folder, positive_int  # noqa: E402

# Issue 14's shape: 4 blocks x 64 wide, 512-byte windows of the built-in corpus (the standard library).
FULL = [
    "model.num_layers=4",
    "data.seq_len=512",
    "data.batch_size=8",
    "trainer.max_steps=300",
    "trainer.val_every=300",
    "trainer.checkpoint_every=300",
    "data.val_batches=4",
]
QUICK = [
    "model.num_layers=2",
    "data.seq_len=64",
    "data.batch_size=2",
    "trainer.max_steps=3",
    "trainer.val_every=3",
    "trainer.checkpoint_every=3",
    "data.val_batches=1",
]
ALWAYS = ["trainer.threads=1", "trainer.progress_bar=false", "seed=0"]
BUDGET_PRESET = ("tiny", ["model.num_layers=4"])  # TTT-Linear, 4 x 64, MLP 172: 221,072 parameters


@dataclass(frozen=True)
class Point:
    """One training run: a preset, its overrides, and whether to size its MLP to the budget."""

    name: str
    preset: str
    overrides: tuple[str, ...] = ()
    matched: bool = True
    no_ttt_twin: bool = False  # also evaluate the checkpoint with test-time training off
    tags: tuple[str, ...] = field(default_factory=tuple)


def _lin(name: str, *overrides: str, matched: bool = True) -> Point:
    return Point(name, "tiny", overrides, matched)


SWEEP = [  # in the order of what they tell, most first
    _lin("linear"),
    _lin("linear lr=1e-2", "optim.lr=0.01"),
    _lin("linear base_lr=0.1", "model.ttt.base_lr=0.1"),
    _lin("linear 1 head (dim 64)", "model.num_heads=1"),
    _lin("linear mini-batch 8", "model.ttt.mini_batch_size=8"),
    Point("mlp", "tiny-mlp"),
    _lin("linear mamba backbone", "model.backbone=mamba"),
    _lin("linear pre-conv only", "model.pre_conv=true"),  # the Mamba backbone's conv, no shared QK, no gate
    _lin("linear shared QK convs only", "model.ttt.share_qk=true"),
    _lin("linear output gate only", "model.ttt.use_gate=true"),
    Point("swa 64 mamba backbone", "tiny-swa", ("model.window=64", "model.backbone=mamba")),
    Point("mlp mamba backbone", "tiny-mlp", ("model.backbone=mamba",)),
    _lin("linear base_lr=10", "model.ttt.base_lr=10"),
    Point("swa 64 lr=1e-2", "tiny-swa", ("model.window=64", "optim.lr=0.01")),
    _lin("linear lr=1e-3", "optim.lr=0.001"),
    _lin("linear mini-batch 32", "model.ttt.mini_batch_size=32"),
    _lin("linear 2 heads (dim 32)", "model.num_heads=2"),
    _lin("linear no weight decay", "optim.weight_decay=0"),
    Point("mlp base_lr warm-up", "tiny-mlp", ("optim.ttt_base_lr_warmup=30",)),
    Point("swa 64", "tiny-swa", ("model.window=64",)),
    _lin("linear 2 x 96", "model.num_layers=2", "model.hidden_size=96", "model.num_heads=6", matched=False),
    _lin("linear 8 x 64", "model.num_layers=8", matched=False),
    _lin("linear mamba backbone seed 1", "model.backbone=mamba", "seed=1"),
    Point("swa 64 mamba backbone seed 1", "tiny-swa", ("model.window=64", "model.backbone=mamba", "seed=1")),
    _lin("linear mamba backbone seq 1024", "model.backbone=mamba", "data.seq_len=1024", "data.batch_size=4"),
    Point(
        "swa 64 mamba backbone seq 1024",
        "tiny-swa",
        ("model.window=64", "model.backbone=mamba", "data.seq_len=1024", "data.batch_size=4"),
    ),
    _lin("linear seq 1024", "data.seq_len=1024", "data.batch_size=4"),
    Point("swa 64 seq 1024", "tiny-swa", ("model.window=64", "data.seq_len=1024", "data.batch_size=4")),
]

COMPARE = [  # trained by the compare study; it compares them with the sweep's runs below
    Point("full attention", "tiny-attention"),
    Point("full attention mamba backbone", "tiny-attention", ("model.backbone=mamba",)),
    Point(
        "TTT-E2E window 64",
        "e2e-tiny",
        ("model.window=64", "data.batch_size=8", "trainer.diagnostics_batches=0"),
    ),
]
COMPARE_FROM_SWEEP = (
    "linear",
    "mlp",
    "swa 64",
    "linear mamba backbone",
    "mlp mamba backbone",
    "swa 64 mamba backbone",
)
"""The sweep's runs in the comparison (the sweep and compare studies share ``--out``)."""

RECALL_MODELS = {
    "TTT-Linear": ("recall-ttt", ()),
    "TTT-MLP": ("recall-ttt", ("model.ttt.inner_model=mlp", "model.ttt.base_lr=0.1")),
    "sliding window 16": ("recall-swa", ()),
    "full attention": ("recall-swa", ("model.mixer=attention",)),
    "TTT-E2E window 16": ("e2e-tiny", ("model.window=16", "trainer.diagnostics_batches=0", "optim.lr=0.01")),
}
RECALL_PAIRS = (4, 8, 16, 32)
RECALL_FULL = [
    "trainer.max_steps=600",
    "trainer.val_every=600",
    "trainer.checkpoint_every=600",
    "data.batch_size=32",
]
RECALL_COMMON = ["data.name=recall", "data.recall.gap=64", "data.val_batches=8"]


def recall_points() -> list[Point]:
    """Every recall model at every number of pairs (``RECALL_PAIRS``)."""
    return [
        Point(f"{model} pairs={pairs}", preset, (*overrides, f"data.recall.num_pairs={pairs}"), tags=(model,))
        for pairs in RECALL_PAIRS
        for model, (preset, overrides) in RECALL_MODELS.items()
    ]


# ---- running the points ------------------------------------------------------------------------


def slug(name: str) -> str:
    """A folder name for a point: lower case, letters, digits and dashes."""
    return "".join(c if c.isalnum() or c in ".=" else "-" for c in name.lower()).strip("-")


def merged(*override_lists: Sequence[str]) -> list[str]:
    """The overrides of ``override_lists`` with each key once, its last value in its first place (the
    config loader warns of a key given twice: ``FULL`` and ``BUDGET_PRESET`` both set ``model.num_layers``)."""
    by_key: dict[str, str] = {}
    for item in (item for overrides in override_lists for item in overrides):
        by_key[item.partition("=")[0].strip()] = item
    return list(by_key.values())


def budget_of(preset: str, overrides: Sequence[str]) -> int:
    """The parameter count of a preset's model with overrides (built on the meta device)."""
    run, _ = load_config(preset, list(overrides))
    return count_config_parameters(run.model).total


def sized_overrides(point: Point, base: Sequence[str], budget: int | None) -> list[str]:
    """The point's full override list; a matched point gets the MLP width closest to ``budget``."""
    overrides = merged(base, ALWAYS, point.overrides)  # a point may set its own seed
    if point.matched and budget is not None:
        run, _ = load_config(point.preset, overrides)
        sized = size_to_budget(run.model, budget)
        overrides = merged(overrides, [f"model.intermediate_size={sized.intermediate_size}"])
    return overrides


def command_for(point: Point, overrides: Sequence[str], run_dir: Path) -> list[str]:
    """The ``innerloop train`` command line of a point."""
    return [
        sys.executable,
        "-m",
        "innerloop",
        "train",
        "--config",
        point.preset,
        *overrides,
        f"out_dir={run_dir}",
    ]


def write_atomically(path: Path, text: str | bytes) -> None:
    """Write ``path`` atomically (``innerloop.data.atomic``: whole or absent, its temporary removed if
    the write fails; the folder made if missing)."""
    data = text.encode() if isinstance(text, str) else text
    atomic_write(path, lambda temporary: Path(temporary).write_bytes(data))


def last_metrics(run_dir: Path) -> dict[str, float]:
    """The last value of every column of the run's newest ``metrics.csv``."""
    versions = sorted((run_dir / "logs").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:]))
    values: dict[str, float] = {}
    with versions[-1].open() as handle:
        for row in csv.DictReader(handle):
            values.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return values


def loss_by_position(run_dir: Path) -> list[tuple[int, int, float]]:
    """``(start, end, loss)`` per position bucket of the run's final validation."""
    with (run_dir / "loss_by_position.csv").open() as handle:
        return [(int(r["start"]), int(r["end"]), float(r["loss"])) for r in csv.DictReader(handle)]


def source_commit() -> str:
    """The commit of the library that trains the runs, ``+modified`` when innerloop/ has uncommitted
    changes (so every result says which code made it)."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+modified" if git("status", "--porcelain", "--", "innerloop") else "")


def collect(point: Point, run_dir: Path, command: list[str]) -> dict:
    """The result of a finished run: parameters, validation, loss by position, inner diagnostics."""
    metrics = last_metrics(run_dir)
    buckets = loss_by_position(run_dir)
    layers = sorted(int(k.split("/")[1]) for k in metrics if k.startswith("inner_loss_before/"))
    hparams = (run_dir / "logs").glob("version_*/hparams.yaml")
    params = next(
        (
            line.split(":")[1].strip()
            for p in hparams
            for line in p.read_text().splitlines()
            if line.startswith("params_total:")
        ),
        "",
    )
    return {
        "name": point.name,
        "params": int(params) if params else None,
        "val_loss": metrics.get("val_loss"),
        "val_ppl": metrics.get("val_ppl"),
        "val_acc": metrics.get("val_acc"),
        "tokens_per_s": metrics.get("tokens_per_s"),
        "wall_time": metrics.get("wall_time"),
        "buckets": buckets,
        "inner_before": [metrics[f"inner_loss_before/{i}"] for i in layers],
        "inner_after": [metrics[f"inner_loss_after/{i}"] for i in layers],
        "command": shown_command(command),
        "commit": source_commit(),
    }


def shown_command(command: Sequence[str]) -> str:
    """:func:`command_for`'s list as a user types it: ``innerloop train ...`` (no interpreter)."""
    return " ".join(["innerloop", *command[3:]])  # [python, -m, innerloop, train, ...]


COMMAND_LINE = "command: "
"""The first line of a run's ``train.log``, before the command's: what trained it."""


def recorded_command(run_dir: Path) -> str | None:
    """The command that trained the run in ``run_dir``: its ``result.json``'s, else its ``train.log``'s
    first line's; None when neither records one (no run yet, or one written before they did)."""
    result, log = run_dir / "result.json", run_dir / "train.log"
    try:
        if result.exists():
            recorded = json.loads(result.read_text(encoding="utf-8"))
            if not isinstance(recorded, dict):
                raise ValueError(f"it holds a JSON {type(recorded).__name__}, not an object")
            return recorded.get("command")
        first = log.read_text(encoding="utf-8", errors="replace").split("\n", 1)[0] if log.exists() else ""
    except (OSError, ValueError) as error:  # a result.json cut short or edited by hand, an unreadable file
        raise SystemExit(
            f"science.py: error: cannot read the run in {str(run_dir)!r} ({' '.join(str(error).split())}): "
            "remove the folder to train the point again"
        ) from error
    return first.removeprefix(COMMAND_LINE) if first.startswith(COMMAND_LINE) else None


def finished(run_dir: Path) -> bool:
    """Whether a run folder holds a completed training (its log ends with the final report)."""
    log = run_dir / "train.log"
    return (
        (run_dir / "loss_by_position.csv").exists()
        and log.exists()
        and "loss by position:" in log.read_text()
    )


def stopped_run_said(point: Point, run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run that stopped before it finished (its config or a checkpoint, no
    final report); if so, say how to go on. Training the point again there would replace its
    ``train.log`` with ``innerloop train``'s refusal to write into a folder that holds a run."""
    found = [name for name in RUN_MARKERS if (run_dir / name).exists()]
    if not found:
        return False
    print(
        f"{point.name}: {str(run_dir)!r} holds a run that stopped before it finished ({', '.join(found)}; its "
        f"log: {str(run_dir / 'train.log')!r}): continue it with `innerloop train --resume out_dir={run_dir} "
        f">> {run_dir / 'train.log'} 2>&1` and run the study again to read it back, or remove the folder to "
        "train the point again",
        flush=True,
    )
    return True


def run_point(point: Point, out: Path, base: Sequence[str], budget: int | None) -> dict | None:
    """Train one point (unless its ``result.json`` exists) and return its result; None if it failed."""
    run_dir = out / "runs" / slug(point.name)
    result_path = run_dir / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    command = command_for(point, sized_overrides(point, base, budget), run_dir)
    if not finished(run_dir):  # a run whose driver was stopped after it finished is read back
        if stopped_run_said(point, run_dir):
            return None
        run_dir.mkdir(parents=True, exist_ok=True)
        with (run_dir / "train.log").open("w") as log:
            log.write(f"{COMMAND_LINE}{shown_command(command)}\n")
            log.flush()  # before the command's own output
            environment = {**os.environ, "OMP_NUM_THREADS": "1"}
            done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
        if done.returncode != 0:
            print(
                f"{point.name}: training failed (exit {done.returncode}); see {run_dir / 'train.log'}",
                flush=True,
            )
            return None
    result = collect(point, run_dir, command)
    write_atomically(result_path, json.dumps(result, indent=1))
    print(f"{point.name}: val loss {result['val_loss']:.4f}", flush=True)
    return result


def settings_of(command: str | Sequence[str]) -> list[str]:
    """What a run's command line sets (a result's recorded ``command``, or :func:`command_for`'s list),
    without the interpreter and the ``out_dir`` (which moves with ``--out``). Both are read as the
    recorded text is, words split at spaces, and the ``out_dir`` is all after its ``out_dir=`` (the last
    word of :func:`command_for`: an ``--out`` with a space in its name is one out_dir, not two words)."""
    text = command if isinstance(command, str) else shown_command(command)
    return text.split(" out_dir=", 1)[0].split()


def check_recorded_results(
    points: Sequence[Point], out: Path, base: Sequence[str], budget: int | None
) -> None:
    """Refuse, in one line before anything trains, an ``--out`` that holds a result of one of ``points``
    trained by another command (a ``--quick`` study's read back into a full one, a point whose settings
    changed since): it would be read back as this study's."""
    for point in points:
        run_dir = out / "runs" / slug(point.name)
        recorded = recorded_command(run_dir)
        if recorded is None:  # none yet, or written before runs recorded their command
            continue
        now = settings_of(command_for(point, sized_overrides(point, base, budget), run_dir))
        if settings_of(recorded) != now:
            raise SystemExit(
                f"science.py: error: --out {str(out)!r} holds a result of point {point.name!r} trained by "
                f"another command (`{recorded}`; this study's is `{' '.join(now)}`): give another --out, or "
                f"remove {str(run_dir)!r} to train the point again"
            )


def run_points(
    points: Sequence[Point], out: Path, base: Sequence[str], budget: int | None, jobs: int
) -> list[dict]:
    """Run the points, ``jobs`` at a time; the results of those that finished, in the points' order."""
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(lambda p: run_point(p, out, base, budget), points))
    return [r for r in results if r is not None]


# ---- tables and plots ----------------------------------------------------------------------------


def _bucket(result: dict, which: int) -> tuple[str, float]:
    start, end, loss = result["buckets"][which]
    return f"{start}-{end - 1}", loss


def _inner(result: dict) -> str:
    """Mean inner loss over the TTT layers, before -> after each mini-batch's update."""
    before, after = result["inner_before"], result["inner_after"]
    return f"{sum(before) / len(before):.3f} -> {sum(after) / len(after):.3f}" if before else ""


def _spans(result: dict) -> list[tuple[int, int]]:
    """The position buckets of a result (lists once read back from JSON)."""
    return [(int(b[0]), int(b[1])) for b in result["buckets"]]


REFERENCE_POINTS = (
    "swa 64",
    "swa 64 mamba backbone",
    "swa 64 mamba backbone seed 1",
    "swa 64 seq 1024",
    "swa 64 mamba backbone seq 1024",
)
"""The sliding-window runs the others are read against: each row against the one of its
:func:`reference_key`."""


def reference_key(result: dict) -> tuple[int, str, str]:
    """What a row must share with the sliding-window run it is read against: its window length, its
    backbone (``model.backbone``, ``transformer`` unless set) and its seed (``0`` unless set), from the
    command that trained it."""
    settings = dict(word.split("=", 1) for word in settings_of(result.get("command", "")) if "=" in word)
    return result["buckets"][-1][1], settings.get("model.backbone", "transformer"), settings.get("seed", "0")


def lm_table(results: Sequence[dict]) -> str:
    """Validation loss, and the loss at the first, middle and last position bucket, each also as the
    difference to the sliding-window run's (:data:`REFERENCE_POINTS`) of the same seq_len, backbone and
    seed (:func:`reference_key`) on the same windows (the same validation windows, so content
    differences between buckets cancel); blank where the study has no such run."""
    references = {reference_key(r): r for r in results if r["name"] in REFERENCE_POINTS}
    lines = [
        "| point | params | val loss | val ppl | loss (first / middle / last bucket) | minus sliding window's (same backbone, seed) | inner loss before -> after |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        at = (0, len(r["buckets"]) // 2, -1)
        spans = "/".join(_bucket(r, i)[0] for i in at)
        losses = " / ".join(f"{_bucket(r, i)[1]:.3f}" for i in at)
        reference = references.get(reference_key(r))
        same = reference is not None and _spans(reference) == _spans(r)
        delta = " / ".join(f"{_bucket(r, i)[1] - _bucket(reference, i)[1]:+.3f}" for i in at) if same else ""
        lines.append(
            f"| {r['name']} | {r['params']:,} | {r['val_loss']:.3f} | {r['val_ppl']:.2f} | {losses} ({spans}) "
            f"| {delta} | {_inner(r)} |"
        )
    return "\n".join(lines)


def shell_command(result: dict) -> str:
    """The ``innerloop train`` command line of a result (older results recorded it as ``-m innerloop ...``)."""
    return result["command"].removeprefix("-m ")


def lm_csv(results: Sequence[dict]) -> str:
    """One row per run and position bucket; ``val_acc`` is the recall study's number (its table and plot)."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["point", "params", "val_loss", "val_ppl", "val_acc", "start", "end", "loss", "command"])
    for r in results:
        for start, end, loss in r["buckets"]:
            writer.writerow(
                [r["name"], r["params"], r["val_loss"], r["val_ppl"], r.get("val_acc"), start, end, loss,
                 shell_command(r)]
            )  # fmt: skip
    return text.getvalue()


def plot_png(
    path: Path, series: dict[str, tuple[list[float], list[float]]], xlabel: str, ylabel: str
) -> None:
    """One line per series, written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.5), dpi=80)
    colors = plt.get_cmap("tab20").colors
    for i, (label, (xs, ys)) in enumerate(series.items()):
        style = "-" if i % 2 == 0 else "--"  # tab20 pairs a dark and a light shade: tell them apart
        axes.plot(xs, ys, marker="o", markersize=3, label=label, color=colors[i % 20], linestyle=style)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    write_atomically(path, buffer.getvalue())


def loss_curves(results: Sequence[dict]) -> dict[str, tuple[list[float], list[float]]]:
    """Loss by position (bucket middles) of every run, for :func:`plot_png`."""
    return {
        r["name"]: ([(s + e) / 2 for s, e, _ in r["buckets"]], [x for _, _, x in r["buckets"]])
        for r in results
    }


def recall_table(results: Sequence[dict]) -> tuple[str, dict[str, tuple[list[float], list[float]]]]:
    """Recall accuracy per model (rows) and number of pairs (columns), and the same as plot series."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    params: dict[str, int] = {}
    for r in results:
        model, pairs = r["name"].rsplit(" pairs=", 1)
        xs, ys = series.setdefault(model, ([], []))
        xs.append(float(pairs))
        ys.append(r["val_acc"])
        params[model] = r["params"]
    header = "| model | params | " + " | ".join(f"{p} pairs" for p in RECALL_PAIRS) + " |"
    lines = [header, "|---|---|" + "---|" * len(RECALL_PAIRS)]
    for model, (xs, ys) in series.items():
        by_pairs = dict(zip(xs, ys, strict=True))
        cells = " | ".join(f"{by_pairs[p]:.3f}" if p in by_pairs else "not run" for p in RECALL_PAIRS)
        lines.append(f"| {model} | {params[model]:,} | {cells} |")
    return "\n".join(lines), series


def compare_checkpoints(out: Path, results: Sequence[dict], quick: bool) -> str:
    """``innerloop compare`` on the trained runs (baseline: sliding window), then again with
    ``--no-ttt`` (each TTT model's weights with test-time training off); both tables."""
    runs = [str(out / "runs" / slug(r["name"])) for r in results]
    lengths = ["64", "128"] if quick else ["512", "1024"]
    baseline = slug("swa 64")
    tables = []
    for extra in ([], ["--no-ttt"]):
        command = [
            "innerloop",
            "compare",
            *runs,
            "--baseline",
            baseline,
            "--seq-len",
            *lengths,
            "--out",
            str(out / "compare"),
            *extra,
        ]
        done = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True)
        if done.returncode != 0:
            return f"`{' '.join(command)}` failed:\n\n```\n{done.stderr[-2000:]}\n```"
        tables.append(f"`{' '.join(command)}`\n\n{done.stdout.strip()}")
    return "\n\n".join(tables)


# ---- the studies ---------------------------------------------------------------------------------


def sweep_results_for_compare(out: Path, quick: bool) -> list[Path]:
    """The ``result.json`` of each of :data:`COMPARE_FROM_SWEEP` in ``out``; a SystemExit naming those
    missing (and the sweep command that trains them) before the compare study trains anything, since
    its comparison would silently lack those models (or fail for want of its baseline, ``swa 64``)."""
    paths = {name: out / "runs" / slug(name) / "result.json" for name in COMPARE_FROM_SWEEP}
    missing = [name for name, path in paths.items() if not path.exists()]
    if missing:
        points = " ".join(repr(name) for name in missing)
        raise SystemExit(
            f"science.py: error: the compare study compares with the sweep's runs in --out {str(out)!r}, "
            f"but {', '.join(map(repr, missing))} have no result there; run "
            f"`python benchmarks/science.py sweep{' --quick' if quick else ''} --out {out} --points {points}` first"
        )
    return list(paths.values())


def study_points(study: str) -> list[Point]:
    return {"sweep": SWEEP, "compare": COMPARE, "recall": recall_points()}[study]


def with_finished_points(
    points: Sequence[Point], results: Sequence[dict], out: Path, base: Sequence[str], budget: int | None
) -> list[dict]:
    """``results`` (the points run now) and every other point of ``points`` finished in ``out`` by this
    study's command (its ``result.json``), in the study's order: a run of some ``--points`` replaced the
    study's table with theirs alone. A point finished by another command is left out, with a line."""
    run_now = {result["name"]: result for result in results}
    merged = []
    for point in points:
        run_dir = out / "runs" / slug(point.name)
        if point.name in run_now:
            merged.append(run_now[point.name])
        elif (run_dir / "result.json").exists():
            recorded = recorded_command(run_dir)
            now = settings_of(command_for(point, sized_overrides(point, base, budget), run_dir))
            if recorded is not None and settings_of(recorded) != now:
                print(
                    f"{point.name}: left out of the table: its result in {str(run_dir)!r} was trained by another command"
                )
                continue
            merged.append(json.loads((run_dir / "result.json").read_text()))
    return merged


def run_study(args: argparse.Namespace) -> None:
    """Run (or read back) a study's points, then write and print its table, CSV and plot."""
    points = study_points(args.study)
    if args.points:
        unknown = sorted(set(args.points) - {p.name for p in points})
        if unknown:
            raise SystemExit(f"--points: unknown {unknown}; this study has {[p.name for p in points]}")
        points = [p for p in points if p.name in args.points]
    out = Path(args.out)
    if args.study == "recall":
        base = [] if args.quick else list(RECALL_FULL)
        base += RECALL_COMMON + (
            ["trainer.max_steps=3", "trainer.val_every=3", "data.val_batches=1"] if args.quick else []
        )
        budget = budget_of("recall-ttt", base)
    else:
        base = QUICK if args.quick else FULL
        budget = budget_of(BUDGET_PRESET[0], merged(BUDGET_PRESET[1], base))
    read_from_sweep = [p for p in SWEEP if p.name in COMPARE_FROM_SWEEP] if args.study == "compare" else []
    check_recorded_results([*points, *read_from_sweep], out, base, budget)
    from_sweep = sweep_results_for_compare(out, args.quick) if args.study == "compare" else []
    results = run_points(points, out, base, budget, args.jobs)
    if args.points:  # the study's files describe the whole study, not the points run now alone
        results = with_finished_points(study_points(args.study), results, out, base, budget)
    if args.study == "compare":
        results = [json.loads(path.read_text()) for path in from_sweep] + results
    if args.study == "recall":
        table, series = recall_table(results)
        plot_png(out / "recall.png", series, "key-value pairs", "recall accuracy")
        write_atomically(out / "recall.csv", lm_csv(results))
    else:
        table = lm_table(results)
        plot_png(
            out / f"{args.study}.png",
            loss_curves(results),
            "position in the window",
            "validation loss (nats/byte)",
        )
        write_atomically(out / f"{args.study}.csv", lm_csv(results))
    if args.study == "compare":
        table += "\n\n" + compare_checkpoints(out, results, args.quick)
    commands = "\n".join(
        f"- {r['name']} (at {r.get('commit', 'an earlier commit')}): `{shell_command(r)}`" for r in results
    )
    write_atomically(
        out / f"{args.study}.md", f"{table}\n\nBudget {budget:,} parameters. Runs:\n\n{commands}\n"
    )
    print(table)


# ---- what the inner loop does in a trained model -------------------------------------------------


class DiagnoseArgumentError(ValueError):
    """An option of ``diagnose`` that does not fit the checkpoint (known only once it is loaded)."""


def _ttt_blocks(model: torch.nn.Module) -> list[int]:
    """The indices of the blocks whose mixer is a TTT layer (the family's layers are TTT layers too; an
    E2E model's blocks have no ``mixer``)."""
    from innerloop.core.layer import TTTLayer

    blocks = getattr(model, "blocks", [])
    return [i for i, block in enumerate(blocks) if isinstance(getattr(block, "mixer", None), TTTLayer)]


def _mixer_inputs(model: torch.nn.Module, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """The input ``[B, T, D]`` of every block's TTT mixer for ``ids``."""
    inputs: dict[int, torch.Tensor] = {}
    hooks = [
        model.blocks[i].mixer.register_forward_pre_hook(
            lambda m, a, i=i: inputs.__setitem__(i, a[0].detach())
        )
        for i in _ttt_blocks(model)
    ]
    model(ids)
    for hook in hooks:
        hook.remove()
    return inputs


def _lr_gate(layer: torch.nn.Module, lr: torch.Tensor) -> tuple[torch.Tensor, str]:
    """The learning-rate gate of every token ``[B, H, T]`` and what it is: a TTT layer's inner lr is
    ``base_lr * sigmoid(x . w_h + c_h) / head_dim``; a family layer's has no ``1 / head_dim`` (DeltaNet's
    ``base_lr * beta``, Titans' ``base_lr * sigmoid(theta)``, Gated DeltaNet's ``base_lr * a * beta``)."""
    from innerloop.core.family_layers import FamilyLayer

    if isinstance(layer, FamilyLayer):
        return lr / max(layer.base_lr, 1e-12), "lr/base_lr"
    return lr * layer.head_dim / max(layer.base_lr, 1e-12), "sigmoid"


def inner_losses_by_mini_batch(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Mean inner loss of each mini-batch ``[3, n]``: at the learned W0, at the weights carried from
    the earlier mini-batches (before its own update), and after its update. The carried weights beat
    W0 where the layer's memory of the earlier tokens helps it on new ones. (Reads the layer's
    internals as ``innerloop.core.diagnostics`` does: in the scan's dtype, with the layer's forgetting
    gates, Gated DeltaNet's decay and Titans' momentum, and over the valid pairs of a loss that has
    some.)"""
    from innerloop.core.scan import checked_pairs, run_scan

    state = layer.init_state(x.shape[0])  # in the scan's dtype, as the layer's
    initial = state.params
    views, lr, tau, _ = layer._read(x, state)
    tau = tau if layer.update_rule.uses_token_scale else None
    views, (lr, tau, *gates) = layer.in_scan_dtype(views, lr, tau, *layer.forgetting(x))
    task = layer.inner_task()
    rows = []
    for start in range(0, x.shape[1] - layer.mini_batch_size + 1, layer.mini_batch_size):
        end = start + layer.mini_batch_size
        chunk = views.slice_tokens(start, end)
        pairs = checked_pairs(task.loss, task.loss.pairs(chunk, state.loss_carry), chunk, state.loss_carry)
        valid = torch.ones(end - start, device=x.device) if pairs.valid is None else pairs.valid
        weights = torch.broadcast_to(valid.to(lr.dtype), lr[:, :, start:end].shape)  # [B, H, K]
        carried = [_mean_inner_loss(task, p, pairs, weights) for p in (initial, state.params)]
        decay, momentum = (None if g is None else g[:, :, start:end] for g in gates)
        _, state = run_scan(layer.update_rule, state, task, chunk, lr[:, :, start:end], tau, decay, momentum)
        after = _mean_inner_loss(task, state.current_weights(tau), pairs, weights)
        rows.append(torch.stack([*carried, after]))
    return torch.stack(rows, dim=1)


def _mean_inner_loss(task: object, params: dict, pairs: object, weights: torch.Tensor) -> torch.Tensor:
    """The inner loss of ``pairs`` at ``params``, averaged with ``weights [B, H, K]`` (the valid pairs)."""
    losses = task.loss.token_loss(task.predict(params, pairs.inputs), pairs.targets)  # [B, H, K]
    return (losses * weights).sum() / weights.sum().clamp_min(1.0)


@torch.no_grad()
def diagnose(checkpoint: str, windows: int, seq_len: int) -> str:
    """A Markdown report of each TTT layer's inner lr gate, token-index scale and inner losses, on the
    first ``windows`` validation windows of the run that wrote ``checkpoint`` (read as ``innerloop eval``
    reads them: its data and tokenizer; the default corpus's held-out bytes for a checkpoint without its
    run); one line saying so when the model has no TTT layer. :class:`DiagnoseArgumentError` when
    ``seq_len`` is shorter than a TTT layer's mini-batch (no mini-batch to report)."""
    from innerloop.train import load_module
    from innerloop.train.run import evaluation_windows

    module = load_module(checkpoint)
    model = module.model.eval()
    blocks = _ttt_blocks(model)
    if not blocks:
        mixer = getattr(getattr(model, "config", None), "mixer", None) or type(model).__name__
        return (
            f"{checkpoint}: nothing to diagnose: no block of this model has a TTT layer as its mixer (mixer "
            f"{mixer!r}), and diagnose reports a TTT layer's inner lr gate, token scale and inner losses"
        )
    mini_batch = max(model.blocks[i].mixer.mini_batch_size for i in blocks)
    if seq_len < mini_batch:
        raise DiagnoseArgumentError(
            f"--seq-len {seq_len} must be >= {mini_batch}, the mini-batch size of this model's TTT layers "
            "(the inner losses are reported per mini-batch)"
        )
    # the run's own text and tokenizer: the default corpus in bytes was read whatever the run trained on
    ids = evaluation_windows(checkpoint, module, [], seq_len, batch_size=windows, batches=1).inputs
    lines = []
    for i, x in _mixer_inputs(model, ids).items():
        layer = model.blocks[i].mixer
        _, lr, tau, _ = layer._read(x, layer.init_state(x.shape[0], like=x))
        gate, named = _lr_gate(layer, lr)  # [B, H, T]
        losses = inner_losses_by_mini_batch(layer, x)  # [3, n]
        n = losses.shape[1]
        at = sorted({0, n // 4, n // 2, n - 1})  # fewer than four when there are fewer mini-batches
        lines += [
            f"block {i}: gate {named} mean {gate.mean():.3f} (min {gate.min():.3f}, max {gate.max():.3f}), "
            f"inner lr mean {lr.mean():.4f}; token scale tau {[round(float(t), 3) for t in tau.flatten()[:4]]}"
            f" ... {float(tau.flatten()[-1]):.3f}",
            "  inner loss by mini-batch "
            + ", ".join(
                f"#{k}: W0 {losses[0, k]:.3f} carried {losses[1, k]:.3f} after {losses[2, k]:.3f}" for k in at
            ),
        ]
    return "\n".join(lines)


# ---- innerloop's layer against the reference's, in training -------------------------------------


def import_reference(ttt_py: str) -> object:
    """The reference's ``ttt.py`` (test-time-training/ttt-lm-pytorch; not part of innerloop), imported
    from the user's copy and adapted to transformers 5 (its output classes and tied-weight keys are
    of transformers 4's form; the model itself is untouched)."""
    import importlib.util
    import types

    spec = importlib.util.spec_from_file_location("ttt", ttt_py)
    ttt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ttt)

    class Output(types.SimpleNamespace):
        def __getitem__(self, index: int) -> object:  # the reference reads outputs[0]
            return self.last_hidden_state if index == 0 else None

    ttt.TTTForCausalLM._tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    ttt.TTTOutput = ttt.TTTCausalLMOutput = Output
    return ttt


def reference_pair(ttt: object, layer_type: str, folder: Path, dtype: torch.dtype) -> tuple:
    """A small reference TTTForCausalLM (2 x 64, 4 heads) and innerloop's CausalLM loaded from it."""
    from innerloop.interop.ttt_lm_pytorch import load_model

    torch.manual_seed(0)
    mamba = layer_type == "mlp"  # TTT-MLP with the Mamba backbone, to cover pre-conv, share_qk and gate
    config = ttt.TTTConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        mini_batch_size=16,
        ttt_layer_type=layer_type,
        ttt_base_lr=0.1 if mamba else 1.0,
        use_gate=mamba,
        share_qk=mamba,
        pre_conv=mamba,
    )
    reference = ttt.TTTForCausalLM(config).to(dtype)
    reference.save_pretrained(folder / layer_type)
    return reference, load_model(folder / layer_type).to(dtype)


def _loss(
    model: torch.nn.Module, ids: torch.Tensor, targets: torch.Tensor, is_reference: bool
) -> torch.Tensor:
    logits = model(input_ids=ids, use_cache=False).logits if is_reference else model(ids)[0]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def reference_check(ttt_py: str, steps: int, folder: Path) -> str:
    """Gradients at the same weights (float64), then both models trained on the same batches."""
    from innerloop.interop.ttt_lm_pytorch import _our_key  # the reference -> innerloop name map
    from innerloop.train.data import TextDataModule

    ttt = import_reference(ttt_py)
    data = TextDataModule(seq_len=128, batch_size=8, val_batches=2)
    data.setup()
    lines = []
    for layer_type in ("linear", "mlp"):
        reference, ours = reference_pair(ttt, layer_type, folder, torch.float64)
        ids, targets = data.make_train_batch(0)
        _loss(reference, ids, targets, True).backward()
        _loss(ours, ids, targets, False).backward()
        theirs = {_our_key(n): p.grad for n, p in reference.named_parameters()}
        worst = max(
            ((p.grad - theirs[n]).abs().max() / theirs[n].abs().max()).item()
            for n, p in ours.named_parameters()
        )
        lines.append(
            f"TTT-{layer_type}: gradients of all {len(theirs)} parameters, worst max|ours - reference| / max|reference| = {worst:.1e} (float64)"
        )
    models = dict(
        zip(("reference", "innerloop"), reference_pair(ttt, "linear", folder, torch.float32), strict=True)
    )
    optimizers = {k: _adamw(m) for k, m in models.items()}
    curves: dict[str, list[float]] = {k: [] for k in models}
    for step in range(steps):
        ids, targets = data.make_train_batch(step)
        for name, model in models.items():
            loss = _loss(model, ids, targets, name == "reference")
            optimizers[name].zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizers[name].step()
            curves[name].append(loss.item())
    lines.append("| step | reference | innerloop |\n|---|---|---|")
    lines += [
        f"| {i} | {curves['reference'][i]:.5f} | {curves['innerloop'][i]:.5f} |"
        for i in range(0, steps, max(1, steps // 10))
    ]
    ids, targets = data.make_val_examples()
    with torch.no_grad():
        final = {k: _loss(m, ids, targets, k == "reference").item() for k, m in models.items()}
    lines.append(
        f"\nvalidation loss after {steps} steps: reference {final['reference']:.4f}, innerloop {final['innerloop']:.4f}"
    )
    return "\n".join(lines)


def _adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    """innerloop's AdamW groups: weight decay 0.1 on matrices, none on vectors; lr 3e-3 constant."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=3e-3, betas=(0.9, 0.95))


# ---- does one model's advantage grow with position? ----------------------------------------------


def advantage_growth(model: str, baseline: str, seq_len: int | None, resamples: int = 2000) -> str:
    """``model``'s loss minus ``baseline``'s over the first and the second half of the positions, on
    the baseline run's validation windows, and the change from the first half to the second with a
    95% paired bootstrap band over windows, expanded for the number of windows as ``innerloop compare``'s
    (:func:`~innerloop.train.bootstrap.expanded_tail`; negative: the model's advantage grows with position); no
    band below :data:`~innerloop.train.bootstrap.MIN_BAND_WINDOWS` windows, as in ``innerloop compare``
    (a percentile band over so few cannot cover what it says), the windows counted being those that score
    a token of the half scored in fewest (windows padded or partly unscored leave a half empty in some)."""
    from innerloop.train.bootstrap import MIN_BAND_WINDOWS, expanded_tail, few_resamples_note
    from innerloop.train.compare import compare

    # the baseline by the argument given (a run folder or a checkpoint file): compare matches it to the
    # model read from it; its folder's name alone named no model for a checkpoint file (last.safetensors)
    comparison = compare([model, baseline], None if seq_len is None else [seq_len], baseline=baseline)
    names = [m.name for m in comparison.models]
    result = comparison.lengths[0]
    if result.seq_len < 2:  # one position: no second half to compare the first with
        raise ConfigError(f"--seq-len {result.seq_len}: growth needs windows of 2 or more positions")
    half = len(result.buckets) // 2
    check_both_halves_scored(result.counts, result.buckets, half)
    sums = result.loss_sums[0] - result.loss_sums[1]  # [W, K]: per-window summed loss difference
    counts = result.counts  # [W, K]
    generator = torch.Generator().manual_seed(0)

    def halves(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first = sums[rows][..., :half].sum((-1, -2)) / counts[rows][..., :half].sum((-1, -2))
        second = sums[rows][..., half:].sum((-1, -2)) / counts[rows][..., half:].sum((-1, -2))
        return first, second

    first, second = halves(torch.arange(result.windows))
    # a half's sample is the windows that score a token of it (padding leaves the others nothing there)
    scored = [int((counts[:, part].sum(1) > 0).sum()) for part in (slice(None, half), slice(half, None))]
    fewest = min(scored)
    if fewest < MIN_BAND_WINDOWS:
        which = (
            ""
            if fewest == result.windows
            else f"the {('first', 'second')[scored.index(fewest)]} half is scored in "
        )
        band = (
            f"(no band: {which}{counted(fewest, 'window')}, fewer than the {MIN_BAND_WINDOWS} a band needs)"
        )
    else:
        draws = torch.randint(0, result.windows, (resamples, result.windows), generator=generator)
        change = torch.stack([torch.stack(halves(rows)) for rows in draws])  # [resamples, 2]
        tail = expanded_tail(fewest, 0.95)  # a plain 2.5% tail is too narrow over a few windows
        quantiles = torch.tensor([tail, 1 - tail], dtype=change.dtype)
        # nanquantile: a resample may hold no window that scores a half (0 / 0)
        low, high = torch.nanquantile(change[:, 1] - change[:, 0], quantiles)
        band = f"[{float(low):+.3f}, {float(high):+.3f}]"
        # its ends are the expanded tail's quantiles: over few windows few resamples lie beyond them
        rough = few_resamples_note(resamples, 0.95, fewest, default=2000)
        band += "" if rough is None else f" (a rough band: {rough})"
    end = result.buckets[-1][1]
    return (
        f"{names[0]} minus {names[1]} on {counted(result.windows, 'window')} of {result.seq_len}: "
        f"{float(first):+.3f} over positions 0-{result.buckets[half][0] - 1}, {float(second):+.3f} over "
        f"{result.buckets[half][0]}-{end - 1}; change {float(second - first):+.3f} {band}"
    )


def check_both_halves_scored(counts: torch.Tensor, buckets: Sequence[tuple[int, int]], half: int) -> None:
    """A :class:`ConfigError` when the buckets before ``half`` or from it on hold no scored token in any
    window (``counts [W, K]``): that half's mean loss is 0 / 0, and growth printed ``nan`` for it, its
    change and its band. The recall task scores only its answers, all at the end of a window."""
    seq_len = buckets[-1][1]
    for first, last in ((0, half), (half, len(buckets))):
        if float(counts[:, first:last].sum()) == 0:
            start, end = buckets[first][0], buckets[last - 1][1] - 1
            raise ConfigError(
                f"positions {start}-{end} of the {seq_len} hold no scored token in any window (the windows score "
                "only some targets: the recall task scores only its answers, at the end of a sequence), so "
                "growth has no loss there to compare the other half's with; compare models on text"
            )


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per study, and the diagnose / reference / growth tools."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="study", required=True)
    for study in ("sweep", "compare", "recall"):
        sub = commands.add_parser(study, help=f"run the {study} study")
        sub.add_argument(
            "--out",
            type=output_folder,
            default="runs/science",
            help="folder for the runs, tables and plots (default: runs/science)",
        )
        sub.add_argument("--quick", action="store_true", help="CI-sized: 2 blocks, 64-byte windows, 3 steps")
        sub.add_argument(
            "--jobs", type=positive_int, default=2, help="runs at a time, one thread each (default: 2)"
        )
        sub.add_argument("--points", nargs="+", help="run only these points (default: all)")
        sub.add_argument("--list", action="store_true", help="print the study's point names and exit")
    sub = commands.add_parser(
        "diagnose", help="inner lr gate, token scale and inner losses of a TTT checkpoint"
    )
    sub.add_argument("checkpoint")
    sub.add_argument("--windows", type=positive_int, default=8, help="validation windows (default: 8)")
    sub.add_argument(
        "--seq-len",
        type=positive_int,
        default=512,
        help="tokens per window, at least the TTT layers' mini-batch size (default: 512)",
    )
    sub = commands.add_parser(
        "reference", help="innerloop's TTT model against the reference's, gradients and training"
    )
    sub.add_argument("ttt_py", help="path to ttt.py of test-time-training/ttt-lm-pytorch")
    sub.add_argument("--steps", type=positive_int, default=100, help="training steps (default: 100)")
    sub.add_argument(
        "--out",
        type=output_folder,
        default="runs/science-reference",
        help="folder for the reference's saved models",
    )
    sub = commands.add_parser("growth", help="does one run's advantage over another grow with position?")
    sub.add_argument("model", help="run folder or checkpoint")
    sub.add_argument("baseline", help="run folder or checkpoint (its validation windows are used)")
    sub.add_argument(
        "--seq-len", type=positive_int, default=None, help="window length (default: the baseline's)"
    )
    sub.add_argument(
        "--resamples",
        type=positive_int,
        default=2000,
        help="bootstrap resamples of the windows (default: 2000)",
    )
    return parser


def inspection(args: argparse.Namespace) -> str:
    """The report of the ``growth``, ``reference`` or ``diagnose`` command."""
    if args.study == "growth":
        return advantage_growth(args.model, args.baseline, args.seq_len, args.resamples)
    if args.study == "reference":
        return reference_check(args.ttt_py, args.steps, Path(args.out))
    return diagnose(args.checkpoint, args.windows, args.seq_len)


INSPECTION_OPTIONS = {"seq_len": "--seq-len", "seq_lens": "--seq-len", "resamples": "--resamples"}
"""The options of ``growth`` and ``diagnose`` that give a parameter of innerloop's ``evaluate`` / ``compare``:
their errors name the option (:func:`~innerloop.config.load.command_line_options`)."""


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.study in ("growth", "reference", "diagnose"):
        try:
            with command_line_options(INSPECTION_OPTIONS):  # errors name the options typed
                print(inspection(args))
        except DiagnoseArgumentError as error:  # names its argument
            parser.error(str(error))
        except (CheckpointError, ConfigError, DataError, OSError) as error:
            # a missing or unreadable checkpoint, run folder or ttt.py, or too little validation text for
            # --seq-len: one line, not a traceback
            parser.error(f"{args.study}: {' '.join(str(error).split())}")
    elif args.list:
        print("\n".join(p.name for p in study_points(args.study)))
    else:
        run_study(args)


if __name__ == "__main__":
    main()
