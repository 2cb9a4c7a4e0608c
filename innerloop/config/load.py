"""Loading, validating and saving run configs.

``load_config("tiny", ["trainer.max_steps=50"])`` reads the packaged preset ``tiny`` (or a YAML file
of that path), merges the ``key=value`` overrides into the :class:`RunConfig` schema and checks it
all before anything is built: an unknown key, a value of the wrong type, an unknown plugin, mixer,
dataset, strategy, accelerator or precision raises :class:`ConfigError`, which lists the valid choices.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import errno
import functools
import glob
import inspect
import logging
import math
import os
import pickle
import re
import shlex
import tempfile
import typing
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, is_dataclass
from fractions import Fraction
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from innerloop.config.schema import (
    DATASETS,
    FIELD_BOUNDS,
    SCHEDULES,
    DataConfig,
    RunConfig,
    TrainerConfig,
)
from innerloop.config.trainer_args import (
    BOOL_TEXTS,
    LIGHTNING_NAMES,
    PLAIN_FLOAT,
    PLAIN_FLOAT_WORDS,
    PLAIN_INT,
    PLAIN_INT_WORDS,
    check_lightning_arguments,
    check_loggers,
    route_trainer_keys,
    trainer_arguments,
    value_matches,
)
from innerloop.core.callers import warning_stacklevel
from innerloop.core.functional import check_flag, check_path_argument, user_path
from innerloop.core.layer import is_real
from innerloop.data.atomic import atomic_write_text
from innerloop.data.hf import check_hf_dataset, check_hf_source
from innerloop.data.recall import RECALL_VALUES, recall_length
from innerloop.data.text import (
    CHECKPOINT_FILE,
    PENDING_CHECKPOINT,
    check_text_split,
    expanded_entry,
    glob_matches,
    link_reaching,
    one_walk_per_entry,
    refuse_compressed,
    split_keys,
)
from innerloop.data.tokenizer import BYTES, Tokenizer, TokenizerError, load_tokenizer
from innerloop.models.config import (
    E2E_CHECKPOINTING_REFUSED,
    check_field_types,
    check_keys,
    check_weight_decay,
    field_types,
    unread_model_keys,
    validate_model_config,
    with_earlier_defaults,
)

DEFAULT_PRESET = "tiny"


class ConfigError(ValueError):
    """A run config that cannot be used; the message names the key, the value and the valid choices."""


def preset_names() -> list[str]:
    """Names of the YAML presets shipped in ``innerloop/config/presets``."""
    folder = resources.files("innerloop.config") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


_COMMAND_LINE_OPTIONS: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar(
    "innerloop_command_line_options", default=None
)
"""The options of the command running now, by the Python parameter each one gives (None: a call from
Python); see :func:`command_line_options`."""


@contextlib.contextmanager
def command_line_options(options: Mapping[str, str]) -> Iterator[None]:
    """Within it, errors of the Python API (``evaluate``, ``compare``) name the command line's option of
    each parameter in ``options`` (``{"seq_len": "--seq-len", "paths": "--data"}``) instead of the
    parameter: the command line runs them within it, so that its user reads the options they typed.
    Nested, it adds to (and for the same parameter replaces) the options of the one around it."""
    token = _COMMAND_LINE_OPTIONS.set({**(_COMMAND_LINE_OPTIONS.get() or {}), **options})
    try:
        yield
    finally:
        _COMMAND_LINE_OPTIONS.reset(token)


_BUILDING_FROM_A_CONFIG: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "innerloop_building_from_a_config", default=False
)


@contextlib.contextmanager
def building_from_a_config() -> Iterator[None]:
    """Within it, the LightningModule and DataModules built are a run config's (``innerloop train``,
    :func:`~innerloop.train.run.train`): their messages name that config's keys (``data.seq_len``,
    ``optim.lr``), which their user wrote; one built outside it (a user's own, for their own Lightning
    Trainer) names the arguments its user passed (``seq_len``, ``lr``: :func:`setting_name`)."""
    token = _BUILDING_FROM_A_CONFIG.set(True)
    try:
        yield
    finally:
        _BUILDING_FROM_A_CONFIG.reset(token)


def built_from_a_config() -> bool:
    """Whether the object being built now is a run config's (:func:`building_from_a_config`)."""
    return _BUILDING_FROM_A_CONFIG.get()


def setting_name(key: str, parameter: str, from_a_config: bool) -> str:
    """How a message of a LightningModule or DataModule names one of its settings: the config's ``key``
    (``data.seq_len``) for one built ``from_a_config``, else its argument ``parameter`` as its caller
    gave it (:func:`argument_name`)."""
    return key if from_a_config else argument_name(parameter)


def argument_name(parameter: str) -> str:
    """How an error names the argument ``parameter``: its option (``--seq-len``) within
    :func:`command_line_options`, else the Python parameter itself (``seq_len``)."""
    options = _COMMAND_LINE_OPTIONS.get()
    return parameter if options is None else options.get(parameter, parameter)


def offers_argument(parameter: str) -> bool:
    """Whether the caller can give ``parameter``: always from Python; within
    :func:`command_line_options` only where the command has an option for it (a command without one,
    e.g. ``science.py growth`` and ``paths``, is not told to give it)."""
    options = _COMMAND_LINE_OPTIONS.get()
    return options is None or parameter in options


def given_argument(parameter: str, value: Any, quoted: bool = True, placeholder: bool = False) -> str:
    """``value`` of the argument ``parameter`` as its caller gave it (:func:`_given` of
    :func:`argument_name`): ``--seq-len 8`` on the command line, ``seq_len=8`` from Python. A
    ``placeholder`` (``FILES``) stands for a value to give and is written bare: ``--data FILES``,
    ``paths=FILES``."""
    name = argument_name(parameter)
    if placeholder:
        return f"{name} {value}" if name.startswith("--") else f"{name}={value}"
    return _given(name, value, quoted)


def given_flag(parameter: str) -> str:
    """How its caller turns on the flag ``parameter`` (a bool that is off by default): its option
    (``--resume``) within :func:`command_line_options`, else ``resume=True`` from Python."""
    name = argument_name(parameter)
    return name if name.startswith("--") else f"{name}=True"


def from_command_line(parameter: str) -> bool:
    """Whether the argument ``parameter`` came from a command line's option (:func:`command_line_options`
    maps it to one): a message then gives a command to type, else a Python call."""
    return argument_name(parameter).startswith("--")


@contextlib.contextmanager
def arguments_of_the_caller(parameters: Mapping[str, str]) -> Iterator[None]:
    """Within it, errors that name a parameter ``inner`` of ``parameters`` (a function called on behalf of
    another: ``evaluation_windows``'s ``seq_len`` for ``compare``'s ``seq_lens``) name the caller's
    argument ``parameters[inner]`` as its own caller gave it (:func:`argument_name`: ``--seq-len`` on the
    command line, ``seq_lens`` from Python)."""
    with command_line_options({inner: argument_name(outer) for inner, outer in parameters.items()}):
        yield


PRESET_OR_FILE = "preset_or_file"
"""The parameter of :func:`load_config`, :func:`read_out_dir` and :func:`config_differences` that names
the config: the command line gives it as ``--config`` (or ``--resume``, a run's saved config), within
:func:`command_line_options`."""


def _given(option: str, value: Any, quoted: bool = True) -> str:
    """``value`` as its caller gave it: ``--config 'x'`` on the command line (``--config x`` unless
    ``quoted``, an argument to type), ``preset_or_file='x'`` from Python."""
    if not option.startswith("--"):
        return f"{option}={value!r}"
    return f"{option} {value!r}" if quoted else f"{option} {value}"


def _read_source(preset_or_file: str) -> tuple[str, str]:
    """The YAML text of a file path or a packaged preset name, and a description of where it came from;
    errors name ``preset_or_file`` as the caller gave it (:func:`given_argument`: ``--config`` on the
    command line)."""
    path = user_path(preset_or_file)
    if path.is_file() and preset_or_file in preset_names():  # a bare name: which one was meant?
        raise ConfigError(
            f"{given_argument(PRESET_OR_FILE, preset_or_file)} is both a preset and a file in the current directory; write "
            f"{given_argument(PRESET_OR_FILE, './' + str(preset_or_file), quoted=False)} for the file, or rename it to use "
            "the preset"
        )
    if path.is_file():
        source = f"file {str(Path(preset_or_file))!r}"
        if argument_name(PRESET_OR_FILE) != PRESET_OR_FILE:  # on the command line: the option too
            source = f"{argument_name(PRESET_OR_FILE)} {source}"
        try:
            return path.read_text(encoding="utf-8"), source
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{source} cannot be read as UTF-8 YAML: {err}") from None
    if preset_or_file in preset_names():
        text = (resources.files("innerloop.config") / "presets" / f"{preset_or_file}.yaml").read_text("utf-8")
        return text, f"preset {preset_or_file!r}"
    check_not_a_link_loop(path, given_argument(PRESET_OR_FILE, preset_or_file))
    if path.is_dir():  # "neither a file nor a preset" left a run folder given for its config.yaml a puzzle
        saved = path / "config.yaml"
        hint = f"; the run config in it is {str(saved)!r}" if saved.is_file() else ""
        raise ConfigError(
            f"{given_argument(PRESET_OR_FILE, preset_or_file)} is a directory, not a YAML file or a preset{hint}"
        )
    raise ConfigError(
        f"{given_argument(PRESET_OR_FILE, preset_or_file)} is neither a file nor a preset; presets: {preset_names()}"
    )


def _parse_source(text: str, source: str) -> tuple[DictConfig, list[str]]:
    """The YAML ``text`` of ``source`` as a config, and the typed keys it gives an interpolation
    ``${...}`` (their values are checked once resolved, see :func:`check_value_kinds`)."""
    try:
        # What the YAML is, first: OmegaConf.create reads a bare string as a mapping with that key.
        document = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source} is not valid YAML: {_yaml_problem(err)}") from None
    if document is None:  # an empty file, or only comments or null: a truncated file, or the wrong one
        raise ConfigError(
            f"{source} is empty: no settings (nothing but comments, or null); give the settings to change "
            f"(e.g. 'trainer: {{max_steps: 100}}'), or use the default preset {DEFAULT_PRESET!r}"
        )
    if not isinstance(document, dict):
        raise ConfigError(f"{source} must be a mapping of config sections, got {type(document).__name__}")
    try:
        loaded = OmegaConf.create(text)
    except Exception as err:  # YAML syntax errors come in several types (a key given twice, ...)
        raise ConfigError(f"{source} is not valid YAML: {_yaml_problem(err)}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{source} must be a mapping of config sections, got {type(loaded).__name__}")
    return loaded, check_value_kinds(yaml.compose(text, Loader=yaml.SafeLoader), "", source)


@dataclass(frozen=True)
class _Source:
    """A config source read and merged into the schema (see :func:`_merged_source`)."""

    container: Any  # the mapping as read
    routed: Any  # that mapping with its ``trainer`` keys routed
    merged: bytes  # the schema with the source merged in, pickled: each load unpickles a config of its own
    interpolated: tuple[str, ...]  # the typed keys the source gives an interpolation


@functools.lru_cache(maxsize=32)
def _merged_source(text: str, source: str) -> _Source:
    """``text`` of ``source`` parsed, its keys and types checked and merged into the schema; kept by
    text (the tests and a process resuming runs load the same presets hundreds of times: the three
    YAML parses and the merge are most of a load). A source that fails raises each time."""
    loaded, interpolated = _parse_source(text, source)
    try:
        container = OmegaConf.to_container(loaded)
    except OmegaConfBaseException as err:  # e.g. an interpolation ${...} that does not resolve
        raise ConfigError(f"{source}: {_first_line(err)}") from None
    routed = route_trainer_keys(container, source, ConfigError)  # trainer.<Lightning argument>
    check_keys(routed, RunConfig, "", source, ConfigError)
    from_source = OmegaConf.create(routed) if routed is not container else loaded
    merged = _merge(_schema(), from_source, source)
    # kept pickled: unpickling makes the same config (every node's type, metadata and flags: checked on
    # every preset) in a sixth of the time of copy.deepcopy (1.0 ms, not 6.3: a load takes a new one, two
    # where a merge fails; the config holds only what YAML gives, all of it picklable)
    return _Source(container, routed, pickle.dumps(merged, pickle.HIGHEST_PROTOCOL), tuple(interpolated))


