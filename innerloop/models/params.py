"""Parameter counts of a language model, and sizing a model to a parameter budget.

:func:`count_parameters` splits a model's parameters into parts by where they sit: the token
embedding (and an untied LM head), each block's mixer (the TTT layer or the attention; for TTT-E2E the
sliding-window attention, and the prime MLP apart as ``prime``), MLP, norms and pre-conv. A parameter
shared by two modules (the tied LM head) is counted once.

:func:`size_to_budget` finds the width (``intermediate_size`` by default, or ``hidden_size``) that
brings a config closest to a number of parameters: the way to compare two mixers at equal size.
Models are built on the ``meta`` device to be counted, so counting a large config allocates nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from innerloop.core.compiled import plain_name, uncompiled
from innerloop.core.functional import as_integer
from innerloop.models.config import MODEL_FIELD_BOUNDS, ModelConfig, uses_rope
from innerloop.models.factory import build_model

PARTS: tuple[str, ...] = ("embedding", "head", "mixer", "prime", "mlp", "pre_conv", "norm", "other")
"""The parts :func:`count_parameters` reports, in this order."""

SIZABLE_FIELDS: tuple[str, ...] = ("intermediate_size", "hidden_size")
"""The :class:`ModelConfig` fields :func:`size_to_budget` may adjust."""


@dataclass(frozen=True)
class ParameterCounts:
    """A model's parameters, counted once each (a tied head is part of the embedding).

    Attributes:
        total: every distinct parameter.
        parts: parameters by part (:data:`PARTS`): ``embedding`` (token embedding), ``head`` (an untied
            LM head), ``mixer`` (every block's sequence mixer), ``prime`` (TTT-E2E's prime MLPs, the
            weights that learn at test time), ``mlp``, ``pre_conv``, ``norm`` (every norm outside a
            mixer), ``other``.
        per_block: parameters of each block, in order.
        per_block_mixer: parameters of each block's mixer, in order.
    """

    total: int
    parts: dict[str, int] = field(default_factory=dict)
    per_block: tuple[int, ...] = ()
    per_block_mixer: tuple[int, ...] = ()

    @property
    def embedding(self) -> int:
        """The token embedding and an untied LM head."""
        return self.parts["embedding"] + self.parts["head"]

    @property
    def mixer(self) -> int:
        """Every block's mixer together."""
        return self.parts["mixer"]

    @property
    def non_embedding(self) -> int:
        """Everything but the embedding and head."""
        return self.total - self.embedding

    def describe(self) -> str:
        """One line: ``118,760 parameters (embedding 16,384; mixer 2 x 18,004; mlp 66,048; ...)``, whose
        parts add up to the total: ``embedding`` is the token embedding alone there, an untied head its
        own ``head`` part (the :attr:`embedding` property counts both)."""
        mixers = self.per_block_mixer
        if mixers and len(set(mixers)) == 1:
            mixer = f"mixer {len(mixers)} x {mixers[0]:,}"
        else:
            mixer = f"mixer {self.mixer:,} ({', '.join(f'{m:,}' for m in mixers)})"
        rest = [f"{part} {n:,}" for part, n in self.parts.items() if n and part not in ("embedding", "mixer")]
        return (
            f"{self.total:,} parameters (embedding {self.parts['embedding']:,}; {'; '.join([mixer, *rest])})"
        )


def _part_of(name: str) -> str:
    """The part of the parameter called ``name`` in a CausalLM or E2ELM (see :data:`PARTS`)."""
    parts = name.split(".")
    if parts[0] == "embed":
        return "embedding"
    if parts[0] == "lm_head":
        return "head"
    if parts[0] != "blocks" or len(parts) < 3:
        return "norm" if parts[0] == "norm" else "other"
    sub = parts[2]
    if sub in ("mixer", "attn"):
        return "mixer"
    if sub.endswith("norm"):
        return "norm"
    if sub in ("prime", "mlp", "pre_conv"):
        return sub
    return "other"


SIZE_TOLERANCE = 0.05
"""Relative difference in parameters within which two models are the same size (:func:`same_size`): the
presets' tiny models are matched within it (``tests/models/test_params.py``)."""


def same_size(ours: int, theirs: int) -> bool:
    """Whether two parameter counts differ by at most :data:`SIZE_TOLERANCE` of the smaller one (the
    same verdict whichever is named first): the rule of ``innerloop compare``'s size notes and of
    ``innerloop params --budget``'s advice."""
    return abs(ours - theirs) <= SIZE_TOLERANCE * min(ours, theirs)


