"""Load a TTTLinear / TTTMLP layer, or a whole ``TTTForCausalLM``, of test-time-training/ttt-lm-pytorch.

A layer becomes a :class:`TTTLayer` (:func:`load_layer`); a whole model saved by the reference's
``save_pretrained`` (a folder with ``config.json`` and ``model.safetensors``) becomes a
:class:`~innerloop.models.CausalLM` (:func:`load_model`) whose logits equal the reference's.

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
  buffers may be present and are skipped; a torch.compile'd reference's ``_orig_mod.`` names are read
  as the plain ones, :func:`~innerloop.core.compiled.plain_names`), every value a finite floating tensor
  of the expected shape, all of one dtype.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from innerloop.core.compiled import plain_names
from innerloop.core.functional import as_integer
from innerloop.core.layer import TTTLayer, head_counts, is_real
from innerloop.core.wording import a_type
from innerloop.models.config import MODEL_FIELD_BOUNDS, ModelConfig, TTTConfig
from innerloop.models.lm import CausalLM


def _as_integer(value: Any) -> int | None:
    """``value`` as an int if it is one as :func:`~innerloop.core.functional.as_integer` reads it (a
    Python or numpy integer, a 0-d integer tensor; not a bool) or an integral float (``2048.0``, which
    a ``config.json`` written by hand may hold), else None: the one reading of every integer field."""
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    return as_integer(value)


def _integer(minimum: int) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        integer = _as_integer(value)
        return f"an integer >= {minimum}" if integer is None or integer < minimum else None

    return check


def _real(minimum: float, *, inclusive: bool) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if not is_real(value):  # a finite real, not a bool (10**400: no finite float, not an OverflowError)
            return f"a finite number {'>=' if inclusive else '>'} {minimum}"
        if value < minimum or (value == minimum and not inclusive):
            return f"a finite number {'>=' if inclusive else '>'} {minimum}"
        return None

    return check


def _within(key: str, kind: type) -> Callable[[Any], str | None]:
    """A check of a field that becomes the :class:`ModelConfig` field ``key``: a ``kind`` (an integral
    float counts as an int, as :func:`_integer` reads it) inside its :data:`MODEL_FIELD_BOUNDS`, so that
    a value innerloop cannot build is refused naming the reference's field, not innerloop's."""
    bounds = MODEL_FIELD_BOUNDS[key]

    def check(value: Any) -> str | None:
        if kind is int:
            number = _as_integer(value)
        else:
            number = value if is_real(value) else None
        if number is not None and number in bounds:
            return None
        why = f" ({bounds.why})" if bounds.why else ""
        return f"{'an integer' if kind is int else 'a finite number'} {bounds.describe()}{why}"

    return check


def _boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "true or false (a bool, not a string or a number)"


def _string(value: Any) -> str | None:
    return None if isinstance(value, str) else "a string"


def _one_of(*choices: str) -> Callable[[Any], str | None]:
    return lambda value: None if value in choices else f"one of {list(choices)}"


def _is_token_id(value: Any) -> bool:
    """An integer >= 0, not a float: a token id is never written as one."""
    integer = as_integer(value)
    return integer is not None and integer >= 0


def _token_id(value: Any) -> str | None:
    ids = value if isinstance(value, list) else [value]
    if all(v is None or _is_token_id(v) for v in ids):
        return None
    return "a token id (an integer >= 0), a list of them, or null"


#: Every argument of the reference ``TTTConfig.__init__`` (ttt.py), with what a valid value is.
TTT_CONFIG_FIELDS: dict[str, Callable[[Any], str | None]] = {
    "vocab_size": _within("model.vocab_size", int),
    "hidden_size": _within("model.hidden_size", int),
    "intermediate_size": _within("model.intermediate_size", int),
    "num_hidden_layers": _within("model.num_layers", int),
    "num_attention_heads": _within("model.num_heads", int),
    "hidden_act": _string,
    "max_position_embeddings": _integer(1),
    "initializer_range": _real(0.0, inclusive=True),
    "rms_norm_eps": _within("model.norm_eps", float),
    "use_cache": _boolean,
    "pad_token_id": _token_id,
    "bos_token_id": _token_id,
    "eos_token_id": _token_id,
    "pretraining_tp": _integer(1),
    "tie_word_embeddings": _boolean,
    "rope_theta": _within("model.rope_theta", float),
    "use_gate": _boolean,
    "share_qk": _boolean,
    "ttt_layer_type": _one_of("linear", "mlp"),
    "ttt_base_lr": _within("model.ttt.base_lr", float),
    "mini_batch_size": _within("model.ttt.mini_batch_size", int),
    "pre_conv": _boolean,
    "conv_kernel": _within("model.ttt.conv_kernel", int),
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
#: The dtypes a model's weights may have (the layer computes in them, its scan in at least float32).
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: Non-persistent buffers of the reference layer; recomputed here, so skipped if present.
BUFFERS = {"token_idx", "rotary_emb.inv_freq"}
INNER_WEIGHTS = {"W1", "b1", "W2", "b2"}
#: Where layer ``index``'s weights sit in the state dict of a reference ``TTTForCausalLM`` (first) or
#: of a bare ``TTTModel`` (second).
MODEL_LAYER_PREFIXES = ("model.layers.{index}.seq_modeling_block.", "layers.{index}.seq_modeling_block.")


def _check_is_mapping(config: Any) -> None:
    """Raise a ``TypeError`` naming ``config`` unless it is a mapping (a dict of TTTConfig fields)."""
    if not isinstance(config, Mapping):
        hint = "; pass config.to_dict()" if hasattr(config, "to_dict") else ""
        raise TypeError(f"config must be a dict of TTTConfig fields, got {type(config).__name__}{hint}")


def check_config(config: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the first problem with a reference TTTConfig dict: an unknown key
    (with close matches and the valid fields), a wrong type or an out-of-range value, a missing
    required field, or a ``model_type`` other than ``"ttt"``."""
    _check_is_mapping(config)
    _check_model_type(config)  # first: another model's fields are not misspelt TTTConfig ones
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