def _yaml_problem(err: BaseException) -> str:
    """A YAML parser's error on one line, its places (``line 3, column 3``) without the name of the
    stream it read (``in "<unicode string>"``: the text of the file the message names first)."""
    return _one_line(err).replace(' in "<unicode string>",', " at")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _expected_type(key: str) -> Any:
    """The type that the dotted ``key`` has in the :class:`RunConfig` schema (None if it has none). A
    key under ``trainer`` that is Lightning's name of one of innerloop's keys (:data:`LIGHTNING_NAMES`)
    has that key's type, another Lightning argument the Trainer's annotation of it."""
    parts = key.split(".")
    if parts[0] == "trainer" and len(parts) > 1:
        name = parts[-1] if parts[1] == "lightning" and len(parts) == 3 else parts[1]
        if name in LIGHTNING_NAMES and len(parts) == 2:
            return _expected_type(LIGHTNING_NAMES[name])
        if name not in field_types(TrainerConfig) and (len(parts) == 2 or parts[1] == "lightning"):
            return trainer_arguments().get(name) if len(parts) <= 3 else None
    node: Any = RunConfig
    for part in parts:
        name, _, index = part.partition("[")  # a list's element: data.paths[0]
        if not is_dataclass(node):
            return None
        node = field_types(node).get(name)
        if index and typing.get_origin(node) is list:
            node = typing.get_args(node)[0]
    return node


# -- the kinds of values a typed key takes ----------------------------------------------------------------
# YAML 1.1, which OmegaConf reads, and OmegaConf's conversions accept much that is not what the schema
# declares (`yes`, `1` and `'1'` for a bool; `0x20`, `0o17`, `017`, `1:30` and full-width digits for a
# number). A scalar for a bool, int or float key is checked here on its text, before any of that.

_NULLS = ("", "~", "null", "Null", "NULL")
_KIND_WORDS = {
    bool: "true or false",
    int: PLAIN_INT_WORDS,
    float: PLAIN_FLOAT_WORDS,
    type(None): "null",
}


_UnionType = type(int | None)  # the type of ``X | None``, which typing.get_origin gives for it


def _kinds(expected: Any) -> tuple[Any, ...] | None:
    """The members of the type ``expected`` (a union's, or itself) when each is a bool, int, float,
    None or a ``Literal``, whose text can be judged; None for any other type (str, Any, a class)."""
    union = typing.get_origin(expected) in (typing.Union, _UnionType)
    members = typing.get_args(expected) if union else (expected,)
    literal = [m for m in members if typing.get_origin(m) is typing.Literal]
    if all(m in _KIND_WORDS for m in members if m not in literal):
        return members
    return None


def _text_fits(text: str, kinds: Sequence[Any], quoted: bool = False) -> bool:
    """Whether the YAML scalar ``text`` is a value of one of ``kinds``. A quoted scalar (``"5"``,
    ``!!int "5"``) is judged on its text as a plain one, by the same strict rules (``"0x20"`` is no
    int, ``"yes"`` no bool), except that a quoted null (``"null"``, ``""``) is a string, not null."""
    for kind in kinds:
        if typing.get_origin(kind) is typing.Literal and text in [str(v) for v in typing.get_args(kind)]:
            return True
        if kind is bool and text in BOOL_TEXTS or kind is type(None) and text in _NULLS and not quoted:
            return True
        if kind is int and PLAIN_INT.fullmatch(text):
            return True
        if kind is float and (
            # an integer past float's range (400 digits) is refused: omegaconf's float() raised OverflowError
            PLAIN_INT.fullmatch(text) and is_real(int(text)) or PLAIN_FLOAT.fullmatch(text)
        ):
            return True
    return False


def _kind_words(kinds: Sequence[Any]) -> str:
    words = [
        " or ".join(repr(v) for v in typing.get_args(k))
        if typing.get_origin(k) is typing.Literal
        else _KIND_WORDS[k]
        for k in kinds
    ]
    return ", or ".join(words)


def check_value_kinds(node: yaml.Node | None, key: str, source: str) -> list[str]:
    """Raise :class:`ConfigError` for a scalar of the YAML ``node`` (the value of the dotted ``key``;
    ``""``: the whole config) that is not of the kind its key takes: a bool key takes only ``true`` or
    ``false``, an int key a plain decimal integer (not a bool, not hexadecimal, octal or binary, not
    ``017``, not non-ASCII digits), a float key such an integer or a decimal number (``3e-4``), and a
    key that is not optional no null (nor an empty value). A quoted scalar is judged on its text as an
    unquoted one (``lr: "0.001"`` is a float), but a quoted null is a string. Returns the typed keys
    given an interpolation ``${...}``, whose values :func:`check_interpolated_kinds` checks once
    resolved. Unknown keys, and a section (``model:``) given a scalar or nothing, are left to
    :func:`~innerloop.models.config.check_keys`, which lists the section's keys."""
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
        _check_container_kind(
            "a mapping" if isinstance(node, yaml.MappingNode) else "a list", "", key, source
        )
    if isinstance(node, yaml.MappingNode):
        interpolated = []
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            if key_node.tag != "tag:yaml.org,2002:merge":
                interpolated += check_value_kinds(value_node, f"{key}.{key_node.value}".lstrip("."), source)
                continue
            merged = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
            for mapping in merged:  # `<<: *base` or `<<: [*a, *b]`: their keys are this mapping's
                interpolated += check_value_kinds(mapping, key, source)
        return interpolated
    if isinstance(node, yaml.SequenceNode):
        return [
            k for i, item in enumerate(node.value) for k in check_value_kinds(item, f"{key}[{i}]", source)
        ]
    text, quoted = ("", False) if node is None else (node.value, node.style in ("'", '"'))
    if not key or (key.partition(".")[0] not in field_types(RunConfig)):
        return []
    key = _routed_key(key)
    expected = _expected_type(key)
    if "${" in text:
        container = not is_dataclass(expected) and _container_kind(expected) in ("a list", "a mapping")
        return [key] if _kinds(expected) is not None or container else []
    if is_dataclass(expected):
        return []
    if text == MISSING_MARKER and (expected is not None or _is_lightning_argument(key)):
        raise ConfigError(_missing_message(key, source, expected, quoted))
    if not quoted and text in _NULLS and not _takes_null(expected):
        raise ConfigError(_no_value_message(key, source, text, expected))
    _check_container_kind("one value", text, key, source)
    if expected is str and not quoted:
        _check_text_kept(text, key, source)
    kinds = _kinds(expected)
    if kinds is None or _text_fits(text, kinds, quoted):
        return []
    if _is_lightning_argument(key) and not value_matches(text if quoted else yaml.safe_load(text), expected):
        return []  # not of its kind even as YAML reads it: check_lightning_arguments says so, with its type
    shown = repr(text)
    if quoted:
        null = text in _NULLS and type(None) in kinds
        shown += " (a quoted string, not null: write null unquoted)" if null else " (a quoted string)"
    name = expected.__name__ if isinstance(expected, type) else str(expected).replace("typing.", "")
    raise ConfigError(
        f"config key {key!r} in {source}: {shown} is not {_kind_words(kinds)} (expected {name})"
    )


_MAY_NOT_BE_TEXT = re.compile(r"[-+.0-9]|(?i:y|yes|n|no|true|false|on|off)$")
"""The start of a plain scalar that YAML (OmegaConf's) may read as a number or a bool."""


def _check_text_kept(text: str, key: str, source: str) -> None:
    """Raise :class:`ConfigError` when the unquoted scalar ``text`` of the string key ``key`` is one that
    YAML reads as a number or a bool whose ``str`` is other text: OmegaConf would store that string, so
    ``out_dir=010`` trained into ``8`` (octal), ``1.10`` into ``1.1``, ``1:30`` into ``90``, ``on`` into
    ``True``, silently. A scalar that keeps its text (``7``, ``2024-01-15``, ``nan``) is left as it is."""
    if not _MAY_NOT_BE_TEXT.match(text):
        return
    try:
        value = OmegaConf.create(f"value: {text}")["value"]
    except Exception:  # not a plain scalar on its own: the merge reads it as its source gave it
        return
    if isinstance(value, str) or str(value) == text:
        return
    kind = "bool" if isinstance(value, bool) else type(value).__name__
    raise ConfigError(
        f"config key {key!r} in {source}: {text} unquoted is read by YAML as the {kind} {value!r}, which "
        f"{key} would take as the string {str(value)!r}; quote it to keep it as written ('{text}')"
    )


def _routed_key(key: str) -> str:
    """The dotted ``key`` where :func:`~innerloop.config.trainer_args.route_trainer_keys` puts its value:
    ``trainer.log_every_n_steps`` is ``trainer.log_every``, ``trainer.deterministic`` is
    ``trainer.lightning.deterministic``."""
    parts = key.split(".")
    if parts[0] != "trainer" or len(parts) != 2 or parts[1] in field_types(TrainerConfig):
        return key
    return LIGHTNING_NAMES.get(parts[1], f"trainer.lightning.{parts[1]}")


def _is_lightning_argument(key: str) -> bool:
    """Whether the dotted ``key`` is a ``lightning.Trainer`` argument other than innerloop's own keys
    (``trainer.deterministic``, ``trainer.lightning.deterministic``)."""
    parts = key.split(".")
    if parts[0] != "trainer" or len(parts) not in (2, 3) or (len(parts) == 3 and parts[1] != "lightning"):
        return False
    return parts[-1] not in field_types(TrainerConfig) and parts[-1] not in LIGHTNING_NAMES


def _takes_null(expected: Any) -> bool:
    """Whether a key of type ``expected`` may be null (Optional, Any or unknown)."""
    return expected in (None, Any) or type(None) in typing.get_args(expected)


def _no_value_message(key: str, source: str, text: str, expected: Any) -> str:
    """The error of a key that is not optional given no value (``out_dir=``) or null."""
    given = "is given no value" if text == "" else f"is {text} (no value)"
    return f"config key {key!r} in {source} {given}: it takes {_what_key_takes(key, expected)}"


MISSING_MARKER = "???"
"""omegaconf's (and Hydra's) mandatory-value marker: a template's key that each user must fill in."""


def _missing_message(key: str, source: str, expected: Any, quoted: bool) -> str:
    """The error of a key given :data:`MISSING_MARKER`, which a merge would silently drop (the value
    before it, a preset's or the default, would stay), quoted or not (omegaconf reads both alike)."""
    how = " (quoted or not, omegaconf reads '???' as the marker)" if quoted else ""
    return (
        f"config key {key!r} in {source} is '???', a value to fill in{how}: give it a value "
        f"(it takes {_what_key_takes(key, expected)})"
    )


#: What the container keys take, and an example of each (for messages).
_CONTAINER_WORDS = {
    "data.paths": (
        "a list of paths (files, folders or globs)",
        "data.paths=[a.txt,texts/] (in YAML: paths: [a.txt, texts/])",
    ),
    "trainer.lightning": (
        "a mapping of lightning.Trainer arguments by name",
        "trainer.lightning.deterministic=true (in YAML, under trainer: lightning: {deterministic: true})",
    ),
    "logger": ("a logger's name or a list of names (csv, tensorboard, wandb)", "logger=[csv,tensorboard]"),
}


def _what_key_takes(key: str, expected: Any) -> str:
    """Words for what the dotted ``key`` (of type ``expected``) takes, with an example: a container
    key's form (:data:`_CONTAINER_WORDS`), else its kind and its default."""
    words, example = _key_words_and_example(key, expected)
    return f"{words}, e.g. {example}" if example else words


def _key_words_and_example(key: str, expected: Any) -> tuple[str, str]:
    """What the dotted ``key`` takes, in words, and an example ("" for none): see :func:`_what_key_takes`."""
    if key in _CONTAINER_WORDS:
        return _CONTAINER_WORDS[key]
    kinds = _kinds(expected)
    if kinds:
        wanted = _kind_words(kinds)
    elif expected is str:
        wanted = "a string"
    else:
        wanted = (
            f"a value of type {getattr(expected, '__name__', None) or str(expected).replace('typing.', '')}"
        )
    default = _default_value(key)
    return wanted, (f"its default {default!r}" if default is not None else "")


def _container_kind(expected: Any) -> str | None:
    """``"a list"``, ``"a mapping"`` or ``"one value"``: what a key of type ``expected`` takes; None
    when it may take more than one of them (``Any``, an unknown key)."""
    origin = typing.get_origin(expected)
    if origin in (list, tuple):
        return "a list"
    if origin is dict or is_dataclass(expected):
        return "a mapping"
    union = origin in (typing.Union, _UnionType)
    members = typing.get_args(expected) if union else (expected,)
    scalars = (str, int, float, bool, type(None))
    if expected not in (None, Any) and all(
        m in scalars or typing.get_origin(m) is typing.Literal for m in members
    ):
        return "one value"
    return None


