"""Configuration of a causal language model: plain dataclasses, also usable as omegaconf schemas.

Every field has a type omegaconf understands (str, int, float, bool), so the same classes are the
model's constructor arguments, the ``model`` section of a run's YAML config and the hyperparameters
saved in a checkpoint. Plugin names (``inner_model``, ``inner_loss``, ``update_rule``) are checked
against the registry by :func:`validate_model_config`, before anything is built.
"""

from __future__ import annotations

import difflib
import math
import numbers
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import torch
from torch import nn

from innerloop.core.callers import warning_stacklevel
from innerloop.core.family_layers import FAMILY_LAYERS
from innerloop.core.functional import FLOAT32_MAX, as_integer
from innerloop.core.layer import (
    DEFAULT_CONV_KERNEL,
    MAX_CONV_KERNEL,
    MAX_MINI_BATCH_SIZE,
    MAX_NORM_EPS,
    NORM_EPS_BOUND_WHY,
    TTTLayer,
    check_inner_norm_width,
    check_layer_arguments,
    check_weights_fit,
    is_real,
)
from innerloop.models.attention import CausalSelfAttention
from innerloop.registry import available, get_registry
from innerloop.registry.kinds import KINDS

E2E: str = "e2e"
"""``model.mixer`` of the TTT-E2E model: not a block's mixer but a model of its own (sliding-window
attention whose prime MLPs learn at test time, options in :class:`E2EConfig`), built by
:func:`innerloop.models.build_model`."""

E2E_CHECKPOINTING_REFUSED = (
    "the TTT-E2E model does not support activation (gradient) checkpointing. Its inner loop takes the "
    "gradient of each chunk's loss inside the forward, which unpacks the suffix blocks' saved tensors at "
    "once, so they are kept under a checkpoint anyway (nothing saved), and a recomputation would run the "
    "inner steps again; train it without checkpointing"
)
"""Why :class:`~innerloop.models.E2ELM` refuses activation checkpointing (its method, the run key, the
Hugging Face model)."""

BACKBONES: tuple[str, ...] = ("transformer", "mamba")
"""The paper's two backbones. ``mamba`` adds the pre-conv residual to every block and turns on
``share_qk`` and the output gate of the TTT layer; ``transformer`` uses neither."""

# The paper's model shapes (hidden, layers, heads, MLP width). The paper uses the Llama tokenizer
# (32k vocabulary); innerloop's models are byte-level (vocabulary 256) unless configured otherwise,
# so the same shapes have fewer embedding parameters.
MODEL_SIZES: dict[str, dict[str, int]] = {
    "125m": {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "intermediate_size": 2048},
    "350m": {"hidden_size": 1024, "num_layers": 24, "num_heads": 16, "intermediate_size": 2736},
    "760m": {"hidden_size": 1536, "num_layers": 24, "num_heads": 16, "intermediate_size": 4096},
    "1.3b": {"hidden_size": 2048, "num_layers": 24, "num_heads": 32, "intermediate_size": 5504},
}


@dataclass
class TTTConfig:
    """Options of the TTT layer used as the mixer when ``ModelConfig.mixer == "ttt"``.

    The names are registry names (``innerloop plugins`` lists them). ``share_qk`` (one projection for
    Q and K, then a causal conv each) and ``use_gate`` (the output gate) are None by default: the
    backbone decides them (see :data:`BACKBONES`); true or false sets them whatever the backbone
    (as the reference ``TTTConfig`` does, e.g. for a converted model). ``kernel`` picks the layer's
    fast path as ``TTTLayer(kernel=...)`` does, e.g. ``compiled_torch_mlp`` (TTT-MLP's training step
    compiled by ``torch.compile``, opt-in, training only); it changes speed, not the model.
    ``inner_norm`` and ``inner_residual`` are the inner model's wrapping ``f(x) = x + LN(g(x))`` (the
    paper's, both on); switching either off is the paper's ablation, which runs on the torch path.
    """

    inner_model: str = "linear"
    inner_loss: str = "reconstruction"
    update_rule: str = "dual_form"
    mini_batch_size: int = 16
    base_lr: float = 1.0
    conv_kernel: int = 4
    share_qk: Optional[bool] = None  # noqa: UP045 (omegaconf reads Optional, not ``bool | None``)
    use_gate: Optional[bool] = None  # noqa: UP045
    kernel: str = "auto"  # the layer's fast-path choice: "auto", "torch" or a registered kernel's name
    inner_norm: bool = True  # the inner model's output LayerNorm
    inner_residual: bool = True  # the inner model's residual connection


@dataclass
class FamilyConfig:
    """Options of the family's layers (``ModelConfig.mixer`` one of :data:`FAMILY_MIXERS`; the
    members and the FLA layer file each follows are in ``docs/family.md``).

    Args:
        memory: Titans' inner model, ``matrix`` (linear memory), ``mlp`` (the paper's deep memory) or
            any registered inner model (a plugin's); the other members are ``matrix`` only.
        mini_batch_size: tokens per gradient point of Titans (16), and the dual form's block size of
            linear attention (any value is the same model); DeltaNet and Gated DeltaNet are K = 1.
        base_lr: scale of the inner learning rate (beta, theta; linear attention's lr); at most 2 for
            DeltaNet and Gated DeltaNet (beta above 2 grows their state).
        short_conv: causal depthwise convs on q, k, v (FLA's ``use_short_conv``; linear attention has none).
        conv_kernel: their kernel size.
        output_gate: the swish-gated output norm (FLA's ``use_gate``); None: the member's default
            (Gated DeltaNet and Titans: on; linear attention and DeltaNet: off).

    A key the chosen member does not read (:data:`FAMILY_OPTIONS_USED`: ``mini_batch_size`` for
    DeltaNet and Gated DeltaNet, ``short_conv`` and ``conv_kernel`` for linear attention) must stay at
    its default: another value is refused, not dropped.
    """

    memory: str = "matrix"
    mini_batch_size: int = 16
    base_lr: float = 1.0
    short_conv: bool = True
    conv_kernel: int = 4
    output_gate: Optional[bool] = None  # noqa: UP045 (omegaconf reads Optional, not ``bool | None``)