def _check_model_type(config: Mapping[str, Any]) -> None:
    """``ValueError`` naming ``model_type`` unless it is ``"ttt"`` (or absent), saying what to do with
    an innerloop folder (already converted)."""
    model_type = config.get("model_type", "ttt")
    if model_type == "ttt":
        return
    hint = (
        ": it is innerloop's own Hugging Face folder, which AutoModelForCausalLM loads after `import innerloop`"
        if model_type == "innerloop"
        else ""
    )
    raise ValueError(f"config model_type={model_type!r} is not a TTT model's (model_type 'ttt'){hint}")


def _check_head_width(config: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the config fields ``hidden_size`` and ``num_attention_heads`` unless
    the heads split ``hidden_size`` evenly into heads of an even width (RoPE rotates pairs of
    channels). Both fields must already be checked integers."""
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    if hidden % heads == 0 and (hidden // heads) % 2 == 0:
        return
    problem = (
        f"does not divide 'hidden_size'={hidden}"
        if hidden % heads
        else f"splits 'hidden_size'={hidden} into heads of the odd width {hidden // heads}"
    )
    raise ValueError(
        f"config field 'num_attention_heads'={heads} {problem}; it must split hidden_size into heads of "
        f"an even width (RoPE rotates pairs of channels): valid num_attention_heads for hidden_size={hidden}: "
        f"{head_counts(hidden, rotary=True) or 'none (hidden_size is odd)'}"
    )


def layer_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """``TTTLayer`` keyword arguments from the reference's TTTConfig fields (checked first, see
    :func:`check_config` and :func:`_check_head_width`)."""
    check_config(config)
    values = {k: config.get(k, default) for k, default in LAYER_FIELDS.items()}
    _check_head_width(values)
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
    if not isinstance(model_state_dict, Mapping):
        raise TypeError(
            "model_state_dict must be a dict of tensors (the reference model's state dict, e.g. "
            f"safetensors.torch.load_file of its model.safetensors), got {type(model_state_dict).__name__}"
        )
    number = as_integer(index)
    if number is None or number < 0:
        raise ValueError(f"index must be a layer number, an int >= 0, got {index!r}")
    model_state_dict = plain_names(model_state_dict, "model_state_dict")  # a compiled reference's names
    for prefix in (p.format(index=number) for p in MODEL_LAYER_PREFIXES):
        layer = {k.removeprefix(prefix): v for k, v in model_state_dict.items() if k.startswith(prefix)}
        if layer:
            return layer
    found = (re.search(r"layers\.(\d+)\.seq_modeling_block\.", str(k)) for k in model_state_dict)
    present = sorted({int(match.group(1)) for match in found if match})
    raise ValueError(
        f"the model state dict has no TTT layer {number} (no key starts with "
        f"{MODEL_LAYER_PREFIXES[0].format(index=number)!r}); TTT layers present: {present}"
    )


def convert_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reference parameter names -> TTTLayer parameter names (a ``param.`` prefix is accepted;
    the reference's non-persistent buffers are skipped)."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a dict of tensors, got {type(state_dict).__name__}")
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in plain_names(state_dict).items():  # a compiled reference layer's: its plain names
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


def _check_tensor(name: str, tensor: Any, shape: torch.Size, what: str, fields: str) -> None:
    """One tensor of a reference state dict (``name``, the reference's key): a finite floating tensor
    of ``shape``; ``what`` is "layer" or "model", ``fields`` the config fields that decide the shape."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"state_dict[{name!r}] is {a_type(tensor)}, not a tensor")
    if tensor.dtype not in WEIGHT_DTYPES:
        raise ValueError(
            f"state_dict[{name!r}] has dtype {tensor.dtype}; the weights are float16, bfloat16, float32 or "
            "float64"
        )
    if tensor.shape != shape:
        raise ValueError(
            f"state_dict[{name!r}] has shape {tuple(tensor.shape)}, but a {what} with this config "
            f"needs {tuple(shape)} (check {fields})"
        )
    if tensor.is_meta:
        raise ValueError(
            f"state_dict[{name!r}] is on the meta device: it has a shape but no values (a model built under "
            "torch.device('meta') or loaded with assign=False into one); pass the tensors that hold the weights"
        )
    bad = (~torch.isfinite(tensor)).sum().item()
    if bad:
        raise ValueError(f"state_dict[{name!r}] has {bad} non-finite value(s) (NaN or inf)")


def _check_one_dtype(tensors: Mapping[str, torch.Tensor]) -> None:
    """All tensors (by reference name) share one dtype."""
    dtypes: dict[torch.dtype, str] = {}
    for name, tensor in tensors.items():
        dtypes.setdefault(tensor.dtype, name)
    if len(dtypes) > 1:
        raise ValueError(
            "state_dict mixes dtypes: "
            + ", ".join(f"{dtype} (e.g. {name!r})" for dtype, name in dtypes.items())
            + "; convert every tensor to one dtype"
        )


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
    fields = "hidden_size, num_attention_heads, mini_batch_size, conv_kernel"
    for ours, tensor in converted.items():
        _check_tensor(reference_name[ours], tensor, expected[ours].shape, "layer", fields)
    _check_one_dtype({reference_name[ours]: tensor for ours, tensor in converted.items()})


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


# --------------------------------------------------------------------------------------------------
# Whole models: a reference TTTForCausalLM folder -> CausalLM
# --------------------------------------------------------------------------------------------------

#: The reference ``TTTConfig.__init__`` defaults of the fields a whole model reads. ``save_pretrained``
#: leaves out of ``config.json`` the values equal to transformers' own defaults (e.g.
#: ``tie_word_embeddings=True``), so a missing field takes its default here, as the reference does.
MODEL_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 5504,
    "num_hidden_layers": 24,
    "num_attention_heads": 32,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "rope_theta": 10000.0,
    "use_gate": False,
    "share_qk": False,
    "ttt_layer_type": "linear",
    "ttt_base_lr": 1.0,
    "mini_batch_size": 16,
    "pre_conv": False,
    "conv_kernel": 4,
}

