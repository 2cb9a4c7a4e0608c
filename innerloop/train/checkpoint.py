"""Checkpoints as single safetensors files; nothing is ever unpickled.

A Lightning checkpoint is a tree of dicts, lists and tuples whose leaves are tensors, numbers, strings
and None (weights, optimizer moments, loop counters, callback states, hyperparameters). We store the
tensors as safetensors entries and the rest of the tree as JSON in the safetensors metadata, under the
key ``innerloop.tree``, with each tensor replaced by a reference to its entry. Loading parses JSON and
safetensors only, so a checkpoint from an untrusted source cannot run code.

:class:`SafetensorsCheckpointIO` plugs this format into Lightning (``Trainer(plugins=[...])``), so
``trainer.save_checkpoint`` and ``trainer.fit(ckpt_path=...)`` use it; writes are atomic.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from innerloop.models import CausalLM
from innerloop.train.atomic import atomic_write

FORMAT = "innerloop-checkpoint"
FORMAT_VERSION = "1"
CHECKPOINT_SUFFIX = ".safetensors"


class CheckpointError(ValueError):
    """A file that is not a readable innerloop checkpoint (missing, corrupt, or of another format)."""


# -- the tree <-> (tensors, JSON) encoding -------------------------------------------------------------


def _encode(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    """JSON-able form of ``obj``; tensors are moved into ``tensors`` and replaced by their key."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        # clone: safetensors refuses tensors that share memory (e.g. the tied embedding and LM head)
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{where}[{k!r}]") for k, v in obj.items()}
        # non-string keys (e.g. the optimizer's integer parameter ids): a list of pairs
        return {
            "__dict__": [
                [_encode(k, tensors, where), _encode(v, tensors, f"{where}[{k!r}]")] for k, v in obj.items()
            ]
        }
    raise TypeError(
        f"cannot store {type(obj).__name__} at checkpoint{where}: a checkpoint holds only tensors, "
        "numbers, strings, None, lists, tuples and dicts"
    )


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__dict__"]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def save_checkpoint(checkpoint: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``checkpoint`` (a tree of tensors and plain values) to ``path`` atomically."""
    tensors: dict[str, torch.Tensor] = {}
    tree = json.dumps(_encode(checkpoint, tensors, ""))
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "innerloop.tree": tree}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; raise :class:`CheckpointError` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    device = map_location if isinstance(map_location, (str, torch.device)) else "cpu"
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT or "innerloop.tree" not in metadata:
                raise CheckpointError(
                    f"{str(path)!r} is a safetensors file but not an innerloop checkpoint (its metadata has "
                    f"no format={FORMAT!r}); innerloop checkpoints are written by `innerloop train`"
                )
            if metadata.get("format_version") != FORMAT_VERSION:
                raise CheckpointError(
                    f"{str(path)!r} has checkpoint format version {metadata.get('format_version')!r}; "
                    f"this innerloop reads version {FORMAT_VERSION!r}"
                )
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        return _decode(json.loads(metadata["innerloop.tree"]), tensors)
    except CheckpointError:
        raise
    except (SafetensorError, OSError, ValueError, KeyError) as err:
        raise CheckpointError(
            f"{str(path)!r} is not a readable innerloop checkpoint (expected a safetensors file written by "
            f"`innerloop train`; it may be truncated or of another format): {err}"
        ) from None


class SafetensorsCheckpointIO(CheckpointIO):
    """Lightning checkpoint IO through :func:`save_checkpoint` / :func:`load_checkpoint`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(
                f"storage_options are not supported by {type(self).__name__}, got {storage_options!r}"
            )
        save_checkpoint(checkpoint, path)

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return load_checkpoint(path, map_location if map_location is not None else "cpu")

    def remove_checkpoint(self, path: Any) -> None:
        Path(path).unlink(missing_ok=True)


def load_module(path: str | os.PathLike[str]):
    """The :class:`~innerloop.train.module.LanguageModelModule` stored in a training checkpoint
    (hyperparameters and weights), in eval mode.

    Raises :class:`CheckpointError` if the file is not an innerloop training checkpoint or its weights
    do not fit the model its hyperparameters describe.
    """
    from innerloop.train.module import LanguageModelModule

    checkpoint = load_checkpoint(path)
    hparams = checkpoint.get("hyper_parameters")
    if not isinstance(hparams, dict) or "model" not in hparams or "state_dict" not in checkpoint:
        raise CheckpointError(
            f"{str(path)!r} is an innerloop checkpoint without a model (no hyper_parameters['model'] or "
            "state_dict); pass a checkpoint written by `innerloop train`"
        )
    try:
        module = LanguageModelModule(**hparams)
        module.load_state_dict(checkpoint["state_dict"])
    except (TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{str(path)!r} holds a model this innerloop cannot rebuild: {err}") from None
    return module.eval()


def load_model(path: str | os.PathLike[str]) -> CausalLM:
    """The :class:`CausalLM` stored in a training checkpoint, in eval mode (see :func:`load_module`)."""
    return load_module(path).model
