"""What the benchmark scripts' command lines accept: argparse ``type=`` functions and cross-argument checks.

A bad value is argparse's own one-line error (exit status 2) naming the argument, the value and what
is valid, e.g. ``error: argument --repeats: must be an integer >= 1, got '0'``, instead of a traceback
or a table of nothing. The scripts import this module from beside themselves (``benchmarks/`` is put on
``sys.path`` by each of them, so that they also work when a test loads them by path).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from innerloop.config.trainer_args import PLAIN_FLOAT_WORDS, PLAIN_INT_WORDS, plain_number
from innerloop.core.layer import MAX_MINI_BATCH_SIZE
from innerloop.core.wording import counted
from innerloop.data.atomic import atomic_write_text
from innerloop.models.config import SEED_BOUNDS, STEP_BOUNDS

SEED_MAX = int(SEED_BOUNDS.high)  # the config's seed= range, one definition: Lightning seeds numpy (32 bits)
STEPS_MAX = int(STEP_BOUNDS.high)  # the config's trainer.max_steps range


def int_range(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type=``: an integer ``>= low`` (and ``<= high`` when given), its text by the
    override's one rule (:func:`~innerloop.config.trainer_args.plain_number`, as innerloop's own CLI):
    ``int()`` also took ``'５'``, ``'٣'`` and ``'007'``."""
    valid = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"

    def parse(text: str) -> int:
        value = plain_number(int, text)
        if value is None:
            raise argparse.ArgumentTypeError(f"must be {valid}, got {text!r}: give {PLAIN_INT_WORDS}")
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {valid}, got {text!r}")
        return int(value)

    parse.__name__ = f"int_range({low}, {high})"
    return parse


positive_int = int_range(1)
"""Sizes, counts, lengths, threads, repeats: at least 1."""

non_negative_int = int_range(0)
"""Counts where 0 is documented to mean "none" or "skip"."""

seed_int = int_range(0, SEED_MAX)
"""A training seed (``seed=`` of innerloop's config, whose range it takes)."""

steps_int = int_range(1, STEPS_MAX)
"""Training steps (``trainer.max_steps`` of innerloop's config, whose range it takes)."""


def positive_float(text: str) -> float:
    """An argparse ``type=``: a finite number > 0 (``nan`` and ``inf`` are refused), its text by the
    override's one rule (:func:`~innerloop.config.trainer_args.plain_number`)."""
    value = plain_number(float, text)
    if value is None:
        raise argparse.ArgumentTypeError(
            f"must be a finite number > 0, got {text!r}: give {PLAIN_FLOAT_WORDS}"
        )
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def check_distinct(parser: argparse.ArgumentParser, flag: str, values: Sequence[object]) -> None:
    """``parser.error`` when a list option repeats a value (each value is a row or column of the table)."""
    repeated = sorted({v for v in values if list(values).count(v) > 1})
    if repeated:
        parser.error(f"{flag} must be distinct values, got {list(values)} ({repeated} repeated)")


