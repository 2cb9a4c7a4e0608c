"""From a validated :class:`RunConfig` to a trained checkpoint, and back to an evaluation.

``train(run)`` writes into ``run.out_dir``:

- ``config.yaml``: the resolved config (written before training starts, so even a killed run has it);
- ``last.safetensors``: the checkpoint (every ``trainer.checkpoint_every`` steps and at the end; see
  :class:`_SafetensorsModelCheckpoint` for when a new one replaces it);
- ``.innerloop.lock``: the lock a run holds on its out_dir (:mod:`innerloop.train.run_dir`);
- ``logs/version_<n>/metrics.csv``: what was logged, one folder per launch (Lightning's CSVLogger);
- ``loss_by_position.csv`` and ``loss_by_position.png``: the final validation loss by position.

``evaluate`` (``innerloop eval``) writes its own ``eval_*.csv/.png`` beside them and never replaces these.

``train(run, resume=True)`` continues from ``last.safetensors`` to the same result as a run that was
never interrupted (batches are a function of the step, see :mod:`innerloop.train.data`); ``optim.*``
and ``trainer.*`` may differ from the saved config and apply from the step reached, ``model.*``,
``data.*`` and ``seed`` may not. A run owns its out_dir while it runs (see
:mod:`innerloop.train.run_dir`: one run at a time, no run replaced without ``overwrite=True``), and a
run whose loss or weights become NaN or inf stops with :class:`TrainingDivergedError`, its last good
checkpoint kept.

Multi-process training is Lightning's: ``trainer.strategy=ddp`` (or ``ddp_spawn``, ``fsdp``) with
``trainer.devices=N``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from innerloop.config.load import (
    ConfigError,
    check_resume_changes,
    concrete_precision,
    decay_steps,
    flatten_config,
    load_config,
    save_config,
    warmup_steps,
)
from innerloop.config.schema import RunConfig
from innerloop.models import ModelConfig
from innerloop.train.checkpoint import (
    CHECKPOINT_SUFFIX,
    CheckpointError,
    SafetensorsCheckpointIO,
    checkpoint_identity,
    load_training_checkpoint,
)
from innerloop.train.data import (
    IGNORE_INDEX,
    DataError,
    FixedExamples,
    RecallDataModule,
    TextDataModule,
    evaluation_examples,
    resolve_files,
)
from innerloop.train.loggers import _CSVLogger as _CSVLogger  # re-exported from its first home
from innerloop.train.loggers import build_loggers
from innerloop.train.metrics import position_buckets
from innerloop.train.module import LanguageModelModule, TrainingDivergedError, load_module
from innerloop.train.plots import plot_loss_by_position, write_loss_by_position_csv
from innerloop.train.run_dir import (
    PENDING_CHECKPOINT,
    is_launched_worker,
    lock_run_dir,
    refuse_previous_run,
    remove_previous_run,
    remove_stale_temporaries,
)
from innerloop.train.schedules import TTTBaseLRWarmup

CHECKPOINT_NAME = "last"


class _SafetensorsModelCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint writing ``last.safetensors`` (the IO plugin does the format), always at
    the end of training (Lightning skips that save if any "last" was written before), and only weights
    known to be good.

    Weights or optimizer moments holding NaN or inf are never saved (the run stops as diverged). The
    checkpoint of step ``k`` is written to ``.last.safetensors.pending`` and replaces ``last.safetensors``
    once the loss of step ``k + 1``, computed from those weights, is finite (or at the end, or on a crash
    that is not a divergence): a diverged run keeps a checkpoint that a resume with a lower lr can go on
    from, not weights whose next loss is already NaN.
    """

    FILE_EXTENSION = CHECKPOINT_SUFFIX
    _pending: tuple[Path, Path] | None = None  # (written, to replace)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        module = trainer.lightning_module
        moments = [v for o in trainer.optimizers for s in o.state.values() for v in s.values()]
        tensors = [*module.parameters(), *(v for v in moments if isinstance(v, torch.Tensor))]
        if not all(bool(torch.isfinite(t).all()) for t in tensors):
            raise module.diverged(
                f"the weights or optimizer state hold NaN or inf after {trainer.global_step} optimizer steps"
            )
        pending = Path(filepath).parent / PENDING_CHECKPOINT
        super()._save_checkpoint(trainer, str(pending))
        self._pending = (pending, Path(filepath))

    def _promote(self, trainer: L.Trainer) -> None:
        if self._pending is not None and trainer.is_global_zero:
            os.replace(*self._pending)
        self._pending = None

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        self._promote(trainer)  # the training step found the loss of the pending weights finite

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._promote(trainer)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, TrainingDivergedError):
            if self._pending is not None and trainer.is_global_zero:
                self._pending[0].unlink(missing_ok=True)
            self._pending = None
        else:
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


