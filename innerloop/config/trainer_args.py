"""``trainer.*``: innerloop's own Trainer keys, and any other ``lightning.Trainer`` argument.

A config or override may set any argument of ``lightning.Trainer`` under ``trainer``
(``trainer.accumulate_grad_batches=2``, ``trainer.deterministic=true``). :func:`route_trainer_keys`
sorts each key a config gives under ``trainer`` before it is merged into the schema:

- a key of :class:`~innerloop.config.schema.TrainerConfig` (``max_steps``, ``precision``, ...) stays;
- a Lightning name of one of innerloop's own keys (:data:`LIGHTNING_NAMES`, e.g. ``log_every_n_steps``
  for ``trainer.log_every``) sets that key, so there is one value for one setting;
- any other Trainer argument goes into ``trainer.lightning`` (which the saved ``config.yaml`` shows),
  from where ``build_trainer`` passes it to ``lightning.Trainer`` as given; a quoted value is read on
  its text, as innerloop's own keys read one (:func:`value_of_its_kind`: ``"2"`` is the int 2 for
  ``num_sanity_val_steps``, ``"true"`` true for ``deterministic``);
- anything else is an unknown key: the error names it and the closest valid names.

:func:`check_lightning_arguments` then checks ``trainer.lightning``: every name an argument of the
installed Lightning's ``Trainer``, not one that innerloop sets itself (:data:`SET_BY_INNERLOOP`, with
the reason), and every value of the type the Trainer's annotation declares (and in range, for the
integers of :data:`LIGHTNING_BOUNDS`). :func:`check_loggers` checks the config's ``logger``.
"""

from __future__ import annotations

import collections.abc
import decimal
import difflib
import functools
import importlib.util
import inspect
import math
import numbers
import os
import re
import types
import typing
from collections.abc import Mapping, MutableMapping
from dataclasses import fields
from datetime import timedelta
from typing import Any, Literal, Union

from innerloop.config.schema import LOGGERS, Bounds, RunConfig, TrainerConfig
from innerloop.core.functional import plain_conversion, type_name
from innerloop.models.config import key_paths

LIGHTNING_NAMES: dict[str, str] = {
    "log_every_n_steps": "trainer.log_every",
    "val_check_interval": "trainer.val_every",
    "gradient_clip_val": "optim.grad_clip",
    "enable_progress_bar": "trainer.progress_bar",
    "limit_val_batches": "data.val_batches",
}
"""Lightning's name of a setting that innerloop has its own key for -> that key (``section.name``)."""

_ENDLESS = (
    "the training stream is endless (it has no epochs): trainer.max_steps ends a run and "
    "trainer.val_every sets how often it validates"
)
_NO_TEST_LOOP = "`innerloop train` runs no test or predict loop"

SET_BY_INNERLOOP: dict[str, str] = {
    "logger": "the loggers are the top-level key `logger` (csv, tensorboard, wandb, or a list of them)",
    "callbacks": (
        "innerloop adds its own checkpointing callback; pass more Lightning callbacks to "
        "innerloop.train.train(run, callbacks=[...])"
    ),
    "default_root_dir": "a run writes everything into out_dir: set out_dir",
    "enable_checkpointing": (
        "a run always checkpoints to <out_dir>/last.safetensors (trainer.checkpoint_every sets how often)"
    ),
    "plugins": "innerloop sets its safetensors checkpoint plugin; the precision is trainer.precision",
    "max_epochs": _ENDLESS,
    "min_epochs": _ENDLESS,
    "min_steps": (
        "Lightning ignores a stop before it, so Ctrl-C and SIGTERM could not stop a run and save it; "
        "trainer.max_steps sets how long a run trains"
    ),
    "check_val_every_n_epoch": _ENDLESS,
    "reload_dataloaders_every_n_epochs": _ENDLESS,
    "limit_train_batches": _ENDLESS,
    "overfit_batches": "it replaces the training stream with a few fixed batches; the data is data.*",
    "fast_dev_run": "it turns off checkpointing and logging; for a short run set trainer.max_steps",
    "barebones": "it turns off the logging and checkpointing that a run's outputs are made of",
    "limit_test_batches": _NO_TEST_LOOP,
    "limit_predict_batches": _NO_TEST_LOOP,
    "model_registry": "it uploads checkpoints to Lightning's model registry; an innerloop run uses no network",
}
"""``lightning.Trainer`` arguments a config may not set, each with the reason (innerloop sets it, or it
would undo what a run guarantees)."""

