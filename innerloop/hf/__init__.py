"""Hugging Face transformers integration: :class:`InnerloopConfig`, :class:`InnerloopForCausalLM`,
:class:`InnerloopModel` (the network without its head's logits), ``innerloop export`` (docs/huggingface.md).

Importing this package does not import transformers; its classes are loaded on first access
(``from innerloop.hf import InnerloopForCausalLM``). ``import innerloop`` registers them with
``AutoConfig`` / ``AutoModelForCausalLM`` / ``AutoModel`` when transformers' Auto classes are loaded
(:mod:`innerloop.hf.hook`).
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "InnerloopConfig": "configuration",
    "InnerloopForCausalLM": "modeling",
    "InnerloopModel": "modeling",
    "InnerloopCache": "modeling",
    "LeftPaddedCache": "modeling",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    """Load ``InnerloopConfig`` / ``InnerloopForCausalLM`` / ``InnerloopModel`` (and transformers) on first
    access."""
    if name not in _LAZY:
        raise AttributeError(f"module 'innerloop.hf' has no attribute {name!r}")
    if _LAZY[name] == "configuration":
        from innerloop.hf import configuration as module
    else:
        from innerloop.hf import modeling as module
    return getattr(module, name)
