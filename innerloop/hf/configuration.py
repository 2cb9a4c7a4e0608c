"""``InnerloopConfig``: a Hugging Face ``PreTrainedConfig`` that carries innerloop's whole
:class:`~innerloop.models.ModelConfig`.

The innerloop config is stored as one nested dict under ``model`` in ``config.json``; it is checked
with :func:`~innerloop.models.config.validate_model_config` when the config is built or loaded, so a
bad ``config.json`` gets the same one-line error as a bad run config. The attributes transformers'
tools read (``vocab_size``, ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``,
``tie_word_embeddings``) are views of it: setting one sets the key it views (``config.hidden_size =
64`` is ``config.model = {"hidden_size": 64}``, checked as that is): there is one source of truth.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from transformers import PreTrainedConfig

from innerloop.checkpoints import (
    check_plugin_records,
    check_token_index_record,
    missing_config_keys,
    missing_plugins_note,
    saved_model_config,
)
from innerloop.core.callers import warning_stacklevel
from innerloop.hf.arguments import check_flag
from innerloop.models.config import (
    E2E_CHECK_OPTIONS,
    ModelConfig,
    validate_model_config,
    with_earlier_defaults,
)

MODEL_TYPE = "innerloop"
"""The ``model_type`` of innerloop's Hugging Face config (what ``AutoConfig`` looks up)."""

_DERIVED = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
}
"""transformers' attribute name -> the ModelConfig field it views."""

_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
"""transformers' special token ids, checked against the vocabulary (:meth:`InnerloopConfig.check_special_token_ids`)."""

_PENDING = "_innerloop_pending_views"
"""The instance attribute holding the views an ``update`` sets, until it sets them together."""


_built = False
_on_first_build: list[Callable[[], None]] = []


def when_first_built(action: Callable[[], None]) -> None:
    """Run ``action`` now if an ``InnerloopConfig`` has been built in this process, or else right
    after the first one is (the Auto classes' model registration waits for this: hook.py)."""
    if _built:
        action()
    else:
        _on_first_build.append(action)


def _first_built() -> None:
    global _built
    if _built:
        return
    _built = True
    while _on_first_build:
        _on_first_build.pop(0)()


def model_config_from(model: Any) -> ModelConfig:
    """The validated :class:`ModelConfig` of ``model`` (a ModelConfig, a nested dict, or None for the
    defaults); raise ``ValueError`` naming the field, the value and what is valid."""
    if model is not None and not isinstance(model, (ModelConfig, dict)):
        raise ValueError(
            f"InnerloopConfig.model must be innerloop's model config as a mapping (config.json's "
            f"'model' section), got {type(model).__name__}: {model!r}"
        )
    try:
        if model is None:
            config = ModelConfig()
        else:  # a copy, also of a ModelConfig: the config owns its own
            config = ModelConfig.from_dict(model.to_dict() if isinstance(model, ModelConfig) else model)
        validate_model_config(config)
    except (TypeError, ValueError) as err:  # TypeError: a section that is not a mapping of its keys
        raise ValueError(f"InnerloopConfig (config.json 'model' section): {err}") from None
    return config


def _derived_disagreement(name: str, given: Any, config: ModelConfig) -> str:
    """Why transformers' ``name`` (one of :data:`_DERIVED`), given as ``given``, is refused beside the
    'model' section ``config``: it is read from there, where it may be set (suggested only where the model
    section with it is valid, so that a suggestion never repeats an invalid value)."""
    field_name = _DERIVED[name]
    current = f"model.{field_name}={getattr(config, field_name)!r}"
    try:
        model_config_from({**config.to_dict(), field_name: given})
    except ValueError as err:
        reason = str(err).split(": ", 1)[-1]  # without model_config_from's prefix
        return (
            f"InnerloopConfig: {name}={given!r} is not a valid model.{field_name} ({reason}); {name} is "
            f"read from the 'model' section ({current}): remove it, or set a valid value there"
        )
    return (
        f"InnerloopConfig: {name}={given!r} disagrees with {current}; {name} is read from the 'model' "
        f"section, set it there (model={{{field_name!r}: {given!r}}})"
    )