LIGHTNING_BOUNDS: dict[str, Bounds] = {
    "accumulate_grad_batches": Bounds(1, 2**24, why="micro-batches of one optimizer step"),
    "num_nodes": Bounds(1, 2**16, why="machines of one run"),
    "num_sanity_val_steps": Bounds(-1, why="-1: all validation batches"),
}
"""The valid range of Lightning's integer arguments that Lightning itself does not check early: it takes
any int, and 10**30 micro-batches crashed the first step with a bare ``OverflowError``."""


@functools.cache
def trainer_arguments() -> dict[str, Any]:
    """``{name: annotation}`` of every argument of the installed ``lightning.Trainer``."""
    from lightning.pytorch import Trainer

    hints = typing.get_type_hints(Trainer.__init__)
    names = [name for name in inspect.signature(Trainer.__init__).parameters if name != "self"]
    return {name: hints.get(name, Any) for name in names}


def _own_keys() -> list[str]:
    return [f.name for f in fields(TrainerConfig)]


def route_trainer_keys(container: Any, source: str, error: type[ValueError]) -> Any:
    """``container`` (a config as nested dicts) with each key under ``trainer`` sorted as the module
    doc says; raises ``error`` for an unknown key, naming it, ``source`` and the closest valid names,
    and for a Lightning name given beside innerloop's own key for the same setting with another value."""
    if not isinstance(container, dict) or not isinstance(container.get("trainer"), dict):
        return container  # check_keys reports a section that is not a mapping
    own = _own_keys()
    trainer = {k: v for k, v in container["trainer"].items() if k in own}
    lightning: dict[str, Any] = {}
    routed = {**container, "trainer": trainer}
    for key, value in container["trainer"].items():
        if key in own:
            continue
        if key in LIGHTNING_NAMES:
            _set_own_key(routed, key, value, source, error)
        elif key in trainer_arguments():
            lightning[key] = value_of_its_kind(value, trainer_arguments()[key])
        else:
            raise error(_unknown_key_message(str(key), source))
    _check_lightning_names(trainer.get("lightning"), source, error)
    if isinstance(trainer.get("lightning"), dict):
        trainer["lightning"] = {
            name: value_of_its_kind(value, trainer_arguments()[name])
            for name, value in trainer["lightning"].items()
        }
    if lightning:
        given = routed["trainer"].get("lightning", {})
        if not isinstance(given, dict):
            raise error(f"trainer.lightning={given!r} in {source} must be a mapping of Trainer arguments")
        twice = [k for k in lightning if k in given and given[k] != lightning[k]]
        if twice:
            k = twice[0]
            raise error(
                f"trainer.{k}={lightning[k]!r} and trainer.lightning.{k}={given[k]!r} in {source} set the "
                "same Lightning argument: give one of them"
            )
        routed["trainer"]["lightning"] = {**given, **lightning}
    return routed


def _check_lightning_names(given: Any, source: str, error: type[ValueError]) -> None:
    """Raise ``error`` naming ``trainer.lightning.<name>`` and ``source`` for a name in a ``trainer.lightning``
    mapping that is no ``lightning.Trainer`` argument (or is one of innerloop's own keys)."""
    if not isinstance(given, dict):
        return  # check_keys and check_lightning_arguments report it
    for name in given:
        if name in _own_keys() or name not in trainer_arguments():
            raise error(_unknown_key_message(str(name), source, "trainer.lightning"))


