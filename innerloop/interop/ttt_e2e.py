"""The official TTT-E2E checkpoints (test-time-training/e2e, JAX) as innerloop E2E models.

The official code saves its weights with orbax (OCDBT, zarr) and describes the model in a Hydra
config. :func:`load_model` reads both and returns an :class:`~innerloop.models.E2ELM` whose
``logits, state = model(input_ids)`` are the official model's, with test-time training on (the
official ``train_mode=meta`` evaluation) or off (``train_mode=pretrain``): every option of
``model.e2e`` that selects between the official code and the paper's reading is set to the official
code's choice (``docs/e2e.md`` lists them).

Reading orbax needs ``tensorstore`` (``pip install "innerloop[e2e]"``), imported only when a
checkpoint folder is read; no JAX. :func:`model_from_arrays` builds the model from arrays already
read (the same names, e.g. from a safetensors copy).

Every field of the config's ``model`` section is either used, checked to have the one value
innerloop supports, or ignored for a stated reason (:data:`IGNORED_MODEL_FIELDS`); anything else is
refused with its name.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from innerloop.core.functional import as_integer, is_flag
from innerloop.core.layer import is_real
from innerloop.core.wording import a_type
from innerloop.models import E2ELM, E2EConfig, ModelConfig, build_model
from innerloop.models.config import MODEL_FIELD_BOUNDS, checked_number

PREFIX = "language_model.model."
"""Where the official model keeps its weights in the saved tree."""

EXTRA_INSTALL = 'pip install "innerloop[e2e]"'

DTYPES: dict[str, str] = {
    "fp32": "float32",
    "float32": "float32",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
}
"""The official dtype names (``ttt.utils.jax_utils.get_float_dtype_by_name``) -> torch's."""

IGNORED_MODEL_FIELDS: dict[str, str] = {
    "name": "a label",
    "seq_len": "the training length (sizes the official RoPE table; innerloop computes any position)",
    "eos_token_id": "the tokenizer's (the model never reads it; a Hugging Face export carries it for generate)",
    "param_dtype": "the weights are read as float32",
    "unroll_block_scan": "a compilation choice, the same function",
    "unroll_inner_scan": "a compilation choice, the same function",
    "force_flash": "the cuDNN attention kernel, the same function",
    **{
        f"remat_{part}{suffix}": "rematerialisation while training, the same function"
        for part in ("block", "prefix_block", "attention", "mlp", "rms", "multiple_gd")
        for suffix in ("", "_bwd")
    },
}
"""``model`` fields that do not change the function the model computes, with the reason."""

FIXED_MODEL_FIELDS: dict[str, tuple[Any, Any, str]] = {
    # field: (the value innerloop supports, the official default when absent, what it means)
    "seq_modeling_block": ("SWA", "self_attention", "sliding-window attention, the TTT-E2E model"),
    "prime": (True, False, "the suffix blocks have prime MLPs"),
    "qk_norm": (True, True, "RMS-normalised queries and keys"),
    "pre_norm": (True, True, "RMSNorm before every sub-layer"),
    "post_norm": (True, True, "RMSNorm after every sub-layer"),
    "feed_forward_prime": ("swiglu", "swiglu", "SwiGLU prime MLPs"),
    "resid_pdrop": (0.0, 0.0, "no dropout"),
    "embd_pdrop": (0.0, 0.0, "no dropout"),
    "attn_pdrop": (0.0, 0.0, "no dropout"),
    "state_dtype": ("fp32", "fp32", "float32 fast weights"),
}
"""``model`` fields with the one value innerloop's E2E model supports."""

REQUIRED_MODEL_FIELDS: tuple[str, ...] = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "mini_batch_size",
    "sliding_window_size",
    "rope_theta",
    "tie_word_embeddings",
    "suffix_len",
)
"""``model`` fields read into innerloop's config; they must be given (a resolved config has them)."""

OPTIONAL_MODEL_FIELDS: dict[str, Any] = {
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.02,
    "compute_dtype": "bf16",
    "output_size": None,
    "bos_token_id": 1,
}
"""``model`` fields read into innerloop's config, with the official default used when absent."""

SPECIAL_TOKEN_DEFAULTS: dict[str, int] = {
    "bos_token_id": OPTIONAL_MODEL_FIELDS["bos_token_id"],
    "eos_token_id": 2,
}
"""The official ``ModelConfig``'s special token ids, read where a config leaves one out."""

TRAINING_DEFAULTS: dict[str, Any] = {
    "train_mode": "pretrain",
    "ilr_warmup_steps": 0,
    "ilr_init": 1.0,
    "total_steps": 2500,
}
"""The official defaults (``ttt.config.TrainingConfig``) of the ``training`` fields the loader reads
that a config may leave out: an absent one is read as the official code reads it."""

INNER_OPTIMIZER_DEFAULTS: dict[str, Any] = {"optimizer_type": "sgd", "lr": 0.01, "clip_gradient": 0.0}
"""The official ``training.optimizer_inner`` when absent, and its fields when left out
(``ttt.config.SGDOptimizerConfig``, its default factory): SGD at lr 0.01, unclipped."""

INNER_PARAMETERS: tuple[str, ...] = ("w1", "w2", "w3")
"""The prime MLP's weights, the fast weights innerloop's E2E model trains at test time."""


class OfficialConfigError(ValueError):
    """An official config or checkpoint that innerloop cannot load as it is; the message names the field."""


# --------------------------------------------------------------------------------------------------
# The config
# --------------------------------------------------------------------------------------------------


