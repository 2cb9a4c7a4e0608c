"""``innerloop export``: a training checkpoint (or any innerloop model) -> a Hugging Face folder.

The folder holds ``config.json`` (with ``auto_map``), ``model.safetensors``,
``generation_config.json``, the tokenizer files and the two remote-code modules of
:mod:`innerloop.hf.remote_code`. It is assembled in a temporary folder next to ``OUT_DIR`` and renamed
into place, so ``OUT_DIR`` is never half written: an interrupted export leaves the previous folder (or
none) and a temporary ``.<name>.*.tmp`` folder, never a mix.

An existing ``OUT_DIR`` is replaced only with ``overwrite=True`` and only when it is empty or an
earlier export (its ``config.json`` has ``model_type`` ``innerloop``) holding nothing but the files an
export writes (:data:`EXPORT_FILES`): a file or folder of anyone else's, such as notes or results added
to an earlier export, is never deleted.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from innerloop.checkpoints import checkpoint_tokenizer, load_model
from innerloop.data.tokenizer import Tokenizer as RunTokenizer
from innerloop.hf.configuration import MODEL_TYPE, InnerloopConfig
from innerloop.hf.modeling import InnerloopForCausalLM
from innerloop.hf.remote_code import SHIMS
from innerloop.hf.tokenizer import BYTES, write_tokenizer_files


class ExportError(ValueError):
    """An export that cannot be made as asked (the target folder, the tokenizer); one line."""


EXPORT_FILES: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",  # a large model's shards, and their index
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    *SHIMS,  # the remote-code modules
)
"""Names (fnmatch patterns) of the files an export writes, whatever its model and tokenizer:
``--overwrite`` replaces a folder holding these only."""


def _foreign_entries(folder: Path) -> list[str]:
    """The entries of ``folder`` that no export writes (folders shown with a trailing ``/``)."""
    return sorted(
        entry.name + "/" if entry.is_dir() else entry.name
        for entry in folder.iterdir()
        if entry.is_dir() or not any(fnmatch.fnmatchcase(entry.name, pattern) for pattern in EXPORT_FILES)
    )


def _refuse_foreign_entries(out: Path) -> None:
    foreign = _foreign_entries(out)
    if foreign:
        shown = foreign[:5] + ([f"and {len(foreign) - 5} more"] if len(foreign) > 5 else [])
        raise ExportError(
            f"OUT_DIR {str(out)!r} is an earlier export but also holds what an export does not write "
            f"({', '.join(shown)}): --overwrite would delete it; move it out, or give a new or empty folder"
        )


def to_hugging_face(model: nn.Module) -> InnerloopForCausalLM:
    """``model`` (a :class:`~innerloop.models.CausalLM` or :class:`~innerloop.models.E2ELM`) as an
    :class:`InnerloopForCausalLM` with the same weights and dtype, in eval mode."""
    wrapped = InnerloopForCausalLM(InnerloopConfig(model=model.config))
    own = dict(model.named_parameters())
    with torch.no_grad():  # parameters take the model's dtypes; buffers keep theirs (E2E's is float64)
        for name, parameter in wrapped.model.named_parameters():
            parameter.data = parameter.data.to(own[name].dtype)
    wrapped.model.load_state_dict(model.state_dict(), strict=True)
    return wrapped.eval()


def is_export_folder(folder: Path) -> bool:
    """Whether ``folder`` holds an innerloop export (its config.json has ``model_type`` innerloop)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") == MODEL_TYPE


