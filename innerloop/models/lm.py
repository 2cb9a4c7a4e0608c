"""A causal language model: token embedding, blocks, final RMSNorm, LM head (tied to the embedding
unless ``model.tie_embeddings`` is false).

The model is an RNN when its mixers are: ``logits, state = model(ids, state)`` continues a sequence
from ``state``, which is how :func:`innerloop.models.generate` decodes one token at a time.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

import torch
from torch import nn
from torch._C._functorch import get_unwrapped, is_batchedtensor, is_functorch_wrapped_tensor
from torch.utils.checkpoint import checkpoint

from innerloop.core.eager import run_eagerly
from innerloop.core.family_layers import FamilyLayer
from innerloop.core.functional import RMSNorm, check_flag, check_positive_int
from innerloop.core.layer import CALL_OPTIONS, TTTLayer, check_input_recordable
from innerloop.core.state import check_batch_rows, check_states
from innerloop.core.wording import a_type
from innerloop.models.blocks import Block, BlockState
from innerloop.models.config import (
    ModelConfig,
    built_fields_of_causal_lm,
    changed_built_field,
    check_fits_in_memory,
    config_value,
    require_model_config,
    validate_model_config,
)

TOKEN_ID_DTYPES = (torch.int64, torch.int32)
"""The dtypes a model takes token ids in (those ``nn.Embedding`` indexes with)."""


@dataclass(frozen=True)
class LMState:
    """The recurrent state of a :class:`CausalLM`: one :class:`BlockState` per block."""

    blocks: tuple[BlockState, ...]

    def detach(self) -> LMState:
        """The same state cut from the autograd graph."""
        return LMState(tuple(block.detach() for block in self.blocks))

    def to(self, *args: Any, **kwargs: Any) -> LMState:
        """The state moved or cast like ``Tensor.to`` (what a model moved with ``model.to(...)``
        continues from): every block's state."""
        return LMState(tuple(block.to(*args, **kwargs) for block in self.blocks))

    def clone(self) -> LMState:
        """A copy whose tensors own their memory (gradients flow back through the copy): e.g. a state
        made under ``torch.inference_mode`` as normal tensors, cloned outside it."""
        return LMState(tuple(block.clone() for block in self.blocks))

    @property
    def batch_size(self) -> int:
        """Sequences held."""
        return self.blocks[0].batch_size

    def index_select(self, rows: torch.Tensor) -> LMState:
        """The state of the sequences ``rows`` in that order: a 1-D int64 tensor of batch rows,
        repeats allowed (reorder beams, keep some sequences of a batch, repeat one prompt's state for
        several samples). Each row continues exactly as that sequence alone would."""
        rows = check_batch_rows(rows, self.batch_size)
        return LMState(tuple(block._take_rows(rows) for block in self.blocks))

    @classmethod
    def cat(cls, states: Sequence[LMState]) -> LMState:
        """One state holding the sequences of ``states`` one after the other (``[B_1 + B_2 + ...]``):
        states of one model that have read the same number of tokens, in one dtype, e.g. of batches
        read separately. Anything else is refused, naming what differs."""
        states = check_states(states, cls, "LMState")
        depths = {len(s.blocks) for s in states}
        if len(depths) > 1:
            raise ValueError(
                f"cannot concatenate LMStates of {sorted(depths)} blocks: states of other models"
            )
        per_block = zip(*(s.blocks for s in states), strict=True)
        return LMState(tuple(BlockState.cat(list(blocks)) for blocks in per_block))

    def block_positions(self) -> dict[int, int]:
        """Tokens each block's mixer state has read, by block index (a mixer state that records no
        ``position``, a plugin's, is left out)."""
        return {
            i: block.mixer.position
            for i, block in enumerate(self.blocks)
            if isinstance(getattr(block.mixer, "position", None), int)
        }

    @property
    def position(self) -> int | None:
        """Tokens the state has read: its blocks' (a model refuses a state whose blocks disagree,
        :func:`check_same_block_positions`); None when no block records one."""
        return next(iter(self.block_positions().values()), None)

    def nbytes(self) -> int:
        """Bytes of every tensor of the state, by its own size: what the state describes between tokens.
        A full-attention cache decoded without autograd is a view of a buffer with room to grow
        (docs/architecture.md), so the memory it holds can be up to that room larger; the TTT and
        sliding-window states hold exactly this."""
        return sum(t.numel() * t.element_size() for t in _tensors(self))