def _resolved_where_possible(config: Any) -> Any:
    """``config`` as plain containers, each interpolation ``${...}`` resolved where it resolves outside
    Hydra (``${training.total_steps}``; a config Hydra saved under ``.hydra`` keeps them) and left as
    its text where not (``${hydra:...}``, ``${now:...}``): a field the loader reads then names it."""
    data = OmegaConf.to_container(config, resolve=False)

    def resolve(node: Any, path: tuple[Any, ...]) -> Any:
        if isinstance(node, dict):
            return {k: resolve(v, (*path, k)) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v, (*path, i)) for i, v in enumerate(node)]
        if isinstance(node, str) and "${" in node:
            try:
                value = OmegaConf.select(config, ".".join(map(str, path)), throw_on_resolution_failure=True)
            except Exception:  # an unknown resolver, a missing key, a cycle: kept as written
                return node
            return OmegaConf.to_container(value, resolve=False) if OmegaConf.is_config(value) else value
        return node

    return resolve(data, ())


def read_config(config: Mapping[str, Any] | str | Path) -> dict[str, Any]:
    """The official resolved Hydra config as a dict: ``config`` itself (a mapping, or Hydra's ``DictConfig``,
    read as its YAML file is), or read from a YAML or JSON file.

    It must have the ``model`` and ``training`` sections (``train ... --cfg job --resolve`` prints it;
    Hydra writes it to a run's ``.hydra/config.yaml`` with its interpolations, which are resolved here
    where they resolve outside Hydra).
    """
    # Hydra's own cfg (or a mapping of its sections, {"model": cfg.model, ...}): its lists are ListConfigs
    # and its ${...} resolve as its YAML file's do
    if OmegaConf.is_config(config):
        data: Any = _resolved_where_possible(config)
    elif isinstance(config, Mapping):
        data = {k: _resolved_where_possible(v) if OmegaConf.is_config(v) else v for k, v in config.items()}
    else:
        if not isinstance(config, (str, os.PathLike)):
            raise TypeError(
                "config must be the official resolved Hydra config: a mapping, or the path (str or "
                f"os.PathLike) of its YAML or JSON file; got {type(config).__name__} {config!r:.80}"
            )
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"config {str(path)!r} is not a file (give the resolved Hydra config)")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise OfficialConfigError(
                f"config {str(path)!r} cannot be read: it is not UTF-8 text ({err.reason} at byte {err.start}); "
                "give the resolved Hydra config, a YAML or JSON file"
            ) from None
        try:
            if path.suffix == ".json":
                data = json.loads(text)
            else:  # omegaconf's YAML reader, as Hydra's (``1e-6`` is a number, not a string)
                data = _resolved_where_possible(OmegaConf.create(text))
        except (ValueError, yaml.YAMLError, OmegaConfBaseException) as err:  # JSONDecodeError is a ValueError
            problem = " ".join(str(err).split())
            raise OfficialConfigError(f"config {str(path)!r} cannot be read: {problem}") from None
    if not isinstance(data, Mapping):
        raise OfficialConfigError(f"the official config must be a mapping, got {type(data).__name__}")
    for section in ("model", "training"):
        if section not in data:
            raise OfficialConfigError(
                f"the official config has no {section!r} section; give the resolved Hydra config with its "
                f"'model' and 'training' sections, got keys {sorted(data, key=str)}{_nested_config_hint(data)}"
            )
        if not isinstance(data[section], Mapping):
            raise OfficialConfigError(
                f"the official config's {section!r} section must be a mapping of its fields, got "
                f"{type(data[section]).__name__} {data[section]!r}"
            )
    return dict(data)


def _nested_config_hint(data: Mapping[Any, Any]) -> str:
    """Where in ``data`` (a mapping without the config's sections) a value holds both sections, for the
    error: a record that keeps the resolved config under a key (e.g. a fixture's ``resolved_config_meta``)."""
    holders = [
        key
        for key, value in data.items()
        if isinstance(value, Mapping) and "model" in value and "training" in value
    ]
    return f": its {holders[0]!r} holds one with both; pass that" if holders else ""


def _model_field(model: Mapping[str, Any], key: str, check: Callable[[Any], bool], wanted: str) -> Any:
    """``model[key]``, refused unless ``check`` accepts it."""
    value = model[key]
    if not check(value):
        raise OfficialConfigError(f"model.{key}={value!r} must be {wanted}")
    return value


def _bounded(model: Mapping[str, Any], key: str, ours: str, kind: type, default: Any = None) -> Any:
    """``model[key]`` (``default`` when absent and not None) as a ``kind`` inside the bounds of the
    innerloop field ``ours`` it becomes (:data:`~innerloop.models.config.MODEL_FIELD_BOUNDS`), refused
    naming the official field: building the model would name innerloop's (``model.norm_eps`` for
    ``model.rms_norm_eps``), a key the official config does not have."""
    value = model[key] if default is None else model.get(key, default)
    try:
        return checked_number(f"model.{key}", value, kind, MODEL_FIELD_BOUNDS[f"model.{ours}"])
    except ValueError as err:
        renamed = f" (innerloop's model.{ours})" if ours != key else ""
        raise OfficialConfigError(f"{err}{renamed}") from None


def _integer_at_least(value: Any, least: int) -> bool:
    """Whether ``value`` is an integer >= ``least`` as every integer field is read here (as
    :func:`~innerloop.models.config.checked_number` reads one: numpy's and 0-d integer tensors too)."""
    integer = as_integer(value)
    return integer is not None and integer >= least


def _positive_int(value: Any) -> bool:
    return _integer_at_least(value, 1)