@dataclass
class E2EConfig:
    """Options of the TTT-E2E model (``ModelConfig.mixer == "e2e"``, see ``docs/e2e.md``).

    Args:
        chunk_size: tokens per inner step (1024 at scale); each chunk is scored, then trained on.
        suffix_fraction: share of the blocks, counted from the end, that get a prime MLP (1/4).
        prime_intermediate_size: width of the prime SwiGLU MLPs (0: ``intermediate_size``).
        inner_lr: SGD learning rate of the inner step once warmed up.
        inner_lr_start: inner learning rate at the first outer step.
        inner_lr_warmup_fraction: share of the outer steps over which the inner lr rises linearly
            from ``inner_lr_start`` to ``inner_lr`` (0: no warm-up).
        inner_grad_clip: global-norm clip of each sequence's inner gradient (0: no clipping).
        first_order: drop the second-order terms of the meta-gradient (the inner gradient is treated
            as a constant in the outer backward).
        test_time_training: False runs the same network as a plain sliding-window Transformer (the
            prime MLPs stay fixed): the baseline without test-time training.
        inner_loss: registered ``model_inner_loss`` (``innerloop plugins`` lists them).
        update_rule: registered ``model_update_rule``.
        chunk_targets: which tokens a chunk's inner loss predicts. ``next_token`` (the official
            code's): each of the chunk's ``C`` tokens predicts the token after it, the last one the
            next chunk's first, so a chunk is trained on once that token has been read.
            ``within_chunk``: the ``C - 1`` pairs inside the chunk, trained on as soon as the chunk's
            last token is read (the paper's reading, innerloop's behaviour before the official code
            was matched).
        rope_positions: RoPE positions of the chunked attention. ``relative`` (the official code's):
            keys are cached after the QK-norm and before RoPE, and a chunk's queries and keys are
            rotated at positions relative to the window before the chunk (keys ``0 .. W + C - 1``).
            ``absolute``: every token at its absolute position, keys cached after RoPE. The attention
            is the same function either way; the rounding of the angles differs (which matters for
            long sequences in float32).
        skip_target_id: a token id the inner loss (and the ``chunk_mean`` training loss) skips as a
            target (None: none). The official data pipeline masks targets that are the BOS token (a
            document boundary in packed text), so converted models set it to the config's ``bos_token_id``.
        compute_dtype: dtype of the matrix products: ``float32`` (exact), or ``bfloat16`` /
            ``float16`` (as the official ``compute_dtype``, under ``torch.autocast``; the weights, fast
            weights and inner gradients' accumulation stay float32).
        outer_loss: the loss a training step minimises (:meth:`E2ELM.training_loss`). ``chunk_mean``
            (the official code's): the mean over sequences of the mean over chunks of each chunk's mean
            cross-entropy over its scored targets, ``skip_target_id`` not scored. ``token_mean``: the mean
            over the batch's scored targets, as every other mixer (innerloop's E2E before this option).
            The two are equal when every target is scored and the length is a multiple of the chunk.
        non_finite: ``raise`` (as a TTT layer's ``non_finite``): a chunk's inner loss returning NaN or
            inf from finite logits, or the update rule non-finite fast weights from finite ones and
            finite losses, is a ``ValueError`` naming the plugin at the end of the call (one check of
            each chunk trained on, read back once per call); outside fitting, NaN or inf appearing at a chunk
            trained on without a plugin's fault raises it too, naming the chunk and the likely cause
            (``E2ELM.diagnoses_its_inner_loop``); ``ignore`` lets them propagate.
    """

    chunk_size: int = 16
    suffix_fraction: float = 0.25
    prime_intermediate_size: int = 0
    inner_lr: float = 1.0
    inner_lr_start: float = 0.1
    inner_lr_warmup_fraction: float = 0.1
    inner_grad_clip: float = 1.0
    first_order: bool = False
    test_time_training: bool = True
    inner_loss: str = "next_token"
    update_rule: str = "score_first_sgd"
    chunk_targets: str = "next_token"
    rope_positions: str = "relative"
    skip_target_id: Optional[int] = None  # noqa: UP045 (omegaconf reads Optional, not ``int | None``)
    compute_dtype: str = "float32"
    outer_loss: str = "chunk_mean"
    non_finite: str = "raise"


@dataclass
class ModelConfig:
    """Shape and parts of a :class:`~innerloop.models.CausalLM`.

    Args:
        mixer: the sequence mixer of every block, a name of :data:`MIXER_TABLE`, or :data:`E2E` for the
            TTT-E2E model.
        backbone: ``transformer`` or ``mamba`` (see :data:`BACKBONES`).
        vocab_size: size of the token vocabulary (256 for byte-level text).
        hidden_size: model width ``D``.
        num_layers: number of blocks.
        num_heads: heads of the mixer; ``hidden_size`` must be divisible by it.
        intermediate_size: width of the SwiGLU MLP.
        window: tokens a sliding-window attention query sees, itself included (``mixer="swa"``).
        rope_theta: RoPE base of the attention mixers and of the TTT layer.
        pre_conv_kernel: kernel of the mamba backbone's pre-conv residual.
        pre_conv: whether every block has the pre-conv residual; None (default): the backbone
            decides (mamba: yes, transformer: no).
        norm_eps: epsilon of the RMSNorms (the blocks', the pre-conv's and the final one), in [1.18e-38, 1)
            (:data:`~innerloop.core.layer.MAX_NORM_EPS`: one of 1 or more no longer normalizes; one below
            float32's smallest normal number rounds to 0 there, and a zero row's RMSNorm is NaN).
        tie_embeddings: the LM head shares the embedding's weights (default); false gives the head
            its own ``[vocab_size, hidden_size]`` weights.
        init_std: standard deviation of the normal init of embeddings and projections (and of the
            family layers' short convs, as FLA's models; the pre-conv keeps PyTorch's default, as the
            TTT reference's does).
        padding_id: a token id whose embedding row starts at zero and takes no gradient through the
            lookup (``nn.Embedding``'s ``padding_idx``; the reference models set it from
            ``pad_token_id``), in ``[0, vocab_size)``; None (default): every row trains.
        ttt: options of the TTT layer (used when ``mixer == "ttt"``).
        family: options of the family's layers (used when ``mixer`` is one of :data:`FAMILY_MIXERS`).
        e2e: options of the TTT-E2E model (used when ``mixer == "e2e"``).
    """

    mixer: str = "ttt"
    backbone: str = "transformer"
    vocab_size: int = 256
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 172
    window: int = 64
    rope_theta: float = 10000.0
    pre_conv_kernel: int = 4
    pre_conv: Optional[bool] = None  # noqa: UP045 (omegaconf reads Optional, not ``bool | None``)
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    init_std: float = 0.02
    padding_id: Optional[int] = None  # noqa: UP045 (omegaconf reads Optional)
    ttt: TTTConfig = field(default_factory=TTTConfig)
    e2e: E2EConfig = field(default_factory=E2EConfig)
    family: FamilyConfig = field(default_factory=FamilyConfig)

    def __post_init__(self) -> None:
        """A section given as a mapping (``ModelConfig(ttt={"mini_batch_size": 4})``) becomes its
        dataclass, its keys checked as :meth:`from_dict` checks them; a section that is neither its
        dataclass nor a mapping (None, a number) is refused naming it. A numpy number in an int or
        float field (``hidden_size=np.int64(32)``) becomes the plain Python number
        (:func:`with_plain_values`, the rule of every config section)."""
        with_plain_values(self, "model.", "the model config")

    def to_dict(self) -> dict[str, Any]:
        """A plain nested dict (JSON/YAML-safe), the inverse of :meth:`from_dict`."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a nested dict; unknown keys raise ``ValueError`` listing the valid ones."""
        if not isinstance(data, Mapping):
            raise TypeError(
                f"ModelConfig.from_dict needs a mapping of the config's keys (e.g. {{'hidden_size': 64}}), "
                f"got {type(data).__name__}: {data!r}"
            )
        data = dict(data)
        for name in ("ttt", "e2e", "family"):
            section = data.get(name, {})
            data[name] = asdict(section) if is_dataclass(section) else section  # type: ignore[arg-type]
        check_keys(data, cls, "model.", "the model config")
        ttt, e2e, family = data.pop("ttt"), data.pop("e2e"), data.pop("family")
        return cls(**data, ttt=TTTConfig(**ttt), e2e=E2EConfig(**e2e), family=FamilyConfig(**family))

    @classmethod
    def paper_size(cls, size: str, **overrides: Any) -> ModelConfig:
        """The paper's shape ``size`` (one of :data:`MODEL_SIZES`) with optional field overrides."""
        if size not in MODEL_SIZES:
            raise ValueError(f"size={size!r} is not a paper size; valid sizes: {sorted(MODEL_SIZES)}")
        return cls.from_dict({**MODEL_SIZES[size], **overrides})


def with_plain_values(config: Any, prefix: str, source: str) -> None:
    """The one rule of a config dataclass's values as it is built (its ``__post_init__``; every section
    of a run config and of a model config follows it): each section field given as a mapping becomes
    its dataclass, its keys checked (:func:`check_keys`; ``prefix`` is the dotted path of ``config``,
    ``source`` names it in messages), a section given as anything else is a ``TypeError`` naming it, and
    every number of another type than its field's becomes the plain one (:func:`_with_plain_numbers`)."""
    for f in fields(config):
        section_type = field_types(type(config))[f.name]
        if not is_dataclass(section_type):
            continue
        section, name = getattr(config, f.name), f"{prefix}{f.name}"
        if isinstance(section, Mapping):
            check_keys(section, section_type, f"{name}.", source)  # type: ignore[arg-type]
            section = section_type(**section)  # type: ignore[operator]
        elif not isinstance(section, section_type):  # type: ignore[arg-type]
            raise TypeError(
                f"{name} is a section, not a value: give an instance of {section_type.__name__} or a mapping "
                f"of its keys {sorted(g.name for g in fields(section_type))}, got "
                f"{type(section).__name__}: {section!r}"
            )
        setattr(config, f.name, _with_plain_numbers(section))
    _with_plain_numbers(config)


