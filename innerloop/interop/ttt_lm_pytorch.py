"""Load a TTTLinear / TTTMLP layer of test-time-training/ttt-lm-pytorch into a :class:`TTTLayer`.

The reference's ``TTTConfig`` fields that shape the layer map to ``TTTLayer`` arguments, and its
layer ``state_dict`` maps one to one (the inner weights ``W1, b1, W2, b2`` become
``initial_params.*``). ``layer(x)[0]`` then equals the reference layer's output.

Both inputs are checked before anything is built, so that a typo or a broken file is an error, never a
layer that silently differs from the reference:

- config: every key must be a field of the reference ``TTTConfig`` (:data:`TTT_CONFIG_FIELDS`, each
  type- and range-checked, used by the layer or not) or one of the fields that transformers'
  ``PretrainedConfig`` adds to a saved ``config.json`` (:data:`PRETRAINED_CONFIG_FIELDS`, accepted
  unchecked: they do not describe the layer). Anything else (``ttt_base_Lr``, ``rope_thetta``) is
  refused with the close matches and the valid fields. ``num_key_value_heads`` and ``rope_scaling``,
  mentioned in the reference's docstring but not ``TTTConfig`` arguments (and used by neither
  implementation), are refused too.
- state_dict: the keys must be exactly the reference layer's for this config (its non-persistent
  buffers may be present and are skipped), every value a finite floating tensor of the expected
  shape, all of one dtype.
"""

from __future__ import annotations

import difflib
import math
import numbers
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

from innerloop.core.layer import TTTLayer


def _integer(minimum: int) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        integral = isinstance(value, numbers.Integral) or (isinstance(value, float) and value.is_integer())
        if isinstance(value, bool) or not integral or value < minimum:
            return f"an integer >= {minimum}"
        return None

    return check


def _real(minimum: float, *, inclusive: bool) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            return f"a finite number {'>=' if inclusive else '>'} {minimum}"
        if value < minimum or (value == minimum and not inclusive):
            return f"a finite number {'>=' if inclusive else '>'} {minimum}"
        return None

    return check


def _boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "true or false (a bool, not a string or a number)"


def _string(value: Any) -> str | None:
    return None if isinstance(value, str) else "a string"


def _one_of(*choices: str) -> Callable[[Any], str | None]:
    return lambda value: None if value in choices else f"one of {list(choices)}"


def _token_id(value: Any) -> str | None:
    ids = value if isinstance(value, list) else [value]
    if all(v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0) for v in ids):
        return None
    return "a token id (an integer >= 0), a list of them, or null"


#: Every argument of the reference ``TTTConfig.__init__`` (ttt.py), with what a valid value is.
TTT_CONFIG_FIELDS: dict[str, Callable[[Any], str | None]] = {
    "vocab_size": _integer(1),
    "hidden_size": _integer(1),
    "intermediate_size": _integer(1),
    "num_hidden_layers": _integer(1),
    "num_attention_heads": _integer(1),
    "hidden_act": _string,
    "max_position_embeddings": _integer(1),
    "initializer_range": _real(0.0, inclusive=True),
    "rms_norm_eps": _real(0.0, inclusive=False),
    "use_cache": _boolean,
    "pad_token_id": _token_id,
    "bos_token_id": _token_id,
    "eos_token_id": _token_id,
    "pretraining_tp": _integer(1),
    "tie_word_embeddings": _boolean,
    "rope_theta": _real(0.0, inclusive=False),
    "use_gate": _boolean,
    "share_qk": _boolean,
    "ttt_layer_type": _one_of("linear", "mlp"),
    "ttt_base_lr": _real(0.0, inclusive=True),
    "mini_batch_size": _integer(1),
    "pre_conv": _boolean,
    "conv_kernel": _integer(1),
    "scan_checkpoint_group_size": _integer(0),
}

