"""Hypothesis strategies for TTT layers and update rules (requires the ``test`` extra)."""

from __future__ import annotations

from typing import Any

import torch

from innerloop.core.layer import DEFAULT_CONV_KERNEL, TTTLayer
from innerloop.core.protocol import Views
from innerloop.testing.checks import as_index, checked_max_lr, rule_refusal

try:
    from hypothesis import strategies as st
except ImportError as error:  # pragma: no cover - exercised only without the test extra
    raise ImportError(
        "innerloop.testing.strategies needs hypothesis: pip install 'innerloop[test]'"
    ) from error


#: Every ``(inner_norm, inner_residual)`` pair: what :func:`layer_configs` draws from by default.
ALL_INNER_WRAPPINGS: tuple[tuple[bool, bool], ...] = (
    (True, True),
    (False, False),
    (True, False),
    (False, True),
)

#: Above this many values, :func:`rich_first_integers` draws the rest with ``st.integers`` (a list of
#: every value would be large).
_LISTED_RANGE = 10_000


def rich_first_integers(low: int, high: int, first: int) -> st.SearchStrategy[int]:
    """Integers in ``[low, high]`` whose simplest example is ``first`` (clipped into the range), not ``low``.

    Hypothesis's first example is the simplest one (``st.integers(1, n)`` gives 1, ``st.booleans()``
    False, ``st.sampled_from`` its first element), and it shrinks a failure towards it: a strategy whose
    minimum is trivial (one token, a mini-batch of 1, one head) spends a test's first example, and with
    ``max_examples`` of 1 to 4 most of them, on a case where a dropped state carry, a wrong mini-batch
    remainder or a transposed head changes nothing. The other values are drawn as before.
    """
    first = min(max(first, low), high)
    if high - low > _LISTED_RANGE:
        return st.one_of(st.just(first), st.integers(low, high))
    return st.sampled_from([first, *(value for value in range(low, high + 1) if value != first)])


def _true_first() -> st.SearchStrategy[bool]:
    """Booleans whose simplest example is True (the option on: a gate, a convolution)."""
    return st.sampled_from((True, False))


#: The paper's wrapping alone (inner LayerNorm and residual on), the one the fused kernels compute.
PAPER_INNER_WRAPPING: tuple[tuple[bool, bool], ...] = ((True, True),)


def _check_counts(function: str, **bounds: tuple[object, int]) -> dict[str, int]:
    """Each ``name=(value, least)``: ``value`` must be an integer >= ``least`` (a numpy or 0-d torch
    integer too, the core's :func:`~innerloop.core.functional.as_integer`); else a ValueError naming
    ``function``'s argument, the value and what is valid (not hypothesis's 'max_value < min_value').
    Returns them as plain ints, by name: hypothesis takes no tensor bound and no numpy ``max_size``."""
    counts = {}
    for name, (value, least) in bounds.items():
        count = as_index(value)
        if count is None or count < least:
            raise ValueError(f"{function}: {name} must be an integer >= {least}, got {value!r}")
        counts[name] = count
    return counts


def _check_choices(function: str, name: str, values: object, what: str) -> None:
    """``values`` must be a non-empty tuple or list (hypothesis cannot sample from an empty one)."""
    if not isinstance(values, (tuple, list)) or not values:
        raise ValueError(f"{function}: {name} must be a non-empty tuple of {what}, got {values!r}")


def _check_head_dims(function: str, head_dims: tuple[int, ...], even: bool) -> tuple[int, ...]:
    """``head_dims``: a non-empty tuple of positive integers (even ones for a layer: RoPE rotates pairs),
    returned as plain ints (a numpy or tensor head dim drawn as it is gave ``hidden_size=tensor(8)``)."""
    what = "even positive integers (a layer's RoPE rotates pairs)" if even else "positive integers"
    _check_choices(function, "head_dims", head_dims, what)
    dims = tuple(as_index(dim) for dim in head_dims)
    for dim in dims:
        if dim is None or dim < 1 or (even and dim % 2):
            raise ValueError(f"{function}: head_dims must hold {what}, got {head_dims!r}")
    return dims  # type: ignore[return-value]