def _loaded_model_section(model: Any) -> Any:
    """config.json's ``model`` section read as a saved model config is: E2E options added since an
    export was written get the values its model used then, ``model.family`` keys its member never read
    go back to their defaults (older exports recorded them; a warning names them), and any other key
    that is missing, which takes today's default, is named in a warning (innerloop writes every key: the
    file was edited, or written by another version), but for the E2E options that change no number the
    model computes (:data:`~innerloop.models.config.E2E_CHECK_OPTIONS`)."""
    if not isinstance(model, dict):
        return model  # refused, naming it, when the config is built
    model = saved_model_config("config.json", with_earlier_defaults(model))
    checks_only = {f"model.e2e.{key}" for key in E2E_CHECK_OPTIONS}  # the same model whatever their value
    missing = [key for key in missing_config_keys(model, ModelConfig().to_dict()) if key not in checks_only]
    if missing:
        warnings.warn(
            f"config.json's 'model' section lacks {', '.join(missing)}: loaded with today's defaults for them "
            "(innerloop writes every key; an edited file, or one from another version, may describe "
            "another model)",
            UserWarning,
            stacklevel=warning_stacklevel(),
        )
    return model


def _merged_model_section(loaded: Any, override: Any) -> Any:
    """``override`` (keyword ``model=`` of ``from_pretrained``) merged key by key into the loaded
    ``model`` section, as transformers merges a dict into a sub-config; anything but two mappings is
    left to the validation to name."""
    if not isinstance(override, dict) or not isinstance(loaded, dict):
        return override
    merged = dict(loaded)
    for key, value in override.items():
        both_mappings = isinstance(value, dict) and isinstance(loaded.get(key), dict)
        merged[key] = _merged_model_section(loaded[key], value) if both_mappings else value
    return merged


def _as_mapping(model: Any) -> dict[str, Any]:
    """A ``model`` section as a mapping (an empty one for anything else, which the checks refuse)."""
    return model if isinstance(model, dict) else {}


WEIGHTS_DTYPE_NAMES = ("float32", "bfloat16", "float16", "float64")
"""The names config.json's ``dtype`` (``torch_dtype``) may give the weights' dtype by."""