#: What becomes of every reference ``TTTConfig`` field in a whole model: the ``ModelConfig`` field it
#: sets, or why it does not change the logits. Fields with a value innerloop cannot reproduce are
#: refused by :func:`model_config` (:data:`REFUSED_VALUES`).
MODEL_FIELD_MAP: dict[str, str] = {
    "vocab_size": "model.vocab_size",
    "hidden_size": "model.hidden_size",
    "intermediate_size": "model.intermediate_size",
    "num_hidden_layers": "model.num_layers",
    "num_attention_heads": "model.num_heads",
    "hidden_act": "the SwiGLU MLP's activation: only 'silu' (innerloop's SwiGLU) or its alias 'swish'",
    "max_position_embeddings": "unused: the reference's forward never reads it (RoPE restarts every mini-batch)",
    "initializer_range": "model.init_std (initial weights only; 0 keeps innerloop's default)",
    "rms_norm_eps": "model.norm_eps",
    "use_cache": "unused: a generation option of transformers, not a weight or a computation",
    "pad_token_id": "model.padding_id (the embedding row that starts at zero and takes no gradient from its lookup)",
    "bos_token_id": "unused: a tokenizer id",
    "eos_token_id": "unused: a tokenizer id",
    "pretraining_tp": (
        "unused: splits the MLP and head matmuls into slices with the same result; refused unless it "
        "divides intermediate_size and vocab_size (the reference then drops the remainder)"
    ),
    "tie_word_embeddings": "model.tie_embeddings",
    "rope_theta": "model.rope_theta",
    "use_gate": "model.ttt.use_gate",
    "share_qk": "model.ttt.share_qk",
    "ttt_layer_type": "model.ttt.inner_model",
    "ttt_base_lr": "model.ttt.base_lr",
    "mini_batch_size": "model.ttt.mini_batch_size",
    "pre_conv": "model.pre_conv",
    "conv_kernel": "model.pre_conv_kernel and model.ttt.conv_kernel",
    "scan_checkpoint_group_size": "unused: gradient checkpointing while training, the same forward",
}