#: Fields transformers' ``PretrainedConfig`` (4.x) keeps beside a model's own and writes into
#: ``config.json`` / ``to_dict()``: generation defaults, labels, bookkeeping. They say nothing about
#: the layer, so their values are accepted as they are.
PRETRAINED_CONFIG_FIELDS = frozenset(
    {
        "_attn_implementation_autoset",
        "_commit_hash",
        "_name_or_path",
        "add_cross_attention",
        "architectures",
        "bad_words_ids",
        "begin_suppress_tokens",
        "chunk_size_feed_forward",
        "cross_attention_hidden_size",
        "decoder_start_token_id",
        "diversity_penalty",
        "do_sample",
        "dtype",
        "early_stopping",
        "encoder_no_repeat_ngram_size",
        "exponential_decay_length_penalty",
        "finetuning_task",
        "forced_bos_token_id",
        "forced_eos_token_id",
        "id2label",
        "is_decoder",
        "is_encoder_decoder",
        "label2id",
        "length_penalty",
        "max_length",
        "min_length",
        "model_type",
        "no_repeat_ngram_size",
        "num_beam_groups",
        "num_beams",
        "num_return_sequences",
        "output_attentions",
        "output_hidden_states",
        "output_scores",
        "prefix",
        "problem_type",
        "pruned_heads",
        "remove_invalid_values",
        "repetition_penalty",
        "return_dict",
        "return_dict_in_generate",
        "sep_token_id",
        "suppress_tokens",
        "task_specific_params",
        "temperature",
        "tf_legacy_loss",
        "tie_encoder_decoder",
        "tokenizer_class",
        "top_k",
        "top_p",
        "torch_dtype",
        "torchscript",
        "transformers_version",
        "typical_p",
        "use_bfloat16",
    }
)

#: TTTConfig fields that shape one layer, with the reference's defaults (None: required).
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
#: Non-persistent buffers of the reference layer; recomputed here, so skipped if present.
BUFFERS = {"token_idx", "rotary_emb.inv_freq"}
INNER_WEIGHTS = {"W1", "b1", "W2", "b2"}
#: Where layer ``index``'s weights sit in the state dict of a reference ``TTTForCausalLM`` (first) or
#: of a bare ``TTTModel`` (second).
MODEL_LAYER_PREFIXES = ("model.layers.{index}.seq_modeling_block.", "layers.{index}.seq_modeling_block.")