def _check_container_kind(given: str, text: str, key: str, source: str) -> None:
    """Raise :class:`ConfigError` when the dotted ``key`` is given ``given`` (``"a list"``, ``"a mapping"``
    or ``"one value"``, whose YAML is ``text``) but takes another of them (:func:`_container_kind`):
    omegaconf's own errors name its internals (``AnyNode is not a ListConfig``), or are a TypeError.
    A section given other than a mapping is left to :func:`~innerloop.models.config.check_keys`, which
    lists its keys; a Lightning argument to :func:`~innerloop.config.trainer_args.check_lightning_arguments`."""
    if not key or "[" in key or key.partition(".")[0] not in field_types(RunConfig):
        return
    key = _routed_key(key)
    expected = _expected_type(key)
    wanted = _container_kind(expected)
    if wanted in (None, given) or is_dataclass(expected) or _is_lightning_argument(key):
        return
    words, example = _key_words_and_example(key, expected)
    if wanted == "a list" and given == "one value":
        yaml_key, entry = key.rpartition(".")[2], _as_list_entry(text)  # never a suggestion refused in turn
        raise ConfigError(
            f"config key {key!r} in {source} takes {words}, got one value {text!r}: write {key}=[{entry}] "
            f"(in YAML: {yaml_key}: [{entry}])"
        )
    shown = f"one value {text!r}" if given == "one value" else given
    raise ConfigError(
        f"config key {key!r} in {source} takes {words}, got {shown}"
        + (f": e.g. {example}" if example else "")
    )


def _default_value(key: str) -> Any:
    """The schema's default of the dotted ``key`` (None for none, or a list element's key)."""
    node: Any = _schema()
    for part in key.split("."):
        if "[" in part or not isinstance(node, DictConfig) or part not in node:
            return None
        node = node[part]
    return node if not isinstance(node, DictConfig) and not OmegaConf.is_list(node) else None


def check_interpolated_kinds(cfg: DictConfig, keys: Sequence[str], source: str) -> None:
    """Raise :class:`ConfigError` for a key of ``keys`` (given an interpolation ``${...}`` in ``cfg``,
    the merged config) whose resolved value is not of its key's kind, as :func:`check_value_kinds` says
    (a string, e.g. from ``oc.env``, judged on its text). An interpolation that does not resolve (a
    missing key, an unset ``oc.env`` variable) is a :class:`ConfigError` naming the key and ``source``,
    the file or override that gave it (the run config's conversion named the key alone)."""
    if not keys:
        return
    plain = OmegaConf.create(OmegaConf.to_container(cfg))  # untyped: an interpolation resolves as it is
    for key in keys:
        try:
            value = OmegaConf.select(plain, key, throw_on_missing=True)
        except OmegaConfBaseException as err:
            raise ConfigError(f"config key {key!r} in {source}: {_first_line(err)}") from None
        _check_interpolated_container(key, value, source)
        kinds = _kinds(_expected_type(key)) or ()
        fits = any(
            type(value) is kind or (kind is float and type(value) is int)
            for kind in kinds
            if kind in _KIND_WORDS
        ) or (isinstance(value, str) and _text_fits(value, kinds))
        if kinds and not fits:
            raise ConfigError(
                f"config key {key!r} in {source}: the interpolation resolves to {value!r} "
                f"({type(value).__name__}), which is not {_kind_words(kinds)}"
            )


def _check_interpolated_container(key: str, value: Any, source: str) -> None:
    """Raise :class:`ConfigError` when the list or mapping key ``key`` (``data.paths``,
    ``trainer.lightning``) was given an interpolation resolving to ``value``, another kind of value: the
    conversion to the run config named neither the key nor the value (``config key '?' in preset
    'tiny': Invalid value assigned: float is not a ListConfig``)."""
    expected = _expected_type(key)
    wanted = _container_kind(expected)
    if is_dataclass(expected) or wanted not in ("a list", "a mapping"):
        return
    if isinstance(value, ListConfig if wanted == "a list" else DictConfig):
        return
    raise ConfigError(
        f"config key {key!r} in {source}: the interpolation resolves to {value!r:.80} ({type(value).__name__}), "
        f"but the key takes {_what_key_takes(key, expected)}"
    )


def _merge(cfg: DictConfig, other: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, other)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        expected = _expected_type(key) if key != "?" else None
        name = getattr(expected, "__name__", None) or str(expected)
        given = OmegaConf.select(other, key) if key != "?" else None
        if isinstance(given, DictConfig):  # `model.hidden_size.x=8`: omegaconf said "could not be converted"
            raise ConfigError(
                f"config key {key!r} in {source}: {key} takes one value ({name}), not a mapping: it has no "
                f"key {', '.join(map(repr, given.keys()))} below it; give {key}=<{name}>"
            ) from None
        raise ConfigError(f"config key {key!r} in {source}: {_first_line(err)} (expected {name})") from None
    except TypeError as err:  # "Cannot merge incompatible container types": no key named
        raise ConfigError(
            f"{source}: {_first_line(err)}: a key that takes a list is given a mapping, or the reverse "
            f"(data.paths takes a list, e.g. {_CONTAINER_WORDS['data.paths'][1]}; trainer.lightning a "
            "mapping)"
        ) from None


def _merge_in_order(base: Callable[[], DictConfig], parts: Sequence[tuple[DictConfig, str]]) -> DictConfig:
    """The config ``base()`` builds, with ``parts`` merged in order into it, in place (``base()`` is a new
    config each call, so no copy is needed: a copy costs a third of a config load). Where that fails,
    a new base and the parts one by one, so that the error names the part at fault (see :func:`_merge`)."""
    cfg = base()
    if not parts:
        return cfg
    try:
        return OmegaConf.unsafe_merge(cfg, *(part for part, _ in parts))  # type: ignore[return-value]
    except (OmegaConfBaseException, TypeError):
        cfg = base()
        for part, source in parts:
            cfg = _merge(cfg, part, source)
        return cfg


def _checked_override(item: str) -> tuple[DictConfig, str, list[str]]:
    """The override ``key=value`` as a config to merge, with its source and the typed keys it gives an
    interpolation (:func:`check_value_kinds`); :class:`ConfigError` if it is not of that form, cannot
    be parsed, names no key of the schema or gives a value of another kind than its key takes."""
    override, source, interpolated = _parsed_override(item)
    return copy.deepcopy(override), source, list(interpolated)  # a merge may take the nodes it is given


