"""The structured config of a training run (omegaconf schemas as dataclasses).

A run's YAML has four sections, each a dataclass below: ``model`` (:class:`ModelConfig`), ``data``,
``optim`` and ``trainer``, plus ``seed`` and ``out_dir``. Every key has a type and a default; a YAML
preset sets some of them and ``key=value`` overrides on the command line set others.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from innerloop.models.config import ModelConfig

DATASETS: tuple[str, ...] = ("text", "recall")


@dataclass
class RecallConfig:
    """The synthetic recall task (``data.name=recall``); sequences have ``4*num_pairs + gap - 1`` tokens."""

    num_pairs: int = 8
    gap: int = 64


@dataclass
class DataConfig:
    """What to train on.

    ``name``: ``text`` (byte-level text from ``paths``; empty = the Python standard library's source)
    or ``recall`` (the synthetic task configured by ``recall``; ``seq_len`` is then derived from it).
    """

    name: str = "text"
    paths: list[str] = field(default_factory=list)
    seq_len: int = 128
    batch_size: int = 16
    val_fraction: float = 0.1
    val_batches: int = 8
    recall: RecallConfig = field(default_factory=RecallConfig)


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and cosine decay; gradient clipping by global norm."""

    lr: float = 3e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_fraction: float = 0.1
    min_lr: float = 1e-5
    grad_clip: float = 1.0


@dataclass
class TrainerConfig:
    """Lightning Trainer settings. ``strategy`` is any Lightning strategy name (``ddp``,
    ``ddp_spawn``, ``fsdp``, ...); ``threads`` > 0 sets ``torch.set_num_threads``. ``precision`` is
    any Lightning precision or ``auto`` (``bf16-mixed`` on a CUDA GPU, ``32-true`` otherwise)."""

    max_steps: int = 1000
    val_every: int = 250
    checkpoint_every: int = 100
    accelerator: str = "cpu"
    devices: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    log_every: int = 10
    num_position_buckets: int = 16
    diagnostics_batches: int = 1
    progress_bar: bool = True
    threads: int = 0


@dataclass
class RunConfig:
    """A whole training run; ``innerloop train`` saves it resolved as ``<out_dir>/config.yaml``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    seed: int = 0
    out_dir: str = "runs/tiny"