#: Config values a whole model cannot take, with the reason.
REFUSED_VALUES: dict[str, tuple[Any, str]] = {
    "hidden_act": ("silu", "innerloop's SwiGLU MLP uses silu, as the paper's models do"),
}


def _check_tensor_parallel_slices(values: Mapping[str, Any]) -> None:
    """The reference splits its MLP and head into ``pretraining_tp`` slices of ``size // tp`` rows and
    drops the remainder: innerloop computes the same only when ``tp`` divides the sizes."""
    slices = values["pretraining_tp"]
    if slices <= 1:
        return
    for name in ("intermediate_size", "vocab_size"):
        if values[name] % slices:
            raise ValueError(
                f"config field 'pretraining_tp'={slices} does not divide {name}={values[name]}: the "
                f"reference then drops the last {values[name] % slices} of them (a model innerloop does "
                "not reproduce); only a pretraining_tp that divides intermediate_size and vocab_size is supported"
            )


def _padding_id(pad_token_id: Any, vocab_size: int) -> int | None:
    """The reference's ``nn.Embedding(vocab_size, hidden_size, padding_idx=pad_token_id)`` row (checked
    as a token id before): one id below ``vocab_size``, or None."""
    if pad_token_id is None:
        return None
    if isinstance(pad_token_id, list) or not pad_token_id < vocab_size:
        raise ValueError(
            f"config field 'pad_token_id'={pad_token_id!r} must be one token id in [0, vocab_size={vocab_size}) "
            "or null: the reference's embedding takes it as its padding row"
        )
    return as_integer(pad_token_id)