def check_target(out_dir: str | os.PathLike[str], overwrite: bool) -> Path:
    """``out_dir`` as a Path, if an export may be written there; else :class:`ExportError`."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"OUT_DIR {str(out)!r} is a file, not a folder; give a new or empty folder")
    if not out.is_dir() or not any(out.iterdir()):
        return out
    if not overwrite:
        raise ExportError(
            f"OUT_DIR {str(out)!r} is not empty; pass --overwrite to replace an earlier export there, "
            "or give a new or empty folder"
        )
    if not is_export_folder(out):
        raise ExportError(
            f"OUT_DIR {str(out)!r} holds files that are not an innerloop export (no config.json with "
            f"model_type {MODEL_TYPE!r}); --overwrite replaces only an earlier export: give a new or "
            "empty folder"
        )
    _refuse_foreign_entries(out)
    return out


def export_model(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    overwrite: bool = False,
    tokenizer: str | os.PathLike[str] | RunTokenizer | None = BYTES,
) -> Path:
    """Write ``model`` (an innerloop language model) as a Hugging Face folder at ``out_dir``.

    Args:
        model: a :class:`~innerloop.models.CausalLM` or :class:`~innerloop.models.E2ELM`.
        out_dir: the folder to write (created; see the module docstring for an existing one).
        overwrite: replace an earlier export at ``out_dir``.
        tokenizer: the tokenizer the model reads: a run's tokenizer (``innerloop.data.tokenizer``),
            ``"bytes"`` (innerloop's byte-level one), a ``tokenizer.json`` or a tokenizer folder (see :func:`innerloop.hf.tokenizer.load_tokenizer`),
            or None to write no tokenizer files (e.g. a converted model whose tokenizer is not at hand).

    Returns the folder's path.
    """
    out = check_target(out_dir, overwrite)
    wrapped = to_hugging_face(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        wrapped.save_pretrained(staging)
        if tokenizer is not None:
            try:
                write_tokenizer_files(staging, wrapped.config.vocab_size, tokenizer)
            except (ValueError, OSError) as err:
                raise ExportError(f"tokenizer: {' '.join(str(err).split())}") from None
        _sync_files(staging)
        _move_into_place(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out


def export_checkpoint(
    checkpoint: str | os.PathLike[str], out_dir: str | os.PathLike[str], overwrite: bool = False
) -> Path:
    """Export the model of a training checkpoint (a ``last.safetensors`` of ``innerloop train``).

    The weights are written in the dtype they are stored in (``load_model(..., keep_dtype=True)``):
    a ``bf16-true`` run's in bfloat16, a ``64-true`` run's in float64, any other's in float32, and
    ``config.json`` names that dtype (``dtype``, which ``from_pretrained(..., dtype="auto")`` loads).

    Raises :class:`~innerloop.checkpoints.CheckpointError` for a file that is not a readable
    checkpoint and :class:`ExportError` for a target that may not be written (checked first).
    """
    check_target(out_dir, overwrite)
    model = load_model(checkpoint, keep_dtype=True)  # the weights as trained, e.g. bfloat16
    return export_model(model, out_dir, overwrite=overwrite, tokenizer=run_tokenizer(checkpoint))


def run_tokenizer(checkpoint: str | os.PathLike[str]) -> RunTokenizer:
    """The tokenizer a training run used (recorded in its checkpoint; bytes when none is): the one
    place that decides which tokenizer files an export of a checkpoint gets."""
    return checkpoint_tokenizer(checkpoint)


def _sync_files(folder: Path) -> None:
    """Flush every file of ``folder`` to disk (before the rename makes them visible), each with the
    usual permissions (the weights file is written private, 0600, by the library that writes it)."""
    permissions = 0o666 & ~_umask()
    for path in folder.iterdir():
        if path.is_file():
            os.chmod(path, permissions)
            with open(path, "rb+") as f:
                os.fsync(f.fileno())


def _move_into_place(staging: Path, out: Path) -> None:
    """Rename ``staging`` to ``out``. An existing ``out`` (checked by :func:`check_target`) is first
    renamed aside and deleted only once the new folder is in place."""
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it 0700: give the usual permissions
    if not out.exists() or not any(out.iterdir()):
        os.replace(staging, out)  # onto an empty folder too (POSIX renames onto an empty directory)
        return
    _refuse_foreign_entries(out)  # again: files may have been added while the export was written
    aside = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
    aside.rmdir()
    os.replace(out, aside)
    os.replace(staging, out)
    shutil.rmtree(aside)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


__all__ = ["ExportError", "check_target", "export_checkpoint", "export_model", "to_hugging_face"]