def _with_plain_numbers(config: Any) -> Any:
    """``config`` (a config dataclass) with every int or float field that holds another integer or real
    number type (``numpy.int64``, a 0-d integer tensor, ``numpy.float32``; not a bool) set to the plain
    ``int`` or ``float``,
    and every bool field that holds numpy's bool set to the plain ``bool``, so that the checks, the
    layers and JSON see Python values. Other values are left to the checks."""
    hints = field_types(type(config))
    for f in fields(config):
        value, expected = getattr(config, f.name), hints[f.name]
        if get_origin(expected) is Union:  # Optional[X]
            expected = next(arg for arg in get_args(expected) if arg is not type(None))
        if isinstance(value, bool) or type(value) in (int, float):
            continue
        if expected is bool and _is_numpy_bool(value):
            setattr(config, f.name, bool(value))
        elif expected is int and as_integer(value) is not None:  # numpy's, a 0-d tensor: the one integer rule
            setattr(config, f.name, as_integer(value))
        elif expected is float and is_real(value):  # the core's one rule of a real (10**400: none)
            setattr(config, f.name, float(value))
    return config


def _is_numpy_bool(value: Any) -> bool:
    """True for numpy's bool (``numpy.bool_``, named ``bool`` in numpy 2), told from Python's by its module."""
    kind = type(value)
    return kind.__module__ == "numpy" and kind.__name__ in ("bool", "bool_")


def require_model_config(config: Any) -> ModelConfig:
    """``config`` as a :class:`ModelConfig`: itself, or one built by :meth:`ModelConfig.from_dict` from
    a mapping of its fields (a dict, an OmegaConf ``DictConfig`` such as ``OmegaConf.structured(
    ModelConfig(...))``, checked as any config is); anything else is a ``TypeError`` saying what is valid."""
    if isinstance(config, ModelConfig):
        return config
    if isinstance(config, Mapping):
        return ModelConfig.from_dict(config)
    raise TypeError(
        "config must be a ModelConfig, or a mapping of its fields (a dict, an OmegaConf DictConfig), got "
        f"{type(config).__name__}"
    )


# --------------------------------------------------------------------------------------------------
# The sequence mixers: the one place a mixer is declared
# --------------------------------------------------------------------------------------------------


# -- the range of every numeric field ---------------------------------------------------------------------


# FLOAT32_MAX (3.4e38): imported from innerloop.core.functional, its one definition, and re-exported here


@dataclass(frozen=True)
class Bounds:
    """The valid range of a numeric config field: ``low``/``high`` (None: unbounded), each inclusive
    unless ``*_open``; ``why`` explains a limit in the error message. Floats must also be finite."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    why: str = ""

    def __contains__(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        """E.g. ``>= 1``, ``> 0``, ``in [0, 1)``."""
        low, high = _number(self.low), _number(self.high)
        overflow = isinstance(self.high, float) and self.high > 2**53  # float32: no range, a limit
        if self.low is not None and overflow:
            return f"{'>' if self.low_open else '>='} {low} and {'<' if self.high_open else '<='} {high}"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{low}, {high}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {low}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {high}"
        return "any value"


def _number(value: float | None) -> str:
    if value is None or isinstance(value, int):
        return str(value)
    return (
        str(int(value)) if value.is_integer() and abs(value) <= 2**53 else str(value)
    )  # 3.4e38, not 39 digits


def checked_number(name: str, value: Any, kind: type, bounds: Bounds) -> int | float:
    """``value`` as a plain ``kind`` (``int``: any integer, numpy's or a 0-d integer tensor too, as
    :func:`~innerloop.core.functional.as_integer` reads them, not a bool; ``float``: any finite real),
    inside ``bounds``; else ``ValueError`` naming ``name``, the value and what is valid."""
    integer = as_integer(value) is not None
    if kind is int and not integer:
        raise ValueError(f"{name}={value!r} ({type(value).__name__}) must be an integer {bounds.describe()}")
    if kind is float and not is_real(value):  # is_real: 10**400 is no finite float (not an OverflowError)
        raise ValueError(
            f"{name}={value!r} ({type(value).__name__}) must be a finite number {bounds.describe()}"
        )
    plain = as_integer(value) if kind is int else float(value)
    if plain not in bounds:
        why = f" ({bounds.why})" if bounds.why else ""
        raise ValueError(f"{name}={plain} must be {bounds.describe()}{why}")
    return plain


def check_weight_decay(lr: float, weight_decay: float, prefix: str = "") -> None:
    """``ValueError`` unless ``lr * weight_decay < 1``: AdamW's decoupled decay multiplies every decayed
    weight by ``1 - lr * weight_decay`` at each step, which at 1 zeroes it and above flips its sign
    (the loss stays finite, so nothing else stops the run). ``prefix``: ``"optim."`` in a config."""
    if lr * weight_decay >= 1:
        raise ValueError(
            f"{prefix}weight_decay={weight_decay:g} with {prefix}lr={lr:g}: AdamW multiplies each decayed "
            f"weight by 1 - lr * weight_decay = {1 - lr * weight_decay:g} at every step, which zeroes it or "
            f"flips its sign; {prefix}lr * {prefix}weight_decay must be < 1 (the default 0.1 x 3e-3 is 3e-4)"
        )


AT_LEAST_1 = Bounds(1)
AT_LEAST_0 = Bounds(0)
POSITIVE = Bounds(0, low_open=True)
FRACTION = Bounds(0, 1, high_open=True)  # [0, 1)

_IN_FLOAT32 = "a larger one is inf in float32, the model's dtype"
AT_LEAST_0_IN_FLOAT32 = Bounds(0, FLOAT32_MAX, why=_IN_FLOAT32)
"""A rate or a factor the model or the optimizer multiplies float32 values by: an inner learning rate
of 1e39 was taken by the config and refused only by the layer's first forward (after the data loaded);
an outer one made AdamW's first step write inf into every weight."""

LARGEST_INIT_STD = FLOAT32_MAX / 16
"""The largest ``model.init_std`` (2.1e37): a normal draw lies within 5.8 std in float32 (Box-Muller of
24-bit uniforms), 8.6 std at most from 53-bit ones; a std of float32's largest number itself drew 26% of
the weights as inf (1e38: 0.07%), with no error."""

SEQ_LEN_BOUNDS = Bounds(1, 2**30, why="a window of tokens held in memory")
"""``data.seq_len`` and the data modules' ``seq_len``."""

SEED_BOUNDS = Bounds(0, 2**32 - 1, why="Lightning seeds numpy, which takes 32-bit seeds")
"""The run's ``seed`` and the data modules' ``seed`` (a torch generator's seed is :data:`~innerloop.core.functional.TORCH_SEEDS`)."""

STEP_BOUNDS = Bounds(1, 2**53, why="beyond any run: a step count float64 holds exactly")
"""``trainer.max_steps`` (10**400 crashed the learning-rate schedule with a bare OverflowError)."""

BATCH_SIZE_BOUNDS = Bounds(1, 2**24, why="the windows of a batch are held in memory at once")
"""``data.batch_size`` and the data modules' ``batch_size``."""

WINDOW_SIZE_BOUNDS = {
    "seq_len": SEQ_LEN_BOUNDS,
    "batch_size": BATCH_SIZE_BOUNDS,
    "batches": Bounds(1, 2**24, why="the windows scored are held in memory at once"),
}
"""The valid range of ``evaluate``'s and ``compare``'s (``innerloop eval``'s and ``compare``'s)
``seq_len``, ``batch_size`` and ``batches``."""


# Sizes past these cannot be allocated on any machine (a 2**24-row table of width 2**24 is 2**48 values):
# refused with a message, not an allocator traceback after the run has started.
_SIZE = Bounds(1, 2**24, why="larger tables do not fit in memory")

# A layer's own limits (core/layer.py), so that a config states the whole range below it as above it.
_MINI_BATCH = Bounds(1, MAX_MINI_BATCH_SIZE, why="a scan builds [K, K] matrices per head and mini-batch")
_CONV_KERNEL = Bounds(1, MAX_CONV_KERNEL, why="a short causal convolution")

_SMALLEST_NORMAL_EPS = torch.finfo(torch.float32).tiny
"""The smallest ``model.norm_eps`` (1.18e-38, float32's and bfloat16's smallest normal number), as
TTTLayer's ``norm_eps`` in a float32 layer (:func:`~innerloop.core.layer.check_norm_eps`)."""

