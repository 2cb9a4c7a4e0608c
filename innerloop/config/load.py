"""Loading, validating and saving run configs.

``load_config("tiny", ["trainer.max_steps=50"])`` reads the packaged preset ``tiny`` (or a YAML file
of that path), merges the ``key=value`` overrides into the :class:`RunConfig` schema and checks it
all before anything is built: an unknown key, a value of the wrong type, an unknown plugin, mixer,
dataset, strategy, accelerator or precision raises :class:`ConfigError`, which lists the valid choices.
"""

from __future__ import annotations

import os
import typing
from collections.abc import Sequence
from dataclasses import fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from innerloop.config.schema import DATASETS, RunConfig
from innerloop.models.config import validate_model_config

DEFAULT_PRESET = "tiny"


class ConfigError(ValueError):
    """A run config that cannot be used; the message names the key, the value and the valid choices."""


def preset_names() -> list[str]:
    """Names of the YAML presets shipped in ``innerloop/config/presets``."""
    folder = resources.files("innerloop.config") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_source(preset_or_file: str) -> tuple[DictConfig, str]:
    """The YAML of a file path or a packaged preset name, and a description of where it came from."""
    path = Path(preset_or_file)
    if path.is_file():
        text, source = path.read_text(encoding="utf-8"), f"file {str(path)!r}"
    elif preset_or_file in preset_names():
        text = (resources.files("innerloop.config") / "presets" / f"{preset_or_file}.yaml").read_text("utf-8")
        source = f"preset {preset_or_file!r}"
    else:
        raise ConfigError(
            f"--config {preset_or_file!r} is neither a file nor a preset; presets: {preset_names()}"
        )
    try:
        loaded = OmegaConf.create(text)
    except Exception as err:  # YAML syntax errors come in several types
        raise ConfigError(f"{source} is not valid YAML: {err}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{source} must be a mapping of config sections, got {type(loaded).__name__}")
    return loaded, source


def _expected_type(key: str) -> Any:
    """The type that the dotted ``key`` has in the :class:`RunConfig` schema (None if it has none)."""
    node: Any = RunConfig
    for part in key.split("."):
        if not is_dataclass(node):
            return None
        node = typing.get_type_hints(node).get(part)
    return node


def _check_keys(given: Any, schema: type, prefix: str, source: str) -> None:
    """Raise for any key of the mapping ``given`` that the dataclass ``schema`` does not have."""
    valid = {f.name: f for f in fields(schema)}
    for key in given:
        full = f"{prefix}{key}"
        if key not in valid:
            raise ConfigError(f"unknown config key {full!r} in {source}; valid keys here: {sorted(valid)}")
        sub = typing.get_type_hints(schema)[key]
        if is_dataclass(sub) and isinstance(given[key], (dict, DictConfig)):
            _check_keys(given[key], sub, f"{full}.", source)


def _merge(cfg: DictConfig, other: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, other)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        expected = _expected_type(key) if key != "?" else None
        name = getattr(expected, "__name__", None) or str(expected)
        first_line = str(err).splitlines()[0]
        raise ConfigError(f"config key {key!r} in {source}: {first_line} (expected {name})") from None


def load_config(
    preset_or_file: str = DEFAULT_PRESET, overrides: Sequence[str] = ()
) -> tuple[RunConfig, DictConfig]:
    """Load a preset or YAML file, apply ``key=value`` overrides, validate; return the typed config and
    its omegaconf form (for saving)."""
    cfg: DictConfig = OmegaConf.structured(RunConfig)
    loaded, source = _read_source(preset_or_file)
    _check_keys(OmegaConf.to_container(loaded), RunConfig, "", source)
    cfg = _merge(cfg, loaded, source)
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. trainer.max_steps=100)")
        nested: dict[str, Any] = {}
        cursor = nested
        parts = key.split(".")
        for part in parts[:-1]:
            cursor = cursor.setdefault(part, {})
        cursor[parts[-1]] = None
        _check_keys(nested, RunConfig, "", f"override {item!r}")
        cfg = _merge(cfg, OmegaConf.from_dotlist([item]), f"override {item!r}")
    run: RunConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    validate_run_config(run)
    return run, cfg


def validate_run_config(run: RunConfig) -> None:
    """Check names and ranges that the schema's types cannot; raise :class:`ConfigError`."""
    from lightning.fabric.connector import _PRECISION_INPUT_STR
    from lightning.pytorch.accelerators import AcceleratorRegistry
    from lightning.pytorch.strategies import StrategyRegistry

    try:
        validate_model_config(run.model)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if run.data.name not in DATASETS:
        raise ConfigError(f"data.name={run.data.name!r} is not a dataset; valid: {list(DATASETS)}")
    if run.data.name == "text" and run.data.paths:
        from innerloop.train.data import resolve_files

        try:
            resolve_files(run.data.paths)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    choices = {
        "trainer.strategy": (run.trainer.strategy, ["auto", *StrategyRegistry.available_strategies()]),
        "trainer.accelerator": (
            run.trainer.accelerator,
            ["auto", *sorted(AcceleratorRegistry.available_accelerators())],
        ),
        "trainer.precision": (run.trainer.precision, ["auto", *typing.get_args(_PRECISION_INPUT_STR)]),
    }
    for key, (value, valid) in choices.items():
        if value not in valid:
            raise ConfigError(f"{key}={value!r} is not valid; valid: {valid}")
    positive = {
        "data.seq_len": run.data.seq_len,
        "data.batch_size": run.data.batch_size,
        "data.val_batches": run.data.val_batches,
        "trainer.max_steps": run.trainer.max_steps,
        "trainer.val_every": run.trainer.val_every,
        "trainer.checkpoint_every": run.trainer.checkpoint_every,
        "trainer.devices": run.trainer.devices,
        "trainer.log_every": run.trainer.log_every,
        "trainer.num_position_buckets": run.trainer.num_position_buckets,
        "optim.lr": run.optim.lr,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}={value} must be > 0")
    if not 0 <= run.optim.warmup_fraction < 1:
        raise ConfigError(f"optim.warmup_fraction={run.optim.warmup_fraction} must be in [0, 1)")
    if not 0 <= run.data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction={run.data.val_fraction} must be in [0, 1)")


def save_config(cfg: DictConfig | RunConfig, path: str | os.PathLike[str]) -> Path:
    """Write the resolved config as YAML, atomically; :func:`load_config` reads it back."""
    from innerloop.train.atomic import atomic_write_text  # (innerloop.train imports this module)

    container = cfg if isinstance(cfg, DictConfig) else OmegaConf.structured(cfg)
    return atomic_write_text(path, OmegaConf.to_yaml(container, resolve=True))