def build_datamodule(run: RunConfig) -> TextDataModule | RecallDataModule:
    """The DataModule named by ``run.data.name``."""
    data = run.data
    if data.name == "recall":
        return RecallDataModule(
            data.recall.num_pairs, data.recall.gap, data.batch_size, data.val_batches, run.seed
        )
    return TextDataModule(
        data.paths, data.seq_len, data.batch_size, data.val_fraction, data.val_batches, run.seed
    )


def build_module(run: RunConfig) -> LanguageModelModule:
    """The LightningModule for ``run``'s model and optimizer settings."""
    optim = run.optim
    return LanguageModelModule(
        model=asdict(run.model),
        lr=optim.lr,
        weight_decay=optim.weight_decay,
        betas=(optim.beta1, optim.beta2),
        warmup_steps=warmup_steps(run),
        max_steps=run.trainer.max_steps,
        min_lr=optim.min_lr,
        num_position_buckets=run.trainer.num_position_buckets,
        diagnostics_batches=run.trainer.diagnostics_batches,
        seq_len=build_datamodule(run).seq_len,  # data.seq_len, or the one the recall task derives
        schedule=optim.schedule,
        decay_steps=decay_steps(run),
    )


def resolve_precision(precision: str, accelerator: str) -> str:
    """``trainer.precision`` made concrete (:func:`innerloop.config.load.concrete_precision`); when it
    was ``auto``, says what it chose in one printed line."""
    chosen = concrete_precision(precision, accelerator)
    if precision == "auto":
        where = "a CUDA GPU" if chosen == "bf16-mixed" else "no CUDA GPU"
        print(f"trainer.precision=auto: {chosen} ({where} for accelerator={accelerator})")
    return chosen


def build_trainer(run: RunConfig, callbacks: Sequence[Callback] = ()) -> L.Trainer:
    """A Lightning Trainer that checkpoints to ``run.out_dir/last.safetensors`` in safetensors, logs
    with ``run.logger`` and takes the other Lightning arguments of ``run.trainer.lightning`` as given.
    Lightning's refusal of a setting is a :class:`ConfigError` naming those arguments."""
    t = run.trainer
    checkpointing = _SafetensorsModelCheckpoint(
        dirpath=run.out_dir,
        save_last=True,
        save_top_k=0,
        every_n_train_steps=t.checkpoint_every,
        enable_version_counter=False,
    )
    checkpointing.CHECKPOINT_NAME_LAST = CHECKPOINT_NAME
    own_callbacks: list[Callback] = [checkpointing]
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
        callbacks=[*own_callbacks, *callbacks],
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


def train(
    run: RunConfig,
    cfg: DictConfig | None = None,
    resume: bool = False,
    callbacks: Sequence[Callback] = (),
    overwrite: bool = False,
) -> TrainResult:
    """Train ``run`` (already validated, e.g. by :func:`innerloop.config.load_config`); see the module doc.

    ``cfg`` is the omegaconf form to save (the run itself is saved if not given); ``callbacks`` are
    extra Lightning callbacks. The run holds a lock on ``run.out_dir`` until it returns (a second run
    there raises :class:`~innerloop.train.run_dir.RunDirError`), removes the temporary files a killed
    run left there, and refuses an out_dir that holds a run unless ``resume`` (continue it) or
    ``overwrite`` (replace it). A resume is checked against the checkpoint and the saved config before
    anything is written. A diverging run raises :class:`TrainingDivergedError`, keeping its last
    finite checkpoint.
    """
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: continue the run or replace it")
    out_dir = Path(run.out_dir)
    if is_launched_worker():  # rank > 0 under Lightning's DDP launcher: rank 0 owns the out_dir
        return _train_in_locked_dir(run, cfg, resume, callbacks, replace_previous=False)
    with lock_run_dir(out_dir), _torch_flags_restored():
        remove_stale_temporaries(out_dir)
        if not resume and not overwrite:
            refuse_previous_run(out_dir)
        return _train_in_locked_dir(run, cfg, resume, callbacks, replace_previous=overwrite)


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
    L.seed_everything(run.seed, workers=True, verbose=False)
    module = build_module(run)
    if resume:
        _check_resume(run, module, ckpt)
    datamodule = build_datamodule(run)
    trainer = build_trainer(run, callbacks)
    if replace_previous:
        remove_previous_run(out_dir)
    if run.trainer.threads > 0:
        torch.set_num_threads(run.trainer.threads)
    config_path = save_config(cfg if cfg is not None else run, out_dir / "config.yaml")
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if resume else None)
    except TrainingDivergedError as err:
        raise TrainingDivergedError(f"{err}; {_last_checkpoint_note(ckpt, run)}") from None
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    # Validate once more unless the last validation was at the last step. (Compared with max_steps: after
    # ddp_spawn the main process has the workers' metrics but not their step counter.)
    if metrics.get("val_step") != run.trainer.max_steps:
        metrics = {
            k: float(v) for k, v in trainer.validate(module, datamodule=datamodule, verbose=False)[0].items()
        }
    plot, csv_path = _write_loss_by_position(run, metrics, datamodule.seq_len)
    return TrainResult(out_dir, ckpt, config_path, plot, csv_path, metrics)