def check_heads(
    parser: argparse.ArgumentParser,
    hidden: int,
    heads: int,
    hidden_flag: str = "--hidden",
    heads_flag: str = "--heads",
) -> None:
    """``parser.error`` unless ``heads`` divides ``hidden`` into an even head size (RoPE rotates pairs of
    channels, and the layers split the width into equal heads)."""
    if hidden % heads:
        problem = f"{hidden} / {heads} is not a whole number"
    elif (hidden // heads) % 2:
        problem = f"the head size {hidden} / {heads} = {hidden // heads} is odd"
    else:
        return
    parser.error(
        f"{hidden_flag} {hidden} must be a multiple of {heads_flag} {heads} with an even head size ({problem})"
    )


def check_compile_backend(
    parser: argparse.ArgumentParser, flag: str, backend: str, otherwise: str = ""
) -> None:
    """``parser.error`` unless ``backend`` names a ``torch.compile`` backend, checked before anything is
    built or timed (dynamo would otherwise raise ``InvalidBackend`` from inside the first compiled call, a
    traceback after the work before it); ``otherwise`` ends the message (another way out, e.g. a flag
    that compiles nothing)."""
    import torch._dynamo  # dynamo takes 1-3 s to load: only a script that compiles pays for it, here

    try:
        torch._dynamo.lookup_backend(backend)
    except torch._dynamo.exc.InvalidBackend:
        valid = ", ".join(torch._dynamo.list_backends(exclude_tags=()))
        parser.error(f"{flag} {backend!r} is not a torch.compile backend; valid: {valid}{otherwise}")


def add_layer_arguments(
    parser: argparse.ArgumentParser, *, mini_batch: bool = True, batch: bool = True
) -> None:
    """The options of one layer's shape and its run that the layer benchmarks share: ``--hidden``,
    ``--heads``, ``--mini-batch`` (unless ``mini_batch`` is False: a benchmark with no TTT mini-batch),
    ``--batch`` (unless ``batch`` is False: a benchmark that runs B=1 only) and ``--threads`` (check them
    with :func:`check_heads`)."""
    parser.add_argument("--hidden", type=positive_int, default=768, help="model width D (default: 768)")
    parser.add_argument("--heads", type=positive_int, default=12, help="heads H (default: 12)")
    if mini_batch:
        parser.add_argument(
            "--mini-batch",
            type=int_range(1, MAX_MINI_BATCH_SIZE),
            default=16,
            help="TTT mini-batch size K (default: 16)",
        )
    if batch:
        parser.add_argument("--batch", type=positive_int, default=1, help="sequences per call B (default: 1)")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch threads (default: 2)")


def apply_quick(args: argparse.Namespace, quick: dict[str, Any]) -> None:
    """``--quick``: the CI-sized values of ``quick`` replace the options they name."""
    if args.quick:
        for name, value in quick.items():
            setattr(args, name, value)


def json_path(text: str) -> Path:
    """An argparse ``type=`` for ``--json``: a file's path (not a folder; a missing folder is made when
    the numbers are written), checked before the benchmark runs rather than after."""
    path = Path(text).expanduser()
    if not text or path.is_dir():
        raise argparse.ArgumentTypeError(f"must be the path of a file to write, got {text!r} (a folder)")
    _refuse_a_file_above(path, text, "must be the path of a file to write")
    return path


def output_folder(text: str) -> Path:
    """An argparse ``type=`` for ``--out``: a folder's path (made when missing), not a file's, and not
    under a file (its runs and tables could not be written there: refused before the benchmark runs)."""
    path = Path(text).expanduser()
    if not text or (path.exists() and not path.is_dir()):
        raise argparse.ArgumentTypeError(f"must be the path of a folder to write into, got {text!r} (a file)")
    _refuse_a_file_above(path, text, "must be the path of a folder to write into")
    return path


def _refuse_a_file_above(path: Path, text: str, valid: str) -> None:
    """``ArgumentTypeError`` if a folder above ``path`` is an existing file (nothing can be made under it)."""
    blocker = next((parent for parent in path.parents if parent.exists() and not parent.is_dir()), None)
    if blocker is not None:
        raise argparse.ArgumentTypeError(f"{valid}, got {text!r} ({str(blocker)!r} is a file, not a folder)")


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically (``innerloop.data.atomic``: the file is whole or
    absent, synced, with the usual permissions; its folder made if missing)."""
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def refuse_set_keys(parser: argparse.ArgumentParser, overrides: Sequence[str], keys: dict[str, str]) -> None:
    """``parser.error`` for an override of a config key the script sets itself (``keys``: the key, or a
    prefix ending in ``.``, -> what to use instead): it would either be dropped or change the runs
    while the table's header still names the script's value."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        for name, instead in keys.items():
            if key == name or (name.endswith(".") and key.startswith(name)):
                parser.error(f"override {item!r}: {key} is set by this benchmark; {instead}")


RUN_MARK = "innerloop-benchmark-run"
"""The file a benchmark writes into each run folder it trained: a later run of the benchmark may replace
that run (it trains with ``overwrite=True``), and only such a run."""


def check_replaceable_runs(run_dirs: Sequence[Path]) -> None:
    """Stop (exit status 2, one line) if a folder the benchmark is about to train into with
    ``overwrite=True`` holds a run it did not write (no :data:`RUN_MARK`): it would be replaced."""
    for folder in run_dirs:
        if folder.exists() and not (folder / RUN_MARK).is_file():
            print(
                f"error: {folder} holds files this benchmark did not write (no {RUN_MARK} file), and it "
                "trains into that folder, replacing a run there: give another --out, or move them",
                file=sys.stderr,
            )
            raise SystemExit(2)


def mark_benchmark_run(run_dir: Path) -> None:
    """Write :data:`RUN_MARK` into ``run_dir``, a run the benchmark has just trained."""
    atomic_write_text(
        run_dir / RUN_MARK, "trained by an innerloop benchmark, whose next run may replace it\n"
    )


def check_run_configs(parser: argparse.ArgumentParser, runs: Sequence[tuple[str, Sequence[str]]]) -> None:
    """Load the config of every run a script will train, ``(preset, overrides)``, before any trains: an
    override that one of them refuses (an unknown key, a wrong type, a value that preset's model cannot
    take) is one line (``parser.error``, exit 2) naming the preset, not a traceback after the runs
    before it have trained."""
    from innerloop.config import load_config
    from innerloop.config.load import ConfigError

    for preset, overrides in runs:
        try:
            load_config(preset, list(overrides))
        except ConfigError as err:
            parser.error(f"{preset}: {' '.join(str(err).split())}")


def cpu_description() -> str:
    """The CPU's model name and its bf16 matrix units (what the bf16 rows depend on), from Linux's
    /proc/cpuinfo where there is one."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)
    flags = next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())
    units = [
        name for flag, name in (("avx512_bf16", "AVX-512 BF16"), ("amx_bf16", "AMX BF16")) if flag in flags
    ]
    return f"{model or platform.machine()} ({', '.join(units) or 'no bf16 matrix instructions'})"


def machine_line(threads: int) -> str:
    """The first words of a benchmark's header: the CPU (:func:`cpu_description`), how many cpus the machine
    has, the torch threads the run used and torch's version (``"machine: ..., 2 cpus, threads=2; torch ..."``)."""
    count = os.cpu_count()
    cpus = counted(count, "cpu") if count else "an unknown number of cpus"
    return f"machine: {cpu_description()}, {cpus}, threads={threads}; torch {torch.__version__}"
