"""One entry point from a :class:`ModelConfig` to the network it describes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from innerloop.models.config import E2E, ModelConfig, require_model_config
from innerloop.models.e2e import E2ELM
from innerloop.models.lm import CausalLM


def build_model(config: ModelConfig | Mapping[str, Any]) -> nn.Module:
    """The language model ``config`` describes: :class:`~innerloop.models.E2ELM` for
    ``mixer == "e2e"``, else :class:`~innerloop.models.CausalLM`. ``config`` must be a
    :class:`ModelConfig`, or a mapping of its fields (a dict, an OmegaConf DictConfig)."""
    config = require_model_config(config)
    if config.mixer == E2E:
        return E2ELM(config)
    return CausalLM(config)
