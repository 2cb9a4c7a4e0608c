"""Checkpoints as single safetensors files; nothing is ever unpickled.

A Lightning checkpoint is a tree of dicts, lists and tuples whose leaves are tensors, numbers, strings
and None (weights, optimizer moments, loop counters, callback states, hyperparameters). We store the
tensors as safetensors entries and the rest of the tree as JSON in the safetensors metadata, under the
key ``innerloop.tree``, with each tensor replaced by a reference to its entry. Loading parses JSON and
safetensors only, so a checkpoint from an untrusted source cannot run code.

Integrity: the metadata also holds ``innerloop.sha256``, a SHA-256 over the tree's JSON and every
tensor (name, dtype, shape and bytes, in sorted name order, see :func:`checkpoint_digest`). Loading
recomputes it, so a flipped byte anywhere in the data is reported as corruption instead of surfacing
later as NaN weights. The tree's JSON is parsed with bounds on its size and nesting depth.

Versions: format version 2 carries the checksum. Version 1 (innerloop before checksums) is still read,
with a :class:`UnverifiedCheckpointWarning`, so that older runs stay usable; saving it again (e.g. by
resuming the run) upgrades it. A file of a newer version is refused with a request to upgrade.

Plugins: a checkpoint with a model records, under :data:`PLUGINS_KEY`, where each plugin that model
uses came from (:func:`plugin_record`: the registry's origin and, for an entry-point plugin, its
distribution and version, for one registered in the process, its class), and under
:data:`PLUGIN_SOURCES_KEY` a digest of the source of each plugin not built in (in-process or installed)
(:func:`plugin_source_digest`). :func:`load_checkpoint` warns once (:class:`PluginChangedWarning`) for
each that is registered now by another plugin (:func:`same_plugin`), or by the same class whose source
changed since; the record also keeps each plugin object's settings (:func:`plugin_settings`), and the
same plugin registered now with other settings is refused, or warned of where the plugin declares none
(:func:`check_plugin_settings`); a name
registered by no plugin makes the model's rebuild error also say where it came from (:func:`rebuild_error`). A checkpoint without the records (written before they existed) loads as
before.

Every problem with a file (missing, a directory, truncated, not safetensors, another format, a newer
version, a checksum mismatch, a malformed tree, weights that do not fit the model) raises one
:class:`CheckpointError` whose message is a single line naming the file and what is wrong.

:func:`load_model` rebuilds the model a training checkpoint holds. Nothing here imports Lightning
(seconds at start-up), so ``innerloop generate`` and the Hugging Face export read checkpoints without
it; :class:`innerloop.train.checkpoint.SafetensorsCheckpointIO` plugs this format into Lightning.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import math
import os
import re
import reprlib
import sys
import unicodedata
import warnings
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from innerloop.config.load import CHECKPOINT_SUFFIX, checkpoint_path_problem
from innerloop.core.callers import warning_stacklevel
from innerloop.core.compiled import COMPILED as COMPILED  # re-exported, as before: see core.compiled
from innerloop.core.compiled import plain_names as plain_names
from innerloop.core.functional import check_flag, check_path_argument, first_non_finite, user_path
from innerloop.core.identity import IdentityTable
from innerloop.core.layer import TTTLayer, check_kernel_takes_layer
from innerloop.core.protocol import no_kernel_reason
from innerloop.core.wording import a_type
from innerloop.data.atomic import atomic_write, file_sha256, file_stamp
from innerloop.data.tokenizer import Tokenizer, tokenizer_from_state
from innerloop.kernels.dispatch import TORCH_PATH, refused_named_kernels
from innerloop.models import E2ELM, CausalLM, ModelConfig, build_model
from innerloop.models.config import (
    PLUGIN_FIELDS,
    PLUGIN_SECTIONS,
    reset_unused_family_options,
    with_earlier_defaults,
)
from innerloop.registry import get_registry
from innerloop.registry.kinds import KIND_NAMES
from innerloop.registry.manager import BUILTIN_PREFIX
from innerloop.registry.settings import declares_settings, is_no_setting, plugin_settings

FORMAT = "innerloop-checkpoint"
FORMAT_VERSION = "2"
UNVERIFIED_VERSION = "1"
"""The format version before checksums: read with an :class:`UnverifiedCheckpointWarning`."""

MAX_TREE_CHARS = 64 * 2**20
"""Largest JSON tree read (64 MiB; a training checkpoint's is a few KiB: the tensors are not in it)."""
MAX_TREE_DEPTH = 64
"""Deepest nesting of the JSON tree read (a Lightning checkpoint nests about 8 deep)."""

TOKENIZER_KEY = "tokenizer"
"""The checkpoint key holding the run's tokenizer (:meth:`~innerloop.data.tokenizer.Tokenizer.to_state`:
the whole tokenizer.json as text). ``innerloop convert`` records the tokenizer ``--tokenizer`` names, or
without it ``{"kind": "unknown"}`` (:class:`~innerloop.data.tokenizer.UnknownTokenizer`: the model's
tokenizer is not known, so no text is read with it). A checkpoint without the key is one of an older
innerloop training run, which was byte-level (a recall run's too: its data are token ids)."""

PLUGINS_KEY = "innerloop_plugins"
"""The checkpoint key recording where each plugin the model uses came from (:func:`plugin_record`):
``{kind: {name: {"origin": ..., "distribution": ..., "version": ...}}}``, or ``{"origin": ...,
"class": ...}`` for a plugin registered in the process (no distribution), each with ``"settings"`` where
the plugin object has any (:func:`plugin_settings`). Loading compares it with
the plugins registered then (:func:`warn_changed_plugins`). A checkpoint without it (written before
innerloop recorded it) loads as before, unchecked."""

PLUGIN_SOURCES_KEY = "innerloop_plugin_sources"
"""The checkpoint key recording, for each plugin the model uses that was registered in the process (not
built in, not an installed distribution's: those are told apart by origin and version), the SHA-256 of
its class's source (:func:`plugin_source_digest`): ``{kind: {name: digest}}``. The class path alone
(:data:`PLUGINS_KEY`) does not change when the code of ``module.Class`` does; loading warns
(:class:`PluginChangedWarning`) when the class registered now is the recorded one but its source
differs. The digest is of the source text, as read when the run started (:data:`_SOURCE_DIGESTS`), so an
edit of comments or layout counts as a change. A plugin whose source cannot be read records no digest,
and its reload compares its class alone; a checkpoint without the key (written before it existed) loads
without this check."""

_TREE_KEY = "innerloop.tree"
_DIGEST_KEY = "innerloop.sha256"


class CheckpointError(ValueError):
    """A file that is not a readable innerloop checkpoint (missing, corrupt, of another format or
    version, or holding weights that do not fit the model). The message is one line naming the file."""


class NewerCheckpointError(CheckpointError):
    """A checkpoint of a format version newer than this innerloop reads: a whole file, most likely, that
    an upgrade of innerloop reads (so never to be removed as damaged)."""


class CheckpointUnreadableError(CheckpointError):
    """A checkpoint the file system would not let this process read (permission denied, an I/O error of a
    network mount): nothing is known of the file itself, which may be whole."""


_WARNED_UNVERIFIED: set[str] = set()
"""The format-version-1 files warned about in this process (:class:`UnverifiedCheckpointWarning`)."""


class UnverifiedCheckpointWarning(UserWarning):
    """A checkpoint of format version 1, which has no checksum, was read without an integrity check."""


class _TreeError(ValueError):
    """The JSON tree of a checkpoint is not one that :func:`save_checkpoint` writes."""


# -- the tree <-> (tensors, JSON) encoding -------------------------------------------------------------


def _encode(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    """JSON-able form of ``obj``; tensors are moved into ``tensors`` and replaced by their key."""
    if isinstance(obj, torch.Tensor):
        _check_storable(obj, where)
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


def _check_storable(tensor: torch.Tensor, where: str) -> None:
    """A TypeError naming ``where`` for a tensor a checkpoint cannot hold: one on the meta device (no
    values) or of a sparse layout (safetensors holds dense, strided tensors); torch's own errors named
    neither the tensor nor the fix."""
    if tensor.device.type == "meta":
        raise TypeError(
            f"cannot store a meta tensor at checkpoint{where}: it has no values (materialize the model, "
            "e.g. model.to_empty(device='cpu') and load or initialize its weights, before saving)"
        )
    if tensor.layout != torch.strided:
        layout = str(tensor.layout).removeprefix("torch.")
        raise TypeError(
            f"cannot store a {layout} tensor at checkpoint{where}: a checkpoint holds dense tensors; "
            "store tensor.to_dense()"
        )


def _decode(obj: Any, tensors: dict[str, torch.Tensor], depth: int = 0) -> Any:
    """Inverse of :func:`_encode`; raises :class:`_TreeError` for anything it would not have written."""
    if depth > MAX_TREE_DEPTH:
        raise _TreeError(f"its tree nests deeper than {MAX_TREE_DEPTH} levels")
    if isinstance(obj, list):
        return [_decode(v, tensors, depth + 1) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        key = obj["__tensor__"]
        if len(obj) != 1 or not isinstance(key, str) or key not in tensors:
            raise _TreeError(f"its tree refers to a tensor {key!r} that the file does not hold")
        return tensors[key]
    if "__tuple__" in obj:
        items = obj["__tuple__"]
        if len(obj) != 1 or not isinstance(items, list):
            raise _TreeError("its tree has a malformed tuple")
        return tuple(_decode(v, tensors, depth + 1) for v in items)
    if "__dict__" in obj:
        pairs = obj["__dict__"]
        if len(obj) != 1 or not isinstance(pairs, list) or not all(_is_pair(p) for p in pairs):
            raise _TreeError("its tree has a malformed dict")
        decoded = {}
        for key, value in pairs:
            key = _decode(key, tensors, depth + 1)
            if isinstance(key, (list, dict, torch.Tensor)):
                raise _TreeError(f"its tree has a dict key of type {type(key).__name__}")
            decoded[key] = _decode(value, tensors, depth + 1)
        return decoded
    return {k: _decode(v, tensors, depth + 1) for k, v in obj.items()}


def _is_pair(item: Any) -> bool:
    return isinstance(item, list) and len(item) == 2


def checkpoint_digest(tree_json: str, tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of a checkpoint's JSON tree and its tensors: for each tensor in sorted name order,
    its name, dtype, shape and raw bytes. Stored as ``innerloop.sha256`` and checked on load."""
    digest = hashlib.sha256(tree_json.encode("utf-8"))
    for key in sorted(tensors):
        tensor = tensors[key].detach().to("cpu").contiguous()
        digest.update(f"\0{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


_VERSION_KEY = "innerloop_version"  # the innerloop that wrote a checkpoint (not covered by the checksum)


def widest_parameter_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The widest dtype among ``model``'s floating-point parameters (None: it has none): the one dtype a
    file of it is written in, so that a model of several (a bfloat16 model with float32 norms) loses no
    weight to rounding; a checkpoint and ``config.json`` each record one dtype."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return functools.reduce(torch.promote_types, dtypes) if dtypes else None


def innerloop_version() -> str:
    """This innerloop's version (the package is imported before any of its modules)."""
    return getattr(sys.modules.get("innerloop"), "__version__", "unknown")


def written_by(path: str | os.PathLike[str]) -> str | None:
    """The version of the innerloop that wrote the checkpoint at ``path`` (None: not recorded, as in
    checkpoints before 0.1.0's, or not readable)."""
    try:
        with safe_open(str(user_path(path)), framework="pt", device="cpu") as f:
            return (f.metadata() or {}).get(_VERSION_KEY)
    except (SafetensorError, OSError, ValueError):
        return None


def holds_training_state(path: str | os.PathLike[str]) -> bool:
    """Whether the checkpoint at ``path`` holds a training run's state (its ``global_step``: written by
    ``innerloop train``), not only a model (``innerloop convert``, :func:`~innerloop.train.module.
    save_model_checkpoint`). Read from its metadata alone, unverified; False for a file that cannot be
    read."""
    tree = _metadata_tree(path)
    return isinstance(tree, dict) and "global_step" in tree


def saved_model_config(path: str | os.PathLike[str], model: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's model config as this innerloop builds it: ``model.family`` keys its member does not
    read, which never had an effect, at their defaults (:func:`reset_unused_family_options`), with a
    warning naming them."""
    model, reset = reset_unused_family_options(model)
    if reset:
        warnings.warn(
            f"{str(path)!r} records {', '.join(reset)}, which mixer {model.get('mixer')!r} does not read (it "
            "never had an effect): loaded with the defaults",
            stacklevel=warning_stacklevel(),
        )
    return _with_a_registered_kernel(path, model)


def _with_a_registered_kernel(path: str | os.PathLike[str], model: dict[str, Any]) -> dict[str, Any]:
    """``model`` with a ``ttt.kernel`` that no plugin registers here (the training run's, from a plugin
    not installed on this machine), or that a layer now refuses at construction, accepted (and never
    run) before: named for an update rule whose blocks never reach a kernel (``no_kernel_reason``), or
    at a mini-batch size the kernel does not run (``check_mini_batch_size``: ``delta_chunk`` at K != 1),
    replaced by ``"auto"``, with a warning: a kernel changes speed, not the model, so the checkpoint
    loads."""
    ttt = model.get("ttt")
    kernel = ttt.get("kernel") if isinstance(ttt, dict) else None
    if not isinstance(kernel, str) or kernel in ("auto", TORCH_PATH):
        return model
    specs = {spec.name: spec for spec in get_registry().kernels()}
    if kernel not in specs:
        why = "which no plugin registers here (is its package installed?)"
    else:
        why = _refused_kernel_reason(specs[kernel], ttt)
        if why is None:
            return model
    warnings.warn(
        f"{str(path)!r} was trained with model.ttt.kernel={kernel!r}, {why}; its TTT layers run with "
        "kernel='auto' (a kernel changes speed, not the model)",
        stacklevel=warning_stacklevel(),
    )
    return {**model, "ttt": {**ttt, "kernel": "auto"}}


def _refused_kernel_reason(spec: Any, ttt: Mapping[str, Any]) -> str | None:
    """Why a layer of the ``ttt`` section would refuse the registered kernel ``spec`` at construction,
    which it accepted when the checkpoint was written (the rule's ``no_kernel_reason``; the kernel's
    ``check_mini_batch_size`` / ``check_wrapping``, asked by the layer's own
    :func:`~innerloop.core.layer.check_kernel_takes_layer`: ``delta_chunk`` at ``K != 1`` or with the
    inner LayerNorm or residual on, refused at its first call before), else None."""
    rule_reason = _no_kernel_reason(ttt.get("update_rule"))
    if rule_reason is not None:
        return f"which update_rule={ttt.get('update_rule')!r} never runs ({rule_reason})"
    defaults = ModelConfig().ttt
    size = ttt.get("mini_batch_size", defaults.mini_batch_size)
    wrapping = (
        ttt.get("inner_norm", defaults.inner_norm),
        ttt.get("inner_residual", defaults.inner_residual),
    )
    if not isinstance(size, int) or not all(isinstance(on, bool) for on in wrapping):
        return None  # the config's own check names the value
    try:
        check_kernel_takes_layer(spec, wrapping, size)
    except ValueError as refusal:
        return f"which this layer cannot use ({refusal})"
    return None


def _no_kernel_reason(rule_name: Any) -> str | None:
    """The registered update rule ``rule_name``'s ``no_kernel_reason`` (why its blocks never reach a
    kernel, so a layer naming one is refused: checkpoints saved before that refusal name one); None for
    a rule that reaches kernels or is not registered here (the config's own check names it)."""
    registry = get_registry()
    if not isinstance(rule_name, str) or rule_name not in registry.names("update_rule"):
        return None
    return no_kernel_reason(registry.update_rule(rule_name))


def missing_config_keys(given: Any, full: Mapping[str, Any], prefix: str = "model.") -> list[str]:
    """The dotted keys of ``full`` (a complete model config, ``ModelConfig().to_dict()``) that ``given``
    (a stored one) lacks."""
    if not isinstance(given, Mapping):
        return []
    missing = []
    for key, value in full.items():
        if key not in given:
            missing.append(f"{prefix}{key}")
        elif isinstance(value, Mapping):
            missing += missing_config_keys(given[key], value, f"{prefix}{key}.")
    return missing


def missing_keys_note(given: Any, source: str, shown: int = 6) -> str:
    """``""``, or a sentence for an error about weights that do not fit the model a stored config
    ``given`` (a model section) describes: the keys it lacks, named with the defaults they were given
    (a missing ``hidden_size`` gives the default width, and every weight then seems wrong). Only for
    such errors: a config written before a key existed lacks it, and loads with its default."""
    defaults = ModelConfig().to_dict()
    missing = missing_config_keys(given, defaults)
    if not missing:
        return ""
    named = []
    for dotted in missing[:shown]:
        value: Any = defaults
        for part in dotted.removeprefix("model.").split("."):
            value = value[part]
        named.append(f"{dotted} (given the default {value!r})" if not isinstance(value, Mapping) else dotted)
    more = f" and {len(missing) - shown} more" if len(missing) > shown else ""
    return (
        f"; {source} lacks {', '.join(named)}{more}: the weights may fit other values of these keys "
        "(add them, with the values the model was trained with)"
    )


def rebuild_error(path: str | os.PathLike[str], err: BaseException) -> CheckpointError:
    """The error for a checkpoint whose model this innerloop cannot rebuild from its hyperparameters;
    when another innerloop wrote it, the message says which, and when a plugin it records is not
    registered here, where that plugin came from (:func:`missing_plugins_note`)."""
    written, ours = written_by(path), innerloop_version()
    other = f" (it was written by innerloop {written}; this is {ours})" if written not in (None, ours) else ""
    missing = missing_plugins_note(recorded_plugins(path))
    reason = f"{_one_line(err).rstrip('.')}; {missing}" if missing else _one_line(err)
    return CheckpointError(f"{str(path)!r} holds a model this innerloop cannot rebuild{other}: {reason}")


def save_checkpoint(checkpoint: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``checkpoint`` (a tree of tensors and plain values) to ``path`` atomically, with its
    checksum. A checkpoint with a model (``hyper_parameters['model']``) also records where each plugin
    that model uses came from (:data:`PLUGINS_KEY`, :func:`plugin_record`) and the source digests of
    those registered in the process (:data:`PLUGIN_SOURCES_KEY`, :func:`plugin_sources`)."""
    check_path_argument(path)  # before the tree is encoded: Path(None) failed in pathlib after it
    if not isinstance(checkpoint, Mapping):
        raise TypeError(
            f"checkpoint must be a dict (a tree of tensors and plain values), got {type(checkpoint).__name__}"
        )
    hyper_parameters = checkpoint.get("hyper_parameters")
    model = hyper_parameters.get("model") if isinstance(hyper_parameters, Mapping) else None
    if isinstance(model, Mapping):
        checkpoint = {
            **checkpoint,
            PLUGINS_KEY: plugin_record(model, checkpoint.get(PLUGINS_KEY)),
            PLUGIN_SOURCES_KEY: plugin_sources(model, checkpoint.get(PLUGIN_SOURCES_KEY)),
        }
    if isinstance(checkpoint.get("state_dict"), Mapping):  # a compiled model's: the uncompiled names
        checkpoint = {
            **checkpoint,
            "state_dict": plain_names(checkpoint["state_dict"], "the checkpoint's state_dict"),
        }
    tensors: dict[str, torch.Tensor] = {}
    tree = json.dumps(_encode(checkpoint, tensors, ""))
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        _VERSION_KEY: innerloop_version(),
        _TREE_KEY: tree,
        _DIGEST_KEY: checkpoint_digest(tree, tensors),
    }
    path = user_path(path)  # '~' is the home folder, as for export_model, a run's out_dir (not ./~)
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


# -- where the plugins a checkpoint's model uses came from -----------------------------------------------

_ORIGIN_KEYS = ("origin", "distribution", "version", "class")


class PluginChangedWarning(UserWarning):
    """A checkpoint or export records, beside a plugin name its model uses, another plugin than the one
    registered under that name now (another distribution or version, another class, see
    :func:`same_plugin`): the model is rebuilt with the plugin registered now, which may compute another
    function."""


_WARNED_PLUGINS: set[tuple[Any, ...]] = set()
"""The (source, kind, name, recorded, current) already warned about in this process."""


def used_plugins(model: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(registry kind, name)`` of each plugin a saved model config (a mapping, which may hold only
    the keys that differ from the defaults) uses: its mixer's section's (:data:`PLUGIN_FIELDS`)."""
    defaults = ModelConfig().to_dict()
    mixer = model.get("mixer", defaults["mixer"])
    fields = PLUGIN_FIELDS.get(mixer) if isinstance(mixer, str) else None
    section_name = PLUGIN_SECTIONS.get(mixer, mixer) if fields is not None else None
    section = model.get(section_name, {}) if section_name is not None else None
    if not isinstance(section, Mapping):
        return []
    section = {**defaults[section_name], **section}
    return [(kind, section[key]) for key, kind in fields if isinstance(section.get(key), str)]


def plugin_origin(kind: str, name: str) -> dict[str, str] | None:
    """Where the plugin registered now under ``name`` (of registry ``kind``) comes from: its
    ``origin`` as ``innerloop plugins`` shows it (``builtin:...`` for innerloop's own) and, for one
    an installed package's entry point registered, that ``distribution`` and its ``version``; for one
    registered in the process (not built in, no distribution), the ``class`` of the registered object
    (``module.QualName``); None when no plugin has that name."""
    registry = get_registry()
    entry = _registered_entry(kind, name)
    if entry is None:
        return None
    found = {"origin": registry.loaded_by(entry.origin)}  # -p MODULE for what its import registered
    installed = registry.distribution(entry.origin)
    if installed is not None:
        found["distribution"] = installed[0]
        if installed[1] is not None:
            found["version"] = installed[1]
    elif not entry.origin.startswith(BUILTIN_PREFIX):
        cls = entry.obj if isinstance(entry.obj, type) else type(entry.obj)
        found["class"] = f"{cls.__module__}.{cls.__qualname__}"
    return found


def _registered_entry(kind: str, name: str) -> Any:
    """The registry's entry for ``name`` of ``kind`` now (None when no plugin has that name)."""
    return next((e for e in get_registry().entries(kind) if e.name == name), None)


def plugin_source_digest(cls: type) -> str | None:
    """The SHA-256 of the source of ``cls`` and of its base classes from the same top-level package
    (where a plugin's math may live; innerloop's and other libraries' bases are left out, so an
    upgrade of those does not count as a change of the plugin), as :func:`inspect.getsource` reads it
    from their files now. None when a source cannot be read: a class defined in ``python -c``, in an
    interactive session without a file, by ``exec``, or in compiled code. (Helpers a method calls are
    not covered, nor an instance's settings.)"""
    package = cls.__module__.partition(".")[0]
    digest = hashlib.sha256()
    for klass in cls.__mro__:
        if klass.__module__.partition(".")[0] != package:
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):  # no file, or a built-in/compiled class
            return None
        digest.update(f"{klass.__module__}.{klass.__qualname__}\0{source}\0".encode())
    return digest.hexdigest()


_SOURCE_DIGESTS: IdentityTable[str | None] = IdentityTable()
"""Each registered plugin object's source digest, read once, the first time it is asked for (a training
run asks when its module is built), so that a plugin file edited while a run goes on does not change what
the run's checkpoints record. Held weakly: a plugin removed from the registry, with whatever it holds, is
not kept alive by it."""


def _source_digest_now(kind: str, name: str) -> str | None:
    """:func:`plugin_source_digest` of the plugin registered now under ``name``, when one not built in
    has it (registered in the process, or by an installed distribution, whose version does not change
    with the code of an editable install, ``pip install -e``), as first read in this process
    (:data:`_SOURCE_DIGESTS`); None otherwise."""
    entry = _registered_entry(kind, name)
    if entry is None or entry.origin.startswith(BUILTIN_PREFIX):
        return None
    if entry.obj in _SOURCE_DIGESTS:
        return _SOURCE_DIGESTS.get(entry.obj)
    digest = plugin_source_digest(entry.obj if isinstance(entry.obj, type) else type(entry.obj))
    _SOURCE_DIGESTS.set(entry.obj, digest)
    return digest


def plugin_sources(model: Mapping[str, Any], earlier: Any = None) -> dict[str, dict[str, str]]:
    """:data:`PLUGIN_SOURCES_KEY`'s value for a model config: ``{kind: {name: digest}}`` for each plugin
    it uses that is registered in the process and whose source can be read. A name not registered now
    keeps what ``earlier`` (the record of the checkpoint being written again, if any) says of it."""
    known = {(kind, name): digest for kind, name, digest in _recorded_sources(earlier)}
    record: dict[str, dict[str, str]] = {}
    for kind, name in used_plugins(model):
        if _registered_entry(kind, name) is None:
            digest = known.get((kind, name))
        else:
            digest = _source_digest_now(kind, name)
        if digest is not None:
            record.setdefault(kind, {})[name] = digest
    return record


def _recorded_sources(record: Any) -> list[tuple[str, str, str]]:
    """``(kind, name, digest)`` of each well-formed item of a :data:`PLUGIN_SOURCES_KEY` record."""
    if not isinstance(record, Mapping):
        return []
    return [
        (kind, name, digest)
        for kind, names in record.items()
        if kind in KIND_NAMES and isinstance(names, Mapping)
        for name, digest in names.items()
        if isinstance(name, str) and isinstance(digest, str)
    ]


def same_plugin(name: str, recorded: Mapping[str, str], current: Mapping[str, str]) -> bool:
    """Whether ``current`` (:func:`plugin_origin` now) is the plugin ``recorded`` (a record's item)
    under ``name``: for one an installed package registered (either has a ``distribution``), the same
    distribution and version; for innerloop's own, the same origin; for one registered in the process,
    the same class (its origin depends on what else the process registered first, e.g.
    ``module.Class:name``, so it is not compared). A record without the class (innerloop 0.1's) matches
    the same origin, or a default origin ``module.Class[:name]`` naming the current class."""
    if "distribution" in recorded or "distribution" in current:
        return all(recorded.get(key) == current.get(key) for key in ("distribution", "version"))
    if recorded["origin"].startswith(BUILTIN_PREFIX) or current["origin"].startswith(BUILTIN_PREFIX):
        return recorded["origin"] == current["origin"]
    if "class" in recorded:
        return recorded["class"] == current.get("class")
    return recorded["origin"] == current["origin"] or recorded["origin"].removesuffix(
        f":{name}"
    ) == current.get("class")


def plugin_record(model: Mapping[str, Any], earlier: Any = None) -> dict[str, dict[str, dict[str, Any]]]:
    """:data:`PLUGINS_KEY`'s value for a model config: ``{kind: {name: plugin_origin(kind, name)}}``
    for each plugin it uses, with the registered object's ``settings`` (:func:`plugin_settings`) where
    it has any. A name not registered now keeps what ``earlier`` (the record of the checkpoint being
    written again, if any) says of it."""
    known = {(kind, name): origin for kind, name, origin in _recorded_plugins(earlier)}
    known_settings = _recorded_settings(earlier)
    record: dict[str, dict[str, dict[str, Any]]] = {}
    for kind, name in used_plugins(model):
        origin: dict[str, Any] | None = plugin_origin(kind, name)
        settings = _settings_now(kind, name) if origin is not None else known_settings.get((kind, name))
        origin = origin or known.get((kind, name))
        if origin is not None:
            record.setdefault(kind, {})[name] = {**origin, **({"settings": settings} if settings else {})}
    return record


# -- the settings of a plugin object (Huber(delta=2.0)), recorded beside its origin ---------------------


def _settings_now(kind: str, name: str) -> dict[str, Any]:
    """:func:`plugin_settings` of the object registered now under ``name`` of ``kind``, read as they are
    now, declared or not (a save records what the object computes with then: ``loss.delta = 2.0`` after a
    first save or load is recorded as 2.0); ``{}`` when none is registered. (Public attributes were read
    once per object, so such a change was recorded as the first value by every later save, and a load
    with that value registered computed another function, quietly. A counter bumped as the plugin runs is
    recorded as it is at the save and warned of where a load differs, as the docs say of such
    attributes.)"""
    entry = _registered_entry(kind, name)
    return {} if entry is None else plugin_settings(entry.obj)


def _recorded_settings(record: Any) -> dict[tuple[str, str], dict[str, Any]]:
    """``{(kind, name): settings}`` of each item of a plugin record: its ``"settings"`` (a mapping), or
    ``{}`` for an item without them (a plugin with none when saved: a save records them where it has
    any); an item whose ``"settings"`` is no mapping is left out (a load refuses it first:
    :func:`check_plugin_records`)."""
    if not isinstance(record, Mapping):
        return {}
    return {
        (kind, name): dict(origin.get("settings", {}))
        for kind, names in record.items()
        if kind in KIND_NAMES and isinstance(names, Mapping)
        for name, origin in names.items()
        if isinstance(name, str)
        and isinstance(origin, Mapping)
        and isinstance(origin.get("settings", {}), Mapping)
    }


class PluginSettingsError(CheckpointError):
    """A checkpoint or export records a plugin's settings (:func:`plugin_settings`), and the same plugin
    is registered now under that name with other settings: the model would compute another function."""


def same_setting(saved: Any, now: Any) -> bool:
    """Whether two values of a setting are one: equal as values (``1`` and ``1.0``, a tuple and the list
    it reads back as), ``nan`` and ``nan`` too; a bool is not a number (``True`` is not ``1``)."""
    if isinstance(saved, list | tuple) and isinstance(now, list | tuple):
        return len(saved) == len(now) and all(map(same_setting, saved, now))
    if isinstance(saved, bool) or isinstance(now, bool):
        return type(saved) is type(now) and saved == now
    if isinstance(saved, float) and isinstance(now, float) and math.isnan(saved) and math.isnan(now):
        return True
    return bool(saved == now)


def differing_settings(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """The names of the settings that differ between ``saved`` and ``now`` (:func:`same_setting`), or
    that one side has and the other has not; sorted."""
    return sorted(
        key
        for key in saved.keys() | now.keys()
        if key not in saved or key not in now or not same_setting(saved[key], now[key])
    )


_HELD_PLUGINS: tuple[tuple[type, str, str], ...] = (
    (TTTLayer, "inner_model", "inner_model"),
    (TTTLayer, "inner_loss", "inner_loss"),
    (TTTLayer, "update_rule", "update_rule"),
    (E2ELM, "inner_loss", "model_inner_loss"),
    (E2ELM, "update_rule", "model_update_rule"),
)
"""``(module class, attribute, registry kind)`` of each plugin object a built model holds."""


def _class_defined_again(held: type, registered: type) -> str:
    """A note for :func:`check_held_plugins` where the two classes are two class objects of one
    ``module.QualName`` (its definition run again: a notebook cell, ``importlib.reload``), which the
    message would otherwise show as one class with the same settings on both sides; ``""`` otherwise."""
    if held is registered or (held.__module__, held.__qualname__) != (
        registered.__module__,
        registered.__qualname__,
    ):
        return ""
    return (
        f" (two class objects of one name, {held.__module__}.{held.__qualname__}: the class was defined "
        "again since the model was built, and its code may differ from the code the model computes with)"
    )


def check_held_plugins(source: str, model: torch.nn.Module) -> None:
    """Refuse (:class:`PluginSettingsError`, one line naming ``source`` and the plugin) to save ``model``
    where a plugin object one of its layers holds is not the one registered now under its name, and is
    of another class or has other settings (:func:`plugin_settings`): the plugin was removed and another
    registered under its name after the model was built (a notebook's second try), and the checkpoint's
    record, which describes the registered plugin, would not describe what the model computes with (a
    load with that plugin registered would be quiet and compute another function). A name registered
    nowhere now is left to the record (which then names no plugin for it, and a load says so)."""
    registry = get_registry()
    for module in model.modules():
        for cls, attribute, kind in _HELD_PLUGINS:
            held = getattr(module, attribute, None) if isinstance(module, cls) else None
            name = getattr(held, "name", None)
            entry = _registered_entry(kind, name) if isinstance(name, str) else None
            if entry is None or entry.obj is held:
                continue
            held_settings, registered_settings = plugin_settings(held), plugin_settings(entry.obj)
            if type(held) is type(entry.obj) and not differing_settings(held_settings, registered_settings):
                continue
            raise PluginSettingsError(
                f"{source}: the model holds the {kind.replace('_', ' ')} {name!r} of class "
                f"{type(held).__qualname__} with the settings {held_settings}, but the plugin registered under "
                f"that name now ({registry.loaded_by(entry.origin)!r}) is a {type(entry.obj).__qualname__} with "
                f"{registered_settings}{_class_defined_again(type(held), type(entry.obj))}, which the "
                "checkpoint would record: a load would compute another "
                "function. Register the object the model holds under that name again "
                "(innerloop.get_registry().remove_plugin(origin), then innerloop.register_"
                f"{kind}(obj)) and save again"
            )


def check_plugin_settings(source: str, record: Any, model: Mapping[str, Any] | None = None) -> None:
    """Refuse (:class:`PluginSettingsError`, one line naming ``source``, the plugin and both settings) a
    ``record`` (a checkpoint's or export's :data:`PLUGINS_KEY`) whose plugin (of those ``model`` uses,
    when given) is registered now, by the recorded plugin (:func:`same_plugin`), with settings other
    than recorded (:func:`same_setting`), where the plugin declares its settings
    (:func:`declares_settings`); one that does not (whose public attributes were recorded, which may be
    no settings: a counter, a path) is warned of (:class:`PluginChangedWarning`) and loads. A name not
    registered now, another plugin under it (:func:`warn_changed_plugins` warns), and an item whose
    ``"settings"`` is no mapping are not checked here. An item without settings (the plugin had none when
    saved, or the file predates settings records) is checked as settings ``{}``: settings the plugin has
    now are a setting one side lacks, warned of naming them (they loaded unchecked and quiet, though the
    value now may not be the one the model trained with)."""
    settings = _recorded_settings(record)
    for kind, name, recorded in _recorded_plugins(record, model):
        current = plugin_origin(kind, name)
        saved = settings.get((kind, name))
        if current is None or saved is None or not same_plugin(name, recorded, current):
            continue
        now = _settings_now(kind, name)
        entry = _registered_entry(kind, name)
        # what an earlier save recorded that is no setting (an nn.Module plugin's ``training``): not compared
        saved = {
            key: value for key, value in saved.items() if entry is None or not is_no_setting(entry.obj, key)
        }
        changed = differing_settings(saved, now)
        if not changed:
            continue
        declared = entry is not None and declares_settings(entry.obj)
        message = (
            f"{source} was saved with the {kind.replace('_', ' ')} {name!r} of {_described(recorded)} "
            f"with the settings {saved}; here it is registered with {now} (differing in "
            f"{', '.join(map(repr, changed))})"
        )
        if declared and any(key in saved and key in now for key in changed):
            raise PluginSettingsError(
                f"{message}: the model would compute another function. Register {name!r} with the "
                "settings it was saved with to load it (a value that is no setting belongs out of its settings())"
            )
        _warn_other_settings(source, kind, name, message, declared)


def _warn_other_settings(source: str, kind: str, name: str, message: str, declared: bool) -> None:
    """Warn once (:class:`PluginChangedWarning`) that the plugin ``name``'s settings differ from the
    recorded ones (``message`` says how) where no registration could be known to match them: public
    attributes, recorded because it declares no settings (``declared`` false), or a setting on one side
    only (added to or taken from its ``settings()`` since the save)."""
    key = (source, kind, name, message)
    if key in _WARNED_PLUGINS:
        return
    _WARNED_PLUGINS.add(key)
    why = (
        "a setting that one side has and the other has not (added or taken away since the save): its "
        "code changed, and where the value now is not the one it computed with then, the model computes "
        "another function"
        if declared
        else "the plugin declares no settings, so these are its public attributes, which may be none (a "
        "counter, a path): where one is a setting, the model computes another function (register "
        f"{name!r} with the value it was saved with). Define settings() on the plugin, giving its real "
        "settings, to have such a load refused and its other attributes left unchecked"
    )
    warnings.warn(f"{message}: {why}", PluginChangedWarning, stacklevel=warning_stacklevel())


def _recorded_plugins(
    record: Any, model: Mapping[str, Any] | None = None
) -> list[tuple[str, str, dict[str, str]]]:
    """``(kind, name, origin)`` of each well-formed item of a plugin record (of those ``model``, a model
    config, uses, when given); nothing of one that is not a record (none, an older file's, an edited
    one's)."""
    if not isinstance(record, Mapping):
        return []
    used = None if model is None else set(used_plugins(model))
    found = []
    for kind, names in record.items():
        if kind not in KIND_NAMES or not isinstance(names, Mapping):
            continue
        for name, origin in names.items():
            if not (
                isinstance(name, str)
                and isinstance(origin, Mapping)
                and isinstance(origin.get("origin"), str)
            ):
                continue
            if used is None or (kind, name) in used:
                found.append(
                    (kind, name, {k: origin[k] for k in _ORIGIN_KEYS if isinstance(origin.get(k), str)})
                )
    return found


def _described(origin: Mapping[str, str]) -> str:
    """``plugin 'huber (innerloop-huber)' from distribution 'innerloop-huber' 0.1``, or ``plugin
    'my_pkg' (class 'my_pkg.Huber')`` for one registered in the process whose origin is not its class."""
    text = f"plugin {origin['origin']!r}"
    cls = origin.get("class")
    if cls is not None and origin["origin"].partition(":")[0] != cls:
        text += f" (class {cls!r})"
    if "distribution" in origin:
        text += f" from distribution {origin['distribution']!r}" + (
            f" {origin['version']}" if "version" in origin else ""
        )
    return text


_VALID_PLUGINS_RECORD = (
    'null or {kind: {name: {"origin": str, "distribution"/"version"/"class": str, "settings": {...}}}} '
    "(what a save writes)"
)
_VALID_SOURCES_RECORD = "null or {kind: {name: a SHA-256 hex string}} (what a save writes)"


def check_plugin_records(where: str, plugins: Any, sources: Any) -> None:
    """Raise ``ValueError`` naming ``where`` (the file or folder, or a config's class), the key
    (:data:`PLUGINS_KEY` or :data:`PLUGIN_SOURCES_KEY`), the value and what is valid unless each is a
    record of its shape or None (not recorded: an older file). A corrupt record (a number, a list, an
    item that is no mapping) was read as no record, and its plugins loaded unchecked."""
    for key, record, problem, valid in (
        (PLUGINS_KEY, plugins, _plugins_record_problem, _VALID_PLUGINS_RECORD),
        (PLUGIN_SOURCES_KEY, sources, _sources_record_problem, _VALID_SOURCES_RECORD),
    ):
        found = None if record is None else _record_problem(record, problem)
        if found is not None:
            raise ValueError(
                f"{where}: {key}={reprlib.repr(record)} is not a plugin record ({found}); it must be {valid}: "
                "save the model again, or remove the key to load it unchecked"
            )


def _record_problem(record: Any, item_problem: Any) -> str | None:
    """What makes ``record`` no ``{kind: {name: item}}`` mapping (``item_problem(path, item)`` judges each
    item), or None."""
    if not isinstance(record, Mapping):
        return f"it is {a_type(record)}"
    for kind, names in record.items():
        if not isinstance(kind, str) or not isinstance(names, Mapping):
            return (
                f"[{kind!r}] is {a_type(names)}, not a mapping of names"
                if isinstance(kind, str)
                else "a key is no string"
            )
        for name, item in names.items():
            found = (
                item_problem(f"[{kind!r}][{name!r}]", item)
                if isinstance(name, str)
                else f"[{kind!r}] has a key that is no string"
            )
            if found is not None:
                return found
    return None


def _plugins_record_problem(at: str, item: Any) -> str | None:
    if not isinstance(item, Mapping):
        return f"{at} is {a_type(item)}, not a mapping"
    if not isinstance(item.get("origin"), str):
        return f"{at} has no 'origin' string"
    wrong = [k for k in _ORIGIN_KEYS if k in item and not isinstance(item[k], str)]
    if wrong:
        return f"{at}[{wrong[0]!r}] is {a_type(item[wrong[0]])}, not a string"
    if not isinstance(item.get("settings", {}), Mapping):
        return f"{at}['settings'] is {a_type(item['settings'])}, not a mapping"
    return None


def _sources_record_problem(at: str, item: Any) -> str | None:
    return None if isinstance(item, str) else f"{at} is {a_type(item)}, not a digest string"


def warn_changed_plugins(
    source: str,
    record: Any,
    model: Mapping[str, Any] | None = None,
    stacklevel: int | None = None,
    sources: Any = None,
) -> None:
    """Warn (:class:`PluginChangedWarning`, once per ``source`` and change) for each plugin of
    ``record`` (a checkpoint's or export's :data:`PLUGINS_KEY`; of those ``model``, a model config,
    uses, when given) that is registered now by another plugin than recorded (:func:`same_plugin`),
    or, with ``sources`` (a checkpoint's :data:`PLUGIN_SOURCES_KEY`), by the recorded class whose
    source digest differs now (neither digest missing). ``source`` names the file or folder. A name not
    registered now is left to the error of rebuilding the model (:func:`missing_plugins_note`); a
    record of none (an older file) warns of nothing. The warning points at the user's line
    (:func:`~innerloop.core.callers.warning_stacklevel`) unless ``stacklevel`` is given."""
    check_plugin_records(source, record, sources)
    digests = {(kind, name): digest for kind, name, digest in _recorded_sources(sources)}
    for kind, name, recorded in _recorded_plugins(record, model):
        current = plugin_origin(kind, name)
        if current is None:
            continue
        if same_plugin(name, recorded, current):
            message = _changed_source_message(source, kind, name, recorded, digests.get((kind, name)))
        else:
            message = (
                f"{source} was saved with the {kind.replace('_', ' ')} {name!r} of {_described(recorded)}; "
                f"here {name!r} is registered by {_described(current)}: the model is built with the one "
                "registered now, which may compute another function (install the one it was saved with "
                "to reproduce its numbers)"
            )
        key = (source, kind, name, tuple(sorted(recorded.items())), tuple(sorted(current.items())), message)
        if message is None or key in _WARNED_PLUGINS:
            continue
        _WARNED_PLUGINS.add(key)
        warnings.warn(
            message,
            PluginChangedWarning,
            stacklevel=warning_stacklevel() if stacklevel is None else stacklevel,
        )


def _changed_source_message(
    source: str, kind: str, name: str, recorded: Mapping[str, str], digest: str | None
) -> str | None:
    """The warning for the plugin registered now under ``name``, the recorded class, when its source
    digest is not the recorded ``digest``; None when it is, or when either is unknown."""
    now = _source_digest_now(kind, name)
    if digest is None or now is None or now == digest:
        return None
    return (
        f"{source} was saved with the {kind.replace('_', ' ')} {name!r} of {_described(recorded)} whose "
        f"class source had SHA-256 {digest[:12]}...; here that class's source has {now[:12]}...: its code "
        "changed since the checkpoint was written, and the model is built with the code now, which may "
        "compute another function (restore the code it was saved with to reproduce its numbers)"
    )


def missing_plugins_note(record: Any, model: Mapping[str, Any] | None = None) -> str:
    """Where each plugin of ``record`` (of those ``model`` uses, when given) that no plugin registers
    now came from when it was saved, for the error of a model that cannot be rebuilt; "" when every
    recorded name is registered."""
    absent = [
        (kind, name, origin)
        for kind, name, origin in _recorded_plugins(record, model)
        if plugin_origin(kind, name) is None
    ]
    if not absent:
        return ""
    missing = [
        f"its {kind.replace('_', ' ')} {name!r} was registered by {_described(origin)}"
        for kind, name, origin in absent
    ]
    # a module that is not installed was loaded with `innerloop -p MODULE` (its origin says which)
    options = [origin["origin"] for _, _, origin in absent if origin["origin"].startswith("-p ")]
    again = f"`innerloop {' '.join(dict.fromkeys(options))}`" if options else "`innerloop -p MODULE`"
    them = "it" if len(missing) == 1 else "them"
    return (
        "when it was saved, "
        + "; ".join(missing)
        + f": install or register {them} here, or load {them} with {again}"
    )


def _metadata_tree(path: str | os.PathLike[str]) -> Any:
    """The JSON tree of the checkpoint at ``path``, read from its metadata alone (tensor references
    left as they are, nothing verified); None for a file that cannot be read."""
    try:
        with safe_open(str(user_path(path)), framework="pt", device="cpu") as f:
            return json.loads((f.metadata() or {}).get(_TREE_KEY, "{}"))
    except (SafetensorError, OSError, ValueError, RecursionError):
        return None


def recorded_entry(path: str | os.PathLike[str], key: str) -> Any:
    """The top-level entry ``key`` of the checkpoint at ``path`` (e.g. a data module's recorded state),
    read from its metadata alone: no tensor is read and nothing verified (:func:`load_checkpoint` does
    that). None when there is none or the file cannot be read."""
    tree = _metadata_tree(path)
    return tree.get(key) if isinstance(tree, dict) else None


def recorded_plugins(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The plugin record (:data:`PLUGINS_KEY`) of the checkpoint at ``path``, read from its metadata
    alone (not verified: :func:`load_checkpoint` does that); None when it has none or cannot be read."""
    record = recorded_entry(path, PLUGINS_KEY)
    return record if isinstance(record, dict) else None


def stored_weights_dtype(path: str | os.PathLike[str]) -> torch.dtype | None:
    """The dtype most of the model's floating-point weights (``state_dict``) are stored in, in the
    checkpoint at ``path`` (``torch.bfloat16`` for a ``bf16-true`` run's), read from the file's header
    alone (no tensor is read); None when it holds none or cannot be read."""
    tree = _metadata_tree(path)
    state_dict = tree.get("state_dict") if isinstance(tree, dict) else None
    if not isinstance(state_dict, dict):
        return None
    keys = [ref["__tensor__"] for ref in state_dict.values() if isinstance(ref, dict) and "__tensor__" in ref]
    counts: dict[str, int] = {}
    try:
        with safe_open(str(user_path(path)), framework="pt", device="cpu") as f:
            for key in keys:
                dtype = f.get_slice(key).get_dtype()
                counts[dtype] = counts.get(dtype, 0) + 1
    except (SafetensorError, OSError, ValueError):
        return None
    floating = {SAFETENSORS_FLOAT_DTYPES[d]: n for d, n in counts.items() if d in SAFETENSORS_FLOAT_DTYPES}
    return max(floating, key=floating.__getitem__) if floating else None


SAFETENSORS_FLOAT_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
}
"""safetensors' names of the floating-point dtypes a checkpoint's weights may be stored in."""


def dtype_note(path: str | os.PathLike[str]) -> str | None:
    """One line for a command that runs the checkpoint at ``path`` as :func:`load_model` loads it by
    default (``innerloop generate``, ``eval``): its weights stored in bfloat16 or float16 (a
    ``bf16-true`` or ``16-true`` run's) run upcast to float32; None when they run as stored."""
    stored = stored_weights_dtype(path)
    if stored is None or torch.promote_types(stored, torch.float32) == stored:
        return None
    return (
        f"the checkpoint's weights are stored in {str(stored).removeprefix('torch.')}; they run upcast to "
        "float32 (exactly), as every checkpoint is evaluated (load_model(..., keep_dtype=True) keeps them)"
    )


# -- loading ---------------------------------------------------------------------------------------------


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _check_header(name: str, metadata: dict[str, str]) -> None:
    """Raise :class:`CheckpointError` unless the metadata is of an innerloop checkpoint this version
    reads; warn for a version 1 checkpoint (no checksum)."""
    if metadata.get("format") != FORMAT or _TREE_KEY not in metadata:
        raise CheckpointError(
            f"{name} is a safetensors file but not an innerloop checkpoint (its metadata has no "
            f"format={FORMAT!r}); innerloop checkpoints are written by `innerloop train`"
        )
    if len(metadata[_TREE_KEY]) > MAX_TREE_CHARS:
        raise CheckpointError(
            f"{name} has a metadata tree of {len(metadata[_TREE_KEY])} characters, more than the "
            f"{MAX_TREE_CHARS} an innerloop checkpoint can have"
        )
    version = metadata.get("format_version")
    if version == UNVERIFIED_VERSION:
        if name not in _WARNED_UNVERIFIED:  # once per file: an eval reads it three times
            _WARNED_UNVERIFIED.add(name)
            warnings.warn(
                f"{name} is a format-version-1 checkpoint, which has no checksum: it is read without an "
                "integrity check (saving it again, e.g. by resuming the run, adds one)",
                UnverifiedCheckpointWarning,
                stacklevel=warning_stacklevel(),
            )
        return
    if version != FORMAT_VERSION:
        newer = isinstance(version, str) and version.isdigit() and int(version) > int(FORMAT_VERSION)
        raise (NewerCheckpointError if newer else CheckpointError)(
            f"{name} has checkpoint format version {version!r}; this innerloop reads versions "
            f"{UNVERIFIED_VERSION!r} and {FORMAT_VERSION!r}"
            + ("; it was written by a newer innerloop: upgrade innerloop to read it" if newer else "")
        )
    if _DIGEST_KEY not in metadata:
        raise CheckpointError(
            f"{name} has format version {FORMAT_VERSION!r} but no checksum ({_DIGEST_KEY}): its "
            "metadata was altered after it was written"
        )


def _read_file(path: Path, name: str, attempts: int = 3) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata and tensors (on the CPU) of a safetensors checkpoint file. A file replaced while it
    is read (a running run's checkpoint, written atomically at every save: safetensors reads its header
    and maps its data separately, so the header of one file could come with the tensors of the next) is
    read again, up to ``attempts`` times. The tensors are the process's own memory, not the file's mapped
    pages: what is checked after this read is what the caller keeps, whatever is written to the file
    later."""
    stamp = None
    try:
        stamp = file_stamp(path)
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            _check_header(name, metadata)
            # copies: safetensors maps the file, and its tensors were views of the file's pages, so a
            # rewrite in place after the read (cp, rsync --inplace) changed the weights already checked
            tensors = {key: f.get_tensor(key).clone() for key in f.keys()}
        if attempts > 1 and file_stamp(path) != stamp:  # replaced meanwhile: the read may mix two files
            return _read_file(path, name, attempts - 1)
        return metadata, tensors
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as err:
        if isinstance(err, CheckpointError):
            raise
        with contextlib.suppress(OSError):
            if attempts > 1 and stamp is not None and file_stamp(path) != stamp:
                return _read_file(path, name, attempts - 1)  # replaced meanwhile: the new one
        if isinstance(err, OSError):  # the file system's refusal, not the file's contents
            raise CheckpointUnreadableError(f"{name} cannot be read: {_one_line(err)}") from None
        raise CheckpointError(
            f"{name} is not a readable innerloop checkpoint (expected a safetensors file written by "
            f"`innerloop train`; it may be truncated, corrupt or of another format): {_one_line(err)}"
            f"{_pickled_note(path)}"
        ) from None


def _pickled_note(path: str | os.PathLike[str]) -> str:
    """For a file that starts as torch.save writes one (a zip archive, or a bare pickle): what it is and,
    for a Lightning ``.ckpt`` of a LanguageModelModule, how to convert it once; else nothing."""
    try:
        with open(path, "rb") as f:
            start = f.read(4)
    except OSError:
        return ""
    if start != b"PK\x03\x04" and start[:1] != b"\x80":
        return ""
    return (
        "; it is a pickled file (torch.save's format: e.g. a Lightning Trainer's .ckpt, written without "
        "innerloop's SafetensorsCheckpointIO), which innerloop never unpickles (a pickle can run code): "
        "convert one you trust in Python, module = LanguageModelModule.load_from_checkpoint(path), then "
        "save_model_checkpoint(module.model, 'model.safetensors')"
    )


def is_safetensors_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a file that starts as a safetensors file does (an 8-byte little-endian
    header length that fits the file, then a JSON object): innerloop's checkpoint format, as opposed
    to a pickled ``torch.save`` one. Reads 9 bytes; False for anything that cannot be read."""
    try:
        with open(user_path(path), "rb") as f:
            start = f.read(9)
            size = os.fstat(f.fileno()).st_size
    except (OSError, TypeError, ValueError):
        return False
    if len(start) < 9:
        return False
    header_length = int.from_bytes(start[:8], "little")
    return 0 < header_length <= size - 8 and start[8:9] == b"{"


def _check_checkpoint_argument(path: Any) -> None:
    """A TypeError naming ``checkpoint`` unless ``path`` is a str or ``os.PathLike``
    (:func:`~innerloop.core.functional.check_path_argument`), and a :class:`CheckpointError` for an
    empty one: ``Path('')`` is the current directory, and the error named ``'.'``, a path never given."""
    check_path_argument(path, "checkpoint")
    if not os.fspath(path).strip():
        raise CheckpointError(
            f"checkpoint {os.fspath(path)!r} is empty: give a checkpoint file (e.g. 'runs/tiny/last.safetensors')"
        )


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, verifying its checksum; raise
    :class:`CheckpointError` (one line naming the file and the problem) for any other file."""
    _check_checkpoint_argument(path)
    path = user_path(path)  # '~' is the home folder, as save_checkpoint writes it
    name = repr(str(path))
    problem = checkpoint_path_problem(path)
    if problem is not None:
        raise CheckpointError(problem)
    metadata, tensors = _read_file(path, name)
    tree_json = metadata[_TREE_KEY]
    if _DIGEST_KEY in metadata and checkpoint_digest(tree_json, tensors) != metadata[_DIGEST_KEY]:
        raise CheckpointError(
            f"{name} is corrupt: its checksum ({_DIGEST_KEY}) does not match its contents (the file was "
            "damaged or altered after it was written); use another checkpoint or train again"
        )
    try:
        tree = _decode(json.loads(tree_json), tensors)
    except (RecursionError, ValueError) as err:  # json.JSONDecodeError and _TreeError are ValueErrors
        reason = (
            f"its tree nests too deeply ({type(err).__name__})" if isinstance(err, RecursionError) else err
        )
        raise CheckpointError(f"{name} has a malformed metadata tree: {_one_line(reason)}") from None
    if not isinstance(tree, dict):
        raise CheckpointError(f"{name} has a metadata tree that is {a_type(tree)}, not a dict")
    _check_finite_weights(name, tree.get("state_dict"))
    if isinstance(tree.get("state_dict"), dict):  # one an earlier innerloop wrote of a compiled model
        try:
            tree["state_dict"] = plain_names(tree["state_dict"], f"{name}'s state_dict")
        except ValueError as err:
            raise CheckpointError(str(err)) from None
    _fill_earlier_defaults(tree)
    try:
        check_plugin_records(name, tree.get(PLUGINS_KEY), tree.get(PLUGIN_SOURCES_KEY))
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    warn_changed_plugins(name, tree.get(PLUGINS_KEY), sources=tree.get(PLUGIN_SOURCES_KEY))
    check_plugin_settings(name, tree.get(PLUGINS_KEY))
    device = checkpoint_device(map_location)
    if device.type != "cpu":
        tree = _move_tensors(tree, device)
    return tree


def checkpoint_device(map_location: Any) -> torch.device:
    """The device a checkpoint's tensors are loaded onto for ``map_location``: a device, its name or its
    index (``0``: the accelerator's first device, as for ``torch.device``), or None for the CPU. A mapping or a function
    of devices, which ``torch.load`` also takes, is refused: the file records no device to map from."""
    if map_location is None:
        return torch.device("cpu")
    if isinstance(map_location, (str, int, torch.device)) and not isinstance(map_location, bool):
        try:
            return torch.device(map_location)
        except (RuntimeError, ValueError) as err:
            raise ValueError(
                f"map_location={map_location!r} is not a device ({_one_line(err)}); valid: a torch.device, "
                "a device name such as 'cpu' or 'cuda:0', a device index, or None for the CPU"
            ) from None
    raise TypeError(
        f"map_location={map_location!r} ({type(map_location).__name__}) does not apply to an innerloop "
        "checkpoint, which records no device to map from; valid: a torch.device, a device name such as "
        "'cpu' or 'cuda:0', a device index, or None for the CPU"
    )


def _fill_earlier_defaults(tree: dict[str, Any]) -> None:
    """Give a stored model config the options it was written without, at the values its model used
    then (:func:`~innerloop.models.config.with_earlier_defaults`), so that an older checkpoint loads as
    the same function (not silently as the new default)."""
    hyper_parameters = tree.get("hyper_parameters")
    if isinstance(hyper_parameters, dict) and isinstance(hyper_parameters.get("model"), dict):
        hyper_parameters["model"] = with_earlier_defaults(hyper_parameters["model"])


def _check_finite_weights(name: str, state_dict: Any) -> None:
    """Raise one :class:`CheckpointError` line if a floating tensor of ``state_dict`` holds a NaN or an
    infinity: such weights make every output NaN (blamed on the input later), and a NaN in one of two
    tied weights would be silently replaced by its twin when loaded."""
    if not isinstance(state_dict, dict):
        return  # check_state_dict reports a state dict of the wrong kind against the model
    found = first_non_finite(state_dict.items())
    if found is not None:
        key, bad, total = found
        raise CheckpointError(
            f"{name} has non-finite weights: {key!r} holds {bad} NaN/infinite value(s) of {total} (the run "
            "that wrote it diverged); use an earlier checkpoint"
        )


def checkpoint_content_digest(path: str | os.PathLike[str]) -> str:
    """The checksum of the checkpoint's content, whatever the file is called: the one in its metadata
    (:func:`checkpoint_digest`; verified by :func:`load_checkpoint`, which should be called first), or
    for an old version-1 file without one the file's SHA-256."""
    _check_checkpoint_argument(path)  # str(None) read as a file named 'None'
    path = user_path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            digest = (f.metadata() or {}).get(_DIGEST_KEY)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{str(path)!r} is not a readable checkpoint: {_one_line(err)}") from None
    return digest if digest is not None else file_sha256(path)


def checkpoint_identity(path: str | os.PathLike[str]) -> str:
    """``<file stem>-<first 8 hex digits of its content checksum>`` (:func:`checkpoint_content_digest`),
    e.g. ``last-1a2b3c4d``: names what was evaluated, so outputs of two checkpoints (even two
    ``last.safetensors``) never collide."""
    _check_checkpoint_argument(path)
    path = user_path(path)
    digest = checkpoint_content_digest(path)
    return f"{name_tag(path.name.removesuffix(CHECKPOINT_SUFFIX), 'ckpt')}-{digest[:8]}"


def name_tag(name: str, empty: str) -> str:
    """``name`` as a portable part of a file name: accents dropped from letters (``ünïcode`` is
    ``unicode``), every run of other characters than ASCII letters, digits, ``.``, ``_`` and ``-`` one
    ``-``, at most 40 characters; ``empty`` when nothing is left."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return re.sub(r"[^A-Za-z0-9._-]+", "-", ascii_name).strip("-.")[:40] or empty


def checkpoint_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer a checkpoint was trained with (:data:`TOKENIZER_KEY`; bytes when it records
    none, an :class:`~innerloop.data.tokenizer.UnknownTokenizer` naming the file when it records that
    its tokenizer is unknown), read from its metadata alone (the weights are not loaded or verified:
    :func:`load_checkpoint` does that). Raises :class:`CheckpointError` naming the file, as
    :func:`load_checkpoint` does."""
    _check_checkpoint_argument(path)  # Path(None) failed in pathlib, naming no argument
    path = user_path(path)  # '~' is the home folder, as load_checkpoint reads it
    name = repr(str(path))
    if not path.is_file():
        load_checkpoint(path)  # raises the error of a missing file or a directory
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(
            f"{name} is not a readable innerloop checkpoint (expected a safetensors file written by "
            f"`innerloop train`): {_one_line(err)}"
        ) from None
    _check_header(name, metadata)
    try:
        tree = json.loads(metadata[_TREE_KEY])
        return tokenizer_from_state(tree.get(TOKENIZER_KEY) if isinstance(tree, dict) else None, name)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and TokenizerError are ValueErrors
        message = _one_line(err)  # a tokenizer's error names the file already
        raise CheckpointError(message if message.startswith(name) else f"{name}: {message}") from None


def _move_tensors(obj: Any, device: str | torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_move_tensors(v, device) for v in obj)
    if isinstance(obj, dict):
        return {k: _move_tensors(v, device) for k, v in obj.items()}
    return obj


# -- weights against the model they are loaded into ------------------------------------------------------


def _shown(keys: list[str], limit: int = 3) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{keys[:limit]}{more}"


def check_state_dict(
    expected: Mapping[str, torch.Tensor], given: Any, path: str | os.PathLike[str], model: str = "the model"
) -> None:
    """Raise one :class:`CheckpointError` line unless the checkpoint's ``given`` state dict has exactly
    the keys of ``expected`` (e.g. ``module.state_dict()``), each with the same shape and a dtype that
    fits (see below).

    A floating-point weight may be stored in another floating dtype than ``expected`` has: a run with
    a ``*-true`` precision (``bf16-true``, ``16-true``, ``64-true``) casts the whole model, so its
    checkpoint holds e.g. bfloat16 weights where a freshly built model has float32 ones
    (:func:`load_weights` says in which dtype they are then loaded). Refused are a non-floating dtype
    that differs (an integer tensor where a float one is expected, or the reverse) and a floating one
    that differs from the checkpoint's other weights of the same built dtype (no precision casts a
    model's float32 weights to two dtypes: such a file was edited or written by another program).

    ``model`` describes what the weights are loaded into, for the message. (``load_state_dict`` would
    raise a many-line error for missing keys and silently cast another dtype.)
    """
    name = repr(str(path))
    if not isinstance(given, dict) or not all(isinstance(v, torch.Tensor) for v in given.values()):
        raise CheckpointError(f"{name} has a state_dict that is not a mapping of names to tensors")
    problems = []
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    if missing:
        problems.append(f"{len(missing)} missing weight(s) {_shown(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected weight(s) {_shown(unexpected)}")
    shapes = [
        f"{k!r} is {list(given[k].shape)}, expected {list(v.shape)}"
        for k, v in expected.items()
        if k in given and given[k].shape != v.shape
    ]
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): " + ", ".join(shapes[:3]))
    dtypes = _dtype_mismatches(expected, given)
    if dtypes:
        problems.append(f"{len(dtypes)} dtype mismatch(es): " + ", ".join(dtypes[:3]))
    if problems:
        cause = (
            "innerloop writes a model's floating weights all in one dtype, the run's precision's, and "
            "its other weights unchanged: was the file edited, or written by another program?"
            if not (missing or unexpected or shapes)
            else "was it written by a run with another model config?"
        )
        raise CheckpointError(f"{name} does not fit {model}: " + "; ".join(problems) + f" ({cause})")
    tied = _differing_tied_weights(expected, given)
    if tied:
        cause = "innerloop stores tied weights equal: was the file edited, or written by another program?"
        raise CheckpointError(f"{name} does not fit {model}: " + "; ".join(tied) + f" ({cause})")


def tied_weights(state_dict: Mapping[str, torch.Tensor]) -> list[list[str]]:
    """The groups of keys of ``state_dict`` that are one tensor (tied weights, e.g. a language model's
    head and embedding): the same memory, shape and strides."""
    groups: dict[tuple, list[str]] = {}
    for key, tensor in state_dict.items():
        if tensor.device.type == "meta" or tensor.numel() == 0:
            continue  # no memory to share
        where = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape, tensor.stride())
        groups.setdefault(where, []).append(key)
    return [keys for keys in groups.values() if len(keys) > 1]


def _differing_tied_weights(
    expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]
) -> list[str]:
    """What check_state_dict says of tied weights of the model that the checkpoint stores as different
    tensors: loaded, one of them would silently replace the other."""
    problems = []
    for first, *others in tied_weights(expected):
        for other in others:
            if not torch.equal(given[first], given[other].to(given[first].dtype)):
                largest = float((given[first].double() - given[other].double()).abs().max())
                problems.append(
                    f"{first!r} and {other!r} differ (by up to {largest:.3g}), but the model ties them (one "
                    "tensor): loaded, one would silently replace the other"
                )
    return problems


def _floating_pairs(
    expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]
) -> list[tuple[str, torch.dtype, torch.dtype]]:
    """``(key, built dtype, stored dtype)`` of the weights that are floating-point in both."""
    return [
        (key, tensor.dtype, given[key].dtype)
        for key, tensor in expected.items()
        if key in given and tensor.is_floating_point() and given[key].is_floating_point()
    ]


def stored_dtypes(
    expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]
) -> dict[torch.dtype, torch.dtype]:
    """For each floating dtype of ``expected`` (a freshly built model's state dict), the dtype in which
    the checkpoint's ``given`` state dict holds those weights (the most common one, should they differ:
    :func:`check_state_dict` refuses that), e.g. ``{torch.float32: torch.bfloat16}`` for a
    ``bf16-true`` run."""
    counts: dict[torch.dtype, dict[torch.dtype, int]] = {}
    for _, built, stored in _floating_pairs(expected, given):
        counts.setdefault(built, {}).setdefault(stored, 0)
        counts[built][stored] += 1
    return {
        built: max(seen, key=lambda dtype: (seen[dtype], dtype == built)) for built, seen in counts.items()
    }


def _dtype_mismatches(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> list[str]:
    """What :func:`check_state_dict` refuses of the dtypes, one phrase per weight."""
    common = stored_dtypes(expected, given)
    mismatches = []
    for key, tensor in expected.items():
        if key not in given:
            continue
        stored = given[key].dtype
        if tensor.is_floating_point() and given[key].is_floating_point():
            if stored != common[tensor.dtype]:
                mismatches.append(
                    f"{key!r} is {stored}, expected {common[tensor.dtype]} like its other weights"
                )
        elif stored != tensor.dtype:
            mismatches.append(f"{key!r} is {stored}, expected {tensor.dtype}")
    return mismatches


def load_weights(
    model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], keep_dtype: bool = False
) -> None:
    """Load ``state_dict`` (a checkpoint's, checked against ``model.state_dict()`` by
    :func:`check_state_dict`) into ``model``, first giving the model the dtypes its weights are used in.

    Floating-point weights stored in another dtype than ``model`` was built with (a ``*-true``
    precision's checkpoint: bfloat16, float16 or float64 where the model is float32) are loaded

    - by default, in the wider of the two (:func:`torch.promote_types`): bfloat16 and float16 weights
      are upcast to float32, exactly, and the model computes in float32 as for any other checkpoint
      (low-precision matmuls are slow on most CPUs and evaluations stay comparable across runs);
      float64 ones stay float64, so no stored digit is lost;
    - with ``keep_dtype``, in the stored dtype (what the export writes, see
      :mod:`innerloop.hf.export`: the weights exactly as trained).

    A dtype change applies to every parameter and buffer (persistent or not) of the model built in that
    dtype, as Lightning's cast of the whole module does in training. Tied weights stay tied.

    Given directly, ``state_dict`` is checked here too: missing, unexpected or misshapen weights, and an
    integer tensor where a floating one goes (``load_state_dict`` cast it silently), are one
    :class:`CheckpointError` line, and ``keep_dtype`` must be a bool (``"no"`` would keep the dtype).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_flag("keep_dtype", keep_dtype)
    own = model.state_dict()  # a compiled model's, or one with a compiled part: names with '_orig_mod'
    expected = plain_names(own, f"the {type(model).__name__}'s state_dict")
    state_dict = plain_names(state_dict, "the state_dict given")
    check_state_dict(expected, state_dict, "the state_dict given", type(model).__name__)
    cast_to_stored_dtypes(model, state_dict, keep_dtype)
    names = dict(zip(expected, own, strict=True))  # plain name -> the model's own
    model.load_state_dict({names[key]: value for key, value in state_dict.items()})


def cast_to_stored_dtypes(
    model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], keep_dtype: bool = False
) -> None:
    """Give ``model`` the dtypes in which :func:`load_weights` loads ``state_dict`` (checked against it
    already): by default the wider of the built and the stored dtype (float64 weights stay float64,
    bfloat16 ones are upcast to float32), with ``keep_dtype`` the stored one. Loads no weight."""
    wanted = {
        built: stored if keep_dtype else torch.promote_types(built, stored)
        for built, stored in stored_dtypes(plain_names(model.state_dict()), plain_names(state_dict)).items()
    }
    wanted = {built: dtype for built, dtype in wanted.items() if dtype != built}
    if wanted:
        with torch.no_grad():
            for parameter in model.parameters():  # each once, so a tied weight is cast once
                if parameter.dtype in wanted:
                    parameter.data = parameter.data.to(wanted[parameter.dtype])
            for owner in model.modules():
                tables = _derived_table_names(owner)
                for key, buffer in list(owner.named_buffers(recurse=False)):
                    if buffer.dtype in wanted:  # set again: it stays a (non-)persistent buffer
                        dtype = wanted[buffer.dtype]
                        if key in tables:  # a layer's token-index and RoPE tables: never below float32
                            dtype = torch.promote_types(dtype, torch.float32)
                        setattr(owner, key, buffer.to(dtype))


def _derived_table_names(module: torch.nn.Module) -> set[str]:
    """The names of ``module``'s ``derived_buffers`` (a TTT layer's token-index and RoPE tables), which a
    cast keeps in at least float32, as :meth:`~innerloop.core.layer.TTTLayer._apply` does in Lightning's
    cast of the whole module; empty for a module without them."""
    derived = getattr(module, "derived_buffers", None)
    return set(derived()) if callable(derived) else set()


def describe_model(config: Mapping[str, Any]) -> str:
    """A short description of a model config for messages, e.g. ``mixer='ttt', hidden_size=64, ...``."""
    keys = ("mixer", "backbone", "hidden_size", "num_layers", "num_heads")
    config = {**asdict(ModelConfig()), **config}  # hyperparameters may hold only the non-default keys
    return ", ".join(f"{k}={config.get(k)!r}" for k in keys if k in config)


_TRAINING_KEYS = ("pytorch-lightning_version", "state_dict", "hyper_parameters", "loops", "optimizer_states")
"""Keys Lightning reads when a run resumes from a checkpoint."""


def load_training_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """:func:`load_checkpoint`, and check that it is a whole training checkpoint a run can resume
    from (not e.g. weights alone); raise :class:`CheckpointError` otherwise."""
    checkpoint = load_checkpoint(path)
    missing = [key for key in _TRAINING_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(
            f"{str(path)!r} is not a training checkpoint (it has no {missing}), so a run cannot continue "
            "from it; give the last.safetensors that `innerloop train` wrote"
        )
    return checkpoint


# -- the model of a training checkpoint ------------------------------------------------------------------

MODEL_PREFIX = "model."
"""Where a training checkpoint's ``state_dict`` keeps the model's weights: Lightning stores the
module's, whose ``model`` attribute is the language model."""


TOKEN_INDEX_KEY = "token_index_dtype"
"""Where a checkpoint records, and (as ``innerloop_token_index_dtype``) an exported folder's config, the
dtype in which the model saved made its float64 TTT layers' token index ``1 / (i + 1)``
(:func:`token_index_made_in`): ``"float64"`` exact (built under ``torch.set_default_dtype(torch.float64)``),
``"float32"`` rounded and widened (a float32 model cast, as a ``64-true`` run's is), or a list of these,
one per TTT layer in module order, for a model mixing the two. The weights do not hold it (the index is a
non-persistent buffer) and the cast of a model rebuilt in float32 cannot tell. Absent (an older file, or
nothing to tell), each reader keeps its own default: a checkpoint's model keeps the index its build and
cast make (rounded), a folder's model makes it in its dtype, as the reference's ``from_pretrained`` does."""

TOKEN_INDEX_DTYPES = ("float32", "float64")
"""The values of a :data:`TOKEN_INDEX_KEY` record (or of each entry of a list)."""


def _token_index_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of ``model`` holding a ``token_idx`` table among their ``derived_buffers`` (TTT
    layers), in module order: a record's list has one entry for each."""
    return [
        module
        for module in model.modules()
        if isinstance(getattr(module, "token_idx", None), torch.Tensor)
        and callable(getattr(module, "derived_buffers", None))
    ]


def _made_in(layer: torch.nn.Module) -> str | None:
    """``"float64"`` / ``"float32"`` where ``layer``'s float64 token index is the one made in that dtype
    and not the other; None where nothing tells them apart (a float32 index, ``1 / (i + 1)`` exact in
    float32 for every ``i``), or where it is neither (then nothing is recorded for it)."""
    index = layer.token_idx
    if index.dtype != torch.float64 or index.is_meta:
        return None
    exact = layer.derived_buffers(torch.float64)["token_idx"].to(index.device)
    rounded = exact.float().double()
    if torch.equal(exact, rounded):
        return None
    return "float64" if torch.equal(index, exact) else "float32" if torch.equal(index, rounded) else None


def token_index_made_in(model: torch.nn.Module) -> str | list[str | None] | None:
    """The :data:`TOKEN_INDEX_KEY` record of ``model``: the dtype in which all its TTT layers whose float64
    index tells (:func:`_made_in`) made it, a list (one entry per TTT layer, None where it does not tell)
    where they differ, or None where no layer's index tells."""
    made = [_made_in(layer) for layer in _token_index_layers(model)]
    told = set(made) - {None}
    if not told:
        return None
    return told.pop() if len(told) == 1 else made


def check_token_index_record(record: Any, where: str) -> None:
    """Raise ``ValueError`` naming ``where`` unless ``record`` is a :data:`TOKEN_INDEX_KEY` record
    (None, one of :data:`TOKEN_INDEX_DTYPES`, or a list of them and None)."""
    entries = record if isinstance(record, list) else [record]
    if not all(entry is None or entry in TOKEN_INDEX_DTYPES for entry in entries):
        raise ValueError(
            f"{where}={record!r} must be one of {', '.join(map(repr, TOKEN_INDEX_DTYPES))}, a list of them "
            "(one per TTT layer), or null (the saving side writes it)"
        )


def remake_token_index(model: torch.nn.Module, record: Any, where: str = TOKEN_INDEX_KEY) -> None:
    """Make the float64 token index of ``model``'s TTT layers again as :data:`TOKEN_INDEX_KEY` ``record``
    says the model saved held it (:func:`token_index_made_in`); a layer it says nothing of, and a float32
    index, keep theirs. A list of another length than the model's TTT layers is refused (``ValueError``
    naming ``where``, the record's field)."""
    check_token_index_record(record, where)
    layers = _token_index_layers(model)
    if isinstance(record, list) and len(record) != len(layers):
        raise ValueError(
            f"{where}={record!r} has {len(record)} entries, but the model has {len(layers)} TTT "
            f"layer{'' if len(layers) == 1 else 's'} (one entry each)"
        )
    made = record if isinstance(record, list) else [record] * len(layers)
    for layer, dtype in zip(layers, made, strict=True):
        index = layer.token_idx
        if dtype is None or index.dtype != torch.float64 or index.is_meta:
            continue
        table = layer.derived_buffers(getattr(torch, dtype))["token_idx"]
        layer.register_buffer("token_idx", table.to(device=index.device, dtype=index.dtype), persistent=False)


def remake_recorded_token_index(
    model: torch.nn.Module, checkpoint: Mapping[str, Any], path: str | os.PathLike[str]
) -> None:
    """:func:`remake_token_index` of ``checkpoint``'s :data:`TOKEN_INDEX_KEY` record, read from ``path``: a
    record the saving side does not write is a :class:`CheckpointError` naming the file and the key."""
    try:
        remake_token_index(model, checkpoint.get(TOKEN_INDEX_KEY), where=f"{str(path)!r}: {TOKEN_INDEX_KEY}")
    except ValueError as err:
        raise CheckpointError(str(err)) from None


def load_model(path: str | os.PathLike[str], keep_dtype: bool = False) -> CausalLM | E2ELM:
    """The model stored in a training checkpoint written by ``innerloop train`` (its config from the
    hyperparameters, its weights from the state dict): a :class:`~innerloop.models.CausalLM`, or an
    :class:`~innerloop.models.E2ELM` for ``mixer="e2e"``, in eval mode, without importing Lightning.

    The weights of a run trained in a ``*-true`` precision load too (:func:`load_weights`): those of
    ``bf16-true`` and ``16-true`` upcast to float32 (exactly), those of ``64-true`` in float64, so the
    model computes in float32 or wider; with ``keep_dtype``, in the dtype they are stored in (the
    export's choice).

    Raises :class:`CheckpointError` if the file is not an innerloop checkpoint with a model, or its
    weights do not fit the model its hyperparameters describe (missing or unexpected keys, shapes,
    dtypes: see :func:`check_state_dict`; the message also names the keys the hyperparameters lack,
    which took their defaults: :func:`missing_keys_note`)."""
    check_flag("keep_dtype", keep_dtype)  # 'false' would keep a bf16 run's weights in bfloat16
    checkpoint = load_checkpoint(path)
    hparams = checkpoint.get("hyper_parameters")
    state_dict = checkpoint.get("state_dict")
    if not isinstance(hparams, dict) or not isinstance(hparams.get("model"), dict) or state_dict is None:
        raise CheckpointError(
            f"{str(path)!r} is an innerloop checkpoint without a model (no hyper_parameters['model'] or "
            "state_dict); pass a checkpoint written by `innerloop train`"
        )
    hparams = {**hparams, "model": saved_model_config(path, hparams["model"])}
    try:
        model = build_model(ModelConfig.from_dict(hparams["model"]))
    except (TypeError, ValueError, RuntimeError) as err:
        raise rebuild_error(path, err) from None
    expected = {MODEL_PREFIX + key: value for key, value in model.state_dict().items()}
    description = f"the model its hyperparameters describe ({describe_model(hparams['model'])})"
    try:
        check_state_dict(expected, state_dict, path, description)
    except CheckpointError as err:  # a key the hyperparameters lack may be why: name it
        note = missing_keys_note(hparams["model"], "its hyperparameters' model config")
        if not note:
            raise
        raise CheckpointError(f"{err}{note}") from None
    weights = {key.removeprefix(MODEL_PREFIX): value for key, value in state_dict.items()}
    load_weights(model, weights, keep_dtype)
    remake_recorded_token_index(model, checkpoint, path)
    run_kernels_that_work_here(model, path)
    return model.eval()


def run_kernels_that_work_here(model: torch.nn.Module, path: str | os.PathLike[str]) -> None:
    """Put the TTT layers of a model restored from ``path`` whose recorded kernel (``model.ttt.kernel``,
    the training run's speed choice) cannot run inference on this machine, neither on its CPU nor on a
    GPU it has, on ``kernel="auto"``, with a warning naming it: a run trained on a GPU's Triton kernel
    evaluates and generates on a machine without one. A kernel changes speed, not the model; a kernel
    that runs here stays."""
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    refused = refused_named_kernels(model, devices, requires_grad=False)
    for layer in model.modules():
        if isinstance(layer, TTTLayer) and layer.kernel in refused:
            layer.kernel = "auto"
    for kernel, reason in refused.items():
        warnings.warn(
            f"{str(path)!r} was trained with model.ttt.kernel={kernel!r}, which cannot run here ({reason}); "
            "its TTT layers run with kernel='auto' (a kernel changes speed, not the model)",
            stacklevel=warning_stacklevel(),
        )
