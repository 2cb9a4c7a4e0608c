"""The safetensors checkpoint format (:mod:`innerloop.checkpoints`) plugged into Lightning.

:class:`SafetensorsCheckpointIO` (``Trainer(plugins=[...])``) makes ``trainer.save_checkpoint`` and
``trainer.fit(ckpt_path=...)`` write and read that format; writes are atomic and nothing is ever
unpickled. The format itself, and reading a model back, live in :mod:`innerloop.checkpoints`, which
does not import Lightning; its names are re-exported here for code written against this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

from innerloop.checkpoints import (
    CHECKPOINT_SUFFIX,
    TOKENIZER_KEY,
    CheckpointError,
    UnverifiedCheckpointWarning,
    check_state_dict,
    checkpoint_digest,
    checkpoint_identity,
    checkpoint_tokenizer,
    describe_model,
    holds_training_state,
    load_checkpoint,
    load_training_checkpoint,
    load_weights,
    save_checkpoint,
    stored_dtypes,
)

__all__ = [
    "CHECKPOINT_SUFFIX",
    "TOKENIZER_KEY",
    "CheckpointError",
    "SafetensorsCheckpointIO",
    "UnverifiedCheckpointWarning",
    "check_state_dict",
    "checkpoint_digest",
    "checkpoint_identity",
    "checkpoint_tokenizer",
    "describe_model",
    "holds_training_state",
    "load_checkpoint",
    "load_training_checkpoint",
    "load_weights",
    "save_checkpoint",
    "stored_dtypes",
]


class SafetensorsCheckpointIO(CheckpointIO):
    """Lightning checkpoint IO through :func:`~innerloop.checkpoints.save_checkpoint` /
    :func:`~innerloop.checkpoints.load_checkpoint`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(
                f"storage_options are not supported by {type(self).__name__}, got {storage_options!r}"
            )
        save_checkpoint(checkpoint, path)

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        # Lightning's loaders may pass a function of storages and locations: the file records no device
        # to map from, so the tensors stay on the CPU (Lightning moves the module afterwards).
        is_device = not (callable(map_location) or isinstance(map_location, dict))
        return load_checkpoint(path, map_location if is_device else None)

    def remove_checkpoint(self, path: Any) -> None:
        Path(path).unlink(missing_ok=True)