MODEL_FIELD_BOUNDS: dict[str, Bounds] = {
    "model.vocab_size": _SIZE,
    "model.hidden_size": _SIZE,
    "model.num_layers": Bounds(1, 2**16, why="each block is a module of its own"),
    "model.num_heads": AT_LEAST_1,
    "model.intermediate_size": _SIZE,
    "model.window": Bounds(1, SEQ_LEN_BOUNDS.high, why="a query sees at most the tokens of a window"),
    "model.rope_theta": Bounds(  # above FLOAT32_MAX (MAX_ROPE_THETA) the float32 frequencies were 0, not theta^(-2i/d)
        1, FLOAT32_MAX, why=f"the RoPE base: its frequencies theta^(-2i/head_dim) stay <= 1; {_IN_FLOAT32}"
    ),
    "model.pre_conv_kernel": _CONV_KERNEL,
    "model.norm_eps": Bounds(
        _SMALLEST_NORMAL_EPS,
        MAX_NORM_EPS,
        high_open=True,
        why=f"{NORM_EPS_BOUND_WHY}; one below float32's smallest normal number rounds to 0 or a subnormal "
        "there, and the RMSNorm of a zero row divides 0 by 0 (NaN)",
    ),
    "model.init_std": Bounds(
        _SMALLEST_NORMAL_EPS,
        LARGEST_INIT_STD,
        why="the std of the weights' normal init; one below float32's smallest normal number draws "
        "subnormals or zeros (1e-320 built all-zero weights), one above float32's largest / 16 draws inf",
    ),
    "model.ttt.mini_batch_size": _MINI_BATCH,
    "model.ttt.base_lr": AT_LEAST_0_IN_FLOAT32,
    "model.ttt.conv_kernel": _CONV_KERNEL,
    "model.family.mini_batch_size": _MINI_BATCH,
    "model.family.base_lr": AT_LEAST_0_IN_FLOAT32,
    "model.family.conv_kernel": _CONV_KERNEL,
    "model.e2e.chunk_size": Bounds(
        1, SEQ_LEN_BOUNDS.high, why="a chunk of a window trains on its next-token pairs"
    ),
    "model.e2e.suffix_fraction": Bounds(0, 1, low_open=True),
    "model.e2e.prime_intermediate_size": Bounds(
        0, _SIZE.high, why="0: the same as model.intermediate_size; larger tables do not fit in memory"
    ),
    "model.e2e.inner_lr": AT_LEAST_0_IN_FLOAT32,
    "model.e2e.inner_lr_start": AT_LEAST_0_IN_FLOAT32,
    "model.e2e.inner_lr_warmup_fraction": Bounds(
        0, 1, why="1: the inner lr reaches model.e2e.inner_lr as training ends"
    ),
    "model.e2e.inner_grad_clip": Bounds(0, why="0: no clipping"),
}
"""The valid range of every int and float field of :class:`ModelConfig` (nested ones too), by its
dotted key; :func:`validate_model_config` checks them (``tests`` hold every field to having one)."""


def _build_attention(config: ModelConfig) -> nn.Module:
    return CausalSelfAttention(config.hidden_size, config.num_heads, None, config.rope_theta)


def _build_sliding_window_attention(config: ModelConfig) -> nn.Module:
    return CausalSelfAttention(config.hidden_size, config.num_heads, config.window, config.rope_theta)


def uses_pre_conv(config: ModelConfig) -> bool:
    """Whether the blocks of ``config`` have the pre-conv residual: ``model.pre_conv``, or when it is
    None the backbone's choice (mamba: yes)."""
    return config.backbone == "mamba" if config.pre_conv is None else config.pre_conv


def ttt_share_qk(config: ModelConfig) -> bool:
    """Whether the TTT layers of ``config`` share one Q/K projection (followed by two causal convs of
    ``model.ttt.conv_kernel``): ``model.ttt.share_qk``, or when it is None the backbone's choice
    (mamba: yes)."""
    return config.backbone == "mamba" if config.ttt.share_qk is None else config.ttt.share_qk


def _build_ttt(config: ModelConfig) -> nn.Module:
    mamba = config.backbone == "mamba"  # the backbone decides the gate unless it is set
    share_qk = ttt_share_qk(config)
    use_gate = mamba if config.ttt.use_gate is None else config.ttt.use_gate
    return TTTLayer(
        config.hidden_size,
        config.num_heads,
        inner_model=config.ttt.inner_model,
        inner_loss=config.ttt.inner_loss,
        update_rule=config.ttt.update_rule,
        mini_batch_size=config.ttt.mini_batch_size,
        base_lr=config.ttt.base_lr,
        use_gate=use_gate,
        share_qk=share_qk,
        # read only with share_qk (load_config warns of a model.ttt.conv_kernel it does not read)
        conv_kernel=config.ttt.conv_kernel if share_qk else DEFAULT_CONV_KERNEL,
        rope_theta=config.rope_theta,
        kernel=config.ttt.kernel,
        inner_norm=config.ttt.inner_norm,
        inner_residual=config.ttt.inner_residual,
    )


def config_value(config: ModelConfig | Mapping[str, Any], field: str) -> Any:
    """The value of ``field`` (a dotted name such as ``"ttt.mini_batch_size"``) in ``config``: a
    ``ModelConfig``, or its dict form (a Hugging Face config's ``model``), where a key left out has its
    default."""
    if isinstance(config, Mapping):
        value: Any = config
        for part in field.split("."):
            if not isinstance(value, Mapping) or part not in value:
                return config_value(ModelConfig(), field)
            value = value[part]
        return value
    value = config
    for part in field.split("."):
        value = getattr(value, part)
    return value


def built_fields_of_causal_lm(config: ModelConfig) -> tuple[str, ...]:
    """The ``ModelConfig`` fields a :class:`~innerloop.models.lm.CausalLM` of ``config`` reads only when
    it is built: every top-level field but ``init_std`` (its weights' first draw, replaced by any loaded
    weights), and of the sections its mixer's: ``ttt.*`` for ``ttt`` but ``ttt.kernel`` (a layer moves to
    another path where its kernel cannot run: ``run_kernels_that_work_here``), ``family.*`` for the family's
    members; ``window`` for ``swa`` only, ``rope_theta`` where the mixer rotates (``ttt``, ``attention``,
    ``swa``), ``pre_conv_kernel`` where the blocks have a pre-conv. Changed on a built model, one of these
    would go unread while the config, which checkpoints and exports record, said the new value."""
    top = [f.name for f in fields(config) if not is_dataclass(getattr(config, f.name))]
    unread = {"init_std"}
    if config.mixer != "swa":
        unread.add("window")
    if config.mixer not in ("ttt", "attention", "swa"):
        unread.add("rope_theta")
    if not uses_pre_conv(config):
        unread.add("pre_conv_kernel")
    built = [name for name in top if name not in unread]
    if config.mixer == "ttt":
        built += [f"ttt.{f.name}" for f in fields(TTTConfig) if f.name != "kernel"]
    elif config.mixer in FAMILY_MIXERS:
        built += [f"family.{f.name}" for f in fields(FamilyConfig)]
    return tuple(built)


def changed_built_field(
    built: Mapping[str, Any], config: ModelConfig | Mapping[str, Any], made_from: Mapping[str, str]
) -> None:
    """Raise ``ValueError`` naming the first field of ``built`` (field -> the value a model was built
    with) whose value in ``config`` (or its dict form, :func:`config_value`) differs now, and what the model made of it (``made_from``; "layers"
    where it names none): a built model does not read it again."""
    for name, was in built.items():
        now = config_value(config, name)
        if now != was:
            raise ValueError(
                f"model.{name} was {was!r} when this model was built and is now {now!r}: a built "
                f"model does not read it again (it built its {made_from.get(name, 'layers')} for {was!r}); "
                "set it back, or build a new model with the new config (build_model)"
            )


FAMILY_MIXERS: tuple[str, ...] = tuple(FAMILY_LAYERS)
"""The family's members as mixers (``innerloop.core.family_layers``), options in ``model.family``."""