def check_same_block_positions(state: LMState) -> None:
    """Every block's mixer state has read as many tokens (each block reads every token): a state
    assembled by hand from blocks of other positions would place RoPE, windows and mini-batches
    elsewhere in each block, so it is refused, naming the blocks. Mixer states without a ``position``
    (a plugin's) are not compared."""
    positions = state.block_positions()
    if len(set(positions.values())) > 1:
        described = ", ".join(f"state.blocks[{i}] at {position}" for i, position in positions.items())
        raise ValueError(
            f"the blocks' states have read different numbers of tokens ({described}): the state was edited "
            "or assembled from different states; pass the state this model returned, or None"
        )


torch.serialization.add_safe_globals([LMState])  # torch.load(weights_only=True): a tuple of BlockStates


def _tensors(obj: object) -> Iterator[torch.Tensor]:
    """Every tensor reachable from ``obj`` through dataclass fields, dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif is_dataclass(obj) and not isinstance(obj, type):
        for f in fields(obj):
            yield from _tensors(getattr(obj, f.name))
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


def _batched_by_vmap(t: torch.Tensor) -> bool:
    """Whether ``torch.func.vmap`` batches ``t`` at any level of its wrappers. grad, vjp and jvp wrap every
    tensor made inside them (``batch[:, :-1]``), whose values can still be read: not batched."""
    while is_functorch_wrapped_tensor(t):
        if is_batchedtensor(t):
            return True
        t = get_unwrapped(t)
    return False


def check_not_vmap_batched(input_ids: torch.Tensor, name: str = "input_ids") -> None:
    """Refuse, naming ``name``, ids that ``torch.func.vmap`` batches: a model reads their values, which
    torch reads of no batched tensor (ids made inside grad, vjp or jvp are read). Reads no value."""
    if _batched_by_vmap(input_ids):
        raise TypeError(
            f"{name} is batched by a torch.func transform (vmap): the model reads the ids' values "
            "(their range, padding, positions), which torch.func cannot batch; pass the batch as one "
            "[batch, length] tensor instead (model(input_ids) runs the rows independently)"
        )


@run_eagerly("innerloop: the token id checks read values")  # as the TTT layer's input checks
def check_token_ids(
    input_ids: Any,
    vocab_size: int | None,
    name: str = "input_ids",
    min_length: int = 0,
    not_scored: tuple[int, str] | None = None,
) -> None:
    """Refuse, naming ``name``, anything but a ``[batch, length >= min_length]`` integer tensor of ids
    in ``[0, vocab_size)`` (None: any id >= 0), or the id of ``not_scored`` (``(id, its name)``: targets'
    ignore index). Costs one min/max pass over the ids and one device sync."""
    check_token_id_layout(input_ids, name, min_length)
    check_not_vmap_batched(input_ids, name)
    if input_ids.numel() == 0 or input_ids.device.type == "meta":  # meta: shapes only, no ids to read
        return
    ids = input_ids if not_scored is None else torch.where(input_ids == not_scored[0], 0, input_ids)
    low, high = torch.stack(torch.aminmax(ids)).tolist()  # one sync for both
    if low < 0 or (vocab_size is not None and high >= vocab_size):
        bad = low if low < 0 else high
        valid = ">= 0" if vocab_size is None else f"0..{vocab_size - 1}"
        if not_scored is not None:
            valid += f", or {not_scored[0]} ({not_scored[1]}) for a target not scored"
        raise ValueError(
            f"{name} holds token id {bad}, outside the model's vocabulary of vocab_size={vocab_size} "
            f"tokens: valid ids are {valid}"
        )


def check_same_device(input_ids: torch.Tensor, weight: torch.Tensor, name: str = "input_ids") -> None:
    """Refuse, naming ``name``, ids on another device than the model's ``weight`` (torch's own error, "Expected
    all tensors to be on the same device", names neither). Reads no value: no device sync."""
    if input_ids.device != weight.device:
        raise ValueError(
            f"{name} are on {input_ids.device} but the model's weights are on {weight.device}: move them to "
            f"the model's device ({name}.to('{weight.device}'))"
        )