def check_config(config: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the first problem with a reference TTTConfig dict: an unknown key
    (with close matches and the valid fields), a wrong type or an out-of-range value, a missing
    required field, or a ``model_type`` other than ``"ttt"``."""
    if not isinstance(config, Mapping):
        hint = "; pass config.to_dict()" if hasattr(config, "to_dict") else ""
        raise TypeError(f"config must be a dict of TTTConfig fields, got {type(config).__name__}{hint}")
    unknown = sorted(
        (k for k in config if k not in TTT_CONFIG_FIELDS and k not in PRETRAINED_CONFIG_FIELDS), key=str
    )
    if unknown:
        known = list(TTT_CONFIG_FIELDS) + sorted(PRETRAINED_CONFIG_FIELDS)
        guesses = {k: difflib.get_close_matches(str(k), known, n=1) for k in unknown}
        hints = ", ".join(f"{k!r} -> {g[0]!r}" for k, g in guesses.items() if g)
        raise ValueError(
            f"config has unknown TTTConfig field(s) {unknown}"
            + (f" (did you mean {hints}?)" if hints else "")
            + f"; valid TTTConfig fields: {list(TTT_CONFIG_FIELDS)}, plus the fields transformers' "
            "PretrainedConfig saves (innerloop.interop.ttt_lm_pytorch.PRETRAINED_CONFIG_FIELDS)"
        )
    for name, check in TTT_CONFIG_FIELDS.items():
        if name in config:
            expected = check(config[name])
            if expected is not None:
                value = config[name]
                raise ValueError(
                    f"config field {name!r} must be {expected}, got {value!r} ({type(value).__name__})"
                )
    missing = [k for k, default in LAYER_FIELDS.items() if default is None and k not in config]
    if missing:
        raise ValueError(f"config lacks required TTTConfig field(s) {missing}")
    if config.get("model_type", "ttt") != "ttt":
        raise ValueError(
            f"config model_type={config['model_type']!r} is not a TTT model's (model_type 'ttt')"
        )


def layer_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """``TTTLayer`` keyword arguments from the reference's TTTConfig fields (checked first, see
    :func:`check_config`)."""
    check_config(config)
    values = {k: config.get(k, default) for k, default in LAYER_FIELDS.items()}
    return {
        "hidden_size": int(values["hidden_size"]),
        "num_heads": int(values["num_attention_heads"]),
        "inner_model": values["ttt_layer_type"],
        "inner_loss": "reconstruction",
        "mini_batch_size": int(values["mini_batch_size"]),
        "base_lr": float(values["ttt_base_lr"]),
        "use_gate": values["use_gate"],
        "share_qk": values["share_qk"],
        "conv_kernel": int(values["conv_kernel"]),
        "rope_theta": float(values["rope_theta"]),
    }


def layer_state_dict(model_state_dict: Mapping[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """The state dict of layer ``index``'s TTT layer (``seq_modeling_block``) out of a reference
    ``TTTForCausalLM`` / ``TTTModel`` state dict (``model.safetensors`` of its ``save_pretrained``)."""
    for prefix in (p.format(index=index) for p in MODEL_LAYER_PREFIXES):
        layer = {k.removeprefix(prefix): v for k, v in model_state_dict.items() if k.startswith(prefix)}
        if layer:
            return layer
    found = (re.search(r"layers\.(\d+)\.seq_modeling_block\.", str(k)) for k in model_state_dict)
    present = sorted({int(match.group(1)) for match in found if match})
    raise ValueError(
        f"the model state dict has no TTT layer {index} (no key starts with "
        f"{MODEL_LAYER_PREFIXES[0].format(index=index)!r}); TTT layers present: {present}"
    )


def convert_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reference parameter names -> TTTLayer parameter names (a ``param.`` prefix is accepted;
    the reference's non-persistent buffers are skipped)."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a dict of tensors, got {type(state_dict).__name__}")
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if not isinstance(key, str):
            raise ValueError(f"state_dict keys must be strings, got {key!r}")
        name = key.removeprefix("param.")
        if name in BUFFERS or name.startswith("buffer."):
            continue
        ours = f"initial_params.{name}" if name in INNER_WEIGHTS else name
        if ours in converted:
            raise ValueError(f"state_dict holds {name!r} twice (as {key!r} and without the 'param.' prefix)")
        converted[ours] = tensor
    return converted


def _check_tensors(converted: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    """Keys, types, shapes, dtypes and finiteness of a converted state dict against the layer's own."""
    reference_name = {ours: ours.removeprefix("initial_params.") for ours in converted}
    unexpected = sorted(reference_name[k] for k in set(converted) - set(expected))
    missing = sorted(k.removeprefix("initial_params.") for k in set(expected) - set(converted))
    if unexpected or missing:
        hint = ""
        if any("seq_modeling_block." in k for k in unexpected):
            hint = "; for a whole model's state dict, take one layer with layer_state_dict(state_dict, index)"
        raise ValueError(
            f"state_dict does not match a reference layer with this config: missing keys {missing}, "
            f"unexpected keys {unexpected}{hint}"
        )
    dtypes: dict[torch.dtype, str] = {}
    for ours, tensor in converted.items():
        name = reference_name[ours]
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"state_dict[{name!r}] is a {type(tensor).__name__}, not a tensor")
        if not tensor.is_floating_point():
            raise ValueError(f"state_dict[{name!r}] has dtype {tensor.dtype}; the weights are floating point")
        if tensor.shape != expected[ours].shape:
            raise ValueError(
                f"state_dict[{name!r}] has shape {tuple(tensor.shape)}, but a layer with this config "
                f"needs {tuple(expected[ours].shape)} (check hidden_size, num_attention_heads, "
                "mini_batch_size, conv_kernel)"
            )
        bad = (~torch.isfinite(tensor)).sum().item()
        if bad:
            raise ValueError(f"state_dict[{name!r}] has {bad} non-finite value(s) (NaN or inf)")
        dtypes.setdefault(tensor.dtype, name)
    if len(dtypes) > 1:
        raise ValueError(
            "state_dict mixes dtypes: "
            + ", ".join(f"{dtype} (e.g. {name!r})" for dtype, name in dtypes.items())
            + "; convert every tensor to one dtype"
        )


def load_layer(
    config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], **overrides: Any
) -> TTTLayer:
    """Build a :class:`TTTLayer` equal to the reference layer with this config and state_dict.

    Args:
        config: the reference TTTConfig's fields (a dict, e.g. a saved ``config.json`` or
            ``TTTConfig.to_dict()``); model-level fields are checked and otherwise unused.
        state_dict: the reference layer's ``state_dict()`` (its own names); for a whole model's,
            see :func:`layer_state_dict`.
        overrides: extra ``TTTLayer`` arguments (e.g. ``update_rule="minibatch_gd"``, ``kernel="torch"``).

    The layer takes the dtype of the state_dict's tensors. Raises ``ValueError`` with one line naming
    the field or key for an unknown or ill-typed config field, and for a state dict with missing or
    unexpected keys, a wrong shape, mixed dtypes or a non-finite value.
    """
    kwargs = layer_kwargs(config) | overrides
    layer = TTTLayer(**kwargs)
    converted = convert_state_dict(state_dict)
    _check_tensors(converted, layer.state_dict())
    layer = layer.to(next(iter(converted.values())).dtype)
    layer.load_state_dict(converted, strict=True)
    return layer


__all__ = [
    "PRETRAINED_CONFIG_FIELDS",
    "TTT_CONFIG_FIELDS",
    "check_config",
    "convert_state_dict",
    "layer_kwargs",
    "layer_state_dict",
    "load_layer",
]