@functools.lru_cache(maxsize=256)
def _parsed_override(item: str) -> tuple[DictConfig, str, tuple[str, ...]]:
    """:func:`_checked_override`'s work, kept by the override's text (never handed out: copies of it)."""
    key, sep, _ = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. trainer.max_steps=100)")
    try:
        override = OmegaConf.from_dotlist([item])
    except Exception as err:  # the value is parsed as YAML: its syntax errors come in several types
        hint, value = "", item.partition("=")[2]
        if "${" in item and "[" in value:  # YAML reads the { of ${...} as a mapping
            hint = "; quote a list entry that holds an interpolation, e.g. data.paths=['${oc.env:HOME}/x']"
        elif value.lstrip().startswith("["):  # a flow list: a comma splits entries, a bracket nests a list
            hint = (
                f"; a list is [a,b], closed, with an entry that holds a comma, a bracket or a brace quoted, "
                f"e.g. {key}=['my texts, v2 [draft]',notes.txt]"
            )
        raise ConfigError(f"override {item!r} cannot be parsed: {_first_line(err)}{hint}") from None
    source = f"override {item!r}"
    routed = route_trainer_keys(OmegaConf.to_container(override), source, ConfigError)
    check_keys(routed, RunConfig, "", source, ConfigError)
    try:  # OmegaConf's YAML takes what PyYAML's does not: a tab in a plain value (out_dir=a<TAB>b)
        value = yaml.compose(item.partition("=")[2], Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        why = getattr(err, "problem", None) or _first_line(err)  # its first line says "while scanning" alone
        raise ConfigError(f"override {item!r} cannot be parsed: {why}; quote the value") from None
    interpolated = check_value_kinds(value, key, source)
    return OmegaConf.create(routed), source, tuple(interpolated)


@functools.cache
def _schema() -> DictConfig:
    """The :class:`RunConfig` schema with its defaults, built once (merging copies it, never changes it)."""
    return OmegaConf.structured(RunConfig)


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def load_config(
    preset_or_file: str | os.PathLike[str] = DEFAULT_PRESET,
    overrides: Sequence[str] = (),
    *,
    model_only: bool = False,
    out_dir: str | None = None,
) -> tuple[RunConfig, DictConfig]:
    """Load a preset or YAML file, apply ``key=value`` overrides, validate; return the typed config and
    its omegaconf form (for saving). ``model_only``: check every value :func:`validate_run_config` checks
    but not this machine or its files, for commands that build no run (``innerloop params``): a data
    path or out_dir that a run could not use, an accelerator absent here, does not concern them, but a
    value that ``train`` would refuse does (:func:`_check_run_values`). ``out_dir``, when given, replaces
    the config's (after the overrides): a resume's folder is where its config.yaml was found, not the
    one the config names (a moved run's). A ``~`` in ``out_dir`` is expanded; ``preset_or_file`` is then
    the run's saved config.yaml, whose model options added since it was written are read at the values
    its model was trained with (:func:`~innerloop.models.config.with_earlier_defaults`), as its
    checkpoint's are. Errors name ``preset_or_file`` as the caller gave it (the command line runs this
    within :func:`command_line_options`: ``--config``)."""
    check_flag("model_only", model_only)  # 'false' would skip the run's checks
    container, _, cfg = _merged_config(preset_or_file, overrides, saved_run=out_dir is not None)
    run = _typed(cfg, preset_or_file, overrides)
    if out_dir is not None:  # a resume trains in the folder its config.yaml was found in
        cfg.out_dir = run.out_dir = out_dir
    if run.out_dir != os.path.expanduser(run.out_dir):  # Lightning expands ~, pathlib does not: one folder
        run.out_dir = cfg.out_dir = os.path.expanduser(run.out_dir)
    if not _vocab_size_given(container, overrides):
        _vocabulary_from_tokenizer(run, cfg)
    if model_only:
        _check_run_values(run)
    else:
        validate_run_config(run)
    from_file = out_dir is None and user_path(preset_or_file).is_file()  # a resume's: innerloop's
    _warn_keys_given_twice(overrides)
    _warn_unread_keys(
        run, overrides, _flat_dict(container) if from_file else {}, str(preset_or_file), model_only
    )
    return run, cfg


def _warn_keys_given_twice(overrides: Sequence[str]) -> None:
    """Warn about a key that two of ``overrides`` set (also under two names of one key,
    ``trainer.log_every_n_steps`` and ``trainer.log_every``), naming both: the overrides merge in
    order, so the last is used, and the first is a value the user may believe the run has."""
    seen: dict[str, str] = {}
    for item in overrides:
        written = item.partition("=")[0].strip()
        key = _routed_key(
            written
        )  # trainer.max_time is trainer.lightning.max_time: named as the user wrote it
        if key in seen:
            first = seen[key].partition("=")[0].strip()  # both items are quoted after it
            warnings.warn(
                f"config key {first!r} is given twice in the overrides, {seen[key]!r} and {item!r}: the last "
                "is used; give it once",
                UserWarning,
                stacklevel=warning_stacklevel(),
            )
        seen[key] = item


def unread_run_keys(run: RunConfig) -> dict[str, str]:
    """The dotted ``optim.*`` and ``trainer.*`` keys that the training of ``run`` never reads, each with
    the reason (the counterpart of :func:`~innerloop.models.config.unread_model_keys`): the learning-rate
    schedule's (:mod:`innerloop.train.schedules`), the TTT base-lr warm-up's (``TTTBaseLRWarmup``, added
    only when ``optim.ttt_base_lr_warmup`` > 0) and the inner-loss diagnostics' (run for
    ``model.mixer='ttt'`` only, ``LanguageModelModule``)."""
    optim, unread = run.optim, {}
    if optim.schedule != "wsd":
        how = "does not decay" if optim.schedule == "constant" else "decays from the end of the warm-up"
        unread["optim.decay_fraction"] = (
            f"only optim.schedule='wsd' reads it, for its last phase (this run's {optim.schedule!r} {how})"
        )
    if optim.schedule == "constant":
        unread["optim.min_lr"] = "optim.schedule='constant' stays at optim.lr after the warm-up"
    if optim.ttt_base_lr_warmup == 0:
        unread["optim.ttt_base_lr_init"] = (
            "it is where the warm-up of the TTT layers' base lr starts, and optim.ttt_base_lr_warmup=0 "
            "turns that warm-up off"
        )
    if run.model.mixer != "ttt" and run.trainer.diagnostics_batches != 0:  # 0: off, as it is anyway
        unread["trainer.diagnostics_batches"] = (
            f"the inner-loss diagnostics run for model.mixer='ttt' only (this run's is {run.model.mixer!r})"
        )
    return unread


def _warn_unread_keys(
    run: RunConfig, overrides: Sequence[str], from_file: dict[str, Any], file: str, model_only: bool
) -> None:
    """Warn, once per key, about a ``model.*`` key that an override or the user's YAML file (its keys
    flattened, ``from_file``) sets and the model never reads (:func:`~innerloop.models.config.
    unread_model_keys`): e.g. ``model.ttt.base_lr`` of an attention model, ``model.window`` of a TTT
    model; and, unless ``model_only``, about such an ``optim.*`` or ``trainer.*`` key that the training
    never reads (:func:`unread_run_keys`). A preset's keys are not warned about, nor a file's key at its
    default (a saved run's config.yaml holds every key). Not an error: the run is the one asked for."""
    unread = {
        key: f"is not read by this model (model.mixer={run.model.mixer!r}): {why}"
        for key, why in unread_model_keys(run.model).items()
    }
    if not model_only:
        unread.update({key: f"is not read by this run: {why}" for key, why in unread_run_keys(run).items()})
    defaults = _flat_dict(OmegaConf.to_container(_schema()))
    given = {item.partition("=")[0].strip(): f"override {item!r}" for item in overrides}
    given.update(
        {k: f"file {file!r}" for k, v in from_file.items() if k not in given and v != defaults.get(k, v)}
    )
    for key, source in given.items():
        section = next((u for u in unread if key == u or key.startswith(f"{u}.")), None)
        if section is not None:
            warnings.warn(
                f"{key} ({source}) {unread[section]}, so it changes nothing",
                UserWarning,
                stacklevel=warning_stacklevel(),
            )


def _merged_config(
    preset_or_file: Any, overrides: Sequence[str], saved_run: bool = False
) -> tuple[Any, Any, DictConfig]:
    """The config source's mapping as read, that mapping with its ``trainer`` keys routed, and the
    schema with the source and ``overrides`` merged in; the keys and types checked, not the values.
    ``saved_run``: the source is a run's saved config.yaml (see :func:`_earlier_model_options`)."""
    _check_load_arguments(preset_or_file, overrides)
    text, source = _read_source(preset_or_file)
    # a config of a megabyte or more (a generated one) is not kept: the cache holds 32 sources
    read = _merged_source(text, source) if len(text) < 1_000_000 else _merged_source.__wrapped__(text, source)
    base = functools.partial(pickle.loads, read.merged)  # a new config each call
    earlier = _earlier_model_options(read.routed) if saved_run else {}
    checked = [(OmegaConf.create(earlier), source)] if earlier else []  # merged after the loop, in one merge
    sources = {key: source for key in read.interpolated}
    for item in overrides:
        try:
            override, where, keys = _checked_override(item)
        except ConfigError:
            _merge_in_order(base, checked)  # an earlier override's merge error comes first, as it is earlier
            raise
        checked.append((override, where))
        sources.update(dict.fromkeys(keys, where))
    merged = _merge_in_order(base, checked)
    _replace_whole_lightning_values(merged, overrides, checked)
    for key, where in sources.items():
        check_interpolated_kinds(merged, [key], where)
    return copy.deepcopy(read.container), copy.deepcopy(read.routed), merged


def _replace_whole_lightning_values(
    merged: DictConfig, overrides: Sequence[str], checked: Sequence[tuple[DictConfig, str]]
) -> None:
    """Give each Lightning argument an override gives a mapping (``trainer.max_time={minutes: 30}``) that
    mapping whole, in ``merged``: it is one value, but OmegaConf merged it into the earlier one (the
    config file's, an earlier override's), so ``{hours: 1}`` then ``{minutes: 30}`` was a limit of 1 h
    30 min, and a resumed run's ``{days: 0, seconds: 3600, microseconds: 0}`` given ``{hours: 2}`` 3 h.
    A dotted key below the argument (``trainer.max_time.minutes=30``) still sets that part alone."""
    parts = [part for part, _ in checked[len(checked) - len(overrides) :]]  # after the earlier options
    last: dict[str, tuple[str, Any]] = {}  # each argument's last override: its key, the value it gives
    for item, part in zip(overrides, parts, strict=True):
        trainer = part._get_node("trainer")  # nodes, not values: an interpolation is not resolved here
        given = trainer._get_node("lightning") if isinstance(trainer, DictConfig) else None
        if isinstance(given, DictConfig) and not given._is_interpolation():
            last.update(
                {str(name): (item.partition("=")[0].strip(), given._get_node(name)) for name in given}
            )
    for name, (key, value) in last.items():
        whole = key in ("trainer", "trainer.lightning", f"trainer.{name}", f"trainer.lightning.{name}")
        if whole and isinstance(value, DictConfig):
            merged.trainer.lightning[name] = copy.deepcopy(value)


def _earlier_model_options(routed: Any) -> dict[str, Any]:
    """``{"model": {section: {key: value}}}``: the model options a run's saved config.yaml (which holds
    every key of the innerloop that wrote it) does not name, at the values its model was trained with
    (:func:`~innerloop.models.config.with_earlier_defaults`), not today's defaults: an older run resumes
    and is read as the checkpoint it wrote. Empty when it names them all."""
    model = routed.get("model") if isinstance(routed, dict) else None
    filled = with_earlier_defaults(model)
    added = {
        section: {key: value for key, value in filled[section].items() if key not in model[section]}
        for section in ("e2e", "ttt")
        if filled is not model and isinstance(model.get(section), dict)
    }
    added = {section: keys for section, keys in added.items() if keys}
    return {"model": added} if added else {}


def _typed(cfg: DictConfig, preset_or_file: Any, overrides: Sequence[str]) -> RunConfig:
    """``cfg`` (``preset_or_file`` with ``overrides``) as a :class:`RunConfig`; an interpolation that does
    not resolve is a :class:`ConfigError` naming the key and the override or file that gave it."""
    try:
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except OmegaConfBaseException as err:  # an interpolation ${...} that does not resolve
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(
            f"config key {key!r} in {_source_of(key, preset_or_file, overrides)}: {_first_line(err)}"
        ) from None


def _source_of(key: str, preset_or_file: Any, overrides: Sequence[str]) -> str:
    """Where ``key`` was given: the last of ``overrides`` that sets it or a section above it
    (``override 'data.paths=[${nope}]'``), else the preset or file (``file 'run.yaml'``)."""
    for item in reversed(overrides):
        given = item.partition("=")[0].strip().lstrip("+~")
        if key == given or key.startswith((f"{given}.", f"{given}[")):
            return f"override {item!r}"
    return _read_source(str(preset_or_file))[1]


def read_out_dir(
    preset_or_file: str | os.PathLike[str] = DEFAULT_PRESET,
    overrides: Sequence[str] = (),
) -> str:
    """The ``out_dir`` a config with ``overrides`` names (``~`` expanded), its keys and types checked but
    not its values: where ``--resume`` finds the run, whose own saved config is then the one checked
    (the preset's or file's other values do not concern it)."""
    _, _, cfg = _merged_config(preset_or_file, overrides)
    try:
        out_dir = cfg.out_dir
    except OmegaConfBaseException as err:  # an interpolation ${...} that does not resolve
        where = _source_of("out_dir", preset_or_file, overrides)
        raise ConfigError(f"config key 'out_dir' in {where}: {_first_line(err)}") from None
    return os.path.expanduser(str(out_dir))


def config_differences(
    preset_or_file: str | os.PathLike[str],
    overrides: Sequence[str],
    run: RunConfig,
) -> list[str]:
    """``key (run's value -> config's value)`` for each key that the preset or file sets (other than
    ``out_dir``) where it, with ``overrides``, differs from ``run``. Data paths and a tokenizer path
    are compared as a run records them, absolute (:func:`absolute_data_paths`)."""
    _, routed, cfg = _merged_config(preset_or_file, overrides)
    given = set(_flat_dict(routed)) - {"out_dir"}
    theirs = _typed(cfg, preset_or_file, overrides)
    check_path_entries(theirs.data.paths, f"{given_argument(PRESET_OR_FILE, str(preset_or_file))}: ")
    theirs.data.paths = absolute_data_paths(theirs.data.paths)
    theirs.data.tokenizer = absolute_tokenizer(theirs.data.tokenizer)
    new = _flat_dict(OmegaConf.to_container(OmegaConf.structured(theirs)))
    old = _flat_dict(OmegaConf.to_container(OmegaConf.structured(run)))
    return [f"{k} ({old.get(k)!r} -> {new[k]!r})" for k in sorted(given & new.keys()) if old.get(k) != new[k]]


def _flat_dict(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{dotted key: value}`` of nested dicts (lists and other values are leaves)."""
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flat_dict(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def absolute_data_paths(paths: Sequence[str], base: str | os.PathLike[str] | None = None) -> list[str]:
    """``data.paths`` with every relative entry (``~`` expanded first: :func:`~innerloop.data.text.expanded_entry`) joined to ``base`` (default: the
    current directory); absolute entries stay, and a glob stays a glob (it is not expanded)."""
    root = os.fspath(base) if base is not None else os.getcwd()
    return [_joined_entry(root, expanded_entry(p)) for p in paths]


def _joined_entry(root: str, entry: str) -> str:
    """The ``data.paths`` entry joined to the folder ``root``, which is escaped (:func:`glob.escape`) below
    a relative glob: run from a folder such as ``proj[1]``, the glob ``data/*.txt`` is that folder's files,
    never those of a folder ``proj1`` that ``[1]`` matches (an existing file or folder is read as named). The
    glob's folder, which split keys are relative to, is then the one before the escaped segment (as for
    any glob holding an escape: :func:`~innerloop.data.text.split_keys`)."""
    joined = os.path.join(root, entry)
    if os.path.isabs(entry) or os.path.lexists(joined) or not glob.has_magic(entry):
        return joined
    return os.path.join(glob.escape(root), entry)


def absolute_tokenizer(spec: str) -> str:
    """``data.tokenizer`` made absolute when it names a file or folder (``~`` expanded first): the same
    tokenizer files from any directory; ``bytes`` (and a spec that names nothing) as it is."""
    if spec == BYTES or not os.path.exists(os.path.expanduser(spec)):
        return spec
    return os.path.abspath(os.path.expanduser(spec))


def read_run_config(path: str | Path) -> RunConfig:
    """The run config a run saved (its ``config.yaml``): the schema's keys and types, without the checks
    of the machine it trains on (accelerator, loggers, out_dir), which reading its data elsewhere does
    not need (a run trained on a GPU is evaluated on a CPU). Raises :class:`ConfigError` naming the file
    and what is wrong."""
    path = user_path(path)  # '~' is the home folder, as load_config reads it
    source = f"{str(path)!r}"
    if Path(path).is_dir():
        raise ConfigError(f"{source} is a folder, not a config file")
    check_not_a_link_loop(path, source)
    if Path(path).is_symlink() and not Path(path).exists():
        raise ConfigError(f"{source} is a symbolic link to {os.readlink(path)!r}, which does not exist")
    try:
        text = Path(path).read_text(encoding="utf-8")
        document = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{source} cannot be read as YAML: {' '.join(str(err).split())}") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{source} is not a mapping of config sections ({type(document).__name__})")
    routed = route_trainer_keys(document, source, ConfigError)
    check_keys(routed, RunConfig, "", source, ConfigError)
    interpolated = check_value_kinds(yaml.compose(text, Loader=yaml.SafeLoader), "", source)
    earlier = OmegaConf.create(_earlier_model_options(routed))  # an older run's: as it was trained
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.create(routed), earlier)
        check_interpolated_kinds(merged, interpolated, source)  # type: ignore[arg-type]
        run = OmegaConf.to_object(merged)
    except TypeError as err:  # a list merged into a mapping, or the reverse (check_value_kinds names most)
        raise ConfigError(f"{source}: {_first_line(err)}") from None
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"{source}: config key {key!r}: {str(err).strip().splitlines()[0]}") from None
    assert isinstance(run, RunConfig)
    if run.data.name not in DATASETS:
        raise ConfigError(f"{source}: data.name={run.data.name!r} is not a dataset; valid: {list(DATASETS)}")
    check_path_entries(run.data.paths, f"{source}: ")
    return run


def _check_load_arguments(preset_or_file: Any, overrides: Any) -> None:
    """:class:`ConfigError` for arguments of :func:`load_config` of the wrong kind: a string of overrides
    would be read character by character, ``None`` as a path."""
    if not isinstance(preset_or_file, (str, os.PathLike)):
        raise ConfigError(
            f"{argument_name(PRESET_OR_FILE)} must be a preset name or a YAML file path, got {type(preset_or_file).__name__}; "
            f"presets: {preset_names()}"
        )
    if isinstance(overrides, (str, bytes)) or not isinstance(overrides, Sequence):
        raise ConfigError(
            f"overrides must be a list of 'key=value' strings, got {type(overrides).__name__} {overrides!r}"
        )
    wrong = [item for item in overrides if not isinstance(item, str)]
    if wrong:
        raise ConfigError(
            f"overrides must be 'key=value' strings, got {wrong[0]!r} ({type(wrong[0]).__name__})"
        )


def _vocab_size_given(container: Any, overrides: Sequence[str]) -> bool:
    """Whether the YAML or an override sets ``model.vocab_size``."""
    model = container.get("model") if isinstance(container, dict) else None
    in_yaml = isinstance(model, dict) and "vocab_size" in model
    return in_yaml or any(item.partition("=")[0].strip() == "model.vocab_size" for item in overrides)


def _vocabulary_from_tokenizer(run: RunConfig, cfg: DictConfig) -> None:
    """Set ``model.vocab_size`` (in ``run`` and ``cfg``, which is saved) to the tokenizer's, for text
    data with a tokenizer other than bytes (whose 256 is the default already)."""
    if run.data.name == "recall" or run.data.tokenizer == BYTES:
        return
    vocab_size = run_tokenizer(run).vocab_size
    run.model.vocab_size = vocab_size
    cfg.model.vocab_size = vocab_size


def run_tokenizer(run: RunConfig) -> Tokenizer:
    """The tokenizer ``data.tokenizer`` names (see :func:`innerloop.data.tokenizer.load_tokenizer`);
    :class:`ConfigError` naming ``data.tokenizer`` if it cannot be loaded."""
    if run.data.tokenizer == "":  # a path '' would name the current directory and read its tokenizer.json
        raise ConfigError(
            f"data.tokenizer='' is empty: give {BYTES!r}, a tokenizer.json file or a folder holding one"
        )
    try:
        return load_tokenizer(run.data.tokenizer)
    except TokenizerError as err:
        raise ConfigError(str(err)) from None


def require_run_config(run: Any) -> RunConfig:
    """``run`` itself if it is a :class:`RunConfig`, else a ``TypeError`` saying where one comes from
    (the functions that take a run read its sections as attributes: anything else failed there with
    Python's bare "'NoneType' object has no attribute 'data'")."""
    if not isinstance(run, RunConfig):
        raise TypeError(
            f"run must be a RunConfig (innerloop.config.load_config(PRESET_OR_FILE, overrides) returns one "
            f"first), got {type(run).__name__} {run!r:.80}"
        )
    return run


def validate_run_config(run: RunConfig) -> None:
    """Check what the schema's types cannot: the range of every number (:data:`FIELD_BOUNDS`), names
    (mixer, plugins, dataset, strategy, accelerator, precision), that the accelerator exists on this
    machine, that ``out_dir`` can be written, and that the text holds a window of ``seq_len``. Raises
    :class:`ConfigError` naming the key, the value and what is valid."""
    _check_run_values(run)
    check_path_entries(run.data.paths)
    empty = [entry for entry in run.data.paths if not str(entry).strip()]
    if run.data.name != "recall" and empty:
        raise ConfigError(
            f"data.paths entry {empty[0]!r} is empty (it would read the whole current directory); give files, "
            "directories or globs"
        )
    _check_no_link_loops(run)
    with one_walk_per_entry():  # the data is walked once for both checks
        _check_out_dir_outside_data(run)
        if run.data.name == "text" and run.data.paths:
            _check_text(run)
    _check_hf(run)
    _check_accelerator_here(run)
    _check_trainer_combination(run)
    check_output_dir(run.out_dir, "out_dir")


def _check_run_values(run: RunConfig) -> None:
    """The checks of :func:`validate_run_config` that judge the config's values alone, not this machine
    or its files (the data, ``out_dir``, the accelerator present): what ``innerloop params`` checks too
    (``load_config(model_only=True)``), so that it does not count a config that ``train`` refuses."""
    require_run_config(run)
    try:  # a run built in Python: True, 4.0 or a Fraction for an int, '0.001' for a float, before the ranges
        check_field_types("", run, RunConfig, FIELD_BOUNDS)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    _check_numbers(run)
    _check_schedules(run)
    try:
        validate_model_config(run.model)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if run.data.name not in DATASETS:
        raise ConfigError(f"data.name={run.data.name!r} is not a dataset; valid: {list(DATASETS)}")
    _check_vocabulary(run)
    _check_unread_data_keys(run)
    _check_hf_values(run)
    _check_held_out_fractions(run)
    _check_more_than_one_chunk(run)
    _warn_short_last_chunk(run)
    _check_trainer_names(run)
    _check_gradient_checkpointing(run)
    check_lightning_arguments(run.trainer.lightning, ConfigError)
    check_loggers(run.logger, ConfigError)


def _training_length(run: RunConfig) -> tuple[int, str]:
    """The tokens of a training window, and the words naming where they come from."""
    if run.data.name == "recall":
        recall = run.data.recall
        return recall_length(recall.num_pairs, recall.gap), "the recall task's length"
    return run.data.seq_len, "data.seq_len"


def _check_more_than_one_chunk(run: RunConfig) -> None:
    """A TTT-E2E run that trains test-time training has windows of more than one chunk (docs/e2e.md:
    "training needs data.seq_len > chunk_size"): every logit is scored before its chunk's inner step,
    so with one chunk no inner step reaches the outer loss and the run trains the sliding-window
    baseline (the model warned of it only at the first training step)."""
    model = run.model
    if model.mixer != "e2e" or not model.e2e.test_time_training:
        return
    length, where = _training_length(run)
    if length <= model.e2e.chunk_size:
        shown = (
            f"data.seq_len={length}"
            if where == "data.seq_len"
            else f"{where} 4 * data.recall.num_pairs + data.recall.gap - 1 = {length}"
        )
        raise ConfigError(
            f"{shown} <= model.e2e.chunk_size={model.e2e.chunk_size}: a training window of at most one chunk "
            "trains no test-time training (each chunk is scored before its inner step, so no step reaches the "
            "training loss: the run would train the sliding-window baseline); use windows longer than "
            "model.e2e.chunk_size (several chunks), a smaller chunk_size, or model.e2e.test_time_training=false "
            "for the baseline itself"
        )


def _warn_short_last_chunk(run: RunConfig) -> None:
    """Warn when a TTT-E2E run trains on ``outer_loss: chunk_mean`` with windows that are not a multiple
    of ``chunk_size``: each window's last, short chunk weighs as much as a whole one, so its few targets
    weigh ``chunk_size / tail`` times as much as the others (the official code's lengths are multiples)."""
    model = run.model
    if model.mixer != "e2e" or model.e2e.outer_loss != "chunk_mean":
        return
    length, where = _training_length(run)
    chunk = model.e2e.chunk_size
    tail = length % chunk
    if tail:
        warnings.warn(
            f"model.e2e.outer_loss='chunk_mean' with {where} {length} not a multiple of model.e2e.chunk_size="
            f"{chunk}: the training loss is a mean over chunks, so the last chunk's {tail} target(s) of each "
            f"window weigh as much as a whole chunk's {chunk} ({chunk / tail:g}x per target); use a multiple "
            f"(e.g. {length - tail or chunk}) or model.e2e.outer_loss=token_mean",
            UserWarning,
            stacklevel=warning_stacklevel(),
        )


def check_path_entries(paths: Sequence[Any], source: str = "") -> None:
    """Every ``data.paths`` entry is a string: OmegaConf converts a number to one but lets a list or a
    mapping through as an element of a ``list[str]`` (``data.paths=[[a, b]]``, YAML ``- [a, b]``).
    ``source``: where the config came from, to start the message with (e.g. a saved config.yaml)."""
    for entry in paths:
        if isinstance(entry, os.PathLike):  # a pathlib.Path of a run built in Python: the config saves text
            raise ConfigError(
                f"{source}data.paths entry {entry!r} is a path object, not a string: each entry is one "
                "string (convert it with str(...)), a file, folder or glob"
            )
        if not isinstance(entry, str):
            kind = {list: "a list", dict: "a mapping"}.get(type(entry), type(entry).__name__)
            raise ConfigError(
                f"{source}data.paths entry {entry!r} is {kind}, not a path: each entry is one string, a file, "
                "folder or glob (e.g. data.paths=[a.txt,texts/] or, in YAML, one '- texts/' line each)"
            )


DATA_KEY_READERS = {
    "paths": ("text", "hf"),
    "seq_len": ("text", "hf"),
    "val_fraction": ("text", "hf"),
    "test_fraction": ("text", "hf"),
    "split": ("hf",),
    "text_field": ("hf",),
    "streaming": ("hf",),
    "recall.num_pairs": ("recall",),
    "recall.gap": ("recall",),
}
"""The ``data.*`` keys that only some values of ``data.name`` read (``data.tokenizer`` of recall is
refused by :func:`_check_vocabulary`)."""


def _check_unread_data_keys(run: RunConfig) -> None:
    """Refuse, naming them, ``data.*`` keys set away from their defaults that ``data.name`` does not
    read (:data:`DATA_KEY_READERS`): they would change nothing. The recall task's ``seq_len`` may repeat
    the length it derives, ``4 * num_pairs + gap - 1``."""
    default, name = DataConfig(), run.data.name
    derived = recall_length(run.data.recall.num_pairs, run.data.recall.gap)  # RecallDataModule.seq_len
    unread = [
        key
        for key, readers in DATA_KEY_READERS.items()
        if name not in readers
        and _get(run.data, key) != _get(default, key)
        and not (name == "recall" and key == "seq_len" and run.data.seq_len == derived)
    ]
    if not unread:
        return
    readers = " or ".join(repr(reader) for reader in DATA_KEY_READERS[unread[0]])
    unread = [key for key in unread if DATA_KEY_READERS[key] == DATA_KEY_READERS[unread[0]]]
    why = (
        ": the recall task makes its own sequences of 4 * data.recall.num_pairs + data.recall.gap - 1 = "
        f"{derived} tokens"
        if name == "recall"
        else ""
    )
    shown = ", ".join(f"data.{key}={_plain(_get(run.data, key))!r}" for key in unread)
    raise ConfigError(
        f"{shown} appl{'ies' if len(unread) == 1 else 'y'} to data.name={readers} only (this run's data.name "
        f"is {name!r}{why}); remove {'it' if len(unread) == 1 else 'them'}, or set the default"
    )


def _check_held_out_fractions(run: RunConfig) -> None:
    """``data.val_fraction + data.test_fraction`` below 1: the training text is the rest."""
    val, test = run.data.val_fraction, run.data.test_fraction
    if test > 0 and val + test >= 1:
        raise ConfigError(
            f"data.val_fraction={val} + data.test_fraction={test} = {val + test:g} leaves no training text: "
            "their sum must be below 1; lower one of them (e.g. 0.1 and 0.1)"
        )


def _plain(value: Any) -> Any:
    """An omegaconf list as a plain list (for messages)."""
    return list(value) if OmegaConf.is_list(value) else value


def numeric_fields(schema: type = RunConfig, prefix: str = "") -> list[str]:
    """Dotted keys of every int and float field of the dataclass ``schema``, nested ones too."""
    found = []
    for name, kind in field_types(schema).items():
        if is_dataclass(kind):
            found += numeric_fields(kind, f"{prefix}{name}.")
        elif kind in (int, float):
            found.append(f"{prefix}{name}")
    return found


def _check_numbers(run: RunConfig) -> None:
    """Every number finite and inside its :data:`FIELD_BOUNDS`."""
    for key in numeric_fields():
        value = _get(run, key)
        bounds = FIELD_BOUNDS[key]
        aliases = [f"trainer.{name}" for name, target in LIGHTNING_NAMES.items() if target == key]
        why = f" ({bounds.why})" if bounds.why else ""
        if aliases:  # the user may have given Lightning's name of it: name that too
            why += f" (set by {key} or by Lightning's {' or '.join(aliases)})"
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}={value} must be a finite number {bounds.describe()}{why}")
        if value not in bounds:
            raise ConfigError(f"{key}={value} must be {bounds.describe()}{why}")


def _check_schedules(run: RunConfig) -> None:
    """``optim.schedule`` is a schedule whose phases fit in ``trainer.max_steps``; the TTT layers'
    base-lr warm-up has TTT layers to warm up."""
    optim, max_steps = run.optim, run.trainer.max_steps
    if optim.schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule={optim.schedule!r} is not a schedule; valid: {list(SCHEDULES)}")
    if optim.min_lr > optim.lr and optim.schedule != "constant":  # a constant schedule never reads it
        raise ConfigError(
            f"optim.min_lr={optim.min_lr:g} must be <= optim.lr={optim.lr:g} (the schedule decays from "
            "optim.lr to optim.min_lr)"
        )
    try:
        check_weight_decay(optim.lr, optim.weight_decay, "optim.")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if optim.schedule == "wsd" and warmup_steps(run) + decay_steps(run) > max_steps:
        raise ConfigError(
            f"optim.schedule='wsd' warms up over optim.warmup_fraction={optim.warmup_fraction:g} and decays "
            f"over optim.decay_fraction={optim.decay_fraction:g} of trainer.max_steps={max_steps} "
            f"({warmup_steps(run)} + {decay_steps(run)} steps): the two must fit in trainer.max_steps"
        )
    if optim.ttt_base_lr_warmup > 0 and run.model.mixer != "ttt":
        raise ConfigError(
            f"optim.ttt_base_lr_warmup={optim.ttt_base_lr_warmup} warms up the base lr of TTT layers, but "
            f"model.mixer={run.model.mixer!r} has none (mixer 'ttt' has them; TTT-E2E warms its inner lr "
            "up with model.e2e.inner_lr_start); set optim.ttt_base_lr_warmup=0"
        )


def fraction_of_steps(fraction: float, steps: int) -> int:
    """Whole steps in ``fraction`` of ``steps``, rounded down, reading the fraction as the decimal it is
    written as: 0.29 of 100 steps is 29 (in binary floating point, 0.29 * 100 = 28.999999999999996)."""
    return math.floor(Fraction(repr(float(fraction))) * steps)


def warmup_steps(run: RunConfig) -> int:
    """The optimizer steps of the learning rate's warm-up: ``optim.warmup_fraction`` of the steps."""
    return fraction_of_steps(run.optim.warmup_fraction, run.trainer.max_steps)


def decay_steps(run: RunConfig) -> int:
    """The optimizer steps over which ``optim.schedule='wsd'`` decays: ``optim.decay_fraction`` of the
    steps, at least 1 (0 for the other schedules, which decay from the end of the warm-up)."""
    if run.optim.schedule != "wsd":
        return 0
    return max(1, fraction_of_steps(run.optim.decay_fraction, run.trainer.max_steps))


def _get(obj: Any, key: str) -> Any:
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _check_vocabulary(run: RunConfig) -> None:
    """The model's vocabulary holds every token the data can give (else the embedding fails mid-run)."""
    if run.data.name == "recall":
        if run.data.tokenizer != BYTES:
            raise ConfigError(
                f"data.tokenizer={run.data.tokenizer!r} does not apply to data.name='recall' (the task has "
                f"its own token ids): leave data.tokenizer={BYTES!r}"
            )
        needed, source = RECALL_VALUES.stop, "data.name='recall'"
    else:
        tokenizer = run_tokenizer(run)
        needed, source = tokenizer.vocab_size, f"data.tokenizer={run.data.tokenizer!r}"
    if run.model.vocab_size < needed:
        raise ConfigError(
            f"model.vocab_size={run.model.vocab_size} is too small for {source}, "
            f"whose tokens go up to {needed - 1}: model.vocab_size must be >= {needed} (or leave it unset: "
            "it then follows the tokenizer)"
        )


def _check_hf(run: RunConfig) -> None:
    """For ``data.name=hf``: a local dataset source of a known format (its values:
    :func:`_check_hf_values`, which ``innerloop params`` runs too)."""
    if run.data.name != "hf":
        return  # the keys only hf reads: _check_unread_data_keys
    try:
        check_hf_source(run.data.paths)
        check_hf_dataset(run.data.paths, run.data.split, run.data.text_field, run.data.streaming)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _check_hf_values(run: RunConfig) -> None:
    """For ``data.name=hf``: a split and a text field named, something held out for validation."""
    if run.data.name != "hf":
        return
    if run.data.val_fraction == 0:
        raise ConfigError(
            "data.val_fraction=0 holds out no validation documents: data.name='hf' holds out every "
            "1/val_fraction-th document; set data.val_fraction > 0 (e.g. 0.1)"
        )
    for key in ("split", "text_field"):
        if not getattr(run.data, key):
            raise ConfigError(
                f"data.{key}='' must name a {'split' if key == 'split' else 'column'} of the dataset"
            )


_RUN_FILES = (
    "config.yaml",
    ".innerloop.lock",
    CHECKPOINT_FILE,
    PENDING_CHECKPOINT,
    ".config.yaml.x1y2.tmp",
    "loss_by_position.csv",
    "loss_by_position.png",
    "eval_last-0_data-0_T128_n128.csv",
    "eval_last-0_data-0_T128_n128.png",
    "logs/version_0/metrics.csv",
    "logs/version_0/hparams.yaml",
    "logs/version_0/events.out.tfevents.0.host.0.0",
    "logs/wandb/run-0/files/config.yaml",
)
"""Examples of each kind of file a run writes in its out_dir (innerloop.train.run, run_dir, loggers):
a glob in ``data.paths`` that can match one of them would read the run's own files as data."""


def check_not_a_link_loop(path: str | os.PathLike[str], subject: str) -> None:
    """Raise :class:`ConfigError` saying that ``subject`` (e.g. ``out_dir='runs/a'``) is a symbolic link
    loop when ``path`` (``~`` expanded), or a folder on its way, is a link that leads back to itself:
    it names nothing, ``Path.exists`` says False and ``Path.resolve`` raises RuntimeError. Likewise when
    a name in ``path`` (or the whole path) is longer than the file system allows: ``Path.exists`` and
    ``Path.is_symlink`` raise OSError (ENAMETOOLONG) for it."""
    try:
        os.stat(os.path.expanduser(os.fspath(path)))
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ConfigError(
                f"{subject} is a symbolic link loop: it, or a folder on its way, is a link that leads back to "
                "itself and names no file or folder (see ls -l); give a file or folder, or a link to one"
            ) from None
        if err.errno == errno.ENAMETOOLONG:
            raise ConfigError(f"{subject} is too long: {name_too_long(path)}") from None


def name_too_long(path: str | os.PathLike[str]) -> str:
    """Why ``path`` is too long for the file system (ENAMETOOLONG), as a clause that says what is valid."""
    path = os.path.expanduser(os.fspath(path))
    longest = max(path.split(os.sep), key=lambda name: len(os.fsencode(name)))
    limit = _name_max(path)
    if len(os.fsencode(longest)) > limit:
        return (
            f"its name {longest[:24] + '...'!r} has {len(os.fsencode(longest))} bytes, and a file or folder "
            f"name may have at most {limit} here; give a shorter name"
        )
    return (
        f"it has {len(os.fsencode(path))} bytes, more than this system allows in a path; give a shorter path"
    )


def _name_max(path: str) -> int:
    """The longest file name (bytes) of the file system holding ``path``'s nearest existing folder."""
    folder = os.path.abspath(path)
    while True:
        try:
            return os.pathconf(folder, "PC_NAME_MAX")
        except (OSError, ValueError):
            parent = os.path.dirname(folder)
            if parent == folder:
                return 255
            folder = parent


def _check_no_link_loops(run: RunConfig) -> None:
    """``out_dir`` and the ``data.paths`` entries are no symbolic link loops (:func:`check_not_a_link_loop`)."""
    check_not_a_link_loop(run.out_dir, f"out_dir={run.out_dir!r}")
    if run.data.name != "recall":
        for entry in run.data.paths:
            check_not_a_link_loop(entry, f"data.paths entry {entry!r}")


def _real_path(path: str | os.PathLike[str]) -> Path:
    """``path`` (``~`` expanded) with every symbolic link resolved (``os.path.realpath``: a link loop,
    refused before by :func:`check_not_a_link_loop`, never raises here, unlike ``Path.resolve``)."""
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def _check_out_dir_outside_data(run: RunConfig) -> None:
    """``out_dir`` is neither inside a ``data.paths`` folder nor reached by a ``data.paths`` glob (nor
    holds a ``data.paths`` entry), both resolved: the run writes its lock, config.yaml, checkpoints and
    logs there before it reads the data, so they would become training data, and other data at each
    launch (a resume would not see the batches an uninterrupted run saw)."""
    if run.data.name == "recall" or not run.out_dir:
        return
    out = _real_path(run.out_dir)
    resolved = f" ({str(out)!r})" if str(out) != run.out_dir else ""
    for entry in run.data.paths:
        how = _overlap(entry, out)
        if how:
            raise ConfigError(
                f"out_dir={run.out_dir!r}{resolved} {how} data.paths entry {entry!r}: the run's own "
                "files (its lock, config.yaml, checkpoints, logs) would be read as data, and change it "
                "from one launch to the next; give an out_dir outside the data, or data.paths that leave "
                "it out"
            )


#: Names of the files ``innerloop eval`` and ``compare`` write into ``--out`` (a tag in place of ``x``).
_RESULT_FILES = ("eval_x.csv", "eval_x.png", "eval_x.md", "compare-x.csv", "compare-x.png", "compare-x.md")


def check_output_outside_data(
    out: str | Path,
    paths: Sequence[str],
    option: str,
    data_option: str,
    fix: str = "give an output folder outside the data",
) -> None:
    """:class:`ConfigError` when the folder ``out`` (given as ``option``) lies inside a data entry of
    ``paths`` (``data_option`` names them), is one, or is reached by one's glob: an evaluation's results
    written there would be read as data by the next evaluation, which would give other numbers. ``fix``
    ends the message (what to do; e.g. how to choose another folder than a default one)."""
    found = _first_overlap(out, paths, _RESULT_FILES, option, f"{data_option} entry")
    if found:
        entry, how = found
        raise ConfigError(
            f"{option} {str(out)!r} {how} {data_option} entry {entry!r}: the results written there would "
            f"be read as data by the next evaluation, and change its numbers; {fix}"
        )


def check_tokenizer_out_outside_data(out: str | Path, paths: Sequence[str], written: Sequence[str]) -> None:
    """:class:`ConfigError` when ``innerloop tokenizer train --out`` (``out``) lies inside a PATH of
    ``paths``, is one, or is reached by one's glob, so that the files it writes (``written``, their
    names) would be read as text: the next training of the tokenizer would learn from the last one's
    JSON, and every run on that data would train on it."""
    found = _first_overlap(out, paths, written, "--out", "PATH")
    if found:
        entry, how = found
        raise ConfigError(
            f"--out {str(out)!r} {how} PATH {entry!r}: the tokenizer files written there "
            f"({', '.join(written)}) would be read as text by the next tokenizer training and by runs on "
            "that data; give an --out outside the data, or PATHs that leave it out"
        )


def _first_overlap(
    out: str | Path, paths: Sequence[str], written: Sequence[str], option: str, data_option: str
) -> tuple[str, str] | None:
    """The first entry of ``paths`` that the output folder ``out`` (receiving files named ``written``)
    overlaps, and how (words for the message, :func:`_overlap`); None when none does. ``out`` or an
    entry that is a symbolic link loop is an error naming ``option`` or ``data_option``."""
    check_not_a_link_loop(out, f"{option} {str(out)!r}")
    for entry in paths:
        check_not_a_link_loop(entry, f"{data_option} {entry!r}")
    resolved = _real_path(out)
    for entry in paths:
        how = _overlap(entry, resolved, written)
        if how:
            return entry, how
    return None


def _overlap(entry: str, out: Path, written: Sequence[str] = _RUN_FILES) -> str | None:
    """How the ``data.paths`` entry and the resolved ``out_dir`` overlap (words for the message), or None;
    ``written``: the names of the files written into ``out_dir``. Through a link to a folder below the
    entry too (``data/runs -> /scratch/runs`` with ``out_dir=/scratch/runs/a``): a data folder and a glob
    follow such links (:func:`~innerloop.data.text.link_reaching`)."""
    how = _direct_overlap(entry, out, written)
    if how is None:
        link = link_reaching(entry, out, written)
        how = None if link is None else f"is reached through the link {str(link)!r} below"
    return how


def _direct_overlap(entry: str, out: Path, written: Sequence[str]) -> str | None:
    """:func:`_overlap` of the entry's own folder, links above it resolved."""
    parts = Path(expanded_entry(entry)).absolute().parts
    magic = next((i for i, part in enumerate(parts) if any(c in part for c in "*?[")), len(parts))
    root = _real_path(Path(*parts[:magic]))  # the folder the entry names, or a glob's folder
    if magic == len(parts):  # a file or folder: a folder's files are all read
        if root == out or root in out.parents:
            return "lies inside"
        inside = root.relative_to(out).parts if out in root.parents else None
        if inside is not None and any(Path(name).parts[: len(inside)] == inside for name in written):
            return "holds"  # the entry is (or holds) a file the run writes
        return None
    pattern = parts[magic:]
    if root == out or root in out.parents:
        below = out.relative_to(root).parts
    elif out in root.parents:  # the glob's folder is inside out_dir
        below, pattern = (), (*root.relative_to(out).parts, *pattern)
    else:
        return None
    if any(glob_matches(pattern, (*below, *Path(name).parts)) for name in written):
        return "is reached by"
    return None


def _check_text(run: RunConfig) -> None:
    """The data files exist and, for the byte tokenizer, hold a training and a validation window (from
    their sizes; another tokenizer's token counts are known once the files are read)."""
    try:
        keys = split_keys(run.data.paths)  # the files, found once, and their split keys
        refuse_compressed(sorted(keys))
        if run.data.tokenizer != BYTES:
            return
        files = sorted(keys)
        check_text_split(files, run.data.val_fraction, run.data.seq_len, keys, run.data.test_fraction)
    except ValueError as err:
        raise ConfigError(str(err)) from None


# Lightning precisions that cast the whole module, and AdamW's states with it, to float16
FLOAT16_WEIGHT_PRECISIONS = ("16-true", "transformer-engine-float16")


def check_trainable_precision(precision: str) -> None:
    """Raise :class:`ConfigError` for a ``trainer.precision`` that casts the weights to float16
    (:data:`FLOAT16_WEIGHT_PRECISIONS`): AdamW cannot train them, at any learning rate."""
    if precision not in FLOAT16_WEIGHT_PRECISIONS:
        return
    raise ConfigError(
        f"trainer.precision={precision!r} cannot train: it casts the whole model, and AdamW's states with it, "
        "to float16, where AdamW's eps (1e-8) rounds to 0 and the second moments (squared gradients) "
        "underflow to 0, so a step divides 0 by 0 and the loss is NaN after the first step, at any optim.lr; "
        "use 16-mixed (float16 autocast on float32 weights, on a GPU), bf16-true, bf16-mixed, 32-true or "
        "64-true. A "
        "model trained so can still run in float16 for inference (model.half(), or from_pretrained(..., "
        "dtype=torch.float16) of its export)"
    )


def _check_trainer_names(run: RunConfig) -> None:
    """Strategy, accelerator and precision are Lightning names (a precision that trains:
    :func:`check_trainable_precision`); whether the accelerator exists here: :func:`_check_accelerator_here`."""
    from lightning.fabric.connector import _PRECISION_INPUT_STR
    from lightning.pytorch.accelerators import AcceleratorRegistry
    from lightning.pytorch.strategies import StrategyRegistry

    check_trainable_precision(run.trainer.precision)
    if run.trainer.accelerator == "mps":  # its own line: Lightning's "mps" is not listed as valid below
        _check_not_on_mps(run.trainer.accelerator)
    accelerators = sorted(a for a in AcceleratorRegistry.available_accelerators() if a != "mps")
    precisions = [p for p in typing.get_args(_PRECISION_INPUT_STR) if p not in FLOAT16_WEIGHT_PRECISIONS]
    choices = {
        "trainer.strategy": (run.trainer.strategy, ["auto", *_strategies_by_name(StrategyRegistry)]),
        "trainer.accelerator": (run.trainer.accelerator, ["auto", *accelerators]),
        "trainer.precision": (run.trainer.precision, ["auto", *precisions]),
    }
    for key, (value, valid) in choices.items():
        if value not in valid:
            raise ConfigError(f"{key}={value!r} is not valid; valid: {valid}")


def _check_accelerator_here(run: RunConfig) -> None:
    """The accelerator (and its devices) exist on this machine, and it is not Apple's MPS; float16
    autocast is not asked of a CPU."""
    from lightning.pytorch.accelerators import AcceleratorRegistry

    _check_not_on_mps(run.trainer.accelerator)
    _check_float16_autocast_device(run.trainer.precision, run.trainer.accelerator)
    if run.trainer.accelerator == "auto":
        return
    accelerators = sorted(a for a in AcceleratorRegistry.available_accelerators() if a != "mps")
    here = ["auto", *(a for a in accelerators if AcceleratorRegistry[a]["accelerator"].is_available())]
    accelerator = AcceleratorRegistry[run.trainer.accelerator]["accelerator"]
    if not accelerator.is_available():
        raise ConfigError(
            f"trainer.accelerator={run.trainer.accelerator!r} is not available on this machine; "
            f"available here: {here}"
        )
    count = accelerator.auto_device_count()
    if run.trainer.accelerator != "cpu" and run.trainer.devices > count:
        raise ConfigError(
            f"trainer.devices={run.trainer.devices} but this machine has {count} "
            f"{run.trainer.accelerator} device(s)"
        )


def _check_float16_autocast_device(precision: str, accelerator: str) -> None:
    """Refuse ``16-mixed`` where the run would train on the CPU: Lightning then runs ``bf16-mixed`` in
    its place (one warning of its own), and the run would record a precision it did not train in."""
    import torch

    if precision != "16-mixed":
        return
    on_cpu = accelerator == "cpu" or (
        accelerator == "auto" and not torch.cuda.is_available() and not torch.backends.mps.is_available()
    )
    if on_cpu:
        raise ConfigError(
            f"trainer.precision='16-mixed' (float16 autocast) is not run on a CPU (trainer.accelerator="
            f"{accelerator!r} here): Lightning would train in bf16-mixed instead; use bf16-mixed (bfloat16 "
            "autocast) or 32-true on a CPU, 16-mixed on a GPU"
        )


def _check_not_on_mps(accelerator: str) -> None:
    """Refuse a run on Apple's MPS (named, or ``auto`` on a Mac without CUDA, where Lightning picks it):
    the metrics keep float64 sums (token counts exact past 2**24) and TTT-E2E a float64 schedule
    state, and MPS has no float64, so such a run failed at its first metric update or model move."""
    import torch

    on_mps = accelerator == "mps" or (
        accelerator == "auto" and not torch.cuda.is_available() and torch.backends.mps.is_available()
    )
    if on_mps:
        raise ConfigError(
            f"trainer.accelerator={accelerator!r} would train on Apple's MPS, which innerloop does not "
            "support: its metrics and TTT-E2E's schedule keep float64 state, which MPS lacks; use "
            "trainer.accelerator=cpu (or a CUDA GPU)"
        )


def _strategies_by_name(registry: Any) -> list[str]:
    """Lightning's registered strategies that a name alone can build (``single_xla`` needs a device)."""
    names = []
    for name in registry.available_strategies():
        entry = registry[name]
        if not [p for p in _required_parameters(entry["strategy"]) if p not in entry["init_params"]]:
            names.append(name)
    return names


@functools.cache
def _required_parameters(strategy: Any) -> tuple[str, ...]:
    """The parameters that ``strategy`` (a class) takes by name and has no default for (``inspect``
    is slow: asked once per class, not on every config load). A class that takes only ``*args,
    **kwargs`` passes them on to its base (Lightning's deprecated ``single_tpu`` is ``single_xla``'s
    class so): its base's parameters are the ones it needs."""
    parameters = inspect.signature(strategy).parameters.values()
    passed_on = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    bases = [base for base in getattr(strategy, "__bases__", ()) if base is not object]
    if parameters and all(p.kind in passed_on for p in parameters) and bases:
        return _required_parameters(bases[0])
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return tuple(p.name for p in parameters if p.default is p.empty and p.kind in named)


def concrete_precision(precision: str, accelerator: str) -> str:
    """``trainer.precision`` with ``auto`` made concrete: ``bf16-mixed`` on a CUDA accelerator (named,
    or ``auto`` with a GPU present) whose GPU computes in bfloat16 natively, ``16-mixed`` on one that
    would only emulate it (before Ampere: V100, T4), ``32-true`` elsewhere (bf16 autocast is slow on
    most CPUs)."""
    if precision != "auto":
        return precision
    import torch

    on_cuda = accelerator in ("cuda", "gpu") or (accelerator == "auto" and torch.cuda.is_available())
    if not on_cuda:
        return "32-true"
    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported(including_emulation=False):
        return "16-mixed"
    return "bf16-mixed"


def _check_gradient_checkpointing(run: RunConfig) -> None:
    """``trainer.gradient_checkpointing`` is a bool (a string such as 'no' would turn it on), and not
    given for the TTT-E2E model, which refuses activation checkpointing (its inner loop)."""
    value = run.trainer.gradient_checkpointing
    try:
        check_flag("trainer.gradient_checkpointing", value)
    except TypeError as err:
        raise ConfigError(str(err)) from None
    if value and run.model.mixer == "e2e":
        raise ConfigError(
            "trainer.gradient_checkpointing=true is not supported with model.mixer='e2e': "
            + E2E_CHECKPOINTING_REFUSED
        )


def _check_trainer_combination(run: RunConfig) -> None:
    """Let Lightning's own accelerator connector (what ``Trainer`` builds first) judge the combination
    of strategy, accelerator, precision and devices now, not after the run has started: e.g. ``fsdp``
    on a CPU, or a strategy whose package is not installed."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:  # a private class: if a Lightning version moves it, the Trainer reports the same errors later
        from lightning.pytorch.trainer.connectors.accelerator_connector import _AcceleratorConnector
    except ImportError:
        return
    t = run.trainer
    # The connector's other arguments, from trainer.lightning; not deterministic and benchmark, which it
    # would apply to torch's global flags at once (the Trainer applies them when the run starts).
    extra = {
        k: t.lightning[k]
        for k in ("num_nodes", "sync_batchnorm", "use_distributed_sampler")
        if k in t.lightning
    }
    chatter = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = chatter.level
    try:
        # the Trainer repeats any warning and message when the run starts
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            chatter.setLevel(logging.WARNING)
            _AcceleratorConnector(
                devices=t.devices,
                accelerator=t.accelerator,
                strategy=t.strategy,
                precision=concrete_precision(t.precision, t.accelerator),
                **extra,
            )
    except (MisconfigurationException, ValueError, ImportError) as err:
        extra_text = "".join(f", trainer.{k}={v!r}" for k, v in extra.items())
        raise ConfigError(
            f"trainer.strategy={t.strategy!r}, trainer.accelerator={t.accelerator!r}, "
            f"trainer.precision={t.precision!r}, trainer.devices={t.devices}{extra_text}: Lightning cannot "
            f"run this combination here: {' '.join(str(err).split())}"
        ) from None
    finally:
        chatter.setLevel(level)


CHECKPOINT_SUFFIX = ".safetensors"  # what `innerloop train` writes: last.safetensors


def checkpoint_path_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot be a checkpoint file (a directory, or nothing there), or None. Checked by the
    checkpoint reader and, before anything heavy is imported, by the commands that take a checkpoint."""
    path = user_path(path)  # '~' is the home folder, as the checkpoint readers read it
    name = repr(str(path))
    other_model = other_model_folder_problem(path)
    if other_model is not None:
        return other_model
    unconfirmed = unconfirmed_run_problem(path, f"checkpoint {name}")
    if unconfirmed is not None:
        return unconfirmed
    if path.is_dir():
        return (
            f"checkpoint {name} is a directory; give the checkpoint file in it "
            f"(e.g. {str(path / CHECKPOINT_FILE)!r})"
        )
    if not path.is_file():
        return f"checkpoint {name} does not exist or is not a file"
    return None


def unconfirmed_run_problem(folder: str | os.PathLike[str], given: str) -> str | None:
    """What to do with ``folder`` (``given``: how the message names it) when it is a run folder that holds
    its run's checkpoint only as :data:`~innerloop.data.text.PENDING_CHECKPOINT` (the run was killed
    before it confirmed its first checkpoint): resume it (:func:`continuing_call`: the command on the
    command line, the Python call from Python), which first checks that file and removes it where it is
    not a whole checkpoint, saying so; then start the run again. None for any other path."""
    folder = Path(folder)
    if (
        not folder.is_dir()
        or (folder / CHECKPOINT_FILE).exists()
        or not (folder / PENDING_CHECKPOINT).is_file()
    ):
        return None
    return (
        f"{given} holds no {CHECKPOINT_FILE}: its run was interrupted before its first checkpoint was moved "
        f"into place (written as {PENDING_CHECKPOINT}, not yet confirmed); {continuing_call(folder)} "
        "continues the run from that checkpoint, after checking it (its checksum, and finite weights): where "
        "the check fails, the resume removes the file and says why; then start the run again, e.g. "
        f"{new_run_call(folder / 'config.yaml')}"
    )


def continuing_call(out_dir: str | os.PathLike[str], overrides: str = "") -> str:
    """How the caller continues the run in ``out_dir`` (``overrides``: `` key=value`` items, each after a
    space), in backquotes: :func:`resume_command` where the command line runs (its ``resume`` is the
    ``--resume`` flag: :func:`from_command_line`), else the Python call that does the same
    (``train(*load_config('<out_dir>/config.yaml', [...], out_dir=...), resume=True)``): a Python caller
    is not told to pass a command line's flag."""
    if from_command_line("resume"):
        return f"`{resume_command(out_dir, overrides)}`"
    folder = os.fspath(out_dir)
    config = os.path.join(folder, "config.yaml")
    return f"`train(*load_config({config!r}, {overrides.split()!r}, out_dir={folder!r}), resume=True)`"


def new_run_call(config: str | os.PathLike[str]) -> str:
    """How the caller starts a new run of the config file ``config`` in a folder of their choosing, in
    backquotes: ``innerloop train --config ...`` on the command line (:func:`continuing_call`), else the
    Python call ``train(*load_config(...))``."""
    if from_command_line("resume"):
        return f"`innerloop train --config {shlex.quote(os.fspath(config))} out_dir=<a new folder>`"
    return f"`train(*load_config({os.fspath(config)!r}, out_dir='<a new folder>'))`"


def resume_command(out_dir: str | os.PathLike[str], overrides: str = "") -> str:
    """``innerloop train --resume out_dir=<out_dir>`` followed by ``overrides``, with ``out_dir=...``
    quoted for a POSIX shell where the path needs it (a space, a quote, ``$``), and its value for the
    override's YAML where that would read it as another value (:func:`_as_override_value`), so that the
    command a message gives continues that run when pasted."""
    value = _as_override_value(os.fspath(out_dir))
    return f"innerloop train --resume {shlex.quote(f'out_dir={value}')}{overrides}"


def _as_override_value(text: str) -> str:
    """``text`` as the value of a ``key=value`` override that reads back as that string: as it is where
    YAML (PyYAML's and OmegaConf's) reads it so, else single-quoted, with an interpolation's ``${``
    escaped (unquoted, ``runs/x #2`` read as ``runs/x``, another run's folder; ``true`` and ``1e3`` as
    other values; a tab or ``a: b`` did not parse; a backslash before ``${`` is doubled, as OmegaConf reads
    it)."""
    try:
        plain = (
            "${" not in text
            and yaml.safe_load(text) == text
            and OmegaConf.from_dotlist([f"v={text}"]).v == text
        )
    except Exception:  # PyYAML's and OmegaConf's errors: either cannot read it plain
        plain = False
    return text if plain else _quoted_override_value(text)


def _as_list_entry(text: str) -> str:
    """``text`` as the one entry of a list override ``key=[entry]`` (and of a YAML flow list) that reads
    back as that string: as it is where both readers read ``[text]`` as ``[text]``, else quoted as
    :func:`_as_override_value` quotes (unquoted, ``true`` is a bool, ``a,b`` two entries)."""
    try:
        listed = OmegaConf.to_container(OmegaConf.from_dotlist([f"v=[{text}]"]).v)
        plain = "${" not in text and yaml.safe_load(f"[{text}]") == [text] and listed == [text]
    except Exception:  # PyYAML's and OmegaConf's errors: either cannot read it plain
        plain = False
    return text if plain else _quoted_override_value(text)


def _quoted_override_value(text: str) -> str:
    """``text`` single-quoted for YAML and OmegaConf, reading back as ``text``."""
    # OmegaConf reads \${ as a literal ${, and 2n backslashes before ${ as n: n backslashes become 2n + 1
    escaped = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", text.replace("'", "''"))
    return "'" + escaped + "'"


def other_model_folder_problem(path: str | os.PathLike[str]) -> str | None:
    """What ``path`` is when it is a folder of a model saved otherwise than as an innerloop checkpoint
    (an orbax checkpoint of the official TTT-E2E code, a Hugging Face folder), with what to give
    instead; None for anything else."""
    path = Path(path)
    name = repr(str(path))
    if path.is_dir() and _is_orbax_checkpoint(path):
        return (
            f"checkpoint {name} is a directory: an orbax checkpoint of the official TTT-E2E code, which "
            f"innerloop reads through `innerloop convert ttt-e2e {path} CONFIG OUT`; give the "
            "OUT/last.safetensors it writes"
        )
    if path.is_dir() and (path / "config.json").is_file() and any(path.glob("model*.safetensors*")):
        return (
            f"checkpoint {name} is a directory: a Hugging Face folder (config.json, model.safetensors), "
            "which AutoModelForCausalLM.from_pretrained reads; give an innerloop checkpoint (the "
            "last.safetensors that `innerloop train` or `innerloop convert` wrote)"
        )
    return None


def _is_orbax_checkpoint(path: Path) -> bool:
    """Whether ``path`` is an orbax checkpoint: a step folder (``_CHECKPOINT_METADATA``), its
    ``model_weights`` (``_METADATA``), or the folder of numbered steps above them."""
    steps = [child for child in path.iterdir() if child.name.isdigit() and child.is_dir()]
    return any((p / "_CHECKPOINT_METADATA").is_file() or (p / "_METADATA").is_file() for p in [path, *steps])


def check_output_dir(path: str | os.PathLike[str], key: str) -> None:
    """Raise :class:`ConfigError` (naming ``key``, e.g. ``out_dir``) unless ``path`` is a directory or
    can be made one: not a file, and its nearest existing ancestor a directory this user can write."""
    try:
        check_path_argument(path, key)  # Path(3) failed in pathlib, naming no argument
    except TypeError as err:
        raise ConfigError(str(err)) from None
    if not str(path):
        raise ConfigError(f"{key}='' must name a directory for the outputs")
    target = user_path(path)
    check_not_a_link_loop(target, f"{key}={str(path)!r}")
    if target.is_symlink() and not target.exists():
        raise ConfigError(
            f"{key}={str(path)!r} is a symbolic link to {os.readlink(target)!r}, which does not exist; give a "
            "directory, or a link to one"
        )
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == target else f" (its parent {str(existing)!r} is a file)"
        raise ConfigError(f"{key}={str(path)!r} is not a directory{where}; give a directory for the outputs")
    if not os.access(existing, os.W_OK | os.X_OK) or not _can_create_file_in(existing):
        raise ConfigError(
            f"{key}={str(path)!r} cannot be written: {str(existing)!r} is not writable by this user; "
            f"give another {key}"
        )


def _can_create_file_in(directory: Path) -> bool:
    """Whether a file can be created in ``directory`` (tried and removed at once): ``os.access`` says
    yes to root everywhere, also in read-only or virtual file systems such as /proc."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            return True
    except OSError:
        return False


#: What a checkpoint's weights and its stream of batches were made with: a resume cannot change them.
RESUME_FIXED = ("model", "data", "seed")

#: Keys under :data:`RESUME_FIXED` that choose how the model runs, not what it computes: a resume may
#: change them (every kernel equals the reference; a run moved from a GPU to a CPU needs another one).
RESUME_MAY_CHANGE = ("model.ttt.kernel",)


def fixed_on_resume(key: str) -> bool:
    """Whether a dotted config key is fixed by a checkpoint (see :data:`RESUME_FIXED`)."""
    return key.split(".")[0] in RESUME_FIXED and key not in RESUME_MAY_CHANGE


def flatten_config(config: Any, prefix: str = "") -> dict[str, Any]:
    """``{dotted key: value}`` of a config dataclass (nested dataclasses flattened), keys prefixed."""
    flat: dict[str, Any] = {}
    for f in fields(config):
        value = getattr(config, f.name)
        if is_dataclass(value):
            flat.update(flatten_config(value, f"{prefix}{f.name}."))
        else:
            flat[f"{prefix}{f.name}"] = value
    return flat


def check_resume_changes(saved: RunConfig, resumed: RunConfig) -> None:
    """Raise :class:`ConfigError` naming every key of :data:`RESUME_FIXED` on which ``resumed`` (the
    saved config with the resume's overrides) differs from ``saved``. Other keys (``optim.*``,
    ``trainer.*``, ``out_dir``, :data:`RESUME_MAY_CHANGE`) may change: the resumed run applies them from
    the step it reached."""
    old, new = flatten_config(saved), flatten_config(resumed)
    changed = [
        f"{key} ({old[key]!r} -> {new[key]!r})"
        for key in old
        if fixed_on_resume(key) and old[key] != new[key]
    ]
    if changed:
        raise ConfigError(
            f"{given_flag('resume')} cannot change {', '.join(changed)}: model.*, data.* and seed are fixed "
            "by the checkpoint's weights and the run's data stream (optim.*, trainer.* and model.ttt.kernel "
            f"may change); start a new run (another out_dir, or {given_flag('overwrite')}) to change them"
        )
    _check_same_data_stream(saved, resumed)


def check_resume_or_overwrite(resume: bool, overwrite: bool) -> None:
    """``resume`` (``--resume``) continues a run and ``overwrite`` (``--overwrite``) replaces it: refuse both
    at once, naming them as the caller gave them (:func:`given_flag`)."""
    if resume and overwrite:
        raise ConfigError(
            f"{given_flag('resume')} and {given_flag('overwrite')} contradict each other: continue the run "
            "or replace it"
        )


def _check_same_data_stream(saved: RunConfig, resumed: RunConfig) -> None:
    """A resume keeps what decides where the data stream continues: ``trainer.accumulate_grad_batches``
    (the stream resumes at batch ``step * accumulate_grad_batches``, which another value would move:
    batches seen twice, or skipped), and for text and recall data the number of processes, each of which
    reads every (processes)-th batch (``data.name=hf`` records its position in global batches)."""
    old = saved.trainer.lightning.get("accumulate_grad_batches", 1)
    new = resumed.trainer.lightning.get("accumulate_grad_batches", 1)
    if old != new:
        raise ConfigError(
            f"{given_flag('resume')} cannot change trainer.accumulate_grad_batches ({old!r} -> {new!r}): the run's data "
            f"stream continues at batch (step x {old}); start a new run to change it"
        )
    if saved.data.name == "hf":
        return
    processes = {
        "trainer.devices": (saved.trainer.devices, resumed.trainer.devices),
        "trainer.num_nodes": tuple(run.trainer.lightning.get("num_nodes", 1) for run in (saved, resumed)),
    }
    changed = ", ".join(f"{key} ({a!r} -> {b!r})" for key, (a, b) in processes.items() if a != b)
    if changed:
        raise ConfigError(
            f"{given_flag('resume')} cannot change {changed}: each process of the run reads every (processes)-th batch of "
            f"data.name={saved.data.name!r}'s stream, from batch (step x accumulation) of its own, so "
            "another count would read batches twice or skip them; resume with the run's own, or start a new run"
        )


def save_config(cfg: DictConfig | RunConfig, path: str | os.PathLike[str], comment: str = "") -> Path:
    """Write the resolved config as YAML, atomically; :func:`load_config` reads it back. ``comment``
    (lines) goes first, as YAML comments (what the config does not hold, such as the plugin modules
    loaded with ``-p``)."""
    if isinstance(cfg, DictConfig):
        values = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    else:  # a Python object's strings are what they say: a ${ in them is no interpolation
        values = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=False, enum_to_str=True)
    header = "".join(f"# {line}\n" for line in comment.splitlines())
    text = OmegaConf.to_yaml(OmegaConf.create(_with_literal_interpolations(values)))
    # '~' is the home folder, as load_config reads it (pathlib's would be a folder named '~')
    return atomic_write_text(user_path(path), header + text)


def _with_literal_interpolations(tree: Any) -> Any:
    """``tree`` (a resolved config's dicts, lists and values) with each string's ``${`` escaped as
    OmegaConf reads it back literally (n backslashes before it become 2n + 1): a saved ``out_dir`` or data
    path that holds ``${`` read back as an interpolation, and the run's config.yaml could not be loaded
    again (``--resume``, evaluate), or named another folder."""
    if isinstance(tree, dict):
        return {key: _with_literal_interpolations(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_with_literal_interpolations(value) for value in tree]
    if isinstance(tree, str) and "${" in tree:
        return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", tree)
    return tree
