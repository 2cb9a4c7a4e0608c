"""Training with Lightning: the LightningModule, DataModules, metrics, checkpoints and the run loop.

Importing this package imports Lightning; ``innerloop.core`` and ``innerloop.models`` do not.
"""

from innerloop.train.checkpoint import (
    CheckpointError,
    SafetensorsCheckpointIO,
    load_checkpoint,
    save_checkpoint,
)
from innerloop.train.data import IGNORE_INDEX, RecallDataModule, TextDataModule, recall_example, stdlib_files
from innerloop.train.interrupt import TrainingInterrupted
from innerloop.train.metrics import InnerLossDiagnostics, LossByPosition, position_buckets
from innerloop.train.module import (
    LanguageModelModule,
    NonFiniteLayerOutputError,
    TrainingDivergedError,
    load_model,
    load_module,
    warmup_cosine,
)
from innerloop.train.run import TrainResult, build_datamodule, build_module, build_trainer, evaluate, train
from innerloop.train.run_dir import RunDirError

__all__ = [
    "IGNORE_INDEX",
    "CheckpointError",
    "InnerLossDiagnostics",
    "LanguageModelModule",
    "LossByPosition",
    "NonFiniteLayerOutputError",
    "RecallDataModule",
    "RunDirError",
    "SafetensorsCheckpointIO",
    "TextDataModule",
    "TrainResult",
    "TrainingDivergedError",
    "TrainingInterrupted",
    "build_datamodule",
    "build_module",
    "build_trainer",
    "evaluate",
    "load_checkpoint",
    "load_model",
    "load_module",
    "position_buckets",
    "recall_example",
    "save_checkpoint",
    "stdlib_files",
    "train",
    "warmup_cosine",
]