def check_token_id_layout(input_ids: Any, name: str = "input_ids", min_length: int = 0) -> None:
    """Refuse, naming ``name``, anything but a ``[batch, length >= min_length]`` tensor of integer token
    ids (:data:`TOKEN_ID_DTYPES`). Reads no value: no device sync."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of token ids [batch, length], got {type(input_ids).__name__}"
        )
    if input_ids.dtype not in TOKEN_ID_DTYPES:
        raise TypeError(
            f"{name} must hold integer token ids (dtype torch.int64 or torch.int32), got dtype "
            f"{input_ids.dtype}"
        )
    if input_ids.dim() != 2 or input_ids.shape[1] < min_length:
        length = f"length >= {min_length}" if min_length else "length"
        raise ValueError(f"{name} must be [batch, {length}], got shape {tuple(input_ids.shape)}")


LOW_PRECISION_DTYPES = (torch.bfloat16, torch.float16)
"""The floating dtypes ``torch.autocast`` runs in, which a model's weights may also be in."""


@run_eagerly("innerloop: the precision check reads the autocast state")
def check_weights_under_autocast(
    model: nn.Module, device_type: str, autocast_dtype: torch.dtype | None = None, source: str = ""
) -> None:
    """Refuse, naming both dtypes, a model whose weights are in one low-precision dtype while it would
    run under ``torch.autocast`` to another (bfloat16 weights under float16 autocast, or float16
    weights under bfloat16). torch's autocast does not mix the two: some models fail deep inside
    ("Unexpected floating ScalarType in at::autocast::prioritize"), others run in a mix of both, so
    every model refuses them before it runs. What runs: float32 (or float64) weights under any
    autocast, and bfloat16 / float16 weights without autocast or under autocast to their own dtype.

    ``autocast_dtype`` and ``source``: the dtype the model would autocast to and what sets it (a model
    option); None: the enclosing ``torch.autocast`` on ``device_type``, if it is on.
    """
    if autocast_dtype is None:
        if device_type == "meta" or not torch.is_autocast_enabled(device_type):
            return
        autocast_dtype = torch.get_autocast_dtype(device_type)
        source = f"torch.autocast({device_type!r}) is on with dtype {autocast_dtype}"
    clashing = sorted(
        {
            str(p.dtype)
            for p in model.parameters()
            if p.dtype in LOW_PRECISION_DTYPES and p.dtype != autocast_dtype
        }
    )
    if clashing:
        weights = " and ".join(clashing)
        raise TypeError(
            f"the model's weights are {weights} but {source}: a model in bfloat16 or float16 runs "
            f"without autocast or under autocast to its own dtype. Keep the weights float32 for mixed "
            f"precision (model.float()), or use one dtype for both (model.to({autocast_dtype}))"
        )


def check_init_std(std: float, weight: torch.Tensor) -> None:
    """Refuse ``model.init_std`` below the smallest normal number of the dtype ``weight`` is drawn in:
    the config's bound is float32's (and bfloat16's), 1.18e-38, but a model built in float16
    (``from_config(..., dtype=torch.float16)``, ``torch.set_default_dtype``) has 6.10e-05, and
    ``init_std=1e-8`` there drew 99.8% of its weights as exact zeros, without a word. Nothing is drawn
    on the meta device, where ``from_pretrained`` builds a model whose weights it then loads: a trained
    model of any ``init_std`` loads in float16."""
    smallest = torch.finfo(weight.dtype).tiny
    if std < smallest and not weight.is_meta:
        name = str(weight.dtype).removeprefix("torch.")
        raise ValueError(
            f"model.init_std={std!r} rounds to 0 or to a subnormal in {name}, the dtype the weights are "
            f"built in (most of them would be drawn as zeros); valid: a number >= {smallest:.2e} in {name} "
            f"(>= {torch.finfo(torch.float32).tiny:.2e} in float32 or bfloat16); the default is 0.02"
        )


