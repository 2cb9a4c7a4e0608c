"""Load a TTTLinear / TTTMLP layer of test-time-training/ttt-lm-pytorch into a :class:`TTTLayer`.

The reference's ``TTTConfig`` fields that shape the layer map to ``TTTLayer`` arguments, and its
layer ``state_dict`` maps one to one (the inner weights ``W1, b1, W2, b2`` become
``initial_params.*``). ``layer(x)[0]`` then equals the reference layer's output.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from innerloop.core.layer import TTTLayer

#: TTTConfig fields that shape one layer, with the reference's defaults.
LAYER_FIELDS: dict[str, Any] = {
    "hidden_size": None,
    "num_attention_heads": None,
    "mini_batch_size": 16,
    "use_gate": False,
    "share_qk": False,
    "conv_kernel": 4,
    "ttt_layer_type": "linear",
    "ttt_base_lr": 1.0,
    "rope_theta": 10000.0,
}
#: TTTConfig fields that do not shape the layer itself (model-level, or training-only).
IGNORED_FIELDS = {"pre_conv", "scan_checkpoint_group_size"}
#: Non-persistent buffers of the reference layer; recomputed here, so skipped if present.
BUFFERS = {"token_idx", "rotary_emb.inv_freq"}
INNER_WEIGHTS = {"W1", "b1", "W2", "b2"}


def layer_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """``TTTLayer`` keyword arguments from the reference's TTTConfig fields."""
    missing = [k for k, default in LAYER_FIELDS.items() if default is None and k not in config]
    if missing:
        raise ValueError(f"config lacks required TTTConfig field(s) {missing}")
    values = {k: config.get(k, default) for k, default in LAYER_FIELDS.items()}
    layer_type = values["ttt_layer_type"]
    if layer_type not in ("linear", "mlp"):
        raise ValueError(f"config ttt_layer_type must be 'linear' or 'mlp', got {layer_type!r}")
    return {
        "hidden_size": int(values["hidden_size"]),
        "num_heads": int(values["num_attention_heads"]),
        "inner_model": layer_type,
        "inner_loss": "reconstruction",
        "mini_batch_size": int(values["mini_batch_size"]),
        "base_lr": float(values["ttt_base_lr"]),
        "use_gate": bool(values["use_gate"]),
        "share_qk": bool(values["share_qk"]),
        "conv_kernel": int(values["conv_kernel"]),
        "rope_theta": float(values["rope_theta"]),
    }


def convert_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reference parameter names -> TTTLayer parameter names (a ``param.`` prefix is accepted)."""
    converted = {}
    for name, tensor in state_dict.items():
        name = name.removeprefix("param.")
        if name in BUFFERS or name.startswith("buffer."):
            continue
        converted[f"initial_params.{name}" if name in INNER_WEIGHTS else name] = tensor
    return converted


def load_layer(
    config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], **overrides: Any
) -> TTTLayer:
    """Build a :class:`TTTLayer` equal to the reference layer with this config and state_dict.

    Args:
        config: the reference TTTConfig's fields (a dict; model-level fields are ignored).
        state_dict: the reference layer's ``state_dict()`` (its own names).
        overrides: extra ``TTTLayer`` arguments (e.g. ``update_rule="minibatch_gd"``, ``kernel="torch"``).

    The layer takes the dtype of the state_dict's tensors.
    """
    kwargs = layer_kwargs(config) | overrides
    layer = TTTLayer(**kwargs)
    converted = convert_state_dict(state_dict)
    dtypes = {t.dtype for t in converted.values()}
    if len(dtypes) == 1:
        layer = layer.to(dtypes.pop())
    expected = set(layer.state_dict())
    unexpected = sorted(set(converted) - expected)
    missing = sorted(expected - set(converted))
    if unexpected or missing:
        raise ValueError(
            f"state_dict does not match a reference {kwargs['inner_model']} layer with this config: "
            f"missing {missing}, unexpected {unexpected}"
        )
    layer.load_state_dict(converted, strict=True)
    return layer


__all__ = ["convert_state_dict", "layer_kwargs", "load_layer"]