def model_config(config: Mapping[str, Any]) -> ModelConfig:
    """The :class:`ModelConfig` of a reference ``TTTForCausalLM`` with these ``TTTConfig`` fields
    (checked first, see :func:`check_config` and :func:`_check_head_width`; missing fields take
    :data:`MODEL_DEFAULTS`)."""
    _check_is_mapping(config)
    check_config({**MODEL_DEFAULTS, **config})
    values = {**MODEL_DEFAULTS, **{k: v for k, v in config.items() if k in MODEL_DEFAULTS}}
    _check_head_width(values)
    if values["hidden_act"] == "swish":  # transformers' name for the same function
        values["hidden_act"] = "silu"
    _check_tensor_parallel_slices({**values, "pretraining_tp": config.get("pretraining_tp", 1)})
    for name, (only, why) in REFUSED_VALUES.items():
        if values[name] != only:
            raise ValueError(
                f"config field {name!r}={values[name]!r} is not supported: only {only!r} ({why})"
            )
    mamba = values["pre_conv"] and values["share_qk"] and values["use_gate"]
    init_std = float(values["initializer_range"])
    return ModelConfig(
        mixer="ttt",
        backbone="mamba" if mamba else "transformer",
        vocab_size=int(values["vocab_size"]),
        hidden_size=int(values["hidden_size"]),
        num_layers=int(values["num_hidden_layers"]),
        num_heads=int(values["num_attention_heads"]),
        intermediate_size=int(values["intermediate_size"]),
        rope_theta=float(values["rope_theta"]),
        pre_conv_kernel=int(values["conv_kernel"]),
        pre_conv=values["pre_conv"],
        norm_eps=float(values["rms_norm_eps"]),
        tie_embeddings=values["tie_word_embeddings"],
        init_std=init_std if init_std > 0 else ModelConfig.init_std,
        padding_id=_padding_id(config.get("pad_token_id"), int(values["vocab_size"])),
        ttt=TTTConfig(
            inner_model=values["ttt_layer_type"],
            mini_batch_size=int(values["mini_batch_size"]),
            base_lr=float(values["ttt_base_lr"]),
            conv_kernel=int(values["conv_kernel"]),
            share_qk=values["share_qk"],
            use_gate=values["use_gate"],
        ),
    )


#: Reference key -> CausalLM key, for the parts of a block outside its TTT layer.
_BLOCK_KEYS = {
    "seq_norm.weight": "mixer_norm.weight",
    "ffn_norm.weight": "mlp_norm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
    "conv.norm.weight": "pre_conv_norm.weight",
    "conv.conv.weight": "pre_conv.conv.weight",
    "conv.conv.bias": "pre_conv.conv.bias",
}
_TOP_KEYS = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight"}
_BLOCK_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")


def _our_key(key: str) -> str | None:
    """The CausalLM key of a reference ``TTTForCausalLM`` key, or None for a key it does not have
    (the reference's non-persistent buffers map to ``""``: skipped)."""
    if key in _TOP_KEYS:
        return _TOP_KEYS[key]
    if key == "lm_head.weight":
        return "lm_head.weight"
    match = _BLOCK_KEY.fullmatch(key)
    if match is None:
        return None
    index, rest = match.groups()
    if rest.startswith("seq_modeling_block."):
        name = rest.removeprefix("seq_modeling_block.")
        if name.startswith(("buffer.", "param.")):  # the conformance vectors' prefixes, no model's keys
            return None
        converted = convert_state_dict({name: torch.empty(0)})
        return f"blocks.{index}.mixer.{next(iter(converted))}" if converted else ""
    return f"blocks.{index}.{_BLOCK_KEYS[rest]}" if rest in _BLOCK_KEYS else None