FAMILY_OPTIONS_USED: dict[str, tuple[str, ...]] = {
    "linear_attention": ("mini_batch_size", "base_lr", "output_gate"),
    "deltanet": ("base_lr", "short_conv", "conv_kernel", "output_gate"),
    "gated_deltanet": ("base_lr", "short_conv", "conv_kernel", "output_gate"),
    "titans": ("memory", "mini_batch_size", "base_lr", "short_conv", "conv_kernel", "output_gate"),
}
"""The ``model.family`` keys each member reads; another key set away from its default is refused
(``_check_family``). ``memory`` is checked with its choices (``matrix`` only but for titans)."""
FAMILY_OPTIONS_UNUSED_WHY = {
    "mini_batch_size": "it takes one gradient step per token (K = 1)",
    "short_conv": "it has no short convs",
    "conv_kernel": "it has no short convs",
}
"""Why a member that does not read a ``model.family`` key does not (the error names it)."""


def _family_options(config: ModelConfig) -> dict[str, Any]:
    """The keyword arguments of the member ``config.mixer`` from the ``config.family`` keys it reads."""
    arguments = {"memory": "inner_model"}  # model.family key -> the layer's argument, where they differ
    options: dict[str, Any] = {"norm_eps": 1e-6}
    for key in FAMILY_OPTIONS_USED[config.mixer]:
        value = getattr(config.family, key)
        if value is not None:  # output_gate None: the member's default
            options[arguments.get(key, key)] = value
    return options


def _build_family(config: ModelConfig) -> nn.Module:
    return FAMILY_LAYERS[config.mixer](config.hidden_size, config.num_heads, **_family_options(config))


@dataclass(frozen=True)
class Mixer:
    """A sequence mixer a block can use: what it is, and how a block builds it from the model's config.

    ``build(config)`` returns a module called as ``y, state = mixer(x [B, T, D], state)``.
    """

    description: str
    build: Callable[[ModelConfig], nn.Module]


MIXER_TABLE: dict[str, Mixer] = {
    "ttt": Mixer("a TTT layer (options in model.ttt)", _build_ttt),
    "attention": Mixer("full causal self-attention", _build_attention),
    "swa": Mixer("sliding-window causal self-attention (model.window)", _build_sliding_window_attention),
    "linear_attention": Mixer(
        "linear attention, FLA's linear_attn layer (options in model.family)", _build_family
    ),
    "deltanet": Mixer("DeltaNet, FLA's delta_net layer (options in model.family)", _build_family),
    "gated_deltanet": Mixer(
        "Gated DeltaNet, FLA's gated_deltanet layer (options in model.family)", _build_family
    ),
    "titans": Mixer("Titans, linear, MLP or a plugin's memory (model.family.memory)", _build_family),
}
"""Every mixer, by its ``model.mixer`` name: ``validate_model_config`` and the block builder
(:func:`innerloop.models.blocks.build_mixer`) both read it, so adding a mixer is one entry here."""

MIXERS: tuple[str, ...] = tuple(MIXER_TABLE)
"""The names of the sequence mixers a block can use (see :data:`MIXER_TABLE`)."""


_FIELD_TYPES: dict[type, dict[str, Any]] = {}


def field_types(schema: type) -> dict[str, Any]:
    """The resolved type of every field of the dataclass ``schema``, by name (``typing.get_type_hints``,
    computed once per class: config checks ask for it on every validation). Kept in a plain dict, not
    ``functools.cache``: TTT-E2E validates its options in its forward, which ``torch.compile`` traces,
    and Dynamo warns at every cached function it meets."""
    if schema not in _FIELD_TYPES:
        _FIELD_TYPES[schema] = get_type_hints(schema)
    return _FIELD_TYPES[schema]


def check_keys(
    given: Mapping[str, Any], schema: type, prefix: str, source: str, error: type[ValueError] = ValueError
) -> None:
    """Raise ``error`` for any key of the mapping ``given`` that the dataclass ``schema`` does not have,
    and for a section of the schema given as something other than a mapping (e.g. ``model.ttt=5``).

    ``prefix`` is the dotted path of ``given`` (``"model."``), ``source`` where it came from (a file,
    an override); nested sections are checked against their own dataclasses. The error for an unknown
    key lists the valid keys of its section and suggests the keys it may have meant: a close spelling
    in its section (``model.ttt.innerloss``: ``model.ttt.inner_loss``) or the same name in another
    section of ``schema`` (``model.inner_loss``: ``model.ttt.inner_loss``).
    """
    _check_section_keys(given, schema, prefix, source, error, (schema, prefix))


def _check_section_keys(
    given: Mapping[str, Any],
    schema: type,
    prefix: str,
    source: str,
    error: type[ValueError],
    root: tuple[type, str],
) -> None:
    """:func:`check_keys` for the section ``schema`` at ``prefix``; ``root`` is the whole schema checked
    and its prefix, where an unknown key's name is looked up."""
    valid = {f.name: f for f in fields(schema)}
    hints = field_types(schema)
    for key in given:
        full = f"{prefix}{key}"
        if key not in valid:
            hint = _did_you_mean(str(key), prefix, sorted(valid), key_paths(*root))
            raise error(f"unknown config key {full!r} in {source}; valid keys here: {sorted(valid)}{hint}")
        section = hints[key]
        if not is_dataclass(section):
            continue
        if not isinstance(given[key], Mapping):
            raise error(
                f"config key {full!r} in {source} is a section, not a value: give a mapping of its keys "
                f"{sorted(f.name for f in fields(section))} (e.g. {full}.{fields(section)[0].name}=...), "
                f"got {given[key]!r}"
            )
        _check_section_keys(given[key], section, f"{full}.", source, error, root)


def key_paths(schema: type, prefix: str = "") -> list[str]:
    """The dotted path of every key of the dataclass ``schema``, its sections' keys included, each
    after ``prefix`` (``"model."`` gives ``model.hidden_size``, ``model.ttt``, ``model.ttt.inner_loss``)."""
    paths = []
    for name, kind in field_types(schema).items():
        paths.append(f"{prefix}{name}")
        if is_dataclass(kind):
            paths.extend(key_paths(kind, f"{prefix}{name}."))  # type: ignore[arg-type]
    return paths


def _did_you_mean(key: str, prefix: str, valid: Sequence[str], all_keys: Sequence[str]) -> str:
    """``"; did you mean ...?"`` for the unknown key ``key`` of the section at ``prefix`` whose keys are
    ``valid``, or ``""`` when nothing is near. It names keys of the section spelt like ``key``, and
    keys of other sections (in ``all_keys``) named ``key``; failing both, keys elsewhere spelt like it."""
    near = [f"{prefix}{name}" for name in difflib.get_close_matches(key, valid, n=3, cutoff=0.6)]
    by_name: dict[str, list[str]] = {}
    for path in all_keys:
        if not prefix.startswith(f"{path}."):  # not the section the key is in (model.d_model: not 'model')
            by_name.setdefault(path.rpartition(".")[2], []).append(path)
    elsewhere = list(by_name.get(key, []))
    if not near and not elsewhere:
        for name in difflib.get_close_matches(key, list(by_name), n=3, cutoff=0.75):
            elsewhere.extend(by_name[name])
    suggestions = list(dict.fromkeys(near + elsewhere))
    return f"; did you mean {', '.join(repr(path) for path in suggestions)}?" if suggestions else ""


def _type_error(value: Any, expected: Any) -> str | None:
    """What ``value`` should be for a field declared ``expected``, or None when it is fine."""
    if get_origin(expected) is Union:  # Optional[X]: None, or an X
        (inner,) = (arg for arg in get_args(expected) if arg is not type(None))
        wanted = _type_error(value, inner)
        return None if value is None or wanted is None else f"{wanted}, or null"
    if expected is bool:
        if _is_numpy_bool(value):
            return "a Python bool (convert it with bool(...))"  # a numpy bool set after building
        return None if isinstance(value, bool) else "true or false (a bool, not a string or a number)"
    if expected is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, (int, bool)):
            return "a Python int (convert it with int(...))"  # a numpy int set after building
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if expected is float:
        if isinstance(value, torch.Tensor):  # "must be a finite number" would read as a number refused
            return "a Python float, not a tensor (convert it with float(...))"
        if not is_real(value):  # the core's one rule of a finite real (10**400, a Fraction past it: none)
            return "a finite number"
        # a numpy float or a Fraction set after building
        return None if type(value) in (int, float) else "a Python float (convert it with float(...))"
    if expected is str:
        if isinstance(value, os.PathLike):  # a pathlib.Path set after loading: the config saves text
            return "a string (convert it with str(...))"
        return None if isinstance(value, str) else "a string"
    if get_origin(expected) is list:  # a str would be read character by character
        listed = isinstance(value, Sequence) and not isinstance(value, (str, bytes))  # an omegaconf list too
        return None if listed else "a list"
    return None


