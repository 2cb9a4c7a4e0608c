"""The structured config of a training run (omegaconf schemas as dataclasses).

A run's YAML has four sections, each a dataclass below: ``model`` (:class:`ModelConfig`), ``data``,
``optim`` and ``trainer``, plus ``seed`` and ``out_dir``. Every key has a type and a default; a YAML
preset sets some of them and ``key=value`` overrides on the command line set others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from innerloop.data.recall import RECALL_GAP_BOUNDS, RECALL_PAIRS_BOUNDS
from innerloop.models.config import (  # noqa: F401  (Bounds and its constants: re-exported, their old home)
    AT_LEAST_0,
    AT_LEAST_0_IN_FLOAT32,
    AT_LEAST_1,
    BATCH_SIZE_BOUNDS,
    FLOAT32_MAX,
    FRACTION,
    MODEL_FIELD_BOUNDS,
    POSITIVE,
    SEED_BOUNDS,
    SEQ_LEN_BOUNDS,
    STEP_BOUNDS,
    WINDOW_SIZE_BOUNDS,
    Bounds,
    ModelConfig,
    with_plain_values,
)

DATASETS: tuple[str, ...] = ("text", "recall", "hf")

HELD_OUT: tuple[str, ...] = ("val", "test")
"""What ``innerloop eval --held-out`` (and compare's) scores of a run: its validation windows, or its
test windows (``data.test_fraction`` > 0)."""

SCHEDULES: tuple[str, ...] = ("cosine", "linear", "constant", "wsd")
"""The learning-rate schedules of ``optim.schedule`` (each implemented in :mod:`innerloop.train.schedules`)."""

LOGGERS: dict[str, str] = {"csv": "", "tensorboard": "tensorboard", "wandb": "wandb"}
"""The loggers of ``logger``, each with the package it needs (``""``: none beyond Lightning)."""


@dataclass
class RecallConfig:
    """The synthetic recall task (``data.name=recall``); sequences have ``4*num_pairs + gap - 1`` tokens."""

    num_pairs: int = 8
    gap: int = 64

    def __post_init__(self) -> None:
        """A numpy number or a 0-d integer tensor becomes the plain Python number, as in the model
        section (:func:`~innerloop.models.config.with_plain_values`)."""
        with_plain_values(self, "data.recall.", "the run config")


@dataclass
class DataConfig:
    """What to train on, and how text becomes tokens.

    ``name``: ``text`` (text files from ``paths``; empty = the Python standard library's source),
    ``hf`` (a local dataset read with the ``datasets`` library: data files or a ``save_to_disk``
    folder in ``paths``, its ``split``, the column ``text_field``, read as a stream when
    ``streaming``; see :mod:`innerloop.data.hf`) or ``recall`` (the synthetic task configured by
    ``recall``; ``seq_len`` is then derived from it). Keys the chosen data does not read are refused
    unless at their defaults (:data:`~innerloop.config.load.DATA_KEY_READERS`): ``paths``,
    ``val_fraction``, ``test_fraction`` and another ``seq_len`` for ``recall``,
    ``recall.*`` for the others, ``split``, ``text_field`` and ``streaming`` for all but ``hf``.

    ``tokenizer``: ``bytes`` (token = byte, 256 tokens) or a Hugging Face tokenizer: a
    ``tokenizer.json`` file or a folder holding one (e.g. from ``innerloop tokenizer train``). The
    model's ``vocab_size`` follows it unless the config sets one (which must then be at least the
    tokenizer's).

    ``test_fraction``: a share of the text held out for test, besides validation's ``val_fraction``
    (their sum below 1): never trained on, nor validated on; scored only when asked, by
    ``innerloop eval --held-out test``. Text files: those whose path's hash falls in ``[val_fraction,
    val_fraction + test_fraction)`` (one file: the ``test_fraction`` of it before its validation tail);
    ``hf``: a share of the documents not held out for validation. 0 (the default): no test split.
    """

    name: str = "text"
    paths: list[str] = field(default_factory=list)
    tokenizer: str = "bytes"
    seq_len: int = 128
    batch_size: int = 16
    val_fraction: float = 0.1
    val_batches: int = 8
    split: str = "train"
    text_field: str = "text"
    streaming: bool = False
    test_fraction: float = 0.0
    recall: RecallConfig = field(default_factory=RecallConfig)

    def __post_init__(self) -> None:
        """A section given as a mapping becomes its dataclass, and a numpy number or a 0-d integer tensor
        the plain Python number, as in the model section (:func:`~innerloop.models.config.with_plain_values`)."""
        with_plain_values(self, "data.", "the run config")


@dataclass
class OptimConfig:
    """AdamW; gradient clipping by global norm; a learning-rate schedule of optimizer steps.

    ``schedule``: every schedule warms up linearly from 0 to ``lr`` over the first ``warmup_fraction``
    of ``trainer.max_steps``, then ``cosine`` decays to ``min_lr`` at ``max_steps`` along a half
    cosine, ``linear`` along a line, ``constant`` stays at ``lr``, and ``wsd`` (warm-up, stable,
    decay) stays at ``lr`` until the last ``decay_fraction`` of the steps and decays linearly to
    ``min_lr`` over them. See :mod:`innerloop.train.schedules` for the closed forms.

    ``ttt_base_lr_warmup`` > 0 warms the TTT layers' inner learning rate up as the JAX reference does
    for TTT-MLP: ``ttt_base_lr_init`` at the first step, rising linearly to ``model.ttt.base_lr`` over
    ``ttt_base_lr_warmup`` steps (0: off, the layers use ``model.ttt.base_lr`` throughout).
    """

    lr: float = 3e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_fraction: float = 0.1
    min_lr: float = 1e-5
    grad_clip: float = 1.0
    schedule: str = "cosine"
    decay_fraction: float = 0.2
    ttt_base_lr_init: float = 0.01
    ttt_base_lr_warmup: int = 0

    def __post_init__(self) -> None:
        """A numpy number or a 0-d integer tensor becomes the plain Python number, as in the model
        section (:func:`~innerloop.models.config.with_plain_values`)."""
        with_plain_values(self, "optim.", "the run config")


@dataclass
class TrainerConfig:
    """Lightning Trainer settings. ``strategy`` is any Lightning strategy name (``ddp``,
    ``ddp_spawn``, ``fsdp``, ...); ``threads`` > 0 sets ``torch.set_num_threads``. ``precision`` is
    a Lightning precision that trains (``16-true`` is refused: float16 weights) or ``auto``
    (``bf16-mixed`` on a CUDA GPU with bfloat16, ``16-mixed`` on an older one, ``32-true`` otherwise).

    ``lightning`` holds any other ``lightning.Trainer`` argument by name (``accumulate_grad_batches``,
    ``deterministic``, ...), checked against the Trainer's signature. A config or override may give
    them directly under ``trainer`` (``trainer.accumulate_grad_batches=2``): loading moves them here,
    and maps the Lightning names of innerloop's own keys (``log_every_n_steps``, ``val_check_interval``,
    ``gradient_clip_val``, ...) onto those keys (:mod:`innerloop.config.trainer_args`).

    ``gradient_checkpointing``: recompute each block in the backward instead of keeping its activations
    (:meth:`innerloop.models.CausalLM.gradient_checkpointing_enable`): less memory, about one more forward
    of the blocks per step, the same loss and gradients. Not for ``model.mixer=e2e``."""

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
    gradient_checkpointing: bool = False
    threads: int = 0
    lightning: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """A numpy number or a 0-d integer tensor becomes the plain Python number, as in the model
        section (:func:`~innerloop.models.config.with_plain_values`)."""
        with_plain_values(self, "trainer.", "the run config")


@dataclass
class RunConfig:
    """A whole training run; ``innerloop train`` saves it resolved as ``<out_dir>/config.yaml``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    seed: int = 0
    out_dir: str = "runs/tiny"
    logger: Any = "csv"
    """A name of :data:`LOGGERS` or a list of them; each writes under ``<out_dir>/logs/``."""

    def __post_init__(self) -> None:
        """A section given as a mapping becomes its dataclass, and a numpy number or a 0-d integer tensor
        the plain Python number, as in the model section (:func:`~innerloop.models.config.with_plain_values`)."""
        with_plain_values(self, "", "the run config")