def convert_model_state_dict(
    state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], tied: bool
) -> dict[str, torch.Tensor]:
    """A reference ``TTTForCausalLM`` state dict (its own key names) as the state dict of the
    :class:`CausalLM` whose own is ``expected``; raises ``ValueError`` naming the first bad key.

    With ``tied`` the head is the embedding: ``lm_head.weight`` may be absent (``save_pretrained``
    drops it) or present and equal to the embedding.
    """
    converted: dict[str, torch.Tensor] = {}
    reference_name: dict[str, str] = {}
    unexpected = []
    state_dict = plain_names(state_dict)  # a compiled reference model's (or block's): its plain names
    for key, tensor in state_dict.items():
        ours = _our_key(key) if isinstance(key, str) else None
        if ours == "":
            continue  # a non-persistent buffer of the reference
        if ours is None or ours not in expected or (tied and ours == "lm_head.weight"):
            unexpected.append(str(key))
            continue
        converted[ours], reference_name[ours] = tensor, key
    if tied and "lm_head.weight" in unexpected:
        unexpected.remove("lm_head.weight")
        _check_tied_head(state_dict)
        converted["lm_head.weight"], reference_name["lm_head.weight"] = None, "model.embed_tokens.weight"  # type: ignore[assignment]
    missing = sorted(
        _reference_key(k) for k in set(expected) - set(converted) if not (tied and k == "lm_head.weight")
    )
    if unexpected or missing:
        raise ValueError(
            f"model.safetensors does not match a reference TTTForCausalLM with this config.json: "
            f"missing keys {missing}, unexpected keys {sorted(unexpected)}"
        )
    fields = "vocab_size, hidden_size, intermediate_size, num_attention_heads, mini_batch_size, conv_kernel"
    for ours, tensor in converted.items():
        if tensor is not None:
            _check_tensor(reference_name[ours], tensor, expected[ours].shape, "model", fields)
    _check_one_dtype({reference_name[k]: t for k, t in converted.items() if t is not None})
    if tied:
        converted["lm_head.weight"] = converted["embed.weight"]
    return converted


def _check_tied_head(state_dict: Mapping[str, torch.Tensor]) -> None:
    """A tied model's ``lm_head.weight``, when present, must be the embedding (the reference ties it)."""
    head, embedding = state_dict["lm_head.weight"], state_dict.get("model.embed_tokens.weight")
    same = isinstance(head, torch.Tensor) and isinstance(embedding, torch.Tensor)
    if not (same and head.shape == embedding.shape and torch.equal(head, embedding)):
        raise ValueError(
            "state_dict['lm_head.weight'] differs from 'model.embed_tokens.weight', but the config ties "
            "them (tie_word_embeddings is true or absent, whose default is true): the reference would use "
            "the embedding; set tie_word_embeddings false in config.json to keep a separate head"
        )


def _reference_key(ours: str) -> str:
    """The reference key of a CausalLM key (for messages about missing tensors)."""
    if ours in ("embed.weight", "norm.weight"):
        return {v: k for k, v in _TOP_KEYS.items()}[ours]
    if ours == "lm_head.weight":
        return ours
    _, index, rest = ours.split(".", 2)
    if rest.startswith("mixer."):
        return f"model.layers.{index}.seq_modeling_block.{rest.removeprefix('mixer.').removeprefix('initial_params.')}"
    return f"model.layers.{index}.{ {v: k for k, v in _BLOCK_KEYS.items()}[rest] }"