def _set_own_key(routed: dict, key: str, value: Any, source: str, error: type[ValueError]) -> None:
    """Set innerloop's key for the Lightning name ``key`` in ``routed`` (a fresh dict per section)."""
    section_name, name = LIGHTNING_NAMES[key].split(".")
    section = routed.get(section_name, {})
    if not isinstance(section, dict):
        return  # check_keys reports it
    section = dict(section)
    if name in section and section[name] != value:
        raise error(
            f"trainer.{key}={value!r} and {LIGHTNING_NAMES[key]}={section[name]!r} in {source} set the same "
            f"thing (Lightning's {key} is innerloop's {LIGHTNING_NAMES[key]}): give one of them"
        )
    section[name] = value
    routed[section_name] = section


def _unknown_key_message(key: str, source: str, section: str = "trainer") -> str:
    """The error for ``<section>.<key>``, an unknown key under ``trainer`` (or ``trainer.lightning``)."""
    own, lightning = _own_keys(), sorted(trainer_arguments())
    if section == "trainer.lightning" and key in own:
        return f"unknown config key '{section}.{key}' in {source}: it is innerloop's own key trainer.{key}; set that"
    # the same name in another section first (trainer.backbone: model.backbone, not Lightning's barebones),
    # then close spellings among the names a config may set (not min_steps or barebones, refused)
    elsewhere = [path for path in key_paths(RunConfig) if path.rpartition(".")[2] == key]
    settable = [name for name in [*own, *lightning, *LIGHTNING_NAMES] if name not in SET_BY_INNERLOOP]
    names = list(dict.fromkeys(settable))  # max_steps is in two lists: once
    close = [*elsewhere, *difflib.get_close_matches(key, names, n=3, cutoff=0.6)][:3]
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return (
        f"unknown config key '{section}.{key}' in {source}{hint}; valid keys here: innerloop's {sorted(own)} "
        "and any lightning.Trainer argument"
    )


def check_lightning_arguments(arguments: Any, error: type[ValueError]) -> None:
    """Raise ``error`` unless ``arguments`` (``trainer.lightning``) maps names of ``lightning.Trainer``
    arguments that a config may set to values of their annotated types (and ranges). A string whose text
    is of its argument's kind (an interpolation's value, e.g. ``${oc.env:STEPS}``, which is text) is
    read as :func:`value_of_its_kind` reads a quoted value, and replaced by that value in ``arguments``
    (when they can be changed), as an interpolation into one of innerloop's own keys is."""
    if not isinstance(arguments, Mapping):
        raise error(f"trainer.lightning={arguments!r} must be a mapping of lightning.Trainer arguments")
    annotations = trainer_arguments()
    for name, given in list(arguments.items()):
        value = value_of_its_kind(given, annotations.get(name, Any))
        if value is not given and isinstance(arguments, MutableMapping):
            arguments[name] = value
        else:
            value = given
        key = f"trainer.{name}"
        if name in SET_BY_INNERLOOP:
            raise error(f"{key} cannot be set: {SET_BY_INNERLOOP[name]}")
        if name in LIGHTNING_NAMES:
            raise error(f"{key} is innerloop's {LIGHTNING_NAMES[name]}: set that key")
        if name in _own_keys() or name not in annotations:
            raise error(_unknown_key_message(name, "the config", "trainer.lightning"))
        if (
            name == "max_time"
        ):  # its own rule: Lightning's dict[str, int] annotation is narrower than its Timer
            if isinstance(value, timedelta) and isinstance(arguments, MutableMapping):
                # the same limit as a mapping of its parts: config.yaml cannot hold a timedelta (OmegaConf
                # refused it, unnamed, when the run saved its config)
                arguments[name] = {
                    "days": value.days,
                    "seconds": value.seconds,
                    "microseconds": value.microseconds,
                }
            _check_time_limit(value, error)
            continue
        if not value_matches(value, annotations[name]):
            raise error(_wrong_type_message(key, name, value, annotations[name]))
        bounds = LIGHTNING_BOUNDS.get(name)
        if bounds is not None and value is not None and value not in bounds:
            why = f" ({bounds.why})" if bounds.why else ""
            raise error(f"{key}={value} must be {bounds.describe()}{why}")
        choices = lightning_text_choices().get(name)
        if choices is not None and isinstance(value, str) and value.lower() not in choices:
            raise error(f"{key}={value!r} is not valid; valid: {list(choices)} (or null)")


