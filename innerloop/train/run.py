"""From a validated :class:`RunConfig` to a trained checkpoint, and back to an evaluation.

``train(run)`` writes into ``run.out_dir``:

- ``config.yaml``: the resolved config, ``data.paths`` made absolute (written before training starts, so
  even a killed run has it; removed again when a new run fails before its first checkpoint, so the
  out_dir then holds no run);
- ``last.safetensors``: the checkpoint (every ``trainer.checkpoint_every`` steps and at the end; see
  :class:`_SafetensorsModelCheckpoint` for when a new one replaces it);
- ``.innerloop.lock``: the lock a run holds on its out_dir (:mod:`innerloop.train.run_dir`);
- ``logs/version_<n>/metrics.csv``: what was logged, one folder per launch (Lightning's CSVLogger), with
  ``tokens_seen``, ``wall_time`` and ``tokens_per_s`` in its rows (:mod:`innerloop.train.throughput`), and
  ``train_loss``, ``lr`` and ``grad_norm`` in its training rows (:mod:`innerloop.train.module`);
- ``loss_by_position.csv`` and ``loss_by_position.png``: the final validation loss by position.

``evaluate`` (``innerloop eval``) writes its own ``eval_*.csv/.png/.md`` beside them and never replaces these.

``train(run, resume=True)`` continues from ``last.safetensors`` to the same result as a run that was
never interrupted (batches are a function of the step, see :mod:`innerloop.train.data`); ``optim.*``
and ``trainer.*`` may differ from the saved config and apply from the step reached, ``model.*``,
``data.*`` and ``seed`` may not. A run owns its out_dir while it runs (see
:mod:`innerloop.train.run_dir`: one run at a time, no run replaced without ``overwrite=True``), and a
run whose loss or weights become NaN or inf stops with :class:`TrainingDivergedError`, its last good
checkpoint kept. The first Ctrl-C stops a run after the step in progress, saves it and raises
:class:`~innerloop.train.interrupt.TrainingInterrupted` (:mod:`innerloop.train.interrupt`).

Multi-process training is Lightning's: ``trainer.strategy=ddp`` (or ``ddp_spawn``, ``fsdp``) with
``trainer.devices=N``.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import functools
import hashlib
import importlib.util
import json
import logging
import math
import os
import platform
import shlex
import shutil
import signal
from collections.abc import Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import (
    Callback,
    ModelCheckpoint,
    ProgressBar,
    RichProgressBar,
    Timer,
    TQDMProgressBar,
)
from lightning.pytorch.trainer.states import TrainerFn
from omegaconf import DictConfig
from safetensors import SafetensorError
from torch.utils.data import DataLoader

from innerloop.checkpoints import (
    CHECKPOINT_SUFFIX,
    TOKENIZER_KEY,
    CheckpointError,
    checkpoint_content_digest,
    checkpoint_identity,
    checkpoint_tokenizer,
    innerloop_version,
    load_checkpoint,
    load_training_checkpoint,
    missing_plugins_note,
    name_tag,
    recorded_entry,
    recorded_plugins,
)
from innerloop.config.load import (
    ConfigError,
    absolute_data_paths,
    absolute_tokenizer,
    argument_name,
    building_from_a_config,
    check_output_dir,
    check_resume_changes,
    check_resume_or_overwrite,
    check_trainable_precision,
    concrete_precision,
    continuing_call,
    decay_steps,
    fixed_on_resume,
    flatten_config,
    given_argument,
    given_flag,
    offers_argument,
    read_run_config,
    require_run_config,
    resume_command,  # noqa: F401 (re-exported: train.run.resume_command, as before)
    run_tokenizer,
    save_config,
    warmup_steps,
)
from innerloop.config.schema import HELD_OUT, DataConfig, RecallConfig, RunConfig
from innerloop.core.durable import fsync_directory
from innerloop.core.functional import check_flag, user_path
from innerloop.core.layer import ModelTooLargeError, device_memory_bytes, memory_size
from innerloop.core.wording import counted
from innerloop.data.atomic import (
    atomic_write_text,
    file_sha256,
    file_stamp,
    os_errno,
    remove_stale_temporaries_of,
)
from innerloop.data.hf import FORMATS, data_format, data_suffix, source_files
from innerloop.data.recall import recall_length
from innerloop.data.text import (
    TextTooShortError,
    entry_finds_files,
    held_out_share,
    one_walk_per_entry,
    path_entries,
    split_keys,
    split_test_files,
    split_text_files,
    stdlib_files,
)
from innerloop.data.tokenizer import ByteTokenizer, Tokenizer
from innerloop.kernels.cpu import release_buffers
from innerloop.kernels.dispatch import refused_named_kernels
from innerloop.models import ModelConfig
from innerloop.models.ablation import (
    modules_learning_at_test_time,
    no_test_time_training,
    zero_lr_refusal,
)
from innerloop.registry.modules import plugin_module_options
from innerloop.train.checkpoint import SafetensorsCheckpointIO, checkpoint_stamp, holds_training_state
from innerloop.train.data import (
    IGNORE_INDEX,
    Batch,
    DataError,
    FixedExamples,
    HFDataModule,
    RecallDataModule,
    TextDataModule,
    check_split_kind_unchanged,
    check_split_unchanged,
    checked_window_sizes,
    evaluation_examples,
    resolve_files,
    spread_windows,
    validation_file_keys,
)
from innerloop.train.interrupt import (
    StopOnInterrupt,
    TrainingInterrupted,
    ended_by_signals,
    optimizer_step_ends_here,
)
from innerloop.train.loggers import _CSVLogger as _CSVLogger  # re-exported from its first home
from innerloop.train.loggers import build_loggers, supersede_rows_logged_past
from innerloop.train.metrics import position_buckets
from innerloop.train.module import (
    SHARDING_STRATEGIES,
    LanguageModelModule,
    TrainingDivergedError,
    load_module,
)
from innerloop.train.plots import plot_loss_by_position, write_loss_by_position_csv
from innerloop.train.run_dir import (
    PENDING_CHECKPOINT,
    RunDirError,
    is_launched_worker,
    lock_run_dir,
    refuse_foreign_config,
    refuse_foreign_outputs,
    refuse_outputs_not_files,
    refuse_previous_run,
    remove_stale_temporaries,
    set_aside_previous_run,
    settle_pending_checkpoint,
    settle_previous_run,
)
from innerloop.train.schedules import TTTBaseLRWarmup
from innerloop.train.throughput import TrainingThroughput

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "last"


_STATES_KEPT_AS_AT_THE_BATCH_END = (Timer, TrainingThroughput)
"""Callbacks whose state in a checkpoint is the one of its step's batch end (innerloop's counters, the
time spent: a validation after it adds nothing a resume needs)."""


def _same_state(one: Any, other: Any) -> bool:
    """Whether two callback states (trees of tensors and plain values) are equal, tensors bitwise."""
    if isinstance(one, torch.Tensor) or isinstance(other, torch.Tensor):
        both = isinstance(one, torch.Tensor) and isinstance(other, torch.Tensor)
        return both and one.dtype == other.dtype and torch.equal(one, other)
    if isinstance(one, dict) and isinstance(other, dict):
        return one.keys() == other.keys() and all(_same_state(one[k], other[k]) for k in one)
    if isinstance(one, (list, tuple)) and isinstance(other, (list, tuple)):
        same_kind = type(one) is type(other) and len(one) == len(other)
        return same_kind and all(_same_state(a, b) for a, b in zip(one, other, strict=True))
    return type(one) is type(other) and bool(one == other)


class _SafetensorsModelCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint writing ``last.safetensors`` (the IO plugin does the format), always
    after the fit's last step, and only weights known to be good.

    The checkpoint of the last step (``trainer.max_steps``, or a Ctrl-C or SIGTERM stop,
    :func:`~innerloop.train.interrupt.end_the_fit_after_this_step`) is written where a periodic one is, at
    the end of the step's last batch, not at the end of training as Lightning writes it: Lightning's loop
    counters then are those of a finished epoch, and a run resumed from them logged every row one step
    late and kept ``trainer.log_every`` on other steps than an uninterrupted run. Written like a periodic
    one, every checkpoint resumes to the rows the uninterrupted run logs.

    Weights or optimizer moments holding NaN or inf are never saved (the run stops as diverged). The
    checkpoint of step ``k`` is written to ``.last.safetensors.pending`` and replaces ``last.safetensors``
    once the loss of step ``k + 1``, computed from those weights, is finite (every micro-batch's under
    gradient accumulation; or at the end, or on a crash that is not a divergence): a diverged run keeps
    a checkpoint that a resume with a lower lr can go on from, not weights whose next loss is already NaN.

    A run killed in between (e.g. during the validation after a checkpoint step) leaves the pending
    file; the next launch keeps it if it is whole and later (:func:`~innerloop.train.run_dir.
    settle_pending_checkpoint`), and a resume starts from it with :meth:`confirm_later`: it replaces
    ``last.safetensors`` under the same condition, the next step's loss on its weights (which only
    running that step can tell).
    """

    FILE_EXTENSION = CHECKPOINT_SUFFIX
    _pending: tuple[Path, Path] | None = None  # (written, to replace)
    writing_step: int | None = None
    _written: tuple[Path, dict[str, Any], Any] | None = None
    """The pending checkpoint as written (main process): its path, its dict, its callbacks' states."""
    """The step whose checkpoint is being written (still set if the write was interrupted), else None."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Lightning's, for a run resumed in another folder than it was written in (moved or copied):
        the paths it recorded are taken as the same files in this folder, so Lightning neither warns
        that its best-model scores (which this callback does not keep: ``save_top_k=0``) are dropped,
        nor reads a ``last_model_path`` in the old folder."""
        recorded = state_dict.get("dirpath", self.dirpath)
        if recorded and self.dirpath and recorded != self.dirpath:

            def here(path: Any) -> Any:  # a file of the recorded folder -> the same name in this one
                inside = isinstance(path, str) and path and Path(path).parent == Path(recorded)
                return os.path.join(self.dirpath, Path(path).name) if inside else path

            state_dict = {
                **state_dict,
                "dirpath": self.dirpath,
                **{
                    k: here(state_dict[k])
                    for k in ("best_model_path", "kth_best_model_path", "last_model_path")
                    if k in state_dict
                },
                "best_k_models": {here(k): v for k, v in state_dict.get("best_k_models", {}).items()},
            }
        super().load_state_dict(state_dict)

    def confirm_later(self, pending: Path, target: Path) -> None:
        """Treat ``pending`` (a resume's starting checkpoint, left by a killed run) as written by this
        run: it replaces ``target`` once the first step's loss is finite, or is removed if it is not."""
        self._pending = (pending, target)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        module = trainer.lightning_module
        moments = [v for o in trainer.optimizers for s in o.state.values() for v in s.values()]
        tensors = [*module.parameters(), *(v for v in moments if isinstance(v, torch.Tensor))]
        if not all(bool(torch.isfinite(t).all()) for t in tensors):
            raise module.diverged(
                f"the weights or optimizer state hold NaN or inf after {counted(trainer.global_step, 'optimizer step')}"
            )
        pending = Path(filepath).parent / PENDING_CHECKPOINT
        self.writing_step = trainer.global_step
        io = trainer.strategy.checkpoint_io
        keeps = isinstance(io, SafetensorsCheckpointIO)
        if keeps:
            io.keep_next_write()
        # recorded before the write: a Ctrl-C during it is raised when it returns, the file whole on disk,
        # and on_exception promotes it (a pending file not written is not promoted: _promote)
        self._pending = (pending, Path(filepath))
        super()._save_checkpoint(trainer, str(pending))
        self.writing_step = None
        written = io.take_written() if keeps else None
        # a copy of the callbacks' states: a state may hold the callback's own dict (best_k_models)
        self._written = None if written is None else (*written, copy.deepcopy(written[1].get("callbacks")))

    def _with_the_step_s_last_callback_states(self, trainer: L.Trainer) -> None:
        """Rewrite the pending checkpoint (atomically, as written) with the states the other callbacks
        have now, when the step it holds is done (its batch's hooks after this callback's, its
        validation): a user's ``ModelCheckpoint(monitor=...)`` or ``EarlyStopping`` updates its best
        and its patience at the end of the validation, which comes after the checkpoint of its step
        is written; restored from states older than that, a resumed run kept a best model file
        untracked on disk and counted its patience from an earlier validation. Everything else is
        the checkpoint as written (the loop counters of the step's batch end, which a resume needs);
        the states of innerloop's own callbacks and Lightning's Timer stay as at that batch end."""
        written, self._written = self._written, None
        if written is None or self._pending is None or written[0] != self._pending[0]:
            return
        path, checkpoint, states = written
        if not isinstance(states, dict):
            return
        changed = {}
        for callback in trainer.callbacks:
            if callback is self or isinstance(callback, _STATES_KEPT_AS_AT_THE_BATCH_END):
                continue
            state = callback.state_dict()
            if (state or callback.state_key in states) and not _same_state(
                state, states.get(callback.state_key)
            ):
                changed[callback.state_key] = state
        if changed:
            trainer.strategy.checkpoint_io.save_checkpoint(
                {**checkpoint, "callbacks": {**states, **changed}}, path
            )

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._with_the_step_s_last_callback_states(trainer)  # before its promotion, at the step's optimizer

    def _promote(self, trainer: L.Trainer) -> None:
        if self._pending is not None and trainer.is_global_zero:
            pending, last = self._pending
            # renamed already where a Ctrl-C landed as the rename returned: on_exception promotes again
            if os.path.lexists(pending):
                os.replace(pending, last)
            fsync_directory(last.parent)  # the new last.safetensors, durable
        self._pending = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)  # a periodic checkpoint
        step_is_whole = optimizer_step_ends_here(trainer, batch_idx)
        # a stop deferred to this step's last micro-batch is set again by the module after every callback
        stop = trainer.should_stop or getattr(pl_module, "stop_deferred_to_this_step", False)
        fit_ends = trainer.global_step >= trainer.max_steps or stop
        if step_is_whole and fit_ends and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A stop asked for at the end of a validation (``EarlyStopping``, a callback's ``should_stop``):
        the step is saved here, its validation counted, with the loop counters of the step's epoch
        (Lightning resumes a checkpoint written here past the validation), not at the end of training
        with those of a finished epoch, from which a resumed run logged every row one step late and in
        the next epoch. (This callback runs after every callback but the other checkpoint callbacks,
        whose states :meth:`_with_the_step_s_last_callback_states` brings up to date.)"""
        super().on_validation_end(trainer, pl_module)
        stops = trainer.should_stop and trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
        if stops and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # every micro-batch of the step found the loss of the pending weights finite (the step's loss is
        # their mean: under accumulation the first one's alone does not say it)
        self._promote(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._with_the_step_s_last_callback_states(trainer)
        if self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._promote(trainer)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A resume from a pending checkpoint at trainer.max_steps runs no step and no on_train_end
        # (Lightning skips a fit loop that is done): the end of the run promotes it, as the run that
        # wrote it would have at its end. Otherwise on_train_end has promoted already.
        self._with_the_step_s_last_callback_states(trainer)
        self._promote(trainer)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, TrainingDivergedError):
            if self._pending is not None and trainer.is_global_zero:
                self._pending[0].unlink(missing_ok=True)
            self._pending = self._written = None
        else:
            self._with_the_step_s_last_callback_states(trainer)
            self._promote(trainer)


@dataclass
class TrainResult:
    """Where a run's outputs are and its final validation metrics (``val_loss``, ``val_ppl``, ...)."""

    out_dir: Path
    checkpoint: Path
    config: Path
    plot: Path
    csv: Path
    metrics: dict[str, float]


def build_datamodule(
    run: RunConfig, tokenizer: Tokenizer | None = None
) -> TextDataModule | RecallDataModule | HFDataModule:
    """The DataModule named by ``run.data.name``, tokenizing with ``tokenizer`` (by default
    ``data.tokenizer``'s files as they are now; evaluation passes the one a checkpoint recorded)."""
    with building_from_a_config():  # its messages name data.seq_len, not seq_len
        return _datamodule_of(require_run_config(run), tokenizer)


def _datamodule_of(
    run: RunConfig, tokenizer: Tokenizer | None
) -> TextDataModule | RecallDataModule | HFDataModule:
    data = run.data
    if data.name == "recall":
        return RecallDataModule(
            data.recall.num_pairs, data.recall.gap, data.batch_size, data.val_batches, run.seed
        )
    tokenizer = tokenizer if tokenizer is not None else run_tokenizer(run)
    if data.name == "hf":
        return HFDataModule(
            data.paths, data.split, data.text_field, data.streaming, tokenizer,
            data.seq_len, data.batch_size, data.val_fraction, data.val_batches, data.test_fraction,
        )  # fmt: skip
    return TextDataModule(
        data.paths, data.seq_len, data.batch_size, data.val_fraction, data.val_batches, run.seed, tokenizer,
        data.test_fraction,
    )  # fmt: skip


class _StepsProgressBar(RichProgressBar):
    """Lightning's rich progress bar without its epoch count: a run's stream is endless
    (``max_epochs=-1``), which Lightning's bar printed as ``Epoch 0/-2``."""

    def _get_train_description(self, current_epoch: int) -> str:
        return f"{'Training':{len(self.validation_description)}}"


def _progress_bar(enabled: bool, callbacks: Sequence[Callback], log_every: int = 1) -> list[Callback]:
    """The run's progress bar, unless it is off or the caller gives one: rich's on a terminal, else
    tqdm's (which says ``Epoch 0``, without a count), redrawn every ``log_every`` steps (``trainer.log_every``):
    written to a file each redraw stays (about 250 bytes), and a long run's log would grow by that at every
    step. Lightning's default is rich's whenever rich is installed, and written to a file rich prints
    nothing until the run ends."""
    if not enabled or any(isinstance(c, ProgressBar) for c in callbacks):
        return []
    return [_StepsProgressBar() if _rich_bar_shows() else TQDMProgressBar(refresh_rate=log_every)]


def _rich_bar_shows() -> bool:
    """Whether rich is installed and draws its bar as the run goes: on a terminal or in Jupyter. Written to
    a file (a cluster job's log, ``> train.log``) rich prints nothing until the bar ends, where tqdm
    writes each step's progress and loss."""
    if importlib.util.find_spec("rich") is None:
        return False
    from rich.console import Console

    console = Console()
    return console.is_terminal or console.is_jupyter


class _StepDoneBeforeTheNextBatch(Callback):
    """Brings the pending checkpoint's user callback states up to date (:meth:`_SafetensorsModelCheckpoint.
    _with_the_step_s_last_callback_states`) at the next batch's start, before any other callback's
    ``on_train_batch_start``: Lightning calls the checkpoint callbacks' hooks last, so there a callback
    that changes its state at a batch's start (a count of batches) was saved with the next batch's state,
    one ahead of the step the checkpoint holds. Placed first among the Trainer's callbacks."""

    def __init__(self, checkpointing: _SafetensorsModelCheckpoint) -> None:
        self.checkpointing = checkpointing

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.checkpointing._with_the_step_s_last_callback_states(trainer)


class _ValidateAtTheLastStep(Callback):
    """Runs the run's final validation inside the fit, as the validation of its last step
    (``trainer.max_steps`` of the config; a stop before it, Ctrl-C or SIGTERM, validates nothing extra),
    when ``trainer.val_every`` does not land there: its ``metrics.csv`` row then has the ``step`` column
    of every validation inside the fit (Lightning's, one less than ``val_step``), in the launch's log
    folder. After the fit the main process of ``ddp_spawn`` has neither the workers' step counter nor
    their logger's folder: a validation run there was logged at step 0 in a second folder."""

    def __init__(self, last_step: int) -> None:
        self.last_step = last_step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step_is_whole = optimizer_step_ends_here(trainer, batch_idx)
        if step_is_whole and trainer.global_step >= self.last_step:
            trainer.should_stop = True  # Lightning validates a fit that stops before its epoch ends


class _RecordTokenizer(Callback):
    """Stores the run's tokenizer in every checkpoint (:data:`~innerloop.checkpoints.TOKENIZER_KEY`),
    so that eval, generate, export and a resume use the one the weights were trained with."""

    def __init__(self, run: RunConfig) -> None:
        self.state = None if run.data.name == "recall" else run_tokenizer(run).to_state()

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self.state is not None:
            checkpoint[TOKENIZER_KEY] = self.state


RUN_DATA_KEY = "innerloop_run"
"""The checkpoint entry holding the ``data.*`` settings and ``seed`` of the run that wrote it (flat,
dotted keys): what its stream of batches was made with, which a resume may not change."""


def run_data_record(run: RunConfig) -> dict[str, Any]:
    """What :data:`RUN_DATA_KEY` records of ``run``: ``{"data.seq_len": 32, ..., "seed": 0}``;
    ``data.test_fraction`` only when it is not 0 (a run without a test split records what runs recorded
    before it existed: :func:`_with_test_default` reads its absence as 0)."""
    record = {**flatten_config(run.data, "data."), "seed": run.seed}
    if record.get(_TEST_KEY) == 0:
        del record[_TEST_KEY]
    return record


_TEST_KEY = "data.test_fraction"


def _with_test_default(record: dict[str, Any]) -> dict[str, Any]:
    """A :data:`RUN_DATA_KEY` record with ``data.test_fraction`` (0 where it records none: a run without a
    test split, or of an innerloop before it), so that a record without it compares with one with it."""
    return {**record, _TEST_KEY: record.get(_TEST_KEY, 0.0)}


RUN_STREAM_KEY = "innerloop_stream"
"""The checkpoint entry holding the rest of what decides where a resumed run's data stream continues
(:func:`run_stream_record`), which a resume may not change either."""


def run_stream_record(run: RunConfig) -> dict[str, Any]:
    """What :data:`RUN_STREAM_KEY` records of ``run``: ``trainer.accumulate_grad_batches`` (the stream
    resumes at batch ``step x`` it) and, for text and recall data, ``trainer.devices`` and
    ``trainer.num_nodes`` (each process reads every (processes)-th batch; ``data.name=hf`` records its
    position in global batches): the keys :func:`~innerloop.config.load.check_resume_changes` keeps."""
    record = {"trainer.accumulate_grad_batches": run.trainer.lightning.get("accumulate_grad_batches", 1)}
    if run.data.name != "hf":
        record["trainer.devices"] = run.trainer.devices
        record["trainer.num_nodes"] = run.trainer.lightning.get("num_nodes", 1)
    return record


class _RecordRunData(Callback):
    """Stores :func:`run_data_record` (:data:`RUN_DATA_KEY`) and :func:`run_stream_record`
    (:data:`RUN_STREAM_KEY`) in every checkpoint: a resume is checked against what the checkpoint was
    trained with, not only against its config.yaml, which may have been edited."""

    def __init__(self, run: RunConfig) -> None:
        self.record = run_data_record(run)
        self.stream = run_stream_record(run)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[RUN_DATA_KEY] = self.record
        checkpoint[RUN_STREAM_KEY] = self.stream


def schedule_arguments(run: RunConfig) -> dict[str, Any]:
    """The optimizer and learning-rate schedule arguments :func:`build_module` gives the
    :class:`LanguageModelModule` of ``run`` (so what its checkpoints record as hyperparameters)."""
    optim = run.optim
    return {
        "lr": optim.lr,
        "weight_decay": optim.weight_decay,
        "betas": (optim.beta1, optim.beta2),
        "warmup_steps": warmup_steps(run),
        "max_steps": run.trainer.max_steps,
        "min_lr": optim.min_lr,
        "schedule": optim.schedule,
        "decay_steps": decay_steps(run),
    }


def build_module(run: RunConfig) -> LanguageModelModule:
    """The LightningModule for ``run``'s model and optimizer settings."""
    require_run_config(run)
    with building_from_a_config():  # its messages name optim.lr, not lr
        module = LanguageModelModule(
            model=asdict(run.model),
            **schedule_arguments(run),
            num_position_buckets=run.trainer.num_position_buckets,
            diagnostics_batches=run.trainer.diagnostics_batches,
            seq_len=build_datamodule(run).seq_len,  # data.seq_len, or the one the recall task derives
        )
    if run.trainer.gradient_checkpointing:  # a memory setting of the run, not of the model: not saved
        module.model.gradient_checkpointing_enable()
    return module


def resolve_precision(precision: str, accelerator: str) -> str:
    """``trainer.precision`` made concrete (:func:`innerloop.config.load.concrete_precision`); when it
    was ``auto``, says what it chose in one printed line. A precision that cannot train (float16
    weights: :func:`~innerloop.config.load.check_trainable_precision`) raises :class:`ConfigError`,
    also for a run built in Python without :func:`~innerloop.config.validate_run_config`."""
    check_trainable_precision(precision)
    chosen = concrete_precision(precision, accelerator)
    if precision == "auto":
        where = {"bf16-mixed": "a CUDA GPU", "16-mixed": "a CUDA GPU without native bfloat16"}.get(
            chosen, "no CUDA GPU"
        )
        print(f"trainer.precision=auto: {chosen} ({where} for accelerator={accelerator})")
    return chosen


def build_trainer(run: RunConfig, callbacks: Sequence[Callback] | Callback | None = ()) -> L.Trainer:
    """A Lightning Trainer that checkpoints to ``run.out_dir/last.safetensors`` in safetensors, logs
    with ``run.logger`` and takes the other Lightning arguments of ``run.trainer.lightning`` as given
    (and ``callbacks``, one, a list or None). Lightning's refusal of a setting is a :class:`ConfigError` naming
    those arguments."""
    t = require_run_config(run).trainer
    callbacks = _checked_callbacks(callbacks)
    checkpointing = _SafetensorsModelCheckpoint(
        dirpath=run.out_dir,
        save_last=True,
        save_top_k=0,
        every_n_train_steps=t.checkpoint_every,
        enable_version_counter=False,
    )
    checkpointing.CHECKPOINT_NAME_LAST = CHECKPOINT_NAME
    own_callbacks: list[Callback] = [
        _StepDoneBeforeTheNextBatch(checkpointing),
        checkpointing,
        _ValidateAtTheLastStep(t.max_steps),
    ]
    if run.optim.ttt_base_lr_warmup > 0:
        optim = run.optim
        own_callbacks.append(
            TTTBaseLRWarmup(optim.ttt_base_lr_init, run.model.ttt.base_lr, optim.ttt_base_lr_warmup)
        )
    arguments = dict(
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=t.strategy,
        precision=resolve_precision(t.precision, t.accelerator),
        max_steps=t.max_steps,
        max_epochs=-1,  # the training stream is endless; max_steps ends the run
        # Lightning counts val_check_interval in batches, innerloop's val_every in optimizer steps
        val_check_interval=t.val_every * t.lightning.get("accumulate_grad_batches", 1),
        check_val_every_n_epoch=None,
        limit_val_batches=run.data.val_batches,
        num_sanity_val_steps=0,
        gradient_clip_val=run.optim.grad_clip if run.optim.grad_clip > 0 else None,
        log_every_n_steps=t.log_every,
        logger=build_loggers(run.logger, run.out_dir),  # logs/version_<n>/..., one folder per launch
        callbacks=[
            *own_callbacks,
            *_progress_bar(t.progress_bar, callbacks, t.log_every),
            _RecordTokenizer(run),
            _RecordRunData(run),
            *callbacks,
        ],
        plugins=[SafetensorsCheckpointIO()],
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
        default_root_dir=run.out_dir,
    )
    if not t.lightning:
        return L.Trainer(**arguments)
    try:
        return L.Trainer(**{**arguments, **t.lightning})
    except (MisconfigurationException, ValueError, TypeError) as err:
        given = ", ".join(f"trainer.{k}={v!r}" for k, v in t.lightning.items())
        raise ConfigError(f"lightning.Trainer refuses {given}: {' '.join(str(err).split())}") from None


def checkpoint_path(out_dir: str | Path) -> Path:
    """The checkpoint a run in ``out_dir`` writes (and ``--resume`` continues from)."""
    return Path(out_dir) / f"{CHECKPOINT_NAME}{CHECKPOINT_SUFFIX}"


def _releasing_scan_buffers(function: Any) -> Any:
    """``function``, freeing the CPU training scans' kept buffers (:func:`~innerloop.kernels.cpu.
    release_buffers`, hundreds of MB for TTT-MLP) when it returns or raises, so that a finished run does
    not hold them in a notebook or sweep process (another run in the process would allocate again)."""

    @functools.wraps(function)
    def releasing(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        finally:
            release_buffers()

    return releasing


def _check_train_arguments(run: Any, resume: Any, overwrite: Any) -> None:
    """:func:`train`'s arguments, before anything is read or written."""
    require_run_config(run)
    check_flag("resume", resume)
    check_flag("overwrite", overwrite)
    check_resume_or_overwrite(resume, overwrite)


def _checked_callbacks(callbacks: Any) -> list[Callback]:
    """``train``'s ``callbacks`` as a list: one ``Callback``, an iterable of them or None (none), as
    Lightning's Trainer takes them; else a TypeError naming ``callbacks``, before anything is read or
    written (a list of other things failed inside the fit with "'str' object has no attribute
    'on_exception'")."""
    if callbacks is None:
        return []
    if isinstance(callbacks, Callback):
        return [callbacks]
    given = (
        list(callbacks)
        if isinstance(callbacks, Iterable) and not isinstance(callbacks, (str, bytes))
        else None
    )
    if given is None or not all(isinstance(c, Callback) for c in given):
        wrong = callbacks if given is None else next(c for c in given if not isinstance(c, Callback))
        raise TypeError(
            f"callbacks must be a Lightning Callback or a list of them (lightning.pytorch.Callback instances), "
            f"got {type(wrong).__name__} {wrong!r:.80}"
        )
    return given


@_releasing_scan_buffers
def train(
    run: RunConfig,
    cfg: DictConfig | None = None,
    resume: bool = False,
    callbacks: Sequence[Callback] | Callback | None = (),
    overwrite: bool = False,
) -> TrainResult:
    """Train ``run`` (already validated, e.g. by :func:`innerloop.config.load_config`); see the module doc.

    ``cfg`` is the omegaconf form to save (the run itself is saved if not given); ``callbacks`` are extra
    Lightning callbacks (one, a list or None, as the Trainer takes them). The run holds a lock on
    ``run.out_dir`` until it returns (a second run there raises
    :class:`~innerloop.train.run_dir.RunDirError`), removes the temporary files a killed run left there,
    and refuses an out_dir that holds a run unless ``resume`` (continue it) or ``overwrite`` (replace it).
    A resume is checked against the checkpoint and the saved config before anything is written. A
    diverging run raises :class:`TrainingDivergedError`, keeping its last finite checkpoint.
    """
    _check_train_arguments(run, resume, overwrite)
    callbacks = _checked_callbacks(callbacks)
    if not resume:
        check_new_run_holds_out_text(run)
        run, cfg = _with_the_recall_length(run, cfg)
    run, cfg = _with_absolute_data_paths(run, cfg)
    out_dir = Path(run.out_dir)
    if is_launched_worker():  # rank > 0 under Lightning's DDP launcher: rank 0 owns the out_dir
        return _train_in_locked_dir(run, cfg, resume, callbacks, replace_previous=False)
    with lock_run_dir(out_dir), _torch_flags_restored():
        _settle_previous_run(out_dir, resume)  # an --overwrite launch killed before it ended
        remove_stale_temporaries(out_dir)
        # kept for --resume if whole and later, else removed; --overwrite sets aside one it cannot judge
        settle_pending_checkpoint(out_dir, replacing=overwrite and not resume)
        if not resume:
            refuse_foreign_config(out_dir)  # a user's own config.yaml, which even --overwrite keeps
            refuse_foreign_outputs(out_dir)  # a user's own loss_by_position.csv / .png, likewise
            refuse_outputs_not_files(out_dir)  # a folder named as a run's file, likewise
        if not resume and not overwrite:
            refuse_previous_run(out_dir)
        return _train_in_locked_dir(run, cfg, resume, callbacks, replace_previous=overwrite)


def _settle_previous_run(out_dir: Path, resume: bool) -> None:
    """:func:`~innerloop.train.run_dir.settle_previous_run` what an ``--overwrite`` launch that was killed
    left set aside. A resume that finds it so, with the previous run's config.yaml put back in place of the
    killed launch's, is refused: its config was read from the killed launch's config.yaml (the Python
    continuing call does that; the command line's ``--resume`` settles first,
    :func:`~innerloop.train.run_dir.settle_interrupted_overwrite`), and would continue the previous run's
    checkpoint with that launch's optim.* and trainer.*, writing them over the previous run's config."""
    config = out_dir / "config.yaml"
    before = config.read_bytes() if resume and config.is_file() else None
    settle_previous_run(out_dir)
    if before is not None and config.is_file() and config.read_bytes() != before:
        raise RunDirError(
            f"out_dir={str(out_dir)!r} held the config.yaml of a {given_flag('overwrite')} launch killed "
            "before its first checkpoint, which the config given to this resume was likely read from; that "
            "launch is undone and the previous run's files, its config.yaml too, are back as they were: "
            f"read its config again to continue it, {continuing_call(out_dir)}"
        )


def check_new_run_holds_out_text(run: RunConfig) -> None:
    """Refuse a new text run at ``data.val_fraction=0``: it asks for no validation text, which a run
    cannot have (the by-file split would hold out its last file instead, taking it from the training
    text). A run saved so (before this check) still resumes and evaluates, holding out that file."""
    if run.data.name == "text" and run.data.val_fraction == 0:
        raise ConfigError(
            "data.val_fraction=0 holds out no validation text, which a run needs (with several files the "
            "split would hold out the last one instead, taking it from the training text); set "
            "data.val_fraction > 0 (e.g. 0.1)"
        )


def check_named_kernels_train(run: RunConfig, module: L.LightningModule, device: torch.device) -> None:
    """Raise :class:`ConfigError` if ``model.ttt.kernel`` names a kernel that cannot train ``module``'s TTT
    layers on ``device`` in the run's precision (a Triton kernel on a CPU, say): refused before the run
    writes anything, not at its first step. ``auto`` and ``torch`` always run."""
    precision = concrete_precision(run.trainer.precision, run.trainer.accelerator)
    scan_dtype = torch.float64 if precision.startswith("64") else torch.float32
    refused = refused_named_kernels(module, [device], requires_grad=True, dtype=scan_dtype)
    for kernel, reason in refused.items():
        raise ConfigError(
            f"model.ttt.kernel={kernel!r} cannot train this run on {device} ({precision}): {reason}; "
            f"model.ttt.kernel=auto runs the fastest path that works here (it may change with {given_flag('resume')})"
        )


def _train_in_locked_dir(
    run: RunConfig,
    cfg: DictConfig | None,
    resume: bool,
    callbacks: Sequence[Callback],
    replace_previous: bool,
) -> TrainResult:
    """The run itself. Nothing is written or removed in out_dir until the module, the data and the
    Trainer are built and a resume is checked against its checkpoint: a run that cannot start leaves the
    out_dir as it was."""
    out_dir = Path(run.out_dir)
    ckpt = checkpoint_path(out_dir)
    start = _resume_checkpoint(out_dir) if resume else None
    L.seed_everything(run.seed, workers=True, verbose=False)
    module = build_module(run)
    start_read = None if start is None else _check_resume(run, module, start)
    refuse_a_full_disk(out_dir, module, trained_dtype(run.trainer.precision))
    datamodule = build_datamodule(run)
    # read now, before the Trainer's loggers make logs/version_<n>: data that a tokenizer's token counts
    # show too short (the config checks count bytes) is refused with the out_dir left as it was
    datamodule.setup("fit")
    # Ctrl-C: finish the step, save it, stop; whether this run had a checkpoint then
    interrupt = StopOnInterrupt(watch=(ckpt, out_dir / PENDING_CHECKPOINT))
    trainer = build_trainer(run, [TrainingThroughput(), interrupt, *callbacks])  # parameter counts, tokens/s
    _hand_over_the_start(trainer, start, start_read)
    del start_read  # Lightning's load takes it, and lets it go once restored
    refuse_training_beyond_memory(
        module, trainer.strategy.root_device, trained_dtype(run.trainer.precision), training_shards(trainer)
    )
    check_named_kernels_train(run, module, trainer.strategy.root_device)
    _confirm_a_pending_start(trainer, start, ckpt)
    _warn_of_a_warm_up_longer_than_the_run(run)
    if run.trainer.threads > 0:
        torch.set_num_threads(run.trainer.threads)
    with interrupt.listening():  # from here on a Ctrl-C is a stop request, also before the fit starts
        config_path, undone = _fit(run, cfg, module, datamodule, trainer, interrupt, start, replace_previous)
    _raise_if_stopped(run, trainer, interrupt, ckpt, undone)
    steps = _steps_done(run, trainer, ckpt)
    if steps < run.trainer.max_steps:  # trainer.max_time, or a callback, stopped it
        log.warning("the run stopped at step %d of trainer.max_steps=%d %s; %s holds it: continue with %s",
                    steps, run.trainer.max_steps, _stop_reason(trainer), ckpt, _continuing(run, trainer))  # fmt: skip
    return _finish(run, module, datamodule, trainer, ckpt, config_path, steps)


def _steps_done(run: RunConfig, trainer: L.Trainer, ckpt: Path) -> int:
    """The optimizer steps the run has taken: this process's trainer's, or under ``ddp_spawn`` (whose
    spawned processes trained, not this one) the checkpoint's."""
    steps = trainer.global_step
    if steps < run.trainer.max_steps and ckpt.is_file():
        steps = max(steps, int(load_checkpoint(ckpt).get("global_step", steps)))
    return steps


def _time_budget(trainer: L.Trainer) -> float | None:
    """``trainer.max_time`` in seconds when its time is spent (Lightning's Timer counts the time of every
    launch of a run: the checkpoint keeps it), else None."""
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    remaining = None if timer is None else timer.time_remaining()  # public: the limit less the time spent
    return None if remaining is None or remaining > 0 else remaining + timer.time_elapsed()


def _plugin_modules_comment() -> str:
    """The comment config.yaml starts with when plugin modules were loaded with ``-p`` (or
    ``INNERLOOP_PLUGIN_MODULES``): the run needs them again to resume or reload, and the config holds
    only their plugins' names; "" when none was."""
    options = plugin_module_options()
    if not options:
        return ""
    return f"plugin modules loaded (not installed): innerloop {shlex.join(options)}"


def _stop_reason(trainer: L.Trainer) -> str:
    """Why a fit ended before ``trainer.max_steps``, in parentheses."""
    budget = _time_budget(trainer)
    if budget is not None:
        return f"(its trainer.max_time, {budget:g} s over all its launches, is spent)"
    return "(a callback asked it to stop)"


def _continuing(run: RunConfig, trainer: L.Trainer) -> str:
    """The command (quoted) that continues a fit that ended before ``trainer.max_steps``: with a spent
    ``trainer.max_time``, a limit of the time spent so far and as long again as this launch was given
    (Lightning counts it over every launch: a bare resume stops at once; twice the limit, as before,
    stopped at once too where the last step ran past the limit by more than the limit itself, e.g. a
    2.5 s step against 1 s). "This launch was given" is its limit less the time spent when it started
    (the checkpoint's): a run given 1 h, stopped and resumed as told (spent + 1 h), is told spent + 1 h
    again, not spent + its whole raised limit (which doubled the time of each leg); a launch whose limit
    was spent when it started (a bare resume) was given nothing, and the limit itself is added."""
    budget = _time_budget(trainer)
    if budget is None:
        return continuing_call(run.out_dir)
    timer = next(c for c in trainer.callbacks if isinstance(c, Timer))  # _time_budget found it
    # the time spent when this launch started, Timer.load_state_dict's: private, so another Lightning may
    # not have it (then the whole limit is added: a longer limit, never one that stops at once)
    at_start = getattr(timer, "_offset", None)
    known = type(at_start) in (int, float) and math.isfinite(at_start)
    given = budget - at_start if known else budget
    seconds = math.ceil(timer.time_elapsed() + (given if given > 0 else budget))
    # the days with a leading 0 always: YAML reads an unquoted 12:00:00:00 as a base-60 number (2592000)
    longer = f"0{seconds // 86400}:{seconds // 3600 % 24:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    resume = continuing_call(run.out_dir, f" trainer.max_time={longer}")
    return f"{resume} (the time spent and as long again as this launch was given; trainer.max_time=null for no limit)"


def _fit(
    run: RunConfig,
    cfg: DictConfig | None,
    module: LanguageModelModule,
    datamodule: TextDataModule | RecallDataModule | HFDataModule,
    trainer: L.Trainer,
    interrupt: StopOnInterrupt,
    start: Path | None,
    replace_previous: bool,
) -> tuple[Path, bool]:
    """Write config.yaml and train; returns its path, and whether an ``--overwrite`` run was undone: one
    stopped (Ctrl-C, SIGTERM) before its first checkpoint, which is not kept in place of the run it was
    to replace (a 1-step checkpoint written because of the stop would be). With ``replace_previous``
    the previous run is set aside first, and removed or put back at the end
    (:func:`~innerloop.train.run_dir.settle_previous_run`)."""
    out_dir = Path(run.out_dir)
    ckpt, config_path = checkpoint_path(out_dir), out_dir / "config.yaml"
    set_aside = set_aside_previous_run(out_dir) if replace_previous else []  # kept until a checkpoint
    undone = False
    try:
        with _config_settled(config_path, ckpt, start is not None):
            save_config(cfg if cfg is not None else run, config_path, _plugin_modules_comment())
            if start is not None and not is_launched_worker():  # rows past the checkpoint are logged again
                supersede_rows_logged_past(out_dir, int(recorded_entry(start, "global_step") or 0))
            trainer.fit(module, datamodule=datamodule, ckpt_path=str(start) if start is not None else None)
            if not interrupt.requested and not ckpt.exists() and trainer.global_step < run.trainer.max_steps:
                raise ConfigError(  # (a new run's config.yaml goes with it: the out_dir holds no run)
                    f"the run ended before its first step, so no checkpoint was written {_stop_reason(trainer)}: "
                    "give it time for at least a step"
                )
    except TrainingDivergedError as err:
        # the same class (NonFiniteLayerOutputError names a layer's plugins), the checkpoint note added
        raise type(err)(f"{err}; {_last_checkpoint_note(ckpt, run)}") from None
    except (OSError, SafetensorError) as err:
        if not out_of_space(err):
            raise _kept_said(err, out_dir, ckpt, run) from None
        raise RunDirError(
            f"writing into out_dir={run.out_dir!r} failed: {' '.join(str(err).split())}; free some space: "
            f"{_last_checkpoint_note(ckpt, run, overrides='')}"
        ) from None
    except SystemExit:  # Lightning's exit(1) after a KeyboardInterrupt
        if not (interrupt.stopped_at_once or interrupt.keyboard_interrupt):
            raise
        cause = "at a second Ctrl-C," if interrupt.stopped_at_once else "by a KeyboardInterrupt"
        raise TrainingInterrupted(
            f"stopped at once {cause} after {trainer.global_step} of {run.trainer.max_steps} "
            f"steps{_what_was_interrupted(trainer)}; {_last_checkpoint_note(ckpt, run, overrides='')}"
        ) from None
    finally:
        stopped_early = interrupt.requested and trainer.global_step < run.trainer.max_steps
        if set_aside and stopped_early and not interrupt.had_checkpoint:
            undone = True  # this run's files go; settle_previous_run puts the previous run's back
            for path in (ckpt, out_dir / PENDING_CHECKPOINT, config_path):
                path.unlink(missing_ok=True)
        if replace_previous:
            settle_previous_run(out_dir)  # removed if this run has a checkpoint, else put back
    return config_path, undone


def _kept_said(err: BaseException, out_dir: Path, ckpt: Path, run: RunConfig) -> BaseException:
    """``err``, a write into ``out_dir`` that failed otherwise than for a full disk (a file system turned
    read-only, an I/O error), with what is kept and how to continue after its message (of its class,
    errno and file name kept: :func:`_with_words`); any other error as it is."""
    # atomic_write's message: "writing '<file>' failed: ..." (the folder as given, or as Lightning resolved it)
    folders = {out_dir, Path(os.path.realpath(out_dir))}
    written_here = any(f"writing {repr(str(folder / '-'))[:-2]}" in str(err) for folder in folders)
    if not isinstance(err, OSError) or not written_here:
        return err
    return _with_words(err, _last_checkpoint_note(ckpt, run, overrides=""))


def _what_was_interrupted(trainer: L.Trainer) -> str:
    """``", while writing the checkpoint of step N"`` when a second Ctrl-C stopped the fit during that
    write, else "" (it stopped the step in progress, which is lost, or the validation after the last
    step)."""
    saving = trainer.checkpoint_callback
    step = saving.writing_step if isinstance(saving, _SafetensorsModelCheckpoint) else None
    return "" if step is None else f", while writing the checkpoint of step {step}"


def _raise_if_stopped(
    run: RunConfig, trainer: L.Trainer, interrupt: StopOnInterrupt, ckpt: Path, undone: bool
) -> None:
    """Raise :class:`TrainingInterrupted` when a Ctrl-C or SIGTERM stopped the fit: it names the step
    and how to continue (or that an ``--overwrite`` run was ``undone``, the previous run kept)."""
    if not interrupt.requested:
        return
    steps = _steps_done(run, trainer, ckpt)
    stopped = f"stopped at {interrupt.signal_name} after {steps} of {counted(run.trainer.max_steps, 'step')}"
    exit_code = 128 + (interrupt.signal or signal.SIGINT)
    if undone:
        raise TrainingInterrupted(
            f"{stopped}, before this run's first checkpoint: nothing of it is kept, and the run it was to "
            f"replace is back in {run.out_dir!r} as it was; start again with {given_flag('overwrite')} to "
            "replace it",
            exit_code=exit_code,
        )
    if steps < run.trainer.max_steps:
        raise TrainingInterrupted(
            f"{stopped}; the checkpoint {str(ckpt)!r} holds them: continue with {continuing_call(run.out_dir)}",
            exit_code=exit_code,
        )
    if trainer.callback_metrics.get("val_step") == steps:  # the fit's last step was validated (and logged)
        raise TrainingInterrupted(
            f"{stopped}, after their final validation, before loss_by_position.* were written; the checkpoint "
            f"{str(ckpt)!r} holds them all: {continuing_call(run.out_dir)} writes the files",
            exit_code=exit_code,
        )
    raise TrainingInterrupted(
        f"{stopped}, before the final validation; the checkpoint {str(ckpt)!r} holds them all: "
        f"{continuing_call(run.out_dir)} runs the final validation",
        exit_code=exit_code,
    )


def _resume_checkpoint(out_dir: Path) -> Path:
    """Where a resume in ``out_dir`` starts: the pending checkpoint a killed run left, if the launch kept
    it (:func:`~innerloop.train.run_dir.settle_pending_checkpoint`: whole and later than
    ``last.safetensors``; the other ranks of a DDP run find what rank 0 kept), else ``last.safetensors``."""
    pending = out_dir / PENDING_CHECKPOINT
    return pending if pending.is_file() else checkpoint_path(out_dir)


def with_missing_plugins_named(err: ConfigError, out_dir: str | Path) -> ConfigError:
    """``err``, the error of reading the saved config of the run in ``out_dir`` to resume it, with where
    each plugin that the run's checkpoint records and that no plugin registers now came from (its
    distribution, as :func:`~innerloop.train.module.load_module` and ``innerloop eval`` name it:
    :func:`~innerloop.checkpoints.missing_plugins_note`); ``err`` itself when there is none. The config
    names the plugins (``model.ttt.inner_loss=...``) but not where they came from: only the checkpoint
    does, and a config naming a plugin that is not registered fails before the checkpoint is read."""
    checkpoints = (Path(out_dir) / PENDING_CHECKPOINT, checkpoint_path(out_dir))  # as _resume_checkpoint
    record = next((r for r in map(recorded_plugins, checkpoints) if r is not None), None)
    missing = missing_plugins_note(record)
    if not missing:
        return err
    return ConfigError(f"{' '.join(str(err).split()).rstrip('.')}; {missing}")


def _hand_over_the_start(
    trainer: L.Trainer, start: Path | None, read: tuple[tuple[int, ...] | None, dict[str, Any]] | None
) -> None:
    """Give the checkpoint a resume has read and checked (:func:`_check_resume`: the file's stamp taken
    before the read, and the read) to the Trainer's IO, for its load of ``start``
    (:meth:`~innerloop.train.checkpoint.SafetensorsCheckpointIO.hand_over`): read once, not twice, unless
    the file changed since the read began. A strategy with another IO reads the file again, as before."""
    checkpoint_io = getattr(trainer.strategy, "checkpoint_io", None)
    if start is not None and read is not None and isinstance(checkpoint_io, SafetensorsCheckpointIO):
        stamp, checkpoint = read
        checkpoint_io.hand_over(start, checkpoint, stamp)


def _confirm_a_pending_start(trainer: L.Trainer, start: Path | None, ckpt: Path) -> None:
    """When a resume starts from a pending checkpoint (not ``ckpt``), let the run confirm it as the run
    that wrote it would have: it replaces ``ckpt`` once the first step's loss is finite."""
    if start is not None and start != ckpt:
        checkpointing = next(c for c in trainer.callbacks if isinstance(c, _SafetensorsModelCheckpoint))
        checkpointing.confirm_later(start, ckpt)


def _warn_of_a_warm_up_longer_than_the_run(run: RunConfig) -> None:
    if run.optim.ttt_base_lr_warmup > run.trainer.max_steps:
        log.warning(
            "optim.ttt_base_lr_warmup=%d is longer than the run (trainer.max_steps=%d): the inner learning "
            "rate never reaches model.ttt.base_lr, but validation scores the model at it",
            run.optim.ttt_base_lr_warmup,
            run.trainer.max_steps,
        )


def _finish(
    run: RunConfig,
    module: LanguageModelModule,
    datamodule: TextDataModule | RecallDataModule | HFDataModule,
    trainer: L.Trainer,
    ckpt: Path,
    config_path: Path,
    steps: int,
) -> TrainResult:
    """The final validation (unless the fit's last was at the last of its ``steps``: it is, unless a
    finished run was resumed), the loss-by-position files and the result of a run that ended."""
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if metrics.get("val_step") != steps:
        stopped = (
            f"during the final validation, after all {counted(trainer.global_step, 'step')}; the checkpoint "
            f"{str(ckpt)!r} holds them: {continuing_call(run.out_dir)} runs the validation "
            "again and writes loss_by_position.*"
        )
        # a launch that trained nothing (a finished run resumed) logs no second row for that step
        quiet = _without_loggers(trainer) if not metrics else contextlib.nullcontext()
        with ended_by_signals(stopped), quiet:
            results = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
        metrics = {k: float(v) for k, v in results.items()}
    writing = (
        f"while loss_by_position.* were written, after all {counted(trainer.global_step, 'step')}; the checkpoint "
        f"{str(ckpt)!r} holds them: {continuing_call(run.out_dir)} writes the files again"
    )
    with ended_by_signals(writing):
        plot, csv_path = _write_loss_by_position_or_say_why_not(run, metrics, datamodule.seq_len, ckpt, steps)
    return TrainResult(Path(run.out_dir), ckpt, config_path, plot, csv_path, metrics)


def _with_the_recall_length(run: RunConfig, cfg: DictConfig | None) -> tuple[RunConfig, DictConfig | None]:
    """A new recall run's ``run`` and ``cfg`` with ``data.seq_len`` the length the task makes
    (``4 * num_pairs + gap - 1``; copies), so that its ``config.yaml`` and checkpoint say the length it
    trained on, not the default 128 it never read. (A resume keeps its config.yaml's: an earlier run's
    checkpoint recorded the 128 its config.yaml holds.)"""
    length = recall_length(run.data.recall.num_pairs, run.data.recall.gap)
    if run.data.name != "recall" or run.data.seq_len == length:
        return run, cfg
    run = replace(run, data=replace(run.data, seq_len=length))
    if cfg is not None:
        cfg = copy.deepcopy(cfg)
        cfg.data.seq_len = length
    return run, cfg


def _with_absolute_data_paths(run: RunConfig, cfg: DictConfig | None) -> tuple[RunConfig, DictConfig | None]:
    """``run`` and ``cfg`` with :func:`absolute_data_paths`, an absolute :func:`absolute_tokenizer` and
    ``out_dir``'s ``~`` expanded (copies; the caller's are left as they are).

    A run records its data where it was started: ``config.yaml`` then names the same files whatever
    directory eval, compare or a resume later runs from (a relative glob would match other files, or
    none, elsewhere). Lightning expands a ``~`` in out_dir and pathlib does not: expanded once, every
    file of the run goes into one folder."""
    paths = absolute_data_paths(run.data.paths)
    tokenizer = absolute_tokenizer(run.data.tokenizer)
    out_dir = os.path.expanduser(run.out_dir)
    if (paths, tokenizer, out_dir) == (list(run.data.paths), run.data.tokenizer, run.out_dir):
        return run, cfg
    run = replace(run, out_dir=out_dir, data=replace(run.data, paths=paths, tokenizer=tokenizer))
    if cfg is not None:
        cfg = copy.deepcopy(cfg)
        cfg.data.paths, cfg.data.tokenizer, cfg.out_dir = paths, tokenizer, out_dir
    return run, cfg


@contextlib.contextmanager
def _config_settled(config_path: Path, ckpt: Path, resume: bool) -> Iterator[None]:
    """Around the writing of ``config_path`` and the fit, in the process that owns the out_dir: when the
    block fails (an error, or a second Ctrl-C) before this launch wrote a checkpoint, the config.yaml it
    wrote goes. A new run's is removed (if ``ckpt`` does not exist: an out_dir without a checkpoint then
    holds no run, and the corrected launch is not refused as a second run); a resume's is replaced by
    the text it had before (the overrides of a resume that failed on its data never ran a step, and a
    later plain ``--resume`` must not take them up). Nothing else is removed (``logs/`` of the launch
    stay, as a record of it)."""
    owner = not is_launched_worker()
    before = file_stamp(ckpt)
    previous = config_path.read_text(encoding="utf-8") if resume and config_path.is_file() else None
    try:
        yield
    except BaseException:
        if owner and not resume and not ckpt.exists():
            config_path.unlink(missing_ok=True)
        elif owner and previous is not None and file_stamp(ckpt) == before:
            atomic_write_text(config_path, previous)
        raise


@contextlib.contextmanager
def _torch_flags_restored() -> Iterator[None]:
    """Restore torch's process-wide settings that ``trainer.deterministic``, ``trainer.benchmark`` and
    ``trainer.threads`` change (Lightning sets the first two for the run and leaves them set), so that one
    run's settings do not carry over to what the process does next."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark = torch.backends.cudnn.benchmark
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.cudnn.benchmark = benchmark
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _without_loggers(trainer: L.Trainer) -> Iterator[None]:
    """``trainer`` logs nothing inside the block."""
    loggers = trainer.loggers
    trainer.loggers = []
    try:
        yield
    finally:
        trainer.loggers = loggers


def _write_loss_by_position(run: RunConfig, metrics: dict[str, float], seq_len: int) -> tuple[Path, Path]:
    """``loss_by_position.png`` and ``.csv`` of the final validation, in ``run.out_dir``, each written
    atomically: the plot first (the slow one), so that an interruption while it is drawn leaves the
    previous pair as it was."""
    out_dir = Path(run.out_dir)
    buckets = position_buckets(seq_len, run.trainer.num_position_buckets)
    losses = [metrics[f"val_loss_pos/{b}"] for b in range(len(buckets))]
    steps = int(metrics["val_step"])
    title = f"{run.model.mixer} ({run.model.backbone}), {counted(steps, 'step')}: validation loss by position"
    plot = plot_loss_by_position(out_dir / "loss_by_position.png", buckets, losses, title=title)
    csv_path = write_loss_by_position_csv(out_dir / "loss_by_position.csv", buckets, losses)
    return plot, csv_path


def _write_loss_by_position_or_say_why_not(
    run: RunConfig, metrics: dict[str, float], seq_len: int, ckpt: Path, steps: int
) -> tuple[Path, Path]:
    """:func:`_write_loss_by_position`; a full disk is a :class:`RunDirError` that says to free space,
    as at the run's other writes, and that ``ckpt`` holds all ``steps`` (a resume writes the files)."""
    try:
        return _write_loss_by_position(run, metrics, seq_len)
    except OSError as err:
        if not out_of_space(err):
            raise
        raise RunDirError(
            f"writing into out_dir={run.out_dir!r} failed: {' '.join(str(err).split())}; free some space: the "
            f"checkpoint {str(ckpt)!r} holds all {counted(steps, 'step')}: {continuing_call(run.out_dir)} writes "
            "loss_by_position.* again"
        ) from None


def _check_resume(
    run: RunConfig, module: LanguageModelModule, ckpt: Path
) -> tuple[tuple[int, ...] | None, dict[str, Any]]:
    """Raise :class:`ConfigError` or :class:`CheckpointError` unless ``run`` can continue from ``ckpt``:
    the checkpoint reads and holds ``run``'s model (weights of the right shapes), the config saved beside
    it differs from ``run`` only where a resume may change it, and ``trainer.max_steps`` is not behind
    the checkpoint. Reads only; returns the checkpoint read and its file's
    :func:`~innerloop.train.checkpoint.checkpoint_stamp` taken before the read (for the Trainer's load,
    which takes the read unless the file has changed since the read began)."""
    if not ckpt.exists():  # a config.yaml without a checkpoint refuses a new run unless overwritten
        again = f"with {given_flag('overwrite')}" if (ckpt.parent / "config.yaml").exists() else "(a new run)"
        raise CheckpointError(
            f"{given_flag('resume')}: there is no checkpoint {str(ckpt)!r} (a run killed before its first "
            f"checkpoint leaves none; one stopped before it leaves no run); start the run again {again}"
        )
    stamp = checkpoint_stamp(ckpt)  # before the read: a write during or after it shows as another stamp
    checkpoint = load_training_checkpoint(ckpt)
    saved_config = ckpt.parent / "config.yaml"
    if saved_config.is_file():
        # its keys and types only, not the checks of the machine it ran on (accelerator, devices,
        # loggers, out_dir), which the resume's overrides may change (a run moved to another machine)
        saved = read_run_config(saved_config)
        # relative data.paths or data.tokenizer of an older config.yaml name files from here, as the
        # resumed run's do
        saved, _ = _with_absolute_data_paths(replace(saved, out_dir=run.out_dir), None)
        check_resume_changes(saved, run)
    _check_same_model(run.model, checkpoint, ckpt)
    _check_same_data(run, module, checkpoint, ckpt)
    check_same_stream(run, checkpoint, ckpt)
    _check_same_tokenizer(run, ckpt)
    _check_weights_fit(module, checkpoint["state_dict"], ckpt)
    step = checkpoint.get("global_step")
    if isinstance(step, int) and run.trainer.max_steps < step:
        raise ConfigError(
            f"trainer.max_steps={run.trainer.max_steps} is below the checkpoint's step {step}; "
            f"{given_flag('resume')} can only extend a run (trainer.max_steps >= {step})"
        )
    return stamp, checkpoint


def _check_same_model(model: ModelConfig, checkpoint: dict[str, Any], ckpt: Path) -> None:
    """Raise :class:`CheckpointError` unless ``checkpoint`` holds weights of the model ``model`` describes
    (its stored model config, defaults filled in, equals ``model`` but for the keys a resume may change,
    :data:`~innerloop.config.load.RESUME_MAY_CHANGE`); name the keys that differ."""
    hparams = checkpoint.get("hyper_parameters")
    stored = hparams.get("model") if isinstance(hparams, dict) else None
    if not isinstance(stored, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{str(ckpt)!r} holds no model (no hyper_parameters['model'] or state_dict)")
    try:
        old = flatten_config(ModelConfig.from_dict(stored), "model.")
    except (TypeError, ValueError) as err:
        raise CheckpointError(
            f"{str(ckpt)!r} holds a model config this innerloop cannot read: {err}"
        ) from None
    new = flatten_config(model, "model.")
    changes = [
        f"{key} ({old[key]!r} -> {new[key]!r})"
        for key in new
        if fixed_on_resume(key) and old[key] != new[key]
    ]
    if changes:
        raise CheckpointError(f"{str(ckpt)!r} holds another model than this run's: {', '.join(changes)}")


def _check_same_data(
    run: RunConfig, module: LanguageModelModule, checkpoint: dict[str, Any], ckpt: Path
) -> None:
    """Raise :class:`ConfigError` unless ``run``'s ``data.*`` and ``seed`` are those the checkpoint was
    trained with (:data:`RUN_DATA_KEY`; a checkpoint of an older innerloop records only its seq_len):
    the config.yaml a resume starts from may have been edited by hand."""
    recorded = checkpoint.get(RUN_DATA_KEY)
    if not isinstance(recorded, dict):
        hparams = checkpoint.get("hyper_parameters")
        seq_len = hparams.get("seq_len") if isinstance(hparams, dict) else None
        recorded = {} if seq_len is None else {"data.seq_len": seq_len}
        now = {"data.seq_len": module.hparams.get("seq_len")}  # the recall task's derived one too
    else:
        now = _with_test_default(run_data_record(run))
        recorded = {k: _as_tuples(v) for k, v in _with_test_default(recorded).items()}
        now = {k: _as_tuples(v) for k, v in now.items()}
    changed = [f"{k} ({recorded[k]!r} -> {now[k]!r})" for k in now if k in recorded and recorded[k] != now[k]]
    if changed:
        raise ConfigError(
            f"{given_flag('resume')}: the run's config.yaml gives {', '.join(changed)}, but {str(ckpt)!r} was "
            "trained with the first values: data.* and seed are fixed by the run's data stream; put the "
            f"checkpoint's values back in config.yaml, or start a new run (another out_dir, or "
            f"{given_flag('overwrite')})"
        )


def check_same_stream(run: RunConfig, checkpoint: dict[str, Any], ckpt: Path) -> None:
    """Raise :class:`ConfigError` unless ``run`` continues the data stream ``checkpoint`` was trained on
    (:data:`RUN_STREAM_KEY`; a checkpoint of an older innerloop records none): the config.yaml a resume
    starts from may have been edited by hand, which moves the batch the stream continues at."""
    recorded = checkpoint.get(RUN_STREAM_KEY)
    if not isinstance(recorded, dict):
        return
    now = run_stream_record(run)
    changed = [
        f"{k} ({recorded[k]!r} -> {now[k]!r})"
        for k in now
        if k in recorded and _as_tuples(recorded[k]) != _as_tuples(now[k])
    ]
    if changed:
        raise ConfigError(
            f"{given_flag('resume')}: the run's config.yaml gives {', '.join(changed)}, but {str(ckpt)!r} was "
            "trained with the first values, which decide where its data stream continues (batch step x "
            "accumulate_grad_batches, each process reading every (processes)-th batch): batches would be "
            "skipped or read twice; put the checkpoint's values back in config.yaml, or start a new run "
            f"(another out_dir, or {given_flag('overwrite')})"
        )


def _check_same_tokenizer(run: RunConfig, ckpt: Path) -> None:
    """Raise :class:`ConfigError` unless ``data.tokenizer`` is the tokenizer the checkpoint recorded
    (the same spec may name files that changed since)."""
    if run.data.name == "recall":
        return
    if run_tokenizer(run) != checkpoint_tokenizer(ckpt):
        raise ConfigError(
            f"{given_flag('resume')}: data.tokenizer={run.data.tokenizer!r} is not the tokenizer {str(ckpt)!r} was trained "
            "with (its files changed since); restore them, or start a new run"
        )


def _check_weights_fit(module: LanguageModelModule, stored: Any, ckpt: Path) -> None:
    """Raise :class:`CheckpointError` naming the first weights of ``stored`` that are missing, extra or
    of another shape than ``module``'s; else load them into ``module``."""
    expected = module.state_dict()
    if not isinstance(stored, dict) or not all(isinstance(v, torch.Tensor) for v in stored.values()):
        raise CheckpointError(f"{str(ckpt)!r} has a state_dict that is not a mapping of names to tensors")
    problems = [f"missing {k}" for k in sorted(expected.keys() - stored.keys())]
    problems += [f"unexpected {k}" for k in sorted(stored.keys() - expected.keys())]
    problems += [
        f"{k} is {tuple(stored[k].shape)}, this model's is {tuple(expected[k].shape)}"
        for k in sorted(expected.keys() & stored.keys())
        if stored[k].shape != expected[k].shape
    ]
    if problems:
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise CheckpointError(f"{str(ckpt)!r} does not fit this run's model: {'; '.join(problems[:3])}{more}")
    module.load_state_dict(stored)


def out_of_space(err: BaseException) -> bool:
    """Whether ``err`` says that a write found the disk (or the user's quota) full: an ``OSError`` with
    ENOSPC or EDQUOT, or safetensors' error carrying one in its text (not an ``OSError``; read as
    :func:`~innerloop.data.atomic.atomic_write` reads it, :func:`~innerloop.data.atomic.os_errno`)."""
    return isinstance(err, (OSError, SafetensorError)) and os_errno(err) in (errno.ENOSPC, errno.EDQUOT)


def trained_dtype(precision: str) -> torch.dtype | None:
    """The dtype a Lightning ``precision`` converts the floating weights (and so their gradients and
    AdamW's moments, which take a parameter's dtype) to before training: ``bf16-true`` and ``16-true``
    halve them; None for the others, which train the weights in the dtype they were built in."""
    return {"bf16-true": torch.bfloat16, "16-true": torch.float16}.get(str(precision))


def _bytes_of(tensor: torch.Tensor, dtype: torch.dtype | None) -> int:
    """``tensor``'s bytes once a ``dtype`` precision converted it (floating tensors only; never more)."""
    size = tensor.element_size()
    if dtype is not None and tensor.is_floating_point():
        size = min(size, dtype.itemsize)
    return tensor.numel() * size


def checkpoint_bytes_at_least(module: torch.nn.Module, dtype: torch.dtype | None = None) -> int:
    """A lower bound on the size of a training checkpoint of ``module`` trained with its floating weights
    in ``dtype`` (:func:`trained_dtype`; None: as built): its parameters and buffers, and AdamW's two
    moments of each trainable parameter, in that parameter's dtype (the checkpoint holds more: metadata,
    the schedulers' and loops' state)."""
    tensors = [*module.parameters(), *module.buffers()]
    moments = sum(2 * _bytes_of(p, dtype) for p in module.parameters() if p.requires_grad)
    return sum(_bytes_of(t, dtype) for t in tensors) + moments


def training_bytes_at_least(module: torch.nn.Module, dtype: torch.dtype | None = None) -> int:
    """A lower bound on the memory training ``module`` (weights in ``dtype``, as for
    :func:`checkpoint_bytes_at_least`) holds: its parameters and buffers, a gradient of each trainable
    parameter and AdamW's two moments of it (activations come on top)."""
    gradients = sum(_bytes_of(p, dtype) for p in module.parameters() if p.requires_grad)
    return checkpoint_bytes_at_least(module, dtype) + gradients


def training_shards(trainer: L.Trainer) -> int:
    """Over how many devices ``trainer``'s strategy shards the weights, their gradients and AdamW's
    moments: ``trainer.world_size`` for FSDP, DeepSpeed and model parallelism, 1 for the strategies
    that keep a whole copy on each device (DDP, one device)."""
    return max(1, trainer.world_size) if isinstance(trainer.strategy, SHARDING_STRATEGIES) else 1


def refuse_training_beyond_memory(
    module: torch.nn.Module, device: torch.device, dtype: torch.dtype | None = None, shards: int = 1
) -> None:
    """Raise :class:`ModelTooLargeError` when training ``module`` on ``device`` with its weights in
    ``dtype``, sharded over ``shards`` devices (:func:`training_shards`), needs more memory than the
    device has (:func:`training_bytes_at_least`, its share): the weights alone fit (checked when the
    model is built), but gradients and AdamW's moments are three times more, and such a run was stopped
    by the out-of-memory killer at its first step, without a message."""
    need, memory = training_bytes_at_least(module, dtype) // shards, device_memory_bytes(device)
    if memory is None or need <= memory:
        return
    count = sum(p.numel() for p in module.parameters())
    share = f", its share of {shards} devices" if shards > 1 else ""
    raise ModelTooLargeError(
        f"training this model ({count:,} parameters) needs at least {memory_size(need)} on {device} "
        f"(its weights, their gradients and AdamW's two moments{share}), more than the "
        f"{memory_size(memory)} there; give smaller model sizes (innerloop params counts a config's "
        "parameters)"
    )


def refuse_a_full_disk(
    out_dir: str | os.PathLike[str], module: torch.nn.Module, dtype: torch.dtype | None = None
) -> None:
    """Raise :class:`RunDirError` when the file system of ``out_dir`` has less room than one checkpoint
    of ``module`` (trained with its weights in ``dtype``) needs: one line before the run trains, not at
    its first checkpoint after ``trainer.checkpoint_every`` steps of work."""
    need = checkpoint_bytes_at_least(module, dtype)
    free = shutil.disk_usage(out_dir).free
    if free < need:
        raise RunDirError(
            f"out_dir={str(out_dir)!r} has {free:,} bytes free, and a checkpoint of this model needs at "
            f"least {need:,}; free some space, or give another out_dir"
        )


def _last_checkpoint_note(ckpt: Path, run: RunConfig, overrides: str = " optim.lr=<lower>") -> str:
    """What a diverged (or interrupted) run leaves: its last checkpoint and how to continue it, with
    ``overrides`` on the resume command."""
    if not ckpt.is_file():
        return "no checkpoint was written"
    try:
        step = load_training_checkpoint(ckpt)["global_step"]
    except (CheckpointError, KeyError):
        return f"the checkpoint {str(ckpt)!r} could not be read back"
    return (
        f"the last checkpoint, {str(ckpt)!r} (after {counted(step, 'step')}), is kept: continue it with "
        f"{continuing_call(run.out_dir, overrides)}"
    )


DEFAULT_EVAL_SEQ_LEN = 128
"""Window length of an evaluation of a checkpoint that does not record its training seq_len."""
DEFAULT_EVAL_BATCH_SIZE, DEFAULT_EVAL_BATCHES = 16, 8
"""Windows per batch, and batches, of an evaluation that has no run's validation to follow."""


def default_window_count(batch_size: int, batches: int | None) -> int:
    """How many windows eval reads from files (``--data``, or the default corpus): ``batches`` of
    ``batch_size`` when ``batches`` is given, else 128 (8 batches of 16) whatever ``batch_size`` is,
    which only says how many windows go through the model at once (as for a run's own windows)."""
    if batches is None:
        return DEFAULT_EVAL_BATCH_SIZE * DEFAULT_EVAL_BATCHES
    checked_window_sizes(batch_size=batch_size, batches=batches)  # with batch_size's default too
    return batch_size * batches


@dataclass
class EvaluationWindows:
    """The windows an evaluation reads: ``inputs [N, T]``, ``targets [N, T]``; ``tag`` names the data
    in output files (see :func:`evaluation_stem`), ``source`` says in words where they come from."""

    inputs: torch.Tensor
    targets: torch.Tensor
    batch_size: int
    tag: str
    source: str


def run_of_checkpoint(checkpoint: str | Path, model: dict[str, Any]) -> RunConfig | None:
    """The run that wrote ``checkpoint``: the ``config.yaml`` beside it when it describes the
    checkpoint's model (``model``, its hyperparameters' model config); else None (a checkpoint copied
    elsewhere, or next to another run's config). A config.yaml that is there but cannot be read raises
    :class:`ConfigError` (never a silent fallback to other data)."""
    return _run_beside(checkpoint, model)[0]


def run_of_checkpoint_and_why(checkpoint: str | Path, model: dict[str, Any]) -> tuple[RunConfig | None, str]:
    """:func:`run_of_checkpoint`, and a clause: where it is None, why (no config.yaml beside it and no run
    recorded, another run's config.yaml, a record of an older innerloop lacking a key); where the
    checkpoint's own record overruled the config.yaml beside it, that it did and which keys differ."""
    return _run_beside(checkpoint, model)


def run_config_path(checkpoint: str | Path) -> Path | None:
    """The ``config.yaml`` beside ``checkpoint``, or, for a link to a run's checkpoint, beside the file
    it points to; None where there is none. A ``config.yaml`` that is no file (a folder, a broken link)
    is returned too: reading it is an error naming it, never a quiet fallback to other data."""
    checkpoint = user_path(checkpoint)  # '~' is the home folder, as the checkpoint readers read it
    for folder in (checkpoint.parent, checkpoint.resolve().parent):
        if os.path.lexists(folder / "config.yaml"):
            return folder / "config.yaml"
    return None


def _run_beside(checkpoint: str | Path, model: dict[str, Any]) -> tuple[RunConfig | None, str]:
    """:func:`run_of_checkpoint`, and a clause: when it is None why (``there is no config.yaml beside
    ...``); when the checkpoint's own record (:data:`RUN_DATA_KEY`) overrules the config.yaml beside it
    (another run's: another model, or other ``data.*`` or ``seed``), that it does and which keys differ."""
    saved = run_config_path(checkpoint)
    if saved is None:
        run, why = _run_recorded_in(checkpoint, model)
        return (
            run,
            "" if run is not None else f"there is no config.yaml beside {str(checkpoint)!r}, and {why}",
        )
    try:
        run = read_run_config(saved)
    except ConfigError as err:
        raise ConfigError(
            f"the config.yaml beside {str(checkpoint)!r} cannot be used to find its run's data: {err}; "
            f"repair it, or give {given_argument('paths', 'FILES', placeholder=True)} to evaluate on"
        ) from None
    try:
        ours = flatten_config(ModelConfig.from_dict(model), "model.")
    except (TypeError, ValueError) as err:
        return None, f"{str(checkpoint)!r} holds a model config this innerloop cannot read ({err})"
    theirs = flatten_config(run.model, "model.")
    # a resume may have changed model.ttt.kernel since an older checkpoint of the run: the same model
    changes = [
        f"{k} {theirs.get(k)!r} != {ours[k]!r}"
        for k in ours
        if fixed_on_resume(k) and theirs.get(k) != ours[k]
    ]
    another = f"the config.yaml beside {str(checkpoint)!r} is another run's"
    if changes:
        more = f" and {len(changes) - 2} more" if len(changes) > 2 else ""
        why = f"{another}: it describes another model ({', '.join(changes[:2])}{more})"
        recorded_run, gap = _run_recorded_in(checkpoint, model)  # its own run's data, where it records them
        return (
            (None, f"{why}; {gap}") if recorded_run is None else (recorded_run, f"{why}; {_READ_AS_RECORDED}")
        )
    return _run_with_record(checkpoint, run, another)


_READ_AS_RECORDED = "its data.* and seed read as the checkpoint recorded them"
"""The clause saying that the checkpoint's record overruled the config.yaml beside it."""


def _run_with_record(checkpoint: str | Path, run: RunConfig, another: str) -> tuple[RunConfig | None, str]:
    """``run`` (the config.yaml beside ``checkpoint``, of the same model) where it agrees with the
    ``data.*`` and ``seed`` the checkpoint records (or records none, or only its data was moved: see
    :func:`_data_moved`); else the recorded ones in their place (weights copied beside another run's
    config: scored with its data, number of windows or seed, another number), said in the clause
    returned; None, and why, where the record cannot make a run."""
    recorded = recorded_entry(checkpoint, RUN_DATA_KEY)
    differing = _data_keys_differing(run, recorded) if isinstance(recorded, dict) else []
    if not differing or _data_moved(differing, recorded):
        return run, ""
    now, record = _with_test_default(run_data_record(run)), _with_test_default(recorded)
    changes = [f"{key} {now[key]!r} != {record[key]!r}" for key in differing]
    more = f" and {len(changes) - 2} more" if len(changes) > 2 else ""
    why = (
        f"{another}: the checkpoint was trained with other settings ({', '.join(changes[:2])}{more}: "
        "the config's, then the checkpoint's)"
    )
    own, gap = _with_recorded_data(run, recorded)
    return (None, f"{why}; {gap}") if own is None else (own, f"{why}; {_READ_AS_RECORDED}")


def _data_keys_differing(run: RunConfig, recorded: dict[str, Any]) -> list[str]:
    """The ``data.*`` and ``seed`` that ``run`` (a config.yaml beside a checkpoint) gives otherwise than
    ``recorded``, the checkpoint's record of its own run (:data:`RUN_DATA_KEY`; keys it lacks are not
    compared). A resume may change none of them, so any difference means weights copied beside another
    run's config (or one edited since): the text it holds out, its number of windows (``val_batches *
    batch_size``) and the recall task's sequences (``seed``) all follow these."""
    now, recorded = _with_test_default(run_data_record(run)), _with_test_default(recorded)
    return [key for key in now if key in recorded and _as_tuples(now[key]) != _as_tuples(recorded[key])]


def _data_moved(differing: list[str], recorded: dict[str, Any]) -> bool:
    """Whether the config.yaml differs from the checkpoint's record only in ``data.paths``, and the
    recorded paths find no file now (:func:`~innerloop.data.text.entry_finds_files`; a folder left empty
    finds none): the run's data was moved and its config.yaml edited to follow it
    (weights copied beside another run's config still find their own data where they recorded it)."""
    if differing != ["data.paths"]:
        return False
    paths = recorded.get("data.paths")
    paths = paths if isinstance(paths, list) else []
    return not any(entry_finds_files(str(p)) for p in paths)  # the walk that reads the data, not glob.glob


def _with_recorded_data(run: RunConfig, recorded: dict[str, Any]) -> tuple[RunConfig | None, str]:
    """``run`` with the ``data.*`` and ``seed`` of ``recorded`` (:data:`RUN_DATA_KEY`), and ""; or None and
    why not (a clause): the keys the record lacks (an older innerloop's, before the key existed), or
    why they make no data config."""
    keys, recorded = _with_test_default(run_data_record(run)), _with_test_default(recorded)
    missing = [key for key in keys if key not in recorded]
    if missing:
        return None, f"the run's data it records lacks {', '.join(missing)} (an older innerloop's record)"
    top = {f.name: recorded[f"data.{f.name}"] for f in fields(DataConfig) if f.name != "recall"}
    recall = {f.name: recorded[f"data.recall.{f.name}"] for f in fields(RecallConfig)}
    try:
        data = DataConfig(**{**top, "paths": list(top["paths"]), "recall": RecallConfig(**recall)})
    except (TypeError, ValueError) as err:
        return None, f"the run's data it records make no data config ({err})"
    return replace(run, data=data, seed=recorded["seed"]), ""


def _run_recorded_in(checkpoint: str | Path, model: dict[str, Any]) -> tuple[RunConfig | None, str]:
    """The run that wrote ``checkpoint``, which has no config.yaml beside it (moved or copied alone), as
    far as its data goes: the ``data.*`` and ``seed`` it recorded (:data:`RUN_DATA_KEY`) with its model,
    the rest default (``out_dir`` the checkpoint's folder): what its validation read, as the config.yaml
    would have said (before, the default corpus was scored: another number on other data). None, and
    why (a clause on the checkpoint), where it records no run (an ``innerloop convert``-ed model, an
    older innerloop) or one that makes no run (:func:`_with_recorded_data`)."""
    recorded = recorded_entry(checkpoint, RUN_DATA_KEY)
    if not isinstance(recorded, dict):
        return None, "the checkpoint records no run's data"
    try:
        base = RunConfig(model=ModelConfig.from_dict(model), out_dir=str(Path(checkpoint).parent))
    except (TypeError, ValueError) as err:
        return None, f"it holds a model config this innerloop cannot read ({err})"
    return _with_recorded_data(base, recorded)


def _as_tuples(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def validation_examples(
    run: RunConfig,
    seq_len: int | None = None,
    count: int | None = None,
    tokenizer: Tokenizer | None = None,
    read: TextDataModule | None = None,
) -> Batch:
    """What ``run``'s validation reads (its DataModule's validation examples); with ``seq_len``, windows
    of that length over the same held-out data; with ``count``, that many windows instead of the
    run's ``val_batches * batch_size`` (text: spread over the held-out data the same way; hf: the first
    ``count`` windows of the held-out documents, fewer if they run out; recall: the first ``count`` of
    the same sequences). ``tokenizer``: the one to tokenize with (default: ``data.tokenizer``'s files).
    ``read``: a text run's data module, set up already by the caller (its text is not read again)."""
    data = run.data
    if read is not None:
        return _text_validation_at(run, seq_len or read.seq_len, count, tokenizer, read)
    run_seq_len = build_datamodule(run, tokenizer).seq_len  # with the tokenizer given: no files read
    if seq_len is not None and seq_len != run_seq_len:
        if data.name == "recall":
            raise ConfigError(
                f"seq_len={seq_len}: the {data.name!r} task's sequences have a fixed length "
                f"({run_seq_len}); evaluate it without {argument_name('seq_len')}"
            )
        if data.name == "text":
            return _text_validation_at(run, seq_len, count, tokenizer)
        data = replace(data, seq_len=seq_len)
    if count is not None:
        data = replace(data, batch_size=count, val_batches=1)
    datamodule = build_datamodule(replace(run, data=data), tokenizer)
    try:
        datamodule.setup("validate")
    except DataError as err:
        if data.seq_len == run.data.seq_len:
            raise
        # an evaluation's --seq-len, not the run's data.seq_len, is what the held-out data is too short for
        raise err.with_message(str(err).replace("data.seq_len", argument_name("seq_len"))) from None
    if isinstance(datamodule, HFDataModule):
        assert datamodule.val_examples is not None
        return datamodule.val_examples
    return datamodule.make_val_examples()


def _text_validation_at(
    run: RunConfig,
    seq_len: int,
    count: int | None,
    tokenizer: Tokenizer | None,
    read: TextDataModule | None = None,
) -> Batch:
    """A text run's validation windows at a ``seq_len`` other than its own (an evaluation's
    ``--seq-len``): its held-out text, split as the run split it, in windows of that length. Only the
    held-out text must hold one (not the training text), and a text too short names ``--seq-len``,
    which the user gave, not the run's ``data.seq_len``."""
    datamodule = read if read is not None else build_datamodule(run, tokenizer)  # at the run's seq_len
    assert isinstance(datamodule, TextDataModule)
    datamodule.setup("validate")  # nothing more to read where `read` was set up
    assert datamodule.val_bytes is not None
    count = count if count is not None else run.data.val_batches * run.data.batch_size
    unit = "bytes" if isinstance(datamodule.tokenizer, ByteTokenizer) else "tokens"
    what, name = "the validation text", argument_name("seq_len")
    return spread_windows(datamodule.val_bytes, seq_len, count, unit, what=what, seq_len_name=name)


def evaluation_windows(
    checkpoint: str | Path,
    module: LanguageModelModule,
    paths: Sequence[str],
    seq_len: int,
    batch_size: int | None = None,
    batches: int | None = None,
    tokenizer: Tokenizer | None = None,
    split: str | None = None,
    held_out: str = "val",
) -> EvaluationWindows:
    """The windows ``innerloop eval`` reads (``held_out="test"``, ``--held-out test``: the run's test
    windows, :func:`_run_validation_windows`, never ``paths`` nor a run unknown): ``paths`` when given (read as the run that wrote
    ``checkpoint`` read its data: a ``data.name='hf'`` run's text field, of ``split`` (``--split``;
    default the data's own), else the files' text); else the
    validation windows of that run (:func:`run_of_checkpoint`, :func:`validation_examples`: exactly the
    windows its validation scored, unless ``seq_len`` or the number of windows differ; the config.yaml
    beside it, else the ``data.*`` its checkpoint records); else, for a checkpoint whose run is unknown
    (:func:`_run_beside` says why), the default corpus's held-out split, refused where the checkpoint
    records its run's data all the same (:func:`_refuse_a_recorded_run_unread`: an older record). ``batches * batch_size``
    windows when ``batches`` is given (else the run's number of validation windows, or 128);
    ``batch_size`` defaults to the run's (or 16). A config.yaml beside the checkpoint that cannot be
    read, or run data that cannot be read, raises (one line naming it), never falls back to other data."""
    try:
        run, why_not = _run_beside(checkpoint, module.hparams["model"])
    except ConfigError as err:
        if not paths:
            raise
        files = given_argument("paths", "FILES", placeholder=True)
        advice = f"repair it, or give {files} to evaluate on"  # _run_beside's, for eval without --data
        raise ConfigError(
            f"{str(err).removesuffix(advice)}repair it: it says how to read {argument_name('paths')} (as text, or a "
            "data.name='hf' run's text field), and whether the run trained on those files"
        ) from None
    check_split_has_data(split, paths)
    _check_held_out(held_out, paths, run, why_not)
    if held_out == "test":
        assert run is not None
        return _run_validation_windows(
            run, checkpoint, seq_len, batch_size, batches, tokenizer, "test", overruled=why_not
        )
    if paths:
        return _windows_of_files(paths, run, why_not, seq_len, batch_size, batches, tokenizer, split)
    if run is not None:  # the run's own number of windows unless batches is given
        return _run_validation_windows(
            run, checkpoint, seq_len, batch_size, batches, tokenizer, overruled=why_not
        )
    _refuse_a_recorded_run_unread(checkpoint, why_not)
    batch_size = batch_size or DEFAULT_EVAL_BATCH_SIZE
    count = default_window_count(batch_size, batches)
    inputs, targets = evaluation_examples([], seq_len, count, tokenizer=tokenizer)
    source = f"the default corpus's held-out split ({why_not})"
    return EvaluationWindows(inputs, targets, batch_size, _data_tag([]), source)


def _refuse_a_recorded_run_unread(checkpoint: str | Path, why_not: str) -> None:
    """:class:`ConfigError` where ``checkpoint`` records the data its run trained on (:data:`RUN_DATA_KEY`)
    and no run could be made of it (``why_not``: an older innerloop's record lacks a key, beside another
    run's config.yaml or alone): the default corpus would give another number on other data. It says how
    to give the data: files to evaluate on, or the run's own config.yaml beside the checkpoint."""
    if not isinstance(recorded_entry(checkpoint, RUN_DATA_KEY), dict):
        return  # no run recorded (an innerloop convert-ed model): the default corpus, said in the source
    files = given_argument("paths", "FILES", placeholder=True)
    raise ConfigError(
        f"{str(checkpoint)!r} records the data its run trained on, but not as a run this innerloop can read "
        f"({why_not}): scoring the default corpus instead would be another number on other data; give "
        f"{files} (and {argument_name('seq_len')}) to evaluate on text you name, or put the checkpoint's own "
        "run's config.yaml beside it"
    )


def check_split_has_data(split: str | None, paths: Sequence[str]) -> None:
    """:class:`ConfigError` naming ``split`` (``--split`` on the command line) when it is given without
    ``paths`` (``--data``), whose split it names; checked before any checkpoint is read."""
    if split is not None and not paths:
        data = argument_name("paths")
        raise ConfigError(
            f"{given_argument('split', split)} names a split of {data}, and no {data} was given"
        )


def check_held_out_name(held_out: Any) -> None:
    """:class:`ConfigError` naming ``held_out`` as its caller gave it (``--held-out`` on the command line)
    unless it is one of :data:`HELD_OUT`, exactly, as every name of a config is (``'Test'`` is none)."""
    if not isinstance(held_out, str) or held_out not in HELD_OUT:
        raise ConfigError(f"{given_argument('held_out', held_out)} is not one of {list(HELD_OUT)}")


def _check_held_out(held_out: Any, paths: Sequence[str], run: RunConfig | None, why_not: str) -> None:
    """``held_out`` one of :data:`HELD_OUT`, and ``test`` only of a run with a test split, without
    ``--data``: :class:`ConfigError` naming ``--held-out`` else."""
    check_held_out_name(held_out)
    if held_out == "val":
        return
    test, data = given_argument("held_out", "test", quoted=False), argument_name("paths")
    if paths:
        raise ConfigError(
            f"{test} scores the run's own test windows, and {data} gives other text: give one of them"
        )
    if run is None:
        raise ConfigError(
            f"{test} needs the run that wrote the checkpoint (its config.yaml beside it, or the data.* its "
            f"checkpoint records), which says which text it held out for test, and {why_not}"
        )
    if run.data.name not in ("text", "hf") or run.data.test_fraction == 0:
        what = f"data.name={run.data.name!r}" if run.data.name == "recall" else "data.test_fraction=0"
        raise ConfigError(
            f"{test}: the run ({what}) held out no test text (data.test_fraction > 0 of a "
            f"data.name='text' or 'hf' run does); evaluate its validation windows "
            f"({given_argument('held_out', 'val', quoted=False)})"
        )


def _run_validation_windows(
    run: RunConfig,
    checkpoint: str | Path,
    seq_len: int,
    batch_size: int | None,
    batches: int | None,
    tokenizer: Tokenizer | None = None,
    held_out: str = "val",
    overruled: str = "",
) -> EvaluationWindows:
    """The validation windows of ``run`` (the run beside ``checkpoint``; ``held_out="test"``: its test
    windows, :func:`_run_test_examples`); see :func:`evaluation_windows`. ``overruled``: why the
    checkpoint's record was read in place of the config.yaml beside it (:func:`_run_beside`), said in the
    windows' source and errors.
    They are tokenized with ``tokenizer``, by default the one ``checkpoint`` recorded (the tokenizer the
    model was trained with; ``data.tokenizer``'s files may have changed since) and named after it.

    A ``config.yaml`` (or checkpoint record) of an older innerloop may hold relative ``data.paths`` (a run
    now records them absolute): they are read from the current directory, and the windows' source says
    so, naming the file that records them."""
    batch_size = batch_size or run.data.batch_size
    count = None if batches is None else default_window_count(batch_size, batches)
    relative = [p for p in run.data.paths if not os.path.isabs(os.path.expanduser(p))]
    note = f"; {overruled}" if overruled else ""
    if relative:  # after the clause saying whose data.* they are, not in its place
        run = replace(run, data=replace(run.data, paths=absolute_data_paths(run.data.paths)))
        recorder = (
            "its config.yaml" if not overruled and run_config_path(checkpoint) else repr(str(checkpoint))
        )
        note += f"; {recorder} records relative data.paths {relative}, read from the current directory {os.getcwd()!r}"
    _check_the_runs_split(run, checkpoint, held_out)
    words = "validation" if held_out == "val" else "test"
    try:
        tokenizer = tokenizer if tokenizer is not None else checkpoint_tokenizer(checkpoint)
        if held_out == "test":
            inputs, targets = _run_test_examples(run, checkpoint, seq_len, count, tokenizer)
        else:
            read = _check_the_runs_cut(run, checkpoint, tokenizer)
            inputs, targets = validation_examples(run, seq_len, count, tokenizer, read)
        tag = _run_data_tag(run, tokenizer, held_out)
    except TextTooShortError as err:  # read, but too short: not "cannot be read"
        other = f", or other text ({given_argument('paths', 'FILES', placeholder=True)})"
        raise TextTooShortError(
            f"the run's {words} text ({_data_origin(checkpoint, overruled)}) has {err.length} {err.unit} (end-of-text "
            f"separators included), too few for one window of {given_argument('seq_len', seq_len, quoted=False)}, "
            f"which needs {err.needed}; give a shorter {argument_name('seq_len')}"
            f"{other if offers_argument('paths') else ''}{note}",
            err.length, err.needed, err.unit,
        ) from None  # fmt: skip
    except DataError as err:
        raise DataError(
            f"the run's {words} data ({_data_origin(checkpoint, overruled)}) cannot be read: {err}{note}"
        ) from None
    if run_config_path(checkpoint) is None:
        note += f"; as {str(checkpoint)!r} recorded them: no config.yaml beside it"
    source = f"the run's {words} windows ({_describe_data(run)}{note})"
    return EvaluationWindows(inputs, targets, batch_size, tag, source)


def _data_origin(checkpoint: str | Path, overruled: str = "") -> str:
    """Where the ``data.*`` of the run beside ``checkpoint`` were read from, for messages: its config.yaml,
    else (none there, or ``overruled``: another run's) the checkpoint's own record
    (:func:`_run_recorded_in`), with how to score other text."""
    saved = run_config_path(checkpoint)
    if overruled:
        return (
            f"data.* as {str(checkpoint)!r} recorded them, not the config.yaml beside it, another run's; "
            f"give {given_argument('paths', 'FILES', placeholder=True)} to evaluate on other text"
        )
    if saved is not None:
        return f"data.* of {str(saved)!r}"
    return (
        f"data.* as {str(checkpoint)!r} recorded them, no config.yaml beside it; give "
        f"{given_argument('paths', 'FILES', placeholder=True)} to evaluate on other text"
    )


def _run_test_examples(
    run: RunConfig, checkpoint: str | Path, seq_len: int, count: int | None, tokenizer: Tokenizer
) -> Batch:
    """A run's test windows (``data.test_fraction`` > 0), refused where its data changed so that they hold
    text the run trained on: one text file shortened (its test text now starts before the token the
    checkpoint recorded, ``test_cut``), ``hf`` test windows other than those recorded (``test_digest``).
    Text: ``count`` windows (default the run's ``val_batches * batch_size``) spread over the test text;
    ``hf``: the first ``count`` of the test documents' windows."""
    owner = TextDataModule if run.data.name == "text" else HFDataModule
    state = recorded_entry(checkpoint, owner.__qualname__)  # metadata only: the model's load verified it
    state = state if isinstance(state, dict) else {}
    count = count if count is not None else run.data.val_batches * run.data.batch_size
    module = build_datamodule(run, tokenizer)
    if isinstance(module, HFDataModule):
        module.setup("test")  # its test windows, checked against the recorded ones (validation's need not be)
        would = "they would score documents the run trained on"
        fix = f"evaluate on the data as it was, or on held-out data with {argument_name('paths')}"
        module.check_recorded_validation(state, would, fix, "test")
        if seq_len != module.seq_len or count != module.val_batches * module.batch_size:
            module = build_datamodule(
                replace(run, data=replace(run.data, seq_len=seq_len, batch_size=count, val_batches=1)),
                tokenizer,
            )
            try:
                module.setup("test")  # the test windows only: validation's need not fill one at this length
            except DataError as err:  # too short for eval's --seq-len, not for the run's data.seq_len
                given = argument_name("seq_len")
                said = str(err) if seq_len == run.data.seq_len else str(err).replace("data.seq_len", given)
                raise DataError(said) from None
        assert module.test_examples is not None
        return module.test_examples
    assert isinstance(module, TextDataModule)
    module.setup("test")
    recorded = state.get("test_cut")
    if isinstance(recorded, int) and module.test_cut is not None and module.test_cut < recorded:
        raise DataError(
            f"the data file {run.data.paths!r} is shorter than when the checkpoint was written: its test text "
            f"(data.test_fraction={run.data.test_fraction}) started at token {recorded} and now starts at token "
            f"{module.test_cut}, inside the text the run trained on; evaluate on the file as it was, or on "
            f"held-out files with {argument_name('paths')}"
        )
    assert module.test_bytes is not None
    name = argument_name("seq_len") if seq_len != run.data.seq_len else "data.seq_len"
    return spread_windows(module.test_bytes, seq_len, count, module.unit, "the test text", name)


def _check_the_runs_split(run: RunConfig, checkpoint: str | Path, held_out: str = "val") -> None:
    """Refuse to score a text run's validation (``held_out="test"``: test) windows when its files split
    otherwise than the checkpoint recorded (:func:`~innerloop.train.data.check_split_unchanged`): they
    would hold text it trained on. A checkpoint without the record (older, or of one file or the default
    corpus) is not checked."""
    if run.data.name != "text" or not run.data.paths:
        return
    state = recorded_entry(checkpoint, TextDataModule.__qualname__)  # metadata only (any checkpoint's)
    key = "validation_files" if held_out == "val" else "test_files"
    recorded = state.get(key) if isinstance(state, dict) else None
    data = run.data
    words = "validation" if held_out == "val" else "test"
    try:
        with one_walk_per_entry():  # the files found once for both
            files_now = len(split_keys(data.paths))
            current = (
                validation_file_keys(data.paths, data.val_fraction, data.test_fraction, held_out)
                if isinstance(recorded, list)
                else None
            )
    except DataError:  # files that cannot be found: reading the windows says so, with its context
        return
    check_split_kind_unchanged(state, files_now, f"Evaluating its {words} windows")
    if current is not None:
        check_split_unchanged(recorded, current, f"Evaluating its {words} windows", words)


def _check_the_runs_cut(
    run: RunConfig, checkpoint: str | Path, tokenizer: Tokenizer | None
) -> TextDataModule | None:
    """Refuse to score a run's validation windows on data changed so that they hold text the run trained
    on. One text file: shortened since the checkpoint recorded where its validation text started
    (``validation_cut``), its last ``data.val_fraction`` now starts inside the training text (a file
    appended to starts it later, in text the run never read: still held out). ``hf`` data: validation
    windows other than those the checkpoint recorded (``validation_digest``): documents were inserted or
    removed before them, moving documents between the sides. Returns the text data module it read (its
    held-out text is the windows' text: read and tokenized once), None where it read none."""
    if run.data.name not in ("text", "hf"):
        return None
    owner = TextDataModule if run.data.name == "text" else HFDataModule
    state = recorded_entry(checkpoint, owner.__qualname__)  # metadata only: the model's load verified it
    key = "validation_cut" if run.data.name == "text" else "validation_digest"
    recorded = state.get(key) if isinstance(state, dict) else None
    if not isinstance(recorded, (int, str)) or isinstance(recorded, bool):
        return None
    module = build_datamodule(run, tokenizer)
    module.setup("validate")
    if isinstance(module, HFDataModule):
        would = "they would score documents the run trained on"
        module.check_recorded_validation(
            state, would, f"evaluate on the data as it was, or on held-out data with {argument_name('paths')}"
        )
        return None
    assert isinstance(module, TextDataModule)
    if module.validation_cut is not None and module.validation_cut < recorded:
        raise DataError(
            f"the data file {run.data.paths!r} is shorter than when the checkpoint was written: its last "
            f"data.val_fraction={run.data.val_fraction}, held out for validation, started at token {recorded} "
            f"and now starts at token {module.validation_cut}, inside the text the run trained on; evaluate "
            f"on the file as it was, or on held-out files with {argument_name('paths')}"
        )
    return module


def _describe_data(run: RunConfig) -> str:
    data = run.data
    if data.name == "recall":
        return "the recall task"
    paths = repr(data.paths[:3])[:-1] + (f", ... {len(data.paths) - 3} more]" if len(data.paths) > 3 else "]")
    return f"data.name={data.name!r}, data.paths={paths}" if data.paths else "the default corpus"


_DATASET_SUFFIXES = sorted(suffix for suffix, builder in FORMATS.items() if builder != "text")
"""Suffixes of data files that a ``data.name='hf'`` run reads as records (their text field), a text run
as raw text (markup and all); compressed too (``.jsonl.gz``: :func:`~innerloop.data.hf.data_format`)."""


def _windows_of_files(
    paths: Sequence[str],
    run: RunConfig | None,
    why_not: str,
    seq_len: int,
    batch_size: int | None,
    batches: int | None,
    tokenizer: Tokenizer | None,
    split: str | None = None,
) -> EvaluationWindows:
    """The windows of the files ``paths`` (``--data``), read as ``run`` read its data; see
    :func:`evaluation_windows`. Without the run (``why_not`` says why) a dataset file (json, jsonl,
    parquet, csv, arrow) is refused: which way its model read such files is unknown."""
    batch_size = batch_size or DEFAULT_EVAL_BATCH_SIZE
    count = default_window_count(batch_size, batches)
    text_field = run.data.text_field if run is not None and run.data.name == "hf" else None
    if split is not None and text_field is None:
        raise ConfigError(
            f"{given_argument('split', split)} names a split of records, which a data.name='hf' run reads; "
            f"this model's {argument_name('paths')} is read as text (its run read text), which has no splits: "
            f"leave {argument_name('split')} out"
        )
    if run is None:
        dataset = next((f for f in resolve_files(paths) if data_format(f) not in (None, "text")), None)
        if dataset is not None:
            raise ConfigError(
                f"{given_argument('paths', str(dataset))}: a {data_suffix(dataset)} file is read as records (their text field) by "
                f"a data.name='hf' run and as raw text by a text run, and {why_not}, so how this model read "
                f"its data is unknown; evaluate the checkpoint beside its run's config.yaml, or give text "
                f"files (not {', '.join(_DATASET_SUFFIXES)})"
            )
    inputs, targets = evaluation_examples(
        paths, seq_len, count, tokenizer=tokenizer, text_field=text_field, split=split
    )
    if text_field is not None:
        source = f"the given files' {text_field!r} field, read as this data.name='hf' run reads its data"
        source += f", split {split!r}" if split is not None else ""
    else:
        source = "the given files, read as text"
    reading = (text_field or "") + (f"\nsplit={split}" if split is not None else "")  # in the files' names
    return EvaluationWindows(inputs, targets, batch_size, _data_tag(paths, reading), source)


@dataclass(frozen=True)
class RunFiles:
    """The files a run's data read, resolved, as its ``data.paths`` find them now: those it trained on
    and those it held out. ``tail``: a text run of one file trained on the first ``1 - tail`` of it and
    held out the rest (both sets hold the file). ``resplit``: the checkpoint records other held-out files
    than the files split into now (files added, removed or renamed since; ``held_out`` is the record's).
    ``records``: a ``data.name='hf'`` run, which holds out documents within its files (every file is in
    ``training``)."""

    training: frozenset[Path]
    held_out: frozenset[Path]
    tail: float | None = None
    resplit: bool = False
    records: bool = False

    def trained_on(self, files: Iterable[Path], tail: float | None = None) -> list[Path]:
        """Which of ``files`` (resolved) hold text this run trained on, sorted: its training files, and
        byte-identical copies of them elsewhere (not a file it held out itself). ``tail``: the files are
        one file's last ``tail`` (a one-file run's held-out text); within a one-file run's own held-out
        tail (``tail <= self.tail``) nothing is its training text, past it (or in a whole file: ``tail``
        None) a one-file run's first ``1 - self.tail`` is, of its file or of a copy of it."""
        if tail is not None and self.tail is not None and tail <= self.tail:
            return []
        given = set(files)
        same = self.training.intersection(given)
        # a file this run held out itself stays held out, whatever copy of its bytes it trained on (a
        # corpus may hold identical small files, e.g. the same one-line __init__.py in two packages)
        others = given - same - self.held_out
        return sorted(same | _copies_among(others, self.training))

    def describe(self, files: Sequence[Path]) -> str:
        """``files`` (of :meth:`trained_on`) in words: which part of them the run trained on, and which
        are byte-identical copies of its training files rather than those files."""
        names = [str(f) for f in files[:3]] + ([f"... {len(files) - 3} more"] if len(files) > 3 else [])
        copies = sum(1 for f in files if f not in self.training)
        copied = (
            ""
            if not copies
            else f" ({'a byte-identical copy' if copies == 1 else 'byte-identical copies'} of what it trained on)"
        )
        if self.tail is not None:
            return f"the first {1 - self.tail:.0%} of {names[0]!r}{copied}"
        return (f"the records it did not hold out of {names}" if self.records else repr(names)) + copied


def _copies_among(candidates: set[Path], originals: frozenset[Path]) -> set[Path]:
    """Those of ``candidates`` whose bytes are one of ``originals``' (the sizes compared first, then the
    SHA-256 of the files of equal size)."""
    by_size: dict[int, list[Path]] = {}
    for original in originals:
        with contextlib.suppress(OSError):
            size = original.stat().st_size
            if size > 0:  # an empty file holds no text to have trained on
                by_size.setdefault(size, []).append(original)
    digests: dict[Path, str] = {}  # each original hashed once, and only where a candidate has its size
    copies = set()
    for candidate in candidates:
        try:
            same_size = by_size.get(candidate.stat().st_size, [])
            if not same_size:
                continue
            for original in same_size:
                digests.setdefault(original, file_sha256(original))
            if file_sha256(candidate) in {digests[original] for original in same_size}:
                copies.add(candidate)
        except OSError:
            continue  # gone or unreadable: reading the windows says so
    return copies


def run_files(
    data: DataConfig, recorded_held_out: Sequence[str] | None = None, held_out: str = "val"
) -> RunFiles | None:
    """:class:`RunFiles` of a run's ``data`` (the default corpus for a text run without paths);
    ``recorded_held_out``: the split keys of the files its checkpoint records holding out (its
    ``validation_files``; ``test_files`` for ``held_out="test"``), else they are split as now. None for
    the recall task, and for data.paths that find no files now (reading them says so). ``held_out``:
    whether :attr:`RunFiles.held_out` are its validation files or its test files (``data.test_fraction``
    > 0); neither is in :attr:`RunFiles.training`. One file: ``tail`` is all it held out, both."""
    if data.name not in ("text", "hf"):
        return None
    try:
        if data.name == "hf":
            found = _run_data_files(replace(RunConfig(), data=data))
            return RunFiles(frozenset(f.resolve() for f in found), frozenset(), records=True)
        keys = split_keys(absolute_data_paths(data.paths)) if data.paths else None
    except (DataError, ConfigError, OSError):
        return None
    files = sorted(keys) if keys is not None else stdlib_files()
    if len(files) == 1:
        one = frozenset(p.resolve() for p in files)
        return RunFiles(one, one, tail=held_out_share(data.val_fraction, data.test_fraction))
    others, test, split_on = split_test_files(files, data.val_fraction, data.test_fraction, keys)
    val = split_text_files(others, data.val_fraction, split_on)[1]
    held = test if held_out == "test" else val
    resplit = False
    if recorded_held_out is not None and keys is not None:
        resplit = sorted(keys[p] for p in held) != sorted(recorded_held_out)
        held = [p for p in files if keys[p] in recorded_held_out]
    other = test if held_out == "val" else val  # held out too: trained on neither
    not_trained = frozenset(p.resolve() for p in [*held, *other])
    held_set = frozenset(p.resolve() for p in held)
    return RunFiles(frozenset(p.resolve() for p in files) - not_trained, held_set, resplit=resplit)


def recorded_data_state(checkpoint: str | Path) -> dict[str, Any]:
    """What the checkpoint's :class:`TextDataModule` recorded (``validation_files``,
    ``training_digest``; empty when nothing)."""
    state = recorded_entry(checkpoint, TextDataModule.__qualname__)  # metadata only: no tensor is read
    return dict(state) if isinstance(state, dict) else {}


def _warn_of_evaluating_training_text(
    checkpoint: str | Path, run: RunConfig | None, paths: Sequence[str]
) -> None:
    """A warning when files of ``paths`` (``--data``) hold text the run of ``checkpoint`` trained on: its
    loss on them is not a held-out one."""
    if run is None:
        return
    recorded = recorded_data_state(checkpoint).get("validation_files") if run.data.name == "text" else None
    files = run_files(run.data, recorded if isinstance(recorded, list) else None)
    trained = files.trained_on(resolve_files(paths)) if files is not None else []
    if trained:
        source = "its run's data.paths" if run.data.paths else "the built-in corpus, its run's data"
        log.warning(
            "%s was trained on %s (%s), which %s evaluates on: its loss there is not a held-out one",
            str(checkpoint),
            files.describe(trained),
            source,
            argument_name("paths"),
        )


def _run_data_tag(run: RunConfig, tokenizer: Tokenizer | None = None, held_out: str = "val") -> str:
    """``default-val`` for a run on the default corpus's usual split in bytes (the windows
    ``evaluation_examples`` gives too), else ``<data.name>-val-<hash>`` of the data config, of the data
    files' paths, sizes and modification times (:func:`_files_fingerprint`) and of the ``tokenizer`` the
    windows were made with: data files or a tokenizer that change give another name."""
    data = run.data
    in_bytes = tokenizer is None or tokenizer == ByteTokenizer()
    default_split = (
        data.name == "text" and not data.paths and data.val_fraction == TextDataModule().val_fraction
    )
    if default_split and in_bytes and held_out == "val" and data.test_fraction == 0:
        return "default-val"
    varying = {"data.seq_len", "data.batch_size", "data.val_batches"}  # in the name as T and n
    settings = {k: v for k, v in run_data_record(run).items() if k.startswith("data.") and k not in varying}
    key = repr(sorted(settings.items())) + _files_fingerprint(_run_data_files(run))
    if not in_bytes and data.name != "recall":
        key += json.dumps(tokenizer.to_state(), sort_keys=True)
    return f"{data.name}-{held_out}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def _run_data_files(run: RunConfig) -> list[Path]:
    """The files ``run``'s data reads (none for recall and the default corpus)."""
    data = run.data
    if data.name == "recall" or not data.paths:
        return []
    if data.name == "text":
        return resolve_files(data.paths)
    return source_files(data.paths)


def _files_fingerprint(files: Sequence[Path]) -> str:
    """Each file's resolved path and :func:`~innerloop.data.atomic.file_stamp` (inode, modification time,
    size, change time): what changes when a file is rewritten, without reading it, ``cp -p`` of other
    content of the same size too (which keeps the modification time: the evaluation of the new content
    wrote over the old one's file)."""
    return "\n".join(f"{f.resolve()}\0{file_stamp(f)}" for f in files)


def evaluate(
    checkpoint: str | Path,
    paths: Sequence[str] = (),
    seq_len: int | None = None,
    batch_size: int | None = None,
    batches: int | None = None,
    out_dir: str | Path | None = None,
    progress_bar: bool = True,
    no_ttt: bool = False,
    split: str | None = None,
    held_out: str = "val",
) -> tuple[dict[str, Any], Path | None, Path | None]:
    """Perplexity and loss by position of a checkpoint, on :func:`evaluation_windows` (by default the
    windows its run's validation read). ``seq_len`` defaults to the training one. With ``no_ttt``, the
    same weights with test-time training off (:func:`~innerloop.models.ablation.no_test_time_training`).
    ``split``: the split of ``paths`` read as records (``--split``, see :func:`evaluation_windows`).
    ``held_out="test"`` (``--held-out test``): the run's test windows instead (``data.test_fraction``).
    Returns ``(metrics, csv, png)``; ``metrics`` also has ``tokens`` (scored) and ``windows``.

    When ``out_dir`` is given, writes ``eval_<checkpoint>_<data>_T<seq_len>_n<windows>.csv``, ``.png``
    and ``.md`` (:func:`evaluation_record`: how to reproduce it) there (see :func:`evaluation_stem`): named after what was evaluated, so evaluations of other
    checkpoints, data or settings do not replace each other, and never the training run's own ``loss_by_position.*``.
    """
    given = (seq_len, batch_size, batches)
    paths, seq_len, batch_size, batches = _eval_args(paths, *given, no_ttt, out_dir, progress_bar, held_out)
    module = load_module(checkpoint)
    _refuse_no_ttt_without_ttt(module, checkpoint, no_ttt)  # before any window is read
    seq_len = training_seq_len(module, checkpoint) if seq_len is None else seq_len
    tokenizer = checkpoint_tokenizer(checkpoint)
    windows = evaluation_windows(
        checkpoint, module, paths, seq_len, batch_size, batches, tokenizer, split, held_out
    )
    inputs, targets = windows.inputs, windows.targets
    count = counted(len(inputs), "window")
    print(f"evaluating {count} of {seq_len} tokens from {windows.source} ({windows.tag})", flush=True)
    if paths:
        _warn_of_evaluating_training_text(
            checkpoint, run_of_checkpoint(checkpoint, module.hparams["model"]), paths
        )
    check_vocabulary(module, inputs, targets, tokenizer)
    loader = DataLoader(FixedExamples(inputs, targets), batch_size=windows.batch_size, shuffle=False)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=progress_bar, enable_model_summary=False,
    )  # fmt: skip
    with no_test_time_training(module.model) if no_ttt else nullcontext():
        with ended_by_signals("during the evaluation; nothing was written"):  # not Lightning's bare exit 1
            results = trainer.validate(module, dataloaders=loader, verbose=False)[0]
    metrics = {k: float(v) for k, v in results.items()}
    metrics["tokens"] = float((targets != IGNORE_INDEX).sum())
    metrics["windows"] = float(len(inputs))
    if out_dir is None:
        return metrics, None, None
    how = (paths, seq_len, batches, split, held_out, no_ttt, out_dir)
    csv_path, png = _write_evaluation_of(checkpoint, module, windows, metrics, how)
    return metrics, csv_path, png


def _write_evaluation_of(
    checkpoint: str | Path,
    module: LanguageModelModule,
    windows: EvaluationWindows,
    metrics: dict[str, float],
    how: tuple[Any, ...],
) -> tuple[Path, Path]:
    """:func:`evaluate`'s files of ``windows`` scored to ``metrics`` (:func:`_write_evaluation`); ``how``:
    its arguments, which the ``Reproduce:`` command gives again (:func:`_eval_command`)."""
    paths, seq_len, _, _, _, no_ttt, out_dir = how
    buckets = position_buckets(seq_len, module.hparams.num_position_buckets)
    losses = [metrics[f"val_loss_pos/{b}"] for b in range(len(buckets))]
    tag = windows.tag
    stem = evaluation_stem(checkpoint_identity(checkpoint), paths, seq_len, len(windows.inputs), tag, no_ttt)
    ablation = ", test-time training off" if no_ttt else ""
    title = f"{Path(checkpoint).name} on {tag}, T={seq_len}{ablation}: loss by position"
    record = evaluation_record(title, metrics, checkpoint, windows, _eval_command(checkpoint, windows, *how))
    return _write_evaluation(user_path(out_dir) / stem, buckets, losses, title, metrics, record)


def reproduction_header() -> str:
    """The first line of a result's ``Reproduce:`` lines: the innerloop, torch and Python versions and
    torch's thread count (a sum's order, so its last digits, may follow the threads)."""
    return (
        f"innerloop {innerloop_version()}, torch {torch.__version__}, Python {platform.python_version()}, "
        f"{counted(torch.get_num_threads(), 'torch thread')}"
    )


def windows_reproduce_line(windows: EvaluationWindows) -> str:
    """A ``Reproduce:`` line of ``windows`` (eval's and compare's): their length, count and
    :func:`tokens_digest`, e.g. ``T=32: 1 window, tokens SHA-256 0123456789abcdef``."""
    return f"T={windows.inputs.shape[1]}: {counted(len(windows.inputs), 'window')}, tokens SHA-256 {tokens_digest(windows)}"


def tokens_digest(windows: EvaluationWindows) -> str:
    """16 hex digits of the SHA-256 of ``windows``' inputs and targets (shape, dtype and values)."""
    digest = hashlib.sha256()
    for tokens in (windows.inputs, windows.targets):
        digest.update(f"{tuple(tokens.shape)}:{tokens.dtype}\0".encode())
        digest.update(tokens.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def scored_count(metrics: dict[str, float]) -> str:
    """What an evaluation scored, as its line and its ``.md`` say it: ``"128 tokens in 1 window"``,
    ``"4096 tokens in 32 windows"`` (``metrics``' ``tokens`` and ``windows``, of :func:`evaluate`)."""
    tokens, windows = int(metrics["tokens"]), int(metrics["windows"])
    return f"{counted(tokens, 'token')} in {counted(windows, 'window')}"


def evaluation_record(
    title: str, metrics: dict[str, float], checkpoint: str | Path, windows: EvaluationWindows, command: str
) -> str:
    """An evaluation's ``<stem>.md``: its title, perplexity and loss, and under ``Reproduce:`` the versions
    (:func:`reproduction_header`), the checkpoint's path and content SHA-256, the windows' count and
    SHA-256 (:func:`windows_reproduce_line`) and the ``innerloop eval`` command that scores them again."""
    lines = [
        reproduction_header(),
        f"{os.path.abspath(checkpoint)} (content SHA-256 {checkpoint_content_digest(checkpoint)[:16]})",
        windows_reproduce_line(windows),
        f"command (in {os.getcwd()}): `{command}`",
    ]
    return (
        f"# {title}\n\nperplexity {metrics['val_ppl']:.6g} (loss {metrics['val_loss']:.6f}, "
        f"{scored_count(metrics)})\n\nReproduce:\n\n" + "".join(f"- {line}\n" for line in lines)
    )


def _eval_command(
    checkpoint: str | Path,
    windows: EvaluationWindows,
    paths: Sequence[str],
    seq_len: int,
    batches: int | None,
    split: str | None,
    held_out: str,
    no_ttt: bool,
    out_dir: str | Path,
) -> str:
    """The ``innerloop eval`` command line of :func:`evaluation_record`: the plugin modules loaded with
    ``-p``, the checkpoint and ``--out`` as absolute paths, the batch size as resolved, the rest as given."""
    words = [
        "innerloop",
        *plugin_module_options(),
        "eval",
        os.path.abspath(checkpoint),
        "--seq-len",
        str(seq_len),
    ]
    words += ["--batch-size", str(windows.batch_size)] + (
        [] if batches is None else ["--batches", str(batches)]
    )
    words += ["--data", *map(str, paths)] if paths else []
    words += ([] if split is None else ["--split", split]) + (
        ["--held-out", held_out] if held_out != "val" else []
    )
    words += (["--no-ttt"] if no_ttt else []) + ["--out", os.path.abspath(user_path(out_dir))]
    return " ".join(shlex.quote(word) for word in words)


def _refuse_no_ttt_without_ttt(module: LanguageModelModule, checkpoint: str | Path, no_ttt: bool) -> None:
    """:class:`ConfigError` for ``no_ttt`` of a model without test-time training to switch off."""
    if no_ttt and not modules_learning_at_test_time(module.model):
        raise ConfigError(
            f"{argument_name('no_ttt')}: {str(checkpoint)!r} has no test-time training to switch off "
            f"(model.mixer={module.model.config.mixer!r})"
        )
    refusal = zero_lr_refusal(module.model) if no_ttt else None
    if refusal is not None:
        raise ConfigError(f"{argument_name('no_ttt')}: {str(checkpoint)!r}: {refusal}")


def _eval_args(
    paths: Any,
    seq_len: Any,
    batch_size: Any,
    batches: Any,
    no_ttt: Any,
    out_dir: Any,
    progress_bar: Any,
    held_out: Any = "val",
) -> tuple[list[str], int | None, int | None, int | None]:
    """:func:`evaluate`'s arguments, checked before anything is read; returns ``paths`` as a list (one
    path is a list of one, not its letters; None, as no paths: the run's own windows) and the sizes as
    ints (:func:`~innerloop.train.data.checked_window_sizes`)."""
    sizes = checked_window_sizes(seq_len=seq_len, batch_size=batch_size, batches=batches)
    check_flag("no_ttt", no_ttt)
    check_flag("progress_bar", progress_bar)  # a string such as 'no' would show it
    check_held_out_name(held_out)
    if out_dir is not None:
        check_output_dir(out_dir, "out_dir")  # a file there failed after the evaluation
    return ([] if paths is None else path_entries(paths, "paths")), *sizes


def _write_evaluation(
    stem: Path,
    buckets: Sequence[tuple[int, int]],
    losses: Sequence[float],
    title: str,
    metrics: dict[str, float],
    record: str,
) -> tuple[Path, Path]:
    """Write an evaluation's ``<stem>.csv``, ``.png`` and ``.md`` (:func:`evaluation_record`; atomically), first removing the temporary
    files a killed earlier write of them left; returns their paths. A write that fails (a full disk)
    raises an ``OSError`` that also gives the evaluation's ``metrics``: they are not lost with the files."""
    try:
        return _write_evaluation_files(stem, buckets, losses, title, record)
    except OSError as err:
        finished = (
            f"the evaluation had finished: perplexity {metrics['val_ppl']:.3f} (loss {metrics['val_loss']:.4f}, "
            f"{counted(int(metrics['tokens']), 'token')})"
        )
        raise _with_words(err, finished) from err


def _with_words(err: OSError, words: str) -> OSError:
    """``err`` again, of its class (a FolderInTheWayError stays one), with ``words`` after its message and
    its errno and file name kept (``[Errno 28] No space left on device; <words>: '<file>'``)."""
    if err.errno is None:  # OSError("a message"): no errno to show
        return type(err)(f"{err}; {words}")
    filename = () if err.filename is None else (err.filename,)
    try:
        return type(err)(err.errno, f"{err.strerror}; {words}", *filename)
    except TypeError:  # a subclass with a constructor of its own: the words as a note
        err.add_note(words)
        return err


def _write_evaluation_files(
    stem: Path, buckets: Sequence[tuple[int, int]], losses: Sequence[float], title: str, record: str
) -> tuple[Path, Path]:
    csv_target, png_target = stem.with_name(f"{stem.name}.csv"), stem.with_name(f"{stem.name}.png")
    md_target = stem.with_name(f"{stem.name}.md")
    # a killed earlier evaluation of the same one left them
    remove_stale_temporaries_of([csv_target, png_target, md_target])
    csv_path = write_loss_by_position_csv(csv_target, buckets, losses)
    png = plot_loss_by_position(png_target, buckets, losses, title=title)
    atomic_write_text(md_target, record)
    return csv_path, png


def check_vocabulary(
    module: LanguageModelModule,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    tokenizer: Tokenizer,
    model: str = "the model",
) -> None:
    """Raise :class:`DataError` when the windows hold a token the model's vocabulary does not
    (``model``: which model, in the message)."""
    vocab_size = module.model.config.vocab_size
    largest = max(int(inputs.max()), int(targets.max()))  # targets' ignored ones are < 0
    if largest >= vocab_size:
        raise DataError(
            f"the data has token {largest}, but {model}'s vocabulary has {vocab_size} tokens "
            f"(0..{vocab_size - 1}): it cannot read these tokens ({tokenizer.describe()})"
        )


def evaluation_stem(
    checkpoint_id: str,
    paths: Sequence[str],
    seq_len: int,
    windows: int,
    data_tag: str | None = None,
    no_ttt: bool = False,
) -> str:
    """File name (without suffix) of an evaluation's outputs:
    ``eval_<checkpoint>_<data>_T<seq_len>_n<windows>``, e.g. ``eval_last-1a2b3c4d_default-val_T32_n16``,
    with ``_no-ttt`` at the end for an evaluation with test-time training off.

    ``<checkpoint>`` is :func:`~innerloop.checkpoints.checkpoint_identity` (file stem and content
    checksum prefix: two checkpoints never share a name, and evaluating the same one with the same
    settings again rewrites only its own file). ``<data>`` is ``data_tag`` when given (the run's
    validation data, see :func:`evaluation_windows`), ``default-val`` for the default corpus's
    validation split, else the first file's name and a short hash of all the files evaluated (so other
    files of the same name differ).
    """
    tag = data_tag if data_tag is not None else _data_tag(paths)
    return f"eval_{checkpoint_id}_{tag}_T{seq_len}_n{windows}{'_no-ttt' if no_ttt else ''}"


def _data_tag(paths: Sequence[str], reading: str = "") -> str:
    """``default-val`` without paths, else the first file's name, ``+<more files>`` and a hash of the
    files' :func:`_files_fingerprint` and of ``reading`` (how they are read: the text field, or "")."""
    if not paths:
        return "default-val"
    files = resolve_files(paths)
    key = f"{reading}\n{_files_fingerprint(files)}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    name = name_tag(files[0].stem, "data")
    return f"{name}{f'+{len(files) - 1}' if len(files) > 1 else ''}-{digest}"


def training_seq_len(module: LanguageModelModule, checkpoint: str | Path) -> int:
    """The seq_len ``module`` was trained with, from the checkpoint's own hyperparameters (never from a
    config.yaml beside the file, which a copied checkpoint may not have or may have another run's);
    128, said in one printed line, for a checkpoint that does not record it."""
    seq_len = module.hparams.get("seq_len")
    if isinstance(seq_len, int) and seq_len >= 1:
        return seq_len
    why = (
        "written by an older innerloop, or saved before a training step by a LanguageModelModule built "
        "without seq_len"
        if holds_training_state(checkpoint)
        else "a model that innerloop did not train, e.g. one made by `innerloop convert`"
    )
    print(
        f"{str(checkpoint)!r} records no training seq_len ({why}): evaluating at {DEFAULT_EVAL_SEQ_LEN} "
        f"tokens per window; give {argument_name('seq_len')} to choose"
    )
    return DEFAULT_EVAL_SEQ_LEN