def _finite_number(value: Any) -> bool:
    """Whether ``value`` is a finite real number as :func:`~innerloop.models.config.checked_number` reads
    the model's float fields (numpy's too; not a bool)."""
    return is_real(value)  # 10**400 is none (math.isfinite raised a bare OverflowError on it)


def _check_model_fields(model: Mapping[str, Any]) -> None:
    """Every ``model`` field is known, required ones are given, fixed ones have the supported value."""
    known = {*IGNORED_MODEL_FIELDS, *FIXED_MODEL_FIELDS, *REQUIRED_MODEL_FIELDS, *OPTIONAL_MODEL_FIELDS}
    unknown = sorted(set(model) - known, key=str)
    if unknown:
        raise OfficialConfigError(
            f"model.{unknown[0]} is not a field innerloop knows of the official TTT-E2E config "
            f"(unknown: {unknown}); it may change the model, so it is refused"
        )
    missing = [key for key in REQUIRED_MODEL_FIELDS if key not in model]
    if missing:
        raise OfficialConfigError(
            f"the official config's model section lacks {missing}; give the resolved Hydra config"
        )
    for key, (supported, default, meaning) in FIXED_MODEL_FIELDS.items():
        value = model.get(key, default)
        if key == "state_dtype" and DTYPES.get(value) == "float32":
            value = supported  # "float32" is the official code's other name for "fp32"
        same = (
            value == supported
            and type(value) is type(supported)
            or (isinstance(supported, float) and _finite_number(value) and value == supported)
        )
        if not same:
            raise OfficialConfigError(
                f"model.{key}={value!r} is not supported: innerloop's E2E model has {key}={supported!r} "
                f"({meaning})"
            )


def _suffix_fraction(model: Mapping[str, Any], layers: int) -> float:
    """``suffix_len`` (blocks with a prime MLP) as innerloop's ``suffix_fraction``."""
    suffix = as_integer(
        _model_field(model, "suffix_len", _positive_int, "a positive integer (blocks with a prime MLP)")
    )
    if suffix > layers:
        raise OfficialConfigError(
            f"model.suffix_len={suffix} must be at most model.num_hidden_layers={layers}"
        )
    fraction = suffix / layers
    assert max(1, round(fraction * layers)) == suffix  # innerloop's num_suffix_blocks gives it back
    return fraction


def _inner_optimizer(training: Mapping[str, Any]) -> dict[str, float]:
    """``training.optimizer_inner`` and the inner-lr warm-up as :class:`E2EConfig` fields."""
    inner = training.get("optimizer_inner", INNER_OPTIMIZER_DEFAULTS)
    if not isinstance(inner, Mapping):
        raise OfficialConfigError(f"training.optimizer_inner must be a mapping, got {inner!r}")
    inner = {**INNER_OPTIMIZER_DEFAULTS, **inner}  # as Hydra merges it into SGDOptimizerConfig
    kind = inner["optimizer_type"]
    if kind != "sgd":
        raise OfficialConfigError(
            f"training.optimizer_inner.optimizer_type={kind!r} is not supported: innerloop's E2E inner "
            "step is 'sgd' (clipped by global norm, no momentum)"
        )
    values = {}
    for key, ours in (("lr", "inner_lr"), ("clip_gradient", "inner_grad_clip")):
        value = inner[key]
        if not _finite_number(value) or value < 0:
            raise OfficialConfigError(
                f"training.optimizer_inner.{key}={value!r} must be a finite number >= 0"
            )
        values[ours] = float(value)
    warmup, total = (training.get(key, TRAINING_DEFAULTS[key]) for key in ("ilr_warmup_steps", "total_steps"))
    read = (("ilr_warmup_steps", warmup), ("total_steps", total))
    for key, value in read if _positive_int(warmup) else read[:1]:  # total_steps: read for a warm-up only
        if not _integer_at_least(value, 0):
            unresolved = isinstance(value, str) and "${" in value
            hint = " (an unresolved interpolation: give the config Hydra resolved, --cfg job --resolve)"
            raise OfficialConfigError(
                f"training.{key}={value!r} must be an integer >= 0{hint if unresolved else ''}"
            )
    warmup = as_integer(warmup)
    total = as_integer(total) if warmup >= 1 else total
    start = training.get("ilr_init", TRAINING_DEFAULTS["ilr_init"])
    if not _finite_number(start) or start < 0:
        raise OfficialConfigError(f"training.ilr_init={start!r} must be a finite number >= 0")
    if warmup >= 1 and total < 1:
        raise OfficialConfigError(
            f"training.ilr_warmup_steps={warmup} needs training.total_steps >= 1, got {total!r} (the warm-up "
            "is a share of the outer steps)"
        )
    if warmup >= 1:
        values["inner_lr_start"] = float(start)
        # a warm-up as long as the run is the whole run (1.0, exact). The inner lr stays training.ilr even
        # for a longer warm-up, whose inner lr never reaches it within the run: the official evaluation of
        # a checkpoint (eval_mode, or a finished run) sets the step to 2**31 - 101, past any warm-up, so
        # it runs at the full ilr, which is what the converted model (outer progress 1) must compute;
        # such a warm-up becomes one over the whole run (steeper than the official's, for training on)
        values["inner_lr_warmup_fraction"] = min(warmup / total, 1.0)
    else:
        values["inner_lr_start"] = values["inner_lr"]
        values["inner_lr_warmup_fraction"] = 0.0
    return values