@functools.cache
def lightning_text_choices() -> dict[str, tuple[str, ...]]:
    """The values of Lightning's text arguments that ``lightning.Trainer`` checks only when it is built
    (lower case: it lower-cases ``gradient_clip_algorithm``), so that a config that train would refuse
    there is refused with the config, by ``innerloop params`` too."""
    from lightning.pytorch.utilities.enums import GradClipAlgorithmType

    return {
        "gradient_clip_algorithm": tuple(kind.value for kind in GradClipAlgorithmType),
        # lightning/pytorch/trainer/setup.py's PROFILERS (local to _init_profiler there)
        "profiler": ("simple", "advanced", "pytorch", "xla"),
    }


#: The keyword arguments of ``datetime.timedelta``: the keys of a ``trainer.max_time`` mapping.
TIME_LIMIT_UNITS = ("weeks", "days", "hours", "minutes", "seconds", "milliseconds", "microseconds")


def _check_time_limit(value: Any, error: type[ValueError]) -> None:
    """Raise ``error`` unless ``trainer.max_time`` is null or a positive time limit Lightning's Timer
    reads: its ``DD:HH:MM:SS`` text (each part whole digits) or a mapping of ``timedelta`` arguments
    (:data:`TIME_LIMIT_UNITS`; each a finite number, a fraction too: the Timer calls
    ``timedelta(**mapping)``, so ``{hours: 1.5}`` is 90 minutes although Lightning annotates
    ``dict[str, int]``), or a ``timedelta`` (a Python caller's; :func:`check_lightning_arguments` keeps it
    as the mapping of its days, seconds and microseconds, which config.yaml can hold). One rule for every form: the ``timedelta`` its parts add up
    to (``{days: -1, hours: 25}`` is an hour) must be positive (a limit of no time stopped the run before
    its first step) and one ``timedelta`` holds (past it, Lightning raised a bare OverflowError when the
    Trainer was built); a part that is no finite number (nan, inf, a bool, text) or no unit is refused
    by name, and one of another number type (numpy's, a Fraction, a Decimal) is told to be converted
    (:func:`_check_time_part`: a part is a Python int or float, as every float of the config)."""
    if value is None:
        return
    duration = _time_limit(value, error)
    if duration.total_seconds() <= 0:
        raise error(
            f"trainer.max_time={_plain_mapping(value)!r} is {duration.total_seconds():g} s: a time limit must be "
            "positive (DD:HH:MM:SS, e.g. 00:12:00:00 for 12 hours, over all the run's launches; null for none)"
        )


def _check_time_part(shown: str, unit: str, amount: Any, forms: str, error: type[ValueError]) -> None:
    """Raise ``error`` unless ``amount``, the ``unit`` part of ``trainer.max_time`` (``shown``), is a
    finite Python int or float: the rule of every float of the config (``check_field_types``). Another
    real number (a numpy int or float, a Fraction, a Decimal) is told to be converted: ``timedelta``
    refuses all but numpy's float64, which config.yaml cannot hold (OmegaConf refused it, unnamed,
    when the run saved it). A bool, text, nan or inf is no finite number; each names its type."""
    kind = type(amount).__name__
    if type(amount) in (int, float):
        if math.isfinite(amount):
            return
    elif isinstance(amount, (numbers.Real, decimal.Decimal)) and not isinstance(amount, bool):
        try:
            finite = math.isfinite(amount)
        except (OverflowError, ValueError, TypeError):
            finite = False
        if finite:
            raise error(
                f"{shown}: {unit}={amount!r} ({kind}) must be a Python int or float (convert it with "
                f"float(...)); {forms}"
            )
    raise error(f"{shown}: {unit}={amount!r} ({kind}) is not a finite number; {forms}")