def init_embedding(embed: nn.Embedding, std: float) -> None:
    """Normal(0, ``std``) for an embedding table, its padding row (``padding_idx``, if any) zero, as the
    reference models initialise theirs. ``std`` is first checked against the table's dtype
    (:func:`check_init_std`): every model draws its embedding first."""
    check_init_std(std, embed.weight)
    nn.init.normal_(embed.weight, std=std)
    if embed.padding_idx is not None:
        with torch.no_grad():
            embed.weight[embed.padding_idx].zero_()


CheckpointFunction = Callable[..., Any]
"""How a block runs recomputed in the backward: ``torch.utils.checkpoint.checkpoint``'s signature
(``function, *args``), its options bound (``functools.partial``)."""

CHECKPOINT_BLOCKS = functools.partial(checkpoint, use_reentrant=False)
"""The default :data:`CheckpointFunction`: a non-reentrant checkpoint, which replays the RNG (dropout)
and passes gradients through every tensor of a block's input and output, the carried states' too."""


CHECKPOINT_OPTIONS = frozenset(
    p.name for p in inspect.signature(checkpoint).parameters.values() if p.kind is p.KEYWORD_ONLY
) | {"preserve_rng_state"}  # documented, but read from checkpoint's **kwargs, not a parameter of it
"""The options ``torch.utils.checkpoint.checkpoint`` takes by keyword (``use_reentrant``, ``context_fn``,
``preserve_rng_state``, ...): the keys ``gradient_checkpointing_kwargs`` may hold."""


def check_checkpoint_function(function: Any, name: str = "gradient_checkpointing_func") -> None:
    """Refuse, naming ``name``, what is not callable or is a reentrant ``torch.utils.checkpoint``
    (``use_reentrant=True``): a reentrant checkpoint passes gradients only through tensors given and
    returned as such, not through the states a block takes and returns inside dataclasses (the
    gradients came out wrong, silently: by 2.5 for ``swa``, 78 for TTT-Linear). torch's ``checkpoint``
    without ``use_reentrant`` is reentrant, so it is refused too."""
    if not callable(function):
        raise TypeError(f"{name} must be callable like torch.utils.checkpoint.checkpoint, got {function!r}")
    options = getattr(function, "keywords", None) or {}
    base = function.func if isinstance(function, functools.partial) else function
    unknown = sorted(set(options) - CHECKPOINT_OPTIONS) if base is checkpoint else []
    if unknown:  # transformers' partial of checkpoint with a user's dict: torch would pass them to the block
        raise ValueError(
            f"{name} has {unknown}, not options of torch.utils.checkpoint.checkpoint; "
            f"valid: {sorted(CHECKPOINT_OPTIONS)}"
        )
    # torch's checkpoint without use_reentrant is reentrant (with a warning; torch >= 2.9 may refuse it)
    reentrant = options.get("use_reentrant", None if base is checkpoint else False)
    if reentrant is not False:
        given = "torch's default, reentrant" if reentrant is None else "given"
        remedy = (
            "; add use_reentrant=False to the options (a dict given to transformers' checkpointing reaches "
            "torch as it is)"
            if reentrant is None
            else ""
        )
        raise ValueError(
            f"{name} has use_reentrant={reentrant!r} ({given}): innerloop's blocks are checkpointed "
            "non-reentrantly only (use_reentrant=False): a reentrant checkpoint passes no gradient through the "
            f"states the blocks carry, so the gradients would come out wrong{remedy}"
        )


def _checkpoint_function(
    kwargs: Mapping[str, Any] | None, function: CheckpointFunction | None
) -> CheckpointFunction:
    """What :meth:`CausalLM.gradient_checkpointing_enable` runs each block through, checked."""
    if kwargs is not None and function is not None:
        raise ValueError("give gradient_checkpointing_kwargs or checkpoint_function, not both")
    if function is not None:
        check_checkpoint_function(function, "checkpoint_function")
        return function
    if kwargs is None:
        return CHECKPOINT_BLOCKS
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise TypeError(
            f"gradient_checkpointing_kwargs must be a dict of torch.utils.checkpoint.checkpoint's keyword "
            f"arguments, got {kwargs!r}"
        )
    options = sorted(CHECKPOINT_OPTIONS)
    unknown = sorted(set(kwargs) - CHECKPOINT_OPTIONS)
    if unknown:  # torch would pass them on to the block, which fails at the first forward
        raise ValueError(
            f"gradient_checkpointing_kwargs has {unknown}, not options of torch.utils.checkpoint.checkpoint; "
            f"valid: {options}"
        )
    function = functools.partial(checkpoint, **{"use_reentrant": False, **kwargs})
    check_checkpoint_function(function, "gradient_checkpointing_kwargs")
    return function


