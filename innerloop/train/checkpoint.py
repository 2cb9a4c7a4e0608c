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
    "checkpoint_stamp",
    "checkpoint_tokenizer",
    "describe_model",
    "holds_training_state",
    "load_checkpoint",
    "load_training_checkpoint",
    "load_weights",
    "save_checkpoint",
    "stored_dtypes",
]


def checkpoint_stamp(path: Any) -> tuple[int, int, int, int, int] | None:
    """What tells one version of the file at ``path`` from another: device, inode, size, modification
    and change time (a same-size rewrite in place whose modification time was set back, as ``cp -p`` or
    ``touch -r`` do, still changes ``st_ctime``); None when there is no such file. Take it BEFORE reading
    the file whose read :meth:`SafetensorsCheckpointIO.hand_over` gets: a stamp taken after the read
    describes whatever was written between the two, not the bytes read."""
    try:
        stat = Path(path).stat()
    except OSError:
        return None
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


class SafetensorsCheckpointIO(CheckpointIO):
    """Lightning checkpoint IO through :func:`~innerloop.checkpoints.save_checkpoint` /
    :func:`~innerloop.checkpoints.load_checkpoint`.

    A resume has read (and checked: checksum, finite weights, every resume check) the checkpoint it starts
    from before the Trainer exists; :meth:`hand_over` gives that read to the IO, and Lightning's load of
    the same, unchanged file takes it instead of reading it again (a 307 MB checkpoint was read twice,
    5.2 s and 9.4 s on a loaded 2-core machine). Taken once; a file changed since the read began (its
    :func:`checkpoint_stamp` then, taken before the read, differs from the file's now) is read again;
    never pickled (a spawned process reads the file itself)."""

    def __init__(self) -> None:
        super().__init__()
        self._handed_over: tuple[Path, tuple[int, ...], dict[str, Any]] | None = None
        self._keep_next_write = False
        self._kept: tuple[Path, dict[str, Any]] | None = None

    def keep_next_write(self) -> None:
        """Keep the next checkpoint this IO writes (the dict, not a copy: the tensors stay the module's
        and optimizer's own) for :meth:`take_written`; a process that writes nothing keeps nothing."""
        self._keep_next_write, self._kept = True, None

    def take_written(self) -> tuple[Path, dict[str, Any]] | None:
        """The checkpoint written since :meth:`keep_next_write` and where, or None; taken once."""
        kept, self._kept, self._keep_next_write = self._kept, None, False
        return kept

    def hand_over(self, path: Path, checkpoint: dict[str, Any], stamp: tuple[int, ...] | None) -> None:
        """Keep ``checkpoint``, read from ``path`` by :func:`~innerloop.checkpoints.load_checkpoint`, for
        Lightning's one load of that file, as long as the file is the version ``stamp`` describes:
        ``stamp`` is :func:`checkpoint_stamp` of ``path`` taken BEFORE that read (None: the file was not
        there, nothing is kept), so that a file written again during the read or after it, the same
        size in place too, is read again rather than given as the older bytes checked."""
        self._handed_over = None if stamp is None else (Path(path).resolve(), stamp, checkpoint)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handed_over": None, "_kept": None}

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(
                f"storage_options are not supported by {type(self).__name__}, got {storage_options!r}"
            )
        save_checkpoint(checkpoint, path)
        if self._keep_next_write:
            self._kept, self._keep_next_write = (Path(path), checkpoint), False

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        # Lightning's loaders may pass a function of storages and locations: the file records no device
        # to map from, so the tensors stay on the CPU (Lightning moves the module afterwards).
        is_device = not (callable(map_location) or isinstance(map_location, dict))
        location = map_location if is_device else None
        handed_over, self._handed_over = self._handed_over, None  # taken once, whichever file is asked for
        on_cpu = location is None or str(location) == "cpu"  # where load_checkpoint put the handed-over one
        if (
            handed_over is not None
            and on_cpu
            and handed_over[:2] == (Path(path).resolve(), checkpoint_stamp(path))
        ):
            return handed_over[2]
        return load_checkpoint(path, location)

    def remove_checkpoint(self, path: Any) -> None:
        Path(path).unlink(missing_ok=True)
