"""Networks built from sequence layers: the causal LM, its blocks, and the attention baselines.

``CausalLM(ModelConfig(mixer="swa", window=16))`` is a byte-level sliding-window model;
``logits, state = model(ids, state)`` runs it on a chunk and continues from ``state``.
"""

from innerloop.models.attention import CausalSelfAttention, KVCache
from innerloop.models.blocks import Block, BlockState, CausalDepthwiseConv, SwiGLU, build_mixer
from innerloop.models.config import (
    BACKBONES,
    MIXERS,
    MODEL_SIZES,
    ModelConfig,
    TTTConfig,
    validate_model_config,
)
from innerloop.models.generate import generate, sample_next
from innerloop.models.lm import CausalLM, LMState

__all__ = [
    "BACKBONES",
    "MIXERS",
    "MODEL_SIZES",
    "Block",
    "BlockState",
    "CausalDepthwiseConv",
    "CausalLM",
    "CausalSelfAttention",
    "KVCache",
    "LMState",
    "ModelConfig",
    "SwiGLU",
    "TTTConfig",
    "build_mixer",
    "generate",
    "sample_next",
    "validate_model_config",
]