def _runs(model: str, rule: str) -> bool:
    """Whether ``rule`` runs ``model`` (both registered names); True where either is not registered (yet)."""
    try:
        return rule_refusal(model, rule) is None
    except ValueError as error:  # the registry's "unknown inner model / update rule"
        if "unknown" not in str(error):
            raise
        return True


def _rules_by_model(
    inner_models: tuple[str, ...], update_rules: tuple[str, ...]
) -> dict[str, tuple[str, ...]]:
    """The rules of ``update_rules`` that run each model of ``inner_models``, for the models some rule runs (in
    their order); a ValueError where none does."""
    runs = {model: tuple(r for r in update_rules if _runs(model, r)) for model in inner_models}
    if not any(runs.values()):
        raise ValueError(
            f"layer_configs: no update rule of {tuple(update_rules)} runs an inner model of {tuple(inner_models)} "
            f"(e.g. {rule_refusal(inner_models[0], update_rules[0])})"
        )
    return {model: rules for model, rules in runs.items() if rules}


class GatedTTTLayer(TTTLayer):
    """A ``TTTLayer`` with forgetting gates of its input, causal and per token and head: ``decay =
    0.5 sigmoid(x[..., h])`` and ``momentum = sigmoid(x[..., H + h])`` (no parameters: the first ``2 H``
    channels of ``x``; the layer's head dims are even, so there are that many). Where :func:`layer_configs` is asked for
    ``gates=True``, its configs build this layer: a test of "any split equals the whole" then sees a
    layer that drops the decay product or the momentum rule's ``S`` between calls fail.

    Args (beyond :class:`TTTLayer`'s): ``decay_gate`` and ``momentum_gate`` turn each gate on; the
    momentum gate reaches the scan only with a rule that ``supports_momentum`` (``momentum``).
    """

    def __init__(
        self, *args: Any, decay_gate: bool = True, momentum_gate: bool = True, **options: Any
    ) -> None:
        super().__init__(*args, **options)  # head dims are even (RoPE): hidden_size >= 2 num_heads
        self.decay_gate, self.momentum_gate = bool(decay_gate), bool(momentum_gate)

    def forgetting(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(decay, momentum)`` ``[B, H, T]`` for ``x [B, T, D]`` (None for a gate that is off)."""
        heads = self.num_heads
        gates = torch.sigmoid(x[..., : 2 * heads].unflatten(-1, (2, heads))).transpose(1, 3)  # [B, H, 2, T]
        decay = 0.5 * gates[:, :, 0] if self.decay_gate else None
        momentum = gates[:, :, 1] if self.momentum_gate and self.update_rule.supports_momentum else None
        return decay, momentum


def _gate_options(draw: st.DrawFn, gates: bool) -> dict[str, bool]:
    """:class:`GatedTTTLayer`'s options where ``gates`` (both on first), else none."""
    if not gates:
        return {}
    return {"decay_gate": draw(_true_first()), "momentum_gate": draw(_true_first())}


@st.composite
def layer_configs(
    draw: st.DrawFn,
    inner_models: tuple[str, ...] = ("linear", "mlp"),
    inner_losses: tuple[str, ...] = ("reconstruction", "next_token"),
    update_rules: tuple[str, ...] = ("dual_form", "minibatch_gd"),
    max_heads: int = 4,
    head_dims: tuple[int, ...] = (4, 6, 8),
    max_mini_batch: int = 6,
    inner_wrappings: tuple[tuple[bool, bool], ...] = ALL_INNER_WRAPPINGS,
    gates: bool = False,
) -> dict[str, Any]:
    """Keyword arguments of a small ``TTTLayer``: every option of the reference layer varies (head dims
    are even: the layer's RoPE rotates pairs; :func:`problems` also draws odd ones and 1).

    The simplest example (hypothesis's first, and where it shrinks a failure to) is a rich one, not the
    minimum of every range: two heads, a mini-batch of 3, the output gate and ``share_qk``'s convolutions
    of kernel 3 on (:func:`rich_first_integers`); the first of ``head_dims``, ``inner_models``,
    ``inner_losses``, ``update_rules`` and ``inner_wrappings``, so order those richest first.

    ``inner_wrappings`` are the ``(inner_norm, inner_residual)`` pairs drawn from: by default all four,
    so that a rule that ignores ``task.residual`` or the LayerNorm is caught. A test that a fused kernel
    is used should pass :data:`PAPER_INNER_WRAPPING` (both on, the paper's), the only wrapping those
    kernels compute; with the others ``kernel="auto"`` runs the torch path.

    ``gates=True``: the config builds a :class:`GatedTTTLayer` (decay and momentum gates, on first).

    The drawn ``update_rule`` runs the drawn ``inner_model`` (its ``check_model``: ``dual_form`` takes
    stack models only); a ``ValueError`` names choices where no rule runs any model. A name not
    registered when the strategy draws (a plugin the test registers in its body) is not filtered.
    """
    counts = _check_counts("layer_configs", max_heads=(max_heads, 1), max_mini_batch=(max_mini_batch, 1))
    max_heads, max_mini_batch = counts["max_heads"], counts["max_mini_batch"]
    names = {"inner_models": inner_models, "inner_losses": inner_losses, "update_rules": update_rules}
    for name, values in names.items():
        _check_choices("layer_configs", name, values, "registered names")
    _check_choices("layer_configs", "inner_wrappings", inner_wrappings, "(inner_norm, inner_residual) pairs")
    head_dims = _check_head_dims("layer_configs", head_dims, even=True)
    num_heads = draw(rich_first_integers(1, max_heads, 2))
    head_dim = draw(st.sampled_from(head_dims))
    inner_norm, inner_residual = draw(st.sampled_from(inner_wrappings))
    share_qk = draw(_true_first())
    runs = _rules_by_model(inner_models, update_rules)
    model = draw(st.sampled_from(tuple(runs)))
    loss = draw(st.sampled_from(inner_losses))
    return {
        "inner_norm": inner_norm,
        "inner_residual": inner_residual,
        "hidden_size": num_heads * head_dim,
        "num_heads": num_heads,
        "inner_model": model,
        "inner_loss": loss,
        "update_rule": draw(st.sampled_from(runs[model])),
        "mini_batch_size": draw(rich_first_integers(1, max_mini_batch, 3)),
        "base_lr": draw(st.sampled_from([0.1, 1.0, 3.0])),
        "use_gate": draw(_true_first()),
        "share_qk": share_qk,
        # the kernel of share_qk's convolutions (a layer without them warns of another than the default)
        "conv_kernel": draw(rich_first_integers(1, 4, 3)) if share_qk else DEFAULT_CONV_KERNEL,
        **_gate_options(draw, gates),
    }


@st.composite
def split_points(draw: st.DrawFn, total: int, max_cuts: int = 4) -> list[int]:
    """Sorted distinct cut points strictly inside ``[0, total]`` (possibly none).

    The simplest example (hypothesis's first) cuts twice where it can, at ``total // 3`` and
    ``2 * total // 3`` (8 tokens: read as 2, 3 and 3), not nowhere: a test of "any split equals the
    whole" whose first example reads the sequence whole checks nothing.
    """
    counts = _check_counts("split_points", total=(total, 0), max_cuts=(max_cuts, 0))
    total, max_cuts = counts["total"], counts["max_cuts"]
    if total < 2 or max_cuts == 0:
        return []
    inside = range(1, total)
    first = list(dict.fromkeys(min(max(total * k // 3, 1), total - 1) for k in (1, 2)))
    positions = [*first, *(cut for cut in inside if cut not in first)]
    size = draw(rich_first_integers(0, min(max_cuts, len(inside)), 2))
    cuts = draw(st.lists(st.sampled_from(positions), min_size=size, max_size=size, unique=True))
    return sorted(cuts)


@st.composite
def views(
    draw: st.DrawFn,
    max_batch: int = 4,
    max_heads: int = 4,
    head_dims: tuple[int, ...] = (5, 1, 3, 4, 8),
    max_tokens: int = 40,
    dtype: torch.dtype = torch.float64,
) -> Views:
    """Random ``Views`` (XQ, XK, XV ``[B, H, T, f]``) with values of moderate size.

    The simplest example (hypothesis's first) is 2 sequences, 2 heads, 13 tokens and the first of
    ``head_dims`` (5 by default), not one token of one head: see :func:`rich_first_integers`."""
    counts = _check_counts(
        "views", max_batch=(max_batch, 1), max_heads=(max_heads, 1), max_tokens=(max_tokens, 1)
    )
    head_dims = _check_head_dims("views", head_dims, even=False)
    shape = (
        draw(rich_first_integers(1, counts["max_batch"], 2)),
        draw(rich_first_integers(1, counts["max_heads"], 2)),
        draw(rich_first_integers(1, counts["max_tokens"], 13)),
        draw(st.sampled_from(head_dims)),
    )
    generator = torch.Generator().manual_seed(draw(seeds()))
    return Views(*(torch.randn(shape, generator=generator, dtype=dtype) for _ in range(3)))


@st.composite
def problems(
    draw: st.DrawFn,
    max_batch: int = 4,
    max_heads: int = 6,
    head_dims: tuple[int, ...] = (5, 1, 3, 4, 8),
    max_tokens: int = 40,
    max_mini_batch: int = 6,
    inner_models: tuple[str, ...] | None = None,
    max_lrs: tuple[float | None, ...] | None = None,
) -> dict[str, Any]:
    """Shape keyword arguments of :func:`innerloop.testing.checks.make_problem` (and of
    ``check_inner_model``, ``check_inner_loss``, ``check_update_rule``): ``batch`` (from 2, up to
    ``max_batch``: a plugin wrong for the third sequence is caught), ``heads`` (up to ``max_heads``:
    past the fourth by default), ``head_dim`` (odd ones and 1 by default), ``tokens`` (up to
    ``max_tokens``: longer than a plugin's internal blocks of 16 or 32; ``check_update_rule`` without
    a shape also runs a 150-token call, and a 2063-token one against itself in pieces) and ``mini_batch_size``.

    The simplest example (hypothesis's first, and where it shrinks a failure towards) is a rich one: 2
    sequences, 2 heads, the first of ``head_dims`` (5 by default), 13 tokens and a mini-batch of 3 (four
    whole mini-batches and a remainder of one), not one token of one head
    (:func:`rich_first_integers`).

    ``inner_models`` (registered names, e.g. ``("linear", "mlp")``) adds a drawn ``model`` to the
    arguments, for ``check_update_rule(rule, **shape)`` (which takes a model's name): a rule right for
    one model only is caught. Leave it None for ``make_problem`` and the other checks, which take the
    model positionally (``check_update_rule`` then checks every built-in model the rule accepts).

    ``max_lrs`` (rate bounds, or None for make_problem's default draw, e.g. ``(LARGE_RATES_BOUND, None)``,
    the first the simplest) adds a drawn ``max_lr``, for ``make_problem`` and ``check_update_rule`` (the
    other checks take no rates): rates are then uniform in [0, ``max_lr``), whatever the LayerNorm.

    Its defaults stop at head dim 8, mini-batches of 6 and 40 tokens (cheap enough for many examples);
    :func:`wide_problems` draws past them (head dims 12 to 64, mini-batches of 16 to 64, ``K > T``).

    The default head dims leave out 2: the inner LayerNorm over two features is a constant (``+-w + b``)
    whose derivative is ~1e-10 of its inputs, so the gradients through it, and any float64 comparison
    of them, measure rounding rather than the plugin's math.
    """
    counts = _check_counts(
        "problems",
        max_batch=(max_batch, 2),  # batch is drawn from 2: a plugin wrong for the second sequence is caught
        max_heads=(max_heads, 1),
        max_tokens=(max_tokens, 1),
        max_mini_batch=(max_mini_batch, 1),
    )
    head_dims = _check_head_dims("problems", head_dims, even=False)
    if inner_models is not None:
        _check_choices("problems", "inner_models", inner_models, "registered names (or None)")
    drawn: dict[str, Any] = {
        "batch": draw(st.integers(2, counts["max_batch"])),
        "heads": draw(rich_first_integers(1, counts["max_heads"], 2)),
        "head_dim": draw(st.sampled_from(head_dims)),
        "tokens": draw(rich_first_integers(1, counts["max_tokens"], 13)),
        "mini_batch_size": draw(rich_first_integers(1, counts["max_mini_batch"], 3)),
    }
    if inner_models is not None:
        drawn["model"] = draw(st.sampled_from(inner_models))
    if max_lrs is not None:
        drawn["max_lr"] = draw(st.sampled_from(_checked_max_lrs(max_lrs)))
    return drawn


def _checked_max_lrs(max_lrs: object) -> tuple[float | None, ...]:
    """``problems``' ``max_lrs``: a non-empty tuple of None or finite numbers >= 0 (as make_problem takes
    them), else a ValueError naming it, not make_problem's later, once per drawn example."""
    _check_choices("problems", "max_lrs", max_lrs, "None or finite numbers >= 0 (inner learning rate bounds)")
    bounds = []
    for bound in max_lrs:  # type: ignore[union-attr]
        try:
            bounds.append(checked_max_lr(bound))
        except ValueError as error:
            raise ValueError(
                f"problems: max_lrs must hold None or finite numbers >= 0, got {max_lrs!r}"
            ) from error
    return tuple(bounds)


#: The head dims :func:`wide_problems` draws: past 8 and not a power of two first (12, 20), across the
#: tile boundaries of 16, 32 and 64 (17, 33), and the boundaries themselves.
WIDE_HEAD_DIMS: tuple[int, ...] = (12, 20, 33, 16, 17, 32, 64)

#: The mini-batch sizes :func:`wide_problems` draws: a tile of 32 rows first, then across 16, 32, 64.
WIDE_MINI_BATCHES: tuple[int, ...] = (32, 17, 33, 16, 24, 64)


@st.composite
def wide_problems(
    draw: st.DrawFn,
    head_dims: tuple[int, ...] = WIDE_HEAD_DIMS,
    mini_batch_sizes: tuple[int, ...] = WIDE_MINI_BATCHES,
    inner_models: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Shape keyword arguments like :func:`problems`', past where its defaults stop (head dim 8,
    mini-batches of 6, 40 tokens): head dims of :data:`WIDE_HEAD_DIMS`, mini-batches of
    :data:`WIDE_MINI_BATCHES` and a call length drawn against the mini-batch ``K``: shorter than one
    mini-batch (``K > T``), exactly one, one past it, or one and 13 tokens (``T % K != 0``). A rule or
    kernel wrong only past a tile boundary, for a head dim that is not a power of two, or when ``T`` is
    not a multiple of ``K`` is met here. Two sequences and two heads (the wide sizes cost enough).

    The simplest example (hypothesis's first) is head dim 12, ``K = 32`` and ``T = K + 13 = 45``:
    :data:`innerloop.testing.checks.WIDE_MINI_BATCH_SHAPE`'s mini-batches, at a head dim between 8 and
    16. A ``check_update_rule`` call with a drawn shape checks that shape only; for the dual form in
    float64 on one CPU core that took 0.7 s (linear) and 1.2 s (MLP) at the first example, 3.2 s and 9.8 s
    at head dim 64, ``K = 64``, 141 tokens: give such a test few examples (``max_examples`` 5 to 10).
    """
    head_dims = _check_head_dims("wide_problems", head_dims, even=False)
    _check_choices("wide_problems", "mini_batch_sizes", mini_batch_sizes, "positive integers")
    sizes = [as_index(size) for size in mini_batch_sizes]
    if any(size is None or size < 1 for size in sizes):
        raise ValueError(
            f"wide_problems: mini_batch_sizes must hold positive integers, got {mini_batch_sizes!r}"
        )
    if inner_models is not None:
        _check_choices("wide_problems", "inner_models", inner_models, "registered names (or None)")
    k = draw(st.sampled_from(sizes))
    lengths = dict.fromkeys([k + 13, max(1, k // 2), k, k + 1])  # T % K != 0 first, then K > T
    drawn: dict[str, Any] = {
        "batch": 2,
        "heads": 2,
        "head_dim": draw(st.sampled_from(head_dims)),
        "tokens": draw(st.sampled_from(tuple(lengths))),
        "mini_batch_size": k,
    }
    if inner_models is not None:
        drawn["model"] = draw(st.sampled_from(inner_models))
    return drawn


def seeds() -> st.SearchStrategy[int]:
    """Seeds for torch generators."""
    return st.integers(0, 2**31 - 1)


__all__ = [
    "ALL_INNER_WRAPPINGS",
    "PAPER_INNER_WRAPPING",
    "layer_configs",
    "problems",
    "rich_first_integers",
    "seeds",
    "split_points",
    "views",
    "wide_problems",
]