def check_field_types(
    where: str, config: Any, schema: type, bounds: Mapping[str, Bounds] | None = None
) -> None:
    """Every field of ``config`` (a ``schema`` instance or an omegaconf node of it) has its declared
    type, else a ``ValueError`` naming the key (``where``-dotted; ``where=""`` for a top-level schema),
    the value, its type and what is valid: a dict from JSON or Python is not converted, so ``"false"``
    for a bool or ``16.7`` for an int is refused here rather than read as something else later. The one
    rule of every config section: an int field takes a Python int (not a bool, ``4.0``, a Fraction, a
    Decimal or a tensor; a numpy integer is told to be converted), a float field a finite Python int or
    float (a numpy float, a Fraction or a tensor is told to be converted), a bool field a Python bool, a str field
    a str (a ``pathlib.Path`` too is told so), a list field a list. A number's message states its range
    from ``bounds`` (by dotted key; default :data:`MODEL_FIELD_BOUNDS`), as the range check's does."""
    bounds = MODEL_FIELD_BOUNDS if bounds is None else bounds
    hints = field_types(schema)
    for f in fields(schema):
        value, expected = getattr(config, f.name), hints[f.name]
        key = f"{where}.{f.name}" if where else f.name
        if is_dataclass(expected):
            if not isinstance(value, expected) and not all(hasattr(value, g.name) for g in fields(expected)):
                raise ValueError(  # a dict or None: 'has no attribute' from inside the checks
                    f"{key}={value!r:.80} ({type(value).__name__}) must be {'an' if expected.__name__[0] in 'AEIOU' else 'a'} "
                    f"{expected.__name__} (the {key} section)"
                )
            check_field_types(key, value, expected, bounds)
            continue
        wanted = _type_error(value, expected)
        if wanted in ("an integer", "a finite number") and key in bounds:  # NaN: the range it is outside
            why = f" ({bounds[key].why})" if bounds[key].why else ""
            wanted += f" {bounds[key].describe()}{why}"
        if wanted is not None:
            raise ValueError(
                f"{key}={value!r} ({type(value).__name__}) must be {wanted}{_plugin_object_hint(value)}"
            )


_TTT_LAYER_KINDS = ("inner_model", "inner_loss", "update_rule")
"""The plugin kinds a :class:`~innerloop.core.layer.TTTLayer` built in Python takes as instances."""


def _plugin_object_hint(value: Any) -> str:
    """For a plugin object where a config takes a name (``TTTConfig(inner_loss=MyLoss())``): how to give
    it, naming its kind's registration function (``innerloop.register_inner_loss``); "" for any other
    value."""
    name = getattr(value, "name", None)
    if isinstance(value, str) or not isinstance(name, str):
        return ""
    kind = next((kind.name for kind in KINDS if isinstance(value, kind.base)), None)
    register = f"innerloop.register_{kind}(obj)" if kind else "innerloop.register_<kind>(obj)"
    layer = "; a TTTLayer built in Python takes the instance itself" if kind in _TTT_LAYER_KINDS else ""
    return (
        f" (a config names a registered plugin: register the object, {register}, and give its name "
        f"{name!r}{layer})"
    )


def _check_ranges(where: str, config: Any, schema: type) -> None:
    """Every int and float field of ``config`` (its types checked first) inside its
    :data:`MODEL_FIELD_BOUNDS`: a negative ``rope_theta`` or ``norm_eps`` would not fail, it would
    build a model that computes NaN or silently dead attention."""
    hints = field_types(schema)
    for f in fields(schema):
        value, expected, key = getattr(config, f.name), hints[f.name], f"{where}.{f.name}"
        if is_dataclass(expected):
            _check_ranges(key, value, expected)
        elif expected in (int, float):
            bounds = MODEL_FIELD_BOUNDS[key]
            if value not in bounds:
                why = f" ({bounds.why})" if bounds.why else ""
                raise ValueError(f"{key}={value} must be {bounds.describe()}{why}")


def fewest_parameters(config: ModelConfig) -> int:
    """A lower bound on the parameters of the model ``config`` describes: its embedding table and its
    blocks' SwiGLU MLPs (every block has one), whatever the mixer."""
    return config.vocab_size * config.hidden_size + config.num_layers * 3 * config.hidden_size * (
        config.intermediate_size
    )


def check_fits_in_memory(
    config: ModelConfig, device: torch.device | None = None, dtype: torch.dtype | None = None
) -> None:
    """:func:`~innerloop.core.layer.check_weights_fit` of the model ``config`` describes (its
    :func:`fewest_parameters`), naming its sizes: each field is bounded, but their products are not
    (``vocab_size=2**22, hidden_size=2**12`` is 64 GiB of float32 embedding), and building such a model
    allocated until the allocator or the kernel's out-of-memory killer stopped it."""
    sizes = ", ".join(
        f"{k}={getattr(config, k)}" for k in ("vocab_size", "hidden_size", "intermediate_size", "num_layers")
    )
    check_weights_fit(fewest_parameters(config), f"model ({sizes})", device, dtype)


def validate_model_config(config: ModelConfig) -> None:
    """Check names and shapes before building; raise ``ValueError`` naming the field and the choices.

    Plugin names are checked against ``innerloop.registry.available`` so that a typo fails at once,
    not minutes into a run. ``config`` may also be a mapping of its fields (:func:`require_model_config`).
    """
    config = require_model_config(config)
    check_field_types("model", config, ModelConfig)
    _check_ranges("model", config, ModelConfig)
    _check_choices(config)
    _check_shapes(config)
    if config.mixer == E2E:
        validate_e2e_config(config)
    if config.mixer == "ttt":
        _check_ttt(config.ttt)
    if config.mixer in FAMILY_MIXERS:
        _check_family(config)
    _warn_unknown_unread_plugins(config)


PLUGIN_FIELDS = {
    "ttt": (("inner_model", "inner_model"), ("inner_loss", "inner_loss"), ("update_rule", "update_rule")),
    E2E: (("inner_loss", "model_inner_loss"), ("update_rule", "model_update_rule")),
    "titans": (("memory", "inner_model"),),
}
"""The plugin names a model config holds, by mixer: that mixer's section (``model.ttt``, ``model.e2e``;
``model.family`` for ``titans``: :data:`PLUGIN_SECTIONS`) -> (field, registry kind). Another mixer reads
no plugin by name (the other family members' memory is ``matrix``, fixed)."""
PLUGIN_SECTIONS = {"titans": "family"}
"""The section of a mixer of :data:`PLUGIN_FIELDS` whose name is not the mixer's own."""


def unread_model_keys(config: ModelConfig) -> dict[str, str]:
    """The dotted keys (``model.ttt``: the whole section) that the model ``config`` describes never
    reads, each with the reason: another mixer's section, ``model.window`` of a mixer that attends to
    every token, and so on. Setting one changes nothing; :func:`innerloop.config.load.load_config`
    warns about one an override sets."""
    mixer = config.mixer
    unread = {
        f"model.{section}": f"only model.mixer={section!r} reads it"
        for section in ("ttt", E2E)
        if mixer != section
    }
    if mixer not in FAMILY_MIXERS:
        unread["model.family"] = f"only the family's mixers {list(FAMILY_MIXERS)} read it"
    if mixer not in ("swa", E2E):
        unread["model.window"] = "only the sliding-window attention of model.mixer='swa' or 'e2e' reads it"
    if not uses_rope(config):
        unread["model.rope_theta"] = f"mixer {mixer!r} applies no RoPE"
    if mixer == E2E:
        for key in ("backbone", "pre_conv", "pre_conv_kernel"):
            unread[f"model.{key}"] = "the TTT-E2E model has blocks of its own, without a pre-conv"
    elif not uses_pre_conv(config):
        unread["model.pre_conv_kernel"] = (
            "the blocks have no pre-conv (model.pre_conv or backbone mamba adds one)"
        )
    decided = [config.pre_conv, *((config.ttt.share_qk, config.ttt.use_gate) if mixer == "ttt" else ())]
    if mixer != E2E and None not in decided:
        unread["model.backbone"] = "what it decides (model.pre_conv; model.ttt.share_qk, use_gate) is set"
    if mixer == "ttt" and not ttt_share_qk(config):
        unread["model.ttt.conv_kernel"] = (
            "it sizes the Q/K convs that only a shared Q/K projection has (model.ttt.share_qk=true, or "
            "null with backbone mamba)"
        )
    if mixer == E2E:
        unread.update(_unread_e2e_keys(config.e2e))
    return unread


