"""``innerloop export``: a training checkpoint (or any innerloop model) -> a Hugging Face folder.

The folder holds ``config.json`` (with ``auto_map``), ``model.safetensors``,
``generation_config.json``, the tokenizer files (when the model's tokenizer is known), the two
remote-code modules of :mod:`innerloop.hf.remote_code` and :data:`MANIFEST`, the list of the files
the export wrote. It is assembled in a temporary folder next to ``OUT_DIR`` and renamed into place, so
``OUT_DIR`` is never half written: an interrupted export leaves the previous folder (or none) and a
temporary ``.<name>.*.tmp`` folder, never a mix (killed between the two renames of an ``--overwrite``,
the previous folder waits in ``.<name>.*.old``); the next export settles them
(:func:`settle_interrupted_export`). An ``OUT_DIR`` that is a symbolic link is written
through: the folder it points to gets the export, the link stays.

An existing ``OUT_DIR`` is replaced only with ``overwrite=True`` and only when it is empty or an
earlier export (its ``config.json`` has ``model_type`` ``innerloop``). Only the files that earlier
export wrote itself, unchanged since (its :data:`MANIFEST` lists them with their sizes and checksums),
are replaced or deleted. Everything else in it is the user's (tokenizer files copied in, notes,
results, a file of the export edited since): it is kept, moved into the new folder, unless the new
export writes a file of the same name with other contents, which is refused naming it (nothing is
changed). An export written before the manifest existed: its model files (:data:`LEGACY_EXPORT_FILES`)
are taken as the export's, its tokenizer files as the user's (the docs told users to copy tokenizer
files into such folders).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from innerloop.checkpoints import (
    check_held_plugins,
    checkpoint_tokenizer,
    load_model,
    widest_parameter_dtype,
)
from innerloop.config.load import (
    ConfigError,
    argument_name,
    check_not_a_link_loop,
    check_output_dir,
    given_argument,
    given_flag,
)
from innerloop.core.compiled import plain_names, uncompiled
from innerloop.core.durable import fsync_directory
from innerloop.core.functional import check_path_argument, is_flag, user_path
from innerloop.data.atomic import file_sha256, flush_files_in
from innerloop.data.tokenizer import Tokenizer as RunTokenizer
from innerloop.data.tokenizer import TokenizerError, UnknownTokenizer
from innerloop.hf.configuration import MODEL_TYPE, InnerloopConfig
from innerloop.hf.modeling import (
    EXPORT_RECORD,
    EXPORT_RECORD_FORMAT,
    EXPORT_RECORD_VERSION,
    InnerloopForCausalLM,
    export_leftovers,
    export_record,
    set_buffer,
    unchanged_since_export,
)
from innerloop.hf.remote_code import SHIMS
from innerloop.hf.tokenizer import BYTES, load_tokenizer, write_tokenizer_files
from innerloop.models import E2ELM, CausalLM

log = logging.getLogger(__name__)


class ExportError(ValueError):
    """An export that cannot be made as asked (the target folder, the tokenizer); one line."""


MANIFEST = EXPORT_RECORD
"""The file, in every export, that lists the files the export wrote (name -> size and SHA-256; the
weights too, so that weights saved over an export, e.g. after fine-tuning, are never taken as the
export's): what a later ``--overwrite`` may replace or delete, and what ``from_pretrained`` checks the
weights against (:data:`innerloop.hf.modeling.EXPORT_RECORD`, read by its :func:`export_record`)."""

LEGACY_EXPORT_FILES: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",  # a large model's shards, and their index
    "model.safetensors.index.json",
    *SHIMS,  # the remote-code modules
)
"""Names (fnmatch patterns) of the files an export written before :data:`MANIFEST` existed is taken to
have written: the model's. Its tokenizer files are taken as the user's (a converted model's export had
none, and the docs said to copy the model's own into it)."""


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _write_manifest(staging: Path) -> None:
    files = {
        p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(staging.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {"format": EXPORT_RECORD_FORMAT, "version": EXPORT_RECORD_VERSION, "files": files}
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _export_owned(folder: Path) -> set[str]:
    """The files of the earlier export ``folder`` that it wrote itself and that are unchanged: the ones
    ``--overwrite`` may replace or delete."""
    listed = export_record(folder)
    if listed is None:  # written before the manifest existed: only the model's files are the export's
        return {
            p.name
            for p in folder.iterdir()
            if _matches(p.name, LEGACY_EXPORT_FILES) and p.is_file() and not p.is_symlink()
        }
    owned = {name for name, record in listed.items() if unchanged_since_export(folder / name, record)}
    return owned | {MANIFEST}


def _shown(names: list[str]) -> str:
    return ", ".join(names[:5] + ([f"and {len(names) - 5} more"] if len(names) > 5 else []))


def _entry_name(path: Path) -> str:
    return path.name + "/" if path.is_dir() and not path.is_symlink() else path.name


def foreign_entries(folder: str | os.PathLike[str]) -> list[str]:
    """The entries of an export ``folder`` that its :data:`MANIFEST` does not list (folders shown with a
    trailing ``/``): what a user added, which ``--overwrite`` keeps (by name only; ``--overwrite`` also
    keeps a listed file that changed since, which is checked by its checksum)."""
    folder = Path(folder)
    listed = export_record(folder)
    owned = _export_owned(folder) if listed is None else {*listed, MANIFEST}
    return sorted(_entry_name(p) for p in folder.iterdir() if p.name not in owned)


@dataclass
class _Replacement:
    """What replacing the earlier export ``out`` by the new one in ``staging`` does."""

    owned: set[str]  # the earlier export's own files: replaced or deleted
    kept: list[str]  # everything else in it: moved into the new folder


def _plan_replacement(out: Path, staging: Path) -> _Replacement:
    """Raise :class:`ExportError` (nothing changed) when an entry of ``out`` that its export did not
    write would be replaced by a different one of the new export; else say what happens to each."""
    owned = _export_owned(out)
    kept, clashes = [], []
    for entry in sorted(out.iterdir()):
        if entry.name in owned:
            continue
        new = staging / entry.name
        if not new.exists():
            kept.append(entry.name)
        elif (
            entry.is_symlink()
            or not entry.is_file()
            or not new.is_file()
            or file_sha256(entry) != file_sha256(new)
        ):
            clashes.append(_entry_name(entry))
        else:  # the same contents as the new export's file: replacing it loses nothing
            owned.add(entry.name)
    if clashes:
        raise ExportError(
            f"{argument_name('out_dir')} {str(out)!r} is an earlier export that also holds {_shown(clashes)}, "
            "which that export did not write (or that changed since), and the new export writes a different "
            f"file of that name: {given_flag('overwrite')} would replace it; move it out, or give a new or "
            "empty folder"
        )
    return _Replacement(owned, kept)


def to_hugging_face(model: nn.Module) -> InnerloopForCausalLM:
    """``model`` (a :class:`~innerloop.models.CausalLM` or :class:`~innerloop.models.E2ELM`) as an
    :class:`InnerloopForCausalLM` with the same weights and dtype, in eval mode."""
    model = uncompiled(model)  # a torch.compile'd model: the module it wraps
    # rebuilt from its config, the copy gets the plugins registered now: refused where they are not
    # the ones ``model`` computes with
    check_held_plugins("the model being converted to Hugging Face", model)
    # The kernel a run chose (triton_ttt_linear on a GPU) changes speed, not the model: the folder runs
    # wherever it is loaded, on the best path there.
    config = replace(model.config, ttt=replace(model.config.ttt, kernel="auto"))
    wrapped = InnerloopForCausalLM(InnerloopConfig(model=config))
    own = plain_names(dict(model.named_parameters()))  # a compiled block's: the uncompiled names
    with torch.no_grad():  # parameters take the model's dtypes; buffers keep theirs (E2E's is float64)
        for name, parameter in wrapped.model.named_parameters():
            parameter.data = parameter.data.to(own[name].dtype)
    wrapped.model.load_state_dict(plain_names(model.state_dict()), strict=True)
    own_buffers = plain_names(dict(model.named_buffers()))
    for name, buffer in list(wrapped.named_non_persistent_buffers()):  # not in the state dict
        source = own_buffers[name.removeprefix("model.")]
        # The tables as the model holds them, dtype and values: e.g. the RoPE table of a bfloat16 model,
        # and a float64 TTT layer's token index, exact where it was built in float64, rounded to float32
        # where a float32 model was cast (1/3 then differs in its 9th digit, and so do the logits).
        if source.dtype != buffer.dtype or not torch.equal(source.to(buffer.device), buffer):
            set_buffer(wrapped, name, source.to(device=buffer.device, copy=True))
    return wrapped.eval()


def is_export_folder(folder: Path) -> bool:
    """Whether ``folder`` holds an innerloop export (its config.json has ``model_type`` innerloop)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") == MODEL_TYPE


def _resolved_target(out_dir: str | os.PathLike[str], name: str = "OUT_DIR") -> Path:
    """``out_dir``, or the folder it points to when it is a symbolic link (written through)."""
    out = user_path(out_dir)
    if not out.is_symlink():
        return out
    try:
        check_not_a_link_loop(out, f"{name} {str(out)!r}")
    except ConfigError as err:
        raise ExportError(str(err)) from None
    target = Path(os.path.realpath(out))
    if not target.is_dir():
        what = "a file" if target.exists() else "nothing (a broken link)"
        raise ExportError(
            f"{name} {str(out)!r} is a symbolic link to {str(target)!r}, which is {what}, not a folder; "
            "give a folder, or a link to one"
        )
    return target


def _check_writable(out_dir: str | os.PathLike[str], out: Path, name: str) -> None:
    """:class:`ExportError` unless the folder ``out`` (``out_dir`` resolved) can be made, and its parent,
    where the export is assembled, written (checked before anything is written: a path under a file,
    or in a folder this user cannot write, is one line naming ``name``)."""
    try:
        check_output_dir(out_dir, name)
    except ConfigError as err:
        raise ExportError(str(err)) from None
    parent = out.absolute().parent
    if out.is_dir() and not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(
            f"{name} {str(out_dir)!r} cannot be written: the export is assembled beside it, in "
            f"{str(parent)!r}, which this user cannot write; give a folder in a writable one"
        )


def check_target(out_dir: str | os.PathLike[str], overwrite: bool, name: str | None = None) -> Path:
    """The folder an export to ``out_dir`` writes (``out_dir`` itself, or the folder a symbolic link
    ``out_dir`` points to), if an export may be written there; else :class:`ExportError`, naming
    ``out_dir`` as ``name`` (the command's argument; by default ``out_dir`` as its caller gave it,
    :func:`~innerloop.config.load.argument_name`, and ``overwrite`` likewise). (Which files of an earlier export are kept is
    decided once the new one is written: see the module docstring.) What an interrupted export left
    beside it is settled first (:func:`settle_interrupted_export`)."""
    if not is_flag(overwrite):  # a numpy bool too (core.functional's rule for flags)
        raise TypeError(f"overwrite must be True or False, got {overwrite!r}")
    name = argument_name("out_dir") if name is None else name
    check_path_argument(out_dir, name)  # Path(None) failed in pathlib, naming no argument
    out = _resolved_target(out_dir, name)
    settle_interrupted_export(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{name} {str(out_dir)!r} is a file, not a folder; give a new or empty folder")
    _check_writable(out_dir, out, name)
    if not out.is_dir() or not any(out.iterdir()):
        return out
    if not overwrite:
        raise ExportError(
            f"{name} {str(out_dir)!r} is not empty; pass {given_flag('overwrite')} to replace an earlier "
            "export there, "
            "or give a new or empty folder"
        )
    if not is_export_folder(out):
        raise ExportError(
            f"{name} {str(out_dir)!r} holds files that are not an innerloop export (no config.json with "
            f"model_type {MODEL_TYPE!r}); {given_flag('overwrite')} replaces only an earlier export: give a new or "
            "empty folder"
        )
    return out


def export_model(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    overwrite: bool = False,
    tokenizer: str | os.PathLike[str] | RunTokenizer | None = BYTES,
    special_tokens: Mapping[str, int | list[int]] | None = None,
) -> Path:
    """Write ``model`` (an innerloop language model) as a Hugging Face folder at ``out_dir``.

    Args:
        model: a :class:`~innerloop.models.CausalLM` or :class:`~innerloop.models.E2ELM`.
        out_dir: the folder to write (created; see the module docstring for an existing one, and for a
            symbolic link).
        overwrite: replace an earlier export at ``out_dir`` (keeping what it holds that it did not write).
        tokenizer: the tokenizer the model reads: a run's tokenizer (``innerloop.data.tokenizer``),
            ``"bytes"`` (innerloop's byte-level one), a ``tokenizer.json`` or a tokenizer folder (see
            :func:`innerloop.hf.tokenizer.load_tokenizer`), or None (or an
            :class:`~innerloop.data.tokenizer.UnknownTokenizer`) to write no tokenizer files (e.g. a
            converted model whose tokenizer is not at hand).
        special_tokens: token ids by name (``bos_token_id``, ``eos_token_id``, ``pad_token_id``) for
            ``config.json`` and ``generation_config.json``, e.g. those of a converted model's original
            config (transformers' ``generate`` stops at ``eos_token_id``, which may be a list of ids).

    Returns ``out_dir``'s path.

    A model of several dtypes (a bfloat16 model with float32 norms) is written in the widest of them:
    ``config.json`` records one dtype, to which ``from_pretrained`` casts every weight, so the float32
    ones would load rounded.
    """
    if not isinstance(uncompiled(model), (CausalLM, E2ELM)):  # a compiled model: the one it wraps
        raise TypeError(
            "model must be an innerloop language model (innerloop.models.CausalLM or E2ELM, as "
            f"build_model or load_model make them), got {type(model).__name__}"
        )
    out = check_target(out_dir, overwrite)
    if isinstance(tokenizer, UnknownTokenizer):
        tokenizer = None
    wrapped = _in_one_dtype(to_hugging_face(model))
    loaded = None if tokenizer is None else _load_tokenizer(tokenizer)  # read once, before writing
    special_tokens = {**_end_of_text(loaded, wrapped.config.vocab_size), **(special_tokens or {})}
    _set_special_tokens(wrapped, special_tokens)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        wrapped.save_pretrained(staging)
        if loaded is not None:
            _write_tokenizer(staging, wrapped.config.vocab_size, loaded)
        _write_manifest(staging)
        # the bytes on disk before the rename makes them visible; the usual permissions (the weights file
        # is written private, 0600, by the library that writes it)
        flush_files_in(staging, mode=0o666 & ~_umask())
        fsync_directory(staging)  # its entries, before the rename names them
        _move_into_place(staging, out)
        fsync_directory(out.parent)  # the rename itself: a power cut after it keeps the new export
    finally:
        if os.path.lexists(staging):  # the new export is not in place
            _undo_staging(staging, out)
    return user_path(out_dir)


def _undo_staging(staging: Path, out: Path) -> None:
    """Settle the staging folder of an export that failed or was stopped before it was in place, by its
    record as a later export settles one (:func:`_settle_staging`): what the export wrote is deleted, the
    user's files that ``--overwrite`` had moved in go back into ``out``, whichever of them the failure
    (a second Ctrl-C among them) left there. A file that cannot go back keeps the folder; a warning
    names it."""
    done = _settle_staging(staging, out)
    if os.path.lexists(staging):
        log.warning("the export to %s did not replace it: %s", out, done)


def _in_one_dtype(wrapped: InnerloopForCausalLM) -> InnerloopForCausalLM:
    """``wrapped`` with every floating-point parameter in the widest dtype among them (unchanged when they
    share one; tied weights stay tied): the one dtype ``config.json`` records loads every weight as saved."""
    widest = widest_parameter_dtype(wrapped)
    if any(p.is_floating_point() and p.dtype != widest for p in wrapped.parameters()):
        with torch.no_grad():
            for parameter in wrapped.parameters():
                if parameter.is_floating_point():
                    parameter.data = parameter.data.to(widest)
    return wrapped


SPECIAL_TOKEN_NAMES = ("bos_token_id", "eos_token_id", "pad_token_id")


def _set_special_tokens(wrapped: InnerloopForCausalLM, special_tokens: Mapping[str, int | list[int]]) -> None:
    """Set ``special_tokens`` in ``wrapped``'s config and generation config, refused (an
    :class:`ExportError` starting ``special_tokens:``, before anything is written) where the folder's
    loader would refuse them: a name other than :data:`SPECIAL_TOKEN_NAMES`, or an id past the
    vocabulary."""
    unknown = sorted(set(special_tokens) - set(SPECIAL_TOKEN_NAMES))
    if unknown:
        raise ExportError(f"special_tokens: unknown names {unknown}; valid: {list(SPECIAL_TOKEN_NAMES)}")
    try:  # the config refuses an id past the vocabulary as it is set (or, for an older one, when checked)
        for name, token_id in special_tokens.items():
            setattr(wrapped.config, name, token_id)
            setattr(wrapped.generation_config, name, token_id)
        wrapped.config.check_special_token_ids()
    except ValueError as err:
        raise ExportError(f"special_tokens: {err}") from None


def _load_tokenizer(tokenizer: str | os.PathLike[str] | RunTokenizer) -> PreTrainedTokenizerBase:
    """:func:`~innerloop.hf.tokenizer.load_tokenizer`, its errors an :class:`ExportError` starting
    ``tokenizer:`` that says what is valid. A file that is not a tokenizer.json makes the ``tokenizers``
    library raise a bare ``Exception``."""
    valid = "valid: 'bytes', a tokenizer.json file or a tokenizer folder"
    try:
        return load_tokenizer(tokenizer)
    except TokenizerError as err:  # innerloop's reading of a tokenizer.json file
        raise ExportError(f"tokenizer: {' '.join(str(err).split())}; {valid}") from None
    except (ValueError, OSError) as err:
        message = " ".join(str(err).split())
        if isinstance(tokenizer, (str, os.PathLike)) and Path(tokenizer).is_dir():  # AutoTokenizer's error
            message = (
                f"{str(tokenizer)!r} is a folder from which transformers cannot load a tokenizer ({message})"
            )
        raise ExportError(f"tokenizer: {message}; {valid}") from None
    except Exception as err:  # noqa: BLE001 - the tokenizers library's parse errors are bare Exceptions
        raise ExportError(
            f"tokenizer: {str(tokenizer)!r} cannot be read as a tokenizer ({' '.join(str(err).split())}); {valid}"
        ) from None


def _end_of_text(tokenizer: PreTrainedTokenizerBase | None, vocab_size: int) -> dict[str, int]:
    """``eos_token_id`` of the tokenizer the export writes, when the model can produce it (a BPE
    tokenizer's <|endoftext|>; not the byte tokenizer's, id 256, past the model's bytes), so that
    transformers' ``generate`` stops there as ``innerloop generate`` does."""
    eos = None if tokenizer is None else tokenizer.eos_token_id
    return {"eos_token_id": eos} if isinstance(eos, int) and 0 <= eos < vocab_size else {}


def _write_tokenizer(staging: Path, vocab_size: int, tokenizer: PreTrainedTokenizerBase) -> None:
    """:func:`write_tokenizer_files`, its refusal (a tokenizer larger than the model's vocabulary) an
    :class:`ExportError` starting ``tokenizer:``."""
    try:
        write_tokenizer_files(staging, vocab_size, tokenizer)
    except ValueError as err:
        raise ExportError(f"tokenizer: {' '.join(str(err).split())}") from None


def export_checkpoint(
    checkpoint: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    overwrite: bool = False,
    tokenizer: str | os.PathLike[str] | RunTokenizer | None = None,
) -> Path:
    """Export the model of a training checkpoint (a ``last.safetensors`` of ``innerloop train``, or one
    ``innerloop convert`` wrote).

    The weights are written in the dtype they are stored in (``load_model(..., keep_dtype=True)``):
    a ``bf16-true`` run's in bfloat16, a ``64-true`` run's in float64, any other's in float32, and
    ``config.json`` names that dtype (``dtype``, which ``from_pretrained(..., dtype="auto")`` loads).

    ``tokenizer``: the tokenizer files to write (as :func:`export_model` takes it); None, the default,
    is the tokenizer the checkpoint records (:func:`run_tokenizer`): none for a converted checkpoint
    that records its tokenizer as unknown.

    Raises :class:`~innerloop.checkpoints.CheckpointError` for a file that is not a readable
    checkpoint and :class:`ExportError` for a target that may not be written (checked first).
    """
    check_path_argument(checkpoint, "checkpoint")
    check_target(out_dir, overwrite)
    recorded = tokenizer is None
    if recorded:
        tokenizer = run_tokenizer(checkpoint)
    model = load_model(checkpoint, keep_dtype=True)  # the weights as trained, e.g. bfloat16
    try:
        return export_model(model, out_dir, overwrite=overwrite, tokenizer=tokenizer)
    except ExportError as err:
        if not recorded or not str(err).startswith("tokenizer:"):
            raise
        raise ExportError(
            f"{err} (the tokenizer {str(checkpoint)!r} records, {tokenizer.describe()}); give the model's "
            f"own tokenizer with {given_argument('tokenizer', 'TOKENIZER', placeholder=True)}"
        ) from None


def run_tokenizer(checkpoint: str | os.PathLike[str]) -> RunTokenizer:
    """The tokenizer a checkpoint records (bytes when it records none, as an older training run's;
    an :class:`~innerloop.data.tokenizer.UnknownTokenizer`, for which an export writes no tokenizer
    files, when it records that its tokenizer is unknown): the one place that decides which tokenizer
    files an export of a checkpoint gets without ``--tokenizer``."""
    return checkpoint_tokenizer(checkpoint)


def _move_into_place(staging: Path, out: Path) -> None:
    """Rename ``staging`` to ``out`` (an empty or missing folder, or an earlier export that
    :func:`check_target` accepted). An earlier export's entries that it did not write are first moved
    into ``staging`` (:func:`_plan_replacement`), the earlier export is renamed aside, ``staging`` into
    place, and only then are the earlier export's own files deleted (also when a Ctrl-C comes once the
    new folder is in place: a second one there leaves ``.<name>.*.old`` to the next export's settling).
    Any failure before the new folder is in place puts everything back where it was."""
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it 0700: give the usual permissions
    if not out.exists() or not any(out.iterdir()):
        os.replace(staging, out)  # onto an empty folder too (POSIX renames onto an empty directory)
        return
    plan = _plan_replacement(out, staging)  # checked now: files may have been added during the export
    aside = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
    aside.rmdir()
    try:
        # the staging folder's record names what the export wrote: anything else in it is the user's,
        # moved in here, which a failure puts back from it whatever was moved (_undo_staging)
        for name in plan.kept:
            os.rename(out / name, staging / name)
        os.replace(out, aside)
        os.replace(staging, out)
    except BaseException:
        # the new export not in place: the earlier one goes back as it was (set aside already where a Ctrl-C
        # landed as that rename returned); the user's files go back from staging (export_model's _undo_staging)
        if os.path.lexists(staging) and not os.path.lexists(out) and os.path.lexists(aside):
            os.replace(aside, out)
        elif not os.path.lexists(staging) and os.path.lexists(aside):
            # the new export in place as the stop came (a Ctrl-C raised as its rename returned): the
            # earlier one's own files go now, not at the next export; anything else of it stays
            _delete_own_files(aside, plan.owned)
        raise
    try:
        _delete_earlier_export(aside, plan.owned, out)
    except KeyboardInterrupt:  # a Ctrl-C while it was deleted: finish (a few unlinks), then stop
        _delete_own_files(aside, plan.owned)
        raise


def _delete_earlier_export(aside: Path, owned: set[str], out: Path) -> None:
    """Delete the earlier export's own files from ``aside``, then ``aside``; anything else found there
    (added while the export was replaced) is left, and said."""
    left = _delete_own_files(aside, owned)
    if left:
        raise ExportError(
            f"the new export is in OUT_DIR {str(out)!r}, but the earlier one held files added while it "
            f"was replaced ({_shown(left)}): they are kept in {str(aside)!r}"
        )


def _delete_own_files(aside: Path, owned: set[str]) -> list[str]:
    """Delete the files ``owned`` of the earlier export set aside in ``aside`` and, when nothing else is
    left, ``aside``; else return what is left (folders with a trailing ``/``). Its record goes last, and
    only with the folder: with files of the user's left, it says they are theirs (without it, a later
    settling would take model-named files for the export's, :data:`LEGACY_EXPORT_FILES`)."""
    for name in owned - {MANIFEST}:
        path = aside / name
        if path.is_file() or path.is_symlink():
            path.unlink()  # a link itself, never what it points to
    left = sorted(_entry_name(p) for p in aside.iterdir() if p.name != MANIFEST or MANIFEST not in owned)
    if left:
        return left
    if MANIFEST in owned and (aside / MANIFEST).is_file():
        (aside / MANIFEST).unlink()
    aside.rmdir()
    return []


def settle_interrupted_export(out_dir: str | os.PathLike[str]) -> list[str]:
    """Settle what an export to ``out_dir`` that was killed left beside it, and say so in one line
    (a warning); return what was done, one phrase each.

    - ``OUT_DIR`` missing (killed between its two renames): the earlier export, renamed aside
      (``.<name>.*.old``), is put back.
    - Staging folders (``.<name>.*.tmp``): the files the export wrote (its :data:`MANIFEST` lists them;
      without one, it had not yet moved anything of the user's in) are deleted, and the user's files
      that an ``--overwrite`` had moved in from ``OUT_DIR`` are moved back into it.
    - An earlier export set aside while the new one is in place (killed while deleting it): its own
      unchanged files are deleted, as the export would have.

    Nothing of the user's is deleted: a file that cannot go back (its name is taken in ``OUT_DIR``) or
    a folder that still holds something after this stays where it is, and the line names it."""
    out = user_path(out_dir)
    done: list[str] = []
    earlier = export_leftovers(out, ".old")
    if not out.exists() and earlier:
        os.replace(earlier[-1], out)  # the most recent one set aside: the export OUT_DIR held last
        done.append(f"put the earlier export back from {earlier.pop().name}")
    for staging in export_leftovers(out, ".tmp"):
        done.append(_settle_staging(staging, out))
    if is_export_folder(out):
        done += [_settle_set_aside(aside) for aside in earlier]
    elif earlier:
        done += [f"left {aside.name} (OUT_DIR holds no export to replace it)" for aside in earlier]
    if done:
        log.warning("settled an interrupted export to %s: %s", out, "; ".join(done))
    return done


def _settle_staging(staging: Path, out: Path) -> str:
    """Move the user's entries of the staging folder ``staging`` back into ``out`` and delete the rest
    (what the export wrote); one phrase saying what was done."""
    listed = export_record(staging)
    written = None if listed is None else {*listed, MANIFEST}
    users = [p for p in staging.iterdir() if written is not None and p.name not in written]
    stuck = []
    for entry in users:
        if out.is_dir() and not os.path.lexists(out / entry.name):
            os.rename(entry, out / entry.name)
        else:
            stuck.append(_entry_name(entry))
    for entry in staging.iterdir():
        # With files of the user's left, the record stays too: it tells the next settling that they are
        # the user's (without it, every file here would be taken as the export's, and deleted).
        if _entry_name(entry) in stuck or (stuck and entry.name == MANIFEST):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    moved = [p.name for p in users if _entry_name(p) not in stuck]
    back = f", moved {_shown(moved)} back into OUT_DIR" if moved else ""
    if stuck:
        return f"kept {staging.name}{back}: it holds {_shown(stuck)} of yours, whose names OUT_DIR has taken"
    staging.rmdir()
    return f"removed the unfinished export {staging.name}{back}"


def _settle_set_aside(aside: Path) -> str:
    """Delete the earlier export set aside in ``aside`` (its own unchanged files, then the folder); one
    phrase. Anything else in it stays, and the phrase names it."""
    left = _delete_own_files(aside, _export_owned(aside))
    if left:
        return f"kept {aside.name}, which holds {_shown(left)} that the earlier export did not write"
    return f"removed the replaced earlier export {aside.name}"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


__all__ = [
    "MANIFEST",
    "ExportError",
    "check_target",
    "export_checkpoint",
    "export_model",
    "foreign_entries",
    "settle_interrupted_export",
    "to_hugging_face",
]