def _time_limit(value: Any, error: type[ValueError]) -> timedelta:
    """``trainer.max_time`` (not null) as the ``timedelta`` Lightning's Timer makes of it; ``error``
    naming the value, the part at fault and what is valid where it is not one."""
    forms = (
        "give DD:HH:MM:SS (e.g. 00:12:00:00 for 12 hours) or a mapping of timedelta arguments (e.g. "
        f"{{hours: 1.5}}; keys {list(TIME_LIMIT_UNITS)}, each a finite int or float; their sum positive), or null for none"
    )
    shown = f"trainer.max_time={_plain_mapping(value)!r}"
    if isinstance(value, timedelta):
        return value
    if isinstance(value, str):
        match = re.fullmatch(r"(\d+):(\d\d):(\d\d):(\d\d)", value.strip())
        if match is None:
            raise error(f"{shown} is not a time limit: {forms}")
        days, hours, minutes, seconds = map(int, match.groups())
        parts: dict[str, Any] = {"days": days, "hours": hours, "minutes": minutes, "seconds": seconds}
    elif isinstance(value, Mapping):
        parts = dict(value)
        for unit, amount in parts.items():
            if unit not in TIME_LIMIT_UNITS:
                raise error(f"{shown}: {unit!r} is not a unit of time; {forms}")
            _check_time_part(shown, unit, amount, forms, error)
    else:
        raise error(f"{shown} ({type_name(value)}) is not a time limit{_base_60_hint(value)}: {forms}")
    try:
        return timedelta(**parts)
    except OverflowError:
        raise error(f"{shown} is longer than a timedelta holds (999999999 days): {forms}") from None


def _base_60_hint(value: Any) -> str:
    """For a whole number ``trainer.max_time``, how YAML may have read it: PyYAML and OmegaConf read an
    unquoted ``D:HH:MM:SS`` whose first digit is not 0 (``1:00:00:00``, ``10:00:00:00``; Lightning's
    pattern takes days of any digits) as one base-60 number (216000), which the user never wrote."""
    if type(value) is not int or value < 60:
        return ""
    days, rest = divmod(value, 60**3)
    hours, rest = divmod(rest, 60**2)
    written = (
        f"{days}:{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"
        if days
        else f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
    )
    told = f"0{days}:{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"  # D:HH:MM:SS, days led by a 0
    return (
        f" (YAML reads an unquoted {written}, whose first digit is not 0, as this base-60 number: write "
        f"D:HH:MM:SS with the days led by a 0, {told}, or quote it, '{told}')"
    )


def _plain_mapping(value: Any) -> Any:
    """A mapping (an omegaconf ``DictConfig`` too) as a plain dict, for messages; other values as given."""
    return dict(value) if isinstance(value, Mapping) else value