def _spec_matches(spec: list[str], path: list[str]) -> bool:
    """The official ``filter_utils.matches``: ``*`` one name, ``**`` any number (at least one)."""
    if not spec:
        return not path
    if not path:
        return False
    head, rest = spec[0], spec[1:]
    if head == "**":
        return _spec_matches(rest, path[1:]) or _spec_matches(spec, path[1:])
    return (head == "*" or head == path[0]) and _spec_matches(rest, path[1:])


def _selected(specs: list[str], name: str) -> bool:
    """Whether the official spec list selects the parameter ``name`` (later specs win; ``exclude ``)."""
    chosen = False
    for spec in specs:
        exclude = spec.startswith("exclude ")
        pattern = spec.removeprefix("exclude ").split(".")
        if _spec_matches(pattern, name.split(".")):
            chosen = not exclude
    return chosen


def official_parameter_names(model: Mapping[str, Any]) -> list[str]:
    """The names the official code gives the parameters while it trains (prefix and suffix blocks
    split, prime weights inside the suffix blocks), which ``training.spec_inner`` selects from."""
    block = [
        *(f"seq_modeling_block.{w}.weight" for w in ("wq", "wk", "wv", "wo", "q_norm", "k_norm")),
        *(f"feed_forward.{w}.weight" for w in INNER_PARAMETERS),
        *(f"{n}.weight" for n in ("seq_norm", "ffn_norm", "seq_post_norm", "ffn_post_norm")),
    ]
    prime = [
        *(f"feed_forward_prime.{w}.weight" for w in INNER_PARAMETERS),
        "ffn_prime_norm.weight",
        "ffn_prime_post_norm.weight",
    ]
    h = PREFIX + "h."
    names = [PREFIX + "wte.weight", PREFIX + "ln_f.weight"]
    names += [h + "prefix_blocks." + n for n in block] + [h + "suffix_blocks." + n for n in block + prime]
    if not model.get("tie_word_embeddings"):
        names.append("language_model.lm_head.weight")
    return names


def _check_inner_parameters(model: Mapping[str, Any], training: Mapping[str, Any]) -> None:
    """``training.spec_inner`` must select the prime MLPs' weights and nothing else."""
    specs = training.get("spec_inner")
    if not isinstance(specs, list) or not all(isinstance(s, str) for s in specs):
        raise OfficialConfigError(f"training.spec_inner must be a list of strings, got {specs!r}")
    selected = [n for n in official_parameter_names(model) if _selected(specs, n)]
    expected = [f"{PREFIX}h.suffix_blocks.feed_forward_prime.{w}.weight" for w in INNER_PARAMETERS]
    if selected != expected:
        raise OfficialConfigError(
            f"training.spec_inner={specs!r} selects {selected} as the inner (fast) parameters; innerloop's "
            f"E2E model trains exactly the prime MLPs' weights {expected} (e.g. "
            "['language_model.**.suffix_blocks.feed_forward_prime.**'], the official experiments')"
        )


