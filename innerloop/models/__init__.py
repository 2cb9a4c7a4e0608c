"""Networks built from sequence layers: the causal LM, its blocks, and the attention baselines.

``CausalLM(ModelConfig(mixer="swa", window=16))`` is a byte-level sliding-window model;
``logits, state = model(ids, state)`` runs it on a chunk and continues from ``state``.
``build_model(ModelConfig(mixer="e2e"))`` is the TTT-E2E model (:mod:`innerloop.models.e2e`).
"""

from innerloop.models.attention import CausalSelfAttention, KVCache
from innerloop.models.blocks import Block, BlockState, CausalDepthwiseConv, SwiGLU, build_mixer
from innerloop.models.config import (
    BACKBONES,
    MIXER_TABLE,
    MIXERS,
    MODEL_SIZES,
    E2EConfig,
    ModelConfig,
    TTTConfig,
    validate_e2e_config,
    validate_model_config,
)
from innerloop.models.e2e import E2ELM, E2EState, NonFiniteInnerStepError
from innerloop.models.factory import build_model
from innerloop.models.generate import generate, sample_next
from innerloop.models.lm import CausalLM, LMState

__all__ = [
    "BACKBONES",
    "MIXER_TABLE",
    "MIXERS",
    "MODEL_SIZES",
    "Block",
    "BlockState",
    "CausalDepthwiseConv",
    "CausalLM",
    "CausalSelfAttention",
    "E2EConfig",
    "E2ELM",
    "E2EState",
    "KVCache",
    "LMState",
    "ModelConfig",
    "NonFiniteInnerStepError",
    "SwiGLU",
    "TTTConfig",
    "build_mixer",
    "build_model",
    "generate",
    "sample_next",
    "validate_e2e_config",
    "validate_model_config",
]