def _call_options_pinned(block: nn.Module) -> Callable[..., Any]:
    """``block``'s forward with its TTT layers' call options (:data:`~innerloop.core.layer.CALL_OPTIONS`:
    ``base_lr``, ``non_finite``, ``kernel``, ...) as they are now, also when a checkpoint recomputes it in
    the backward. Options changed between the forward and the backward (the training loop lets NaN through
    while its forward runs, ``non_finite='ignore'``, and puts ``'raise'`` back before the backward) would
    otherwise recompute another function: torch's check refuses one that saves other tensors, and one of
    the same shapes (a new ``base_lr``) would give wrong gradients silently."""
    layers = [m for m in block.modules() if isinstance(m, TTTLayer)]
    pinned = [{name: layer.__dict__[name] for name in CALL_OPTIONS} for layer in layers]

    def forward_as_then(*args: Any) -> Any:
        now = [{name: layer.__dict__[name] for name in CALL_OPTIONS} for layer in layers]
        for layer, options in zip(layers, pinned, strict=True):
            layer.__dict__.update(options)  # the values the layer held and checked: no new check
        try:
            return block(*args)
        finally:
            for layer, options in zip(layers, now, strict=True):
                layer.__dict__.update(options)

    return forward_as_then


def _head_is_embedding(model: nn.Module) -> bool:
    return model.lm_head.weight is model.embed.weight


def tie_head_to_embedding(model: nn.Module, given: str | None = None) -> None:
    """Make ``model.lm_head.weight`` and ``model.embed.weight`` one Parameter again after something made
    two of the one they were: ``to_empty`` off the meta device (``nn.Module._apply`` gives each module its
    own new Parameter) or ``load_state_dict(..., assign=True)`` (each key its own). Two would read as tied
    values once, then train apart (the embedding's gradient without the head's share). Kept: the one a
    load was given alone (``given``: ``"embed"`` or ``"lm_head"``), else of a real and a meta one the
    real one, else the embedding's. Callers call it only where the two were one before (a head a user
    untied on purpose stays untied)."""
    embed, head = model.embed.weight, model.lm_head.weight
    if head is embed:
        return
    if given == "lm_head" or (given is None and embed.is_meta and not head.is_meta):
        kept = head
    else:
        kept = embed
    model.embed.weight = kept
    model.lm_head.weight = kept


_TIED_KEYS = ("embed.weight", "lm_head.weight")