def _shape(model: Mapping[str, Any]) -> dict[str, int]:
    """The ``model`` section's sizes as :class:`ModelConfig` fields."""
    shape = {
        ours: _bounded(model, key, ours, int)
        for key, ours in (
            ("vocab_size", "vocab_size"),
            ("hidden_size", "hidden_size"),
            ("intermediate_size", "intermediate_size"),
            ("num_hidden_layers", "num_layers"),
            ("num_attention_heads", "num_heads"),
            ("sliding_window_size", "window"),
        )
    }
    hidden, heads = shape["hidden_size"], shape["num_heads"]
    if hidden % heads or (hidden // heads) % 2:
        raise OfficialConfigError(
            f"model.hidden_size={hidden} must be divisible by model.num_attention_heads={heads} into heads "
            "of an even width (RoPE rotates pairs of channels)"
        )
    return shape


def _tied_head(model: Mapping[str, Any]) -> bool:
    """``tie_word_embeddings``; an untied head must predict the vocabulary (``output_size``)."""
    tied = _model_field(model, "tie_word_embeddings", lambda v: isinstance(v, bool), "true or false")
    output_size = model.get("output_size")
    if not tied and output_size not in (None, model["vocab_size"]):
        raise OfficialConfigError(
            f"model.output_size={output_size!r} must equal model.vocab_size={model['vocab_size']} for an "
            "untied LM head (innerloop's head predicts the vocabulary)"
        )
    return tied


def _e2e_options(
    model: Mapping[str, Any], training: Mapping[str, Any], layers: int, test_time_training: bool
) -> E2EConfig:
    """The :class:`E2EConfig` of the official config: the official code's choice for every option."""
    chunk = _bounded(model, "mini_batch_size", "e2e.chunk_size", int)
    compute = model.get("compute_dtype", OPTIONAL_MODEL_FIELDS["compute_dtype"])
    if compute in ("fp64", "float64"):  # official names (under jax_enable_x64; float32 without it)
        raise OfficialConfigError(
            f"model.compute_dtype={compute!r} is not supported: a converted model computes in float32, bfloat16 "
            "or float16 with float32 weights; for float64, convert with compute_dtype 'fp32' and call "
            "model.double() (the precision reference: it then computes in float64)"
        )
    if compute not in DTYPES:
        raise OfficialConfigError(f"model.compute_dtype={compute!r} must be one of {sorted(DTYPES)}")
    # The official data pipeline masks the targets that are BOS (document boundaries) out of the loss.
    bos = as_integer(
        _model_field(
            {"bos_token_id": OPTIONAL_MODEL_FIELDS["bos_token_id"], **model},
            "bos_token_id",
            lambda v: as_integer(v) is not None,
            "an integer",
        )
    )
    return E2EConfig(
        chunk_size=chunk,
        suffix_fraction=_suffix_fraction(model, layers),
        prime_intermediate_size=0,
        **_inner_optimizer(training),
        test_time_training=test_time_training,
        chunk_targets="next_token",
        rope_positions="relative",
        skip_target_id=bos if 0 <= bos < model["vocab_size"] else None,
        compute_dtype=DTYPES[compute],
        outer_loss="chunk_mean",
    )


TRAIN_MODES = {"meta": True, "pretrain": False}
"""The official ``training.train_mode`` values and whether each runs test-time training (the official
code raises for any other; absent, it is ``pretrain``)."""


def train_mode_test_time_training(training: Mapping[str, Any]) -> bool:
    """Whether the official config's ``training.train_mode`` runs test-time training."""
    mode = training.get("train_mode", TRAINING_DEFAULTS["train_mode"])
    if mode not in TRAIN_MODES:
        raise OfficialConfigError(
            f"training.train_mode={mode!r} is not one of the official modes {sorted(TRAIN_MODES)} "
            "('meta': test-time training on; 'pretrain': a plain sliding-window Transformer)"
        )
    return TRAIN_MODES[mode]


def special_token_ids(config: Mapping[str, Any] | str | Path) -> dict[str, int]:
    """The official config's ``model.bos_token_id`` and ``model.eos_token_id`` (official defaults 1 and 2,
    :data:`SPECIAL_TOKEN_DEFAULTS`), as token ids: what a Hugging Face export's ``generate`` needs (it
    stops at EOS)."""
    model = read_config(config)["model"]
    ids = {key: model.get(key, default) for key, default in SPECIAL_TOKEN_DEFAULTS.items()}
    for key, value in ids.items():  # a negative id is the official "none" (model_config reads it so)
        if value is not None and as_integer(value) is None:
            raise OfficialConfigError(
                f"model.{key}={value!r} must be an integer (a token id, or < 0 for none) or null"
            )
    return {key: as_integer(value) for key, value in ids.items() if _integer_at_least(value, 0)}


def model_config(config: Mapping[str, Any], *, test_time_training: bool | None = None) -> ModelConfig:
    """innerloop's :class:`ModelConfig` of the official config (see :func:`read_config`); every
    ``model.e2e`` option that differs between the official code and the paper's reading is the
    official code's. ``test_time_training``: None (default) follows ``training.train_mode``, as the
    official code does; True or False overrides it (e.g. a meta-trained checkpoint without its inner
    loop, the ablation). Raises :class:`OfficialConfigError` naming the first field it cannot take."""
    official = read_config(config)
    model, training = official["model"], official["training"]
    if test_time_training is not None and not is_flag(test_time_training):
        raise TypeError(
            f"test_time_training={test_time_training!r} ({type(test_time_training).__name__}) must be True, "
            "False or None (None: the config's training.train_mode decides)"
        )
    mode_says = train_mode_test_time_training(training)
    test_time_training = mode_says if test_time_training is None else bool(test_time_training)
    _check_model_fields(model)
    _check_inner_parameters(model, training)
    shape = _shape(model)
    return ModelConfig(
        mixer="e2e",
        **shape,
        rope_theta=_bounded(model, "rope_theta", "rope_theta", float),
        norm_eps=_bounded(model, "rms_norm_eps", "norm_eps", float, OPTIONAL_MODEL_FIELDS["rms_norm_eps"]),
        tie_embeddings=_tied_head(model),
        init_std=_bounded(
            model, "initializer_range", "init_std", float, OPTIONAL_MODEL_FIELDS["initializer_range"]
        ),
        e2e=_e2e_options(model, training, shape["num_layers"], test_time_training),
    )


# --------------------------------------------------------------------------------------------------
# The weights
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Stacked:
    """One official tensor stacked over blocks: its name under ``h.blocks`` or ``h.prime_storage``,
    innerloop's name in a block, and whether it is stored ``[in, out]`` (transposed for torch)."""

    official: str
    ours: str
    matrix: bool


BLOCK_TENSORS: tuple[_Stacked, ...] = (
    _Stacked("seq_norm.weight", "attn_pre_norm.weight", False),
    _Stacked("seq_modeling_block.q_norm.weight", "attn.q_norm.weight", False),
    _Stacked("seq_modeling_block.k_norm.weight", "attn.k_norm.weight", False),
    _Stacked("seq_modeling_block.wo.weight", "attn.o_proj.weight", True),
    _Stacked("seq_post_norm.weight", "attn_post_norm.weight", False),
    _Stacked("ffn_norm.weight", "mlp_pre_norm.weight", False),
    _Stacked("feed_forward.w1.weight", "mlp.gate_proj.weight", True),
    _Stacked("feed_forward.w3.weight", "mlp.up_proj.weight", True),
    _Stacked("feed_forward.w2.weight", "mlp.down_proj.weight", True),
    _Stacked("ffn_post_norm.weight", "mlp_post_norm.weight", False),
)
QKV: tuple[str, ...] = ("wq", "wk", "wv")
PRIME_TENSORS: tuple[_Stacked, ...] = (
    _Stacked("ffn_prime_norm.weight", "prime_pre_norm.weight", False),
    _Stacked("feed_forward_prime.w1.weight", "prime.gate_proj.weight", True),
    _Stacked("feed_forward_prime.w3.weight", "prime.up_proj.weight", True),
    _Stacked("feed_forward_prime.w2.weight", "prime.down_proj.weight", True),
    _Stacked("ffn_prime_post_norm.weight", "prime_post_norm.weight", False),
)


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The official name and shape of every saved tensor of a model with innerloop config ``config``."""
    _check_innerloop_config(config)
    D, F, V, L = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_layers
    head_dim = D // config.num_heads
    suffix = max(1, round(config.e2e.suffix_fraction * L))
    per_block = {
        "seq_modeling_block.wq.weight": (D, D),
        "seq_modeling_block.wk.weight": (D, D),
        "seq_modeling_block.wv.weight": (D, D),
        "seq_modeling_block.wo.weight": (D, D),
        "seq_modeling_block.q_norm.weight": (head_dim,),
        "seq_modeling_block.k_norm.weight": (head_dim,),
        "feed_forward.w1.weight": (D, F),
        "feed_forward.w3.weight": (D, F),
        "feed_forward.w2.weight": (F, D),
        **{f"{n}.weight": (D,) for n in ("seq_norm", "ffn_norm", "seq_post_norm", "ffn_post_norm")},
    }
    per_prime = {
        "feed_forward_prime.w1.weight": (D, F),
        "feed_forward_prime.w3.weight": (D, F),
        "feed_forward_prime.w2.weight": (F, D),
        "ffn_prime_norm.weight": (D,),
        "ffn_prime_post_norm.weight": (D,),
    }
    shapes = {PREFIX + "wte.weight": (V, D), PREFIX + "ln_f.weight": (D,)}
    shapes.update({f"{PREFIX}h.blocks.{n}": (L, *s) for n, s in per_block.items()})
    shapes.update({f"{PREFIX}h.prime_storage.{n}": (suffix, *s) for n, s in per_prime.items()})
    if not config.tie_embeddings:
        shapes["language_model.lm_head.weight"] = (D, V)
    return shapes


def _check_innerloop_config(config: Any) -> None:
    """A TypeError unless ``config`` is innerloop's :class:`ModelConfig` (the official config is not:
    :func:`model_config` makes one of it)."""
    if not isinstance(config, ModelConfig):
        raise TypeError(
            f"config must be innerloop's ModelConfig of the model, got {type(config).__name__} "
            f"{config!r:.80}: for the official Hydra config, pass model_config(official_config)"
        )


def _check_arrays_mapping(arrays: Any) -> None:
    """A TypeError unless ``arrays`` is a mapping (of the official tensor names to arrays)."""
    if not isinstance(arrays, Mapping):
        raise TypeError(
            "arrays must be a mapping of the official tensor names (e.g. 'language_model.model.wte.weight') "
            f"to numpy arrays or torch tensors, got {type(arrays).__name__} {arrays!r:.80}: for a safetensors "
            "file, pass safetensors.numpy.load_file(path); for an orbax checkpoint folder, use load_model"
        )


def _non_floating_dtype(array: Any) -> str | None:
    """The dtype of ``array`` (a numpy array or torch tensor) if it is not floating point, else None.
    numpy's bfloat16 (``ml_dtypes``, what JAX saves) is floating point, though numpy files it apart."""
    if isinstance(array, torch.Tensor):
        return None if array.is_floating_point() else str(array.dtype)
    dtype = np.asarray(array).dtype
    return None if np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16" else str(dtype)


