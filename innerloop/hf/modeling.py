"""``InnerloopForCausalLM``: every innerloop language model as a Hugging Face ``PreTrainedModel`` with
``GenerationMixin``.

The wrapped network is exactly the one :func:`innerloop.models.build_model` builds from the config's
``model`` section (a :class:`~innerloop.models.CausalLM` with any mixer and plugins, or the TTT-E2E
:class:`~innerloop.models.E2ELM`), held as ``self.model``: the logits are innerloop's own.

``generate()`` decodes through innerloop's recurrent state. The state travels between steps in an
:class:`InnerloopCache` (the ``cache`` of the outputs); the prompt is read in one call and each new
token alone, so with TTT or sliding-window mixers the memory does not grow with the tokens generated.
innerloop models read every token into their state, so padding cannot be masked out of one state: a
left-padded batch (zeros then ones in each row of the mask, as ``generate()`` and lm-eval's
``generate_until`` pad prompts) is read row group by row group, each row without its pads (rows with as
many pads share a state, in a :class:`LeftPaddedCache`), so each row equals its prompt alone; right
padding is accepted only for scoring (no cache), and holes are refused.
A cache can be passed back to ``generate()`` (``cache=``, ``past_key_values=``) to continue its sequence.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import json
import os
import re
import shlex
import shutil
import tempfile
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.generation.logits_process import LogitsProcessor, TemperatureLogitsWarper
from transformers.generation.stopping_criteria import StoppingCriteriaList
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils import ModelOutput

try:
    import fcntl
except ImportError:  # not on Windows: staging folders a killed save left are then not removed
    fcntl = None  # type: ignore[assignment]

from innerloop.checkpoints import (
    SAFETENSORS_FLOAT_DTYPES,
    check_held_plugins,
    check_plugin_settings,
    missing_keys_note,
    plugin_record,
    plugin_sources,
    remake_token_index,
    token_index_made_in,
    warn_changed_plugins,
)
from innerloop.core.callers import warning_stacklevel
from innerloop.core.compiled import COMPILED, is_compiled_name, plain_names
from innerloop.core.durable import fsync_directory
from innerloop.core.eager import run_eagerly
from innerloop.core.functional import (
    as_integer,
    first_non_finite,
    integer_or_given,
    scored_cross_entropy_sum,
    user_path,
)
from innerloop.core.layer import NonFiniteRowsError
from innerloop.core.state import check_batch_rows
from innerloop.core.wording import counted
from innerloop.data.atomic import atomic_write_text, file_sha256, flush_files_in, permissions_to_give
from innerloop.hf.arguments import (
    CACHE_NAMES,
    SUPPORTED_ARGUMENTS,
    SUPPORTED_BASE_ARGUMENTS,
    SequenceGiven,
    check_flag,
    check_generation_counts,
    check_logits_to_keep,
    check_mask_shape,
    check_mask_values,
    check_not_assisted,
    check_num_items_in_batch,
    check_one_sequence,
    check_other_arguments,
    check_penalty_values,
    check_sampling_values,
    hidden_states_wanted,
    one_cache,
    plain_logits_to_keep,
    recording_hidden_states,
    sequence_given,
    shown_argument,
)
from innerloop.hf.configuration import InnerloopConfig, model_config_from, with_earlier_defaults
from innerloop.hf.remote_code import AUTO_MAP, write_shims
from innerloop.models import E2EState, LMState, build_model
from innerloop.models.config import E2E, E2E_CHECKPOINTING_REFUSED, check_fits_in_memory
from innerloop.models.lm import (
    CHECKPOINT_BLOCKS,
    CheckpointFunction,
    MaterialisableLM,
    check_checkpoint_function,
    check_init_std,
    check_not_vmap_batched,
    check_token_id_layout,
)

COMPILED_NAME = rf"(?<![^.]){COMPILED}\."
"""The ``_orig_mod.`` segment of a weight name of a torch.compile'd model or part, as a regex for
transformers' ``key_mapping``: removed by ``from_pretrained``, so a folder saved from a compiled model by an
earlier innerloop loads (:func:`~innerloop.checkpoints.plain_names`)."""


class InnerloopCache:
    """The recurrent state of an innerloop model between calls, as ``generate()`` carries it.

    Attributes:
        state: innerloop's :class:`~innerloop.models.LMState` or :class:`~innerloop.models.E2EState`.
        seq_length: tokens read so far.
        fingerprint: ``[batch]`` int64, a hash of each row's tokens read so far (see
            :func:`token_fingerprint`), or None; ``generate()`` checks with it that a prompt passed with
            the cache starts with the tokens the cache has read.
        embedding_fingerprint: ``[batch]`` int64, a hash of the embeddings each row has read, bit for bit
            (:func:`embedding_fingerprint`: ``inputs_embeds`` as given, token ids as the embedding gives
            them, a pad as zeros), or None (a cache made by hand): what ``generate()`` compares a prompt
            with where there are no ids to compare (``inputs_embeds``, or a cache that read embeddings).
        dtype, device: the model's dtype and device when it made the cache (None for a cache made by
            hand): the model refuses the cache once it is in another dtype or on another device, since
            the state cannot be converted with it (read the sequence again instead).

    Its size does not depend on ``seq_length`` for TTT and sliding-window mixers (full attention keeps
    every key and value). It implements what transformers' ``generate()`` reads of a cache, so a cache
    can be passed back to continue its sequence (``generate(ids, cache=out.cache)``, with ``ids`` the
    whole sequence); beam search reorders it (:meth:`reorder_cache`, with the state's ``index_select``).
    """

    is_compileable = False
    is_croppable = False
    embedding_fingerprint: torch.Tensor | None = None  # what a cache saved before it was kept reads

    def __init__(
        self,
        state: LMState | E2EState,
        seq_length: int,
        fingerprint: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
        embedding_fingerprint: torch.Tensor | None = None,
    ) -> None:
        self.state = state
        self.seq_length = integer_or_given(seq_length)  # a numpy or 0-d tensor length as its int
        self.fingerprint = fingerprint
        self.dtype = dtype
        self.device = device
        self.embedding_fingerprint = embedding_fingerprint

    @property
    def is_linear(self) -> list[bool]:
        """``[False]``, read by ``generate()``: a prompt passed with this cache holds the tokens the cache
        has read, and is cut to the tokens after them (``get_seq_length()``). (For caches it calls
        "linear", transformers passes the whole prompt: the state would read its tokens twice.)"""
        return [False]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens read so far (``layer_idx`` is ignored: every block has read the same tokens)."""
        return self.seq_length

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Keep the rows ``beam_idx`` (a 1-D int64 tensor of batch rows, repeats allowed) of the cache,
        in that order, in place, as transformers' beam search asks: each row then continues the
        sequence of the row it came from (the state's ``index_select``)."""
        selected = self.index_select(beam_idx)
        self.state, self.fingerprint = selected.state, selected.fingerprint
        self.embedding_fingerprint = selected.embedding_fingerprint

    def index_select(self, rows: torch.Tensor) -> InnerloopCache:
        """A new cache of the sequences ``rows`` (a 1-D int64 tensor of batch rows, repeats allowed)
        of this one, in that order; this cache is unchanged."""
        state = self.state.index_select(rows)  # checks rows, naming what is valid
        fingerprint, embedding = rows_of(self.fingerprint, rows), rows_of(self.embedding_fingerprint, rows)
        return InnerloopCache(state, self.seq_length, fingerprint, self.dtype, self.device, embedding)

    def nbytes(self) -> int:
        """Bytes of the state's tensors (:meth:`~innerloop.models.LMState.nbytes`)."""
        return self.state.nbytes()

    @property
    def batch_size(self) -> int:
        """Sequences held."""
        return self.state.batch_size


class LeftPaddedCache(InnerloopCache):
    """The cache of a left-padded batch: each row's state has read its own tokens alone, without the pads.

    Rows with as many pads (prompts of one length) share one :class:`InnerloopCache` (``groups``: pad
    count -> the cache of the rows with that many pads, in row order); ``pads [batch]`` int64 counts
    each row's pads. ``seq_length`` counts the columns read, pads included (what ``generate()`` and the
    attention mask count); a row's own state has read ``seq_length - pads[row]`` tokens. ``state`` is
    None: the states are the groups'.
    """

    def __init__(
        self,
        groups: dict[int, InnerloopCache],
        pads: torch.Tensor,
        seq_length: int,
        fingerprint: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
        embedding_fingerprint: torch.Tensor | None = None,
    ) -> None:
        super().__init__(None, seq_length, fingerprint, dtype, device, embedding_fingerprint)  # type: ignore[arg-type]
        self.groups = groups
        self.pads = pads

    def index_select(self, rows: torch.Tensor) -> LeftPaddedCache:
        """A new cache of the sequences ``rows`` (a 1-D int64 tensor of batch rows, repeats allowed)."""
        rows = check_batch_rows(rows, self.batch_size).to(self.pads.device)
        new_pads = self.pads[rows]
        groups = {}
        for count, group in self.groups.items():
            members = (self.pads == count).nonzero().flatten()  # the old rows of the group, in order
            local = torch.full_like(self.pads, -1)
            local[members] = torch.arange(len(members), device=local.device)
            taken = rows[new_pads == count]
            if len(taken):
                groups[count] = group.index_select(local[taken])
        fingerprint, embedding = rows_of(self.fingerprint, rows), rows_of(self.embedding_fingerprint, rows)
        return LeftPaddedCache(
            groups, new_pads, self.seq_length, fingerprint, self.dtype, self.device, embedding
        )

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Keep the rows ``beam_idx`` in that order, in place (beam search)."""
        selected = self.index_select(beam_idx)
        self.groups, self.pads, self.fingerprint = selected.groups, selected.pads, selected.fingerprint
        self.embedding_fingerprint = selected.embedding_fingerprint

    def nbytes(self) -> int:
        """Bytes of the groups' states."""
        return sum(group.nbytes() for group in self.groups.values())

    @property
    def batch_size(self) -> int:
        """Sequences held."""
        return int(self.pads.shape[0])


torch.serialization.add_safe_globals([InnerloopCache, LeftPaddedCache])
# torch.load's default weights_only=True loads a saved cache: it holds a state (registered by innerloop's
# models), ints, a tensor, a dtype and a device, and has no __setstate__ or __reduce__ that could run code.

_HASH_MODULUS = 2**31 - 1
_HASH_BASE = 1_000_003


def token_fingerprint(input_ids: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
    """A polynomial hash (mod 2^31 - 1) of each row of ``input_ids [B, T]``, continuing ``previous [B]``
    (the hash of the tokens before them): ``[B]`` int64. A few small integer ops for a decoding step."""
    ids = input_ids.to(torch.int64) % _HASH_MODULUS + 1  # [B, T]; + 1: a leading 0 still counts
    length = ids.shape[1]
    powers = torch.ones(1, dtype=torch.int64, device=ids.device)  # powers[k] = base^k
    step = _HASH_BASE
    while powers.numel() < length:
        powers = torch.cat((powers, powers * step % _HASH_MODULUS))
        step = step * step % _HASH_MODULUS
    weights = powers[:length].flip(0)  # [T]: base^(T-1-t) for the token at t
    total = (ids * weights % _HASH_MODULUS).sum(dim=1) % _HASH_MODULUS  # [B]
    if previous is None:
        return total
    return (previous.to(ids.device) * pow(_HASH_BASE, length, _HASH_MODULUS) + total) % _HASH_MODULUS


def rows_of(fingerprint: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
    """The ``rows`` of a cache's ``fingerprint [batch]`` (None stays None)."""
    return None if fingerprint is None else fingerprint[rows.to(fingerprint.device)]


_SAME_WIDTH_INTEGER = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_HASHED_AT_ONCE = 2**22  # numbers hashed in one piece: a long prompt's hash needs no large temporary
_GOLDEN_64 = (
    0x9E3779B97F4A7C15  # odd: each feature's weight below is odd, so one changed number changes the sum
)


def _feature_weights(width: int, device: torch.device) -> torch.Tensor:
    """``[width]`` int64, odd and distinct: feature h's weight in a token's hash ((2h + 1) times an odd
    constant, modulo 2^64 as int64 arithmetic wraps)."""
    odd = torch.arange(width, dtype=torch.int64, device=device) * 2 + 1
    return odd * (_GOLDEN_64 - 2**64)  # the constant as a signed 64-bit number


def _mixed(numbers: torch.Tensor) -> torch.Tensor:
    """Each int64 of ``numbers`` through a bijection that is not linear (the high half xored into the low,
    then times an odd constant): a token's hash sums its features' mixed numbers, so two numbers changed
    together no longer cancel (a linear sum took +3 in feature 0 and -1 in feature 1 as no change)."""
    numbers = numbers ^ ((numbers >> 32) & 0xFFFFFFFF)  # a logical shift: the low half xored, the high kept
    return numbers * (_GOLDEN_64 - 2**64)


def embedding_fingerprint(embeds: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
    """A hash of each row of ``embeds [B, T, H]``, bit for bit, continuing ``previous [B]`` (the hash of
    the embeddings before them): ``[B]`` int64. Each token's H floats' bits are summed with odd weights
    modulo 2^64 (int64 arithmetic wraps; exact in any order of summation), then the tokens are hashed as
    ids (:func:`token_fingerprint`): two different embeddings hash alike about once in 2^31 (each
    weighted number is first :func:`_mixed`, so numbers changed together do not cancel). Hashed in
    pieces: a long prompt needs no large temporary."""
    batch, length, width = embeds.shape
    bits = embeds.detach().contiguous().view(_SAME_WIDTH_INTEGER[embeds.element_size()])
    tokens = bits.reshape(batch * length, width)
    weights = _feature_weights(width, embeds.device)
    step = max(1, _HASHED_AT_ONCE // max(width, 1))
    per_token = torch.cat(
        [
            _mixed(tokens[start : start + step].to(torch.int64) * weights).sum(dim=1)
            for start in range(0, batch * length, step)
        ]
        or [torch.zeros(0, dtype=torch.int64, device=embeds.device)]
    )
    return token_fingerprint(per_token.reshape(batch, length), previous)


def embeddings_read(
    embeds: torch.Tensor, attention_mask: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """``embeds [B, T, H]`` as the cache's :func:`embedding_fingerprint` hashes them: in the model's
    ``dtype``, and zeros where ``attention_mask`` (its last ``T`` columns) is 0 (a pad is read by nothing,
    so its embedding is not compared)."""
    embeds = embeds.detach().to(dtype)
    if attention_mask is None:
        return embeds
    keep = attention_mask[:, -embeds.shape[1] :].to(device=embeds.device, dtype=torch.bool)
    return embeds.masked_fill(~keep[..., None], 0.0)


def check_embeddings_mask_shape(attention_mask: Any, inputs_embeds: torch.Tensor, cached: int) -> None:
    """``generate()``'s ``inputs_embeds`` are the whole sequence (transformers reads them after the
    ``cached`` tokens a cache passed in has read, from there on), so their mask is ``[batch, length]`` of
    them: a mask of ``[batch, cached + length]`` (as ``input_ids`` of the new tokens alone take) is
    refused, naming both shapes. (Other shapes: :func:`check_mask_shape`.)"""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        return
    batch, length = inputs_embeds.shape[:2]
    if not cached or list(attention_mask.shape) == [batch, length]:
        return
    raise ValueError(
        f"generate(): attention_mask must be [batch, length] = {[batch, length]} with inputs_embeds "
        f"{list(inputs_embeds.shape)}, got shape {list(attention_mask.shape)}: in generate(), inputs_embeds "
        f"hold the whole sequence, the {counted(cached, 'token')} the cache has read included, and the mask covers "
        "the same tokens: pass the mask of the sequence the embeddings hold"
    )


def check_cache_length(cache: InnerloopCache) -> None:
    """A cache's ``seq_length`` is what its state has read: ``generate()`` cuts the prompt at it, so a
    cache whose count disagrees (one made or edited by hand) would read tokens twice or skip them."""
    length = cache.seq_length
    if not isinstance(length, int) or isinstance(length, bool) or length < 0:
        raise ValueError(f"cache.seq_length must be an integer >= 0, got {length!r}")
    if isinstance(cache, LeftPaddedCache):
        for count, group in cache.groups.items():
            if group.seq_length != length - count:
                raise ValueError(
                    f"a LeftPaddedCache of {length} columns holds rows of {count} pads whose state has read "
                    f"{group.seq_length} tokens, not {length - count}: pass the cache the model returned"
                )
            check_cache_length(group)
        return
    read = getattr(cache.state, "position", None)  # LMState's and E2EState's tokens read (None: not recorded)
    if isinstance(read, int) and read != length:
        raise ValueError(
            f"cache.seq_length is {length} but its state has read {counted(read, 'token')}: generate() would read prompt "
            f"tokens twice or skip them; make the cache with InnerloopCache(state, {read}), or pass the cache "
            "the model returned"
        )


def check_cache_batch(cache: InnerloopCache | None, batch: int, given: str = "input_ids") -> None:
    """Refuse a cache passed in that holds another number of sequences than the input ``given``
    (``input_ids`` or ``inputs_embeds``) has rows (``batch``), naming both: each row continues its own
    sequence. A ``LeftPaddedCache`` of one row given two ran, the second row read from no state (logits
    of zeros); other sizes failed in torch's words, and a plain cache's refusal named an inner state the
    caller never passed."""
    if cache is None or cache.batch_size == batch:
        return
    raise ValueError(
        f"the cache passed in (cache, past_key_values or cache_params) holds {cache.batch_size} sequence(s), "
        f"and {given} has {batch} row(s): each row continues its own sequence of the cache; pass "
        f"{given} of {cache.batch_size} rows, or pick the cache's rows first "
        "(cache.index_select(torch.tensor([...])), repeats allowed)"
    )


def check_cache_continues(
    cache: Any,
    input_ids: torch.Tensor,
    next_sequence_length: int | None,
    attention_mask: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    embedding: nn.Module | None = None,
) -> None:
    """Refuse a cache passed to ``generate()`` that the prompt does not continue: ``input_ids`` (the
    whole sequence: transformers then keeps its last ``next_sequence_length`` tokens) must be longer
    than what the cache has read, and start with those tokens (a pad's id, where ``attention_mask`` of
    the whole sequence is 0, is not compared: the cache read it as 0). With ``next_sequence_length`` None
    the ids are the new tokens alone (an attention_mask longer than them was given): nothing to compare.
    With ``inputs_embeds`` (the prompt given as embeddings, always the whole sequence in transformers,
    ``input_ids`` then empty), or a cache that has read embeddings (no ids to compare with), the first
    embeddings (the ids' through ``embedding``, the model's token embedding) are compared with the
    cache's :attr:`~InnerloopCache.embedding_fingerprint` instead, bit for bit."""
    if not isinstance(cache, InnerloopCache):
        raise ValueError(
            "generate()'s cache (or past_key_values) must be the InnerloopCache of a previous call or "
            f"generate(), got {type(cache).__name__}: innerloop models make their own cache (a recurrent "
            "state, not keys and values), so a transformers Cache cannot be read; pass none"
        )
    check_cache_length(cache)
    if next_sequence_length is None:
        return
    sequence, name = (input_ids, "input_ids") if inputs_embeds is None else (inputs_embeds, "inputs_embeds")
    read, length = cache.seq_length, sequence.shape[1]
    if next_sequence_length <= 0 or length <= read:
        raise ValueError(
            f"generate() got {name} of {counted(length, 'token')} with a cache that has read {read}: pass the whole "
            f"sequence as {name}, the {counted(read, 'token')} the cache has read then at least one new token (the cache "
            "cannot give the logits of a token it has already read)"
        )
    if attention_mask is not None and attention_mask.shape != sequence.shape[:2]:
        attention_mask = None  # another shape: forward names it
    else:
        check_cache_pads(cache, attention_mask, name, sequence.shape[0])
    if (
        inputs_embeds is None
        and cache.fingerprint is not None
        and cache.fingerprint.shape[0] == input_ids.shape[0]
    ):
        if attention_mask is not None:
            input_ids = padding_zeroed(input_ids, attention_mask)  # as forward read them
        differs = token_fingerprint(input_ids[:, :read]) != cache.fingerprint.to(input_ids.device)
    else:
        differs = _embeddings_differ(cache, input_ids, inputs_embeds, attention_mask, embedding)
    if differs is not None and bool(differs.any()):
        row = int(differs.nonzero()[0, 0])
        raise ValueError(
            f"generate() got a cache that has not read the first {counted(read, 'token')} of {name} (row {row} "
            f"differs{'' if inputs_embeds is None else ', compared bit for bit'}): a cache continues the "
            f"sequence it was built from; pass that sequence, then the new tokens, as {name}"
        )


def check_cache_pads(
    cache: InnerloopCache, attention_mask: torch.Tensor | None, name: str, batch: int
) -> None:
    """Refuse a prompt whose ``attention_mask`` (of the whole sequence; None: every token read) makes
    other columns of the cache's ``seq_length`` pads than the cache skipped (a :class:`LeftPaddedCache`'s
    ``pads``, none for a plain cache): the fingerprints hash a pad as the id 0 or an embedding of zeros,
    so they cannot tell a pad from a real token 0 or a real embedding of zeros read (such a prompt
    silently continued what the cache had read). ``batch``: the prompt's rows."""
    read = cache.seq_length
    pads = getattr(cache, "pads", None)
    if batch != cache.batch_size:
        return  # another batch size: check_cache_batch names it
    device = None if attention_mask is None else attention_mask.device
    skipped = torch.zeros(batch, dtype=torch.int64, device=device) if pads is None else pads.to(device)
    expected = torch.arange(read, device=skipped.device)[None, :] >= skipped[:, None]  # [B, read]: read
    given = expected.new_ones(expected.shape) if attention_mask is None else attention_mask[:, :read] != 0
    differs = (given != expected).any(dim=1)
    if bool(differs.any()):
        row = int(differs.nonzero()[0, 0])
        raise ValueError(
            f"generate() got a cache that has not read the first {counted(read, 'token')} of {name} as attention_mask "
            f"gives them (row {row}: the cache skipped {int(skipped[row])} pad(s) there, the mask reads "
            f"{given[row].to(torch.int64).tolist()}): a cache continues the sequence it was built from; pass "
            f"that sequence with its mask (its pads as 0), then the new tokens, as {name}"
        )


def _embeddings_differ(
    cache: InnerloopCache,
    input_ids: torch.Tensor,
    inputs_embeds: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    embedding: nn.Module | None,
) -> torch.Tensor | None:
    """``[batch]`` bool: the rows whose first ``cache.seq_length`` embeddings (``inputs_embeds``', or
    ``input_ids``' through ``embedding``) hash otherwise than the cache's embedding fingerprint; None
    where nothing can be compared (a cache made by hand, of another batch size, no embedding given)."""
    expected, read = cache.embedding_fingerprint, cache.seq_length
    sequence = input_ids if inputs_embeds is None else inputs_embeds
    if expected is None or embedding is None or expected.shape[0] != sequence.shape[0]:
        return None
    mask = None if attention_mask is None else attention_mask[:, :read]
    if inputs_embeds is None:
        input_ids = padding_zeroed(input_ids[:, :read], mask)  # a pad's id may be past the vocabulary
        if bool(((input_ids < 0) | (input_ids >= embedding.weight.shape[0])).any()):
            return None  # an id out of the vocabulary: forward names it
    with torch.no_grad():
        embeds = embedding(input_ids[:, :read]) if inputs_embeds is None else inputs_embeds[:, :read]
    dtype = embedding.weight.dtype
    return embedding_fingerprint(embeddings_read(embeds, mask, dtype)) != expected.to(sequence.device)


@dataclass
class InnerloopCausalLMOutput(ModelOutput):
    """Output of :meth:`InnerloopForCausalLM.forward`.

    Attributes:
        loss: mean next-token cross-entropy over the labels that are not -100 (when labels are given;
            0, attached to the graph, when no label is left to score).
        logits: ``[B, T, vocab]`` (the positions ``logits_to_keep`` keeps).
        cache: the state after the last token (:class:`InnerloopCache`), unless ``use_cache=False``.
        hidden_states: with ``output_hidden_states=True``, ``num_layers + 1`` tensors ``[B, T, hidden]``:
            the embedding's output, each block's output, the last one after the final norm (as
            transformers' models return them).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: InnerloopCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


def mask_padding(attention_mask: torch.Tensor | None) -> tuple[str, str] | None:
    """The padding in ``attention_mask [B, L]``: None for no mask or a mask of ones, else ``(kind,
    description)`` with kind ``"hole"``, ``"left"``, ``"empty"`` (a row of zeros: right padding of no
    token) or ``"right"`` (ones then zeros), the worst found in that order, and a description naming a
    row, for error messages."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    ones = attention_mask.to(torch.bool)  # [B, L]
    length = ones.shape[1]
    positions = torch.arange(length, device=ones.device)  # [L]
    count = ones.sum(dim=1)  # [B]
    first = torch.where(ones, positions, length).min(dim=1).values  # [B]; L in a row of zeros
    last = torch.where(ones, positions, -1).max(dim=1).values  # [B]; -1 in a row of zeros
    kinds = {
        "hole": ((count > 0) & (count < last - first + 1), "zeros between its tokens"),
        "left": ((count > 0) & (first > 0), "zeros before its first token"),
        "empty": (count == 0, "no token, all zeros"),
        "right": ((count > 0) & (last < length - 1), "zeros after its last token"),
    }
    for kind, (rows, what) in kinds.items():
        if bool(rows.any()):
            row = int(rows.nonzero()[0, 0])
            shown = ones[row].to(torch.int64).tolist()
            text = str(shown) if length <= 24 else f"{int(count[row])} ones in {length}"
            name = {
                "right": "right padding",
                "left": "left padding",
                "hole": "a hole",
                "empty": "an empty row",
            }
            return kind, f"{name[kind]} (row {row}: {text}: {what})"
    raise AssertionError("unreachable: a mask that is not all ones has one of the kinds")


MASKS_SUPPORTED = (
    "supported: no attention_mask or a mask of ones (prompts of one length, no padding), left padding "
    "(zeros then ones in every row: each row is read as its tokens alone), and right padding (ones then "
    "zeros) only when scoring without a cache (no cache passed, use_cache not True)"
)


def left_pads(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Each row's count of pads ``[B]`` (int64) when ``attention_mask [B, L]`` is left padding: every row
    zeros then ones, at least one token, and some row padded; None when no row is left padded. A batch
    that mixes left-padded rows with a hole, right padding or a row of no token is refused, naming both."""
    if attention_mask is None:
        return None
    ones = attention_mask.to(torch.bool)  # [B, L]
    length = ones.shape[1]
    count = ones.sum(dim=1)  # [B]
    positions = torch.arange(length, device=ones.device)
    first = torch.where(ones, positions, length).min(dim=1).values  # [B]: the pads before the first one
    padded = (count > 0) & (first > 0)
    if not bool(padded.any()):
        return None
    well_formed = (count > 0) & (first + count == length)  # zeros, then ones to the end
    if bool(well_formed.all()):
        return first.to(torch.int64)
    bad = int((~well_formed).nonzero()[0, 0])
    kind, described = mask_padding(attention_mask[bad : bad + 1])  # type: ignore[misc]
    if kind == "left":  # zeros before its tokens and after them (a hole is named first): the latter are wrong
        described = "right padding" + described.removeprefix("left padding").replace(
            "zeros before its first token", "zeros before its first token and after its last"
        )
    described = described.replace("row 0", f"row {bad}")
    raise ValueError(
        f"attention_mask has left padding (row {int(padded.nonzero()[0, 0])}) and {described}: a batch is "
        "either left padded (zeros then ones in every row, each row at least one token) or right padded "
        f"(ones then zeros, for scoring); {MASKS_SUPPORTED}"
    )


def check_attention_mask(attention_mask: torch.Tensor | None, cached: bool, use_cache: bool | None) -> bool:
    """Refuse a mask that the recurrent state cannot honour; return whether a cache may be returned.

    innerloop models read every token into their state, so padding is never skipped. A mask of ones is
    fine. Right padding (ones then zeros in each row, e.g. a batch of scoring requests) is fine for the
    logits, since a causal model's logits at a position never see the positions after it, but the state
    has read the pads: it is accepted only without a cache passed in, and then no cache is returned
    (refused if ``use_cache=True`` asks for one). A row of zeros alone (an empty text in a padded batch)
    is right padding of no token, its logits those of the pads. Holes are refused, and so is left padding
    here: :func:`padded_rows` takes a left-padded batch before this check, which then sees left padding
    only with a plain cache passed in (whose state has read no row's pads to skip).
    """
    padding = mask_padding(attention_mask)
    if padding is None:
        return True
    kind, described = padding
    right = kind in ("right", "empty")
    if right and not cached and use_cache is not True:
        return False
    if right:
        given = f"{described}, with a cache {'passed in' if cached else 'asked for (use_cache=True)'}"
        why = "a cache after right padding holds the state of the pads, and continuing it would be wrong"
    else:
        given = described
        why = "the tokens after the zeros would be computed from a state that has read the padding"
    raise ValueError(
        f"attention_mask has {given}: innerloop models read every token into their recurrent state and "
        f"cannot skip padding, so {why}; {MASKS_SUPPORTED}"
    )


def check_generate_batch(input_ids: torch.Tensor, given: SequenceGiven | None = None) -> None:
    """Refuse an empty batch before the prompt is read: transformers' stopping check (``max()`` of the rows
    still running) failed on it after the first forward, in torch's words. ``given``: the prompt argument
    the caller passed (None: ``input_ids``)."""
    if input_ids.shape[0] == 0:
        given = given or sequence_given(input_ids, None)
        raise ValueError(
            f"generate() got {given.name} of batch size 0 (shape {list(given.shape)}): there is no prompt to "
            "continue; give at least one row [batch >= 1, length >= 1]"
        )


def check_generate_mask(attention_mask: torch.Tensor | None) -> None:
    """Refuse any padding in the mask ``generate()`` was given: the new tokens would follow the pads."""
    if left_pads(attention_mask) is not None:  # each row read as its prompt alone (refused if mixed)
        return
    padding = mask_padding(attention_mask)
    if padding is not None:
        raise ValueError(
            f"generate() got an attention_mask with {padding[1]}: innerloop models read every token into "
            "their recurrent state and cannot skip padding there, so the new tokens would follow the pads; "
            "generate() supports prompts without padding (no attention_mask, or a mask of ones) and "
            "left-padded prompts (zeros then ones in each row, as a tokenizer with padding_side='left' pads them)"
        )


def padded_rows(
    attention_mask: torch.Tensor | None, cache: InnerloopCache | None, length: int
) -> torch.Tensor | None:
    """Each row's count of left pads ``[B]`` for a forward of ``length`` new tokens, or None (no left
    padding: the other masks are checked by :func:`check_attention_mask`). Without a cache, the mask's
    left padding (:func:`left_pads`); with a :class:`LeftPaddedCache`, the cache's pads, which a mask
    covering the columns read must repeat (zeros then ones), and a mask of the new tokens alone must be
    ones: a cache continues its rows. A plain cache has no pads (a left-padded mask with it is refused)."""
    if not isinstance(cache, LeftPaddedCache):
        return left_pads(attention_mask) if cache is None else None
    if attention_mask is None:
        return cache.pads
    pads = cache.pads.to(attention_mask.device)
    columns = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    # the whole sequence's mask: each row's pads zeros; the new tokens' alone: ones ([B, columns] either way:
    # `columns >= 0`, of shape [columns], never equalled a [B, columns] mask, which was refused)
    expected = columns >= (pads if attention_mask.shape[1] > length else torch.zeros_like(pads))[:, None]
    if not torch.equal(attention_mask.to(torch.bool), expected):
        raise ValueError(
            f"attention_mask does not continue the left padding of the cache passed in (its rows have "
            f"{pads.tolist()} pads): give the mask of the whole sequence, each row's pads as zeros then ones "
            "(the mask generate() extends), a mask of the new tokens alone of ones, or no mask"
        )
    return cache.pads


EMPTY_PIECE_REFUSED = (
    "the Hugging Face wrapper reads at least one token per call, as transformers' own models do (its "
    "Llama, GPT-2 and Mamba fail on an empty piece); innerloop's CausalLM / E2ELM take length 0 (logits of "
    "length 0, the state unchanged): skip the call, or call its .model (the innerloop model) directly"
)
"""Why the wrapper refuses ``length 0`` where the core models take it: the reason its messages give."""


def check_token_ids_shape(input_ids: Any) -> None:
    """Refuse, naming ``input_ids``, anything but a torch.Tensor of integer token ids ``[batch, length >=
    1]`` (a 1-D tensor, a list or a numpy array would fail deep inside with an unrelated error; an empty
    piece for :data:`EMPTY_PIECE_REFUSED`). Reads no values: no device sync
    (:func:`innerloop.models.lm.check_token_id_layout`)."""
    try:
        check_token_id_layout(input_ids, min_length=1)
    except ValueError as error:
        if input_ids.dim() == 2 and input_ids.shape[1] == 0:
            raise ValueError(f"{error}: {EMPTY_PIECE_REFUSED}") from None
        raise


def padding_zeroed(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``input_ids [B, T]`` with the ids the mask leaves out (right padding: the mask's last ``T``
    columns cover them) set to 0: the model reads them after every real token, so they change no real
    token's logits, and none of their own is scored."""
    if attention_mask is None:
        return input_ids
    keep = attention_mask[:, -input_ids.shape[1] :].to(device=input_ids.device, dtype=torch.bool)
    return input_ids.masked_fill(~keep, 0)


def check_generate_pad_token(generation_config: Any, batch_size: int, vocab_size: int) -> None:
    """Refuse, before anything is generated, a ``pad_token_id`` outside the vocabulary where a batch's
    rows may end at ``eos_token_id`` one before another: transformers feeds the pad id to the rows that
    ended, as their next token (their outputs are discarded, but the model must read it). Without a
    ``pad_token_id`` transformers pads with the first ``eos_token_id``, which is checked the same way.
    Where no end-of-sequence id is in the vocabulary, no row can end and the pad id is never read."""
    pad, eos = generation_config.pad_token_id, generation_config.eos_token_id
    if batch_size < 2 or eos is None:
        return
    ends = torch.as_tensor(eos).flatten().tolist()
    if not ends or not any(0 <= int(end) < vocab_size for end in ends):
        return
    given = f"pad_token_id={pad},"
    if pad is None:  # transformers' default, as its _prepare_special_tokens sets it
        pad, given = ends[0], f"no pad_token_id, so transformers pads with the first eos_token_id, {ends[0]},"
    if 0 <= int(pad) < vocab_size:
        return
    raise ValueError(
        f"generate() got {given} outside the model's vocabulary of {vocab_size} tokens "
        f"(0..{vocab_size - 1}), with eos_token_id={eos} and a batch of {batch_size}: transformers feeds the "
        "pad id to every row that has ended as its next token; give a pad_token_id in the vocabulary (e.g. "
        "pad_token_id=0: what those rows read after their end is never used)"
    )


def check_token_ids(input_ids: Any, vocab_size: int) -> None:
    """Refuse anything but integer token ids ``[batch, length >= 1]`` (:func:`check_token_ids_shape`),
    and an id outside ``[0, vocab_size)`` (e.g. a tokenizer's special token past the bytes), naming it,
    rather than let the embedding fail with an index error."""
    check_token_ids_shape(input_ids)
    check_not_vmap_batched(input_ids)  # the values below cannot be read of a batched tensor
    if input_ids.numel() == 0:
        return
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        bad = high if high >= vocab_size else low
        end_of_text = (
            "; a byte-level model's tokenizer has <|endoftext|> at 256, which the model never saw (in lm-eval, "
            "give prefix_token_id=0, the byte a byte-level run puts between documents, for tasks with empty contexts)"
        )
        raise ValueError(
            f"input_ids holds token id {bad}, outside the model's vocabulary of {vocab_size} tokens "
            f"(0..{vocab_size - 1}){end_of_text if (bad, vocab_size) == (256, 256) else ''}"
        )


class ShiftedTemperatureLogitsWarper(TemperatureLogitsWarper):
    """transformers' temperature warper (``scores / temperature``), but exact for any positive
    temperature, however small: a row whose scores that division overflows (``inf``, or NaN once
    softmax reads ``inf - inf``) is instead shifted by its largest score in float64 before the division,
    as :func:`innerloop.models.generate` samples: the most likely token then scores 0, the others
    ``-inf`` or a finite negative number. transformers' own division raised torch's "probability tensor
    contains either inf, nan or element < 0" at ``temperature=1e-45`` (1e-300: 0 in float32).

    Only such rows change: every other row is ``scores / temperature``, bit for bit, so ``output_scores``
    are transformers' wherever transformers' division worked; in an overflowed row they are the shifted
    scores (the same probabilities: softmax and ``compute_transition_scores`` do not see a shift)."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        """``scores / temperature``, each row whose finite scores that overflows shifted first."""
        divided = scores / self.temperature  # [B, V]
        overflowed = (torch.isfinite(scores) & ~torch.isfinite(divided)).any(dim=-1)  # [B]
        overflowed &= torch.isfinite(scores.amax(dim=-1))  # a row with +inf or NaN has no max to shift by
        if not bool(overflowed.any()):
            return divided
        wide = scores.double()
        shifted = ((wide - wide.amax(dim=-1, keepdim=True)) / self.temperature).to(scores.dtype)  # max 0
        return torch.where(overflowed[:, None], shifted, divided)


_PENDING_SCORES_CHECK = threading.local()
"""The NonFiniteScoresCheck a model's ``_get_logits_processor`` made for the ``generate()`` call running on
this thread, until its ``_get_stopping_criteria`` takes it (``by_model``: the model's id to it)."""


class NonFiniteScoresCheck(LogitsProcessor):
    """Refuses scores with a row of NaN or ``+inf``, or ``-inf`` for every token, before any processor
    reads them (:class:`~innerloop.core.NonFiniteRowsError`), as :func:`innerloop.models.generate` does:
    greedy search took the argmax of a NaN row, token 0, and went on silently (a TTT-E2E decode call that
    only scores is not checked by the model). The error's ``rows`` / ``finite_rows`` are indices of the
    ``prompts`` prompts passed to generate; its message names transformers' rows too (each prompt runs
    ``num_beams`` beams, or ``num_return_sequences`` sequences, as consecutive rows). A row that has
    finished, whose next token transformers discards (replaces by the pad token, or drops once every row
    is done), is not refused: its non-finite scores are made 0. It finished if it generated one of
    ``eos_token_ids`` after the ``prompt_length`` tokens given, or if any stopping criterion (stop_strings,
    a custom StoppingCriteria) said so (:meth:`record_stopped`, which generate's criteria call). One
    reduction of the scores per token; transformers' loop reads the device at every token already."""

    def __init__(
        self,
        eos_token_ids: list[int] | None = None,
        prompt_length: int | None = None,
        prompts: int | None = None,
        beams: bool = False,
    ) -> None:
        self.eos_token_ids = list(eos_token_ids or [])
        self.prompt_length = prompt_length
        self.prompts = prompts
        self.beams = beams  # whether a prompt's rows are beams (a beam search), not returned sequences
        self.stopped: torch.Tensor | None = None  # [B] bool, on the device: rows a criterion has finished

    def record_stopped(self, done: torch.Tensor) -> None:
        """Adds the rows a stopping criterion finished (``done`` ``[B]`` bool, what transformers takes
        out of its unfinished sequences), on the device: no read-back."""
        self.stopped = done if self.stopped is None else self.stopped | done

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        """``scores``, unchanged, if every row has a finite largest score (a finished row's made 0)."""
        finite = torch.isfinite(scores.amax(dim=-1))  # [B]: max propagates NaN
        if bool(finite.all()):
            return scores
        finished = self._ended_rows(input_ids)
        if self.stopped is not None and self.stopped.shape == finished.shape:
            finished = finished | self.stopped.to(finished.device)
        broken = ~finite & ~finished
        if not bool(broken.any()):  # only rows whose next token transformers discards
            return torch.where((~finite)[:, None], torch.zeros_like(scores), scores)
        raise self._error(input_ids.shape[1], broken.nonzero().flatten().tolist(), broken.shape[0])

    def _error(self, length: int, rows: list[int], batch: int) -> NonFiniteRowsError:
        """The error for transformers' ``rows`` of ``batch``, told as the prompts passed."""
        prompts = self.prompts if self.prompts and batch % self.prompts == 0 else batch
        per_prompt = batch // prompts
        broken_prompts = sorted({row // per_prompt for row in rows})
        where = f"in prompts {broken_prompts} of {prompts}"
        if per_prompt > 1:
            kind = "beams" if self.beams else "sequences"
            where += (
                " ("
                + "; ".join(
                    f"prompt {prompt} {kind} {[row % per_prompt for row in rows if row // per_prompt == prompt]} "
                    f"of {per_prompt}"
                    for prompt in broken_prompts
                )
                + f"; transformers' rows {rows}, prompt * {per_prompt} + {kind[:-1]})"
            )
        error = NonFiniteRowsError(
            f"generate: the model produced non-finite logits after {counted(length, 'token')} {where}: NaN or +inf, or "
            "-inf for every token, from which no token can be chosen; the model's weights or state overflowed "
            "or hold NaN (TTT-E2E checks a call that trains on a chunk, not one that only scores a decoded "
            "token: innerloop.models.generate names its likely cause)"
        )
        error.rows = broken_prompts
        error.finite_rows = [prompt for prompt in range(prompts) if prompt not in broken_prompts]
        return error

    def _ended_rows(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B]``: whether each row generated an end-of-sequence token after the prompt (read only when
        a row's scores are not finite)."""
        if not self.eos_token_ids or self.prompt_length is None or input_ids.shape[1] <= self.prompt_length:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        eos = torch.tensor(self.eos_token_ids, dtype=input_ids.dtype, device=input_ids.device)
        return torch.isin(input_ids[:, self.prompt_length :], eos).any(dim=1)


class StopsRecorded(StoppingCriteriaList):
    """generate's stopping criteria, whose verdicts (the rows each step finished) are also told to a
    :class:`NonFiniteScoresCheck` (:meth:`~NonFiniteScoresCheck.record_stopped`), so that a row finished
    for any reason is not refused for its discarded scores. Same verdicts; one elementwise op a step."""

    def __init__(self, criteria: StoppingCriteriaList, check: NonFiniteScoresCheck) -> None:
        super().__init__(criteria)
        self.check = check

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any
    ) -> torch.BoolTensor:
        """The criteria's verdict, recorded."""
        done = super().__call__(input_ids, scores, **kwargs)
        self.check.record_stopped(done)
        return done


TIED_HEAD_KEY = "model.lm_head.weight"
"""The LM head's weight, which a tied model saves once, as the embedding's."""


class InnerloopPreTrainedModel(PreTrainedModel):
    """Base class of innerloop's Hugging Face models: the config class, how weights are set up, loaded and
    saved, and what both models share. Each holds the whole innerloop network as ``self.model`` (its LM
    head too), so that one folder loads in either class with the same weight names, strictly."""

    config_class = InnerloopConfig
    config: InnerloopConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True  # not for TTT-E2E: _set_gradient_checkpointing refuses it
    _is_stateful = True
    _no_split_modules: list[str] = []
    _tied_weights_keys = {TIED_HEAD_KEY: "model.embed.weight"}
    _supported_arguments = SUPPORTED_ARGUMENTS  # what forward reads, named when it refuses another argument
    # the attention mixers run torch's scaled_dot_product_attention (models/attention.py): from_pretrained's
    # attn_implementation="sdpa" (its default when allowed) says so; "eager" is accepted and changes nothing
    _supports_sdpa = True

    @property
    def _keys_to_ignore_on_save(self) -> list[str] | None:  # type: ignore[override]
        """The head's key while the head shares the embedding's weight, else None. save_pretrained writes a
        tied head's weight once, as the embedding's; transformers' Trainer, resuming from such a checkpoint,
        logs the head's key as missing unless the model names it here (then it ties). Read at each save, not
        set from the config: a head given its own weight after construction is saved, not dropped."""
        model = self.__dict__.get("_modules", {}).get("model")
        head, embed = getattr(model, "lm_head", None), getattr(model, "embed", None)
        tied = head is not None and embed is not None and head.weight is embed.weight
        return [TIED_HEAD_KEY] if tied else None

    @_keys_to_ignore_on_save.setter
    def _keys_to_ignore_on_save(self, value: Any) -> None:
        """Ignored: transformers' ``post_init`` sets it from the class's; the weights decide (the getter)."""

    def __init__(self, config: InnerloopConfig) -> None:
        """The network ``config`` describes, built in torch's default dtype; where that is float64, its
        TTT layers' token index is made as ``config.innerloop_token_index_dtype`` records (the model
        ``save_pretrained`` wrote it from held it so): the model built from a saved config, under
        ``torch.set_default_dtype(torch.float64)``, ``from_config(config, dtype=torch.float64)`` or
        ``AutoModelForCausalLM.from_config``, is the one ``from_pretrained`` gives, bit for bit. A later
        cast keeps the index it widens (``.double()`` of a float32 model: rounded), as torch's casts do;
        ``save_pretrained`` records what the model then holds. A record naming another number of TTT
        layers than the model has is refused (``ValueError`` naming the field)."""
        super().__init__(config)
        self.model = build_model(config.model_config)
        remake_token_index(self, config.innerloop_token_index_dtype, where=TOKEN_INDEX_FIELD)
        # drawn just now (unless built on the meta device): post_init's init_weights must not draw it again
        self.model._is_hf_initialized = not any(weight.is_meta for weight in self.model.parameters())
        self.post_init()
        self._mark_model_config_synced()

    def _set_gradient_checkpointing(
        self,
        enable: bool = True,
        gradient_checkpointing_func: CheckpointFunction = CHECKPOINT_BLOCKS,
        every_n_layers: int = 1,
    ) -> None:
        """transformers' hook of ``gradient_checkpointing_enable`` / ``activation_checkpointing_enable`` and
        their ``_disable``: the innerloop model's blocks run through ``gradient_checkpointing_func`` (a
        ``torch.utils.checkpoint`` with the ``gradient_checkpointing_kwargs``; transformers' default is
        non-reentrant, and ``use_reentrant=True`` is refused by name), every ``every_n_layers``-th block,
        while training with gradients on (:meth:`innerloop.models.CausalLM.gradient_checkpointing_enable`).
        The TTT-E2E model refuses it (``ValueError``, as transformers does for a model without it)."""
        if not enable:
            self.model.gradient_checkpointing_disable()
            return
        if self.config.model["mixer"] == E2E:  # type: ignore[index]
            raise ValueError(
                f"{type(self).__name__} does not support activation checkpointing for model.mixer={E2E!r}: "
                f"{E2E_CHECKPOINTING_REFUSED}"
            )
        check_checkpoint_function(
            gradient_checkpointing_func, "gradient_checkpointing_kwargs"
        )  # the one check
        self.model._checkpoint_blocks_through(gradient_checkpointing_func, every_n_layers)

    def _mark_model_config_synced(self) -> None:
        """Remember ``config.model`` and the inner model's config as they are now, one and the same model
        (:meth:`_sync_model_config` compares them with these)."""
        self._synced_config_model = copy.deepcopy(self.config.model)
        self._synced_model_config = copy.deepcopy(self.model.config)

    def _sync_model_config(self) -> None:
        """Keep ``config.model`` (what ``save_pretrained`` writes) and the inner model's config
        (``model.config``, what it reads at every call) one: an edit of either since the last call is
        carried to the other; an edit of ``config.model`` must leave the fields the model read when built
        as they were (:meth:`~innerloop.models.lm.CausalLM.check_built_fields`); edits of both are refused.
        Unsynced, an edit of ``config.model`` (e.g. ``e2e.inner_lr``) left the model computing as before
        while config.json said the new value, so the model read back computed another function."""
        given_edited = self.config.model != self._synced_config_model
        inner_edited = self.model.config != self._synced_model_config  # dataclass equality: ~2 us a call
        if given_edited and inner_edited:
            raise ValueError(
                "config.model and model.config (the inner model's) were both changed since the model last ran "
                "or was saved; change one of them: config.model is what save_pretrained writes, and the other "
                "follows it at the next call"
            )
        if given_edited:
            config = model_config_from(self.config.model)
            self.model.check_built_fields(config)
            self.model.config = config
        elif inner_edited:
            self.model.check_built_fields()
            self.config.model = self.model.config.to_dict()
        self._mark_model_config_synced()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """No: the cache is innerloop's own state, made by the first forward (as Mamba's used to be)."""
        return False

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding ``[vocab, hidden]``."""
        return self.model.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        """Replace the token embedding by one of the same shape (a tied LM head follows it); to change the
        vocabulary's size, use :meth:`resize_token_embeddings`, which keeps the config in step."""
        _check_same_shape("set_input_embeddings", value, self.model.embed.weight)
        self.model.embed = value
        if self.config.tie_word_embeddings:
            self.model.lm_head.weight = value.weight

    def resize_token_embeddings(
        self,
        new_num_tokens: int | None = None,
        pad_to_multiple_of: int | None = None,
        mean_resizing: bool = True,
    ) -> nn.Embedding:
        """Resize the vocabulary to ``new_num_tokens`` (rounded up to a multiple of ``pad_to_multiple_of``):
        the embedding, the LM head (tied or not) and ``model.vocab_size`` in the config together.

        The rows of the tokens kept are unchanged, so are their logits; added rows are the mean of the
        old rows (``mean_resizing``, as transformers does, without its noise) or drawn with the model's
        ``init_std``. The padding row (``model.padding_id``) stays the padding row. Everything is checked
        before anything changes. Returns the new embedding. Refused
        for the TTT-E2E model, whose inner loop reads the whole vocabulary (every logit would change).
        """
        old = self.model.embed
        if new_num_tokens is None and pad_to_multiple_of is None:
            return old
        if self.config.model["mixer"] == E2E:  # type: ignore[index]
            raise ValueError(
                f"resize_token_embeddings is not supported for the TTT-E2E model (model.mixer={E2E!r}): its "
                "inner loop trains on the next-token loss over the whole vocabulary, so a token added or "
                f"removed would change every logit; the vocabulary stays model.vocab_size={old.num_embeddings}"
            )
        size = _resized_vocab(new_num_tokens, pad_to_multiple_of, old.num_embeddings)
        if old.padding_idx is not None and old.padding_idx >= size:
            raise ValueError(
                f"new_num_tokens={new_num_tokens} (pad_to_multiple_of={pad_to_multiple_of}) gives {size} tokens, "
                f"which drops the padding row model.padding_id={old.padding_idx}; keep at least "
                f"{old.padding_idx + 1} tokens"
            )
        config = model_config_from({**self.config.model, "vocab_size": size})  # type: ignore[dict-item]
        if size == old.num_embeddings:
            return old
        check_fits_in_memory(config, old.weight.device, old.weight.dtype)
        std = config.init_std
        embed = nn.Embedding(
            size,
            old.embedding_dim,
            padding_idx=old.padding_idx,
            device=old.weight.device,
            dtype=old.weight.dtype,
        )
        embed.weight = _resized_rows(old.weight, size, mean_resizing, std)
        head = nn.Linear(
            old.embedding_dim, size, bias=False, device=old.weight.device, dtype=old.weight.dtype
        )
        if self.config.tie_word_embeddings:
            head.weight = embed.weight
        else:
            head.weight = _resized_rows(self.model.lm_head.weight, size, mean_resizing, std)
        self.model.embed, self.model.lm_head = embed, head
        self.model.config = config
        self.model.rebuilt("vocab_size")  # the embedding and head above are its new size
        self.config.model = config.to_dict()
        self._mark_model_config_synced()
        return embed

    def _checked_call(
        self,
        input_ids: Any,
        inputs_embeds: Any,
        attention_mask: torch.Tensor | None,
        caches: tuple[Any, Any, Any],
        use_cache: bool | None,
        output_hidden_states: bool | None,
        kwargs: dict[str, Any],
        return_dict: Any,
        logits_to_keep: Any = 0,
    ) -> tuple[torch.Tensor, InnerloopCache | None, bool, bool, torch.Tensor | None, torch.Tensor | None]:
        """Every check of ``forward``'s arguments, in order: the ids or the embeddings
        (:meth:`_checked_embeddings`: ids of 0 stand for them), the one cache of ``caches`` (``cache``,
        ``past_key_values``, ``cache_params``), the ids and the mask (:meth:`_check_inputs`), the other
        arguments (:meth:`_check_arguments`). Returns the ids (the padding's set to 0), the cache, whether
        a cache may be returned, whether the hidden states are wanted, each row's left pads (None: no
        left padding; :func:`padded_rows`) and the embeddings given (None: read the ids)."""
        embeds = self._checked_embeddings(input_ids, inputs_embeds)
        if embeds is not None:
            input_ids = torch.zeros(embeds.shape[:2], dtype=torch.int64, device=embeds.device)
        cache = one_cache(*caches)
        self._check_cache(cache, next(n for n, c in zip(CACHE_NAMES, caches, strict=True) if c is cache))
        input_ids, may_cache, hidden, pads = self._check_inputs(
            input_ids, attention_mask, cache, use_cache, output_hidden_states, embeds
        )
        given = sequence_given(input_ids, embeds)  # what the messages name: the argument passed
        self._check_arguments(
            kwargs, input_ids, cache, logits_to_keep, return_dict, attention_mask, pads, given
        )
        return input_ids, cache, may_cache, hidden, pads, embeds

    def _checked_embeddings(self, input_ids: Any, inputs_embeds: Any) -> torch.Tensor | None:
        """``inputs_embeds`` (None when the ids are given), after refusing both or neither, anything but a
        floating tensor ``[batch, length >= 1, hidden_size]``, and the TTT-E2E model, whose inner loop
        trains on the next token ids."""
        if inputs_embeds is None and input_ids is not None:
            return None
        check_one_sequence(type(self).__name__, input_ids, inputs_embeds, self.config.hidden_size)
        if self.config.model["mixer"] == E2E:  # type: ignore[index]
            raise ValueError(
                f"{shown_argument('inputs_embeds', inputs_embeds)} is not supported for the TTT-E2E model "
                f"(model.mixer={E2E!r}): its inner loop trains on the next token ids, which embeddings do "
                "not give; pass input_ids"
            )
        hidden = self.config.hidden_size
        if not isinstance(inputs_embeds, torch.Tensor):
            shown = type(inputs_embeds).__name__
        elif not inputs_embeds.is_floating_point() or inputs_embeds.dim() != 3:
            shown = f"shape {list(inputs_embeds.shape)} of {inputs_embeds.dtype}"
        elif inputs_embeds.shape[1] < 1 or inputs_embeds.shape[2] != hidden:
            shown = f"shape {list(inputs_embeds.shape)}"
        else:
            return inputs_embeds
        raise ValueError(
            f"inputs_embeds must be a floating tensor [batch, length >= 1, hidden_size={hidden}] (what "
            f"get_input_embeddings() gives for token ids), got {shown}"
            + (
                f": {EMPTY_PIECE_REFUSED}"
                if shown.startswith("shape") and inputs_embeds.shape[1:2] == (0,)
                else ""
            )
        )

    def _run(
        self,
        input_ids: torch.Tensor,
        cache: InnerloopCache | None,
        hidden: bool,
        head: bool,
        pads: torch.Tensor | None = None,
        embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Any, tuple[torch.Tensor, ...] | None]:
        """innerloop's network on ``input_ids`` from the cache's state: the logits (``head``) or what the
        head reads (:meth:`~innerloop.models.lm.CausalLM.features`), the new state, and the hidden states
        when ``hidden`` (see :func:`~innerloop.hf.arguments.recording_hidden_states`). With ``pads`` (each
        row's left pads), each row is read without its pads: :meth:`_run_left_padded`. With ``embeds``
        ``[B, T, hidden]``, the embedding's output is them (the ids are placeholders)."""
        if pads is not None:
            return self._run_left_padded(input_ids, cache, hidden, head, pads, embeds)
        state = None if cache is None else cache.state
        network = self.model if head else self.model.features
        with embeddings_given(self.model.embed, embeds):
            if not hidden:
                out, new_state = network(input_ids, state)
                return out, new_state, None
            with recording_hidden_states(self.model) as recorded:
                out, new_state = network(input_ids, state)
        return out, new_state, tuple(recorded)

    def _run_left_padded(
        self,
        input_ids: torch.Tensor,
        cache: InnerloopCache | None,
        hidden: bool,
        head: bool,
        pads: torch.Tensor,
        embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[int, tuple[torch.Tensor, Any, Any]], tuple[torch.Tensor, ...] | None]:
        """:meth:`_run` for left-padded rows (``pads [B]``, from :func:`padded_rows`): the rows with as many
        pads are read together, their pads left out, from their group of the :class:`LeftPaddedCache`
        (none: from the start), so each row's numbers are those of its tokens alone. The outputs (and
        hidden states) are the rows' at their columns, zeros at the pads; the state is, per pad count,
        the ids read, the group's cache and its new state (:meth:`_next_padded_cache`)."""
        batch, length = input_ids.shape
        start = 0 if cache is None else cache.seq_length
        outputs: torch.Tensor | None = None
        hidden_states: list[torch.Tensor] | None = None
        states = {}
        for count in sorted(set(pads.tolist())):
            rows = (pads == count).nonzero().flatten().to(input_ids.device)
            skip = max(count - start, 0)  # the group's pads among the new columns
            group = cache.groups[count] if isinstance(cache, LeftPaddedCache) else None
            ids = input_ids[rows, skip:]
            part = None if embeds is None else embeds[rows, skip:]
            out, state, recorded = self._run(ids, group, hidden, head, embeds=part)
            outputs = _placed_rows(outputs, out, rows, skip, batch, length)
            if recorded is not None:
                places = hidden_states or [None] * len(recorded)
                pairs = zip(places, recorded, strict=True)
                hidden_states = [_placed_rows(h, r, rows, skip, batch, length) for h, r in pairs]
            states[count] = (ids, group, state)
        assert outputs is not None  # a batch holds a row
        return outputs, states, None if hidden_states is None else tuple(hidden_states)

    def _cache_after(
        self,
        input_ids: torch.Tensor,
        cache: InnerloopCache | None,
        state: Any,
        use_cache: bool | None,
        may_cache: bool,
        pads: torch.Tensor | None = None,
        embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> InnerloopCache | None:
        """The cache to return (:meth:`_next_cache`, or :meth:`_next_padded_cache` for left-padded rows),
        or None where ``use_cache`` (default: the config's) is off or the mask allows none. After
        ``embeds`` (no ids read) the cache has no fingerprint: ``generate()`` cannot compare ids with it;
        it compares the embeddings read (:meth:`_embedding_fingerprint_after`) instead."""
        if use_cache is None:  # the config's, which may have been set since it was checked
            check_flag("config.use_cache", self.config.use_cache)
        wanted = self.config.use_cache if use_cache is None else use_cache
        if not (wanted and may_cache):
            return None
        if pads is not None:
            new = self._next_padded_cache(input_ids, cache, state, pads)
        else:
            new = self._next_cache(input_ids, cache, state)
        if embeds is not None or (cache is not None and cache.fingerprint is None):
            new.fingerprint = None
        new.embedding_fingerprint = self._embedding_fingerprint_after(
            input_ids, cache, embeds, attention_mask
        )
        return new

    def _embedding_fingerprint_after(
        self,
        input_ids: torch.Tensor,
        cache: InnerloopCache | None,
        embeds: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """The hash of every embedding read once ``embeds`` (or the ids' embeddings, the pads' zeroed by
        ``attention_mask``) are read after ``cache``: :func:`embedding_fingerprint`; None after a cache
        without one (made by hand)."""
        if cache is not None and cache.embedding_fingerprint is None:
            return None
        embedding = self.get_input_embeddings()
        with torch.no_grad():
            read = embedding(input_ids) if embeds is None else embeds
        previous = None if cache is None else cache.embedding_fingerprint
        return embedding_fingerprint(embeddings_read(read, attention_mask, embedding.weight.dtype), previous)

    def _next_padded_cache(
        self,
        input_ids: torch.Tensor,
        cache: InnerloopCache | None,
        states: dict[int, tuple[torch.Tensor, Any, Any]],
        pads: torch.Tensor,
    ) -> LeftPaddedCache:
        """The :class:`LeftPaddedCache` after ``input_ids`` (their pads set to 0), from ``cache`` (None: from
        the start) and the groups' states of :meth:`_run_left_padded`."""
        groups = {count: self._next_cache(ids, group, state) for count, (ids, group, state) in states.items()}
        seen = (0 if cache is None else cache.seq_length) + input_ids.shape[1]
        fingerprint = token_fingerprint(input_ids, None if cache is None else cache.fingerprint)
        return LeftPaddedCache(groups, pads, seen, fingerprint, dtype=self.dtype, device=self.device)

    @run_eagerly("innerloop: the input checks read the ids' and the mask's values")  # as the LM's own
    def _check_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: InnerloopCache | None,
        use_cache: bool | None,
        output_hidden_states: bool | None,
        embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, bool, bool, torch.Tensor | None]:
        """Check the ids' layout (first: the other checks read their shape), the mask, ``use_cache`` and
        the ids' values where the mask reads them (a right padding's ids are never scored, and a tokenizer
        may pad with an id past the model's vocabulary: the byte tokenizer's end of text, 256); return
        the ids with the padding's set to 0 (:func:`padding_zeroed`), whether a cache may be returned
        (see :func:`check_attention_mask`), whether the hidden states are wanted and each row's left pads
        (:func:`padded_rows`; None without left padding). First, that ``config.model`` still describes the
        built model (an edit there it cannot follow is refused). ``embeds``: the ``inputs_embeds``
        given, which the ids stand for (the messages name them: :func:`sequence_given`)."""
        self._sync_model_config()
        check_token_ids_shape(input_ids)
        given = sequence_given(input_ids, embeds)
        check_cache_batch(cache, input_ids.shape[0], given.name)
        cached = 0 if cache is None else cache.seq_length
        check_mask_shape(attention_mask, input_ids, cached, given=given)
        check_mask_values(attention_mask)
        check_flag("use_cache", use_cache)
        pads = padded_rows(attention_mask, cache, input_ids.shape[1])
        if pads is None:
            may_cache = check_attention_mask(attention_mask, cached=cache is not None, use_cache=use_cache)
        else:
            may_cache = True  # each row's state has read its own tokens alone
        input_ids = padding_zeroed(input_ids, attention_mask)
        check_token_ids(input_ids, self.config.vocab_size)
        is_e2e = self.config.model["mixer"] == E2E  # type: ignore[index]
        hidden = hidden_states_wanted(output_hidden_states, self.config.output_hidden_states, is_e2e)
        return input_ids, may_cache, hidden, pads

    def _check_arguments(
        self,
        kwargs: dict[str, Any],
        input_ids: torch.Tensor,
        cache: InnerloopCache | None,
        logits_to_keep: Any,
        return_dict: Any,
        attention_mask: torch.Tensor | None = None,
        pads: torch.Tensor | None = None,
        given: SequenceGiven | None = None,
    ) -> None:
        """Check ``forward``'s other arguments (:func:`~innerloop.hf.arguments.check_other_arguments`,
        which reads the checked ``attention_mask`` and each row's left ``pads``), ``logits_to_keep``
        against the ids' shape, and ``return_dict``; the messages name ``given``, the sequence argument
        the caller passed."""
        start = 0 if cache is None else cache.seq_length
        check_other_arguments(
            kwargs,
            start,
            input_ids.shape[1],
            type(self).__name__,
            self._supported_arguments,
            attention_mask,
            generates=isinstance(self, GenerationMixin),  # a subclass's too, whatever its name
            pads=pads,
            given=given,
        )
        check_logits_to_keep(logits_to_keep, *input_ids.shape, given=given)
        check_flag("return_dict", return_dict)

    def _check_cache(self, cache: Any, name: str = "cache") -> None:
        """Refuse anything but an :class:`InnerloopCache` (naming ``name``, the argument it was passed as),
        and a cache this model made in another dtype or on another device (its state cannot be converted:
        the sequence must be read again)."""
        if cache is None:
            return
        if not isinstance(cache, InnerloopCache):
            raise ValueError(
                f"{name} must be the InnerloopCache returned by a previous call (its .cache) or None, got "
                f"{type(cache).__name__}: innerloop models make their own cache (a recurrent state, not keys "
                "and values), so a transformers Cache or a tuple of keys and values cannot be read; pass "
                "none, and the output's .cache continues the sequence"
            )
        check_cache_length(cache)
        dtype = self.dtype if cache.dtype is None else cache.dtype  # None: a cache made by hand
        device = self.device if cache.device is None else cache.device
        if (dtype, device) != (self.dtype, self.device):
            raise ValueError(
                f"cache was made by the model in {dtype} on {device}, and the model is now in {self.dtype} "
                f"on {self.device}: a cache continues the model as it was, and its state cannot be "
                "converted; read the sequence again with the model as it is now (model(input_ids).cache), "
                f"or put the model back (model.to(device='{device}', dtype={dtype}))"
            )

    def _next_cache(
        self, input_ids: torch.Tensor, cache: InnerloopCache | None, state: LMState | E2EState
    ) -> InnerloopCache:
        """The cache after ``input_ids``, read from ``cache`` (None: from the start) into ``state``."""
        seen = (0 if cache is None else cache.seq_length) + input_ids.shape[1]
        fingerprint = token_fingerprint(input_ids, None if cache is None else cache.fingerprint)
        return InnerloopCache(state, seen, fingerprint, dtype=self.dtype, device=self.device)

    def _initialize_weights(self, module: nn.Module, is_custom_code: bool = False) -> None:
        """transformers', but the innerloop network goes to :meth:`_init_weights` unless marked initialised:
        transformers takes a module of custom code whose own parameters are all marked (none: the network's
        are its children's) as initialised, and would never initialise it."""
        if isinstance(module, MaterialisableLM):
            if not getattr(module, "_is_hf_initialized", False):
                self._init_weights(module)
                module._is_hf_initialized = True
            return
        super()._initialize_weights(module, is_custom_code)

    def _init_weights(self, module: nn.Module) -> None:
        """Initialise the innerloop network again (:meth:`~innerloop.models.lm.MaterialisableLM.
        reset_parameters`: as a fresh build draws it) when transformers asks for it, i.e. for a model it
        has not marked initialised: ``init_weights()`` / ``post_init()`` of one built under
        ``torch.device("meta")`` and made real by ``to_empty``. Its other modules are the network's parts,
        which it initialises as a whole. A network whose every weight transformers loaded
        (``from_pretrained``) is left as loaded; a normal build is marked initialised in ``__init__``
        (its weights were just drawn)."""
        if not isinstance(module, MaterialisableLM):
            return
        if all(getattr(weight, "_is_hf_initialized", False) for weight in module.parameters()):
            return
        if any(weight.is_meta for weight in module.parameters()):
            return  # transformers builds on the meta device and loads after: nothing real to initialise
        module.reset_parameters()
        remake_token_index(self, self.config.innerloop_token_index_dtype, where=TOKEN_INDEX_FIELD)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``from_pretrained``, stricter and complete for innerloop models.

        Every weight of the model must be in the folder, and nothing else: a missing, unexpected or
        mismatched weight raises ``ValueError`` naming it (transformers would only warn, and leave
        missing weights uninitialised). transformers builds the model on the meta device and leaves
        its non-persistent buffers (e.g. the TTT layer's RoPE table) empty: they are copied from a
        freshly built network, whatever plugin registered them.

        A folder that records where its plugins came from (``config.innerloop_plugins``) is compared
        with the plugins registered now: a :class:`~innerloop.checkpoints.PluginChangedWarning` names
        each name registered now by another plugin (:func:`~innerloop.checkpoints.same_plugin`), or by the
        same plugin whose source digest differs from ``config.innerloop_plugin_sources``'s; the
        same plugin registered with other settings than recorded is refused
        (:func:`~innerloop.checkpoints.check_plugin_settings`).

        A local folder is checked too: a weights file that is not a whole safetensors file is named
        (:func:`stored_weight_dtypes`); a weight stored in an integer or bool dtype where the model's is
        floating is refused (transformers would cast it), and so is one stored wider than the dtype
        config.json names where no ``dtype`` is given (transformers would round it:
        :func:`refuse_rounded_weights`); when the weights do not fit, the message also
        names the keys config.json's ``model`` section lacks, which took their defaults; and where
        ``innerloop export`` recorded its files (:data:`EXPORT_RECORD`), the weights files must be the
        ones it wrote (their SHA-256, computed once per load: seconds for a large model): a file changed
        since is refused, naming it (:func:`check_export_record`).

        A folder that is missing because an ``innerloop export --overwrite`` to it was killed between
        its two renames raises ``FileNotFoundError`` naming the earlier export, set aside beside it
        (:func:`refuse_an_interrupted_export`).
        """
        given = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        refuse_an_interrupted_export(given)
        source = repr(str(given))
        folder = local_folder(given, kwargs.get("subfolder"))
        if folder is not None and kwargs.get("config") is None:
            refuse_a_folder_without_config(folder)
        if folder is not None:
            refuse_a_generation_config_not_an_object(folder)
        stored = plain_names(stored_weight_dtypes(folder), source) if folder is not None else {}
        kwargs["key_mapping"] = {COMPILED_NAME: "", **(kwargs.get("key_mapping") or {})}  # see COMPILED_NAME
        wants_info = kwargs.pop("output_loading_info", False)
        kwargs.setdefault("ignore_mismatched_sizes", True)  # reported below, as one ValueError
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        problems = loading_problems(info)
        if problems:
            raise ValueError(
                f"{source} does not hold the weights of the model its config.json describes (a config.json "
                f"edited by hand?): {problems}{config_keys_note(folder)}{untied_e2e_note(model, info)}"
            )
        refuse_integer_weights(model, stored)
        if kwargs.get("dtype", kwargs.get("torch_dtype")) in (None, "auto"):  # the user asked for no dtype
            refuse_rounded_weights(model, stored)
        refuse_non_finite_weights(model, source)
        if folder is not None:  # after the checks above, which name what is wrong more precisely
            check_export_record(folder)
            warn_an_earlier_exports_tokenizer(folder)
        check_recorded_plugins(source, model.config)
        model._refresh_non_persistent_buffers()
        move_to_aligned_memory(model)
        return (model, info) if wants_info else model

    def save_pretrained(self, save_directory: str | os.PathLike[str], *args: Any, **kwargs: Any) -> None:
        """transformers' ``save_pretrained``, plus ``auto_map`` in config.json and the two modules it
        names (:mod:`innerloop.hf.remote_code`), so that the folder also loads with
        ``trust_remote_code=True`` where innerloop is installed but not imported; and in
        ``innerloop_plugins``, where each plugin the model uses came from
        (:func:`~innerloop.checkpoints.plugin_record`), and in ``innerloop_plugin_sources`` the source
        digests of those not built in (:func:`~innerloop.checkpoints.plugin_sources`), which
        ``from_pretrained`` checks. Saved into an
        export, the files it replaces leave the export's record (:func:`forget_replaced_export_files`):
        they load as the files saved. An empty ``save_directory`` is refused, as transformers' own does
        (``Path("")`` would be the current directory)."""
        if isinstance(save_directory, str) and not save_directory:
            raise ValueError(
                "save_directory '' is empty: give a folder (an empty path would name the current directory)"
            )
        self._sync_model_config()  # config.json must describe the model saved
        check_held_plugins(repr(str(save_directory)), self.model)  # and its plugin record
        self.config.auto_map = dict(AUTO_MAP)
        self.config.innerloop_token_index_dtype = token_index_made_in(self)
        self.config.innerloop_plugins = plugin_record(self.config.model, self.config.innerloop_plugins)
        self.config.innerloop_plugin_sources = plugin_sources(
            self.config.model, self.config.innerloop_plugin_sources
        )

        given = kwargs.get("state_dict")
        weights = self.state_dict() if given is None else given  # a compiled part's: the uncompiled names
        if any(map(is_compiled_name, weights)):
            kwargs["state_dict"] = plain_names(weights, "the model's state_dict")
        transformers_save = super().save_pretrained

        def save_into(target: Path) -> None:
            transformers_save(target, *args, **kwargs)
            write_shims(target)

        if kwargs.get("push_to_hub"):  # transformers names the repository after the folder: saved in place
            save_into(Path(save_directory))
            forget_replaced_export_files(Path(save_directory))
            return
        # Staged in a hidden folder inside the folder (the same file system, whatever the folder is a mount
        # or a link to), then moved in file by file: a save stopped half-way (a full disk, an error)
        # leaves every file whole, the earlier save's or this one's, never a truncated weights file.
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        with _only_save_into(folder) as locked:
            if locked:  # every save into the folder holds its lock: no other is running
                remove_abandoned_staging(folder)
            staging = Path(tempfile.mkdtemp(dir=folder, prefix=SAVE_STAGING_PREFIX))
            try:
                save_into(staging)
                flush_files_in(staging)  # each file's bytes on disk before its rename makes it visible
                forget_replaced_export_files(folder, replacements=staging)  # before the files it names change
                _move_saved_files(staging, folder)
                fsync_directory(folder)  # the renames themselves: a power cut after them keeps this save
            finally:
                shutil.rmtree(staging, ignore_errors=True)

    def _refresh_non_persistent_buffers(self) -> None:
        """Make the tables no checkpoint holds (the layers' ``derived_buffers``: token index, RoPE
        frequencies) again, on the model's device and in its dtype but at least float32: transformers may
        have left them uninitialised (it builds on the meta device); a bfloat16 model keeps float32 tables,
        as the layers' own casts do (:meth:`~innerloop.core.layer.TTTLayer._apply`), the float32 they
        have under autocast."""
        with torch.no_grad():
            for module in self.modules():
                derived = getattr(module, "derived_buffers", None)
                if not callable(derived):
                    continue
                # the tables as the reference's from_pretrained makes them: under the model's dtype
                for name, table in derived(self.dtype).items():
                    current = module._buffers.get(name)
                    if current is not None:
                        wide = torch.promote_types(self.dtype, torch.float32)
                        dtype = wide if table.is_floating_point() else table.dtype
                        module.register_buffer(
                            name, table.to(device=current.device, dtype=dtype), persistent=False
                        )
            # the token index as the model saved held it: rounded to float32 or exact (the config's record)
            remake_token_index(self, self.config.innerloop_token_index_dtype, where=TOKEN_INDEX_FIELD)


TOKEN_INDEX_FIELD = "InnerloopConfig.innerloop_token_index_dtype"
"""How a token-index record that does not fit the model is named: ``InnerloopConfig``'s field (a config
built in Python has no config.json; a loaded folder's config.json holds the field of that name)."""


def check_recorded_plugins(source: str, config: InnerloopConfig) -> None:
    """Compare the plugins a loaded folder's ``config`` records (``innerloop_plugins`` and their source
    digests, ``innerloop_plugin_sources``) with those registered now, as a checkpoint's load does
    (:func:`~innerloop.checkpoints.warn_changed_plugins`, :func:`~innerloop.checkpoints.check_plugin_settings`);
    ``source`` names the folder."""
    record = config.innerloop_plugins
    warn_changed_plugins(source, record, config.model, sources=config.innerloop_plugin_sources)
    check_plugin_settings(source, record, config.model)


SAVE_STAGING_PREFIX = ".innerloop-saving-"
"""The name prefix of the hidden folder in which ``save_pretrained`` stages a save inside its folder."""


@contextmanager
def _only_save_into(folder: Path) -> Iterator[bool]:
    """Hold ``folder`` locked (``flock`` on the folder itself) for a ``save_pretrained`` into it, raising
    ``RuntimeError`` naming it when another save (of this process or another) holds it: two saves moving
    their files in one by one, interleaved, would leave one save's ``config.json`` with the other's
    weights. Yields whether it holds the lock: where folders cannot be locked, the save goes on
    unguarded (and leaves other saves' staging folders alone: one may be running)."""
    handle = None
    if fcntl is not None:
        with contextlib.suppress(OSError):
            handle = os.open(folder, os.O_RDONLY)
    if handle is not None:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(handle)
            raise RuntimeError(
                f"save_pretrained into {str(folder)!r}: another save into that folder is running (in this "
                "process or another), and two saves moving their files in would leave one's config.json with "
                "the other's weights; save into another folder, or wait for that save to end"
            ) from None
        except OSError:  # a file system without locks
            os.close(handle)
            handle = None
    try:
        yield handle is not None
    finally:
        if handle is not None:
            os.close(handle)


def remove_abandoned_staging(folder: Path) -> None:
    """Remove the staging folders (:data:`SAVE_STAGING_PREFIX`) that a ``save_pretrained`` killed
    mid-save left in ``folder`` (a hidden copy of the weights that nothing else removes). Called only
    while holding ``folder``'s save lock (:func:`_only_save_into`), which every running save holds: any
    staging folder there is then abandoned."""
    for path in folder.glob(f"{SAVE_STAGING_PREFIX}*"):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)


EXPORT_RECORD = "innerloop_export.json"
"""The file in which ``innerloop export`` records each file it wrote, with its size and SHA-256
(:data:`innerloop.hf.export.MANIFEST` is this name: the export writes it, this module reads it)."""

EXPORT_RECORD_FORMAT = "innerloop-export"

EXPORT_RECORD_VERSION = 2
"""The record's ``version``: 2 from 2026-12-04 (084afb3), whose exports' tokenizers read text as the
run did; 1 before, when a Hugging Face tokenizer's export read a special token's text as the token and
added its template's tokens (:func:`warn_an_earlier_exports_tokenizer`)."""

CHECKED_EXPORT_FILES = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json")
"""The files of an export whose checksums ``from_pretrained`` verifies (fnmatch patterns): the weights,
where a changed byte would silently change the model's numbers. ``config.json`` is not among them: it
is checked for what it says when it is loaded (innerloop's checks, a warning naming a missing key), and
may be edited; nor are ``generation_config.json`` and the tokenizer's files, which the model does not
read."""


def local_folder(given: Any, subfolder: Any = None) -> Path | None:
    """The local folder ``from_pretrained`` reads for ``given`` (a path; ``subfolder`` inside it), or
    None (a Hub id, a folder that does not exist)."""
    if not isinstance(given, (str, os.PathLike)):
        return None
    folder = user_path(given) / (subfolder if isinstance(subfolder, str) else "")
    return folder if folder.is_dir() else None


_WEIGHT_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_CONFIG_FILE = "config.json"
_SHARD_INDEX = "model.safetensors.index.json"


def _move_saved_files(staging: Path, folder: Path) -> None:
    """Move the files ``save_pretrained`` wrote into ``staging`` into ``folder``, each by an atomic
    rename, ``config.json`` last. A sharded save first removes the earlier shard index: its shards take
    the earlier save's shard names one by one, and stopped between two (a Ctrl-C, a kill) the earlier
    index would load a mix of the two saves' weights; without one the folder refuses to load until saved
    again. Before ``config.json``, remove the earlier save's weight shards and shard index that
    this save did not write (as transformers does when it saves in place), so that once the new
    ``config.json`` is in (a save stopped right after it, by a Ctrl-C) the folder loads this save's
    weights: an earlier unsharded ``model.safetensors`` left beside new shards is what transformers
    loads. A file that replaces one keeps that file's permissions (a private ``chmod 600`` config stays
    private); a new one has the usual permissions (``0o666`` less the umask: safetensors writes the
    weights private, 0600, which on a shared machine no one else could load), as an export's files."""
    names = sorted(p.name for p in staging.iterdir())
    if _SHARD_INDEX in names:  # shards whose names the earlier save's have: never loaded beside those
        (folder / _SHARD_INDEX).unlink(missing_ok=True)
    for name in names:
        if name != _CONFIG_FILE:
            _move_in(staging / name, folder / name)
    _remove_stale_weights(folder, names)
    if _CONFIG_FILE in names:
        _move_in(staging / _CONFIG_FILE, folder / _CONFIG_FILE)


def _move_in(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target``, giving it the permissions of the file it replaces (if any, else
    the usual ones: :func:`~innerloop.data.atomic.permissions_to_give`)."""
    os.chmod(source, permissions_to_give(target))  # a new file: the usual 0o666 less the umask
    os.replace(source, target)


def _remove_stale_weights(folder: Path, names: list[str]) -> None:
    """Remove from ``folder`` the weight files of an earlier save that a save writing ``names`` does not
    replace: shards and a shard index it did not write, an unsharded ``model.safetensors`` where it
    wrote shards."""
    index, single = _SHARD_INDEX, "model.safetensors"
    stale = [p for p in folder.iterdir() if _WEIGHT_SHARD.fullmatch(p.name) and p.name not in names]
    if index not in names and (folder / index).is_file():
        stale.append(folder / index)
    if single not in names and index in names and (folder / single).is_file():
        stale.append(folder / single)  # an earlier unsharded save: transformers would load it, not the shards
    for path in stale:
        path.unlink(missing_ok=True)


def export_record(folder: Path) -> dict[str, dict[str, Any]] | None:
    """The files :data:`EXPORT_RECORD` in ``folder`` lists (plain file name -> ``{"size", "sha256"}``),
    or None: no record, or not one ``innerloop export`` wrote (a folder saved by hand loads as before)."""
    record = _export_record_document(folder)
    return None if record is None else _listed_files(record)


def _export_record_document(folder: Path) -> dict[str, Any] | None:
    """The JSON object of ``folder``'s :data:`EXPORT_RECORD`, or None: no record, or not one of
    ``innerloop export``'s format."""
    path = folder / EXPORT_RECORD
    if path.is_symlink() or not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != EXPORT_RECORD_FORMAT:
        return None
    return record


def _listed_files(record: dict[str, Any]) -> dict[str, dict[str, Any]] | None:
    """The files an export record lists, plain file names only (see :func:`export_record`)."""
    files = record.get("files")
    if not isinstance(files, dict):
        return None
    # Plain file names only: a record naming "../x" must not make --overwrite delete a file elsewhere.
    return {
        name: entry
        for name, entry in files.items()
        if isinstance(entry, dict)
        and name not in ("", ".", "..", EXPORT_RECORD)
        and Path(name).name == name
        and "\\" not in name
    }


def unchanged_since_export(path: Path, entry: dict[str, Any]) -> bool:
    """Whether ``path`` is still the file an export wrote: a regular file (not a link) of the size and
    checksum its record gives (``entry``, from :func:`export_record`)."""
    if path.is_symlink() or not path.is_file() or path.stat().st_size != entry.get("size"):
        return False
    return file_sha256(path) == entry.get("sha256")


def check_export_record(folder: Path) -> None:
    """Refuse, naming it, a file of :data:`CHECKED_EXPORT_FILES` that the export's record
    (:func:`export_record`) lists and that changed since (its size or SHA-256 differs: a damaged copy,
    or a file edited by hand). A folder without a record is not checked."""
    record = export_record(folder) or {}
    for name, entry in sorted(record.items()):
        path = folder / name
        checked = any(fnmatch.fnmatchcase(name, pattern) for pattern in CHECKED_EXPORT_FILES)
        if checked and path.is_file() and not path.is_symlink() and not unchanged_since_export(path, entry):
            raise ValueError(
                f"{str(path)!r} was changed after `innerloop export` wrote it: its size or SHA-256 differs "
                f"from the one {EXPORT_RECORD} records (a damaged or truncated copy? copy or export the "
                f"folder again; if you changed it on purpose, delete its entry from {EXPORT_RECORD})"
            )


def warn_an_earlier_exports_tokenizer(folder: Path) -> None:
    """Warn when ``folder``'s tokenizer files are those an ``innerloop export`` of record version 1
    (:data:`EXPORT_RECORD_VERSION`) wrote for a Hugging Face tokenizer: its ``tokenizer_config.json``,
    unchanged since the export, lacks ``split_special_tokens``. ``AutoTokenizer`` then reads a special
    token's text (``<|endoftext|>``) as the token and adds the tokens a template adds (a Llama
    tokenizer's ``<s>``), where the run, ``eval`` and ``generate`` read neither: other ids, silently. A
    file the user changed is theirs; a folder without the record (a ``save_pretrained``) is no export."""
    record = _export_record_document(folder)
    if record is None or _record_version(record) >= EXPORT_RECORD_VERSION:
        return
    entry = (_listed_files(record) or {}).get("tokenizer_config.json")
    path = folder / "tokenizer_config.json"
    if entry is None:
        return
    if not unchanged_since_export(path, entry):
        return
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(config, dict) or config.get("split_special_tokens") is True:
        return
    warnings.warn(
        f"the tokenizer files of {str(folder)!r} were written by an innerloop export before 2026-12-04: "
        "AutoTokenizer reads a special token's text as that token and adds the tokens its template adds "
        "(a start token), where the run and `innerloop generate` read neither, so a prompt's ids differ; "
        "export it again (`innerloop export CHECKPOINT OUT_DIR --overwrite`, which keeps your own files)",
        UserWarning,
        stacklevel=warning_stacklevel(),
    )


def _record_version(record: dict[str, Any]) -> int:
    """The ``version`` of an export record (1 where it gives none, or none of a valid kind)."""
    version = record.get("version", 1)
    return version if isinstance(version, int) and not isinstance(version, bool) else 1


def stored_weight_dtypes(folder: Path) -> dict[str, tuple[str, str]]:
    """Each weight in the safetensors files of ``folder`` (:func:`_weight_files`) -> its file and its
    stored dtype (safetensors' name, e.g. ``"F32"``), for :func:`refuse_integer_weights`; a file that
    safetensors cannot read (truncated, damaged) is refused, naming it. Reads the headers only."""
    stored: dict[str, tuple[str, str]] = {}
    for path in _weight_files(folder):
        try:
            with safe_open(path, "pt") as file:
                stored.update({key: (path.name, file.get_slice(key).get_dtype()) for key in file.keys()})
        except (SafetensorError, OSError) as err:
            raise ValueError(
                f"{str(path)!r} is not a readable safetensors file ({err}): a truncated or damaged copy? "
                "copy or export the folder again"
            ) from None
    return stored


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files ``from_pretrained`` reads the weights of ``folder`` from: ``model.safetensors``,
    or the shards its index names (none found: left to transformers, which names what is missing)."""
    single, index_path = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        shards = sorted(set(index["weight_map"].values()))
    except OSError:  # no index (or unreadable): transformers names what is missing
        return []
    # Not JSON, or no weight_map of names: transformers would raise that bare, naming no file.
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ValueError(
            f"{str(index_path)!r} is not a safetensors index (JSON with a 'weight_map' of weight names to "
            "shard files): a truncated or damaged copy? copy or export the folder again"
        ) from None
    return [folder / shard for shard in shards if isinstance(shard, str) and (folder / shard).is_file()]


def refuse_integer_weights(model: nn.Module, stored: dict[str, tuple[str, str]]) -> None:
    """Refuse a weight stored in an integer or bool dtype (``stored``: weight -> file and safetensors
    dtype, from :func:`stored_weight_dtypes`) where ``model``'s weight is floating: transformers would
    cast it silently (innerloop's own ``load_model`` refuses it too)."""
    state = model.state_dict()
    for key, (file, dtype) in sorted(stored.items()):
        floating_stored = dtype.startswith("F") or dtype == "BF16"
        if key in state and state[key].is_floating_point() and not floating_stored:
            raise ValueError(
                f"{file}: the weight {key!r} is stored as {dtype}, not a floating dtype, where the model's "
                f"is {state[key].dtype}; innerloop writes floating weights: was the file edited, or written "
                "by another program?"
            )


def refuse_rounded_weights(model: nn.Module, stored: dict[str, tuple[str, str]]) -> None:
    """Refuse a model loaded in a dtype that rounds a weight stored wider (``stored``: weight -> file and
    safetensors dtype, from :func:`stored_weight_dtypes`), for a ``from_pretrained`` that named no
    ``dtype``: transformers then loads in the dtype config.json names and casts every weight to it without
    a word (its own models too: a GPT-2 folder of float64 weights whose config says float32 loads in
    float32), so an edited config.json, or one another program wrote, lost the weights' precision where the
    user asked for nothing. A weight loaded as wide as stored, or wider, is fine."""
    state = model.state_dict()
    for key, (file, stored_dtype) in sorted(stored.items()):
        wide = SAFETENSORS_FLOAT_DTYPES.get(stored_dtype)
        loaded = state.get(key)
        if wide is None or loaded is None or not loaded.is_floating_point():
            continue
        if torch.promote_types(wide, loaded.dtype) != loaded.dtype:
            written = getattr(model.config, "dtype", None)
            raise ValueError(
                f"{file}: the weight {key!r} is stored as {wide}, but config.json's dtype "
                f"({str(written).removeprefix('torch.')!r}) loads it as {loaded.dtype}, which rounds it; pass "
                f"dtype={wide} to load the weights as stored, or dtype={loaded.dtype} to round them "
                "(or correct config.json's dtype)"
            )


def refuse_non_finite_weights(model: nn.Module, source: str) -> None:
    """Refuse a model whose loaded weights hold a NaN or an infinity (a diverged run saved with
    ``save_pretrained``, an edited file, or a value past the range of the ``dtype`` asked for), as
    innerloop's own checkpoints are refused (:func:`~innerloop.checkpoints.load_checkpoint`): every
    output would be NaN, blamed on the input later."""
    weights = model.state_dict()
    found = first_non_finite(weights.items())
    if found is not None:
        key, bad, total = found
        raise ValueError(
            f"{source}: the weight {key!r} holds {bad} NaN/infinite value(s) of {total} as loaded "
            f"({weights[key].dtype}); innerloop refuses non-finite weights: the model that was saved diverged, "
            "the file was edited, or its values do not fit the dtype asked for"
        )


def config_keys_note(folder: Path | None) -> str:
    """For the error about weights that do not fit: the keys the ``model`` section of ``folder``'s
    config.json lacks, which took their defaults (:func:`~innerloop.checkpoints.missing_keys_note`), or
    ``""`` (none, no local folder, a config.json that cannot be read)."""
    if folder is None:
        return ""
    try:
        model = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model")
    except (OSError, ValueError, AttributeError):
        return ""
    if not isinstance(model, dict):
        return ""
    return missing_keys_note(with_earlier_defaults(model), "config.json's 'model' section")


def forget_replaced_export_files(folder: Path, replacements: Path | None = None) -> None:
    """For ``save_pretrained`` into ``folder``: drop from the export's record (:func:`export_record`)
    the files that differ from what it recorded, so that ``from_pretrained`` reads the files saved
    (an ``innerloop export --overwrite`` treats a changed file and an unlisted one alike: as the user's,
    kept). The files compared are ``folder``'s, or with ``replacements`` those of that folder that are
    about to replace them. Nothing is written when no recorded file changed."""
    path = folder / EXPORT_RECORD
    files = export_record(folder)
    if not files:
        return
    source = folder if replacements is None else replacements
    changed = [
        name
        for name, entry in files.items()
        if (source / name).is_file()
        and not (source / name).is_symlink()
        and not unchanged_since_export(source / name, entry)
    ]
    if not changed:
        return
    record = json.loads(path.read_text(encoding="utf-8"))
    record["files"] = {name: entry for name, entry in record["files"].items() if name not in changed}
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")


def export_leftovers(out: Path, suffix: str) -> list[Path]:
    """The folders an interrupted export to ``out`` left beside it, oldest first: its staging folders
    (``suffix`` ``.tmp``) or the earlier export it had renamed aside (``.old``), as ``tempfile.mkdtemp``
    names them (``.<name>.<8 characters><suffix>``). Here, not in :mod:`innerloop.hf.export` (which
    imports this module), so that loading can name them too."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.[a-z0-9_]{{8}}{re.escape(suffix)}")
    if not out.parent.is_dir():
        return []
    found = [
        p for p in out.parent.iterdir() if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink()
    ]
    return sorted(found, key=lambda p: p.stat().st_mtime_ns)


def refuse_an_interrupted_export(folder: Any) -> None:
    """Raise ``FileNotFoundError`` when ``folder`` (a local path) does not exist because an
    ``innerloop export --overwrite`` to it was killed between its two renames: the earlier export waits
    beside it (:func:`export_leftovers`); the message names the most recent one and how to put it back.
    Nothing is moved here: the next export to ``folder`` settles it
    (:func:`innerloop.hf.export.settle_interrupted_export`). Anything else (a folder that exists, a Hub
    id) is left to transformers."""
    if not isinstance(folder, (str, os.PathLike)):
        return
    out = user_path(folder)
    if not out.name or os.path.lexists(out):
        return
    try:
        earlier = export_leftovers(out, ".old")
    except OSError:  # a parent folder that cannot be read: nothing to name
        return
    if not earlier:
        return
    latest = earlier[-1]
    raise FileNotFoundError(
        f"{str(folder)!r} does not exist: an `innerloop export` that was replacing the export there was "
        f"interrupted, and the earlier export waits beside it in {str(latest)!r}; put it back with "
        f"`mv {shlex.quote(str(latest))} {shlex.quote(str(out))}` (the next `innerloop export` to "
        f"{str(folder)!r} puts it back too, before it writes)"
    )


def refuse_a_folder_without_config(folder: Path) -> None:
    """Raise ``FileNotFoundError`` when the local ``folder`` holds no ``config.json`` (transformers would
    read it as an empty config, and the error would speak of a config.json that does not exist), saying
    how a training run's folder (its ``last.safetensors``) becomes one ``from_pretrained`` reads."""
    if (folder / _CONFIG_FILE).is_file():
        return
    checkpoint = folder / "last.safetensors"
    run = checkpoint.is_file() or (folder / "config.yaml").is_file()
    raise FileNotFoundError(
        f"{str(folder)!r} holds no config.json: from_pretrained reads a Hugging Face folder (config.json, "
        "model.safetensors) that `innerloop export` or save_pretrained wrote"
        + (
            f"; this is an innerloop training run: write one with `innerloop export "
            f"{shlex.quote(str(checkpoint))} OUT_DIR` and load OUT_DIR"
            if run
            else ""
        )
    )


def refuse_a_generation_config_not_an_object(folder: Path) -> None:
    """Raise ``ValueError`` naming the local ``folder``'s ``generation_config.json`` when it holds valid
    JSON that is not an object (a list, a number): transformers' loader, which ``from_pretrained`` runs
    after the weights, failed on it with "'list' object is not a mapping". Invalid JSON is left to it."""
    path = folder / "generation_config.json"
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # absent, unreadable or not JSON: transformers names those itself
        return
    if not isinstance(value, dict):
        raise ValueError(
            f"{str(path)!r} must hold a JSON object (generate()'s defaults, as `innerloop export` writes "
            f"them), got {type(value).__name__}: remove the file or write it again with `innerloop export`"
        )


def untied_e2e_note(model: InnerloopPreTrainedModel, info: dict[str, Any]) -> str:
    """For a TTT-E2E model with its own LM head whose folder lacks exactly that head: the export was
    written by an innerloop that took every TTT-E2E model for tied (transformers then saved the embedding
    alone, and loading tied the head to it: wrong logits). ``""`` otherwise."""
    model_section = model.config.model
    untied_e2e = model_section["mixer"] == E2E and not model_section["tie_embeddings"]  # type: ignore[index]
    if not untied_e2e or list(info.get("missing_keys") or ()) != ["model.lm_head.weight"]:
        return ""
    return (
        "; an earlier innerloop exported a TTT-E2E model with its own LM head (model.tie_embeddings=false) "
        "as tied and left the head out: export the model again from its checkpoint (innerloop export)"
    )


def loading_problems(info: dict[str, Any], shown: int = 4) -> str:
    """One line naming the missing, unexpected and mismatched weights of a ``from_pretrained`` (the first
    ``shown`` of each kind, with the shapes of a mismatch), or ``""`` when there are none."""
    parts = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        found = sorted(info.get(kind) or (), key=str)
        if not found:
            continue
        if kind == "mismatched_keys":  # (name, shape in the folder, shape the config gives)
            names = [
                f"{n} {list(have)} in the folder, {list(want)} for the config" for n, have, want in found
            ]
        else:
            names = [str(name) for name in found]
        more = f" and {len(found) - shown} more" if len(found) > shown else ""
        parts.append(f"{kind}: {'; '.join(names[:shown])}{more}")
    return " | ".join(parts)


CPU_ALIGNMENT = 64
"""Bytes to which PyTorch's CPU allocator aligns every tensor it allocates."""


def move_to_aligned_memory(model: nn.Module) -> None:
    """Copy each CPU parameter and buffer of ``model`` that is not at a :data:`CPU_ALIGNMENT`-byte aligned
    address into memory of its own (tied weights stay tied): transformers leaves the weights it reads
    from a safetensors file where it read them, and the CPU's matrix products round differently there
    (a TTT-E2E model's logits differed by 1 ulp in float64 from the model saved)."""
    with torch.no_grad():
        for parameter in model.parameters():  # each once: a tied weight is one parameter
            if parameter.device.type == "cpu" and parameter.data_ptr() % CPU_ALIGNMENT:
                parameter.data = parameter.data.clone()
        for owner in model.modules():
            for name, buffer in list(owner._buffers.items()):
                if buffer is not None and buffer.device.type == "cpu" and buffer.data_ptr() % CPU_ALIGNMENT:
                    owner._buffers[name] = buffer.clone()


def set_buffer(root: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace the buffer ``name`` (dotted) of ``root`` with ``value``, keeping it non-persistent."""
    owner_name, _, buffer_name = name.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    owner.register_buffer(buffer_name, value, persistent=False)


class InnerloopForCausalLM(InnerloopPreTrainedModel, GenerationMixin):
    """An innerloop language model (``config.model_config``) with transformers' API.

    ``model(input_ids).logits`` equals ``build_model(config.model_config)(input_ids)[0]`` with the same
    weights. ``generate()`` supports GenerationMixin's options (greedy, sampling with top-k/top-p,
    repetition penalty, stopping criteria, streamers); the cache is innerloop's recurrent state.

    >>> import torch
    >>> from innerloop.hf import InnerloopConfig, InnerloopForCausalLM
    >>> model = InnerloopForCausalLM(InnerloopConfig(model={"hidden_size": 32, "num_heads": 2})).eval()
    >>> model(torch.tensor([[104, 105]])).logits.shape
    torch.Size([1, 2, 256])
    """

    # transformers' Trainer then passes num_items_in_batch, the tokens scored over a step's micro-batches
    # (counted over labels[..., 1:]: loss_type "ForCausalLM", which transformers takes from the class's name,
    # makes it shift them as forward does), so that gradient accumulation weighs every token alike
    accepts_loss_kwargs = True

    def get_output_embeddings(self) -> nn.Linear:
        """The LM head (tied to the embedding unless ``model.tie_embeddings`` is false)."""
        return self.model.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        """Replace the LM head by one of the same shape (refused for a head tied to the embedding)."""
        if self.config.tie_word_embeddings:
            raise ValueError(
                "set_output_embeddings: this model's LM head is tied to the token embedding "
                "(model.tie_embeddings); replace the embedding (set_input_embeddings) instead"
            )
        _check_same_shape("set_output_embeddings", value, self.model.lm_head.weight)
        self.model.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: InnerloopCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool | None = None,
        past_key_values: InnerloopCache | None = None,
        cache_params: InnerloopCache | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs: Any,
    ) -> InnerloopCausalLMOutput | tuple:
        """``input_ids [B, T]`` -> logits ``[B, T, vocab]``, continuing from ``cache`` when given.

        Args:
            input_ids: token ids, a tensor ``[batch, length >= 1]`` of int64 or int32 (anything else is
                refused, naming it, before any other argument is read; length 0: :data:`EMPTY_PIECE_REFUSED`).
            attention_mask: ``[batch, cached + length]`` (it covers the tokens the cache has read too, as
                in transformers) of 0 and 1 (or bool); only ones, left padding, or right padding when no
                cache is passed in nor asked for (then none is returned; :func:`check_attention_mask`).
            cache: the :class:`InnerloopCache` of the previous call, to continue its sequence (or as
                ``past_key_values`` or ``cache_params``: two different caches are refused).
            labels: ``[batch, length]`` integer token ids; the loss is :func:`next_token_loss` (labels
                shifted inside, -100 ignored; float32, or float64 for a float64 model; 0 with nothing
                left to score), over every position whatever ``logits_to_keep``.
            use_cache: return the state as ``cache`` (default: ``config.use_cache``).
            inputs_embeds: ``[batch, length, hidden_size]``, the embedding's output, read instead of
                ``input_ids`` (one of the two); not for TTT-E2E, whose inner loop trains on the next ids.
            return_dict: a tuple instead of the output object when false.
            logits_to_keep: an int k keeps the logits of the last k positions (0, the default, keeps
                all), a tensor the positions it holds, ``0 .. length - 1``, or a bool mask (see
                :func:`~innerloop.hf.arguments.check_logits_to_keep`: out of range is refused).
            output_hidden_states: also return the hidden states (default: the config's); not for TTT-E2E.
            num_items_in_batch: an int or a tensor of one number: with ``labels``, the loss is the SUM of the
                scored tokens' cross-entropies divided by it (the ``Trainer``'s count: :func:`next_token_loss`).
            **kwargs: ``position_ids`` / ``cache_position`` equal to the positions the model reads,
                ``output_attentions=False`` and arguments given as None are accepted; any other is
                refused, naming it.
        """
        input_ids, cache, may_cache, hidden, pads, embeds = self._checked_call(  # pads' ids zeroed: see there
            input_ids, inputs_embeds, attention_mask, (cache, past_key_values, cache_params), use_cache,
            output_hidden_states, kwargs, return_dict, logits_to_keep,
        )  # fmt: skip
        labels = None if labels is None else check_labels(labels, input_ids, self.config.vocab_size, embeds)
        items = check_num_items_in_batch(num_items_in_batch)
        if labels is not None and pads is not None:
            labels = unscored_pads(labels, pads, 0 if cache is None else cache.seq_length)
        logits, state, hidden_states = self._run(input_ids, cache, hidden, True, pads, embeds)  # [B, T, V]
        new_cache = self._cache_after(  # with the hashes of the ids and embeddings read
            input_ids, cache, state, use_cache, may_cache, pads, embeds, attention_mask)  # fmt: skip
        loss = None if labels is None else next_token_loss(logits, labels, items)
        logits = slice_logits_to_keep(logits, plain_logits_to_keep(logits_to_keep))  # as transformers
        output = InnerloopCausalLMOutput(
            loss=loss, logits=logits, cache=new_cache, hidden_states=hidden_states
        )
        return output if return_dict is not False else output.to_tuple()

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        cache: InnerloopCache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """transformers' own, after checking once, before the prompt is read, that the mask has no
        padding but left padding and that a cache passed in is continued by ``input_ids``. Its
        ``inputs_embeds`` parameter tells ``generate()`` that the prompt may be given as embeddings."""
        if is_first_iteration:
            check_generate_batch(input_ids)
            check_generate_mask(attention_mask)
            if cache is not None:
                check_cache_continues(
                    cache,
                    input_ids,
                    next_sequence_length,
                    attention_mask,
                    inputs_embeds,
                    self.get_input_embeddings(),
                )
        return super().prepare_inputs_for_generation(
            input_ids,
            next_sequence_length=next_sequence_length,
            cache=cache,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )

    def _validate_generation_mode(self, generation_mode: Any, generation_config: Any, *args: Any) -> None:
        """transformers' own, then the counts of ``generate()`` (beams, sequences, tokens) checked:
        :func:`~innerloop.hf.arguments.check_generation_counts`, and sampling's temperature and top_p
        (:func:`~innerloop.hf.arguments.check_sampling_values`) and the penalties
        (:func:`~innerloop.hf.arguments.check_penalty_values`); assisted generation refused first
        (:func:`~innerloop.hf.arguments.check_not_assisted`)."""
        check_not_assisted(generation_mode, generation_config, args[0] if args else None)
        super()._validate_generation_mode(generation_mode, generation_config, *args)
        check_generation_counts(generation_config)
        check_sampling_values(generation_config)
        check_penalty_values(generation_config)

    def _get_logits_processor(self, generation_config: Any, *args: Any, **kwargs: Any) -> Any:
        """transformers' processors, its temperature warper replaced by
        :class:`ShiftedTemperatureLogitsWarper`: the same scores wherever transformers' division of the
        float32 scores by the temperature is finite; a tiny temperature (1e-45) samples the most likely
        token rather than crash, as :func:`innerloop.models.generate` does."""
        processors = super()._get_logits_processor(generation_config, *args, **kwargs)
        for index, processor in enumerate(processors):
            if type(processor) is TemperatureLogitsWarper:
                processors[index] = ShiftedTemperatureLogitsWarper(processor.temperature)
        eos = generation_config.eos_token_id
        eos_ids = [] if eos is None else torch.as_tensor(eos).flatten().tolist()
        prompt_length = kwargs.get("input_ids_seq_length", args[0] if args else None)
        prompts = kwargs.get("encoder_input_ids", args[1] if len(args) > 1 else None)
        prompt_count = prompts.shape[0] if torch.is_tensor(prompts) else None
        check = NonFiniteScoresCheck(eos_ids, prompt_length, prompt_count, generation_config.num_beams > 1)
        processors.insert(0, check)  # the model's own scores, before any processor
        # a greedy or sampling run's rows stay in place: its stopping criteria tell the check which finished;
        # held per thread (generate() asks for the criteria next on the same thread): two generate() calls
        # on one model from two threads keep their own checks
        _PENDING_SCORES_CHECK.by_model = {id(self): None if check.beams else check}
        return processors

    def _get_stopping_criteria(self, generation_config: Any, *args: Any, **kwargs: Any) -> Any:
        """transformers' stopping criteria, whose verdicts the generate call's
        :class:`NonFiniteScoresCheck` also records (:class:`StopsRecorded`) outside a beam search."""
        criteria = super()._get_stopping_criteria(generation_config, *args, **kwargs)
        check = getattr(_PENDING_SCORES_CHECK, "by_model", {}).pop(id(self), None)
        return criteria if check is None else StopsRecorded(criteria, check)

    def _prepare_attention_mask_for_generation(
        self, inputs_tensor: torch.Tensor, generation_config: Any, model_kwargs: dict[str, Any]
    ) -> torch.Tensor:
        """transformers infers a mask from ``pad_token_id`` where no mask is given: every occurrence of the
        id in the prompt would become padding, though it may be a token (a byte-level model's pad 0 is also
        its end-of-document byte), and a row read without it continues another text. Refused, saying how
        to pass the id as a token, and how to pass left-padded prompts (with their mask)."""
        mask = super()._prepare_attention_mask_for_generation(inputs_tensor, generation_config, model_kwargs)
        padding = mask_padding(mask)
        if padding is not None:
            pad = generation_config.pad_token_id
            raise ValueError(
                f"generate() got no attention_mask, and pad_token_id={pad} occurs in input_ids, so transformers "
                f"would take it for padding: {padding[1]}; innerloop models read every token they are given, "
                f"so whether id {pad} is a token must be said: if it is a token of the prompt, pass "
                "attention_mask=torch.ones_like(input_ids) (or another pad_token_id); if the prompts are left "
                "padded with it, pass their attention_mask (the tokenizer's, with padding_side='left'): left "
                "padding is read row by row, each row as its prompt alone; other padding is refused"
            )
        return mask

    def _prepare_model_inputs(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, str, dict[str, Any]]:
        """transformers' own, then ``generate()``'s prompt is checked: input_ids (a tensor ``[batch,
        length]`` of integer ids) or inputs_embeds (:meth:`_checked_embeddings`), at least one row, and
        its attention_mask's shape against it (and the cache passed in) and its values (0 and 1), before
        transformers drops a mask of ones (a mask of ones of another shape passed unseen)."""
        inputs, input_name, model_kwargs = super()._prepare_model_inputs(*args, **kwargs)
        if input_name not in ("input_ids", "inputs_embeds"):
            return inputs, input_name, model_kwargs
        if input_name == "input_ids":
            check_token_ids_shape(inputs)  # a 1-D tensor, a list: named here, not deep in transformers
            ids, embeds = inputs, None
        else:
            embeds = self._checked_embeddings(None, inputs)  # width, dtype, rank, TTT-E2E: named here
            ids = embeds[..., 0]  # stands for them: [batch, length]
        given = sequence_given(ids, embeds)
        check_generate_batch(ids, given)
        cache = model_kwargs.get("cache")
        cached = cache.seq_length if isinstance(cache, InnerloopCache) else 0
        if embeds is not None:
            check_embeddings_mask_shape(model_kwargs.get("attention_mask"), embeds, cached)
        check_mask_shape(model_kwargs.get("attention_mask"), ids, cached, caller="generate()", given=given)
        check_mask_values(model_kwargs.get("attention_mask"), caller="generate()")
        return inputs, input_name, model_kwargs

    def _prefill(
        self,
        input_ids: torch.Tensor,
        generation_config: Any,
        model_kwargs: dict[str, Any],
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        """transformers' own, after refusing chunked prefill of ``inputs_embeds`` (transformers chunks
        ``input_ids``, empty then, and its one empty chunk read the embeddings whole after the cache: wrong
        tokens) and without a cache, with what to pass: an innerloop model's cache is made by its first
        forward, so transformers cannot make an empty one. A chunked prompt's mask and cache are checked
        whole first (:func:`check_generate_mask`, :func:`check_cache_continues`), as an unchunked one's
        are: the checks of a chunk alone saw a slice of the mask (a left-padded row's first chunk all
        zeros, refused as an empty row)."""
        check_generate_pad_token(generation_config, input_ids.shape[0], self.config.vocab_size)
        chunk = generation_config.prefill_chunk_size
        if chunk is not None and model_kwargs.get("inputs_embeds") is not None:
            raise ValueError(
                f"generate(prefill_chunk_size={chunk}) chunks input_ids, and the prompt was given as "
                "inputs_embeds, which transformers does not chunk (it would read them whole after the cache): "
                "pass prefill_chunk_size=None with inputs_embeds, or give the prompt as input_ids"
            )
        if chunk is not None and model_kwargs.get("cache") is None:
            raise ValueError(
                f"generate(prefill_chunk_size={chunk}) reads the prompt in chunks into a cache, and an "
                "innerloop model makes its cache by reading tokens: read the first token, then pass its "
                "cache with the whole prompt: cache = model(input_ids[:, :1]).cache; "
                f"model.generate(input_ids, cache=cache, prefill_chunk_size={chunk}, ...)"
            )
        if chunk is not None:  # the whole prompt's checks: each chunk's alone named a slice of the mask
            cache, attention_mask = model_kwargs["cache"], model_kwargs.get("attention_mask")
            check_generate_mask(attention_mask)
            new_tokens = input_ids.shape[1] - cache.seq_length if isinstance(cache, InnerloopCache) else None
            check_cache_continues(
                cache, input_ids, new_tokens, attention_mask, None, self.get_input_embeddings()
            )
        return super()._prefill(input_ids, generation_config, model_kwargs, *args, **kwargs)

    def _reorder_cache(self, cache: InnerloopCache, beam_idx: torch.Tensor) -> InnerloopCache:
        """The cache of the beams ``beam_idx`` (beam search, between two steps): a new cache, so that a
        cache passed to ``generate()`` is never changed."""
        if not isinstance(cache, InnerloopCache):
            raise ValueError(f"beam search got a cache that is not an InnerloopCache: {type(cache).__name__}")
        return cache.index_select(beam_idx)

    def _expand_inputs_for_generation(
        self, expand_size: int = 1, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor | None, dict[str, Any]]:
        """transformers' own (each prompt repeated ``expand_size`` times, for beams or
        ``num_return_sequences``), and a cache passed in repeated with its prompt, row by row."""
        input_ids, model_kwargs = super()._expand_inputs_for_generation(expand_size, *args, **kwargs)
        for name in ("cache", "past_key_values", "cache_params"):
            cache = model_kwargs.get(name)
            if expand_size > 1 and isinstance(cache, InnerloopCache) and input_ids is not None:
                batch = cache.batch_size
                if batch * expand_size == input_ids.shape[0]:  # else forward names the batch sizes
                    model_kwargs[name] = cache.index_select(
                        torch.arange(batch).repeat_interleave(expand_size)
                    )
        return input_ids, model_kwargs


def _name_as_a_causal_lm() -> None:
    """List ``InnerloopForCausalLM`` among transformers' causal LMs (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``,
    model type ``"innerloop"``), which is how transformers' ``Trainer`` tells that its label smoother
    (``label_smoothing_factor``) must shift the labels: unlisted, it scored the logits at t against the
    label at t, the token the model reads, not the next one. ``AutoModelForCausalLM.register`` (hook.py)
    does not list it there; the lazy Auto mapping reads only the model types transformers' own configs
    name, so nothing else loads through this entry."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault("innerloop", InnerloopForCausalLM.__name__)


_name_as_a_causal_lm()


@dataclass
class InnerloopModelOutput(ModelOutput):
    """Output of :meth:`InnerloopModel.forward`.

    Attributes:
        last_hidden_state: ``[B, T, hidden]``, what the LM head reads: the last block's output after the
            final norm (``InnerloopForCausalLM``'s logits are ``model.lm_head`` of it).
        cache: the state after the last token (:class:`InnerloopCache`), unless ``use_cache=False``.
        hidden_states: with ``output_hidden_states=True``, ``num_layers + 1`` tensors ``[B, T, hidden]``:
            the embedding's output, each block's output, the last one after the final norm (as
            transformers' models return them; the last is ``last_hidden_state``).
    """

    last_hidden_state: torch.Tensor | None = None
    cache: InnerloopCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


class InnerloopModel(InnerloopPreTrainedModel):
    """An innerloop language model's network up to its final norm, with transformers' API: what
    ``AutoModel.from_pretrained`` loads from a folder that ``InnerloopForCausalLM`` (or ``innerloop
    export``) saved, for the hidden states of a sequence (``pipeline("feature-extraction")``, embeddings).

    ``model(input_ids).last_hidden_state`` is what ``InnerloopForCausalLM``'s LM head reads, with the same
    weights and the same checks of every argument; ``cache`` continues a sequence across calls exactly as
    there. It holds the whole network, the LM head included (unused), so that the folder's weights load
    strictly, by the same names. Not for the TTT-E2E model, whose last blocks train on their own logits
    chunk by chunk (refused when built).

    >>> import torch
    >>> from innerloop.hf import InnerloopConfig, InnerloopModel
    >>> model = InnerloopModel(InnerloopConfig(model={"hidden_size": 32, "num_heads": 2})).eval()
    >>> model(torch.tensor([[104, 105]])).last_hidden_state.shape
    torch.Size([1, 2, 32])
    """

    _supported_arguments = SUPPORTED_BASE_ARGUMENTS

    def __init__(self, config: InnerloopConfig) -> None:
        if config.model["mixer"] == E2E:  # type: ignore[index]
            raise ValueError(
                f"InnerloopModel (AutoModel) does not support the TTT-E2E model (model.mixer={E2E!r}): its last "
                "blocks train on their own next-token logits chunk by chunk, and innerloop does not record "
                "their hidden states; load it with AutoModelForCausalLM (InnerloopForCausalLM) for its logits"
            )
        super().__init__(config)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: InnerloopCache | None = None,
        use_cache: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        return_dict: bool | None = None,
        output_hidden_states: bool | None = None,
        past_key_values: InnerloopCache | None = None,
        cache_params: InnerloopCache | None = None,
        **kwargs: Any,
    ) -> InnerloopModelOutput | tuple:
        """``input_ids [B, T]`` -> ``last_hidden_state [B, T, hidden]``, continuing from ``cache`` when
        given. The arguments are :meth:`InnerloopForCausalLM.forward`'s, but ``labels`` and
        ``logits_to_keep`` (there is no head here); a right padding's positions hold numbers no token
        asked for, as in every causal model, and are for the caller to drop by the mask."""
        input_ids, cache, may_cache, hidden, pads, embeds = self._checked_call(
            input_ids, inputs_embeds, attention_mask, (cache, past_key_values, cache_params), use_cache,
            output_hidden_states, kwargs, return_dict,
        )  # fmt: skip
        features, new_state, hidden_states = self._run(input_ids, cache, hidden, False, pads, embeds)
        new_cache = self._cache_after(
            input_ids, cache, new_state, use_cache, may_cache, pads, embeds, attention_mask
        )
        output = InnerloopModelOutput(
            last_hidden_state=features, cache=new_cache, hidden_states=hidden_states
        )
        return output if return_dict is not False else output.to_tuple()


@contextmanager
def embeddings_given(embed: nn.Module, embeds: torch.Tensor | None) -> Iterator[None]:
    """While it lasts, ``embed``'s output in this thread is ``embeds`` (in the embedding's dtype), whatever
    ids it reads (placeholders of their shape); nothing changes when ``embeds`` is None. Another thread's
    forward of the same model meanwhile reads its own ids (the hook replaced its embeddings by these)."""
    if embeds is None:
        yield
        return
    owner = threading.get_ident()

    def given(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        return embeds.to(output.dtype) if threading.get_ident() == owner else None

    handle = embed.register_forward_hook(given)
    try:
        yield
    finally:
        handle.remove()


def _placed_rows(
    into: torch.Tensor | None, part: torch.Tensor, rows: torch.Tensor, skip: int, batch: int, length: int
) -> torch.Tensor:
    """``part [len(rows), length - skip, ...]`` written at ``into[rows, skip:]`` (``into`` None: zeros
    ``[batch, length, ...]`` of ``part``'s dtype), through autograd."""
    if into is None:
        into = part.new_zeros((batch, length, *part.shape[2:]))
    into[rows, skip:] = part
    return into


def _check_same_shape(name: str, module: nn.Module, current: torch.Tensor) -> None:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.shape != current.shape:
        shape = (
            list(weight.shape) if isinstance(weight, torch.Tensor) else f"no weight ({type(module).__name__})"
        )
        raise ValueError(
            f"{name}: the new module's weight is {shape}, the model's is {list(current.shape)} "
            "([vocab, hidden]); to change the vocabulary's size, use resize_token_embeddings"
        )


def _resized_vocab(new_num_tokens: Any, pad_to_multiple_of: Any, current: int) -> int:
    """``new_num_tokens`` (None: ``current``) rounded up to a multiple of ``pad_to_multiple_of``."""
    sizes = {"new_num_tokens": new_num_tokens, "pad_to_multiple_of": pad_to_multiple_of}
    for name, value in sizes.items():  # numpy's and 0-d tensor integers are read as ints
        number = None if value is None else as_integer(value)
        if value is not None and (number is None or number < 1):
            raise ValueError(
                f"resize_token_embeddings: {name} must be an integer >= 1 or None, got {value!r}"
            )
        sizes[name] = number
    new_num_tokens, pad_to_multiple_of = sizes["new_num_tokens"], sizes["pad_to_multiple_of"]
    size = current if new_num_tokens is None else new_num_tokens
    if pad_to_multiple_of is not None:
        size = -(-size // pad_to_multiple_of) * pad_to_multiple_of
    return size


def _resized_rows(weight: torch.Tensor, rows: int, mean_resizing: bool, std: float) -> nn.Parameter:
    """``weight [V, D]`` cut or extended to ``[rows, D]``: the kept rows copied, added rows the mean of
    the old ones (``mean_resizing``) or normal with ``std``."""
    with torch.no_grad():
        new = weight.new_empty(rows, weight.shape[1])
        kept = min(rows, weight.shape[0])
        new[:kept] = weight[:kept]
        if rows > kept:
            if mean_resizing:
                new[kept:] = weight.mean(dim=0)
            else:
                check_init_std(std, new)  # a float16 model's rows: 1e-8 would draw zeros
                nn.init.normal_(new[kept:], std=std)
    return nn.Parameter(new, requires_grad=weight.requires_grad)


@run_eagerly("innerloop: the label checks read values")
def check_labels(
    labels: Any, input_ids: torch.Tensor, vocab_size: int, embeds: torch.Tensor | None = None
) -> torch.Tensor:
    """``labels`` as int64 on the ids' device, after refusing a non-integer tensor, a shape other than
    ``input_ids``'s, or an id outside ``[0, vocab_size)`` other than -100, each named, with the
    sequence argument the caller passed (``embeds``, the ``inputs_embeds`` given, or ``input_ids``)."""
    shaped_like = f"[batch, length] of {sequence_given(input_ids, embeds)}"
    if not isinstance(labels, torch.Tensor):
        raise ValueError(
            f"labels must be a tensor of token ids shaped like the {shaped_like}, got {type(labels).__name__}"
        )
    integer = not (labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool)
    if not integer or labels.shape != input_ids.shape:
        raise ValueError(
            f"labels must be integer token ids shaped like the {shaped_like} (-100 to ignore a "
            f"position), got shape {list(labels.shape)} of {labels.dtype}"
        )
    labels = labels.to(device=input_ids.device, dtype=torch.int64)
    bad = (labels != -100) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        raise ValueError(
            f"labels holds token id {int(labels[bad][0])}, outside the model's vocabulary of {vocab_size} "
            f"tokens (0..{vocab_size - 1}); -100 ignores a position"
        )
    return labels


def unscored_pads(labels: torch.Tensor, pads: torch.Tensor, start: int) -> torch.Tensor:
    """``labels [B, T]`` of columns ``start ..`` with -100 at each row's left pads (``pads [B]``) and at its
    first token, which follows nothing but pads: a row read alone cannot predict its first token (its
    logits at the pads are zeros), so a left-padded row scores as the row alone does."""
    columns = torch.arange(start, start + labels.shape[1], device=labels.device)  # [T]
    return labels.masked_fill(columns <= pads.to(labels.device)[:, None], -100)


def next_token_loss(
    logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: float | None = None
) -> torch.Tensor:
    """Mean cross-entropy of ``logits [B, T, V]`` at position t against ``labels [B, T]`` at t + 1
    (-100 ignored), in float32 or the logits' wider dtype (float64 stays float64).

    With no label left to score (every shifted label -100, or one token per row) the loss is 0,
    attached to the graph (its backward gives zero gradients), not the mean over nothing, NaN, which
    would fill every gradient with NaN.

    With ``num_items_in_batch`` (a count, :func:`~innerloop.hf.arguments.check_num_items_in_batch`), the
    loss is the sum of the scored tokens' cross-entropies divided by it instead: transformers' ``Trainer``
    passes the tokens scored over all of a step's micro-batches, so that their losses add up to the mean
    over every token of the step. A count of 0 is taken for 1 when nothing is scored (the loss is then 0),
    and refused when something is."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    shifted_logits = logits[:, :-1].to(dtype)  # [B, T-1, V]
    shifted_labels = labels[:, 1:].to(logits.device)  # [B, T-1]
    total, scored = scored_cross_entropy_sum(shifted_logits, shifted_labels, ignore_index=-100)
    if num_items_in_batch is None:
        return total / scored.clamp_min(1)
    if num_items_in_batch == 0:
        if int(scored):
            raise ValueError(
                f"num_items_in_batch=0, but the labels score {int(scored)} token(s): it must count the tokens "
                "scored (labels[..., 1:] that are not -100) over the step's micro-batches"
            )
        return total  # 0, attached to the graph
    return total / num_items_in_batch