def _before_load(model: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """The pre-load hook of every :class:`MaterialisableLM`: notes whether the head is the embedding (to
    tie them again after an ``assign`` load) and which of the two the state dict gives; refuses, before
    anything is loaded, two different tensors for one tied Parameter (copied one after the other, the
    head's would silently replace the embedding's)."""
    tied = _head_is_embedding(model)
    given = [key for key in _TIED_KEYS if prefix + key in state_dict]
    if tied and len(given) == 2:
        embed, head = (state_dict[prefix + key] for key in _TIED_KEYS)
        real = isinstance(embed, torch.Tensor) and isinstance(head, torch.Tensor)
        comparable = real and embed.shape == head.shape and not embed.is_meta and not head.is_meta
        if comparable and not torch.equal(embed, head.to(embed)):
            raise ValueError(
                f"this model's LM head is its embedding (one Parameter: model.tie_embeddings), but the state "
                f"dict gives {prefix}embed.weight and {prefix}lm_head.weight different values; load it into "
                "a model built with tie_embeddings=False, or give one tensor for both"
            )
    model._tied_before_load = (tied, given[0].split(".")[0] if len(given) == 1 else None)


def _after_load(model: nn.Module, incompatible_keys: Any) -> None:
    """The post-load hook of every innerloop language model (:class:`MaterialisableLM`): the head tied to
    the embedding again where it was before the load. (The layers remake their own derived buffers by
    their own post-load hook, :func:`~innerloop.core.layer.remake_meta_derived_buffers`.)"""
    tied, given = model.__dict__.pop("_tied_before_load", (False, None))
    if tied:
        tie_head_to_embedding(model, given)


class MaterialisableLM(nn.Module):
    """The base of innerloop's language models (:class:`CausalLM`, :class:`~innerloop.models.E2ELM`):
    one built under ``torch.device("meta")`` and made real by ``to_empty`` (then a load) or by
    ``load_state_dict(..., assign=True)`` is the model built normally: the LM head stays tied to the
    embedding (one Parameter, both gradients in it) and the derived buffers no state dict holds are
    made again (by the layers' own load hook). A head the user untied (a Parameter of its own) stays
    untied through both. Subclasses set ``config``, ``embed`` and ``lm_head``."""

    config: ModelConfig
    embed: nn.Embedding
    lm_head: nn.Linear

    def __init__(self) -> None:
        super().__init__()
        self.register_load_state_dict_pre_hook(_before_load)
        self.register_load_state_dict_post_hook(_after_load)

    def reset_parameters(self) -> None:
        """Initialise every weight again as a fresh build of ``type(self)(self.config)`` does, on this
        model's device and in its dtypes, in place (the Parameters stay, so an optimizer holding them
        goes on): the initialisation after ``to_empty``, which leaves garbage (NaN, 1e30), for a model
        built under ``torch.device("meta")`` and not loaded from a checkpoint. A fresh model is built
        beside this one (on its device, so for a moment twice its memory) and copied in, with its
        derived tables: under the same seed the result is the fresh build, bit for bit, whatever plugin
        made a layer. ``model.apply(lambda m: m.reset_parameters())`` ends here (a module's
        after its children's). A model still on the meta device is refused (``to_empty`` first)."""
        device = next(iter(self.parameters())).device
        if device.type == "meta":
            raise ValueError(
                f"reset_parameters of {a_type(self)} on the meta device: make it real first "
                "(model.to_empty(device=...)), then reset_parameters()"
            )
        with torch.device(device):
            fresh = type(self)(self.config)
        targets = dict(self.named_parameters(remove_duplicate=False)) | dict(self.named_buffers())
        with torch.no_grad():
            for name, value in [*fresh.named_parameters(remove_duplicate=False), *fresh.named_buffers()]:
                targets[name].copy_(value)

    def _apply(self, fn: Any, recurse: bool = True) -> MaterialisableLM:
        """``nn.Module``'s (``.to``, ``to_empty``, ...), then the head tied to the embedding again if
        it was before."""
        built = "embed" in self._modules and "lm_head" in self._modules
        tied = built and _head_is_embedding(self)
        super()._apply(fn, recurse)
        if tied:
            tie_head_to_embedding(self)
        return self


class CausalLM(MaterialisableLM):
    """Decoder-only language model whose blocks use the mixer named in ``config``.

    Activation (gradient) checkpointing: :meth:`gradient_checkpointing_enable` (``trainer.
    gradient_checkpointing`` in a run) recomputes each block in the backward instead of keeping its
    activations, while the model trains with gradients on.

    Args:
        config: a :class:`ModelConfig`; it is validated (names, shapes, plugin names) first. The model
            keeps a copy as ``model.config`` (edit that one): the caller's may go on to build others.
    """

    def __init__(self, config: ModelConfig | Mapping[str, Any]) -> None:
        super().__init__()
        # its own copy: a config the caller edits to build another model must not change this one
        config = copy.deepcopy(require_model_config(config))
        if config.mixer == "e2e":
            raise ValueError(
                "model.mixer='e2e' is a whole model of its own: build it with innerloop.models.build_model "
                "(or innerloop.models.E2ELM)"
            )
        validate_model_config(config)
        check_fits_in_memory(config)
        self.config = config
        # what the build reads, to refuse a later change that the blocks would not see (check_built_fields)
        self._built = {field: config_value(config, field) for field in built_fields_of_causal_lm(config)}
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.padding_id)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self._init_weights()
        self._gradient_checkpointing = False
        self._checkpoint_every = 1
        self._gradient_checkpointing_func: CheckpointFunction = CHECKPOINT_BLOCKS

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether blocks are recomputed in the backward (:meth:`gradient_checkpointing_enable`)."""
        return self._gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        check_flag("gradient_checkpointing", enabled)  # a string such as 'no' would turn it on
        self._gradient_checkpointing = bool(enabled)

    def gradient_checkpointing_enable(
        self,
        gradient_checkpointing_kwargs: Mapping[str, Any] | None = None,
        *,
        every_n_layers: int = 1,
        checkpoint_function: CheckpointFunction | None = None,
    ) -> None:
        """Recompute blocks in the backward instead of keeping their activations (less memory, one more
        forward of the blocks per backward): every ``every_n_layers``-th block from the first, each
        through ``torch.utils.checkpoint.checkpoint`` with ``gradient_checkpointing_kwargs`` (as Hugging
        Face's models take them; ``use_reentrant`` defaults to False, and True is refused), or through
        ``checkpoint_function`` (a function of ``checkpoint``'s signature; not with the kwargs). Only
        while the model is in training mode with gradients on: evaluation, ``torch.no_grad`` and
        decoding run as before. Loss and gradients are those without it (the carried states' too)."""
        every_n_layers = check_positive_int("every_n_layers", every_n_layers)
        function = _checkpoint_function(gradient_checkpointing_kwargs, checkpoint_function)
        self._checkpoint_blocks_through(function, every_n_layers)

    def _checkpoint_blocks_through(self, function: CheckpointFunction, every_n_layers: int) -> None:
        """Turn checkpointing on with ``function``, which the caller has checked
        (:func:`check_checkpoint_function`, naming its own parameter: the Hugging Face wrapper's is
        ``gradient_checkpointing_kwargs``), every ``every_n_layers``-th block."""
        self._checkpoint_every = check_positive_int("every_n_layers", every_n_layers)
        self._gradient_checkpointing_func = function
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        """Keep every block's activations again (the default)."""
        self.gradient_checkpointing = False

    def _checkpoints_block(self, index: int) -> bool:
        """Whether block ``index`` runs recomputed in the backward in this call."""
        on = self._gradient_checkpointing and self.training and torch.is_grad_enabled()
        return on and index % self._checkpoint_every == 0

    def _init_weights(self) -> None:
        """Normal(0, init_std) for the embedding and every linear projection, biases zero.

        "Every" includes the mixers' projections (a TTT layer's q, k, v, o and gate, a family layer's):
        the reference models initialise all of them so (ttt-lm-pytorch's ``TTTPreTrainedModel.
        _init_weights``, ttt-lm-jax's ``kernel_init=normal(initializer_range)``, FLA's models). Left
        at PyTorch's default (uniform, std 1/sqrt(3 * width)), a 64-wide TTT layer's projections
        would start 3.6x larger than the reference's. The layers' inner parameters (the initial inner
        weights, the inner lr gate, the norms) are initialised by the layers, as in the reference.

        The convs follow the same references: the pre-conv and a TTT layer's shared-QK convs keep
        PyTorch's default (uniform in +-1/sqrt(kernel), bias too), which ttt-lm-pytorch's
        ``_init_weights`` (``nn.Linear`` and ``nn.Embedding`` only) leaves them at; the family layers'
        short convs are drawn like their projections, normal(0, init_std), as FLA's models draw every
        ``nn.Conv1d``.
        """
        std = self.config.init_std
        init_embedding(self.embed, std)
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.weight is not self.embed.weight:
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for block in self.blocks:
            if isinstance(block.mixer, FamilyLayer):
                for conv in block.mixer.modules():
                    if isinstance(conv, nn.Conv1d):  # FLA's short convs: no bias
                        nn.init.normal_(conv.weight, std=std)

    def forward(self, input_ids: torch.Tensor, state: LMState | None = None) -> tuple[torch.Tensor, LMState]:
        """``input_ids [B, T]`` (int64) → ``logits [B, T, vocab]`` and the state after the last token.

        Passing the returned state with the next chunk continues the sequence.
        """
        self._check_inputs(input_ids, state)
        return self._run(input_ids, state, head=True)  # logits [B, T, V]

    def features(self, input_ids: torch.Tensor, state: LMState | None = None) -> tuple[torch.Tensor, LMState]:
        """``input_ids [B, T]`` → what the LM head reads, ``[B, T, hidden_size]`` (the last block's output
        after the final norm), and the state after the last token: :meth:`forward` without the head
        (``lm_head(features)`` is its logits), for the hidden states of a sequence or a step of it."""
        self._check_inputs(input_ids, state)
        return self._run(input_ids, state, head=False)

    def _run(
        self, input_ids: torch.Tensor, state: LMState | None, head: bool
    ) -> tuple[torch.Tensor, LMState]:
        """The blocks on checked inputs, then the final norm and the LM head (``head``): in one function
        with the eager checks before it, so that torch.compile breaks a graph where the blocks do and
        the head is in the graph of the final norm (a call of :meth:`features` from :meth:`forward` made
        the head's matmul a graph of its own)."""
        h = self.embed(input_ids)  # [B, T, D]
        new_states = []
        for i, block in enumerate(self.blocks):
            block_state = None if state is None else state.blocks[i]
            if self._checkpoints_block(i):
                h, block_state = self._gradient_checkpointing_func(
                    _call_options_pinned(block), h, block_state
                )
            else:
                h, block_state = block(h, block_state)
            new_states.append(block_state)
        h = self.norm(h)
        return self.lm_head(h) if head else h, LMState(tuple(new_states))

    def check_built_fields(self, config: ModelConfig | Mapping[str, Any] | None = None) -> None:
        """Raise ``ValueError`` if a field of ``self.config`` the model read only when it was built
        (:func:`~innerloop.models.config.built_fields_of_causal_lm`: its shapes, mixer options, norms'
        epsilon, ...) no longer has that value: checked at every forward and before the model is saved.
        Ignored, the change left the model computing as before while checkpoints and exports recorded
        the new value, so the model read back computed another function. ``config``: the config to
        check instead of ``self.config`` (a Hugging Face config's ``model`` dict, which it saves)."""
        changed_built_field(self._built, self.config if config is None else config, {})

    def rebuilt(self, field: str) -> None:
        """Record ``self.config``'s present value of ``field`` as the one the model is built with: for
        code that has rebuilt what the field makes (``resize_token_embeddings``: the embedding and head
        for ``vocab_size``), so that :meth:`check_built_fields` no longer refuses it."""
        if field not in self._built:
            raise ValueError(
                f"field={field!r} is not read when this model is built; valid: {sorted(self._built)}"
            )
        self._built[field] = config_value(self.config, field)

    @run_eagerly("innerloop: the input checks read values")  # as the TTT layer's input checks
    def _check_inputs(self, input_ids: Any, state: Any) -> None:
        """The ids are ``[B, T]`` in the vocabulary and ``state`` (if given) is one this model returned
        for ``B`` sequences: checked before any block runs (a block's pre-conv would otherwise fail on
        a state of another batch before its mixer's check)."""
        self.check_built_fields()  # before the ids: vocab_size is read there
        check_token_ids(input_ids, self.config.vocab_size)
        check_same_device(input_ids, self.embed.weight)
        check_input_recordable(input_ids, self.embed, "input_ids", "model's embedding")  # only it reads them
        check_weights_under_autocast(self, self.embed.weight.device.type)
        if state is None:
            return
        if not isinstance(state, LMState):
            raise TypeError(
                f"state must be the LMState a previous call of this model returned (or None), got "
                f"{type(state).__name__}"
            )
        if len(state.blocks) != len(self.blocks):
            raise ValueError(f"state has {len(state.blocks)} blocks, the model has {len(self.blocks)}")
        for i, block in enumerate(self.blocks):
            block.check_state(state.blocks[i], input_ids.shape[0], f"state.blocks[{i}]")
        check_same_block_positions(state)

    def num_parameters(self) -> int:
        """Number of distinct parameters (a tied head counted once)."""
        return sum(p.numel() for p in self.parameters())