def _checked_float32(arrays: Mapping[str, np.ndarray], config: ModelConfig) -> dict[str, np.ndarray]:
    """Every tensor the config implies is there, with its shape, floating point and finite as the float32
    the model holds; nothing else is. Returns them in float32 (converted once, here)."""
    _check_arrays_mapping(arrays)
    shapes = expected_shapes(config)
    missing = sorted(set(shapes) - set(arrays))
    if missing and len(missing) == len(shapes):  # another folder: the optimizer state, another model
        held = sorted(arrays, key=str)
        holds = f"{len(held)}: {_few(held)}" if held else "none"
        raise OfficialConfigError(
            f"the checkpoint holds none of the model's {len(shapes)} arrays (e.g. {missing[0]!r}); it holds "
            f"{holds}: is it the model_weights of an official checkpoint (not its opt_state), and does the "
            "config belong to it?"
        )
    if missing:
        raise OfficialConfigError(f"the checkpoint lacks {missing} (does the config belong to it?)")
    extra = sorted(set(arrays) - set(shapes), key=str)
    if extra:
        raise OfficialConfigError(
            f"the checkpoint has tensors the config does not describe: {extra} (does the config belong to it?)"
        )
    values: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        if not (hasattr(arrays[name], "shape") and hasattr(arrays[name], "dtype")):  # numpy, torch, jax
            raise OfficialConfigError(
                f"checkpoint tensor {name} is {a_type(arrays[name])}, not an array (a numpy array or "
                "torch tensor)"
            )
        got = tuple(arrays[name].shape)
        if got != shape:
            raise OfficialConfigError(
                f"checkpoint tensor {name} has shape {list(got)}, the config implies {list(shape)} "
                "(does the config belong to it?)"
            )
        dtype = _non_floating_dtype(arrays[name])
        if dtype is not None:
            raise OfficialConfigError(
                f"checkpoint tensor {name} has dtype {dtype}; the weights are floating point "
                "(float16, bfloat16, float32 or float64)"
            )
        if isinstance(arrays[name], torch.Tensor) and arrays[name].is_meta:
            raise OfficialConfigError(
                f"checkpoint tensor {name} is on the meta device: it has a shape but no values (a model built "
                "under torch.device('meta')); pass the tensors that hold the weights"
            )
        values[name] = _as_numpy(arrays[name])
        if not np.isfinite(values[name]).all():  # what the model will hold: overflow shows
            stored = _as_numpy(arrays[name], np.float64)
            if not np.isfinite(stored).all():
                raise OfficialConfigError(f"checkpoint tensor {name} has non-finite values")
            raise OfficialConfigError(
                f"checkpoint tensor {name} has values up to {float(np.abs(stored).max()):.3g} in magnitude, "
                f"beyond float32's largest ({float(np.finfo(np.float32).max):.3g}), which the model's weights "
                "are: they would load as inf"
            )
    return values


