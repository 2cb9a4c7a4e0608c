"""The arguments of ``InnerloopForCausalLM.forward`` besides the token ids, checked before the model runs.

transformers' models share arguments that an innerloop model reads its own way or has no use for. Each
is handled here by name: the cache under its three names, the attention mask's shape and values,
positions, ``logits_to_keep``, ``output_hidden_states`` and the flags ``use_cache`` / ``return_dict``. Any other argument is refused, naming it: ignoring an
argument that changes another model's numbers would hide a mistake (e.g. a cache passed under a name the
model did not read gives the logits of the new tokens without their context).
"""

from __future__ import annotations

import math
import numbers
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy
import torch
from torch import nn

from innerloop.core.functional import as_integer, is_flag
from innerloop.core.wording import a_type, counted

CACHE_NAMES = ("cache", "past_key_values", "cache_params")
"""The names a cache is passed under: the model's own, transformers' usual one, and Mamba's."""

SUPPORTED_ARGUMENTS = (
    "input_ids, attention_mask, cache (or past_key_values, cache_params), labels, num_items_in_batch, "
    "use_cache, return_dict, logits_to_keep, output_hidden_states, output_attentions=False, position_ids or cache_position "
    "equal to the positions the model reads, token_type_ids of one segment (all 0), and tokenizer (which "
    "generate passes along for stop_strings)"
)
"""What ``InnerloopForCausalLM.forward`` reads (named by the refusal of anything else)."""

SUPPORTED_BASE_ARGUMENTS = (
    "input_ids, attention_mask, cache (or past_key_values, cache_params), use_cache, return_dict, "
    "output_hidden_states, output_attentions=False, position_ids or cache_position equal to the positions "
    "the model reads, and token_type_ids of one segment (all 0)"
)
"""What ``InnerloopModel.forward`` (the network without its LM head) reads."""


@dataclass(frozen=True)
class SequenceGiven:
    """The sequence argument the caller passed, ``input_ids`` or ``inputs_embeds``, and its shape: what
    every argument error names (inside ``forward`` ids of 0 stand for the embeddings, so their shape
    alone would name an argument the caller never passed). Shown as ``"inputs_embeds [2, 3, 32]"``."""

    name: str
    shape: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.name} {list(self.shape)}"


def sequence_given(input_ids: torch.Tensor, inputs_embeds: torch.Tensor | None) -> SequenceGiven:
    """The :class:`SequenceGiven` of a call: ``inputs_embeds`` where given (``input_ids`` are then the
    ids standing for them), else ``input_ids``."""
    if inputs_embeds is not None:
        return SequenceGiven("inputs_embeds", tuple(inputs_embeds.shape))
    return SequenceGiven("input_ids", tuple(input_ids.shape))


def shown_argument(name: str, value: Any) -> str:
    """``"input_ids [2, 3]"`` for a tensor, ``"input_ids (a list)"`` otherwise: an argument as a message
    shows it before its shape has been checked."""
    if isinstance(value, torch.Tensor):
        return f"{name} {list(value.shape)}"
    return f"{name} ({a_type(value)})"


def check_one_sequence(owner: str, input_ids: Any, inputs_embeds: Any, hidden_size: int) -> None:
    """Refuse a call of ``owner``'s forward given both ``input_ids`` and ``inputs_embeds``, or neither,
    naming what was given and the shapes each takes."""
    if (input_ids is None) != (inputs_embeds is None):
        return
    if input_ids is None:
        got = "neither"
    else:
        got = f"{shown_argument('input_ids', input_ids)} and {shown_argument('inputs_embeds', inputs_embeds)}"
    raise ValueError(
        f"{owner} takes input_ids or inputs_embeds: give one of them (input_ids [batch, length] or "
        f"inputs_embeds [batch, length, hidden_size={hidden_size}]), got {got}"
    )