def value_matches(value: Any, annotation: Any) -> bool:
    """Whether a config value (None, bool, int, float, str, list or dict) is of the type ``annotation``
    declares. A class that no config value can be (an ``Accelerator``, a ``timedelta``) matches nothing;
    a typing construct this function does not know matches anything (Lightning judges the value)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(value_matches(value, arg) for arg in args)
    if origin is Literal:
        return any(type(value) is type(arg) and value == arg for arg in args)
    if annotation is type(None):
        return value is None
    if annotation in (bool, str):
        return isinstance(value, annotation)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (list, collections.abc.Sequence, collections.abc.Iterable):
        item = args[0] if args else Any
        return isinstance(value, list) and all(value_matches(v, item) for v in value)
    if origin in (dict, collections.abc.Mapping):
        key_type, value_type = args if args else (Any, Any)
        return isinstance(value, dict) and all(
            value_matches(k, key_type) and value_matches(v, value_type) for k, v in value.items()
        )
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


# The text of a bool, int or float as a config may write it (innerloop.config.load checks its own keys'
# scalars on these; value_of_its_kind reads a quoted value of a Lightning argument by them): a bool
# only true or false, an int plain decimal digits (an optional sign, `_` between groups), a float a
# decimal number. Defined here because load.py imports this module.
PLAIN_INT = re.compile(r"[-+]?(0|[1-9][0-9]*(_[0-9]+)*)")
PLAIN_FLOAT = re.compile(
    r"[-+]?([0-9]+(_[0-9]+)*\.([0-9]+(_[0-9]+)*)?|\.[0-9]+(_[0-9]+)*)([eE][-+]?[0-9]+)?"
    r"|[-+]?(0|[1-9][0-9]*(_[0-9]+)*)[eE][-+]?[0-9]+"
    r"|[-+]?\.?(inf|infinity|nan)",  # load.py refuses these later, with the reason (must be finite)
    re.IGNORECASE,
)
PLAIN_INT_WORDS = "a decimal integer (ASCII digits, an optional sign, e.g. 64 or 10_000)"
""":data:`PLAIN_INT` in words: the one rule of an integer's text, an override's and a CLI option's."""
PLAIN_FLOAT_WORDS = "a decimal number (e.g. 3e-4, 0.5 or 2)"
""":data:`PLAIN_FLOAT` (or :data:`PLAIN_INT`) in words: the one rule of a float's text."""


def plain_number(kind: type, text: str) -> float | None:
    """``text`` as a ``kind`` (int or float) by the one rule of a number's text, an override's
    (:data:`PLAIN_INT`, :data:`PLAIN_FLOAT`; spaces and tabs around it dropped, as YAML drops them), else
    None: Python's ``int()`` also takes ``'５'`` (full-width), ``'٣'``, ``'007'`` and a newline around
    the digits, which an override refuses. The CLI's number options and the benchmark scripts' read
    their text by it."""
    text = text.strip(" \t")
    if not (PLAIN_INT.fullmatch(text) or (kind is float and PLAIN_FLOAT.fullmatch(text))):
        return None
    try:
        return kind(text)
    except ValueError:  # YAML's '.inf', which float() does not read (and is no finite number anyway)
        return None


BOOL_TEXTS = {"true": True, "True": True, "TRUE": True, "false": False, "False": False, "FALSE": False}
_TEXT_KINDS = (bool, int, float, type(None))


def value_of_its_kind(value: Any, annotation: Any) -> Any:
    """``value`` as the type ``annotation`` declares, when it is a string (a quoted YAML value) that the
    type does not take as it is and the type is made of bools, ints, floats, null and ``Literal``
    values: ``"2"`` is ``2`` for an int, ``"true"`` is ``True`` for a bool, ``"0.5"`` is ``0.5`` for a
    float, as a quoted value of innerloop's own keys is read. The text must be of the kind: a bool takes
    only true or false, an int plain decimal digits (an optional sign, ``_`` between groups), a float a
    decimal number; a quoted null stays a string. Any other value is returned as it is (a string not of
    its kind, too: :func:`check_lightning_arguments` refuses it, naming the key and what is valid)."""
    members = _text_members(annotation)
    if not isinstance(value, str) or value_matches(value, annotation) or members is None:
        return value
    for member in members:
        literal = (
            [v for v in typing.get_args(member) if str(v) == value]
            if typing.get_origin(member) is Literal
            else []
        )
        if literal:
            return literal[0]
    if bool in members and value in BOOL_TEXTS:
        return BOOL_TEXTS[value]
    if int in members and PLAIN_INT.fullmatch(value):
        return int(value)
    if float in members and (PLAIN_INT.fullmatch(value) or PLAIN_FLOAT.fullmatch(value)):
        return float(value)
    return value


