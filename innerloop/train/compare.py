"""``innerloop compare``: several checkpoints on exactly the same windows, side by side.

:func:`compare` evaluates every model on the same windows (by default the baseline run's validation
windows, see :func:`innerloop.train.run.evaluation_windows`), at one or more lengths, and reports

- the loss by position of each model, and each model's difference to the baseline with a confidence
  band: a paired bootstrap over windows (:func:`~innerloop.train.bootstrap.bootstrap_difference`,
  seeded, widened for few windows; none below :data:`~innerloop.train.bootstrap.MIN_BAND_WINDOWS`),
  since every model read the same windows;
- a table: parameters, tokens trained, training tokens/s (from the checkpoint's
  :class:`~innerloop.train.throughput.TrainingThroughput` counters), and at each length the perplexity
  and the difference to the baseline over whole windows with its band.

:func:`write_comparison` writes ``compare-<id>.csv`` (curves, differences and bands), ``.png`` (the
curves overlaid and, below, the differences with their bands) and ``.md`` (the table, and what a rerun
needs: :func:`reproduction_lines`), atomically;
``<id>`` is a hash of what was compared, so other comparisons in the same folder are never replaced.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import numbers
import os
import platform
import shlex
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from innerloop.checkpoints import (
    CHECKPOINT_SUFFIX,
    checkpoint_content_digest,
    checkpoint_identity,
    checkpoint_tokenizer,
    innerloop_version,
    recorded_entry,
)
from innerloop.config.load import (
    ConfigError,
    argument_name,
    arguments_of_the_caller,
    decay_steps,
    given_argument,
    other_model_folder_problem,
    unconfirmed_run_problem,
    warmup_steps,
)
from innerloop.config.schema import DataConfig, RunConfig
from innerloop.core.functional import as_integer, check_flag, user_path
from innerloop.core.wording import counted
from innerloop.data.atomic import atomic_write, atomic_write_text, remove_stale_temporaries_of
from innerloop.data.packing import document_side, first_document_of
from innerloop.data.text import held_out_share, path_entries
from innerloop.data.tokenizer import Tokenizer
from innerloop.kernels.cpu.build import DISABLE_VARIABLE
from innerloop.models.ablation import (
    modules_learning_at_test_time,
    no_test_time_training,
    zero_lr_refusal,
)
from innerloop.models.config import WINDOW_SIZE_BOUNDS
from innerloop.models.params import SIZE_TOLERANCE, count_parameters, same_size
from innerloop.registry import get_registry
from innerloop.registry.modules import plugin_module_options
from innerloop.train.bootstrap import (
    DEFAULT_RESAMPLES,
    MIN_BAND_WINDOWS,
    bootstrap_difference,
    checked_resamples,
    checked_seed,
    few_resamples_note,
)
from innerloop.train.data import IGNORE_INDEX, DataError, checked_window_sizes, resolve_files
from innerloop.train.metrics import position_buckets
from innerloop.train.module import LanguageModelModule, load_module
from innerloop.train.plots import new_figure, save_png
from innerloop.train.run import (
    EvaluationWindows,
    RunFiles,
    check_held_out_name,
    check_split_has_data,
    check_vocabulary,
    checkpoint_path,
    evaluation_windows,
    recorded_data_state,
    run_files,
    run_of_checkpoint,
    run_of_checkpoint_and_why,
    schedule_arguments,
    training_seq_len,
    windows_reproduce_line,
)

log = logging.getLogger(__name__)

DEFAULT_BUCKETS = 16
"""Position buckets of the loss-by-position curves."""


@dataclass
class ComparedModel:
    """One model of a comparison and what is known of its training."""

    name: str
    checkpoint: Path
    module: LanguageModelModule = field(repr=False)
    parameters: int
    tokens_trained: int | None
    tokens_per_s: float | None
    no_ttt: bool = False
    data_state: dict[str, Any] = field(default_factory=dict, repr=False)
    """What the checkpoint's :class:`~innerloop.train.data.TextDataModule` recorded (its held-out
    ``validation_files``, ``training_digest``)."""
    steps: int | None = None
    """The optimizer steps it trained for (its checkpoint's ``global_step``; None where it records none)."""


@dataclass
class LengthResult:
    """Every model at one window length: per-window loss sums and token counts per bucket."""

    seq_len: int
    buckets: list[tuple[int, int]]
    loss_sums: torch.Tensor  # [M, W, K] float64: each model's summed token loss per window and bucket
    counts: torch.Tensor  # [W, K] float64: scored tokens per window and bucket (the same for every model)
    windows: int

    def perplexity(self, model: int) -> float:
        """``exp`` of the model's mean loss per scored token (inf past float64's range, about 709.8 nats)."""
        mean_loss = float(self.loss_sums[model].sum() / self.counts.sum())
        return (
            math.inf if mean_loss >= math.log(torch.finfo(torch.float64).max) else math.exp(mean_loss)
        )  # NaN stays

    def curve(self, model: int) -> torch.Tensor:
        """Mean loss per bucket ``[K]`` (NaN for a bucket without scored tokens)."""
        return self.loss_sums[model].sum(0) / self.counts.sum(0)


@dataclass
class Comparison:
    """The result of :func:`compare`; ``bands[seq_len][m]`` is model ``m``'s (mean, low, high) difference
    to the baseline per bucket, ``overall[seq_len][m]`` the same over whole windows (per scored token;
    low and high NaN below :data:`~innerloop.train.bootstrap.MIN_BAND_WINDOWS` windows)."""

    models: list[ComparedModel]
    baseline: int
    lengths: list[LengthResult]
    bands: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]
    confidence: float
    resamples: int
    seed: int
    windows_source: str
    overall: dict[int, list[tuple[float, float, float]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # on the models' training data and sizes (logged too)
    held_out: str = "val"  # the baseline run's windows compared on: "test" for its test windows
    reproduce: list[str] = field(default_factory=list)
    """What a rerun needs (:func:`reproduction_lines`: versions, the bootstrap's settings, the checkpoints'
    contents, the windows' tokens, the command); :func:`compare` fills it, the table file ends with it."""


def resolve_checkpoint(run_or_checkpoint: str | Path) -> Path:
    """A run folder's ``last.safetensors``, or the checkpoint file given; a clear error otherwise (a Hugging
    Face export or an orbax TTT-E2E checkpoint named as such, with what to give instead, as ``eval`` does)."""
    path = user_path(run_or_checkpoint)
    if path.is_dir():
        folder, path = path, checkpoint_path(path)
        if not path.is_file():
            other_model = other_model_folder_problem(folder)  # a Hugging Face export, a TTT-E2E orbax one
            if other_model is not None:
                raise ConfigError(other_model)
            unconfirmed = unconfirmed_run_problem(folder, repr(str(run_or_checkpoint)))
            if unconfirmed is not None:  # a run killed before its first checkpoint was confirmed
                raise ConfigError(unconfirmed)
            raise ConfigError(f"{str(run_or_checkpoint)!r} is a folder without a checkpoint ({path.name})")
    elif not path.is_file():
        raise ConfigError(
            f"{str(run_or_checkpoint)!r} is neither a run folder nor a checkpoint file (*{CHECKPOINT_SUFFIX})"
        )
    return path


def load_compared_model(path: Path, name: str, no_ttt: bool) -> ComparedModel:
    """The model in ``path`` and its training counters (None where the checkpoint has none)."""
    module = load_module(path)  # reads and verifies the whole checkpoint; the rest is in its metadata
    callbacks = recorded_entry(path, "callbacks")
    counters = (
        next((s for k, s in callbacks.items() if k.startswith("TrainingThroughput")), None)
        if isinstance(callbacks, dict)
        else None
    )
    tokens, per_s = None, None
    if isinstance(counters, dict) and "tokens_seen" in counters:
        tokens = int(counters["tokens_seen"])
        seconds = float(counters.get("train_seconds", 0.0))
        per_s = tokens / seconds if seconds > 0 else None
    total = count_parameters(module.model).total
    step = recorded_entry(path, "global_step")
    steps = step if isinstance(step, int) and not isinstance(step, bool) else None
    return ComparedModel(name, path, module, total, tokens, per_s, no_ttt, recorded_data_state(path), steps)


def model_names(paths: Sequence[Path]) -> list[str]:
    """A short distinct name per checkpoint: its run folder's name (with the file's stem when that is
    not ``last``); where two are the same, with the folder above it too (``exp1/ttt``, ``exp2/ttt``),
    and numbered when they are still the same."""
    folders = [p.absolute().parent.name for p in paths]  # a relative path's parent may be ''
    names = [f if p.stem == "last" else f"{f}/{p.stem}" for p, f in zip(paths, folders, strict=True)]
    names = [
        f"{p.absolute().parent.parent.name}/{n}" if names.count(n) > 1 else n
        for p, n in zip(paths, names, strict=True)
    ]
    return [f"{n} ({names[:i].count(n) + 1})" if names.count(n) > 1 else n for i, n in enumerate(names)]


@torch.no_grad()
def token_losses(
    module: LanguageModelModule, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """Next-token loss of every target, ``[W, T]`` float64 (0 where the target is ignored). Logits with NaN
    or ``+inf`` (or ``-inf`` for every token) at a position are refused, naming the windows: their loss
    (NaN, or a finite number past a +inf logit) would be a perplexity in the table without a word."""
    pieces = []
    for start in range(0, inputs.shape[0], batch_size):
        logits = module(inputs[start : start + batch_size]).double()  # [b, T, V]
        finite = torch.isfinite(logits.amax(dim=-1)).all(dim=-1)  # [b]: max propagates NaN
        if not bool(finite.all()):
            windows = (start + (~finite).nonzero().flatten()).tolist()
            raise ValueError(
                f"the model produced non-finite logits (NaN or +inf, or -inf for every token) in windows "
                f"{windows} of {inputs.shape[0]} at length {inputs.shape[1]}: its weights or activations "
                "overflowed or hold NaN, and no loss or perplexity can be told"
            )
        pieces.append(
            F.cross_entropy(
                logits.transpose(1, 2), targets[start : start + batch_size], ignore_index=IGNORE_INDEX,
                reduction="none",
            )
        )  # fmt: skip
    return torch.cat(pieces)


def bucket_sums(values: torch.Tensor, buckets: Sequence[tuple[int, int]]) -> torch.Tensor:
    """``values [W, T]`` summed within each position bucket: ``[W, K]``."""
    return torch.stack([values[:, start:end].sum(1) for start, end in buckets], dim=1)


def _baseline_index(
    baseline: str | None,
    names: list[str],
    given: Sequence[str | Path],
    paths: list[Path],
    no_ttt: bool = False,
) -> int:
    """Which model is the baseline: ``baseline`` matches its name (with ``no_ttt`` also as the table
    shows it, ``<name> (no TTT)``), its argument or its checkpoint path (the first model when None)."""
    if baseline is None:
        return 0
    for i, (name, arg, path) in enumerate(zip(names, given, paths, strict=True)):
        shown = (name, f"{name} (no TTT)") if no_ttt else (name,)
        if baseline in (*shown, str(arg), str(path)) or user_path(baseline).resolve() in (
            user_path(arg).resolve(),
            path.resolve(),
        ):
            return i
    given = given_argument("baseline", baseline)
    raise ConfigError(f"{given} is none of the models compared; their names: {names}")


def _evaluate_length(
    models: list[ComparedModel],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    batch_size: int,
    num_buckets: int,
    tokenizer: Tokenizer,
) -> LengthResult:
    """Every model on the same windows ``inputs, targets [W, T]``."""
    buckets = position_buckets(inputs.shape[1], num_buckets)
    counts = bucket_sums((targets != IGNORE_INDEX).double(), buckets)  # [W, K]
    sums = []
    for model in models:
        check_vocabulary(model.module, inputs, targets, tokenizer, model=f"the compared model {model.name}")
        with no_test_time_training(model.module.model) if model.no_ttt else nullcontext():
            try:
                sums.append(bucket_sums(token_losses(model.module, inputs, targets, batch_size), buckets))
            except ValueError as error:
                raise ValueError(f"the compared model {model.name}: {error}") from None
    return LengthResult(inputs.shape[1], buckets, torch.stack(sums), counts, inputs.shape[0])


def compare(
    runs_or_checkpoints: Sequence[str | Path],
    seq_lens: Sequence[int] | None = None,
    baseline: str | None = None,
    paths: Sequence[str] = (),
    batch_size: int | None = None,
    batches: int | None = None,
    no_ttt: bool = False,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = 0.95,
    seed: int = 0,
    split: str | None = None,
    held_out: str = "val",
    progress: LengthProgress | None = None,
) -> Comparison:
    """Evaluate every model on the same windows at each length of ``seq_lens`` (default: the baseline's
    training length); see the module docstring. The windows are the baseline's
    :func:`~innerloop.train.run.evaluation_windows` (``paths``, ``split``, ``batch_size``, ``batches``, and
    ``held_out``: ``"test"`` for its test windows, as in ``innerloop eval``). ``no_ttt`` switches test-time
    training off in every model that has it. Every model's training data is checked against the windows
    first (:func:`training_data_notes`: warnings; a model that trained on the baseline's held-out text is
    refused). Every length's windows are read before any model is scored (a length the text is too short
    for fails at once). ``progress`` (:class:`LengthProgress`) keeps each finished length's results on
    disk before the next begins, and reuses the scores an interrupted earlier run of it kept."""
    if not isinstance(runs_or_checkpoints, (str, os.PathLike)):  # one path is refused below, by name
        runs_or_checkpoints = _path_list(runs_or_checkpoints, "runs_or_checkpoints")
    seq_lens, resamples, confidence, seed = _check_compare_arguments(
        runs_or_checkpoints, seq_lens, baseline, resamples, confidence, seed, no_ttt, held_out
    )
    try:
        batch_size, batches = checked_window_sizes(batch_size=batch_size, batches=batches)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    paths = _path_list(paths)
    check_split_has_data(split, paths)  # before the checkpoints are read (and noted on)
    checkpoints = [resolve_checkpoint(p) for p in runs_or_checkpoints]
    names = model_names(checkpoints)
    base = _baseline_index(baseline, names, runs_or_checkpoints, checkpoints, no_ttt)
    models = [load_compared_model(path, name, no_ttt) for path, name in zip(checkpoints, names, strict=True)]
    if no_ttt:
        _mark_no_ttt(models)
    reference = models[base]
    tokenizer = _common_tokenizer(checkpoints, names)
    seq_lens = list(dict.fromkeys(seq_lens or [training_seq_len(reference.module, reference.checkpoint)]))
    notes = _logged_notes(models, base, paths, held_out, seq_lens) + _rough_bands_notes(
        len(models), resamples, confidence
    )
    comparison = Comparison(
        models, base, [], {}, confidence, resamples, seed, "", notes=notes, held_out=held_out
    )
    # every length's windows read first: a length the text is too short for fails before any model is scored
    window_sizes = (batch_size, batches, tokenizer, split, held_out)
    with arguments_of_the_caller({"seq_len": "seq_lens"}), _each_warning_once():  # the data's said once
        every_windows = [
            evaluation_windows(reference.checkpoint, reference.module, paths, n, *window_sizes)
            for n in seq_lens
        ]
    comparison.reproduce = reproduction_lines(comparison, every_windows, paths, split, batches)
    _score_lengths(comparison, every_windows, tokenizer, progress)
    return comparison


class _SaidOnce(logging.Filter):
    """Lets through each warning (by logger and text) the first time only."""

    def __init__(self) -> None:
        super().__init__()
        self.said: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, record.getMessage())
        if key in self.said:
            return False
        self.said.add(key)
        return True


@contextmanager
def _each_warning_once() -> Iterator[None]:
    """Within it, a warning that one of innerloop's loggers logs again with the same text is not logged
    again: :func:`compare` reads each length's windows from the same data, whose warnings (the split by
    file hash holding out its last file, a file read as bytes) do not depend on the length."""
    said = _SaidOnce()
    known = logging.root.manager.loggerDict.items()  # a placeholder (a parent of loggers) logs nothing
    loggers = [
        ours for name, ours in known if name.startswith("innerloop.") and isinstance(ours, logging.Logger)
    ]
    for logger in loggers:
        logger.addFilter(said)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(said)


def reproduction_lines(
    comparison: Comparison,
    every_windows: Sequence[EvaluationWindows],
    paths: Sequence[str],
    split: str | None,
    batches: int | None,
) -> list[str]:
    """The lines that let a comparison be run again and checked: the innerloop, torch and Python versions
    and the bootstrap's seed, resamples and confidence; each checkpoint's path and content digest
    (:func:`~innerloop.checkpoints.checkpoint_content_digest`); each length's windows (their count and a
    SHA-256 of their tokens); and the ``innerloop compare`` command giving the same windows and bands (the
    baseline by its checkpoint's path, the windows' batch size as resolved, ``batches`` and the data as
    given, in the current folder)."""
    lines = [
        f"innerloop {innerloop_version()}, torch {torch.__version__}, Python {platform.python_version()}; "
        f"bootstrap seed {comparison.seed}, {counted(comparison.resamples, 'resample')}, "
        f"{comparison.confidence:.6g} confidence, {counted(torch.get_num_threads(), 'torch thread')}"
    ]
    lines += [
        f"{model.name}: {os.path.abspath(model.checkpoint)} (content SHA-256 "
        f"{checkpoint_content_digest(model.checkpoint)[:16]})"
        for model in comparison.models
    ]
    lines += [windows_reproduce_line(windows) for windows in every_windows]
    lines.append(
        f"command (in {os.getcwd()}): `{_compare_command(comparison, every_windows, paths, split, batches)}`"
    )
    return lines


def _compare_command(
    comparison: Comparison,
    every_windows: Sequence[EvaluationWindows],
    paths: Sequence[str],
    split: str | None,
    batches: int | None,
) -> str:
    """The ``innerloop compare`` command line of :func:`reproduction_lines`."""
    models = [os.path.abspath(model.checkpoint) for model in comparison.models]
    words = [
        "innerloop",
        *plugin_module_options(),
        "compare",
        *models,
        "--seq-len",
        *(str(w.inputs.shape[1]) for w in every_windows),
    ]
    words += ["--baseline", models[comparison.baseline], "--batch-size", str(every_windows[0].batch_size)]
    words += [] if batches is None else ["--batches", str(batches)]
    words += ["--data", *map(str, paths)] if paths else []
    words += [] if split is None else ["--split", split]
    words += ["--held-out", comparison.held_out] if comparison.held_out != "val" else []
    words += ["--no-ttt"] if any(model.no_ttt for model in comparison.models) else []
    words += ["--resamples", str(comparison.resamples), "--seed", str(comparison.seed)]
    return " ".join(shlex.quote(word) for word in words)


def _score_lengths(
    comparison: Comparison,
    every_windows: Sequence[EvaluationWindows],
    tokenizer: Tokenizer,
    progress: LengthProgress | None,
) -> None:
    """Every model of ``comparison`` on each length's windows in turn, each length's results added (and
    kept by ``progress``) before the next begins; scores ``progress`` kept from an earlier run reused."""
    reference = comparison.models[comparison.baseline]
    models = comparison.models
    num_buckets = reference.module.hparams.get("num_position_buckets", DEFAULT_BUCKETS)
    for done, windows in enumerate(every_windows, start=1):
        key = length_key(models, windows.inputs, windows.targets, windows.batch_size, num_buckets)
        result = None if progress is None else progress.reused(key, len(models), windows.inputs, num_buckets)
        if result is None:
            result = _evaluate_length(
                models, windows.inputs, windows.targets, windows.batch_size, num_buckets, tokenizer
            )
        _add_length(comparison, result)
        comparison.windows_source = f"{windows.source} ({windows.tag}) of {reference.name}"
        if progress is not None:
            progress.finished(comparison, key, remaining=len(every_windows) - done)


def length_key(
    models: Sequence[ComparedModel],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    batch_size: int,
    num_buckets: int,
) -> str:
    """16 hex digits naming what one length's scores depend on: each model's checkpoint content (in
    order), ``--no-ttt`` and device, the windows' tokens, the batch size and the position buckets, torch's
    thread count (which changes the bits of a score: measured in ``tests/test_review_s51_s51a.py``), and
    the innerloop and torch versions (an installed upgrade scores again; innerloop's code edited in place
    is not seen), and the code that can run besides innerloop's (:func:`plugin_code_fingerprint`: the
    plugins loaded, a plugin module's file contents, ``INNERLOOP_DISABLE_CPU_KERNELS``)."""
    digest = hashlib.sha256(f"{innerloop_version()}:{torch.__version__}\0".encode())
    digest.update(f"{plugin_code_fingerprint()}\0".encode())
    for model in models:
        device = next(model.module.parameters(), torch.empty(0)).device
        digest.update(f"{checkpoint_content_digest(model.checkpoint)}:{model.no_ttt}:{device}\0".encode())
    for tokens in (inputs, targets):
        digest.update(f"{tuple(tokens.shape)}:{tokens.dtype}\0".encode())
        digest.update(tokens.detach().cpu().contiguous().numpy().tobytes())
    # torch's thread count splits a sum otherwise: 3 threads gave other bits than 1, 2 and 4 (s51a)
    digest.update(f"{batch_size}:{num_buckets}:{torch.get_num_threads()}".encode())
    return digest.hexdigest()[:16]


def plugin_code_fingerprint() -> str:
    """What decides a model's numbers besides its checkpoint and innerloop's own code: every object in
    the process registry (kind, name, how it was loaded, its distribution's version), the SHA-256 of
    the source file of each module outside innerloop that one of them comes from (a ``-p my_loss``
    edited between two runs: scored again), and ``INNERLOOP_DISABLE_CPU_KERNELS`` (which kernel runs)."""
    registry = get_registry()
    parts = [f"{DISABLE_VARIABLE}={os.environ.get(DISABLE_VARIABLE, '').strip().lower()}"]
    modules: set[str] = set()
    for entry in registry.entries():
        parts.append(
            f"{entry.kind}:{entry.name}:{registry.loaded_by(entry.origin)}:{registry.distribution(entry.origin)}"
        )
        modules |= _modules_of(entry.obj)
    modules |= {origin.removeprefix("-p ") for origin in registry.plugin_modules}
    for name in sorted(modules):
        source = getattr(sys.modules.get(name), "__file__", None)
        if name.split(".")[0] != "innerloop" and source and Path(source).is_file():
            parts.append(f"{name}:{hashlib.sha256(Path(source).read_bytes()).hexdigest()}")
    return "\n".join(parts)


def _modules_of(obj: Any) -> set[str]:
    """The modules ``obj``'s code comes from: its class's, and those of the functions it holds (a
    :class:`~innerloop.kernels.spec.KernelSpec`'s ``forward``)."""
    held = vars(obj).values() if hasattr(obj, "__dict__") else ()
    functions = [value for value in held if callable(value)]
    return {getattr(o, "__module__", None) or "" for o in (type(obj), *functions)} - {""}


def _logged_notes(
    models: list[ComparedModel], base: int, paths: Sequence[str], held_out: str, seq_lens: Sequence[int]
) -> list[str]:
    """:func:`compare`'s notes on the models (their training data, sizes, lengths, a checkpoint compared
    twice), each logged as a warning."""
    notes = [
        *training_data_notes(models, base, paths, held_out),
        *size_notes(models, base),
        *optimizer_notes(models, base),
        *initialisation_notes(models, base),
        *_length_notes(models, seq_lens),
        *_same_checkpoint_notes(models),
    ]
    for note in notes:
        log.warning("%s", note)
    return notes


def _rough_bands_notes(models: int, resamples: int, confidence: float) -> list[str]:
    """The note (logged as a warning) that ``resamples`` leave too few draws beyond a band's ends for them
    to stay put (:func:`~innerloop.train.bootstrap.few_resamples_note`); none for one model (no band)."""
    rough_bands = few_resamples_note(resamples, confidence) if models > 1 else None
    if rough_bands is None:
        return []
    log.warning("%s", rough_bands)
    return [rough_bands]


def _path_list(paths: Any, name: str = "paths") -> list[str]:
    """``paths`` as a list (one path is a list of one, not its letters; None, as no paths: the baseline's
    windows); a :class:`ConfigError` naming ``name`` if it is not a path or an ordered collection of
    them, or has an empty one (:func:`~innerloop.data.text.path_entries`)."""
    if paths is None:
        return []
    try:
        return path_entries(paths, name)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _check_compare_arguments(
    runs: Any,
    seq_lens: Any,
    baseline: Any,
    resamples: Any,
    confidence: Any,
    seed: Any,
    no_ttt: Any = False,
    held_out: Any = "val",
) -> tuple[list[int] | None, int, float, int]:
    """:func:`compare`'s arguments, checked before any model is loaded; returns ``seq_lens``,
    ``resamples``, ``confidence`` and ``seed`` as Python numbers (a numpy or 0-d torch integer is an
    integer, a numpy float a number, as in ``evaluate``)."""
    try:
        check_flag("no_ttt", no_ttt)  # a string such as 'false' would switch test-time training off
    except TypeError as err:
        raise ConfigError(str(err)) from None
    check_held_out_name(held_out)
    if isinstance(runs, (str, Path)) or not isinstance(runs, Sequence) or not runs:
        raise ConfigError(f"compare needs a list of one or more run folders or checkpoints, got {runs!r}")
    lengths = None if seq_lens is None else _seq_len_list(seq_lens)
    if baseline is not None and not isinstance(baseline, (str, Path)):
        raise ConfigError(f"{argument_name('baseline')} must be a model's name or path, got {baseline!r}")
    if isinstance(confidence, bool) or not isinstance(confidence, numbers.Real) or not 0 < confidence < 1:
        raise ConfigError(f"confidence must be a number in (0, 1), got {confidence!r}")
    resample_count, seed_int = as_integer(resamples), as_integer(seed)
    if resample_count is None or resample_count < 1:
        raise ConfigError(f"{argument_name('resamples')} must be an integer >= 1, got {resamples!r}")
    if seed_int is None:
        raise ConfigError(f"{argument_name('seed')} must be an integer, got {seed!r}")
    try:  # the bootstrap's own bounds, here before any model is evaluated (a seed of 2**64 failed after)
        return lengths, checked_resamples(resample_count), float(confidence), checked_seed(seed_int)
    except ValueError as err:  # "resamples=0 must be ...": named as the caller gave it
        parameter, said = str(err).split("=", 1)
        raise ConfigError(f"{argument_name(parameter)}={said}") from None


def _seq_len_list(seq_lens: Any) -> list[int]:
    """``seq_lens`` (a sequence of one or more integers >= 1, or a 1-D numpy array or tensor of them) as a
    list of Python ints."""
    if getattr(seq_lens, "ndim", None) == 1 and hasattr(seq_lens, "tolist"):  # np.arange(...), a tensor
        seq_lens = seq_lens.tolist()
    lengths = [] if isinstance(seq_lens, (str, bytes)) or not isinstance(seq_lens, Sequence) else seq_lens
    as_ints = [as_integer(n) for n in lengths]
    if not as_ints or any(n is None or n < 1 for n in as_ints):
        raise ConfigError(f"{argument_name('seq_lens')} must be one or more integers >= 1, got {seq_lens!r}")
    bounds = WINDOW_SIZE_BOUNDS["seq_len"]
    if any(n not in bounds for n in as_ints):
        raise ConfigError(
            f"{argument_name('seq_lens')} must be one or more integers {bounds.describe()} ({bounds.why}), "
            f"got {seq_lens!r}"
        )
    return as_ints


def _add_length(comparison: Comparison, result: LengthResult) -> None:
    """``result`` and its differences to the baseline, per bucket and over whole windows, with their
    bands; a warning when the windows are too few for a band."""
    if result.windows < MIN_BAND_WINDOWS and len(comparison.models) > 1:
        log.warning(
            "T=%d: %s, fewer than the %d a %.0f%% band needs to cover as often as it says: the "
            "differences to the baseline have no band (NaN in the CSV); score more windows (%s, "
            "which scores %s x %s windows, or more text with %s)",
            result.seq_len, counted(result.windows, "window"), MIN_BAND_WINDOWS,
            100 * comparison.confidence, *map(argument_name, ("batches", "batches", "batch_size", "paths")),
        )  # fmt: skip
    elif len(comparison.models) > 1:
        _warn_of_buckets_without_band(comparison, result)
    options = (comparison.resamples, comparison.confidence, comparison.seed)
    # the band whose ends lie furthest out: that of the bucket (or whole windows) scored in the fewest
    # windows, of those with a band (none: no band to be rough)
    scored = [*(result.counts > 0).sum(0).tolist(), int((result.counts.sum(1) > 0).sum())]
    banded = [n for n in scored if n >= MIN_BAND_WINDOWS]
    rough = few_resamples_note(comparison.resamples, comparison.confidence, min(banded)) if banded else None
    if rough is not None and len(comparison.models) > 1 and few_resamples_note(*options[:2]) is None:
        rough = f"T={result.seq_len}: {rough}"
        log.warning("%s", rough)
        comparison.notes.append(rough)
    differences = result.loss_sums - result.loss_sums[comparison.baseline]  # [M, W, K]
    total = result.counts.sum(1, keepdim=True)  # [W, 1]: every scored token of a window
    comparison.lengths.append(result)
    comparison.bands[result.seq_len] = [bootstrap_difference(d, result.counts, *options) for d in differences]
    comparison.overall[result.seq_len] = [
        tuple(float(v[0]) for v in bootstrap_difference(d.sum(1, keepdim=True), total, *options))
        for d in differences
    ]


def _warn_of_buckets_without_band(comparison: Comparison, result: LengthResult) -> None:
    """A warning naming the positions whose buckets are scored in fewer than :data:`MIN_BAND_WINDOWS` of
    ``result``'s windows (padded or partly unscored windows) but in one at least, which have no band
    (NaN) though the length's windows are enough: the per-length warning counts every window read."""
    scored = (result.counts > 0).sum(0).tolist()
    # a bucket scored in no window (the recall task scores only answers) has no difference at all: more
    # windows of the same kind would not give it a band
    short = [(a, b) for (a, b), n in zip(result.buckets, scored, strict=True) if 0 < n < MIN_BAND_WINDOWS]
    if not short:
        return
    ranges: list[list[int]] = []
    for start, end in short:  # adjacent buckets as one range of positions
        if ranges and ranges[-1][1] == start:
            ranges[-1][1] = end
        else:
            ranges.append([start, end])
    fewest = min(n for n in scored if 0 < n < MIN_BAND_WINDOWS)
    log.warning(
        "T=%d: positions %s are scored in as few as %d of the %d windows, fewer than the %d a %.0f%% band "
        "needs to cover as often as it says: their differences to the baseline have no band (NaN in the "
        "CSV); score more windows (%s, which scores %s x %s windows, or more text with %s)",
        result.seq_len, ", ".join(f"{a}-{b - 1}" for a, b in ranges), fewest, result.windows,
        MIN_BAND_WINDOWS, 100 * comparison.confidence,
        *map(argument_name, ("batches", "batches", "batch_size", "paths")),
    )  # fmt: skip


def size_notes(models: Sequence[ComparedModel], base: int) -> list[str]:
    """A line for each model whose parameters differ from the baseline's by more than
    :data:`~innerloop.models.params.SIZE_TOLERANCE` of the smaller of the two
    (:func:`~innerloop.models.params.same_size`: the same verdict whichever is the baseline; the
    percentage it gives is of the smaller count too, :func:`_size_difference`), or
    whose tokens trained or optimizer steps differ from the baseline's (both known,
    :func:`_training_length_notes`): a lower loss may then come from the size or the training, not the
    architecture."""
    baseline, notes = models[base], []
    for index, model in enumerate(models):
        if index == base:
            continue
        if baseline.parameters == 0 or model.parameters == 0:
            if model.parameters != baseline.parameters:
                notes.append(
                    f"{model.name} has {model.parameters:,} parameters, the baseline {baseline.name} "
                    f"{baseline.parameters:,}: its difference is also one of size"
                )
        elif not same_size(model.parameters, baseline.parameters):
            notes.append(f"{_size_difference(model, baseline)}: its difference is also one of size")
        notes += _training_length_notes(model, baseline)
    return notes


def _training_length_notes(model: ComparedModel, baseline: ComparedModel) -> list[str]:
    """A line where ``model`` trained on another number of tokens than ``baseline``, and one where it took
    another number of optimizer steps (the same tokens in half the steps is another training too); each
    where both are known."""
    notes = []
    trained = (model.tokens_trained, baseline.tokens_trained)
    if None not in trained and trained[0] != trained[1]:
        notes.append(
            f"{model.name} trained on {counted(trained[0], 'token', grouped=True)}, the baseline {baseline.name} on {trained[1]:,}: "
            "its difference is also one of training"
        )
    # a record without steps (size_notes is public: a caller's own model records) counts as unknown
    steps = (getattr(model, "steps", None), getattr(baseline, "steps", None))
    if None not in steps and steps[0] != steps[1]:
        notes.append(
            f"{model.name} took {counted(steps[0], 'optimizer step', grouped=True)}, the baseline {baseline.name} {steps[1]:,}: "
            "its difference is also one of training"
        )
    return notes


DATA_KEYS = ("name", "paths", "tokenizer", "val_fraction", "test_fraction", "split", "text_field", "recall")
"""The ``data.*`` keys that decide which text a run trained on and which it held out (``recall``: the
recall task's settings, ``data.recall.*``)."""


def _data_settings(data: DataConfig) -> dict[str, Any]:
    """``data``'s :data:`DATA_KEYS` as plain values (lists; the recall task's settings as a dict)."""
    settings = {}
    for key in DATA_KEYS:
        value = getattr(data, key)
        if is_dataclass(value) and not isinstance(value, type):
            value = asdict(value)
        settings[key] = list(value) if isinstance(value, (list, tuple)) else value
    return settings


@dataclass
class _TrainingData:
    """What is known of a compared model's training data: its run (None: unknown, ``unknown`` says
    why), its files (:func:`~innerloop.train.run.run_files`) and its training text's digest."""

    run: RunConfig | None
    unknown: str = ""
    files: RunFiles | None = None
    digest: str | None = None
    written: float | None = None  # when its checkpoint was written (its mtime)


def _training_data(model: ComparedModel) -> _TrainingData:
    """:class:`_TrainingData` of ``model``, from the config.yaml beside its checkpoint (else the run's
    ``data.*`` its checkpoint records, as :func:`~innerloop.train.run.evaluation_windows` reads them) and
    what the checkpoint recorded."""
    try:
        run, why_not = run_of_checkpoint_and_why(model.checkpoint, model.module.hparams["model"])
    except ConfigError as err:
        return _TrainingData(None, str(err))
    if run is None:  # why, as the record or config.yaml say it (was: "it records no run" of any record)
        return _TrainingData(None, why_not)
    recorded = model.data_state.get("validation_files")
    files = run_files(run.data, recorded if isinstance(recorded, list) else None)
    digest = model.data_state.get("training_digest")
    try:
        written = model.checkpoint.stat().st_mtime
    except OSError:
        written = None
    return _TrainingData(
        run, files=files, digest=digest if isinstance(digest, str) else None, written=written
    )


def _there_before(files: list[Path], written: float | None) -> list[Path]:
    """Those of ``files`` that were in place before a checkpoint written at ``written`` (their inode
    changed last by then: a file created, moved in or edited since is not among them)."""
    before = []
    for file in files:
        try:
            if written is not None and file.stat().st_ctime <= written:
                before.append(file)
        except OSError:
            pass
    return before


@dataclass
class _WindowsText:
    """Where the windows are read from: ``files`` (resolved; None where not known as files), ``tail``
    (they are one file's last ``tail``: a one-file run's held-out text) and ``words``."""

    files: frozenset[Path] | None
    tail: float | None
    words: str


def _windows_text(paths: Sequence[str], baseline: _TrainingData, held_out: str = "val") -> _WindowsText:
    """The text the windows are read from: the ``paths`` (``--data``), else the baseline run's held-out
    text (its files as they split now, as its windows are read; ``held_out="test"``: its test text),
    else the default corpus's held-out split (a baseline whose run is unknown)."""
    if paths:
        try:
            files: frozenset[Path] | None = frozenset(resolve_files(paths))
        except DataError:  # reading the windows says so
            files = None
        return _WindowsText(files, None, f"the {argument_name('paths')} files")
    if baseline.run is None:
        split = run_files(DataConfig())
        return _WindowsText(split.held_out if split else None, None, "the default corpus's held-out split")
    split = run_files(baseline.run.data, held_out=held_out)
    if baseline.run.data.name == "recall":
        return _WindowsText(None, None, "the baseline's recall task")
    if split is None or split.records:
        return _WindowsText(None, None, "the baseline's held-out data")
    # one file: its validation windows lie in its last val_fraction, its test windows in the last
    # val_fraction + test_fraction (run_files' tail, all it held out), each as the cut that starts them
    one_file = split.tail is not None and held_out == "val"
    tail = held_out_share(baseline.run.data.val_fraction) if one_file else split.tail
    return _WindowsText(split.held_out, tail, "the baseline's held-out text")


def _trained_on_the_windows(
    name: str, data: _TrainingData, windows: _WindowsText, refuse: bool
) -> str | None:
    """A note when ``windows`` are read from text the model ``name`` trained on (by its run's files);
    with ``refuse``, a :class:`ConfigError` instead (the windows were not chosen by the user)."""
    if data.files is None or windows.files is None:
        return None
    trained = data.files.trained_on(windows.files, windows.tail)
    if not trained:
        return None
    # With files added, removed or renamed since, only a file there before its checkpoint surely trained it.
    surely = _there_before(trained, data.written) if data.files.resplit else trained
    note = (
        f"{name} {'was' if surely else 'may have been'} trained on {data.files.describe(trained)}, which the "
        f"windows ({windows.words}) are read from: its loss on them is not a held-out one"
    )
    if data.files.resplit:
        note += (
            " (its checkpoint records other held-out files than its data.paths split into now: files were "
            "added, removed or renamed since, and a file added since is counted as trained on)"
        )
    if refuse and surely:
        raise ConfigError(
            f"{note}; compare the models on text none of them trained on "
            f"({given_argument('paths', 'FILES', placeholder=True)}), or choose another {argument_name('baseline')}"
        )
    return note


def _other_data_note(
    name: str, data: _TrainingData, baseline: _TrainingData, baseline_name: str, windows: _WindowsText
) -> str | None:
    """A note when the model ``name`` trained on other data than the windows' (the baseline's held-out
    text, or the default corpus's when the baseline's data is unknown), or on the same ``data.*``
    settings but other text (their checkpoints record other training-text digests)."""
    assert data.run is not None
    checked = data.files is not None and windows.files is not None  # and none of the windows trained on
    if checked:
        held_out = "none of which it trained on (by its data.paths, as they find files now)"
    elif windows.words == "the baseline's recall task":
        held_out = "not the task it trained on"
    else:
        held_out = "which it may have trained on"
    if baseline.run is None:
        if data.run.data.name == "text" and not data.run.data.paths:
            return None  # the default corpus too: its files were checked
        ours = f"data.name={data.run.data.name!r}, data.paths={data.run.data.paths!r}"
        return f"{name} was trained on other data ({ours}) than {windows.words}, which it is scored on"
    ours, theirs = _data_settings(data.run.data), _data_settings(baseline.run.data)
    if _same_files(data.files, baseline.files):  # other spellings of the same files (a link, a relative path)
        ours["paths"] = theirs["paths"]
    if not ours["name"] == theirs["name"] == "recall":  # the task's settings matter between recall runs only
        del ours["recall"], theirs["recall"]
    if ours["name"] == "recall" and theirs["name"] != "recall":
        held_out = "not text it trained on (its run read the recall task, no text)"
    if ours != theirs:
        keys = [
            f"data.{k}={_shown(k, ours)} (baseline {_shown(k, theirs)})"
            for k in DATA_KEYS
            if k in ours and ours[k] != theirs[k]
        ]
        return (
            f"{name} was trained on other data than the baseline {baseline_name}: {', '.join(keys)}; the "
            f"windows are {windows.words}, {held_out}"
        )
    if data.digest is not None and baseline.digest is not None and data.digest != baseline.digest:
        return (
            f"{name} was trained on other text than the baseline {baseline_name}, with the same data.* "
            "settings: their checkpoints record different training-text digests (a file of data.paths was "
            f"edited, added or removed between their runs), so {windows.words} may hold text it trained on"
        )
    return None


def _shown(key: str, settings: dict[str, Any]) -> str:
    """The ``data.<key>`` setting as a note shows it: no paths of the text dataset is the default corpus."""
    if key == "paths" and not settings["paths"] and settings["name"] == "text":
        return "[] (the default corpus)"
    return repr(settings[key])


def _same_files(ours: RunFiles | None, theirs: RunFiles | None) -> bool:
    """Whether two runs' data.paths find the same files now (resolved: links and relative paths read as
    the files they name), with the same split of them."""
    if ours is None or theirs is None:
        return False
    return (ours.training, ours.held_out, ours.tail, ours.records) == (
        theirs.training, theirs.held_out, theirs.tail, theirs.records,
    )  # fmt: skip


def training_data_notes(
    models: Sequence[ComparedModel], base: int, paths: Sequence[str] = (), held_out: str = "val"
) -> list[str]:
    """A line for each compared model whose training data is not known to be apart from the windows':
    its data is unknown (no config.yaml beside it and no run recorded in its checkpoint, the baseline's
    too); it trained on text the windows
    are read from (by its run's files, as its data.paths find them now, and the held-out files its
    checkpoint records); or, without ``paths``, it trained on other data than the baseline
    (:data:`DATA_KEYS` differ) or other text (the recorded training-text digests differ).

    Without ``paths`` (``--data``) the windows are the baseline's held-out text, which no model may
    have trained on: a model that did is refused (:class:`ConfigError` naming it). With ``paths``, the
    user's choice, such a model is named in a note."""
    known = [_training_data(model) for model in models]
    windows = _windows_text(paths, known[base], held_out)
    notes = []
    for index, (model, data) in enumerate(zip(models, known, strict=True)):
        if data.run is None:
            role = " (the baseline)" if index == base else ""
            notes.append(
                f"{model.name}{role}: its training data is unknown ({data.unknown}), so whether it "
                f"trained on {windows.words} cannot be checked"
            )
            continue
        if index == base and not paths:
            continue  # its own held-out text; evaluation_windows checks its split
        if paths and index != base:
            note = _reads_data_otherwise(model.name, data, known[base], models[base].name)
            if note is not None:
                notes.append(note)
        note = _trained_on_the_windows(model.name, data, windows, refuse=not paths)
        if not paths and index != base:
            _refuse_training_on_held_out_documents(model.name, data, known[base], held_out)
        if note is None and not paths and index != base:
            note = _other_data_note(model.name, data, known[base], models[base].name, windows)
        if note is not None:
            notes.append(note)
    return notes


def _refuse_training_on_held_out_documents(
    name: str, data: _TrainingData, baseline: _TrainingData, held_out: str
) -> None:
    """A :class:`ConfigError` when the model ``name`` read the baseline's ``data.name='hf'`` records (the
    same files, split and field: the same documents by number, whatever the tokenizer or streaming) with
    other held-out fractions, so that the first document the baseline's ``held_out`` windows are read
    from (:func:`~innerloop.data.packing.first_document_of`) is one it trained on."""
    if data.run is None or baseline.run is None:
        return
    ours, theirs = data.run.data, baseline.run.data
    same_records = ours.split == theirs.split and ours.text_field == theirs.text_field
    same_files = _same_files(data.files, baseline.files) or list(ours.paths) == list(theirs.paths)
    if not (ours.name == theirs.name == "hf" and same_records and same_files):
        return
    side = "test" if held_out == "test" else "validation"
    first = first_document_of(side, theirs.val_fraction, theirs.test_fraction)
    if first is None or document_side(first, ours.val_fraction, ours.test_fraction) != "training":
        return
    raise ConfigError(
        f"{name} was trained on document {first} of the baseline's records, the first of the {side} documents "
        f"the windows are read from: it held out others (data.val_fraction={ours.val_fraction}, "
        f"data.test_fraction={ours.test_fraction}; the baseline {theirs.val_fraction}, {theirs.test_fraction}), "
        "so its loss on them is not a held-out one; compare the models on text none of them trained on "
        f"({given_argument('paths', 'FILES', placeholder=True)}), or choose another {argument_name('baseline')}"
    )


TTT_OPTIM_KEYS = ("ttt_base_lr_init", "ttt_base_lr_warmup")
"""The ``optim.*`` keys that act on test-time training alone (compared where both models have it)."""


def _optimizer_run(model: ComparedModel) -> tuple[RunConfig | None, list[str]]:
    """The run whose ``optim.*`` and ``trainer.max_steps`` trained ``model`` (None where it is unknown),
    and where the run found for it disagrees with the schedule its checkpoint recorded training with
    (:func:`_schedule_disagreements`: then None and those disagreements)."""
    try:
        run = run_of_checkpoint(model.checkpoint, model.module.hparams["model"])
    except ConfigError:
        return None, []
    disagreements = [] if run is None else _schedule_disagreements(model, run)
    return (None, disagreements) if disagreements else (run, [])


def _schedule_disagreements(model: ComparedModel, run: RunConfig) -> list[str]:
    """The learning-rate settings in which ``run`` (its config.yaml, matched to the checkpoint on model,
    data and seed only) differs from what ``model``'s checkpoint recorded training with (its module's
    hyperparameters, :func:`~innerloop.train.run.schedule_arguments`): a config.yaml of another
    run with the same model, data and seed, or of a resume that changed them after this checkpoint."""
    recorded, from_run = model.module.hparams, schedule_arguments(run)
    return [
        f"{key} {recorded[key]!r} != {value!r}"
        for key, value in from_run.items()
        if key in recorded and (tuple(recorded[key]) if key == "betas" else recorded[key]) != value
    ]


def _optimizer_settings(run: RunConfig) -> dict[str, Any]:
    """The settings that decide how a run trained on its data: its learning rates at every step (its
    ``optim.*``, every key of :class:`~innerloop.config.schema.OptimConfig`, and ``trainer.max_steps``, the
    schedule's length), the context it trained at (``data.seq_len``) and its ``trainer.precision``."""
    settings = {f"optim.{key}": value for key, value in asdict(run.optim).items()}
    # a run record without them (optimizer_notes is public: a caller's own records) counts as unknown: None
    data, trainer = getattr(run, "data", None), run.trainer
    training = {
        "data.seq_len": getattr(data, "seq_len", None),
        "trainer.precision": getattr(trainer, "precision", None),
    }
    return {**settings, "trainer.max_steps": run.trainer.max_steps, **training}


def _settings_acting_on_neither(runs: tuple[RunConfig, RunConfig], both_learn: bool, e2e: bool) -> set[str]:
    """The settings of :func:`_optimizer_settings` that give the same learning rate at every step of
    both ``runs`` whatever their values: the warm-up's and wsd decay's fractions where they make as many
    whole steps (:func:`~innerloop.config.load.warmup_steps`, :func:`~innerloop.config.load.decay_steps`:
    0 for another schedule), ``min_lr`` and ``trainer.max_steps`` where both schedules stay constant
    after the warm-up (``max_steps`` still sets an E2E model's inner warm-up), the inner lr's warm-up
    where not both learn at test time and its start where neither warms it up; ``data.seq_len`` of two
    recall runs (their task's settings set it, and :func:`training_data_notes` names those); and
    ``trainer.precision`` where one is ``auto`` (what it chose depends on the machine that trained it,
    which the run does not record: not known to differ)."""
    ignored = set()
    if all(getattr(getattr(run, "data", None), "name", None) == "recall" for run in runs):
        ignored.add("data.seq_len")  # the recall task's settings set it: named with them
    if "auto" in {getattr(run.trainer, "precision", None) for run in runs}:
        ignored.add("trainer.precision")  # chosen by the machine that trained it: not known to differ
    if warmup_steps(runs[0]) == warmup_steps(runs[1]):
        ignored.add("optim.warmup_fraction")
    if decay_steps(runs[0]) == decay_steps(runs[1]):
        ignored.add("optim.decay_fraction")
    if all(run.optim.schedule == "constant" for run in runs):
        ignored |= {"optim.min_lr"} | (set() if e2e else {"trainer.max_steps"})
    if not both_learn:
        ignored |= {f"optim.{key}" for key in TTT_OPTIM_KEYS}
    elif all(run.optim.ttt_base_lr_warmup == 0 for run in runs):
        ignored.add("optim.ttt_base_lr_init")
    return ignored


def optimizer_notes(models: Sequence[ComparedModel], base: int) -> list[str]:
    """A line for each model whose run trained with other settings than the baseline's (both runs known):
    another ``optim.*`` or ``trainer.max_steps``, so another learning rate at some step, or another
    training context ``data.seq_len`` or ``trainer.precision`` (:func:`_optimizer_settings`); a
    setting acting on neither run is not named (:func:`_settings_acting_on_neither`: e.g. ``min_lr``
    where both schedules are constant, ``decay_fraction`` where neither is ``wsd``)."""
    found = [_optimizer_run(model) for model in models]
    runs = [run for run, _ in found]
    baseline, notes = runs[base], []
    for model, (_, disagreements) in zip(models, found, strict=True):
        if disagreements:
            notes.append(
                f"{model.name}: the config.yaml beside {str(model.checkpoint)!r} gives other learning-rate "
                f"settings than its checkpoint trained with ({', '.join(disagreements)}): another run's, so "
                "its optimizer settings are not compared"
            )
    for index, (model, run) in enumerate(zip(models, runs, strict=True)):
        if index == base or run is None or baseline is None:
            continue
        pair = (model, models[base])
        both_learn = all(modules_learning_at_test_time(m.module.model) for m in pair)
        e2e = any(hasattr(m.module.model, "set_outer_progress") for m in pair)
        ignored = _settings_acting_on_neither((run, baseline), both_learn, e2e)
        ours, theirs = _optimizer_settings(run), _optimizer_settings(baseline)
        differ = [key for key in ours if key not in ignored and ours[key] != theirs[key]]
        if differ:
            notes.append(
                f"{model.name} trained with {', '.join(f'{key}={ours[key]!r}' for key in differ)}, the baseline "
                f"{models[base].name} with {', '.join(repr(theirs[key]) for key in differ)}: its difference "
                "is also one of training"
            )
    return notes


def initialisation_notes(models: Sequence[ComparedModel], base: int) -> list[str]:
    """A line for each model of another mixer than the baseline whose run had the baseline's ``seed``
    (both runs known): one seed does not give them the same initial weights where they share them (the
    embedding, and the head tied to it), since each model draws them after building its own blocks, whose
    draws differ by mixer, so their difference includes that of their initial draws. (Drawing the shared
    weights first would change every existing seed's model and the numbers pinned from them.)"""
    runs = [_training_data(model).run for model in models]  # the seed: whatever its schedule says
    baseline, notes = runs[base], []
    mixer = models[base].module.model.config.mixer
    for index, (model, run) in enumerate(zip(models, runs, strict=True)):
        if index == base or run is None or baseline is None or run.seed != baseline.seed:
            continue
        if model.module.model.config.mixer != mixer:
            notes.append(
                f"{model.name} (mixer {model.module.model.config.mixer!r}) and the baseline {models[base].name} "
                f"(mixer {mixer!r}) both trained from seed={run.seed}, which does not give them the same initial "
                "embedding: each model draws it after its own blocks, which draw otherwise; its difference "
                "includes that of the initial draws (compare runs of several seeds to tell them apart)"
            )
    return notes


def _length_notes(models: Sequence[ComparedModel], seq_lens: Sequence[int]) -> list[str]:
    """A line for each model scored at lengths past the ``data.seq_len`` it trained at (the positions
    beyond it are ones it never trained on)."""
    notes = []
    for model in models:
        trained = model.module.hparams.get("seq_len")
        longer = [n for n in seq_lens if isinstance(trained, int) and n > trained]
        if longer:
            notes.append(
                f"{model.name} trained at data.seq_len={trained}: at T={', '.join(map(str, longer))} it is "
                "also scored on positions past any it trained on"
            )
    return notes


def _same_checkpoint_notes(models: Sequence[ComparedModel]) -> list[str]:
    """A line for each model that is a checkpoint compared already (the same file, or the same bytes)."""
    seen: dict[str, str] = {}  # content checksum -> the first model with it
    notes = []
    for model in models:
        content = checkpoint_content_digest(model.checkpoint)  # whatever the file's name
        if content in seen:
            notes.append(
                f"{model.name} is the same checkpoint as {seen[content]}: it is compared with itself"
            )
        seen.setdefault(content, model.name)
    return notes


def _reading(data: _TrainingData) -> str:
    """How the model of ``data`` (its run known) reads files, as ``--data`` windows are read for it."""
    assert data.run is not None
    if data.run.data.name == "hf":
        return f"the records' {data.run.data.text_field!r} field (a data.name='hf' run)"
    return "raw text"


def _reads_data_otherwise(
    name: str, data: _TrainingData, baseline: _TrainingData, baseline_name: str
) -> str | None:
    """A note when the model ``name`` reads files otherwise than the ``--data`` windows are read (the
    baseline's way: a data.name='hf' run reads records' text field, any other run the files' raw
    text), so that its loss is on text shaped otherwise than any it read."""
    windows = "raw text" if baseline.run is None else _reading(baseline)
    ours = _reading(data)
    if ours == windows:
        return None
    return (
        f"{name} reads its data as {ours}, but the {argument_name('paths')} windows are read as {windows} (the baseline "
        f"{baseline_name}'s way): it is scored on text shaped otherwise than any it trained on; compare it "
        "with a baseline that reads files as it does"
    )


def _common_tokenizer(checkpoints: list[Path], names: list[str]) -> Tokenizer:
    """The one tokenizer every model was trained with; models that read text in different tokens
    cannot be scored on the same windows (nor their losses compared), so that is refused."""
    tokenizers = [checkpoint_tokenizer(path) for path in checkpoints]
    for name, tokenizer in zip(names[1:], tokenizers[1:], strict=True):
        if tokenizer != tokenizers[0]:
            ours, theirs = tokenizer.to_state(), tokenizers[0].to_state()
            # say what differs: the descriptions alone ("a Hugging Face tokenizer of 300 tokens") may be equal
            if ours.get("kind") == theirs.get("kind") == "huggingface":
                a, b = json.loads(ours["tokenizer_json"]), json.loads(theirs["tokenizer_json"])
                keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
                if ours.get("eos_token") != theirs.get("eos_token"):
                    keys.append("end-of-text token")
                differs = f" (their tokenizer.json differ in {', '.join(keys) or 'formatting only'})"
            else:
                differs = ""
            raise ConfigError(
                f"{name} reads text as {tokenizer.describe()} but {names[0]} as {tokenizers[0].describe()}"
                f"{differs}: compare scores every model on the same token windows, so they must share a "
                "tokenizer"
            )
    return tokenizers[0]


def _mark_no_ttt(models: list[ComparedModel]) -> None:
    """Keep ``no_ttt`` only on models that learn at test time (named ``... (no TTT)``); refuse when none does."""
    from_ablation = [bool(modules_learning_at_test_time(m.module.model)) for m in models]
    if not any(from_ablation):
        raise ConfigError(
            f"{argument_name('no_ttt')}: none of the models compared has test-time training to switch off"
        )
    for model, has_ttt in zip(models, from_ablation, strict=True):
        refusal = zero_lr_refusal(model.module.model) if has_ttt else None
        if refusal is not None:
            raise ConfigError(f"{argument_name('no_ttt')}: the compared model {model.name}: {refusal}")
        model.no_ttt = has_ttt
        if has_ttt:
            model.name = f"{model.name} (no TTT)"


# --------------------------------------------------------------------------------------------------
# Outputs: the table, the CSV, the PNG
# --------------------------------------------------------------------------------------------------


def _number(value: float | int | None, digits: int = 0) -> str:
    return "?" if value is None else f"{value:,.{digits}f}"


PARAMS_NOTE = (
    "params: every parameter, the token embedding included and a tied LM head once "
    "(innerloop.models.params.count_parameters(model).total, the count `innerloop params --budget` sizes "
    f"to); a model more than {SIZE_TOLERANCE:.0%} larger or smaller than the baseline (of the smaller count) "
    "is named in the notes"
)
"""What the table's ``params`` column counts (printed below the table)."""

TOKENS_PER_S_NOTE = (
    "tok/s in training: tokens trained / seconds in training steps, every step of every launch included "
    "(each launch's first, warm-up step too) at the machine's load then; compare short runs by steps, not "
    "by time"
)
"""What the table's ``tok/s in training`` column measures (printed below the table)."""


def _size_difference(model: ComparedModel, baseline: ComparedModel) -> str:
    """How many more parameters the larger of ``model`` and ``baseline`` has than the smaller, always as a
    share of the smaller count (the base :func:`size_notes` judges ``SIZE_TOLERANCE`` on, whichever
    model is the baseline): ``2.55x`` for a factor of 2 or more, else ``5.29% more`` (two decimals below
    10%: 5.03% must not read as the 5% tolerance)."""
    larger, smaller = max(model.parameters, baseline.parameters), min(model.parameters, baseline.parameters)
    ratio = larger / smaller
    share = ratio - 1
    amount = f"{share:.2%} more" if share < 0.1 else f"{share:.1%} more"
    if model.parameters > baseline.parameters:
        amount = f"{ratio:.2f}x" if ratio >= 2 else f"{amount} than"
        return (
            f"{model.name} has {model.parameters:,} parameters, {amount} the baseline {baseline.name}'s "
            f"{baseline.parameters:,}"
        )
    amount = f"{ratio:.2f}x as many" if ratio >= 2 else amount
    return (
        f"{model.name} has {model.parameters:,} parameters; the baseline {baseline.name} has {amount}, "
        f"{baseline.parameters:,}"
    )


def windows_line(comparison: Comparison) -> str:
    """``"2 models on the same 128 windows: <where they come from>"`` (the counts per length)."""
    counts = [
        f"{r.windows:,}" + (f" at T={r.seq_len}" if len(comparison.lengths) > 1 else "")
        for r in comparison.lengths
    ]
    models = len(comparison.models)
    one = [r.windows for r in comparison.lengths] == [1]  # "the same 1 window", not "1 windows"
    return (
        f"{models} model{'s' if models != 1 else ''} on the same {', '.join(counts)} "
        f"window{'' if one else 's'}: {comparison.windows_source}"
    )


def format_table(comparison: Comparison, with_context: bool = False) -> str:
    """The comparison's table in Markdown: parameters (see :data:`PARAMS_NOTE`), tokens trained, training
    tokens/s (see :data:`TOKENS_PER_S_NOTE`, below the table), and per length the perplexity and the loss difference
    to the baseline over whole windows with its band (see :data:`DIFFERENCE_NOTE`). ``with_context``
    (the table as written to a file, away from the terminal's other lines): first the windows scored
    (:func:`windows_line`), and after the table the notes on the models' training data and sizes."""
    table = _table(comparison)
    if not with_context:
        return table
    notes = "".join(f"- {note}\n" for note in comparison.notes)
    reproduce = "".join(f"- {line}\n" for line in comparison.reproduce)
    return (
        f"{windows_line(comparison)}\n\n{table}"
        + (f"\nNotes:\n\n{notes}" if notes else "")
        + (f"\nReproduce:\n\n{reproduce}" if reproduce else "")
    )


def _has_differences(comparison: Comparison) -> bool:
    """Whether the outputs show differences to the baseline: all but a comparison of one model."""
    return len(comparison.models) != 1


def _table(comparison: Comparison) -> str:
    """The table; with one model, no ``loss - baseline`` columns (:data:`ONE_MODEL_NOTE` instead)."""
    lengths, differences = comparison.lengths, _has_differences(comparison)
    header = ["model", "params", "tokens trained", "tok/s in training"]
    for r in lengths:
        header += [f"ppl @{r.seq_len}"] + ([f"loss - baseline @{r.seq_len}"] if differences else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m, model in enumerate(comparison.models):
        name = model.name.replace("|", "\\|")  # a run folder named 'a|b' would split its row's cells
        name = f"{name} (baseline)" if m == comparison.baseline and differences else name
        cells = [name, _number(model.parameters), _number(model.tokens_trained), _number(model.tokens_per_s)]
        for r in lengths:
            cells += [f"{r.perplexity(m):.3f}"]
            cells += [_difference_cell(comparison, r.seq_len, m)] if differences else []
        lines.append("| " + " | ".join(cells) + " |")
    if differences:
        note = DIFFERENCE_NOTE.format(confidence=comparison.confidence, windows=MIN_BAND_WINDOWS)
    else:
        note = ONE_MODEL_NOTE
    return "\n".join([*lines, "", note, "", PARAMS_NOTE, "", TOKENS_PER_S_NOTE]) + "\n"


ONE_MODEL_NOTE = (
    "one model: its perplexity on these windows, with no difference to a baseline (the table, the CSV and "
    "the plot have none); give two or more models to compare them"
)
"""What the table says below itself where a comparison has one model (instead of :data:`DIFFERENCE_NOTE`)."""


DIFFERENCE_NOTE = (
    "loss - baseline: the mean loss per scored token minus the baseline's on the same windows (nats; "
    "negative: lower loss than the baseline), with its {confidence:.0%} band, a paired bootstrap over "
    "windows (none below {windows} windows, or where a loss is not finite); a band that holds 0 "
    '("holds 0") shows no difference between the two models on these windows'
)
"""What the table's ``loss - baseline`` columns hold (printed below the table)."""

MAX_DIFFERENCE_DECIMALS = 12
"""The most decimals a difference is shown with (a smaller one than 1e-12 nats reads as 0)."""


def difference_decimals(*values: float) -> int:
    """Decimals that show each nonzero finite value of ``values`` with two significant digits, at least
    4: a difference of 2e-5 nats is ``+0.000020``, not ``+0.0000`` (whose sign and size are lost). The
    table passes a band's two ends (a mean inside it may be as close to 0 as it likes), or the mean where
    there is no band."""
    small = [abs(v) for v in values if math.isfinite(v) and 0 < abs(v) < 1e-3]
    if not small:
        return 4
    return min(MAX_DIFFERENCE_DECIMALS, max(4, 1 - math.floor(math.log10(min(small)))))


def _difference_cell(comparison: Comparison, seq_len: int, model: int) -> str:
    if model == comparison.baseline:
        return "-"
    mean, low, high = comparison.overall[seq_len][model]
    digits = difference_decimals(mean) if math.isnan(low) else difference_decimals(low, high)
    if math.isnan(low):
        band = "no band"
    else:
        band = f"{low:+.{digits}f} to {high:+.{digits}f}" + (", holds 0" if low <= 0 <= high else "")
    return f"{mean:+.{digits}f} ({band})"


def comparison_id(comparison: Comparison, scores_only: bool = False) -> str:
    """8 hex digits naming what was compared (checkpoints, settings, windows), for file names;
    ``scores_only``: what the scores depend on alone (not the baseline or the bands' settings, which a
    rerun may change and still reuse the kept scores), the name of the partial files."""
    parts = [checkpoint_identity(m.checkpoint) + m.name for m in comparison.models]
    parts += [f"{r.seq_len}x{r.windows}" for r in comparison.lengths]
    parts += [comparison.windows_source]
    if not scores_only:
        parts += [str(comparison.baseline), str(comparison.resamples)]
        parts += [str(comparison.seed), str(comparison.confidence)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:8]


def comparison_csv(comparison: Comparison) -> str:
    """One row per model, length and position bucket: the loss (6 decimals), the difference to the baseline
    and its bootstrap band (9 significant digits, however small); with one model, no difference columns
    (:data:`CSV_COLUMNS` less :data:`CSV_DIFFERENCE_COLUMNS`), as there is nothing to differ from."""
    differences = _has_differences(comparison)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(CSV_COLUMNS if differences else CSV_COLUMNS[: -len(CSV_DIFFERENCE_COLUMNS)])
    for result in comparison.lengths:
        for m, model in enumerate(comparison.models):
            mean, low, high = comparison.bands[result.seq_len][m]
            curve = result.curve(m)
            for b, (start, end) in enumerate(result.buckets):
                # a difference keeps 9 significant digits: 2e-8 is not 0.000000
                cells = [f"{v:.9g}" for v in (float(mean[b]), float(low[b]), float(high[b]))]
                writer.writerow([model.name, os.path.abspath(model.checkpoint), result.seq_len, result.windows, start, end,
                                 f"{float(curve[b]):.6f}", *(cells if differences else [])])  # fmt: skip
    return text.getvalue()


CSV_DIFFERENCE_COLUMNS = ("diff", "diff_low", "diff_high")
"""The CSV's columns of the difference to the baseline and its band (absent with one model)."""

CSV_COLUMNS = ("model", "checkpoint", "seq_len", "windows", "start", "end", "loss", *CSV_DIFFERENCE_COLUMNS)
"""The columns of :func:`comparison_csv`."""


LINE_STYLES = ("-", "--", ":", "-.")
"""The line styles a plot's curves take in turn each time matplotlib's colours run out (10 by default)."""

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
"""The markers of a plot's curves, each taken by as many models as there are colours and line styles."""


def curve_styles(models: int, colours: int) -> list[dict[str, str]]:
    """A distinct colour, line style and marker per model (``colours``: the colour cycle's length): past
    ``colours`` models the colours repeat, so the line style changes; past ``colours x 4``, the marker."""
    return [
        {
            "color": f"C{m % colours}",
            "linestyle": LINE_STYLES[(m // colours) % len(LINE_STYLES)],
            "marker": MARKERS[(m // (colours * len(LINE_STYLES))) % len(MARKERS)],
        }
        for m in range(models)
    ]


def plot_comparison(path: str | Path, comparison: Comparison) -> Path:
    """The loss-by-position curves of every model overlaid (top) and each model's difference to the
    baseline with its band (bottom; with one model, the curve alone), at the longest length compared;
    each model in its own colour, line style and marker (:func:`curve_styles`), however many."""
    import matplotlib

    result = max(comparison.lengths, key=lambda r: r.seq_len)
    middles = [(start + end - 1) / 2 for start, end in result.buckets]
    differences = _has_differences(comparison)
    if differences:
        fig, (top, bottom) = new_figure((7, 7), 2, sharex=True, height_ratios=(3, 2))
    else:
        fig, top = new_figure((7, 4.5))
    colours = len(matplotlib.rcParams["axes.prop_cycle"].by_key().get("color", [])) or 1
    styles = curve_styles(len(comparison.models), colours)
    for m, model in enumerate(comparison.models):
        top.plot(middles, result.curve(m).tolist(), markersize=3, label=model.name, **styles[m])
        mean, low, high = comparison.bands[result.seq_len][m]
        if m != comparison.baseline:
            line = {k: v for k, v in styles[m].items() if k != "marker"}
            bottom.plot(middles, mean.tolist(), label=model.name, **line)
            bottom.fill_between(middles, low.tolist(), high.tolist(), color=styles[m]["color"], alpha=0.2)
    top.set_ylabel("loss (nats per token)")
    top.set_title(f"loss by position, T={result.seq_len}, {counted(result.windows, 'window')}")
    top.legend(fontsize=8)
    if differences:
        _label_differences(bottom, comparison)
    else:
        top.set_xlabel("position in the context (bucket middle)")
    for ax in fig.axes:
        ax.grid(True, alpha=0.3)
    return save_png(Path(path), fig)


def _label_differences(bottom: Any, comparison: Comparison) -> None:
    """The zero line and labels of the plot's lower panel, the differences to the baseline."""
    bottom.axhline(0.0, color="black", linewidth=0.8)
    bottom.set_ylabel(f"minus {comparison.models[comparison.baseline].name}")
    bottom.set_xlabel("position in the context (bucket middle)")
    bottom.set_title(
        f"difference to the baseline, {comparison.confidence:.0%} bootstrap band over windows", fontsize=9
    )


def comparison_stem(comparison: Comparison, out_dir: str | Path, partial: bool = False) -> Path:
    """``out_dir/compare-<id>`` (``compare-test-<id>`` on the baseline run's test windows); ``partial``:
    ``compare-<id>-partial``, the id of what the scores depend on alone (a rerun with another --seed
    overwrites, then removes it)."""
    which = "test-" if comparison.held_out == "test" else ""
    suffix = "-partial" if partial else ""
    return user_path(out_dir) / f"compare-{which}{comparison_id(comparison, scores_only=partial)}{suffix}"


def write_comparison(
    comparison: Comparison, out_dir: str | Path, partial: str | None = None
) -> tuple[Path, Path, Path]:
    """``compare-<id>.csv``, ``.png`` and ``.md`` (the table) in ``out_dir``, written atomically (after
    removing the temporary files a killed earlier write of them left); ``compare-test-<id>.*`` for a
    comparison on the baseline run's test windows (``--held-out test``). ``partial`` (the lengths still
    to come, in words): the comparison so far, as ``compare-<id>-partial.*``, the table saying so."""
    stem = comparison_stem(comparison, out_dir, partial=partial is not None)
    remove_stale_temporaries_of([stem.with_suffix(suffix) for suffix in (".csv", ".png", ".md")])
    csv_path = atomic_write_text(stem.with_suffix(".csv"), comparison_csv(comparison))
    png = plot_comparison(stem.with_suffix(".png"), comparison)
    text = format_table(comparison, with_context=True)
    if partial is not None:
        text = f"Partial: the lengths finished before {partial}.\n\n{text}"
    table = atomic_write_text(stem.with_suffix(".md"), text)
    return csv_path, png, table


class LengthProgress:
    """What ``innerloop compare`` keeps in ``out_dir`` while it scores length after length, so that a
    failure or Ctrl-C at a later ``--seq-len`` loses none of the finished ones:

    - after each finished length but the last, the comparison so far (:func:`write_comparison`: the
      ``compare-<id>-partial.*`` files of the lengths finished), and :meth:`where` says where;
    - each finished length's per-window scores, ``compare-scores-<key>.safetensors``
      (:func:`length_key`: the checkpoints' contents, ``--no-ttt``, the plugins' code, the windows'
      tokens, the batch size and buckets, the thread count), which the same comparison run again reuses instead of scoring again (the bands are
      a bootstrap over these scores, which the CSV does not hold).

    :meth:`finish`, once the whole comparison is written, removes these files (the partial ones of an
    interrupted earlier run of it too), as the whole comparison holds them."""

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = user_path(out_dir)
        self.latest: tuple[Path, Path, Path] | None = None
        self.latest_lengths: list[int] = []
        self._made: list[Path] = []  # superseded once the whole comparison is written

    def scores_path(self, key: str) -> Path:
        """The file of one length's scores."""
        return self.out_dir / f"compare-scores-{key}.safetensors"

    def reused(self, key: str, models: int, inputs: torch.Tensor, num_buckets: int) -> LengthResult | None:
        """The length's result from the scores an earlier run kept (None where there are none, or they
        do not fit: a warning, and the length is scored again)."""
        path = self.scores_path(key)
        if not path.is_file():
            return None
        buckets = position_buckets(inputs.shape[1], num_buckets)
        try:
            from safetensors.torch import load_file

            scores = load_file(str(path))
            loss_sums, counts = scores["loss_sums"].double(), scores["counts"].double()
        except Exception as err:  # a damaged file: score again
            log.warning(
                "T=%d: the kept scores %s cannot be read (%s): scoring again", inputs.shape[1], path, err
            )
            return None
        if loss_sums.shape != (models, inputs.shape[0], len(buckets)) or counts.shape != loss_sums.shape[1:]:
            log.warning("T=%d: the kept scores %s are of another shape: scoring again", inputs.shape[1], path)
            return None
        log.warning(
            "T=%d: reusing the scores an earlier run of this comparison kept (%s)", inputs.shape[1], path
        )
        self._made.append(path)  # superseded by the whole comparison too
        return LengthResult(inputs.shape[1], buckets, loss_sums, counts, inputs.shape[0])

    def finished(self, comparison: Comparison, key: str, remaining: int) -> None:
        """Keep the scores of ``comparison``'s last length and, while ``remaining`` lengths are still to
        come, the comparison so far (the files written atomically)."""
        from safetensors.torch import save_file

        result = comparison.lengths[-1]
        path = self.scores_path(key)
        remove_stale_temporaries_of([path])  # what a killed earlier write of it left
        if path not in self._made:  # not reused: a damaged or misshapen file there is replaced
            tensors = {"loss_sums": result.loss_sums.contiguous(), "counts": result.counts.contiguous()}
            self._write_scores(path, lambda tmp: save_file(tensors, tmp, metadata={"key": key}))
        if remaining == 0:
            return  # the whole comparison: the caller writes it
        self.latest_lengths = [r.seq_len for r in comparison.lengths]
        still = f"{remaining} length{'' if remaining == 1 else 's'} more, still to come"
        self.latest = write_comparison(comparison, self.out_dir, partial=still)
        self._made += list(self.latest)
        log.warning(
            "T=%s finished, %s: the comparison so far is in %s",
            ", ".join(map(str, self.latest_lengths)), still, self.latest[2],
        )  # fmt: skip

    def _write_scores(self, path: Path, write: Any) -> None:
        """Write one length's scores to ``path`` (:func:`atomic_write` with ``write``), counted as kept
        (:meth:`where`) from before the write: a stop after the rename (in its directory fsync) left the
        file there, uncounted. A stop before the rename leaves it uncounted (absent, or an earlier damaged
        file, told by its inode)."""
        before = _inode(path)
        self._made.append(path)
        try:
            atomic_write(path, write)
        except BaseException:
            if _inode(path) == before:  # not replaced: not this run's scores
                self._made.remove(path)
            raise

    def where(self) -> str | None:
        """Where the finished lengths are: the comparison so far and the kept scores (None before the
        first length is finished)."""
        scored = [path for path in self._made if path.name.startswith("compare-scores-") and path.exists()]
        if not scored:
            return None
        kept = (
            f"the scores of {len(scored)} finished length{'' if len(scored) == 1 else 's'} are kept in "
            f"{self.out_dir} (compare-scores-*.safetensors): the same command again reuses them"
        )
        if self.latest is None:
            return kept
        csv_path, png, table = self.latest
        return (
            f"the comparison at T={', '.join(map(str, self.latest_lengths))} (the lengths finished) is in "
            f"{table} ({csv_path.name}, {png.name}); {kept}"
        )

    def finish(self, comparison: Comparison | None = None) -> None:
        """Remove what this run kept along the way (the whole comparison is written) and, given that whole
        ``comparison``, the partial files of its first lengths that an interrupted earlier run of it left
        (a run asked for more ``--seq-len`` values, stopped past them): the whole comparison holds what they
        hold. Partial files holding a length it lacks are kept: that length's only comparison."""
        earlier = [] if comparison is None else self._partials_of_first_lengths(comparison)
        for path in self._made + earlier:
            path.unlink(missing_ok=True)
        self._made.clear()

    def _partials_of_first_lengths(self, comparison: Comparison) -> list[Path]:
        """The ``compare-<id>-partial.*`` paths of each run of ``comparison``'s first lengths (1, 2, ...,
        all): those a run of it interrupted after them wrote (:func:`write_comparison`)."""
        stems = [
            comparison_stem(
                replace(comparison, lengths=comparison.lengths[:count]), self.out_dir, partial=True
            )
            for count in range(1, len(comparison.lengths) + 1)
        ]
        return [stem.with_suffix(suffix) for stem in stems for suffix in (".csv", ".png", ".md")]


def _inode(path: Path) -> tuple[int, int] | None:
    """``path``'s (device, inode), None where there is no file: a file replaced by ``os.replace`` has
    another."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_dev, stat.st_ino