def read_model_folder(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``config.json`` and the weights (``model.safetensors``, or the shards listed by
    ``model.safetensors.index.json``) of a folder saved by ``save_pretrained``."""
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(
            "folder must be the path (str or os.PathLike) of a folder save_pretrained wrote, got "
            f"{type(folder).__name__} {folder!r:.80}"
        )
    if not str(folder).strip():  # Path("") is the current directory, whose config.json was then read
        raise ValueError(f"folder {str(folder)!r} is empty: give the folder save_pretrained wrote")
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{str(folder)!r} is not a folder (give the folder save_pretrained wrote)")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no config.json (is it a save_pretrained folder?)")
    try:
        config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{str(config_path)!r} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{str(config_path)!r} must hold a JSON object of TTTConfig fields")
    return config, _read_weights(folder)


def _weight_map(index: Path) -> dict[str, str]:
    """A sharded folder's ``model.safetensors.index.json`` ``weight_map`` (tensor name -> file name,
    a file of the folder itself)."""
    try:
        content = json.loads(index.read_text(encoding="utf-8"))
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{str(index)!r} is not valid JSON: {err}") from None
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(
            f"{str(index)!r} must be an object with a 'weight_map' object (tensor name -> file name), as "
            "save_pretrained writes it"
        )
    outside = sorted({f for f in weight_map.values() if Path(f).name != f or f in ("", ".", "..")})
    if outside:
        raise ValueError(f"{str(index)!r} names weight files outside its folder: {outside}")
    return weight_map


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises several types for a broken file
        raise ValueError(
            f"{str(path)!r} is not a readable safetensors file: {str(err).splitlines()[0]}"
        ) from None


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The weights of ``model.safetensors``, or of the shards a ``model.safetensors.index.json`` names:
    each tensor from the file its ``weight_map`` assigns it, in none other (a tensor in two files, or
    in a file the map does not assign it to, is refused)."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return _read_safetensors(single)
    if not index.is_file():
        pickled = [p.name for p in folder.glob("pytorch_model*.bin")]
        hint = f" (it has {pickled}: save with safe_serialization=True)" if pickled else ""
        raise FileNotFoundError(f"{str(folder)!r} has no model.safetensors{hint}")
    weight_map = _weight_map(index)
    weights: dict[str, torch.Tensor] = {}
    for name in sorted(set(weight_map.values())):
        for key, tensor in _read_safetensors(folder / name).items():
            if weight_map.get(key) != name:
                assigned = f"to {weight_map[key]!r}" if key in weight_map else "to no file"
                raise ValueError(
                    f"{str(folder / name)!r} holds {key!r}, which {str(index)!r} assigns {assigned}: the shards "
                    "and their index disagree"
                )
            weights[key] = tensor
    missing = sorted(set(weight_map) - set(weights))
    if missing:
        raise ValueError(f"{str(index)!r} assigns {missing[:5]} to shards that do not hold them")
    return weights


SPECIAL_TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
"""Token ids of the reference config that the model never reads but generation does (an export's
``config.json`` and ``generation_config.json`` carry them: transformers' ``generate`` stops at EOS)."""


def special_token_ids(config: Mapping[str, Any]) -> dict[str, int | list[int]]:
    """The :data:`SPECIAL_TOKEN_FIELDS` a reference config (``config.json``) sets to a token id, and
    ``eos_token_id`` to a list of them too (as transformers reads it; a negative id in it means none)."""
    _check_is_mapping(config)
    ids: dict[str, int | list[int]] = {}
    for key in SPECIAL_TOKEN_FIELDS:
        value = config.get(key)
        if key == "eos_token_id" and isinstance(value, list):  # generate stops at any of them
            listed = [as_integer(v) for v in value if _is_token_id(v)]
            if listed:
                ids[key] = listed
        elif _is_token_id(value):
            ids[key] = as_integer(value)
    return ids


def load_model(folder: str | Path) -> CausalLM:
    """The :class:`CausalLM` equal to the reference ``TTTForCausalLM`` saved in ``folder`` by its
    ``save_pretrained`` (``config.json`` with ``model_type`` ``"ttt"`` and ``model.safetensors``, key
    names unchanged), in eval mode and the weights' dtype: ``logits, state = model(input_ids)``
    gives the reference's logits.

    Raises ``ValueError`` (``FileNotFoundError`` for a missing file) with one line naming the field
    or key for an unknown, ill-typed or unsupported config field (:data:`MODEL_FIELD_MAP` says what
    becomes of each), and for weights with missing or unexpected keys, a wrong shape, mixed dtypes
    or a non-finite value.
    """
    config, weights = read_model_folder(folder)
    model = CausalLM(model_config(config))
    tied = model.config.tie_embeddings
    state_dict = convert_model_state_dict(weights, model.state_dict(), tied)
    dtype = state_dict["embed.weight"].dtype
    # The weights' dtype, buffers (RoPE and token-index tables) included, as model.to(dtype) and the
    # reference's own .to(dtype) cast them, and as the checkpoint and Hugging Face folder that convert
    # writes load again: the converted model and its saved copies are one function.
    model.to(dtype)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


__all__ = [
    "SPECIAL_TOKEN_FIELDS",
    "special_token_ids",
    "MODEL_DEFAULTS",
    "MODEL_FIELD_MAP",
    "PRETRAINED_CONFIG_FIELDS",
    "TTT_CONFIG_FIELDS",
    "check_config",
    "convert_model_state_dict",
    "convert_state_dict",
    "layer_kwargs",
    "layer_state_dict",
    "load_layer",
    "load_model",
    "model_config",
    "read_model_folder",
]