def count_parameters(model: nn.Module) -> ParameterCounts:
    """The parameters of ``model`` (a :class:`~innerloop.models.CausalLM` or
    :class:`~innerloop.models.E2ELM`, or either compiled by ``torch.compile``, whole or a part in place),
    by part and by block; see :class:`ParameterCounts`. A compiled model's names are read as the
    uncompiled model's (:func:`~innerloop.core.compiled.plain_name`), so its parts are counted alike."""
    parts = dict.fromkeys(PARTS, 0)
    num_blocks = len(getattr(uncompiled(model), "blocks", ()))
    per_block, per_block_mixer = [0] * num_blocks, [0] * num_blocks
    for compiled_name, parameter in model.named_parameters():  # each shared parameter once, first name
        name = plain_name(compiled_name)  # "_orig_mod.embed.weight" -> "embed.weight"
        part = _part_of(name)
        parts[part] += parameter.numel()
        if name.startswith("blocks."):
            block = int(name.split(".")[1])
            per_block[block] += parameter.numel()
            if part == "mixer":
                per_block_mixer[block] += parameter.numel()
    return ParameterCounts(sum(parts.values()), parts, tuple(per_block), tuple(per_block_mixer))


def count_config_parameters(config: ModelConfig) -> ParameterCounts:
    """:func:`count_parameters` of the model ``config`` describes, built on the meta device (no memory)."""
    with torch.device("meta"):
        return count_parameters(build_model(config))


def _count_with_width(config: ModelConfig, name: str, value: int) -> int | None:
    """The parameter count of ``config`` with ``name = value``, or None when that config is invalid (e.g.
    a hidden size the heads do not divide)."""
    try:
        total = count_config_parameters(replace(config, **{name: value})).total
    except ValueError:
        return None
    return total if total > 0 else None


def size_to_budget(config: ModelConfig, budget: int, adjust: str = "intermediate_size") -> ModelConfig:
    """``config`` with the field ``adjust`` (one of :data:`SIZABLE_FIELDS`) set to the value whose
    parameter count is closest to ``budget`` (the smaller value on a tie).

    The count grows with either field, so the value is found by bisection. ``hidden_size`` takes
    multiples of ``num_heads`` (of ``2 * num_heads`` where the mixer applies RoPE, which needs an even
    head dimension). The closest value is
    returned however far it is (a budget below the embedding alone gives width 1): compare
    ``count_config_parameters(result).total`` with your tolerance.
    """
    if adjust not in SIZABLE_FIELDS:
        raise ValueError(
            f"adjust={adjust!r} is not a field size_to_budget sizes; valid: {list(SIZABLE_FIELDS)}"
        )
    given, budget = budget, as_integer(budget)  # numpy's and 0-d tensor integers too
    if budget is None or budget < 1:
        raise ValueError(f"budget={given!r} must be a positive integer (a number of parameters)")
    step = (2 if uses_rope(config) else 1) * config.num_heads if adjust == "hidden_size" else 1
    largest = int(MODEL_FIELD_BOUNDS[f"model.{adjust}"].high or 2**24) // step  # the field's own limit
    low, high = 1, min(largest, max(2, getattr(config, adjust) // step))
    while _total(config, adjust, high * step) < budget and high < largest:  # grow until over the budget
        low, high = high, min(largest, high * 2)
    while high - low > 1:  # the largest multiple whose count is <= budget lies in [low, high)
        middle = (low + high) // 2
        if _total(config, adjust, middle * step) <= budget:
            low = middle
        else:
            high = middle
    counts = {m * step: total for m in (low, high) if (total := _count_with_width(config, adjust, m * step))}
    if not counts:
        raise ValueError(
            f"no valid {adjust} near {low * step} for {config.mixer!r}: cannot size it to {budget}"
        )
    closest = min(counts, key=lambda width: abs(counts[width] - budget))  # the smaller width on a tie
    return replace(config, **{adjust: closest})


def _total(config: ModelConfig, name: str, value: int) -> int:
    """The parameter count with ``name = value``; an invalid value counts as its neighbour would, so
    the bisection steps over it (its count grows with the value like the valid ones')."""
    for width in (value, value + (2 * config.num_heads if name == "hidden_size" else 1)):
        total = _count_with_width(config, name, width)
        if total is not None:
            return total
    return 0