# -- the range of every numeric field ---------------------------------------------------------------------


FIELD_BOUNDS: dict[str, Bounds] = {
    **MODEL_FIELD_BOUNDS,  # model.*: models/config.py, where validate_model_config checks them
    # data
    "data.seq_len": SEQ_LEN_BOUNDS,
    "data.batch_size": BATCH_SIZE_BOUNDS,
    "data.val_fraction": FRACTION,
    "data.test_fraction": FRACTION,
    "data.val_batches": WINDOW_SIZE_BOUNDS["batches"],  # as eval's --batches: 10**40 hung a data module
    "data.recall.num_pairs": RECALL_PAIRS_BOUNDS,
    "data.recall.gap": RECALL_GAP_BOUNDS,
    # optim
    "optim.lr": Bounds(
        0,
        FLOAT32_MAX,
        low_open=True,
        why=(
            "a larger one is inf in float32, the weights' or the optimizer state's dtype in every "
            "trainer.precision but 64-true; one cap for every precision, so that a config valid in one "
            "is valid in all (no rate near it trains)"
        ),
    ),
    "optim.weight_decay": AT_LEAST_0,
    "optim.beta1": FRACTION,
    "optim.beta2": FRACTION,
    "optim.warmup_fraction": FRACTION,
    "optim.min_lr": AT_LEAST_0_IN_FLOAT32,
    "optim.grad_clip": Bounds(0, why="0: no clipping"),
    "optim.decay_fraction": Bounds(0, 1, low_open=True, why="the share of the steps that wsd decays over"),
    "optim.ttt_base_lr_init": AT_LEAST_0_IN_FLOAT32,
    "optim.ttt_base_lr_warmup": Bounds(0, why="0: no warm-up of the TTT layers' base lr"),
    # trainer
    "trainer.max_steps": STEP_BOUNDS,
    "trainer.val_every": Bounds(  # Lightning reads val_check_interval as a float: 10**400 overflowed there
        1, 2**63 - 1, why="an int64 step count; one past trainer.max_steps validates only at the end"
    ),
    "trainer.checkpoint_every": AT_LEAST_1,
    "trainer.devices": Bounds(1, 2**16, why="the processes or accelerators of one machine"),
    "trainer.log_every": AT_LEAST_1,
    "trainer.num_position_buckets": AT_LEAST_1,
    "trainer.diagnostics_batches": Bounds(0, why="0: no inner-loss diagnostics"),
    "trainer.threads": Bounds(0, 2**16, why="0: torch's default; more: the threads of one process"),
    # run
    "seed": SEED_BOUNDS,
}
"""The valid range of every int and float field of :class:`RunConfig`, by dotted key (a test checks
that every numeric field has one); :func:`innerloop.config.validate_run_config` enforces them."""
