"""Tiny innerloop models of every kind, for the Hugging Face tests."""

from __future__ import annotations

import torch

TINY = {"hidden_size": 32, "num_heads": 2, "num_layers": 2, "intermediate_size": 48, "window": 8}
"""The shape every test model shares (seconds at most on a CPU)."""

MODEL_KINDS: dict[str, dict] = {
    "ttt_linear": {**TINY, "ttt": {"mini_batch_size": 4}},
    "ttt_mlp_mamba_untied": {
        **TINY,
        "backbone": "mamba",
        "tie_embeddings": False,
        "vocab_size": 300,
        "ttt": {"inner_model": "mlp", "mini_batch_size": 4},
    },
    "ttt_minibatch_gd": {**TINY, "ttt": {"update_rule": "minibatch_gd", "mini_batch_size": 4}},
    "attention": {**TINY, "mixer": "attention"},
    "swa": {**TINY, "mixer": "swa"},
    "e2e": {**TINY, "mixer": "e2e", "num_layers": 4, "e2e": {"chunk_size": 4}},
    "e2e_untied": {
        **TINY,
        "mixer": "e2e",
        "tie_embeddings": False,
        "num_layers": 4,
        "e2e": {"chunk_size": 4},
    },
}
"""innerloop model configs (``model`` sections) covering every kind build_model makes."""


def tiny_hf_model(kind: str, seed: int = 0):
    """An :class:`InnerloopForCausalLM` of ``MODEL_KINDS[kind]``, in eval mode."""
    from innerloop.hf import InnerloopConfig, InnerloopForCausalLM

    torch.manual_seed(seed)
    return InnerloopForCausalLM(InnerloopConfig(model=MODEL_KINDS[kind])).eval()