E2E_INNER_LOOP_KEYS: tuple[str, ...] = (
    "inner_lr",
    "inner_lr_start",
    "inner_lr_warmup_fraction",
    "inner_grad_clip",
    "first_order",
    "inner_loss",
    "update_rule",
    "chunk_targets",
    "skip_target_id",
)
"""The :class:`E2EConfig` keys only the inner loop reads: with ``test_time_training`` off they change
nothing."""


def _unread_e2e_keys(e2e: E2EConfig) -> dict[str, str]:
    """The ``model.e2e`` keys a TTT-E2E model with the options ``e2e`` never reads, each with the
    reason (:func:`unread_model_keys`)."""
    if not e2e.test_time_training:
        why = "model.e2e.test_time_training=false: the prime MLPs stay fixed, no inner step is taken"
        unread = {f"model.e2e.{key}": why for key in E2E_INNER_LOOP_KEYS}
        if e2e.outer_loss == "chunk_mean":  # the training loss skips it too
            del unread["model.e2e.skip_target_id"]
        elif e2e.rope_positions == "absolute":  # (chunk_mean's chunks are chunk_size long)
            unread["model.e2e.chunk_size"] = (
                "model.e2e.test_time_training=false with rope_positions='absolute' and "
                "outer_loss='token_mean': every block attends at absolute positions, in no chunks, and "
                "the training loss has no chunks"
            )
        return unread
    if e2e.inner_lr_warmup_fraction == 0:
        return {
            "model.e2e.inner_lr_start": (
                "model.e2e.inner_lr_warmup_fraction=0: no warm-up, the inner lr is model.e2e.inner_lr "
                "from the first step"
            )
        }
    return {}


def _warn_unknown_unread_plugins(config: ModelConfig) -> None:
    """Warn about a plugin name that no plugin registers in a section this mixer does not read (e.g.
    a typo in ``model.e2e.inner_loss`` of a ``mixer: ttt`` model): it has no effect, so the model is
    right, but a user who meant it to count should hear. Not an error: a config may keep another
    mixer's settings to switch back to (``model.mixer=attention`` on a TTT preset), and a checkpoint
    must load where a plugin it never used is not installed."""
    unread = unread_model_keys(config)
    for section, plugin_fields in PLUGIN_FIELDS.items():
        if section in PLUGIN_SECTIONS:  # model.family: its memory is checked by the member that reads it
            continue
        if f"model.{section}" not in unread:
            continue
        for key, kind in plugin_fields:
            name, registered = getattr(getattr(config, section), key), available(kind)
            if name not in registered:
                warnings.warn(
                    f"model.{section}.{key}={name!r} is not a registered {kind} (registered: "
                    f"{registered}); it is ignored, since model.mixer={config.mixer!r} does not "
                    f"read model.{section}",
                    UserWarning,
                    stacklevel=warning_stacklevel(),
                )


def _check_choices(config: ModelConfig) -> None:
    """``model.mixer`` and ``model.backbone`` are ones that exist, and ``model.e2e``'s fixed choices are
    among their values whatever the mixer, as every section's numbers are in their ranges (a typo is
    refused now, not when the section is first read)."""
    if config.mixer not in MIXER_TABLE and config.mixer != E2E:
        raise ValueError(
            f"model.mixer={config.mixer!r} is not a mixer; valid mixers: {list(MIXER_TABLE)}, "
            f"or {E2E!r} for the TTT-E2E model"
        )
    if config.backbone not in BACKBONES:
        raise ValueError(
            f"model.backbone={config.backbone!r} is not a backbone; valid backbones: {list(BACKBONES)}"
        )
    _check_e2e_choices(config.e2e)


def uses_rope(config: ModelConfig) -> bool:
    """Whether the model's mixers rotate queries and keys (RoPE, which needs an even head width):
    every mixer but the family's, which read positions through their convolutions."""
    return config.mixer not in FAMILY_MIXERS


