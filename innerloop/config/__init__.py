"""Run configs: omegaconf structured schemas, packaged YAML presets, loading with validation."""

from innerloop.config.load import ConfigError, load_config, preset_names, save_config, validate_run_config
from innerloop.config.schema import DataConfig, OptimConfig, RecallConfig, RunConfig, TrainerConfig

__all__ = [
    "ConfigError",
    "DataConfig",
    "OptimConfig",
    "RecallConfig",
    "RunConfig",
    "TrainerConfig",
    "load_config",
    "preset_names",
    "save_config",
    "validate_run_config",
]
