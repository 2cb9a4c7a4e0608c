"""From a validated :class:`RunConfig` to a trained checkpoint, and back to an evaluation.

``train(run)`` writes into ``run.out_dir``:

- ``config.yaml``: the resolved config (written first, so even a killed run has it);
- ``last.safetensors``: the checkpoint (every ``trainer.checkpoint_every`` steps and at the end);
- ``logs/version_<n>/metrics.csv``: what was logged, one folder per launch (Lightning's CSVLogger);
- ``loss_by_position.csv`` and ``loss_by_position.png``: the final validation loss by position.

``train(run, resume=True)`` continues from ``last.safetensors`` to the same result as a run that was
never interrupted (batches are a function of the step, see :mod:`innerloop.train.data`).
Multi-process training is Lightning's: ``trainer.strategy=ddp`` (or ``ddp_spawn``, ``fsdp``) with
``trainer.devices=N``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from innerloop.config.load import save_config
from innerloop.config.schema import RunConfig
from innerloop.train.checkpoint import (
    CHECKPOINT_SUFFIX,
    SafetensorsCheckpointIO,
    load_checkpoint,
    load_module,
)
from innerloop.train.data import (
    IGNORE_INDEX,
    FixedExamples,
    RecallDataModule,
    TextDataModule,
    evaluation_examples,
)
from innerloop.train.metrics import position_buckets
from innerloop.train.module import LanguageModelModule
from innerloop.train.plots import plot_loss_by_position, write_loss_by_position_csv

CHECKPOINT_NAME = "last"


class _SafetensorsModelCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint writing ``last.safetensors`` (the IO plugin does the format), and
    always at the end of training (Lightning skips that save if any "last" was written before)."""

    FILE_EXTENSION = CHECKPOINT_SUFFIX

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


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
        warmup_steps=int(optim.warmup_fraction * run.trainer.max_steps),
        max_steps=run.trainer.max_steps,
        min_lr=optim.min_lr,
        num_position_buckets=run.trainer.num_position_buckets,
        diagnostics_batches=run.trainer.diagnostics_batches,
    )


def resolve_precision(precision: str, accelerator: str) -> str:
    """``trainer.precision``, with ``auto`` made concrete: ``bf16-mixed`` on a CUDA accelerator (named,
    or ``auto`` with a GPU present), ``32-true`` elsewhere (bf16 autocast is slow on most CPUs).
    Says what it chose in one printed line."""
    if precision != "auto":
        return precision
    on_cuda = accelerator in ("cuda", "gpu") or (accelerator == "auto" and torch.cuda.is_available())
    chosen = "bf16-mixed" if on_cuda else "32-true"
    print(
        f"trainer.precision=auto: {chosen} ({'a CUDA GPU' if on_cuda else 'no CUDA GPU'} for accelerator={accelerator})"
    )
    return chosen


def build_trainer(run: RunConfig, callbacks: Sequence[Callback] = ()) -> L.Trainer:
    """A Lightning Trainer that checkpoints to ``run.out_dir/last.safetensors`` in safetensors."""
    t = run.trainer
    checkpointing = _SafetensorsModelCheckpoint(
        dirpath=run.out_dir,
        save_last=True,
        save_top_k=0,
        every_n_train_steps=t.checkpoint_every,
        enable_version_counter=False,
    )
    checkpointing.CHECKPOINT_NAME_LAST = CHECKPOINT_NAME
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=t.strategy,
        precision=resolve_precision(t.precision, t.accelerator),
        max_steps=t.max_steps,
        max_epochs=-1,  # the training stream is endless; max_steps ends the run
        val_check_interval=t.val_every,
        check_val_every_n_epoch=None,
        limit_val_batches=run.data.val_batches,
        num_sanity_val_steps=0,
        gradient_clip_val=run.optim.grad_clip if run.optim.grad_clip > 0 else None,
        log_every_n_steps=t.log_every,
        logger=CSVLogger(run.out_dir, name="logs"),  # logs/version_<n>/metrics.csv, one per launch
        callbacks=[checkpointing, *callbacks],
        plugins=[SafetensorsCheckpointIO()],
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
        default_root_dir=run.out_dir,
    )


def checkpoint_path(out_dir: str | Path) -> Path:
    """The checkpoint a run in ``out_dir`` writes (and ``--resume`` continues from)."""
    return Path(out_dir) / f"{CHECKPOINT_NAME}{CHECKPOINT_SUFFIX}"


def train(
    run: RunConfig, cfg: DictConfig | None = None, resume: bool = False, callbacks: Sequence[Callback] = ()
) -> TrainResult:
    """Train ``run`` (already validated, e.g. by :func:`innerloop.config.load_config`); see the module doc.

    ``cfg`` is the omegaconf form to save (the run itself is saved if not given); ``callbacks`` are
    extra Lightning callbacks.
    """
    out_dir = Path(run.out_dir)
    ckpt = checkpoint_path(out_dir)
    if resume:
        load_checkpoint(ckpt)  # fail now, with a clear error, if it is missing or unreadable
    if run.trainer.threads > 0:
        torch.set_num_threads(run.trainer.threads)
    config_path = save_config(cfg if cfg is not None else run, out_dir / "config.yaml")

    L.seed_everything(run.seed, workers=True, verbose=False)
    module = build_module(run)
    datamodule = build_datamodule(run)
    trainer = build_trainer(run, callbacks)
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if resume else None)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    # Validate once more unless the last validation was at the last step. (Compared with max_steps: after
    # ddp_spawn the main process has the workers' metrics but not their step counter.)
    if metrics.get("val_step") != run.trainer.max_steps:
        metrics = {
            k: float(v) for k, v in trainer.validate(module, datamodule=datamodule, verbose=False)[0].items()
        }

    seq_len = datamodule.seq_len
    buckets = position_buckets(seq_len, run.trainer.num_position_buckets)
    losses = [metrics[f"val_loss_pos/{b}"] for b in range(len(buckets))]
    csv_path = write_loss_by_position_csv(out_dir / "loss_by_position.csv", buckets, losses)
    steps = int(metrics["val_step"])
    title = f"{run.model.mixer} ({run.model.backbone}), {steps} steps: validation loss by position"
    plot = plot_loss_by_position(out_dir / "loss_by_position.png", buckets, losses, title=title)
    return TrainResult(out_dir, ckpt, config_path, plot, csv_path, metrics)


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
    validation split). ``seq_len`` defaults to the training one. Writes ``loss_by_position.csv`` and
    ``.png`` into ``out_dir`` when given. Returns ``(metrics, csv, png)``."""
    module = load_module(checkpoint)
    if seq_len is None:
        seq_len = _training_seq_len(Path(checkpoint))
    inputs, targets = evaluation_examples(paths, seq_len, batches * batch_size)
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
    out = Path(out_dir)
    csv_path = write_loss_by_position_csv(out / "loss_by_position.csv", buckets, losses)
    png = plot_loss_by_position(
        out / "loss_by_position.png", buckets, losses, title=f"{Path(checkpoint).name}: loss by position"
    )
    return metrics, csv_path, png


def _training_seq_len(checkpoint: Path) -> int:
    """``data.seq_len`` of the run that wrote ``checkpoint`` (from the config.yaml beside it), else 128."""
    from omegaconf import OmegaConf

    config = checkpoint.parent / "config.yaml"
    if config.is_file():
        value = OmegaConf.select(OmegaConf.load(config), "data.seq_len")
        if isinstance(value, int):
            return value
    return 128