def recorded_weights_dtype(field_name: str, value: Any) -> Any:
    """config.json's ``dtype`` (or ``torch_dtype``, ``field_name``) as transformers' config reads it:
    ``"auto"`` -- ``from_pretrained``'s word for the weights' own dtype -- is None, a config recording
    none (transformers then loads the weights as stored); another name must be one of a floating torch
    dtype (``ValueError`` naming the field, the value and :data:`WEIGHTS_DTYPE_NAMES`: transformers' own
    ``getattr(torch, name)`` said only "module 'torch' has no attribute ..."). A ``torch.dtype``, a
    mapping (transformers' per-module dtypes) and None pass as they are."""
    if value == "auto":
        return None
    if isinstance(value, str):
        dtype = getattr(torch, value, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(
                f"InnerloopConfig: {field_name}={value!r} (config.json's) names no floating torch dtype; "
                f"the weights' dtype is one of {list(WEIGHTS_DTYPE_NAMES)}, 'auto' (the weights' own) or null"
            )
    return value


_INNERLOOP_KEYS = ("innerloop_plugin_sources", "innerloop_plugins", "innerloop_token_index_dtype")
"""The config.json keys of innerloop's own prefix that :class:`InnerloopConfig` reads (``model`` aside)."""


def _refuse_unknown_innerloop_keys(kwargs: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming each key of innerloop's prefix in ``kwargs`` (config.json's other keys)
    that innerloop does not read: a misspelt record would be dropped, and the model loaded otherwise
    (a float64 model's token index) or unchecked (its plugins). Other unknown keys stay attributes, as
    transformers keeps them for its own models."""
    unknown = sorted(key for key in kwargs if key.startswith("innerloop_"))
    if unknown:
        raise ValueError(
            f"InnerloopConfig: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
            f"(config.json edited by hand, or misspelt?); innerloop reads {', '.join(_INNERLOOP_KEYS)} and "
            "'model'"
        )


class InnerloopConfig(PreTrainedConfig):
    """The configuration of :class:`~innerloop.hf.modeling.InnerloopForCausalLM`.

    Args:
        model: innerloop's :class:`~innerloop.models.ModelConfig`, or the same as a nested dict (as
            in ``config.json``); None gives the defaults. Checked at once: unknown keys, wrong types,
            unregistered plugin names and impossible shapes raise ``ValueError``.
        innerloop_plugins: where each plugin the model uses came from when the folder was saved
            (:func:`innerloop.checkpoints.plugin_record`, written by ``save_pretrained``);
            ``from_pretrained`` warns when another plugin (another distribution, version or class:
            :func:`innerloop.checkpoints.same_plugin`) is registered now under one of those names.
            None: not recorded (a config built in Python, an older export).
        innerloop_plugin_sources: the SHA-256 of the source of each plugin not built in that the model
            uses, when the folder was saved (:func:`innerloop.checkpoints.plugin_sources`, written by
            ``save_pretrained``; a training checkpoint's :data:`innerloop.checkpoints.PLUGIN_SOURCES_KEY`):
            ``from_pretrained`` warns when the same plugin's source differs now. A plugin whose source
            cannot be read records none. None: not recorded (a config built in Python, an older export).
        innerloop_token_index_dtype: the dtype in which the saved float64 model's TTT layers made their
            token index ``1 / (i + 1)``, which the model built from this config makes again where it is
            float64 (``InnerloopForCausalLM(config)``, ``from_config``, ``from_pretrained``): ``"float32"``
            (rounded and widened: a float32 model cast, as a ``64-true`` run's is), ``"float64"`` (exact), or a
            list of these, one per TTT layer, for a model mixing both (written by ``save_pretrained``;
            the record a checkpoint keeps, :data:`innerloop.checkpoints.TOKEN_INDEX_KEY`). None: made in
            the model's dtype, as the reference's ``from_pretrained`` makes it.
        **kwargs: the usual ``PreTrainedConfig`` options (token ids, ``use_cache`` ...).

    >>> config = InnerloopConfig(model={"mixer": "swa", "hidden_size": 32, "num_heads": 2})
    >>> config.model_config.window, config.hidden_size
    (64, 32)
    """

    model_type = MODEL_TYPE

    model: dict[str, Any] | None = None
    innerloop_plugins: dict[str, Any] | None = None
    innerloop_plugin_sources: dict[str, Any] | None = None
    innerloop_token_index_dtype: str | list[str | None] | None = None
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        _first_built()  # the Auto model class is registered once a config exists (hook.py)
        config = model_config_from(self.model)
        self.model = config.to_dict()
        for name in _DERIVED:
            given = kwargs.pop(name, None)
            if given is not None and given != getattr(config, _DERIVED[name]):
                raise ValueError(_derived_disagreement(name, given, config))
        given_tie = kwargs.pop("tie_word_embeddings", None)
        if given_tie is not None and given_tie != self.tie_word_embeddings:
            raise ValueError(
                f"InnerloopConfig: tie_word_embeddings={given_tie!r} disagrees with the 'model' section "
                f"(model.tie_embeddings={config.tie_embeddings!r}, mixer={config.mixer!r}); set "
                "model.tie_embeddings instead"
            )
        _refuse_unknown_innerloop_keys(kwargs)
        self.dtype = recorded_weights_dtype("dtype", self.dtype)
        if "torch_dtype" in kwargs:  # transformers' older name: it takes it where dtype is None
            kwargs["torch_dtype"] = recorded_weights_dtype("torch_dtype", kwargs["torch_dtype"])
        super().__post_init__(**kwargs)
        check_flag("InnerloopConfig: use_cache", self.use_cache)  # "false" would read as true
        self.check_special_token_ids()
        check_token_index_record(
            self.innerloop_token_index_dtype, "InnerloopConfig: innerloop_token_index_dtype"
        )
        check_plugin_records("InnerloopConfig", self.innerloop_plugins, self.innerloop_plugin_sources)

    def check_special_token_ids(self) -> None:
        """``bos_token_id``, ``eos_token_id`` and ``pad_token_id`` (transformers' fields) are None or
        token ids of this model (``eos_token_id`` may be a list of them): a string or an id past the
        vocabulary would fail later, in generate, far from config.json."""
        vocab = self.model["vocab_size"]  # type: ignore[index]
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name, None)
            ids = value if isinstance(value, list) and name == "eos_token_id" else [value]
            if value is not None and not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab for i in ids
            ):
                raise ValueError(
                    f"InnerloopConfig: {name}={value!r} must be a token id in [0, {vocab}) (model.vocab_size)"
                    + (", a list of them" if name == "eos_token_id" else "")
                    + ", or null"
                )

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        """transformers' ``from_dict`` (what ``from_pretrained`` and ``AutoConfig`` build a loaded
        ``config.json`` with), refusing first a config of another ``model_type`` and one without its
        ``model`` section (which would otherwise become the default model, and then fail on every weight).
        """
        if not isinstance(config_dict, Mapping):  # a config.json holding a list, a number, or null
            raise ValueError(
                "InnerloopConfig: config.json must hold a JSON object (innerloop's config, as `innerloop "
                f"export` or save_pretrained writes it), got {type(config_dict).__name__}"
            )
        model_type = config_dict.get("model_type")
        if model_type is not None and model_type != MODEL_TYPE:
            how = (  # the reference's TTTForCausalLM: transformers has no class for it, innerloop converts it
                "convert it first: `innerloop convert ttt-lm-pytorch SRC OUT --format hf`, then load OUT"
                if model_type == "ttt"
                else "load it with AutoModelForCausalLM / AutoConfig (or that model's own classes)"
            )
            raise ValueError(
                f"config.json has model_type={model_type!r}, not {MODEL_TYPE!r}: it describes a "
                f"{model_type} model, which innerloop's classes cannot load; {how}"
            )
        if not config_dict:  # what transformers reads for a folder without config.json
            raise ValueError(
                "InnerloopConfig: the folder holds no config.json, or an empty one: give a folder that "
                "`innerloop export` or save_pretrained wrote (a training run's last.safetensors becomes one "
                "with `innerloop export`)"
            )
        if config_dict.get("model") is None:
            raise ValueError(
                "InnerloopConfig: config.json has no 'model' section (innerloop's model config, e.g. "
                '"model": {"hidden_size": 768, ...}), or it is null; every folder innerloop writes has '
                f"one (keys found: {sorted(config_dict)})"
            )
        config_dict = {**config_dict, "model": _loaded_model_section(config_dict["model"])}
        if "model" in kwargs:  # a partial override: its keys replace the loaded ones, the rest stay
            config_dict["model"] = _merged_model_section(config_dict["model"], kwargs.pop("model"))
        for name in (*_DERIVED, "tie_word_embeddings"):  # views: checked against the section, as in __init__
            if name in kwargs:
                config_dict[name] = kwargs.pop(name)
        try:
            return super().from_dict(config_dict, **kwargs)
        except ValueError as err:  # a plugin name not registered here: say where it came from
            missing = missing_plugins_note(
                config_dict.get("innerloop_plugins"), _as_mapping(config_dict["model"])
            )
            if not missing:
                raise
            raise ValueError(f"{' '.join(str(err).split()).rstrip('.')}; {missing}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        """Keep ``model`` a validated, complete model config whenever it is assigned (transformers sets
        attributes directly: ``from_pretrained``'s keyword overrides, ``config.update``). A mapping
        assigned to a built config changes the keys it names and keeps the others, as
        ``from_pretrained(model=...)`` does; a :class:`ModelConfig` replaces the whole section. The
        views of it (``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``, ``vocab_size``,
        ``tie_word_embeddings``) set the key they view: ``config.hidden_size = 64``, ``config.update``
        and ``update_from_string`` (run_clm.py's ``--config_overrides``) change the model section."""
        current = self.__dict__.get("model")
        viewed = _DERIVED.get(name, "tie_embeddings" if name == "tie_word_embeddings" else None)
        pending = self.__dict__.get(_PENDING)
        if viewed is not None and pending is not None:  # inside update: set with the others at its end
            pending[viewed] = value
            return
        if viewed is not None and isinstance(current, dict):
            name, value = "model", {viewed: value}
        if name == "model" and isinstance(value, dict) and isinstance(current, dict):
            value = _merged_model_section(current, value)
        if name == "model" and value is not None:
            value = model_config_from(value).to_dict()
        before = self.__dict__.get(name, _PENDING)
        super().__setattr__(name, value)
        if isinstance(current, dict) and pending is None and name in ("model", *_TOKEN_IDS):
            try:  # a vocabulary cut below a token id saved a config.json that from_pretrained refused
                self.check_special_token_ids()
            except ValueError:
                super().__setattr__(name, before) if before is not _PENDING else self.__dict__.pop(name)
                raise

    def update(self, config_dict: dict[str, Any]) -> None:
        """transformers' ``update``, with the views (``hidden_size``, ``num_attention_heads``, ...) it
        names set together, once its other attributes are: ``{"hidden_size": 30, "num_attention_heads":
        3}`` from 64 and 4 was refused (30 with 4 heads, or 64 with 3, is no model), and a token id checked
        against the vocabulary given beside it."""
        with self._views_together():
            super().update(config_dict)

    def update_from_string(self, update_str: str) -> None:
        """transformers' ``update_from_string`` (run_clm.py's ``--config_overrides``), with the views it
        names set together, as :meth:`update` sets them."""
        with self._views_together():
            super().update_from_string(update_str)

    @contextlib.contextmanager
    def _views_together(self) -> Iterator[None]:
        """The views set inside the block are held and set as one change of ``model`` at its end; the
        special token ids are checked then. When the block or that change raises, every attribute is put
        back as it was (``update({"use_cache": False, "hidden_size": 30})`` refused, left ``use_cache``
        False: an error left half the update in place)."""
        if _PENDING in self.__dict__:  # nested: the outer block sets them
            yield
            return
        before = dict(self.__dict__)  # the attributes are replaced, never changed in place (model too)
        self.__dict__[_PENDING] = {}
        try:
            yield
            pending = self.__dict__.pop(_PENDING)
            if pending or isinstance(self.__dict__.get("model"), dict):
                # (set again where no view changed: the token ids are checked)
                self.model = pending if pending else self.model
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(before)
            raise

    @property
    def model_config(self) -> ModelConfig:
        """innerloop's :class:`~innerloop.models.ModelConfig` (a fresh, validated copy)."""
        return ModelConfig.from_dict(self.model)  # type: ignore[arg-type]

    @property
    def vocab_size(self) -> int:
        """Size of the token vocabulary (``model.vocab_size``)."""
        return self.model["vocab_size"]  # type: ignore[index]

    @property
    def hidden_size(self) -> int:
        """Model width (``model.hidden_size``)."""
        return self.model["hidden_size"]  # type: ignore[index]

    @property
    def num_hidden_layers(self) -> int:
        """Number of blocks (``model.num_layers``)."""
        return self.model["num_layers"]  # type: ignore[index]

    @property
    def num_attention_heads(self) -> int:
        """Heads of each mixer (``model.num_heads``)."""
        return self.model["num_heads"]  # type: ignore[index]

    @property
    def tie_word_embeddings(self) -> bool:
        """Whether the LM head shares the embedding's weights: ``model.tie_embeddings``, for every mixer
        (transformers ties the two on load when this says so)."""
        return bool(self.model["tie_embeddings"])  # type: ignore[index]