def check_num_items_in_batch(value: Any) -> float | None:
    """``num_items_in_batch`` (the tokens transformers' ``Trainer`` counts over a step's micro-batches, by
    which the loss's sum is divided) as a float, or None when not given. An int or a tensor of one real
    number (0-d as the ``Trainer`` passes it, or ``[1]`` as ``DataParallel`` scatters it), finite and not
    negative; anything else is refused, naming it."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            raise ValueError(
                "num_items_in_batch must be an int or a tensor holding one number (the tokens the loss's sum "
                f"is divided by), got a tensor of shape {list(value.shape)} of {value.dtype}"
            )
        count = float(value.detach().reshape(()).item())
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
        count = float(value)
    else:
        raise ValueError(
            "num_items_in_batch must be an int or a tensor holding one number (the tokens the loss's sum is "
            f"divided by), got {type(value).__name__} {value!r}"
        )
    if not count >= 0 or count == float("inf"):
        raise ValueError(f"num_items_in_batch must be a finite count, 0 or more, got {count}")
    return count


def one_cache(cache: Any, past_key_values: Any, cache_params: Any) -> Any:
    """The cache given under any of :data:`CACHE_NAMES`, or None when none is. The same object under two
    names is one cache; two different objects are refused (which one to continue would be a guess)."""
    values = (cache, past_key_values, cache_params)
    given = {name: value for name, value in zip(CACHE_NAMES, values, strict=True) if value is not None}
    if len({id(value) for value in given.values()}) > 1:
        names = " and ".join(f"{name}={type(value).__name__}" for name, value in given.items())
        raise ValueError(
            f"forward got two different caches, {names}: pass one cache, as cache= (past_key_values= and "
            "cache_params= are other names for it)"
        )
    return next(iter(given.values()), None)


def check_mask_shape(
    attention_mask: Any,
    input_ids: torch.Tensor,
    cached: int,
    caller: str = "",
    given: SequenceGiven | None = None,
) -> None:
    """``attention_mask`` covers the tokens the cache has read (``cached``) and the new ones, as in
    transformers: ``[batch, cached + length]``; with a cache, ``[batch, length]`` is taken too (a mask of
    the new tokens alone, what many decoding loops pass, or in ``generate()`` the whole prompt passed
    with its cache). Anything else is refused, naming both shapes; ``caller`` (``"generate()"``) starts
    the message; ``given``, the sequence argument the caller passed (default: ``input_ids``), is named.
    (The mask's values are checked by :func:`check_mask_values`.)"""
    if attention_mask is None:
        return
    batch, length = input_ids.shape
    expected = [batch, cached + length]
    valid = [expected, [batch, length]] if cached else [expected]
    if isinstance(attention_mask, torch.Tensor) and list(attention_mask.shape) in valid:
        return
    also = f", or [batch, length] = {valid[1]}" if cached else ""
    given = given or sequence_given(input_ids, None)
    raise ValueError(
        f"{caller + ': ' if caller else ''}attention_mask must be [batch, cached + length] = {expected}{also} "
        f"({given} after {counted(cached, 'token')} in the cache), got {_shape_of(attention_mask)}"
    )


def check_other_arguments(
    arguments: dict[str, Any],
    start: int,
    length: int,
    owner: str = "InnerloopForCausalLM",
    supported: str = SUPPORTED_ARGUMENTS,
    attention_mask: torch.Tensor | None = None,
    generates: bool = True,
    pads: torch.Tensor | None = None,
    given: SequenceGiven | None = None,
) -> None:
    """Refuse, naming them, the arguments ``forward`` does not read, but accept what changes nothing:
    an argument given as None, ``output_attentions`` off, and ``position_ids`` / ``cache_position`` equal
    to the positions of the new tokens (``start .. start + length - 1``: innerloop models count
    positions in their cache) where ``attention_mask`` (checked, ``[batch, start + length]``) holds ones:
    a pad's position is read by nothing (GPT-2's recipe, ``mask.cumsum(-1) - 1`` with the pads set to 1,
    gives ``[0, 1, 2, 1, 1]`` for a row padded on the right); in a left-padded batch (``pads [batch]``,
    each row's pads) ``position_ids`` count each row's own tokens (``start - pads .. ``, as that recipe
    gives them), while ``cache_position`` counts columns. ``owner`` and ``supported``: the class and
    what its forward reads, for the message; ``generates``: the model is a ``GenerationMixin``, whose
    ``generate(stop_strings=..., tokenizer=...)`` passes ``tokenizer`` along (accepted, unused); ``given``:
    the sequence argument the caller passed, named by a refusal of the positions (None: ``input_ids``)."""
    unsupported = []
    for name, value in arguments.items():
        if value is None:
            continue
        if name in ("position_ids", "cache_position"):
            offsets = pads if name == "position_ids" else None
            _check_positions(name, value, start, length, attention_mask, offsets, given)
        elif name == "tokenizer" and generates:  # generate(stop_strings=...) passes it
            continue
        elif name == "token_type_ids":
            _check_one_segment(value)
        elif name == "output_attentions":
            if value is not False:
                raise ValueError(
                    f"output_attentions={value!r} is not supported: innerloop models do not return "
                    "attention weights (most of their mixers have none); leave it False"
                )
        else:
            unsupported.append(name)
    if unsupported:
        raise ValueError(
            f"{owner}.forward got argument(s) it does not use: {', '.join(unsupported)}; "
            f"supported: {supported}"
        )


def _check_one_segment(token_type_ids: Any) -> None:
    """``token_type_ids`` (which some tokenizers return, so that ``model(**tokenizer(text))`` passes
    them) must all be 0: one segment, which is what a model without segment embeddings reads."""
    if not isinstance(token_type_ids, torch.Tensor):
        raise ValueError(
            f"token_type_ids must be a tensor of segment ids (all 0), got {type(token_type_ids).__name__}"
        )
    if not bool((token_type_ids == 0).all()):
        raise ValueError(
            "token_type_ids holds segments other than 0: innerloop models have no segment embeddings, so "
            "they would read every token as segment 0; drop token_type_ids or make them all 0"
        )


def _check_positions(
    name: str,
    value: Any,
    start: int,
    length: int,
    attention_mask: torch.Tensor | None = None,
    offsets: torch.Tensor | None = None,
    given: SequenceGiven | None = None,
) -> None:
    """``value`` must be ``[length]`` or ``[rows, length]`` integer positions ``start .. start + length - 1``
    (any where ``attention_mask [rows, start + length]`` is 0: a pad's position is read by nothing), less
    each row's ``offsets [rows]`` (its left pads) when given; ``given`` names the sequence passed."""
    expected = torch.arange(start, start + length)
    if offsets is not None:
        expected = expected - offsets.detach().cpu()[:, None]  # [rows, length]
    fits = (
        isinstance(value, torch.Tensor)
        and not (value.is_floating_point() or value.dtype == torch.bool)
        and value.dim() in (1, 2)
        and value.shape[-1] == length
        and (offsets is None or value.numel() // max(length, 1) in (1, len(offsets)))
    )
    if fits:
        right = value.detach().cpu().reshape(-1, length) == expected  # [rows or 1, length]
        if attention_mask is not None and right.shape[0] in (1, attention_mask.shape[0]):
            right = right | (attention_mask.detach().cpu()[:, -length:] == 0)
        if bool(right.all()):
            return
    shown = value.tolist() if isinstance(value, torch.Tensor) and value.numel() <= 16 else _shape_of(value)
    raise ValueError(
        f"{name} must be the positions of {given or 'input_ids'} after the {counted(start, 'token')} in the cache, "
        f"{start}..{start + length - 1} ([{length}] or [batch, {length}]), got {shown}: innerloop models "
        f"count positions in their cache{_left_padding_note(offsets)}; leave {name} out"
        f"{_packing_note(value) if fits else ''}"
    )


def _left_padding_note(offsets: torch.Tensor | None) -> str:
    """For a left-padded batch (``offsets``: each row's pads), that its positions are counted per row."""
    if offsets is None:
        return ""
    return f" (left-padded rows count their own tokens: less each row's pads, {offsets.tolist()})"


def _packing_note(positions: torch.Tensor) -> str:
    """What to do when ``positions [..., length]`` restart inside a row (examples packed into one row, as
    transformers' ``DataCollatorWithFlattening`` makes them): leaving them out would not keep the
    examples apart."""
    restarts = bool((positions.detach().cpu().reshape(-1, positions.shape[-1]).diff(dim=-1) < 0).any())
    if not restarts:
        return ""
    return (
        ". They restart inside a row (examples packed into one row, as DataCollatorWithFlattening makes "
        "them): an innerloop model reads a row as one sequence through one recurrent state, so packed "
        "examples would read each other; give one example per row (padded to the right, not packed)"
    )


def _shape_of(value: Any) -> str:
    """``"shape [2, 3]"`` for a tensor, else the type's name: how an error shows a wrong argument."""
    if isinstance(value, torch.Tensor):
        return f"shape {list(value.shape)}"
    return a_type(value)


def check_logits_to_keep(
    logits_to_keep: Any, batch: int, length: int, given: SequenceGiven | None = None
) -> None:
    """Refuse a ``logits_to_keep`` that transformers' models do not take, or that points outside the
    logits of ``input_ids [batch, length]`` (``transformers.modeling_utils.slice_logits_to_keep``, which
    ``forward`` applies to the logits ``[batch, length, V]``):

    - an int ``k >= 0`` keeps the last ``k`` positions (0, or a ``k`` past ``length``, keeps all of them);
    - a 1-D integer tensor holds the positions kept in every row, ``-length .. length - 1`` (transformers
      indexes the logits with it: -1 is the last position); a 2-D one ``[batch, n]`` those of each row,
      ``0 .. length - 1`` (out of range, ``torch.take_along_dim`` silently reads another row's logits);
    - a bool tensor is a mask of the positions kept, ``[length]`` for every row or ``[batch, length]``
      (the kept logits of a 2-D mask then come flattened, ``[kept, V]``).

    The message names what was given, what is valid and the sequence argument passed (``given``; None:
    ``input_ids [batch, length]``). Reading a tensor's range costs one device sync.
    """
    logits_to_keep = plain_logits_to_keep(logits_to_keep)
    if isinstance(logits_to_keep, int) and not isinstance(logits_to_keep, bool) and logits_to_keep >= 0:
        return
    given = given or SequenceGiven("input_ids", (batch, length))
    problem = _logits_to_keep_problem(logits_to_keep, batch, length, given.name)
    if problem is None:
        return
    raise ValueError(
        f"logits_to_keep must be an int >= 0 (keep the last k positions; 0 keeps all), a 1-D integer tensor "
        f"of positions {-length}..{length - 1}, a [{batch}, n] one of positions 0..{length - 1}, or a bool "
        f"mask [{length}] or [{batch}, {length}] ({given}), got {problem}"
    )


def plain_logits_to_keep(logits_to_keep: Any) -> Any:
    """``logits_to_keep`` as the Python int it holds where it is a numpy integer (the library's one integer
    rule, :func:`~innerloop.core.functional.as_integer`; transformers slices by ``isinstance(k, int)``);
    a tensor keeps transformers' meaning (the positions kept), anything else is returned for the check."""
    if isinstance(logits_to_keep, torch.Tensor):
        return logits_to_keep
    integer = as_integer(logits_to_keep)
    return logits_to_keep if integer is None else integer


def _logits_to_keep_problem(logits_to_keep: Any, batch: int, length: int, sequence: str) -> str | None:
    """What is wrong with a ``logits_to_keep`` that is not an int ``>= 0`` (see
    :func:`check_logits_to_keep`), as the end of its message, or None when it is valid; ``sequence``
    names the argument whose positions they are."""
    if not isinstance(logits_to_keep, torch.Tensor):
        return f"{logits_to_keep!r} ({type(logits_to_keep).__name__})"
    shape, dtype = list(logits_to_keep.shape), logits_to_keep.dtype
    is_mask = dtype == torch.bool
    if logits_to_keep.dim() not in (1, 2) or not (is_mask or _is_integer(dtype)):
        return f"a tensor of shape {shape} and {dtype}"
    if is_mask:
        return None if shape in ([length], [batch, length]) else f"a bool mask of shape {shape}"
    if logits_to_keep.dim() == 2 and shape[0] != batch:
        return f"an integer tensor of shape {shape}, whose first dimension is not the batch, {batch}"
    if logits_to_keep.numel() == 0:
        return None
    low, high = torch.stack(torch.aminmax(logits_to_keep)).tolist()  # one sync for both
    lowest = -length if logits_to_keep.dim() == 1 else 0  # a 1-D tensor indexes: -1 is the last position
    if low >= lowest and high < length:
        return None
    return f"position {low if low < lowest else high}, outside the {length} positions of {sequence}"


def _is_integer(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def check_mask_values(attention_mask: Any, caller: str = "") -> None:
    """Refuse an ``attention_mask`` (a tensor, its shape checked by :func:`check_mask_shape`) that holds
    a value other than 0 and 1 (a bool mask is always fine): 0.5, 2, -1 or NaN would otherwise be taken
    for a token. ``caller`` (``"generate()"``) starts the message. One device sync."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dtype == torch.bool:
        return
    valid = (attention_mask == 0) | (attention_mask == 1)
    if bool(valid.all()):
        return
    bad = attention_mask[~valid][0].item()
    raise ValueError(
        f"{caller + ': ' if caller else ''}attention_mask holds the value {bad!r} ({attention_mask.dtype}): a mask "
        "holds 1 for a token and 0 for padding (or True / False, a bool tensor), nothing else"
    )


def check_flag(name: str, value: Any) -> None:
    """Refuse a ``use_cache`` / ``return_dict`` that is not True, False or None, a numpy bool, or an
    integer 0 or 1 (a string such as ``"no"`` would be read as true)."""
    if value is None or isinstance(value, (bool, numpy.bool_)):
        return
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return
    kind = f"{type(value).__module__}.{type(value).__qualname__}".removeprefix("builtins.")
    raise ValueError(f"{name} must be True, False or None, got {value!r} ({kind})")


def hidden_states_wanted(output_hidden_states: Any, default: bool, is_e2e: bool) -> bool:
    """Whether to return the hidden states: ``output_hidden_states``, or ``default`` (the config's) when
    None. True or False only (transformers' selection by index is not supported), and not for the
    TTT-E2E model."""
    wanted = default if output_hidden_states is None else output_hidden_states
    if not is_flag(wanted):  # a numpy bool too, as use_cache and return_dict take
        raise ValueError(
            f"output_hidden_states must be True or False (selecting hidden states by index is not "
            f"supported), got {wanted!r}"
        )
    wanted = bool(wanted)
    if wanted and is_e2e:
        raise ValueError(
            "output_hidden_states=True is not supported for the TTT-E2E model (model.mixer='e2e'): its "
            "last blocks run chunk by chunk, each chunk with the fast weights trained on the chunks before "
            "it, and innerloop does not record their outputs; leave output_hidden_states off"
        )
    return wanted


@contextmanager
def recording_hidden_states(network: nn.Module) -> Iterator[list[torch.Tensor]]:
    """While the block runs, a forward of ``network`` (a :class:`~innerloop.models.CausalLM`) appends its
    hidden states to the list yielded, as transformers' models return them: the embedding's output, the
    output of each block but the last, then the final norm's output (the last block's output,
    normalised: what the LM head reads). ``num_layers + 1`` tensors ``[B, T, D]`` in all. Only this thread's
    forwards are recorded: another thread's forward of the same model meanwhile added its own."""
    recorded: list[torch.Tensor] = []
    owner = threading.get_ident()

    def keep(module: nn.Module, args: Any, output: Any) -> None:
        if threading.get_ident() == owner:
            recorded.append(output[0] if isinstance(output, tuple) else output)  # a block returns (h, state)

    modules = [network.embed, *network.blocks[:-1], network.norm]
    handles = [module.register_forward_hook(keep) for module in modules]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


GENERATION_COUNTS = {
    "num_beams": 1,
    "num_return_sequences": 1,
    "max_new_tokens": 1,
    "max_length": 1,
    "min_new_tokens": 0,
    "min_length": 0,
    "no_repeat_ngram_size": 0,
}
"""The generation settings that count (beams, sequences, tokens, an n-gram's tokens) and their least value;
None (unset) is valid for all but the first two. ``no_repeat_ngram_size``: transformers applies it only
where it is > 0 (and checks it is an int there), so NaN repeated n-grams silently; 0 is off."""


def check_generation_counts(generation_config: Any) -> None:
    """``ValueError`` naming the setting unless each of :data:`GENERATION_COUNTS` is an integer at least
    its least value (or None where that means unset): transformers' own checks miss some, and then
    ``num_beams=0`` failed dividing by zero, ``num_beams=-1`` on a negative dimension,
    ``num_return_sequences=0`` returned one sequence and ``max_new_tokens=2.5`` generated 3 tokens."""
    for name, least in GENERATION_COUNTS.items():
        value = getattr(generation_config, name, None)
        if value is None and name not in ("num_beams", "num_return_sequences"):
            continue
        number = as_integer(value)
        if number is None or number < least:
            raise ValueError(f"generate({name}={value!r}): {name} must be an integer >= {least}")


_CUT_OFF_RANGES: dict[str, tuple[str, Any, str]] = {
    "top_p": ("a number in [0, 1]", lambda v: 0 <= v <= 1, "1 or None: every token"),
    "typical_p": ("a number in (0, 1]", lambda v: 0 < v <= 1, "1 or None: every token"),
    "epsilon_cutoff": ("a number in [0, 1)", lambda v: 0 <= v < 1, "0 or None: no cut"),
    "eta_cutoff": ("a number in [0, 1)", lambda v: 0 <= v < 1, "0 or None: no cut"),
}
"""Sampling's cut-offs whose range transformers checks only for a value it applies (``top_p`` and
``typical_p`` below 1, ``epsilon_cutoff``/``eta_cutoff`` inside (0, 1)): outside it (NaN too) it cut no
token, silently. Each: the valid range in words, the test, the value that turns it off."""


def _real_setting(value: Any) -> float | None:
    """A generation setting's number as a float: a Python or numpy real (not a bool) or a 0-d real
    tensor (transformers takes either and computes with it); None for anything else (None, a tuple)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        if value.dtype == torch.bool or value.dtype.is_complex:
            return None
        return float(value.item())
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return None


def check_sampling_values(generation_config: Any) -> None:
    """``ValueError`` naming the setting, when sampling (``do_sample``), for a ``temperature`` that is not
    finite or a cut-off outside its range (:data:`_CUT_OFF_RANGES`: ``top_p`` [0, 1], ``typical_p``
    (0, 1], ``epsilon_cutoff``/``eta_cutoff`` [0, 1); NaN too), before anything runs: transformers
    refuses a temperature <= 0 and NaN, but sampled every token alike at ``temperature=inf`` (where
    ``innerloop.models.generate`` and ``innerloop generate`` refuse a temperature that is not finite), and
    checks each cut-off's range only for a value it applies, so ``top_p=1.5``, ``typical_p=nan`` or
    ``epsilon_cutoff=1.5`` cut no token, silently. A 0-d tensor is checked as the number it holds."""
    if not getattr(generation_config, "do_sample", False):
        return  # greedy search and beam search read neither
    temperature = getattr(generation_config, "temperature", None)
    number = _real_setting(temperature)
    if number is not None and not math.isfinite(number):
        raise ValueError(
            f"generate(temperature={temperature!r}): temperature must be a finite real number > 0 when "
            "sampling (do_sample=True; do_sample=False decodes greedily)"
        )
    for name, (valid, within, off) in _CUT_OFF_RANGES.items():
        value = getattr(generation_config, name, None)
        number = _real_setting(value)
        if number is not None and not within(number):
            raise ValueError(f"generate({name}={value!r}): {name} must be {valid} when sampling ({off})")


def check_penalty_values(generation_config: Any) -> None:
    """``ValueError`` naming the setting, before anything runs, for a setting that scores tokens and is not
    a finite number (a 0-d tensor checked as the number it holds): ``length_penalty`` in a beam search
    (``num_beams > 1``, the search that reads it), ``repetition_penalty``, ``guidance_scale``, both
    numbers of ``exponential_decay_length_penalty`` (its start and factor), and a ``sequence_bias`` that is
    NaN (``-inf`` bans its sequence). transformers ran each silently: ``length_penalty=nan`` returned fewer
    tokens than asked with scores NaN, ``inf`` scored every beam -0.0; a NaN bias or guidance scale made the
    logits NaN, which greedy's argmax picks (token 0, or the biased one, at every step); a NaN start never
    started the decay."""
    settings = {
        "repetition_penalty": getattr(generation_config, "repetition_penalty", None),
        "guidance_scale": getattr(generation_config, "guidance_scale", None),
        "length_penalty": getattr(generation_config, "length_penalty", None)
        if (getattr(generation_config, "num_beams", None) or 1) > 1
        else None,
    }
    for name, value in settings.items():
        number = _real_setting(value)
        if number is not None and not math.isfinite(number):
            raise ValueError(f"generate({name}={value!r}): {name} must be a finite real number")
    decay = getattr(generation_config, "exponential_decay_length_penalty", None)
    if isinstance(decay, (tuple, list)) and len(decay) == 2:
        numbers_given = [_real_setting(part) for part in decay]
        if any(number is not None and not math.isfinite(number) for number in numbers_given):
            raise ValueError(
                f"generate(exponential_decay_length_penalty={decay!r}): its start and factor must be finite "
                "real numbers"
            )
    _check_sequence_bias(getattr(generation_config, "sequence_bias", None))


def _check_sequence_bias(sequence_bias: Any) -> None:
    """``ValueError`` for a ``sequence_bias`` (``{tokens: bias}`` or ``[[tokens, bias], ...]``) holding a
    NaN bias, naming it; another form is transformers' to check."""
    if isinstance(sequence_bias, dict):
        pairs = list(sequence_bias.items())
    elif isinstance(sequence_bias, (list, tuple)):
        pairs = [tuple(pair) for pair in sequence_bias if isinstance(pair, (list, tuple)) and len(pair) == 2]
    else:
        return
    for tokens, bias in pairs:
        number = _real_setting(bias)
        if number is not None and math.isnan(number):
            raise ValueError(
                f"generate(sequence_bias={sequence_bias!r}): the bias of {list(tokens)} is NaN, which makes "
                "its logit NaN (greedy search picks it at every step); give a number (-inf bans it)"
            )


ASSISTED_SETTINGS = ("prompt_lookup_num_tokens", "assistant_early_exit", "use_mtp")
"""The generation settings that turn greedy search or sampling into assisted generation, besides
``generate(assistant_model=...)``."""


def check_not_assisted(generation_mode: Any, generation_config: Any, generation_mode_kwargs: Any) -> None:
    """``ValueError`` naming the setting that asked for assisted (speculative) generation: it scores draft
    tokens and then crops the cache back to those it accepts, and an innerloop model's recurrent state
    cannot be cropped. transformers raised a bare ``RuntimeError: Assisted decoding requires a cache``."""
    if str(getattr(generation_mode, "value", generation_mode)) != "assisted_generation":
        return
    given = [
        f"{name}={getattr(generation_config, name)!r}"
        for name in ASSISTED_SETTINGS
        if getattr(generation_config, name, None) not in (None, False)
    ]
    kwargs = generation_mode_kwargs if isinstance(generation_mode_kwargs, dict) else {}
    if kwargs.get("assistant_model") is not None:
        given.insert(0, f"assistant_model={type(kwargs['assistant_model']).__name__}")
    raise ValueError(
        f"generate({', '.join(given) or 'an assistant'}): assisted (speculative) generation is not supported "
        "by innerloop models: it scores draft tokens and then crops the cache back to the accepted ones, and "
        "a recurrent state cannot be cropped; generate without it (greedy search, sampling or beam search)"
    )