@contextlib.contextmanager
def _torch_flags_restored() -> Iterator[None]:
    """Restore torch's process-wide flags that ``trainer.deterministic`` and ``trainer.benchmark`` set
    (Lightning sets them for the run and leaves them set), so that one run's settings do not carry over
    to what the process does next."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark = torch.backends.cudnn.benchmark
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.cudnn.benchmark = benchmark


def _write_loss_by_position(run: RunConfig, metrics: dict[str, float], seq_len: int) -> tuple[Path, Path]:
    """``loss_by_position.png`` and ``.csv`` of the final validation, in ``run.out_dir``."""
    out_dir = Path(run.out_dir)
    buckets = position_buckets(seq_len, run.trainer.num_position_buckets)
    losses = [metrics[f"val_loss_pos/{b}"] for b in range(len(buckets))]
    csv_path = write_loss_by_position_csv(out_dir / "loss_by_position.csv", buckets, losses)
    steps = int(metrics["val_step"])
    title = f"{run.model.mixer} ({run.model.backbone}), {steps} steps: validation loss by position"
    plot = plot_loss_by_position(out_dir / "loss_by_position.png", buckets, losses, title=title)
    return plot, csv_path


def _check_resume(run: RunConfig, module: LanguageModelModule, ckpt: Path) -> None:
    """Raise :class:`ConfigError` or :class:`CheckpointError` unless ``run`` can continue from ``ckpt``:
    the checkpoint reads and holds ``run``'s model (weights of the right shapes), the config saved beside
    it differs from ``run`` only where a resume may change it, and ``trainer.max_steps`` is not behind
    the checkpoint. Reads only."""
    if not ckpt.exists():
        raise CheckpointError(
            f"--resume: there is no checkpoint {str(ckpt)!r} (a run killed before its first checkpoint "
            "leaves none); start the run again with --overwrite"
        )
    checkpoint = load_training_checkpoint(ckpt)
    saved_config = ckpt.parent / "config.yaml"
    if saved_config.is_file():
        saved, _ = load_config(str(saved_config))
        check_resume_changes(saved, run)
    _check_same_model(run.model, checkpoint, ckpt)
    _check_weights_fit(module, checkpoint["state_dict"], ckpt)
    step = checkpoint.get("global_step")
    if isinstance(step, int) and run.trainer.max_steps < step:
        raise ConfigError(
            f"trainer.max_steps={run.trainer.max_steps} is below the checkpoint's step {step}; --resume "
            f"can only extend a run (trainer.max_steps >= {step})"
        )


def _check_same_model(model: ModelConfig, checkpoint: dict[str, Any], ckpt: Path) -> None:
    """Raise :class:`CheckpointError` unless ``checkpoint`` holds weights of the model ``model`` describes
    (its stored model config, defaults filled in, equals ``model``); name the keys that differ."""
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
    changes = [f"{key} ({old[key]!r} -> {new[key]!r})" for key in new if old[key] != new[key]]
    if changes:
        raise CheckpointError(f"{str(ckpt)!r} holds another model than this run's: {', '.join(changes)}")


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


def _last_checkpoint_note(ckpt: Path, run: RunConfig) -> str:
    """What a diverged run leaves: its last checkpoint and how to continue it."""
    if not ckpt.is_file():
        return "no checkpoint was written"
    try:
        step = load_training_checkpoint(ckpt)["global_step"]
    except (CheckpointError, KeyError):
        return f"the checkpoint {str(ckpt)!r} could not be read back"
    return (
        f"the last checkpoint, {str(ckpt)!r} (after {step} steps), is kept: continue it with "
        f"`innerloop train --resume out_dir={run.out_dir} optim.lr=<lower>`"
    )


DEFAULT_EVAL_SEQ_LEN = 128
"""Window length of an evaluation of a checkpoint that does not record its training seq_len."""


def evaluate(
    checkpoint: str | Path,
    paths: Sequence[str] = (),
    seq_len: int | None = None,
    batch_size: int = 16,
    batches: int = 8,
    out_dir: str | Path | None = None,
    progress_bar: bool = True,
) -> tuple[dict[str, Any], Path | None, Path | None]:
    """Perplexity and loss by position of a checkpoint on text (``paths``, or the default corpus's
    validation split). ``seq_len`` defaults to the training one. Returns ``(metrics, csv, png)``.

    When ``out_dir`` is given, writes ``eval_<checkpoint>_<data>_T<seq_len>_n<windows>.csv`` and
    ``.png`` there (see :func:`evaluation_stem`): named after what was evaluated, so evaluations of other
    checkpoints, data or settings do not replace each other, and never the training run's own ``loss_by_position.*``.
    """
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("batches", batches)):
        if value is not None and value < 1:
            raise ValueError(f"{name}={value} must be >= 1")
    module = load_module(checkpoint)
    if seq_len is None:
        seq_len = _training_seq_len(module, checkpoint)
    inputs, targets = evaluation_examples(paths, seq_len, batches * batch_size)
    vocab_size = module.model.config.vocab_size
    largest = max(int(inputs.max()), int(targets.max()))  # bytes 0..255 (targets' ignored ones are < 0)
    if largest >= vocab_size:
        raise DataError(
            f"the data has token {largest}, but the model's vocabulary has {vocab_size} tokens "
            f"(0..{vocab_size - 1}): this model cannot read these bytes"
        )
    loader = DataLoader(FixedExamples(inputs, targets), batch_size=batch_size, shuffle=False)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=progress_bar, enable_model_summary=False,
    )  # fmt: skip
    metrics = {k: float(v) for k, v in trainer.validate(module, dataloaders=loader, verbose=False)[0].items()}
    metrics["tokens"] = float((targets != IGNORE_INDEX).sum())
    if out_dir is None:
        return metrics, None, None
    buckets = position_buckets(seq_len, module.hparams.num_position_buckets)
    losses = [metrics[f"val_loss_pos/{b}"] for b in range(len(buckets))]
    stem = evaluation_stem(checkpoint_identity(checkpoint), paths, seq_len, len(inputs))
    csv_path = write_loss_by_position_csv(Path(out_dir) / f"{stem}.csv", buckets, losses)
    title = f"{Path(checkpoint).name} on {_data_tag(paths)}, T={seq_len}: loss by position"
    png = plot_loss_by_position(Path(out_dir) / f"{stem}.png", buckets, losses, title=title)
    return metrics, csv_path, png


def evaluation_stem(checkpoint_id: str, paths: Sequence[str], seq_len: int, windows: int) -> str:
    """File name (without suffix) of an evaluation's outputs:
    ``eval_<checkpoint>_<data>_T<seq_len>_n<windows>``, e.g. ``eval_last-1a2b3c4d_default-val_T32_n16``.

    ``<checkpoint>`` is :func:`~innerloop.train.checkpoint.checkpoint_identity` (file stem and content
    checksum prefix: two checkpoints never share a name, and evaluating the same one with the same
    settings again rewrites only its own file). ``<data>`` is ``default-val`` for the default corpus's validation split, else the first file's
    name and a short hash of all the files evaluated (so other files of the same name differ).
    """
    return f"eval_{checkpoint_id}_{_data_tag(paths)}_T{seq_len}_n{windows}"


def _data_tag(paths: Sequence[str]) -> str:
    if not paths:
        return "default-val"
    files = resolve_files(paths)
    digest = hashlib.sha256("\0".join(str(f) for f in files).encode()).hexdigest()[:8]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", files[0].stem).strip("-.")[:40] or "data"
    return f"{name}{f'+{len(files) - 1}' if len(files) > 1 else ''}-{digest}"


def _training_seq_len(module: LanguageModelModule, checkpoint: str | Path) -> int:
    """The seq_len ``module`` was trained with, from the checkpoint's own hyperparameters (never from a
    config.yaml beside the file, which a copied checkpoint may not have or may have another run's);
    128, said in one printed line, for a checkpoint that does not record it."""
    seq_len = module.hparams.get("seq_len")
    if isinstance(seq_len, int) and seq_len >= 1:
        return seq_len
    print(
        f"{str(checkpoint)!r} does not record the seq_len it was trained with (written by an older "
        f"innerloop): evaluating at {DEFAULT_EVAL_SEQ_LEN} tokens per window; give --seq-len to choose"
    )
    return DEFAULT_EVAL_SEQ_LEN