def _check_shapes(config: ModelConfig) -> None:
    """Heads that divide the width, of an even width where the mixer applies RoPE (it rotates pairs
    of channels); the sizes' ranges are checked before (:data:`MODEL_FIELD_BOUNDS`)."""
    if config.hidden_size % config.num_heads:
        raise ValueError(
            f"model.hidden_size={config.hidden_size} must be divisible by model.num_heads={config.num_heads}"
        )
    if config.padding_id is not None and not 0 <= config.padding_id < config.vocab_size:
        raise ValueError(
            f"model.padding_id={config.padding_id} must be a token id in [0, {config.vocab_size}) "
            f"(model.vocab_size={config.vocab_size}), or null for none"
        )
    if uses_rope(config) and (config.hidden_size // config.num_heads) % 2:
        raise ValueError(
            f"model.hidden_size / model.num_heads = {config.hidden_size // config.num_heads} must be even "
            "(RoPE rotates pairs of channels)"
        )
    if config.mixer in FAMILY_MIXERS:  # the width is not the one _check_family builds its layer at
        inner_norm = FAMILY_LAYERS[config.mixer].fixed_options.get("inner_norm", (False, ""))[0]
        check_inner_norm_width(
            config.hidden_size, config.num_heads, inner_norm, rotary=False, prefix="model."
        )


def _check_ttt(ttt: TTTConfig) -> None:
    """The TTT layer's plugins are registered and can run together, and its options are valid."""
    for kind in ("inner_model", "inner_loss", "update_rule"):
        name = getattr(ttt, kind)
        choices = available(kind)
        if name not in choices:
            hint = get_registry().broken_hint(kind, name)  # a broken plugin that provides it, if any
            raise ValueError(
                f"model.ttt.{kind}={name!r} is not a registered {kind}; registered: {choices} "
                f"(`innerloop plugins` lists them with their sources). {hint}".rstrip()
            )
    if ttt.mini_batch_size < 1:
        raise ValueError(f"model.ttt.mini_batch_size={ttt.mini_batch_size} must be >= 1")
    # Some combinations cannot run together (e.g. the dual form needs a stack inner model): the
    # layer's own checks say so now, without building a layer.
    try:
        check_layer_arguments(
            4,
            1,
            inner_model=ttt.inner_model,
            inner_loss=ttt.inner_loss,
            update_rule=ttt.update_rule,
            mini_batch_size=ttt.mini_batch_size,
            conv_kernel=ttt.conv_kernel,
            share_qk=True,  # conv_kernel's range checked; whether it is read, load_config says
            kernel=ttt.kernel,
            inner_norm=ttt.inner_norm,
            inner_residual=ttt.inner_residual,
        )
    except ValueError as err:
        raise ValueError(f"model.ttt: {err}") from None


def _check_family(config: ModelConfig) -> None:
    """The family options fit the member ``config.mixer``, and its layer accepts them."""
    family = config.family
    _check_family_memory(config.mixer, family.memory)
    for key in ("mini_batch_size", "conv_kernel"):
        if getattr(family, key) < 1:
            raise ValueError(f"model.family.{key}={getattr(family, key)} must be >= 1")
    if not math.isfinite(family.base_lr) or family.base_lr < 0:
        raise ValueError(f"model.family.base_lr={family.base_lr} must be a finite number >= 0")
    _refuse_unused_family_options(config)
    try:  # the layer's own checks, on a width of 4 (a few hundred parameters)
        FAMILY_LAYERS[config.mixer](4, 1, **_family_options(config))
    except ValueError as err:
        raise ValueError(f"model.family: {err}") from None


def _check_family_memory(mixer: str, memory: str) -> None:
    """``model.family.memory`` is one the member reads: ``matrix`` (the only memory of linear attention,
    DeltaNet and Gated DeltaNet), or for Titans any registered inner model (its layer takes any, a
    plugin's as the built-in ``mlp``: the registry is asked, not a list of the built-ins)."""
    if mixer != "titans":
        if memory != "matrix":
            raise ValueError(
                f"model.family.memory={memory!r} is not a memory of mixer {mixer!r}; valid: ['matrix'] "
                "(only titans takes another memory: any registered inner_model)"
            )
        return
    choices = available("inner_model")
    if memory not in choices:
        hint = get_registry().broken_hint("inner_model", memory)  # a broken plugin that provides it, if any
        raise ValueError(
            f"model.family.memory={memory!r} is not a registered inner_model, which titans takes as its "
            f"memory; registered: {choices} (`innerloop plugins` lists them with their sources). {hint}".rstrip()
        )


def reset_unused_family_options(model: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A saved model config (a checkpoint's) with the ``model.family`` keys its member does not read
    set back to their defaults, and those keys as ``key=value`` (what they held). Such keys never had
    an effect (innerloop dropped them before it refused them), so the model is the one that trained;
    a new config with one is refused (``_check_family``)."""
    family = model.get("family")
    used = FAMILY_OPTIONS_USED.get(model.get("mixer"))  # type: ignore[arg-type]
    if used is None or not isinstance(family, dict):
        return model, []
    defaults = {option.name: option.default for option in fields(FamilyConfig)}
    unused = {
        key: value
        for key, value in family.items()
        if key in defaults and key not in used and key != "memory" and value != defaults[key]
        and not (key == "short_conv" and value is False)
    }  # fmt: skip
    if not unused:
        return model, []
    family = {**family, **{key: defaults[key] for key in unused}}
    return {**model, "family": family}, [f"model.family.{key}={value!r}" for key, value in unused.items()]


def _refuse_unused_family_options(config: ModelConfig) -> None:
    """A ``model.family`` key the member does not read, set away from its default, is an error (it was
    silently dropped): the message names the key, the member and the keys it reads."""
    used = FAMILY_OPTIONS_USED[config.mixer]
    for option in fields(FamilyConfig):
        key, value = option.name, getattr(config.family, option.name)
        if key in used or key == "memory" or value == option.default:
            continue
        if key == "short_conv" and value is False:  # "no short convs": what a member without them does
            continue
        raise ValueError(
            f"model.family.{key}={value!r} is not used by mixer {config.mixer!r} "
            f"({FAMILY_OPTIONS_UNUSED_WHY[key]}); it reads model.family.{{{', '.join(used)}}}: "
            f"drop it, or set it to its default {option.default!r}, which this mixer ignores"
        )


E2E_CHOICES: dict[str, tuple[str, ...]] = {
    "chunk_targets": ("next_token", "within_chunk"),
    "rope_positions": ("relative", "absolute"),
    "compute_dtype": ("float32", "bfloat16", "float16"),
    "outer_loss": ("chunk_mean", "token_mean"),
    "non_finite": ("raise", "ignore"),
}
"""The valid values of :class:`E2EConfig`'s string options (other than registry names); the first is
the default (for those that choose a reading of the method, the official code's)."""

EARLIER_E2E_DEFAULTS: dict[str, Any] = {
    "chunk_targets": "within_chunk",
    "rope_positions": "absolute",
    "outer_loss": "token_mean",
}
"""What a TTT-E2E model did before these options existed (their defaults are now the official code's):
a checkpoint, an export or a run's saved config.yaml that does not name them was trained, and must be
read, with these."""

E2E_CHECK_OPTIONS: tuple[str, ...] = ("non_finite",)
""":class:`E2EConfig` options that change no number a model computes (only whether NaN or inf from a
plugin raises): a stored config written before one existed describes the same model, and takes today's
default without a warning."""

EARLIER_TTT_DEFAULTS: dict[str, Any] = {"inner_norm": True, "inner_residual": True}
"""The TTT layer's inner wrapping before ``model.ttt`` could set it: the paper's, as today's default."""


def with_earlier_defaults(model: Any) -> Any:
    """A stored model config (a mapping: a checkpoint's, an export's config.json ``model`` section, a
    run's saved config.yaml ``model`` section) with the options added since it was written at the values
    its model used then (:data:`EARLIER_E2E_DEFAULTS`, :data:`EARLIER_TTT_DEFAULTS`), not at today's
    defaults; a new mapping (``model`` itself if it is not a mapping)."""
    if not isinstance(model, dict):
        return model
    if model.get("mixer") == E2E and isinstance(model.get("e2e"), dict):
        model = {**model, "e2e": {**EARLIER_E2E_DEFAULTS, **model["e2e"]}}
    if isinstance(model.get("ttt"), dict):  # written before model.ttt could set the inner wrapping
        model = {**model, "ttt": {**EARLIER_TTT_DEFAULTS, **model["ttt"]}}
    return model


def validate_e2e_config(config: ModelConfig) -> None:
    """Check ``config.e2e``; raise ``ValueError`` naming the key, its value and what is valid."""
    config = require_model_config(config)
    validate_e2e_options(config)
    e2e = config.e2e
    for key, kind in (("inner_loss", "model_inner_loss"), ("update_rule", "model_update_rule")):
        name, choices = getattr(e2e, key), available(kind)
        if name not in choices:
            hint = get_registry().broken_hint(kind, name)  # a broken plugin that provides it, if any
            raise ValueError(
                f"model.e2e.{key}={name!r} is not a registered {kind}; registered: {choices} "
                f"(`innerloop plugins` lists them with their sources). {hint}".rstrip()
            )


def validate_e2e_options(config: ModelConfig) -> None:
    """Check the options of ``config.e2e`` a model reads at every call (all but the plugins it was built
    with), which a user may change on a built model; ``ValueError`` naming the key, value and valid ones."""
    # Types first: a built model's options are plain attributes, so ``"false"`` for first_order or 0
    # for test_time_training would otherwise be read as truthy / falsy values here.
    check_field_types("model.e2e", config.e2e, E2EConfig)
    e2e = config.e2e
    if e2e.chunk_size < 1 or (e2e.chunk_size < 2 and e2e.chunk_targets == "within_chunk"):
        least = 2 if e2e.chunk_targets == "within_chunk" else 1
        raise ValueError(
            f"model.e2e.chunk_size={e2e.chunk_size} must be >= {least} with "
            f"chunk_targets={e2e.chunk_targets!r} (a chunk trains on its next-token pairs)"
        )
    if not 0 < e2e.suffix_fraction <= 1:
        raise ValueError(f"model.e2e.suffix_fraction={e2e.suffix_fraction} must be in (0, 1]")
    if e2e.prime_intermediate_size < 0:
        raise ValueError(
            f"model.e2e.prime_intermediate_size={e2e.prime_intermediate_size} must be >= 0 "
            "(0: the same as model.intermediate_size)"
        )
    for key in ("inner_lr", "inner_lr_start", "inner_grad_clip"):
        value = getattr(e2e, key)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"model.e2e.{key}={value} must be a finite number >= 0")
    if not 0 <= e2e.inner_lr_warmup_fraction <= 1:
        raise ValueError(
            f"model.e2e.inner_lr_warmup_fraction={e2e.inner_lr_warmup_fraction} must be in [0, 1] (1: a "
            "warm-up over the whole outer training)"
        )
    if e2e.skip_target_id is not None and not 0 <= e2e.skip_target_id < config.vocab_size:
        raise ValueError(
            f"model.e2e.skip_target_id={e2e.skip_target_id} must be a token id in [0, "
            f"{config.vocab_size}) (model.vocab_size), or null for none"
        )
    _check_e2e_choices(e2e)


def _check_e2e_choices(e2e: E2EConfig) -> None:
    """Each of ``model.e2e``'s string options (:data:`E2E_CHOICES`) is one of its values."""
    for key, choices in E2E_CHOICES.items():
        if getattr(e2e, key) not in choices:
            raise ValueError(f"model.e2e.{key}={getattr(e2e, key)!r} is not one of {list(choices)}")