def _text_members(annotation: Any) -> tuple[Any, ...] | None:
    """The members of the type ``annotation`` (a union's, or itself) when each is a bool, int, float,
    None or a ``Literal``, whose text :func:`value_of_its_kind` reads; None for any other type (one
    with a string, a class or a list in it)."""
    union = typing.get_origin(annotation) in (Union, types.UnionType)
    members = typing.get_args(annotation) if union else (annotation,)
    if all(m in _TEXT_KINDS or typing.get_origin(m) is Literal for m in members):
        return members
    return None


def _wrong_type_message(key: str, name: str, value: Any, annotation: Any) -> str:
    """The error of the Lightning argument ``name`` (``key``) given ``value``, not of its type."""
    message = (
        f"{key}={value!r} must be {describe_annotation(annotation)} (lightning.Trainer's {name}), "
        f"got {type_name(value)}"
    )
    members = _text_members(annotation)
    plain = plain_conversion(value)  # numpy's bool, a numpy or tensor integer: the Python value it is
    if plain is not None and value_matches(
        {"bool": bool, "int": int, "float": float}[plain](value), annotation
    ):
        message += f"; convert it with {plain}(...)"
    if isinstance(value, str) and members is not None:
        message += (
            "; a quoted value is read on its text, which must be of that kind (true or false for a bool, "
            "decimal digits for an int, a decimal number for a float)"
        )
        if type(None) in members and value in ("", "~", "null", "Null", "NULL"):
            message += ", and a quoted null is a string: write null unquoted"
    return message


def describe_annotation(annotation: Any) -> str:
    """A readable form of a type annotation: ``int``, ``bool or 'warn' or null``, ``dict[str, int]``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        return " or ".join(describe_annotation(arg) for arg in args)
    if origin is Literal:
        return " or ".join(repr(arg) for arg in args)
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and not args:
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def logger_names(logger: Any) -> list[str]:
    """The names in the config's ``logger``: one name, or a list of them."""
    if isinstance(logger, str):
        return [logger]
    if isinstance(logger, (list, tuple)) and all(isinstance(name, str) for name in logger):
        return list(logger)
    raise ValueError(
        f"logger={logger!r} must be a logger's name or a list of names; valid: {sorted(LOGGERS)}"
    )


def check_loggers(logger: Any, error: type[ValueError]) -> None:
    """Raise ``error`` unless ``logger`` names one or more loggers of :data:`LOGGERS`, each once, whose
    package is installed (looked up without importing it)."""
    try:
        names = logger_names(logger)
    except ValueError as err:
        raise error(str(err)) from None
    if not names:
        raise error(f"logger=[] names no logger; give one or more of {sorted(LOGGERS)} (csv is the default)")
    for name in names:
        if name not in LOGGERS:
            raise error(f"logger={name!r} is not a logger; valid: {sorted(LOGGERS)}")
        if names.count(name) > 1:
            raise error(f"logger={names!r} names {name!r} twice; give each logger once")
        package = LOGGERS[name]
        if package and not _installed(package):
            raise error(
                f"logger={name!r} needs the {package!r} package, which is not installed here: "
                f"pip install {package}"
            )


def _installed(package: str) -> bool:
    """Whether ``package`` can be imported (TensorBoard's writer also comes as ``tensorboardX``)."""
    candidates = [package, "tensorboardX"] if package == "tensorboard" else [package]
    return any(importlib.util.find_spec(name) is not None for name in candidates)


def is_launched_worker() -> bool:
    """True in a process that Lightning's DDP launcher started for a rank other than 0 (it re-runs the
    command with ``LOCAL_RANK``/``NODE_RANK`` set); the process of rank 0 owns the out_dir and prints
    what the command says once."""
    return any(os.environ.get(name, "0") not in ("", "0") for name in ("LOCAL_RANK", "NODE_RANK"))