def _few(names: list[str], shown: int = 3) -> str:
    """The first ``shown`` of ``names`` for a message, and how many more."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(repr(name) for name in names[:shown]) + more


def _as_numpy(array: Any, dtype: Any = np.float32) -> np.ndarray:
    """``array`` (a numpy array of any floating dtype, bfloat16 included, or a torch tensor) as a numpy
    array of ``dtype`` (values beyond its range become inf, without numpy's warning)."""
    if isinstance(array, torch.Tensor):
        array = array.detach().to("cpu", torch.float64).numpy()
    with np.errstate(over="ignore"):
        return np.asarray(array, dtype=dtype)


def convert_weights(arrays: Mapping[str, np.ndarray], config: ModelConfig) -> dict[str, torch.Tensor]:
    """The official tensors (orbax names, e.g. ``language_model.model.h.blocks.feed_forward.w1.weight``
    stacked over blocks, weights ``[in, out]``) as an :class:`E2ELM` state dict (float32)."""
    checked = _checked_float32(arrays, config)

    def tensor(name: str) -> torch.Tensor:
        return torch.from_numpy(checked[name].copy())  # a copy: never a view of the caller's arrays

    blocks, primes = PREFIX + "h.blocks.", PREFIX + "h.prime_storage."
    state = {"embed.weight": tensor(PREFIX + "wte.weight"), "norm.weight": tensor(PREFIX + "ln_f.weight")}
    state["lm_head.weight"] = (
        state["embed.weight"] if config.tie_embeddings else tensor("language_model.lm_head.weight").T
    )
    stacked = {t.official: tensor(blocks + t.official) for t in BLOCK_TENSORS}
    qkv = [tensor(f"{blocks}seq_modeling_block.{w}.weight") for w in QKV]  # each [L, in, out]
    for i in range(config.num_layers):
        for t in BLOCK_TENSORS:
            value = stacked[t.official][i]
            state[f"blocks.{i}.{t.ours}"] = value.T if t.matrix else value
        state[f"blocks.{i}.attn.qkv_proj.weight"] = torch.cat([w[i].T for w in qkv])  # [3D, D]
    suffix = arrays[primes + PRIME_TENSORS[0].official].shape[0]
    for t in PRIME_TENSORS:
        values = tensor(primes + t.official)
        for s in range(suffix):
            state[f"blocks.{config.num_layers - suffix + s}.{t.ours}"] = (
                values[s].T if t.matrix else values[s]
            )
    return {name: value.contiguous() for name, value in state.items()}


def model_from_arrays(
    arrays: Mapping[str, np.ndarray],
    config: Mapping[str, Any] | str | Path,
    *,
    test_time_training: bool | None = None,
) -> E2ELM:
    """The :class:`E2ELM` of the official tensors ``arrays`` (by their orbax names) and config
    (``test_time_training``: see :func:`model_config`)."""
    _check_arrays_mapping(arrays)
    ours = model_config(config, test_time_training=test_time_training)
    state = convert_weights(arrays, ours)  # checked before the model is allocated
    model = build_model(ours)
    assert isinstance(model, E2ELM)
    state["outer_progress"] = torch.ones((), dtype=torch.float64)  # trained: the full inner lr
    model.load_state_dict(state, strict=True)
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Orbax
# --------------------------------------------------------------------------------------------------


def _tensorstore() -> Any:
    try:
        import tensorstore
    except ImportError as err:
        raise ImportError(
            f"reading an orbax checkpoint needs the tensorstore package: {EXTRA_INSTALL} ({err})"
        ) from None
    return tensorstore


def weights_folder(checkpoint_dir: str | Path) -> Path:
    """The ``model_weights`` folder of an official checkpoint: ``checkpoint_dir`` is a step folder
    (``.../checkpoint/<step>``), its parent (the latest step is taken; one without a complete
    ``model_weights``, a partly copied step, is refused, not passed over) or the ``model_weights``
    folder itself."""
    if not isinstance(checkpoint_dir, (str, os.PathLike)):
        raise TypeError(
            "checkpoint_dir must be the path (str or os.PathLike) of an official checkpoint folder, got "
            f"{type(checkpoint_dir).__name__} {checkpoint_dir!r:.80}"
        )
    if not str(checkpoint_dir):  # Path("") would be the current directory, which was never named
        raise ValueError("checkpoint_dir '' is empty: give the official checkpoint folder")
    root = Path(checkpoint_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint {str(root)!r} is not a folder")
    if (root / "_METADATA").is_file():
        return root
    if (root / "model_weights" / "_METADATA").is_file():
        return root / "model_weights"
    steps = [p for p in root.iterdir() if re.fullmatch(r"\d+", p.name) and p.is_dir()]
    if not any((p / "model_weights").is_dir() for p in steps):
        raise FileNotFoundError(
            f"{str(root)!r} is not an official checkpoint: no model_weights/_METADATA in it, and no step "
            "folders (<step>/model_weights) under it"
        )
    latest = max(steps, key=lambda p: int(p.name))
    # every official save has model_weights: a latest step without them is a partly copied one, refused
    # rather than passed over for the step before it (an older model, loaded without a word)
    if not (latest / "model_weights").is_dir():
        raise FileNotFoundError(
            f"{str(latest)!r} has no model_weights folder (a partly copied checkpoint?): copy it whole, or "
            "name the step folder to read"
        )
    if not (latest / "model_weights" / "_METADATA").is_file():
        raise FileNotFoundError(f"{str(latest / 'model_weights')!r} has no _METADATA (an unfinished save?)")
    return latest / "model_weights"


def _orbax_metadata(folder: Path) -> dict[str, Any]:
    """``folder/_METADATA``, orbax's description of the saved tree."""
    path = folder / "_METADATA"
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise OfficialConfigError(f"{str(path)!r} is not orbax's metadata (JSON): {err}") from None
    if not isinstance(metadata, dict) or not isinstance(metadata.get("tree_metadata"), dict):
        raise OfficialConfigError(f"{str(path)!r} has no 'tree_metadata': not an orbax checkpoint's metadata")
    return metadata


def _array_names(metadata: Mapping[str, Any], path: Path) -> list[str]:
    """The dotted names of the arrays orbax saved (from its ``_METADATA``, read from ``path``); an entry
    not in orbax's form (``key_metadata``: a list of ``{"key": ...}``) is refused, naming it."""
    names = []
    for leaf, entry in metadata["tree_metadata"].items():
        value = entry.get("value_metadata") if isinstance(entry, dict) else None
        keys = entry.get("key_metadata") if isinstance(entry, dict) else None
        if not isinstance(value, (dict, type(None))) or not (
            isinstance(keys, list) and keys and all(isinstance(k, dict) and "key" in k for k in keys)
        ):
            raise OfficialConfigError(
                f"{str(path)!r} is not orbax's metadata: its tree_metadata entry {leaf!r} is {entry!r}, "
                "not {'key_metadata': [{'key': ...}, ...], 'value_metadata': {...}}"
            )
        if (value or {}).get("skip_deserialize", False):
            continue  # a None leaf (e.g. a norm without bias)
        names.append(".".join(str(key["key"]) for key in keys))
    return names


def read_orbax_weights(checkpoint_dir: str | Path) -> dict[str, np.ndarray]:
    """Every array of an official checkpoint's ``model_weights`` (see :func:`weights_folder`), by its
    dotted name, as numpy arrays of their stored dtype (:func:`model_from_arrays` refuses one that is not
    floating point and converts the others to float32). Needs ``tensorstore``; reads OCDBT and plain
    zarr layouts. A chunk of an array that is missing is refused, naming the array, where the metadata
    says orbax stored every chunk (``store_array_data_equal_to_fill_value``, what orbax writes)."""
    tensorstore = _tensorstore()
    folder = weights_folder(checkpoint_dir).resolve()
    metadata = _orbax_metadata(folder)
    driver = "zarr3" if metadata.get("use_zarr3") else "zarr"
    ocdbt = (folder / "manifest.ocdbt").is_file()
    # An orbax that stores every chunk (its metadata says so) left none out: a missing one is a damaged
    # or partly copied checkpoint, refused, not read as the fill value 0 (a model with zeroed weights).
    # One that skips chunks equal to the fill value (the flag false, or absent: an older orbax) did.
    every_chunk_stored = metadata.get("store_array_data_equal_to_fill_value") is True
    arrays = {}
    for name in _array_names(metadata, folder / "_METADATA"):
        if ocdbt:
            kvstore = {"driver": "ocdbt", "base": folder.as_uri(), "path": name}
        else:
            kvstore = {"driver": "file", "path": str(folder / name)}
        spec = {"driver": driver, "kvstore": kvstore, "fill_missing_data_reads": not every_chunk_stored}
        try:
            store = tensorstore.open(spec, open=True, read=True).result()
            arrays[name] = np.asarray(store.read().result())  # its stored dtype: checked by the caller
        except ValueError as err:  # tensorstore's errors: a missing or damaged array
            message = str(err).split(" [tensorstore_spec=")[0]
            raise OfficialConfigError(
                f"checkpoint array {name} in {str(folder)!r} cannot be read: {message}"
            ) from None
    return arrays


def load_model(
    checkpoint_dir: str | Path,
    config: Mapping[str, Any] | str | Path,
    *,
    test_time_training: bool | None = None,
) -> E2ELM:
    """An official TTT-E2E checkpoint as an innerloop :class:`E2ELM` (float32 weights, eval mode).

    Args:
        checkpoint_dir: ``.../checkpoint/<step>``, or its parent (the latest step is read).
        config: the official resolved Hydra config (a dict, Hydra's ``DictConfig``, or a YAML/JSON file): its ``model`` section
            and the ``training`` section's ``optimizer_inner``, ``spec_inner`` and inner-lr warm-up.
        test_time_training: None (default) follows the config's ``training.train_mode`` (``meta``: on;
            ``pretrain``: the plain model, every block chunk by chunk, prime MLPs frozen); True or
            False overrides it.

    ``logits, state = model(input_ids)`` are the official logits; for inference run it under
    ``torch.no_grad()``, else autograd keeps the inner steps' second-order graph (memory that grows
    with the length). The config is checked before the weights are read; a tensor refused once read
    (another shape, missing, extra, non-finite) is named with the ``model_weights`` folder it came from.
    """
    model_config(config, test_time_training=test_time_training)  # refuse a bad config before reading
    folder = weights_folder(checkpoint_dir).resolve()
    arrays = read_orbax_weights(folder)
    try:
        return model_from_arrays(arrays, config, test_time_training=test_time_training)
    except OfficialConfigError as err:  # a tensor refused once read: say which checkpoint holds it
        raise OfficialConfigError(f"checkpoint {str(folder)!r}: {err}") from None
