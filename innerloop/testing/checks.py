"""Conformance checks for plugins: call them from a plugin's own tests.

Each check builds a small random inner problem in float64 and raises ``AssertionError`` with the
measured error when the plugin breaks a property every TTT plugin must have:

- :func:`check_inner_model`: shapes; autograd's derivatives of ``forward`` equal finite differences;
  the dual form (if the model declares a stack) equals the primal form equals the naive token-by-token loop.
- :func:`check_inner_loss`: shapes; causality (a pair never depends on later tokens) and independence of
  the sequences and of the heads; pairs built
  chunk by chunk (cut anywhere) and token by token with the carry, from the initial carry and from a
  carried-on one, equal the pairs of the whole; autograd's derivatives of the pairs (and the carry)
  w.r.t. the views equal finite differences; the per-token gradient equals autograd, and autograd's
  derivatives of ``token_loss`` equal finite differences; ``pairs``, ``token_loss`` and ``token_loss_grad``
  give the same numbers on two calls with the same arguments (no fresh noise);
  the primal form with this loss equals the naive loop.
- :func:`check_update_rule`: the rule equals the naive loop (or the token-by-token reference it
  declares, ``UpdateRule.reference``: another inner optimizer), and any split of a sequence with the
  state carried equals the whole sequence (and, with no shape given, one call of 2063 tokens equals
  the same tokens in pieces, :func:`check_long_call_as_pieces`); with random decay and momentum too where the rule takes
  them, and a decay or momentum of 0 equals the plain rule (:func:`check_zero_decay_and_momentum`);
  for every built-in loss and layer wrapping (norm, residual on and off) unless told one; and the
  gradients w.r.t. every input equal the naive loop's
  (:func:`check_update_rule_gradients_match_naive`); and in float32, within a small factor of its
  reference's own float32 error (:func:`check_update_rule_in_float32`). A declared reference may not
  call the rule's own ``forward``.
- :func:`check_update_rule_gradients`: float64 gradcheck through the rule, decay and momentum included.

The registry runs the cheap ones on every plugin it registers (:func:`check_loss_gradient`,
:func:`check_pairs_deterministic`, :func:`check_pairs_causal`, :func:`check_pairs_chunk_invariant`,
:func:`check_stack_matches_forward`,
:func:`check_activation_derivatives`, and :func:`check_update_rule` on a tiny problem), so a plugin
that breaks them is refused with the reason instead of computing wrong numbers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from functools import wraps
from typing import Any, NoReturn, ParamSpec, TypeVar

import torch
from torch.autograd.gradcheck import GradcheckError

from innerloop.core.functional import TORCH_SEEDS, TORCH_SEEDS_TEXT, as_integer, check_flag, relative_error
from innerloop.core.layer import TTTLayer
from innerloop.core.protocol import (
    STACK_TOLERANCE,
    InnerLoss,
    InnerModel,
    InnerTask,
    LossPairs,
    UpdateRule,
    Views,
    apply_stack,
    check_stack_on_random_weights,
    stack_forward_mismatch,
)
from innerloop.core.scan import RuleOutputError, check_rule_returns, model_refusal, run_scan, takes_decay_log
from innerloop.core.state import StateSignature, TTTState
from innerloop.testing.reference import naive_token_loop

#: float64 agreement required between mathematically equal computations.
FLOAT64_TOLERANCE = 1e-10

#: Agreement the registry asks of a plugin at registration (one random point, float64). Looser than
#: FLOAT64_TOLERANCE so that a plugin computing internally in float32 is not refused; a wrong closed
#: form (a missing factor, a wrong sign) is off by far more than this.
REGISTRATION_TOLERANCE = STACK_TOLERANCE


@dataclass
class InnerProblem:
    """A random inner-loop problem: what an update rule takes, without a layer around it.

    ``decay`` and ``momentum`` (``[B, H, T]`` or None) are given to the rule only when set; ``tau``
    is None for a rule without a token-index scale (see :meth:`for_rule`). ``decay_log`` (``log(1 -
    decay)``, instead of ``decay``) gives the rule its gate as the family layers do
    (:func:`innerloop.core.scan.run_scan`; :func:`check_update_rule` checks a rule that names it so).
    ``seed`` and ``max_lr``: what :func:`make_problem` drew it with (None where not known), so that a
    failure names the problem as the call that builds it again."""

    state: TTTState
    task: InnerTask
    views: Views
    lr: torch.Tensor
    tau: torch.Tensor | None
    decay: torch.Tensor | None = None
    momentum: torch.Tensor | None = None
    decay_log: torch.Tensor | None = None
    seed: int | None = None
    max_lr: float | None = None

    def for_rule(self, rule: UpdateRule) -> InnerProblem:
        """The problem as ``rule`` takes it: no token-index scale for a rule that has none."""
        return self if rule.uses_token_scale else replace(self, tau=None)

    def run(self, rule: UpdateRule) -> tuple[torch.Tensor, TTTState]:
        """``rule`` over the whole problem, through :func:`innerloop.core.scan.run_scan`; what it returns
        checked by :func:`check_rule_returns`."""
        result = run_scan(
            rule,
            self.state,
            self.task,
            self.views,
            self.lr,
            self.tau,
            self.decay,
            self.momentum,
            decay_log=self.decay_log,
        )
        return check_rule_returns(rule, result, self.state, self.views)

    def naive(self) -> tuple[torch.Tensor, TTTState]:
        """The naive token loop on the problem (:func:`innerloop.testing.reference.naive_token_loop`)."""
        return naive_token_loop(
            self.state, self.task, self.views, self.lr, self.tau, self.decay, self.momentum
        )

    def expected(self, rule: UpdateRule) -> tuple[torch.Tensor, TTTState]:
        """What ``rule`` must compute on the problem: its declared token-by-token reference
        (``UpdateRule.reference``, given ``decay=`` / ``momentum=`` only when set), else the naive
        token loop of mini-batch gradient descent (:meth:`naive`)."""
        reference = getattr(rule, "reference", None)
        if reference is None:
            return self.naive()
        extras = {k: getattr(self, k) for k in ("decay", "momentum") if getattr(self, k) is not None}
        inputs, untouched = _rule_inputs(self), self.state.clone()
        originals = {name: t.clone() for name, t in inputs.items()}
        with _forward_refused(rule):
            result = reference(self.state, self.task, self.views, self.lr, self.tau, **extras)
        who = f"update rule {getattr(rule, 'name', '?')!r}: its declared reference ({type(rule).__qualname__}.reference)"
        assert_state_unchanged(self.state, untouched, who)  # the rule's own runs are checked alike
        _assert_inputs_unchanged(inputs, originals, who)
        return result


@contextmanager
def _forward_refused(rule: UpdateRule) -> Iterator[None]:
    """While ``rule.reference`` runs, ``rule.forward`` raises: a reference that calls the rule's own
    ``forward`` (directly or through ``run_scan``) would compare the rule with itself, passing whatever it
    computes. A rule whose attributes cannot be set (``__slots__``) is left as it is."""

    def refused(*args: object, **kwargs: object) -> NoReturn:
        raise AssertionError(
            f"update rule {getattr(rule, 'name', '?')!r}: {type(rule).__qualname__}.reference called the rule's "
            "own forward: a reference must compute "
            "the update rule token by token on its own, as it is what forward is checked against"
        )

    own = getattr(rule, "__dict__", {}).get("forward")  # a forward set on the instance itself, if any
    try:
        object.__setattr__(rule, "forward", refused)
    except (AttributeError, TypeError):
        yield
        return
    try:
        yield
    finally:
        if own is None:
            object.__delattr__(rule, "forward")
        else:
            object.__setattr__(rule, "forward", own)


def reference_name(rule: UpdateRule) -> str:
    """What :meth:`InnerProblem.expected` compares ``rule`` with, in words."""
    if getattr(rule, "reference", None) is None:
        return "the naive token loop"
    return f"its declared reference ({type(rule).__qualname__}.reference)"


class ReferenceDivergedError(AssertionError):
    """What a rule is compared with (the naive loop, or the reference it declares) gave NaN or infinite
    numbers in float64 on the drawn problem: the problem is past what the reference computes, so the rule
    is not compared (its relative error to NaN would read 'nan', blaming it)."""


def _problem_text(problem: InnerProblem, seed: int | None = None) -> str:
    """``problem`` as the :func:`make_problem` call that builds it (the seed where known: ``seed``, else
    the problem's; ``max_lr`` and ``dtype`` where not the defaults)."""
    batch, heads, tokens, head_dim = problem.views.query.shape
    task, seed = problem.task, problem.seed if seed is None else seed
    options = {
        "batch": batch,
        "heads": heads,
        "head_dim": head_dim,
        "tokens": tokens,
        "mini_batch_size": task.mini_batch_size,
        **({} if seed is None else {"seed": seed}),
        "norm": task.norm_weight is not None,
        "residual": task.residual,
        "decay": problem.decay is not None,
        "momentum": problem.momentum is not None,
        **({} if problem.max_lr is None else {"max_lr": problem.max_lr}),
        **({} if problem.lr.dtype == torch.float64 else {"dtype": problem.lr.dtype}),
    }
    arguments = ", ".join(f"{k}={v!r}" for k, v in options.items())
    return f"make_problem({task.model.name!r}, {task.loss.name!r}, {arguments})"


#: While :func:`check_update_rule` runs: what the reference computed on each problem it was given, by
#: :func:`_problem_key`. The check rebuilds the same problem (same seed and options) for its values, its
#: no-grad modes and its zero-gate comparisons, and the token-by-token reference ran on it each time:
#: dual_form's default check ran it 122 times; with the memo, and two more default shapes, 106. None
#: outside a check.
_EXPECTED_MEMO: ContextVar[dict[tuple, tuple[torch.Tensor, TTTState]] | None] = ContextVar(
    "innerloop_expected_memo", default=None
)


class _NeedsGraph(Exception):
    """Raised by :func:`_key_of` at a tensor that requires grad: such a problem is not memoised."""


def _key_of(value: Any) -> Any:
    """A hashable fingerprint of ``value``: a tensor by dtype, shape, strides and a digest of its bytes, a
    dict or dataclass by its entries, a number or string as itself, any other object by identity (a
    new object each time only misses). :class:`_NeedsGraph` at a tensor that requires grad."""
    if isinstance(value, torch.Tensor):
        if value.requires_grad:
            raise _NeedsGraph
        data = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        return ("tensor", value.dtype, tuple(value.shape), value.stride(), hashlib.blake2b(data).digest())
    if isinstance(value, dict):
        return ("dict", tuple((k, _key_of(v)) for k, v in value.items()))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = (_key_of(getattr(value, f.name)) for f in dataclasses.fields(value))
        return (type(value), tuple(fields))
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return ("object", id(value))


def _problem_key(problem: InnerProblem, rule: UpdateRule) -> tuple | None:
    """The memo key of ``rule``'s reference on ``problem``; None (not memoised) where any of its tensors
    requires grad: a gradient check needs the reference's graph, not a copy of its numbers. A rule that
    declares no reference is compared with the naive token loop, which does not depend on the rule: its
    key is the problem's alone (every such rule shares one run of the loop on one problem)."""
    owner = None if getattr(rule, "reference", None) is None else id(rule)
    try:
        return (owner, _key_of(problem))
    except _NeedsGraph:
        return None


@contextmanager
def _memoised_references() -> Iterator[None]:
    """Within it, :func:`finite_expected` runs the reference once per distinct problem (a copy after)."""
    if _EXPECTED_MEMO.get() is not None:  # a check inside a check: share the outer memo
        yield
        return
    token = _EXPECTED_MEMO.set({})
    try:
        yield
    finally:
        _EXPECTED_MEMO.reset(token)


def _expected_once(problem: InnerProblem, rule: UpdateRule) -> tuple[torch.Tensor, TTTState]:
    """``problem.expected(rule)``, memoised in :data:`_EXPECTED_MEMO` when one is active."""
    memo = _EXPECTED_MEMO.get()
    key = None if memo is None else _problem_key(problem, rule)
    if key is None:
        return problem.expected(rule)
    if key not in memo:
        memo[key] = problem.expected(rule)
    out, state = memo[key]
    return out.clone(), state.clone()


def finite_expected(
    problem: InnerProblem, rule: UpdateRule, seed: int | None = None
) -> tuple[torch.Tensor, TTTState]:
    """:meth:`InnerProblem.expected`, or :class:`ReferenceDivergedError` naming the problem (``seed``: the
    one it was made with, if known) where its outputs or final weights are not finite. Within
    :func:`check_update_rule`, the reference runs once per distinct problem (:data:`_EXPECTED_MEMO`)."""
    out, state = _expected_once(problem, rule)
    tensors = {"outputs": out, **{f"weights[{k!r}]": v for k, v in state.params.items()}}
    diverged = [name for name, t in tensors.items() if not bool(torch.isfinite(t).all())]
    if diverged:
        finite_tokens = torch.isfinite(out).flatten(3).all(-1).all(0).all(0)  # [T]
        first = int((~finite_tokens).nonzero()[0]) if not finite_tokens.all() else out.shape[2]
        raise ReferenceDivergedError(
            f"{reference_name(rule)} itself diverged (NaN or inf in {', '.join(diverged)}; outputs from token "
            f"{first}) on {_problem_text(problem, seed)}: update rule {getattr(rule, 'name', '?')!r} was not "
            "compared, as the reference's own numbers are not finite. The problem, not the rule, is past "
            "what the reference computes in float64: check a shorter sequence (tokens=), the inner "
            "LayerNorm on (norm=True), or another seed"
        )
    return out, state


_Params = ParamSpec("_Params")
_Result = TypeVar("_Result")


def with_autograd(check: Callable[_Params, _Result]) -> Callable[_Params, _Result]:
    """``check`` run with autograd on and outside inference mode, whatever mode it is called in: its
    gradchecks and gradient comparisons under a caller's ``torch.no_grad()`` or ``torch.inference_mode()``
    saw no graph, and failed a correct plugin ('a .detach() or a term left out?'). The checks that want a
    mode (:func:`check_update_rule_without_grad`) enter it themselves."""

    @wraps(check)
    def checked(*args: _Params.args, **kwargs: _Params.kwargs) -> _Result:
        with torch.inference_mode(False), torch.enable_grad():
            return check(*args, **kwargs)

    return checked


as_index = as_integer
"""``value`` as a Python int if it is an integer (a numpy or 0-d torch integer too, not a bool nor a bool
tensor), else None: :func:`innerloop.core.functional.as_integer`, under the name the kit has used."""


def _check_problem_shape(**shape: object) -> dict[str, int]:
    """Each of :func:`make_problem`'s sizes a positive integer (as an int), else a ValueError naming it
    (not torch's 'expected a non-empty list of Tensors' for ``tokens=0`` or Python's modulo by zero for
    ``mini_batch_size=0``, from inside a check)."""
    checked = {}
    for name, value in shape.items():
        index = as_index(value)
        if index is None or index < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r} (the problem's shape)")
        checked[name] = index
    return checked


def checked_seed(seed: object) -> int:
    """``seed`` as an int (a numpy or 0-d torch integer too, the core's ``as_integer``: torch's
    ``Generator.manual_seed`` takes a Python int only, and the checks seed several), else a TypeError;
    a ValueError outside torch's seeds, [-2**63, 2**64) (torch said 'Overflow when unpacking long long')."""
    index = as_index(seed)
    if index is None:
        raise TypeError(f"seed must be an int, got {seed!r}")
    if index not in TORCH_SEEDS:
        raise ValueError(f"seed={seed!r} must be an integer in {TORCH_SEEDS_TEXT} (torch's generator seeds)")
    return index


def checked_tolerance(function: str, tolerance: object) -> float:
    """``tolerance`` (a check's largest relative error) as a float: a finite real number >= 0 (a numpy
    float or a Fraction too; not a bool, a string or a Decimal), else a ValueError naming ``function``.
    A NaN one passed some comparisons and failed others, a negative one failed a right rule ('error 0 >
    -1'), and a Fraction failed the failure message's ``:.1e`` (Python 3.11)."""
    if (
        isinstance(tolerance, bool)
        or not isinstance(tolerance, numbers.Real)  # numpy's float32 too
        or not 0 <= tolerance < math.inf
    ):
        raise ValueError(
            f"{function}: tolerance must be a finite number >= 0 (the relative error allowed), got {tolerance!r}"
        )
    return float(tolerance)


def _check_seed_and_dtype(seed: object, dtype: object) -> int:
    """:func:`make_problem`'s ``seed`` (an integer, returned as an int) and ``dtype`` (a floating-point
    torch dtype: an integer one truncated every random input to a few integers), each named if wrong."""
    index = checked_seed(seed)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch dtype (float64, float32, ...), got {dtype!r}")
    return index


#: :func:`make_problem`'s default sequence length.
_MAKE_PROBLEM_TOKENS = 11


def _check_flags(**flags: Any) -> None:
    """Each of ``flags`` a bool, else a TypeError naming it (``"false"`` would turn its option on)."""
    for name, flag in flags.items():
        check_flag(name, flag)


def _inner_learning_rates(
    generator: torch.Generator, shape: tuple[int, int, int], head_dim: int, norm: bool, max_lr: float | None
) -> torch.Tensor:
    """:func:`make_problem`'s per-token inner learning rates ``[B, H, T]`` (float64): uniform in
    [0, ``max_lr``); by default in [0, 0.5), or in [0, 0.5 / (1 + head_dim)) without the inner LayerNorm.

    Without the LayerNorm nothing bounds the inner model's outputs: at steps of up to 0.5 an MLP read a
    token at a time diverged to NaN within 30 tokens (39 of 600 shapes ``problems()`` drew), and
    every rule, the naive loop's own numbers included, then failed its comparison ('relative error
    nan'). Steps of up to 0.5 / (1 + head_dim), as a layer's are at most base_lr / head_dim, kept every
    such problem of up to 150 tokens finite for the mini-batch rules (600 drawn), not for the momentum
    rule, whose bound :func:`_bounded_without_norm` adds (to the default draw only: a given ``max_lr``
    bounds the rates as given). The same uniform draw scaled, whatever ``max_lr``: a problem differs from
    the default one in its rates only."""
    scale = max_lr if max_lr is not None else 0.5 if norm else 0.5 / (1 + head_dim)
    return torch.rand(*shape, generator=generator, dtype=torch.float64) * scale


def checked_max_lr(max_lr: object) -> float | None:
    """``make_problem``'s ``max_lr``: None, or a finite number >= 0 (a float); else a ValueError naming it."""
    if max_lr is None:
        return None
    if isinstance(max_lr, bool) or not isinstance(max_lr, numbers.Real) or not 0 <= max_lr < math.inf:
        raise ValueError(
            f"make_problem: max_lr must be None (the default rates) or a finite number >= 0 bounding the "
            f"drawn inner learning rates, got {max_lr!r}"
        )
    return float(max_lr)


def make_problem(
    model: InnerModel | str,
    loss: InnerLoss | str,
    *,
    batch: int = 2,
    heads: int = 2,
    head_dim: int = 4,
    tokens: int = _MAKE_PROBLEM_TOKENS,
    mini_batch_size: int = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    norm: bool = True,
    residual: bool = True,
    decay: bool = False,
    momentum: bool = False,
    max_lr: float | None = None,
) -> InnerProblem:
    """A random problem at a sequence start (position 0), weights perturbed so every term matters;
    inner learning rates in [0, ``max_lr``) whatever the inner LayerNorm; with no ``max_lr``, in [0, 0.5),
    less without the inner LayerNorm (:func:`_inner_learning_rates`, :func:`_bounded_without_norm`: over
    ``mini_batch_size``, and times ``1 - momentum``); with ``decay`` / ``momentum``, random per-token decays
    in [0, 0.5) and momenta in [0, 1), but a full reset (decay 1), gates of log -30 and -2e-6 (decays
    1 - 9.4e-14 and 2e-6), a restart (momentum 0), momenta 1 - 1e-6 and 2e-6 (:func:`_random_gates`). ``model`` and ``loss`` are
    plugins or registered names. :func:`check_update_rule` also checks rates up to LARGE_RATES_BOUND."""
    _check_flags(norm=norm, residual=residual, decay=decay, momentum=momentum)
    max_lr = checked_max_lr(max_lr)
    batch, heads, head_dim, tokens, mini_batch_size = _check_problem_shape(
        batch=batch, heads=heads, head_dim=head_dim, tokens=tokens, mini_batch_size=mini_batch_size
    ).values()
    model, loss = _named("inner_model", model), _named("inner_loss", loss)
    seed = _check_seed_and_dtype(seed, dtype)
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(dtype)

    per_head = model.init_params(heads, head_dim, generator=generator)
    params = {k: (v.double() + randn(*v.shape, scale=0.1)).to(dtype) for k, v in per_head.items()}
    params = {k: v.unsqueeze(0).expand(batch, *v.shape).clone() for k, v in params.items()}
    views = Views(*(randn(batch, heads, tokens, head_dim) for _ in range(3)))
    state = TTTState(
        params=params,
        pending={k: torch.zeros_like(v) for k, v in params.items()},
        position=0,
        signature=StateSignature(batch, heads, head_dim, mini_batch_size, model.name, loss.name),
        loss_carry=loss.init_carry(batch, heads, head_dim, views.key),
    )
    task = InnerTask(
        model=model,
        loss=loss,
        mini_batch_size=mini_batch_size,
        norm_weight=(1.0 + randn(heads, head_dim, scale=0.1)) if norm else None,
        norm_bias=randn(heads, head_dim, scale=0.1) if norm else None,
        residual=residual,
        kernel="torch",
    )
    rates = _steps_and_gates(
        generator, (batch, heads, tokens), head_dim, mini_batch_size, dtype, norm, decay, momentum, max_lr
    )
    return InnerProblem(state, task, views, *rates, seed=seed, max_lr=max_lr)


def _steps_and_gates(
    generator: torch.Generator,
    shape: tuple[int, int, int],
    head_dim: int,
    mini_batch_size: int,
    dtype: torch.dtype,
    norm: bool,
    decay: bool,
    momentum: bool,
    max_lr: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """:func:`make_problem`'s ``lr [B, H, T]`` (:func:`_inner_learning_rates`), token scales ``tau [K]``,
    decays and momenta (:func:`_random_gates`; None where not asked for), drawn in that order."""
    lr = _inner_learning_rates(generator, shape, head_dim, norm, max_lr)
    scales = 1.0 / torch.arange(1, mini_batch_size + 1, dtype=torch.float64)
    noise = torch.randn(mini_batch_size, generator=generator, dtype=torch.float64) * 0.05
    tau = (scales.to(dtype) + noise.to(dtype)).clamp_min(0.0)

    def uniform(high: float) -> torch.Tensor:  # [B, H, T]
        return torch.rand(*shape, generator=generator, dtype=torch.float64) * high

    decays, momenta = _random_gates(decay, momentum, uniform, generator)
    if not norm and max_lr is None:  # a given max_lr bounds the rates as given, whatever the wrapping
        lr = _bounded_without_norm(lr, mini_batch_size, momenta)
    decays, momenta = (None if gates is None else gates.to(dtype) for gates in (decays, momenta))
    return lr.to(dtype), tau, decays, momenta


def _bounded_without_norm(
    lr: torch.Tensor, mini_batch_size: int, momenta: torch.Tensor | None
) -> torch.Tensor:
    """Without the inner LayerNorm, ``lr`` (drawn below 0.5 / (1 + head_dim)) over ``mini_batch_size``, and
    times ``1 - momentum`` where momenta are given: the bound that keeps the momentum rule's steps those
    of one plain step. That rule (no token scale) steps the weights at each of a mini-batch's K tokens,
    all at its first token's weights, so a mini-batch moves them by up to K steps, not one; and its
    surprise ``S_t = m_t S_{t-1} - lr_t g_t`` multiplies a step by up to ``1 / (1 - m)``. With
    ``lr_t = c (1 - m_t) / K``, ``S_t`` is a convex combination of ``S_{t-1}`` and ``-c g_t / K``, so
    a mini-batch moves the weights by at most about one step of ``c``, as the mini-batch rules' average.
    Before, problems of 150 tokens for the momentum rule diverged to NaN in the naive loop itself (29 of
    200 drawn shapes, models, losses and wrappings; 50 of 100 MLP ones); now 3 of 600 do, and 8 of 300
    of 400 tokens (2 of 200 without momentum), each an MLP read a token at a time (K = 1): no clean bound
    holds there, so the checks name such a problem (:class:`ReferenceDivergedError`), not the rule."""
    bounded = lr / mini_batch_size
    return bounded if momenta is None else bounded * (1.0 - momenta)


#: The log gates ``log(1 - decay)`` :func:`make_problem` sets beside its full reset (``-inf``): one that
#: keeps 9.4e-14 of the state (Gated DeltaNet's and Mamba-2's ``-exp(A) * softplus(...)`` reaches -30 and
#: below) and one that keeps nearly all of it (decay 2e-6). Drawn decays lie in [0, 0.5): a rule wrong
#: only near a gate of 0 or 1 (a log gate clamped at -10, a decay below 1e-4 skipped, a product that
#: underflows) passed every check (review s55m). 2e-6, not 1e-6: gradcheck's steps of 1e-6 stay >= 0.
EXTREME_LOG_GATES: tuple[float, ...] = (-30.0, -2e-6)


#: The momenta :func:`make_problem` sets beside its restart (0): one that keeps nearly all of the surprise
#: (1 - 1e-6: Titans' and momentum DeltaNet's sigmoid gates saturate there) and a tiny positive one (2e-6,
#: not 1e-6: gradcheck's steps of 1e-6 stay >= 0). Drawn momenta lie in [0, 1): a rule that clamped
#: momenta at 0.999 or skipped those below 1e-3 passed the checks but by a chance draw (review s56i).
EXTREME_MOMENTA: tuple[float, ...] = (1.0 - 1e-6, 2e-6)


def _random_gates(
    decay: bool, momentum: bool, uniform: Callable[[float], torch.Tensor], generator: torch.Generator
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """:func:`make_problem`'s decays (``uniform(0.5)``, when ``decay``) with a full reset (1), and momenta
    (``uniform(1.0)``, when ``momentum``) with a restart (0), each at one random token of the first batch
    row and head (the other rows keep their draws): gates ``ops.scan`` takes and a layer meets (Titans'
    forgetting saturates at 1). A rule that builds decay or momentum products as ratios of cumulative
    products, or from cumulated logs (FLA's chunked form), is exact away from them and NaN (``0 / 0``,
    ``-inf - -inf``) from them on: without them its checks passed (review s47e). Then the decays of
    :data:`EXTREME_LOG_GATES` and the momenta of :data:`EXTREME_MOMENTA` (:func:`_with_extreme_gates`),
    drawn last: the draws before are unchanged."""
    drawn = (uniform(0.5) if decay else None, uniform(1.0) if momentum else None)  # the draws' order
    tokens: list[int] = []  # the reset's and the restart's

    def at_end(gates: torch.Tensor | None, value: float) -> torch.Tensor | None:
        if gates is None:
            return None
        tokens.append(int(torch.randint(gates.shape[-1], (), generator=generator)))
        gates = gates.clone()
        gates[0, 0, tokens[-1]] = value
        return gates

    decays, momenta = at_end(drawn[0], 1.0), at_end(drawn[1], 0.0)
    if decays is not None:
        extreme_decays = [-math.expm1(log_gate) for log_gate in EXTREME_LOG_GATES]
        decays = _with_extreme_gates(decays, tokens[0], generator, extreme_decays)
    if momenta is not None:
        momenta = _with_extreme_gates(momenta, tokens[-1], generator, EXTREME_MOMENTA)
    return decays, momenta


def _with_extreme_gates(
    gates: torch.Tensor, kept_token: int, generator: torch.Generator, extremes: Iterable[float]
) -> torch.Tensor:
    """``gates [B, H, T]`` (float64) with the values ``extremes`` (decays of :data:`EXTREME_LOG_GATES`,
    momenta of :data:`EXTREME_MOMENTA`) at random tokens of the first batch row and head other than
    ``kept_token`` (the full reset's, the restart's), as many as there are such tokens; the other rows
    keep their draws."""
    free = [t for t in range(gates.shape[-1]) if t != kept_token]
    order = torch.randperm(len(free), generator=generator).tolist()
    gates = gates.clone()
    for index, value in zip(order, extremes, strict=False):
        gates[0, 0, free[index]] = value
    return gates


def _is_sequence_of_points(cut_points: object) -> bool:
    """Whether ``cut_points`` can hold token indices: a list, tuple, range, 1-D array or tensor (not a
    str, a mapping, a 0-d tensor or a single number, whose iteration would fail or mean something else)."""
    if isinstance(cut_points, torch.Tensor):
        return cut_points.dim() == 1
    if isinstance(cut_points, (str, bytes, Mapping)) or getattr(cut_points, "ndim", 1) != 1:
        return False
    return isinstance(cut_points, Iterable)


def _cut_indices(cut_points: list[int], caller: str) -> list[int]:
    """``cut_points`` as ints (numpy and 0-d torch integers are integers); a TypeError naming ``caller``
    if it is not a sequence of them (None, one int, a str or a mapping included) or one is not an integer."""
    if not _is_sequence_of_points(cut_points):
        raise TypeError(
            f"{caller}: cut_points must be a list of token indices (ints, e.g. [5, 12]; [] for no cut), "
            f"got {type(cut_points).__name__} {cut_points!r}"
        )
    points = [as_index(p) for p in cut_points]
    if None in points:
        raise TypeError(f"{caller}: cut_points must be a list of token indices (ints), got {cut_points!r}")
    return points


def _cuts_inside(cut_points: list[int], tokens: int, caller: str) -> list[int]:
    """The distinct ``cut_points`` inside ``(0, tokens)``, sorted (:func:`_cut_indices`)."""
    return sorted({p for p in _cut_indices(cut_points, caller) if 0 < p < tokens})


def run_in_chunks(
    rule: UpdateRule | str, problem: InnerProblem, cut_points: list[int], what: str | None = None
) -> tuple[torch.Tensor, TTTState]:
    """Run ``rule`` (a plugin or a registered name) over the problem's tokens cut at ``cut_points``,
    carrying the state.

    A point outside ``(0, T)`` cuts nothing and is ignored (one list serves sequences of several
    lengths); repeated points count once. :func:`check_update_rule` refuses a list that cuts none of the
    sequences it checks. Each state it carries from one chunk to the next must be unchanged after the
    next (:func:`assert_state_unchanged`; ``what`` names the case in the message): unlike a sequence's
    first state (which the checks compare too), its pending sums, momentum, decay product and loss carry
    are not zeros (or absent), so that a write into them shows; so must the views, lr, token scales,
    decay and momentum the rule is given (:func:`_assert_inputs_unchanged`)."""
    rule = _named("update_rule", rule)
    if not isinstance(problem, InnerProblem):
        raise TypeError(f"problem must be an InnerProblem (innerloop.testing.make_problem), got {problem!r}")
    tokens = problem.views.query.shape[2]
    bounds = [0, *_cuts_inside(cut_points, tokens, "run_in_chunks"), tokens]
    state, outputs = problem.state, []
    inputs = _rule_inputs(problem)
    originals = {name: t.clone() for name, t in inputs.items()}
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        untouched = None if start == 0 else state.clone()  # the caller's own state: its caller checks it

        def part(t: torch.Tensor | None, tokens: slice = slice(start, end)) -> torch.Tensor | None:
            return None if t is None else t[:, :, tokens]

        views = problem.views.slice_tokens(start, end)
        result = run_scan(
            rule,
            state,
            problem.task,
            views,
            part(problem.lr),
            problem.tau,
            part(problem.decay),
            part(problem.momentum),
            decay_log=part(problem.decay_log),
        )
        who = f"{what or getattr(rule, 'name', '?')}: the rule, given the state carried to token {start},"
        assert_state_unchanged(state, untouched, who)
        _assert_inputs_unchanged(inputs, originals, f"{what or getattr(rule, 'name', '?')}: the rule")
        out, state = check_rule_returns(rule, result, state, views)
        outputs.append(out)
    return torch.cat(outputs, dim=2), state


def _rule_inputs(problem: InnerProblem) -> dict[str, torch.Tensor]:
    """The tensors an update rule is given besides its state, by name (views, lr, token scales, decay,
    momentum)."""
    named = {f"views.{n}": getattr(problem.views, n) for n in ("query", "key", "value")}
    named.update({n: getattr(problem, n) for n in ("lr", "tau", "decay", "momentum", "decay_log")})
    return {name: t for name, t in named.items() if t is not None}


def _assert_inputs_unchanged(
    inputs: dict[str, torch.Tensor], originals: dict[str, torch.Tensor], who: str
) -> None:
    """Each of ``inputs`` still equals its copy ``originals`` (bit for bit), else a :class:`StateWrittenError`
    naming those ``who`` wrote into."""
    written = [name for name, t in inputs.items() if not torch.equal(t, originals[name])]
    if written:
        raise StateWrittenError(
            f"{who} wrote into {', '.join(written)}, which it was given: the layer reads them again (the "
            "views for its output and the other paths, the lr for the outer gradients); compute new tensors "
            "instead of writing into the given ones (no in-place +=, mul_, copy_ on them)"
        )


def run_layer_in_chunks(
    layer: torch.nn.Module, x: torch.Tensor, cut_points: list[int], state: TTTState | None = None
) -> tuple[torch.Tensor, TTTState]:
    """Call ``layer`` on ``x [B, T, D]`` cut at ``cut_points`` (token indices), carrying the state.

    A point outside ``(0, T)`` cuts nothing and is ignored (one list serves sequences of several
    lengths); repeated points count once."""
    if not callable(layer):
        raise TypeError(
            "run_layer_in_chunks: layer must be a callable module (layer(x, state) -> (y, state)), got "
            f"{type(layer).__name__}"
        )
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"run_layer_in_chunks: x must be a torch.Tensor [B, T, D] (the layer's input), got {type(x).__name__}"
        )
    if x.dim() != 3:  # cut along dim 1, a [B, D] input would reach the layer as [B, 1] pieces of features
        raise ValueError(
            f"run_layer_in_chunks: x must be [B, T, D] (the layer's input), got shape {list(x.shape)}"
        )
    tokens = x.shape[1]
    bounds = [0, *_cuts_inside(cut_points, tokens, "run_layer_in_chunks"), tokens]
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        y, state = layer(x[:, start:end], state)
        outputs.append(y)
    return torch.cat(outputs, dim=1), state


def twin_layers(
    config: dict, seed: int, kernel: str, dtype: torch.dtype = torch.float64
) -> tuple[TTTLayer, TTTLayer]:
    """Two ``TTTLayer(**config)`` with the same (randomly perturbed) weights: the pure-torch reference
    and one forced onto ``kernel`` (``"auto"`` or a kernel's name), both in ``dtype``.

    The weights are moved away from their initial values so that no parameter sits at a value (a zero
    bias, a unit LayerNorm weight) where a wrong formula would still give the right number.
    """
    if not isinstance(config, Mapping):
        raise TypeError(
            f"twin_layers: config must be a mapping of TTTLayer's arguments (e.g. dict(hidden_size=64, "
            f"num_heads=4)), got {type(config).__name__}"
        )
    torch.manual_seed(_check_seed_and_dtype(seed, dtype))  # each named if wrong, not int()'s silent cast
    reference = TTTLayer(**config, kernel="torch").to(dtype)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    fast = TTTLayer(**config, kernel=kernel).to(dtype)
    fast.load_state_dict(reference.state_dict())
    return reference, fast


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, tolerance: float) -> None:
    error = relative_error(actual, expected)
    if not error <= tolerance:  # also catches NaN
        raise AssertionError(f"{what}: relative error {error:.3e} > {tolerance:.1e}")


def assert_finite_where_expected_is(
    actual: torch.Tensor, expected: torch.Tensor, what: str, tolerance: float
) -> None:
    """``actual`` is finite wherever ``expected`` is, and within ``tolerance`` (relative error) of it
    there: a fast path at least as stable as its reference on inputs that overflow."""
    finite = torch.isfinite(expected)
    if not torch.isfinite(actual[finite]).all():
        raise AssertionError(f"{what}: not finite where the reference is")
    if finite.any():
        error = relative_error(actual[finite], expected[finite])
        if not error <= tolerance:
            raise AssertionError(f"{what}: relative error {error:.3e} > {tolerance:.1e} where finite")


#: The groups of a :class:`TTTState` the checks compare (and measure float32 errors of): every tensor
#: group an update rule or a kernel writes (``conv_history``, the layer's short-convolution inputs, is
#: the layer's own).
COMPARED_STATE_GROUPS = ("params", "pending", "loss_carry", "momentum", "decay")


def assert_states_close(actual: TTTState, expected: TTTState, what: str, tolerance: float) -> None:
    if actual.position != expected.position:
        raise AssertionError(f"{what}: position {actual.position} != {expected.position}")
    for group in COMPARED_STATE_GROUPS:
        a, e = getattr(actual, group), getattr(expected, group)
        if set(a) != set(e):
            raise AssertionError(f"{what}: state.{group} keys {sorted(a)} != {sorted(e)}")
        for key in e:
            assert_close(a[key], e[key], f"{what}: state.{group}[{key!r}]", tolerance)


# --------------------------------------------------------------------------------------------------
# Cheap checks (the registry runs these on every plugin it registers)
# --------------------------------------------------------------------------------------------------


class StateWrittenError(AssertionError):
    """A plugin wrote into a :class:`TTTState` it was given (:func:`assert_state_unchanged`)."""


def assert_state_unchanged(given: TTTState | None, untouched: TTTState | None, who: str) -> None:
    """The state ``who`` (e.g. ``"<case>: the kernel"``) was given holds, bit for bit, what its copy
    ``untouched`` made before the call holds: a :class:`TTTState` is immutable, and a caller may continue
    one twice (a shared prompt, beam search)."""
    if given is None or untouched is None:
        return
    for group in COMPARED_STATE_GROUPS:
        for key, tensor in getattr(untouched, group).items():
            if not torch.equal(getattr(given, group)[key], tensor):
                raise StateWrittenError(
                    f"{who} wrote into the state it was given (state.{group}[{key!r}] changed); a TTTState is "
                    "immutable (a caller may continue it twice, e.g. from a shared prompt): return new tensors "
                    "instead of writing into the given ones"
                )


def assert_layers_train_alike(
    reference: torch.nn.Module, candidate: torch.nn.Module, x: torch.Tensor, tolerance: float
) -> None:
    """Two layers with the same weights (``twin_layers``) read ``x`` alike: outputs, states, and the
    gradients of ``sum(y^2)`` w.r.t. ``x`` and every parameter, each within ``tolerance``."""
    y_ref, state_ref = reference(x)
    y, state = candidate(x)
    assert_close(y, y_ref, "output", tolerance)
    assert_states_close(state, state_ref, "state", tolerance)
    grads_ref = torch.autograd.grad(y_ref.square().sum(), [x, *reference.parameters()])
    grads = torch.autograd.grad(y.square().sum(), [x, *candidate.parameters()])
    names = ["x", *(name for name, _ in candidate.named_parameters())]
    for name, grad, grad_ref in zip(names, grads, grads_ref, strict=True):
        assert_close(grad, grad_ref, f"gradient of {name}", tolerance)


def check_loss_leaves_inputs(
    loss: InnerLoss, prediction: torch.Tensor, target: torch.Tensor, label: str | None = None
) -> None:
    """``loss.token_loss`` and ``loss.token_loss_grad`` leave the prediction and the target they are given
    as they are (:func:`check_leaves_its_inputs`, on detached copies: a write into a tensor that
    requires grad would otherwise surface as torch's unexplained 'a leaf Variable ... in-place'
    error). ``label`` names the loss in the message (default: its name)."""
    for method in ("token_loss", "token_loss_grad"):
        check_leaves_its_inputs(
            getattr(loss, method),
            {"the prediction": prediction.detach(), "the target": target.detach()},
            f"{label or loss.name}: {method}",
            "the target is the pairs' (the views, which every path reads) and the prediction is read again "
            "by the update",
        )


def check_token_loss_deterministic(loss: InnerLoss, prediction: torch.Tensor, target: torch.Tensor) -> None:
    """``loss.token_loss`` and ``loss.token_loss_grad`` give the same values, bit for bit, on two calls with
    the same prediction and target (detached copies), else an AssertionError naming the method. Before
    (review s61), a loss drawing fresh noise in them was refused as one mixing sequences ('token_loss of 3
    sequences in one call vs each of the sequences alone'), the first check to call it twice."""
    for method in ("token_loss", "token_loss_grad"):
        first, second = (
            getattr(loss, method)(prediction.detach().clone(), target.detach().clone()) for _ in range(2)
        )
        same = _same(first, second) or (
            first.shape == second.shape and bool(((first == second) | (first.isnan() & second.isnan())).all())
        )  # a NaN where the other call has one too is the same (the finiteness checks name it)
        if not same:
            raise AssertionError(
                f"{loss.name}: {method}() is not deterministic: the same prediction and target gave different "
                "values on two calls (it must be a function of its arguments only: no fresh random noise, no "
                "counter; the rules and their references call it on different paths and would disagree)"
            )


def check_loss_gradient(
    loss: InnerLoss, prediction: torch.Tensor, target: torch.Tensor, tolerance: float = FLOAT64_TOLERANCE
) -> None:
    """``loss.token_loss_grad`` equals autograd of ``loss.token_loss`` at ``prediction`` (in float64), and
    autograd's derivatives of ``token_loss`` equal finite differences (:func:`check_autograd_by_differences`).

    ``prediction`` and ``target`` are ``[..., f]``.

    The dual form differentiates through ``token_loss_grad`` (the outer loop's gradients), so its
    derivatives w.r.t. prediction and target must equal autograd's second derivatives of
    ``token_loss`` too: a closed form that leaves the autograd graph (``.detach()``, numpy,
    ``no_grad``) has the right values and silently wrong outer gradients.
    """
    prediction = prediction.detach().double().requires_grad_(True)
    target = target.detach().double().requires_grad_(True)
    # first: a write into the prediction is a torch error below
    check_loss_leaves_inputs(loss, prediction, target)
    check_token_loss_deterministic(loss, prediction, target)  # before: a noisy loss reads as a mixing one
    check_token_loss_per_token(
        loss, prediction, target, tolerance
    )  # before the gradient: it names a mixing loss
    with torch.enable_grad():
        autograd = torch.autograd.grad(
            loss.token_loss(prediction, target).sum(), prediction, create_graph=True
        )[0]
        closed_form = loss.token_loss_grad(prediction, target)
    if tuple(closed_form.shape) != tuple(prediction.shape):
        raise AssertionError(
            f"{loss.name}: token_loss_grad must have the prediction's shape {tuple(prediction.shape)}; "
            f"got {tuple(closed_form.shape)}"
        )
    assert_close(closed_form, autograd, f"{loss.name}: token_loss_grad vs autograd of token_loss", tolerance)
    check_autograd_by_differences(
        loss.token_loss,
        {"prediction": _first_rows(prediction), "target": _first_rows(target)},
        f"{loss.name}: token_loss",
    )
    check_derivative_in_graph(
        closed_form,
        autograd,
        (prediction, target),
        ("prediction", "target"),
        f"{loss.name}: token_loss_grad",
        tolerance,
    )
    check_loss_gradient_at_zero_error(loss, target)


#: What each leading dim of a ``[B, H, T, f]`` prediction holds, for :func:`check_token_loss_per_token`.
_PAIR_DIMS = ("sequences", "heads", "tokens")


def check_token_loss_per_token(
    loss: InnerLoss, prediction: torch.Tensor, target: torch.Tensor, tolerance: float = FLOAT64_TOLERANCE
) -> None:
    """``token_loss`` and ``token_loss_grad`` of a ``[B, H, T, f]`` call (up to three of each leading dim)
    equal those of each sequence, each head and each token called alone: a token's loss reads that
    token's prediction and target only.

    The primal rule scores one token of one head at a time, the naive loop one token of every head and
    sequence, the dual form a whole chunk: a loss that mixes them (a mean over the heads or tokens of the
    call, a normalisation by the batch) gives each path other numbers, and the comparison of two rules
    then blames a rule."""
    lead = prediction.dim() - 1
    few = tuple(slice(0, 3) for _ in range(lead))
    prediction, target = prediction.detach()[few], target.detach()[few]
    names = _PAIR_DIMS[-lead:] if lead <= len(_PAIR_DIMS) else [f"dim {d}" for d in range(lead)]
    for method in ("token_loss", "token_loss_grad"):
        function = getattr(loss, method)
        whole = function(prediction, target)
        for dim, name in enumerate(names):
            size = prediction.shape[dim]
            if size < 2:
                continue
            alone = torch.cat(
                [function(prediction.narrow(dim, i, 1), target.narrow(dim, i, 1)) for i in range(size)], dim
            )
            assert_close(
                whole,
                alone,
                f"{loss.name}: {method} of {size} {name} in one call vs each of the {name} alone (a token's loss "
                "must read that token's prediction and target only: the rules call it on one token of one head, "
                "on every head and sequence at once, or on a whole chunk, and would disagree)",
                tolerance,
            )


def _first_rows(t: torch.Tensor, rows: int = 4) -> torch.Tensor:
    """The first ``rows`` rows of ``t [..., f]``, as ``[1, ..., 1, rows, f]`` (its number of dims kept): a few
    tokens are enough for finite differences, which cost a call per element."""
    if t.dim() < 2:
        return t
    flat = t.reshape(-1, t.shape[-1])[:rows]
    return flat.reshape(*(1,) * (t.dim() - 2), *flat.shape)


def check_loss_gradient_at_zero_error(loss: InnerLoss, target: torch.Tensor) -> None:
    """``loss.token_loss_grad`` and its derivatives w.r.t. prediction and target (what the outer
    gradients flow through) are finite where the prediction equals the target (``[..., f]``, float64).

    A zero error is met in real runs (a zero-padded prefix, a repeated token): a loss such as
    ``(p - t).norm(-1)``, without an eps, has a finite gradient there but a NaN second derivative,
    and its layer trains on NaN gradients without an error.
    """
    prediction = target.detach().double().clone().requires_grad_(True)
    target = target.detach().double().clone().requires_grad_(True)
    probe = torch.randn(prediction.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.enable_grad():
        grad = loss.token_loss_grad(prediction, target)
        derivatives = (
            torch.autograd.grad((grad * probe).sum(), (prediction, target), allow_unused=True)
            if grad.requires_grad
            else ()
        )
    # no derivatives when token_loss_grad is outside the graph (check_loss_gradient refuses that)
    for what, value in (
        ("token_loss_grad", grad),
        *zip(("its derivative w.r.t. prediction", "its derivative w.r.t. target"), derivatives, strict=False),
    ):
        if value is not None and not bool(torch.isfinite(value).all()):
            raise AssertionError(
                f"{loss.name}: {what} is not finite where prediction == target (a zero error, met at a "
                "zero-padded prefix or a repeated token); the outer gradients flow through it. A norm or a "
                "square root of the error needs an eps (e.g. sqrt(||p - t||^2 + eps))"
            )


def check_derivative_in_graph(
    closed_form: torch.Tensor,
    autograd: torch.Tensor,
    inputs: tuple[torch.Tensor, ...],
    names: tuple[str, ...],
    what: str,
    tolerance: float = FLOAT64_TOLERANCE,
) -> None:
    """A closed-form derivative ``closed_form`` (computed from ``inputs``) has the same derivatives
    w.r.t. ``inputs`` as ``autograd`` (the same derivative taken by autograd with ``create_graph``):
    its vector-Jacobian products with a fixed random vector agree. A closed form outside the graph
    counts as constant, so it passes only where autograd's second derivative is zero too."""
    probe = torch.randn(autograd.shape, dtype=autograd.dtype, generator=torch.Generator().manual_seed(1))

    def vjp(of: torch.Tensor) -> list[torch.Tensor]:
        if not of.requires_grad:
            return [torch.zeros_like(x) for x in inputs]
        grads = torch.autograd.grad((of * probe).sum(), inputs, allow_unused=True, retain_graph=True)
        return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs, strict=True)]

    with torch.enable_grad():
        got, wanted = vjp(closed_form), vjp(autograd)
    for name, g, w in zip(names, got, wanted, strict=True):
        detached = (
            ""
            if closed_form.requires_grad
            else " (it is outside the autograd graph: .detach(), numpy, no_grad?)"
        )
        assert_close(
            g,
            w,
            f"{what}: its derivative w.r.t. {name} vs autograd's second derivative{detached}; the dual form "
            "differentiates through it for the outer gradients",
            tolerance,
        )


def _same(first: torch.Tensor | None, second: torch.Tensor | None) -> bool:
    if first is None or second is None:
        return first is None and second is None
    return first.shape == second.shape and torch.equal(first, second)


def check_leaves_its_inputs(
    function: Callable[..., Any], inputs: dict[str, torch.Tensor], what: str, why: str
) -> Any:
    """``function(*inputs.values())``, called on copies, after which each copy still equals its original
    (bit for bit); else an ``AssertionError`` naming ``what`` (e.g. ``"linear: forward"``), the inputs it
    wrote into and ``why`` they must be left as they are. Returns what ``function`` returned.

    A plugin that writes into what it is given (an in-place ``+=``, ``copy_``) corrupts what the layer
    reads again (the views every path reads, a state's weights or carry, which a caller may continue
    twice), and the checks that compare two calls then blame something else."""
    given = {name: t.clone() if isinstance(t, torch.Tensor) else t for name, t in inputs.items()}
    result = function(*given.values())
    written = [
        name
        for name, t in inputs.items()
        if isinstance(t, torch.Tensor) and not (given[name].shape == t.shape and torch.equal(given[name], t))
    ]
    if written:
        raise AssertionError(
            f"{what} wrote into {', '.join(written)}, which it was given: {why}; compute new tensors instead "
            "of writing into the given ones (no in-place +=, copy_, fill_ on them)"
        )
    return result


def copy_views_and_carry(views: Views, carry: dict[str, Any]) -> tuple[Views, dict[str, Any]]:
    """Copies of ``views`` and of ``carry``'s tensors (its other entries as they are), for a call of a
    loss that must not see, or write into, the originals."""
    copies = Views(*(t.clone() for t in (views.query, views.key, views.value)))
    return copies, {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in carry.items()}


def check_pairs_deterministic(loss: InnerLoss, views: Views, carry: dict[str, torch.Tensor]) -> None:
    """The same views and carry give the same pairs, validity and carry, bit for bit, and ``pairs``
    leaves the views and carry it is given as they are (:func:`check_leaves_its_inputs`).

    A loss whose pairs depend on anything else (fresh noise, a counter) gives different numbers on
    the chunked, fused and decode paths, and its runs cannot be reproduced.
    """

    inputs = {f"views.{n}": getattr(views, n) for n in ("query", "key", "value")}
    inputs.update({f"carry[{k!r}]": v for k, v in carry.items()})

    def pairs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *entries: Any) -> LossPairs:
        return loss.pairs(Views(query, key, value), dict(zip(carry, entries, strict=True)))

    first = check_leaves_its_inputs(
        pairs,
        inputs,
        f"{loss.name}: pairs()",
        "the views are the layer's projections, which every path reads, and the carry is part of a "
        "TTTState, which is immutable (a caller may continue it twice)",
    )
    second = loss.pairs(*copy_views_and_carry(views, carry))
    differing = [
        field
        for field in ("inputs", "targets", "valid")
        if not _same(getattr(first, field), getattr(second, field))
    ]
    if set(first.carry) != set(second.carry) or not all(
        _same(first.carry[k], second.carry[k]) for k in first.carry
    ):
        differing.append("carry")
    if differing:
        raise AssertionError(
            f"{loss.name}: pairs() is not deterministic: the same views and carry gave different "
            f"{', '.join(differing)} on two calls (pairs must be a function of its arguments only; "
            "use a fixed, e.g. position-derived, corruption instead of fresh random noise)"
        )


def check_pairs_causal(
    loss: InnerLoss, views: Views, carry: dict[str, torch.Tensor], cut: int, tolerance: float = 0.0
) -> None:
    """Changing the tokens from ``cut`` on does not change the pairs of the tokens before ``cut``."""
    whole = loss.pairs(views, carry)
    changed = Views(*(t.clone() for t in (views.query, views.key, views.value)))
    for t in (changed.query, changed.key, changed.value):
        t[:, :, cut:] += 1.0
    perturbed = loss.pairs(changed, carry)
    for field in ("inputs", "targets"):
        before, after = getattr(whole, field)[:, :, :cut], getattr(perturbed, field)[:, :, :cut]
        assert_close(after, before, f"{loss.name}: pairs causal ({field} before token {cut})", tolerance)


def check_pairs_by_differences(
    loss: InnerLoss, views: Views, carry: dict[str, torch.Tensor], tokens: int = 4
) -> None:
    """autograd's derivatives of ``loss.pairs`` (its inputs, targets, floating validity and floating
    carry) w.r.t. the views and the carry's floating entries equal finite differences, on the first
    ``tokens`` tokens (:func:`check_autograd_by_differences`).

    The outer loop trains the key, value and query projections through ``pairs`` on every path, and
    the naive loop, the rules and the kernels all read the same ``pairs``, so comparing them with each
    other cannot see a ``.detach()``, a cast through float32 or a hand-written backward in it (nor in
    the carry handed to the next chunk): the projections would train wrongly on every path alike."""
    few = views.slice_tokens(0, min(tokens, views.key.shape[2]))
    floating = [k for k, v in carry.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]

    def pairs(*tensors: torch.Tensor) -> torch.Tensor:
        given = {**carry, **dict(zip(floating, tensors[3:], strict=True))}
        out = loss.pairs(Views(*tensors[:3]), given)
        parts = [out.inputs, out.targets, _validity(out), *out.carry.values()]
        kept = [t for t in parts if isinstance(t, torch.Tensor) and t.is_floating_point()]
        return torch.cat([t.to(torch.float64).reshape(-1) for t in kept])

    inputs = {"query": few.query, "key": few.key, "value": few.value}
    inputs.update({f"carry[{k!r}]": carry[k] for k in floating})
    check_autograd_by_differences(
        pairs,
        inputs,
        f"{loss.name}: pairs (inputs, targets, valid and carry; the projections train through them: "
        "a .detach() or a float32 round trip there trains them wrongly on every path alike)",
    )


def _validity(pairs: LossPairs) -> torch.Tensor:
    """``pairs.valid`` broadcast to ``[B, H, T]`` (ones when None)."""
    shape = pairs.inputs.shape[:-1]
    if pairs.valid is None:
        return torch.ones(shape, dtype=pairs.inputs.dtype, device=pairs.inputs.device)
    return pairs.valid.to(pairs.inputs.dtype).expand(shape)


def _assert_validity_close(pieces: list[LossPairs], whole: LossPairs, what: str, tolerance: float) -> None:
    """The validity of ``pieces`` (concatenated over tokens) equals that of ``whole``: exactly where
    every ``valid`` is a bool mask (or None), within ``tolerance`` where one is a float weight (a
    reduction inside ``pairs`` rounds differently on a slice than on the whole)."""
    built = torch.cat([_validity(p) for p in pieces], 2)
    masks = all(p.valid is None or p.valid.dtype == torch.bool for p in [*pieces, whole])
    assert_close(built, _validity(whole), what, 0.0 if masks else tolerance)


def check_pairs_chunk_invariant(
    loss: InnerLoss,
    views: Views,
    carry: dict[str, torch.Tensor],
    cut: int,
    tolerance: float = FLOAT64_TOLERANCE,
) -> None:
    """Pairs built in two chunks (split at ``cut``, the carry passed on) equal the pairs of the whole:
    the float fields (inputs, targets, a float ``valid`` weight) within ``tolerance``, a bool
    ``valid`` mask exactly."""
    whole = loss.pairs(views, carry)
    tokens = views.key.shape[2]
    first = loss.pairs(views.slice_tokens(0, cut), carry)
    second = loss.pairs(views.slice_tokens(cut, tokens), first.carry)
    for field in ("inputs", "targets"):
        chunked = torch.cat([getattr(first, field), getattr(second, field)], 2)
        assert_close(chunked, getattr(whole, field), f"{loss.name}: {field} chunked at {cut}", tolerance)
    _assert_validity_close([first, second], whole, f"{loss.name}: validity chunked at {cut}", tolerance)


def check_pairs_token_by_token(
    loss: InnerLoss, views: Views, carry: dict[str, torch.Tensor], tolerance: float = FLOAT64_TOLERANCE
) -> None:
    """Pairs built one token at a time, the carry passed on (what decoding does), equal the pairs of
    the whole; so do pairs built in two chunks cut at every position (:func:`check_pairs_chunk_invariant`).
    Float fields are compared within ``tolerance``, a bool ``valid`` mask exactly."""
    tokens = views.key.shape[2]
    for cut in range(1, tokens):
        check_pairs_chunk_invariant(loss, views, carry, cut=cut, tolerance=tolerance)
    whole = loss.pairs(views, carry)
    pieces, step_carry = [], carry
    for t in range(tokens):
        step = loss.pairs(views.slice_tokens(t, t + 1), step_carry)
        pieces.append(step)
        step_carry = step.carry
    for field in ("inputs", "targets"):
        built = torch.cat([getattr(p, field) for p in pieces], 2)
        assert_close(built, getattr(whole, field), f"{loss.name}: {field} built token by token", tolerance)
    _assert_validity_close(pieces, whole, f"{loss.name}: validity built token by token", tolerance)


def _check_carry_entry_declared(
    loss: InnerLoss, key: str, whole: torch.Tensor, alone: object, batch: int, initial_keys: set[str]
) -> None:
    """Refuse, with the reason, a carry entry that holds a row per sequence (``[batch, ...]`` for the
    batch, ``[1, ...]`` for one sequence) that :meth:`InnerLoss.batched_carry_keys` does not list: it is
    then taken as shared by the batch, so that selecting or joining states would mix the sequences."""
    per_sequence = (
        isinstance(alone, torch.Tensor)
        and alone.dim() == whole.dim() >= 1
        and (whole.shape[0], alone.shape[0]) == (batch, 1)
        and whole.shape[1:] == alone.shape[1:]
    )
    if per_sequence:
        made = "init_carry makes it" if key in initial_keys else "init_carry does not make it"
        raise AssertionError(
            f"{loss.name}: carry[{key!r}] holds a row per sequence ({list(whole.shape)} for a batch of {batch}, "
            f"{list(alone.shape)} for one sequence) but batched_carry_keys() does not list it ({made}), so it "
            "would be taken as shared by the batch: make it in init_carry, or override "
            "InnerLoss.batched_carry_keys to list it"
        )


def _carry_row(carry: dict[str, torch.Tensor], row: int, batched: set[str]) -> dict[str, torch.Tensor]:
    """Sequence ``row``'s part of a carry: each entry of ``batched`` (one row per sequence) cut to
    ``row:row+1``, the others (shared by the batch) as they are."""
    return {k: v[row : row + 1] if k in batched else v for k, v in carry.items()}


def _views_row(views: Views, row: int) -> Views:
    return Views(*(t[row : row + 1] for t in (views.query, views.key, views.value)))


def check_pairs_batch_independent(
    loss: InnerLoss, views: Views, carry: dict[str, torch.Tensor], tolerance: float = FLOAT64_TOLERANCE
) -> None:
    """Each sequence's pairs (inputs, targets, validity and carry) in a batch of ``B >= 2`` equal those
    of the sequence read alone: a loss that mixes the sequences of a batch (a mean over dim 0) gives
    each sequence numbers that depend on which others share its batch."""
    batch = views.key.shape[0]
    if batch < 2:
        raise ValueError(f"check_pairs_batch_independent needs views of batch >= 2, got batch {batch}")
    whole = loss.pairs(views, carry)
    _, heads, _, head_dim = views.key.shape
    batched = frozenset(loss.batched_carry_keys(heads, head_dim, views.key))  # as the loss declares them
    initial_keys = set(loss.init_carry(1, heads, head_dim, views.key[:1]))
    for row in range(batch):
        alone = loss.pairs(_views_row(views, row), _carry_row(carry, row, batched))
        what = f"{loss.name}: sequence {row}'s pairs in a batch of {batch} vs the sequence alone"
        hint = " (a pair must not depend on the other sequences of the batch)"
        for field in ("inputs", "targets"):
            got = getattr(whole, field)[row : row + 1]
            assert_close(got, getattr(alone, field), f"{what} ({field}){hint}", tolerance)
        assert_close(_validity(whole)[row : row + 1], _validity(alone), f"{what} (valid){hint}", tolerance)
        for key, value in _carry_row(whole.carry, row, batched).items():
            if key not in batched:
                _check_carry_entry_declared(loss, key, value, alone.carry.get(key), batch, initial_keys)
            assert_close(value, alone.carry[key], f"{what} (carry[{key!r}]){hint}", tolerance)


def check_pairs_head_independent(
    loss: InnerLoss, views: Views, carry: dict[str, torch.Tensor], tolerance: float = FLOAT64_TOLERANCE
) -> None:
    """Each head's pairs (inputs, targets and validity) stay the same when the views of every other head
    change, in two chunks with the carry passed on (a carry that mixes the heads shows in the second).

    Each head is a TTT layer of its own (its weights, lr, LayerNorm: ARCHITECTURE's "per head"), and a
    kernel computes one head per program: a loss whose head ``h`` reads another head's views (or a sum
    over the heads) trains each head on the others' tokens. (The carry may hold per-head values of its
    own, e.g. a table indexed by the head: only what the views of other heads do is checked.)"""
    heads, tokens = views.key.shape[1], views.key.shape[2]
    if heads < 2:
        raise ValueError(f"check_pairs_head_independent needs views of heads >= 2, got heads {heads}")
    cut = max(1, tokens // 2)

    def two_chunks(given: Views) -> list[LossPairs]:
        first = loss.pairs(given.slice_tokens(0, cut), carry)
        return [first, loss.pairs(given.slice_tokens(cut, tokens), first.carry)]

    whole = two_chunks(views)
    for head in range(heads):
        others = torch.ones(heads, dtype=torch.bool, device=views.key.device)
        others[head] = False
        changed = Views(
            *(t + others[:, None, None].to(t.dtype) for t in (views.query, views.key, views.value))
        )
        for chunk, (got, wanted) in enumerate(zip(two_chunks(changed), whole, strict=True)):
            what = (
                f"{loss.name}: head {head}'s pairs when the other heads' views change "
                f"({'first chunk' if chunk == 0 else 'second chunk, the carry passed on'}; each head is a TTT "
                "layer of its own: a pair must not read the other heads' views)"
            )
            for field in ("inputs", "targets"):
                part = getattr(got, field)[:, head : head + 1]
                assert_close(part, getattr(wanted, field)[:, head : head + 1], f"{what} ({field})", tolerance)
            got_valid, wanted_valid = (_validity(p)[:, head : head + 1] for p in (got, wanted))
            assert_close(got_valid, wanted_valid, f"{what} (valid)", tolerance)


def _check_forward_rows_alone(
    model: InnerModel,
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    tolerance: float,
    mismatch: Callable[[int, int], str],
) -> None:
    """``forward`` on every row of the leading dim of ``params`` and ``x`` at once equals ``forward`` on
    each row alone; ``mismatch(row, rows)`` words a difference."""
    whole = model.forward(params, x)
    for row in range(x.shape[0]):
        alone = model.forward({k: v[row : row + 1] for k, v in params.items()}, x[row : row + 1])
        assert_close(whole[row : row + 1], alone, mismatch(row, x.shape[0]), tolerance)


def check_forward_batch_independent(
    model: InnerModel, params: dict[str, torch.Tensor], x: torch.Tensor, tolerance: float = FLOAT64_TOLERANCE
) -> None:
    """``forward`` on a batch (params ``[B, H, *shape]``, ``x [B, H, N, f]``, ``B >= 2``) equals
    ``forward`` on each sequence alone: a model that mixes the sequences (or reads the batch size)
    gives each one numbers that depend on the others."""
    batch = x.shape[0]
    if batch < 2:
        raise ValueError(f"check_forward_batch_independent needs x of batch >= 2, got batch {batch}")
    _check_forward_rows_alone(
        model,
        params,
        x,
        tolerance,
        lambda row, rows: (
            f"{model.name}: forward of sequence {row} in a batch of {rows} vs the sequence alone "
            "(an output must not depend on the other sequences of the batch)"
        ),
    )


def check_forward_head_independent(
    model: InnerModel, params: dict[str, torch.Tensor], x: torch.Tensor, tolerance: float = FLOAT64_TOLERANCE
) -> None:
    """``forward`` on ``H >= 2`` heads (params ``[H, *shape]``, ``x [H, N, f]``) equals ``forward`` on each
    head alone (its weights and tokens): the primal rule calls the model one head at a time, the naive loop
    and the dual form on every head at once, so a model that mixes the heads gives them different numbers
    (and the comparison of two rules then blames a rule)."""
    heads = x.shape[0]
    if heads < 2:
        raise ValueError(f"check_forward_head_independent needs x of heads >= 2, got heads {heads}")
    _check_forward_rows_alone(
        model,
        params,
        x,
        tolerance,
        lambda row, rows: (
            f"{model.name}: forward of head {row} in a call of {rows} heads vs the head alone "
            "(each head is a TTT layer of its own: an output must not depend on the other heads' weights or tokens)"
        ),
    )


def check_model_update_rule_batch_independent(rule: Any, tolerance: float = FLOAT64_TOLERANCE) -> None:
    """A TTT-E2E model update rule's ``step`` on three sequences (float64, each its own loss, of gradient
    norms 0.3 to 30: the clipping at 1 is met and not met) equals ``step`` on each sequence alone, with and
    without clipping and ``create_graph``: its contract clips each sequence's gradient to the norm, and a
    step that clips by the batch's norm (``torch.nn.utils.clip_grad_norm_``) or averages the losses
    gives each sequence an update that depends on which others share its batch."""
    generator = torch.Generator().manual_seed(0)
    weights = {
        "w": torch.randn(3, 2, 3, generator=generator, dtype=torch.float64),
        "v": torch.randn(3, 3, generator=generator, dtype=torch.float64),
    }
    scales = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)

    def step(rows: slice, max_grad_norm: float, create_graph: bool) -> dict[str, torch.Tensor]:
        fast = {k: v[rows].clone().requires_grad_(True) for k, v in weights.items()}
        losses = scales[rows] * ((fast["w"] ** 2).sum((1, 2)) + (fast["v"] * fast["v"].flip(1)).sum(1))
        new = rule.step(fast, losses, lr=0.1, max_grad_norm=max_grad_norm, create_graph=create_graph)
        return {k: v.detach() for k, v in new.items()}

    for max_grad_norm, create_graph in ((1.0, False), (1.0, True), (0.0, False)):
        whole = step(slice(None), max_grad_norm, create_graph)
        for row in range(3):
            alone = step(slice(row, row + 1), max_grad_norm, create_graph)
            for key, value in alone.items():
                assert_close(
                    whole[key][row : row + 1],
                    value,
                    f"model update rule {getattr(rule, 'name', '?')!r}: step's new fast weights {key!r} of "
                    f"sequence {row} in a batch of 3 vs the sequence alone (max_grad_norm={max_grad_norm}, "
                    f"create_graph={create_graph}; each sequence's gradient is clipped to the norm on its own: "
                    "a step must not depend on the other sequences, e.g. through the batch's gradient norm)",
                    tolerance,
                )


def check_model_inner_loss_batch_independent(loss: Any, tolerance: float = FLOAT64_TOLERANCE) -> None:
    """A TTT-E2E model inner loss's ``chunk_loss`` on three sequences (float64 logits, ids ``[B, C + 1]``
    and ``[B, C]``) equals ``chunk_loss`` on each sequence alone: each sequence's fast weights step on
    its own loss, so a loss averaged over the batch (a ``mean`` over every token of the call) mixes them."""
    generator = torch.Generator().manual_seed(0)
    batch, chunk, vocab = 3, 4, 5
    logits = torch.randn(batch, chunk, vocab, generator=generator, dtype=torch.float64)
    for extra in (1, 0):
        ids = torch.randint(vocab, (batch, chunk + extra), generator=generator)
        whole = loss.chunk_loss(logits, ids)
        for row in range(batch):
            assert_close(
                whole[row : row + 1],
                loss.chunk_loss(logits[row : row + 1], ids[row : row + 1]),
                f"model inner loss {getattr(loss, 'name', '?')!r}: chunk_loss of sequence {row} in a batch of "
                f"{batch} vs the sequence alone (ids [B, C{' + 1' if extra else ''}]; each sequence's fast "
                "weights step on its own loss: it must not depend on the other sequences)",
                tolerance,
            )


def check_forward_token_independent(
    model: InnerModel, params: dict[str, torch.Tensor], x: torch.Tensor, tolerance: float = FLOAT64_TOLERANCE
) -> None:
    """``forward`` on ``N`` tokens (``x [..., N, f]``) equals ``forward`` on each token alone: ``g`` maps
    each token's features, and the update rules call a model one token at a time while
    ``InnerTask.predict`` calls it on a whole chunk, so a model that mixes tokens gives two answers."""
    whole = model.forward(params, x)
    alone = torch.cat([model.forward(params, x[..., t : t + 1, :]) for t in range(x.shape[-2])], dim=-2)
    assert_close(
        whole,
        alone,
        f"{model.name}: forward of {x.shape[-2]} tokens vs each token alone (g maps each token's features: "
        "an output must not depend on the other tokens of the call)",
        tolerance,
    )


def check_unchecked_matches_forward(
    model: InnerModel, params: dict[str, torch.Tensor], x: torch.Tensor, tolerance: float = FLOAT64_TOLERANCE
) -> None:
    """``forward_unchecked`` (what the update rules and their references run) equals ``forward`` (what the
    other checks read) on ``x [*batch, N, f]`` and on its first token alone: a model whose two differ would
    be checked on one function and trained with another, and the rules' comparisons with their references
    cannot see it (both run ``forward_unchecked``)."""
    for given, where in ((x, f"{x.shape[-2]} tokens"), (x[..., :1, :], "one token")):
        assert_close(
            model.forward_unchecked(params, given),
            model.forward(params, given),
            f"{model.name}: forward_unchecked (what the update rules run) vs forward on x {list(given.shape)} "
            f"({where}); forward_unchecked must be forward's computation without its argument check",
            tolerance,
        )


def warm_carry(loss: InnerLoss, views: Views, carry: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The carry after ``loss.pairs`` has read ``views`` (two chunks, so that a carry built wrongly
    from a short chunk shows): a starting carry that is not the initial (often zero) one."""
    cut = max(1, views.key.shape[2] // 2)
    first = loss.pairs(views.slice_tokens(0, cut), carry)
    return loss.pairs(views.slice_tokens(cut, views.key.shape[2]), first.carry).carry


def run_stack(model: InnerModel, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The model's declared ``stack`` applied to ``x [*batch, N, f]`` layer by layer (not its
    ``forward``, which a model may write itself: :func:`check_stack_matches_forward` compares them)."""
    return apply_stack(model.stack or (), params, x)


def check_stack_matches_forward(
    model: InnerModel, params: dict[str, torch.Tensor], x: torch.Tensor, tolerance: float = FLOAT64_TOLERANCE
) -> None:
    """A model that declares a ``stack`` computes that stack in ``forward`` (the dual form and the
    stack kernels run the stack, the primal form runs ``forward``: they must be one function).
    The comparison is :func:`innerloop.core.protocol.stack_forward_mismatch`, which TTTLayer also runs
    on model instances that are not the registered ones."""
    mismatch = stack_forward_mismatch(model, params, x, tolerance)
    if mismatch is not None:
        raise AssertionError(mismatch)


def check_autograd_by_differences(
    function: Callable[..., torch.Tensor], inputs: dict[str, torch.Tensor], what: str
) -> None:
    """autograd's first and second derivatives of ``function(*inputs.values())`` equal finite differences
    (``torch.autograd.gradcheck`` and ``gradgradcheck`` in float64, each along a random direction).

    The rules, the naive loop and the outer gradients all take a plugin's derivatives from autograd, so
    comparing them with each other cannot see a wrong one: a hand-written ``autograd.Function``
    backward (or a term left out of it) would train every path alike, wrongly."""
    leaves = tuple(t.detach().double().requires_grad_(True) for t in inputs.values())
    for check, order in ((torch.autograd.gradcheck, "first"), (torch.autograd.gradgradcheck, "second")):
        try:
            with torch.enable_grad():
                check(function, leaves, fast_mode=True)
        except Exception as error:  # torch's GradcheckError, or a backward that cannot run twice
            if "in-place operation" in str(error):  # a write that kept the values: named as a write
                raise AssertionError(
                    f"{what} wrote in place into a tensor it was given (inputs "
                    f"{', '.join(inputs)}), which autograd refuses on a tensor that requires grad: "
                    f"{str(error).strip()[:300]}; compute new tensors instead (no in-place mul_, +=, clamp_)"
                ) from error
            raise AssertionError(
                f"{what}: autograd's {order} derivatives w.r.t. its inputs "
                f"{', '.join(f'{i} ({name})' for i, name in enumerate(inputs))} differ from finite "
                f"differences in float64 (a hand-written backward, or a term left out of it?): "
                f"{type(error).__name__}: {str(error).strip()[:600]}"
            ) from error


#: How far a plugin's function in float32 may be from the same function in float64 on the same
#: (float32-rounded) inputs, by relative error: the built-ins are within about 1e-7 (a few float32
#: roundings); a branch on the dtype, a constant or a step rounded to a lower precision is off by far more.
FLOAT32_PLUGIN_TOLERANCE = 1e-4


def _float_parts(result: Any) -> torch.Tensor:
    """Every floating tensor in ``result`` (a tensor, a :class:`LossPairs` with its validity and carry, a
    tuple, list or dict of them) flattened into one float64 vector."""
    if isinstance(result, LossPairs):
        result = [result.inputs, result.targets, _validity(result), result.carry]
    if isinstance(result, dict):
        result = list(result.values())
    if isinstance(result, (list, tuple)):
        parts = [_float_parts(r) for r in result]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    if isinstance(result, torch.Tensor) and result.is_floating_point():
        return result.detach().to(torch.float64).reshape(-1)
    return torch.zeros(0, dtype=torch.float64)


def check_float32_like_float64(
    function: Callable[..., Any],
    inputs: dict[str, Any],
    what: str,
    tolerance: float = FLOAT32_PLUGIN_TOLERANCE,
) -> None:
    """``function(*inputs.values())`` in float32 within ``tolerance`` (relative error) of the same call in
    float64 on the same inputs rounded to float32 (every floating tensor of ``inputs``, a dict of them
    too): what it returns (:func:`_float_parts`) compared as a whole.

    A layer runs its plugins in float32 (torch's default dtype, and under autocast), while the other
    checks run them in float64: a plugin wrong in float32 only (a branch on the dtype, a constant or an
    intermediate rounded to a lower precision) passes those and trains every float32 layer wrongly."""

    def cast(value: Any, dtype: torch.dtype) -> Any:
        if isinstance(value, dict):
            return {k: cast(v, dtype) for k, v in value.items()}
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.detach().to(torch.float32).to(dtype)
        return value

    low = _float_parts(function(*(cast(v, torch.float32) for v in inputs.values())))
    high = _float_parts(function(*(cast(v, torch.float64) for v in inputs.values())))
    assert_close(
        low,
        high,
        f"{what} in float32 vs in float64 on the same float32-rounded inputs (layers run plugins in float32: a "
        "branch on the dtype, or a constant or an intermediate rounded to a lower precision?)",
        tolerance,
    )


def check_inner_model_in_float32(model: InnerModel, params: dict[str, torch.Tensor], x: torch.Tensor) -> None:
    """:func:`check_float32_like_float64` of ``model.forward(params, x)`` and of each activation of its stack
    (``fn`` and ``derivative``, which the dual form and the stack kernels run) at ``3 x``."""
    names = list(params)

    def forward(*tensors: torch.Tensor) -> torch.Tensor:
        return model.forward(dict(zip(names, tensors[:-1], strict=True)), tensors[-1])

    check_float32_like_float64(forward, {**params, "x": x}, f"{model.name}: forward")
    for layer in model.stack or ():
        if layer.activation is not None:
            for part in ("fn", "derivative"):
                what = f"{model.name}: activation {layer.activation.name!r}'s {part}"
                check_float32_like_float64(getattr(layer.activation, part), {"z": 3 * x}, what)


def check_inner_loss_in_float32(
    loss: InnerLoss, views: Views, carry: dict[str, torch.Tensor], prediction: torch.Tensor
) -> None:
    """:func:`check_float32_like_float64` of ``loss.pairs(views, carry)`` (its inputs, targets, validity and
    floating carry) and of ``token_loss`` and ``token_loss_grad`` at ``prediction`` against the pairs'
    targets."""

    def pairs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, given: dict) -> LossPairs:
        return loss.pairs(Views(query, key, value), given)

    views_and_carry = {"query": views.query, "key": views.key, "value": views.value, "carry": carry}
    check_float32_like_float64(pairs, views_and_carry, f"{loss.name}: pairs")
    targets = loss.pairs(views, carry).targets
    for method in ("token_loss", "token_loss_grad"):
        what = f"{loss.name}: {method}"
        check_float32_like_float64(getattr(loss, method), {"prediction": prediction, "target": targets}, what)


def check_forward_by_differences(model: InnerModel, params: dict[str, torch.Tensor], x: torch.Tensor) -> None:
    """:func:`check_autograd_by_differences` of ``model.forward(params, x)`` w.r.t. every weight and ``x``
    (``params``: ``[H, *shape]``, ``x``: ``[H, N, f]``; a few rows are enough)."""
    names = list(params)

    def forward(*tensors: torch.Tensor) -> torch.Tensor:
        return model.forward(dict(zip(names, tensors[:-1], strict=True)), tensors[-1])

    inputs = {**{f"weight {k}": v for k, v in params.items()}, "x": x}
    check_autograd_by_differences(forward, inputs, f"{model.name}: forward")


#: Pre-activations beyond the few units random inputs reach (a layer's reach them with large weights or
#: inputs), so a derivative wrong only there (a clamped or truncated formula) is named: 10 <= |z| <= 19,
#: below 20, where torch's softplus turns into the identity (its derivatives there are not sigmoid's).
WIDE_PRE_ACTIVATIONS = torch.cat([torch.linspace(10.0, 19.0, 7), -torch.linspace(10.0, 19.0, 7)]).double()


def check_activation_derivatives(
    model: InnerModel, z: torch.Tensor, tolerance: float = FLOAT64_TOLERANCE
) -> None:
    """Each activation of the model's stack: ``derivative(z)`` equals autograd of ``fn`` at ``z`` (float64),
    and so does its own derivative (the dual form differentiates through it: see
    :func:`check_derivative_in_graph`); then the same at ``z`` and :data:`WIDE_PRE_ACTIVATIONS` together
    (relative to the norm over both, so the tiny derivatives far out -- rounded differently by a right
    formula -- are not blown up; the check at ``z`` alone keeps large values there from hiding an error at
    ``z``)."""
    for layer in model.stack or ():
        activation = layer.activation
        if activation is None:
            continue
        with_wide = torch.cat([z.detach().double().flatten(), WIDE_PRE_ACTIVATIONS])
        for points, where in ((z, ""), (with_wide, " at z and at 10 <= |z| <= 19")):
            point = points.detach().double().requires_grad_(True)
            with torch.enable_grad():
                autograd = torch.autograd.grad(activation.fn(point).sum(), point, create_graph=True)[0]
                derivative = activation.derivative(point)
            what = f"{model.name}: derivative of activation {activation.name!r}{where}"
            assert_close(derivative, autograd, f"{what} vs autograd of its fn", tolerance)
            check_derivative_in_graph(derivative, autograd, (point,), ("z",), what, tolerance)


def _named(kind: str, plugin: Any) -> Any:
    """``plugin``, or the registered ``kind`` (``inner_model``, ``inner_loss``, ``update_rule``) it names:
    the checks take a plugin by instance or by name, as ``check_kernel`` and layers do."""
    from innerloop.registry import get_registry
    from innerloop.registry.kinds import KINDS

    if isinstance(plugin, str):
        return getattr(get_registry(), kind)(plugin)
    declared = next(k for k in KINDS if k.name == kind)
    missing = [method for method in declared.required if not callable(getattr(plugin, method, None))]
    if missing or isinstance(plugin, type):
        what = (
            f"the class {plugin.__name__}"
            if isinstance(plugin, type)
            else f"{type(plugin).__name__} {plugin!r}"
        )
        raise TypeError(
            f"{_PARAMETER_OF[kind]} must be an instance of {declared.base.__name__} or a registered {declared.label}'s "
            f"name, got {what}"
            + (f" (it lacks {missing})" if missing and not isinstance(plugin, type) else "")
        )
    return plugin


_PARAMETER_OF = {"inner_model": "model", "inner_loss": "loss", "update_rule": "rule"}
"""The argument of the checks that takes a plugin of each kind."""


def rule_refusal(model: InnerModel | str, rule: UpdateRule | str) -> str | None:
    """Why ``rule`` cannot run ``model`` (its ``check_model``, as ``TTTLayer`` asks it), or None when it
    can; each is a plugin or a registered name."""
    return model_refusal(_named("update_rule", rule), _named("inner_model", model))


def _rule(name: str) -> UpdateRule:
    from innerloop.registry import get_registry

    return get_registry().update_rule(name)


def _rules_for(model: InnerModel) -> list[UpdateRule]:
    from innerloop.registry import get_registry

    registry = get_registry()
    rules = [registry.update_rule(n) for n in registry.names("update_rule")]
    return [r for r in rules if model_refusal(r, model) is None]


#: The shape :func:`check_inner_model` and :func:`check_inner_loss` check a plugin at by default:
#: three sequences (a plugin that mixes them, or treats the third differently, is caught), three
#: heads, an odd head dim, and a call of 37 tokens (longer than a plugin's internal blocks of 16 or
#: 32, ending mid-mini-batch). Give ``make_problem``'s shape arguments to check others
#: (:func:`innerloop.testing.strategies.problems` draws them).
PLUGIN_CHECK_SHAPE: dict[str, int] = {
    "batch": 3,
    "heads": 3,
    "head_dim": 5,
    "tokens": 37,
    "mini_batch_size": 5,
}

#: The second shape the checks reach without a shape given: five heads (a plugin wrong past the
#: fourth is caught), head dim 8 (one wrong past a small head's fifth feature is: the other shapes'
#: head dims are 5 and 1) and one call of 150 tokens (longer than internal blocks of 48 or 64 tokens,
#: FLA's usual chunk; mini-batches of 16, ending mid-mini-batch), at two sequences to stay cheap.
LONG_CHECK_SHAPE: dict[str, int] = {
    "batch": 2,
    "heads": 5,
    "head_dim": 8,
    "tokens": 150,
    "mini_batch_size": 16,
}

#: Every shape :func:`check_inner_model`, :func:`check_inner_loss` and :func:`check_update_rule`
#: check a plugin at when no shape is given.
PLUGIN_CHECK_SHAPES: tuple[dict[str, int], ...] = (PLUGIN_CHECK_SHAPE, LONG_CHECK_SHAPE)

#: The shape :func:`check_update_rule` also checks a rule at when no shape is given: every size 1 (one
#: sequence, as generation runs; one head; head dim 1; one-token mini-batches, DeltaNet's K), where a rule
#: that squeezes a dim (``.squeeze()``) or special-cases a size goes wrong; 9 tokens. Without the inner
#: LayerNorm unless the wrapping is given: over one feature it is a constant, with a zero gradient.
UNIT_CHECK_SHAPE: dict[str, int] = {
    "batch": 1,
    "heads": 1,
    "head_dim": 1,
    "tokens": 9,
    "mini_batch_size": 1,
}
UNIT_CHECK_WRAPPING: dict[str, bool] = {"norm": False, "residual": True}

#: The shape :func:`check_update_rule` also checks a rule at when no shape is given, in the first
#: wrapping: one-token mini-batches (DeltaNet's K) at two sequences, three heads and head dim 3. Before
#: (review s53j), K = 1 was met only at :data:`UNIT_CHECK_SHAPE`, where every size is 1, so a rule's
#: path for K = 1 that mixed the sequences, heads or features (out[:, :1] read into every head) passed.
ONE_TOKEN_MINI_BATCH_SHAPE: dict[str, int] = {
    "batch": 2,
    "heads": 3,
    "head_dim": 3,
    "tokens": 9,
    "mini_batch_size": 1,
}

#: The shape :func:`check_update_rule` also checks a rule at when no shape is given, on its first model
#: in the first wrapping: mini-batches of 32 (past a tile of 16 rows, at one of 32), head dim 20 (past 8 and 16, not
#: a power of two) and 45 tokens (a whole mini-batch and 13 tokens of a second). Before (review
#: s54h) the default shapes stopped at K = 16 and head dim 8, and strategies.problems at K = 6 and head
#: dim 8: a rule wrong only for a mini-batch's rows past 16 or a head's features past 8 passed.
WIDE_MINI_BATCH_SHAPE: dict[str, int] = {
    "batch": 2,
    "heads": 2,
    "head_dim": 20,
    "tokens": 45,
    "mini_batch_size": 32,
}

#: ... and a call shorter than one mini-batch (K = 12 > T = 7: the sequence ends inside its first
#: mini-batch, no weights are committed), at head dim 12: a rule that assumes one whole mini-batch
#: (``T // K`` of them, a reshape to ``[T // K, K]``) goes wrong there. The other shapes have T > K.
MINI_BATCH_LONGER_THAN_CALL_SHAPE: dict[str, int] = {
    "batch": 2,
    "heads": 2,
    "head_dim": 12,
    "tokens": 7,
    "mini_batch_size": 12,
}


@with_autograd
def check_inner_model(
    model: InnerModel | str, loss: InnerLoss | str | None = None, seed: int = 0, **shape: int
) -> None:
    """``forward`` equals the declared stack (if any), each activation's derivative equals autograd,
    ``forward`` on a batch equals ``forward`` on each sequence alone, ``forward_unchecked`` (what the
    rules and their references run) equals ``forward`` at each shape, and every update rule that
    accepts ``model`` equals the naive loop on it (float64).

    ``shape``: ``make_problem``'s ``batch`` (at least 2), ``heads``, ``head_dim``, ``tokens`` and
    ``mini_batch_size``; unset ones are :data:`PLUGIN_CHECK_SHAPE`'s. With no shape given, every
    shape of :data:`PLUGIN_CHECK_SHAPES` is checked (a 37-token and a 150-token call, up to five heads
    and head dim 8).
    The registrar's smoke test runs first (:func:`registrar_smoke_test`): a wrong shape is named as
    registration names it."""
    from innerloop.registry import get_registry

    shapes = [_check_shape(shape)] if shape else PLUGIN_CHECK_SHAPES
    seed = checked_seed(seed)  # torch's generator takes a Python int only
    model = _named("inner_model", model)
    registrar_smoke_test("inner_model", model)
    check_init_params_uses_generator(model, shapes[0]["heads"], shapes[0]["head_dim"], seed)
    loss = _named("inner_loss", loss) if loss is not None else get_registry().inner_loss("reconstruction")
    if not _is_builtin("inner_loss", loss):  # a loss's own mistake named as its, not the model's
        _check_given_loss(loss, shapes[0]["heads"], shapes[0]["head_dim"])
    for full in shapes:
        _check_inner_model_at(model, loss, seed, full)


def check_init_params_uses_generator(model: InnerModel, heads: int, head_dim: int, seed: int = 0) -> None:
    """``model.init_params(heads, head_dim, generator=g)`` draws from ``g`` only: torch's global RNG is
    left as it was, and two generators seeded alike give the same weights (torch's global RNG moved
    between the calls, and put back after).

    :func:`make_problem` (every check's problem) draws the weights from its seeded generator: a model
    that draws from the global RNG (or numpy's) instead gives each run of the checks other weights,
    so that a failure cannot be reproduced by its seed, and the draw moves the caller's global RNG."""

    seed = _check_seed_and_dtype(seed, torch.float64)  # a wrong seed named, not manual_seed's error

    def draw() -> dict[str, torch.Tensor]:
        return model.init_params(heads, head_dim, generator=torch.Generator().manual_seed(seed))

    with torch.random.fork_rng(devices=[]):
        before = torch.get_rng_state()
        first = draw()
        drew_globally = not torch.equal(torch.get_rng_state(), before)
        torch.rand(16)  # the global RNG elsewhere
        second = draw()
    differing = sorted(k for k in first if not _same(first[k], second.get(k)))
    if drew_globally or differing:
        found = "torch's global RNG moved during the call" if drew_globally else f"{differing} differed"
        raise AssertionError(
            f"{model.name}: init_params({heads}, {head_dim}, generator=g) must draw from g only: {found} (two "
            f"generators seeded {seed} alike gave the weights twice); pass generator=generator to every "
            "torch.randn / torch.rand / nn.init call (the checks' problems are drawn from their seed)"
        )


def registrar_smoke_test(kind_name: str, plugin: InnerModel | InnerLoss) -> None:
    """The registrar's smoke test of an inner model or loss (``innerloop.registry.kinds.smoke_test``):
    a wrong shape or type (``init_params`` against ``param_shapes``, ``forward``'s output, the pairs'
    fields, ``token_loss``'s reduction) is named as registration names it, as an ``AssertionError``,
    before any numeric check meets it as a raw torch error."""
    from innerloop.registry.kinds import PluginError, smoke_test

    try:
        smoke_test(kind_name, plugin)
    except PluginError as error:
        raise AssertionError(str(error)) from error


def check_forward_leaves_inputs(model: InnerModel, params: dict[str, torch.Tensor], x: torch.Tensor) -> None:
    """``model.forward(params, x)`` leaves its weights and ``x`` as they are (:func:`check_leaves_its_inputs`)."""
    names = list(params)

    def forward(*tensors: torch.Tensor) -> torch.Tensor:
        return model.forward(dict(zip(names, tensors[:-1], strict=True)), tensors[-1])

    check_leaves_its_inputs(
        forward,
        {**{f"params[{k!r}]": v for k, v in params.items()}, "x": x},
        f"{model.name}: forward",
        "the weights are a TTTState's (immutable: a caller may continue it twice) or the layer's initial "
        "ones, and x is what the layer reads again (the residual, the other rules)",
    )


def _check_inner_model_at(model: InnerModel, loss: InnerLoss, seed: int, shape: dict[str, int]) -> None:
    """:func:`check_inner_model` at one full shape."""
    problem = make_problem(model, loss, seed=seed, **shape)
    params = {k: v[0] for k, v in problem.state.params.items()}  # [H, *shape]: one sequence
    check_forward_leaves_inputs(model, params, problem.views.key[0])
    check_stack_matches_forward(model, params, problem.views.key[0])
    check_activation_derivatives(model, 3 * problem.views.key[0])
    check_forward_by_differences(model, params, problem.views.key[0][:, :3])
    # each sequence with its own weights (the problem's are one copy per sequence): a model that reads
    # sequence 0's weights for every sequence is named here, before a rule's comparison meets it
    generator = torch.Generator().manual_seed(seed + 1)
    batched = {
        k: v + 0.1 * torch.randn(v.shape, generator=generator, dtype=torch.float64).to(v.dtype)
        for k, v in problem.state.params.items()
    }
    check_forward_batch_independent(model, batched, problem.views.key)
    check_unchecked_matches_forward(model, batched, problem.views.key)
    check_unchecked_matches_forward(model, params, problem.views.key[0])
    if shape["heads"] >= 2:
        check_forward_head_independent(model, params, problem.views.key[0])
    check_forward_token_independent(model, params, problem.views.key[0])
    check_inner_model_in_float32(model, params, problem.views.key[0])
    with _memoised_references():  # the naive loop once for every rule that declares no reference
        for rule in _rules_for(model):
            _check_rule_on_model_problem(problem, rule, model, seed)


def _check_rule_on_model_problem(
    problem: InnerProblem, rule: UpdateRule, model: InnerModel, seed: int
) -> None:
    """:func:`_check_inner_model_at`'s comparison of ``rule`` with its reference on ``problem``, with
    autograd and, in one call, without it (:func:`check_update_rule_without_grad`: a layer runs its
    model and loss so in evaluation and generation, and a ``forward`` or ``token_loss_grad`` that
    branches on ``torch.is_grad_enabled()`` or takes ``torch.autograd.grad`` is otherwise never run so)."""
    ruled = problem.for_rule(rule)
    expected_out, expected_state = finite_expected(ruled, rule, seed)
    out, state = ruled.run(rule)
    assert_close(
        out, expected_out, f"{rule.name} vs {reference_name(rule)} on model {model.name!r}", FLOAT64_TOLERANCE
    )
    assert_states_close(state, expected_state, f"{rule.name} on model {model.name!r}", FLOAT64_TOLERANCE)
    check_update_rule_without_grad(rule, ruled, cut_points=[])


def _check_shape(shape: dict[str, int]) -> dict[str, int]:
    """``shape`` completed with :data:`PLUGIN_CHECK_SHAPE`, each value checked."""
    unknown = sorted(set(shape) - set(PLUGIN_CHECK_SHAPE))
    if unknown:
        raise TypeError(f"unknown shape argument(s) {unknown}; valid: {sorted(PLUGIN_CHECK_SHAPE)}")
    full = {**PLUGIN_CHECK_SHAPE, **shape}
    for name, value in full.items():
        least = 2 if name == "batch" else 1
        index = as_index(value)  # a numpy or 0-d torch integer too, as make_problem takes
        if index is None or index < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
        full[name] = index
    if full["head_dim"] == 2:
        raise ValueError(
            "head_dim must be 1 or at least 3 here, got 2: these checks run the layer's inner LayerNorm, "
            "which over two features is a constant (+-w + b) whose derivative is ~1e-10 of its inputs, so "
            "a float64 comparison of the gradients through it measures rounding, not the plugin"
        )
    return full


@with_autograd
def check_inner_loss(loss: InnerLoss | str, seed: int = 0, **shape: int) -> None:
    """Shapes, causality, chunk invariance of the pairs, independence of the sequences of a batch,
    the pairs' derivatives against finite differences (:func:`check_pairs_by_differences`), gradient, and agreement with the naive loop (``loss``: an instance or a registered name; ``shape``: as :func:`check_inner_model`'s; with
    none given, every shape of :data:`PLUGIN_CHECK_SHAPES`). The registrar's smoke test runs first
    (:func:`registrar_smoke_test`): a wrong shape is named as registration names it."""
    shapes = [_check_shape(shape)] if shape else PLUGIN_CHECK_SHAPES
    seed = checked_seed(seed)  # torch's generator takes a Python int only
    loss = _named("inner_loss", loss)
    registrar_smoke_test("inner_loss", loss)
    for full in shapes:
        _check_inner_loss_at(loss, seed, full)


def _check_inner_loss_at(loss: InnerLoss, seed: int, full: dict[str, int]) -> None:
    """:func:`check_inner_loss` at one full shape."""
    from innerloop.registry import get_registry

    model = get_registry().inner_model("linear")
    problem = make_problem(model, loss, seed=seed, **full)
    views, carry = problem.views, problem.state.loss_carry
    check_pairs_deterministic(loss, views, carry)  # first: every check below compares pairs
    whole = loss.pairs(views, carry)

    check_pairs_causal(loss, views, carry, cut=max(1, full["tokens"] // 2))
    check_pairs_by_differences(loss, views, warm_carry(loss, views, carry))
    # every cut and one token at a time (decoding), and each sequence alone, from the initial carry and
    # from one carried on (where a carry made after init_carry shows)
    earlier = Views(*(t.flip(2) for t in (views.query, views.key, views.value)))  # tokens read before
    for start in (carry, warm_carry(loss, earlier, carry)):
        check_pairs_batch_independent(loss, views, start)
        check_pairs_token_by_token(loss, views, start)
    if full["heads"] >= 2:
        check_pairs_head_independent(loss, views, carry)

    generator = torch.Generator().manual_seed(seed)
    # errors from 0.01 to 100 in size: a piecewise closed form (Huber, clipping) is met in each piece
    scales = torch.logspace(-2, 2, whole.targets.shape[2], dtype=torch.float64)[:, None]
    noise = torch.randn(whole.targets.shape, generator=generator, dtype=torch.float64)
    prediction = whole.targets.double() + scales * noise
    check_loss_gradient(loss, prediction, whole.targets.double(), FLOAT64_TOLERANCE)
    # targets from 0.01 to 100 in size too, from views of those sizes (a loss builds its targets from
    # the views): a closed form wrong only for large targets (token_loss clips the target, the closed
    # form does not) met none among the views' unit-sized ones and passed (review s48l)
    sizes = torch.logspace(-2, 2, views.key.shape[2], dtype=torch.float64).to(views.key.dtype)[:, None]
    wide = Views(views.query * sizes, views.key * sizes, views.value * sizes)
    wide_targets = loss.pairs(wide, carry).targets.double()
    check_loss_gradient(loss, wide_targets + scales * noise, wide_targets, FLOAT64_TOLERANCE)
    check_inner_loss_in_float32(loss, views, warm_carry(loss, views, carry), prediction)

    check_inner_model(model, loss, seed=seed, **full)


def rule_variants(rule: UpdateRule) -> list[dict[str, bool]]:
    """The ``make_problem`` options a rule is checked with: plain, and with decay and/or momentum
    where the rule supports them."""
    variants = [{"decay": False, "momentum": False}]
    if rule.supports_decay:
        variants.append({"decay": True, "momentum": False})
    if rule.supports_momentum:
        variants.append({"decay": False, "momentum": True})
        if rule.supports_decay:
            variants.append({"decay": True, "momentum": True})
    return variants


#: The layer wrappings ``(norm, residual)`` :func:`check_update_rule` checks a rule with on every
#: model and loss by default: both on (the layer's default) and both off.
WRAPPINGS: tuple[tuple[bool, bool], ...] = ((True, True), (False, False))

#: The mixed wrappings (one of the inner LayerNorm and residual on, the other off), which
#: :func:`check_update_rule` checks by default on the first model and loss (values): ``TTTLayer``
#: takes ``inner_norm`` and ``inner_residual`` independently, so a rule that ties one to the other
#: (reads ``task.use_norm`` for ``task.residual``) is caught, each way round.
MIXED_WRAPPINGS: tuple[tuple[bool, bool], ...] = ((True, False), (False, True))

#: The built-in losses :func:`check_update_rule` checks a rule with by default: reconstruction
#: (every pair valid), next_token (the first pair invalid, a carry across chunks), dot_product.
BUILTIN_LOSSES: tuple[str, ...] = ("reconstruction", "next_token", "dot_product")


@with_autograd
def check_update_rule(
    rule: UpdateRule | str,
    model: InnerModel | str | None = None,
    loss: InnerLoss | str | None = None,
    cut_points: list[int] | None = None,
    seed: int = 0,
    tolerance: float = FLOAT64_TOLERANCE,
    gradients: bool = True,
    without_grad: bool = True,
    **problem_kwargs: Any,
) -> None:
    """``rule`` equals the naive loop (or the token-by-token reference it declares,
    ``UpdateRule.reference``), whole and when the sequence is cut at ``cut_points``; with random decay
    and momentum too where the rule supports them (:func:`rule_variants`), and a decay
    or momentum of exactly 0 gives the plain rule's numbers, lr 0 the naive loop's (:func:`check_zero_learning_rate`); and on the first model and loss, from a state
    :data:`FAR_MINI_BATCHES` mini-batches into its sequence, and given ``decay_log`` if it names one. With ``gradients``, the gradients of its
    outputs and final weights w.r.t. every input (views, lr, initial weights, LayerNorm, decay,
    momentum, token scales) equal the naive loop's too, whole and cut (:func:`check_update_rule_gradients_match_naive`).
    With ``without_grad``, on every model (every loss, variant and wrapping), its values under
    ``torch.no_grad()`` and ``torch.inference_mode()`` are the same (:func:`check_update_rule_without_grad`);
    in float32 (each loss, first model) it stays within float32's rounding of the float64 values.
    What ``forward`` returns is checked first (:func:`check_rule_returns`). ``tolerance`` widens only on a
    problem that amplifies rounding, as :data:`FLOAT64_CONDITIONING_FACTOR` says (the message says so).

    ``model`` (an inner model or a registered model's name) defaults to every built-in model the
    rule accepts (``check_model``), ``linear`` first; give a plugin's model by name or instance (``rule`` and ``loss`` too). ``loss``
    defaults to each built-in loss in turn (:data:`BUILTIN_LOSSES`), and unless ``norm`` / ``residual``
    are given, each layer wrapping in :data:`WRAPPINGS` is checked, and those in :data:`MIXED_WRAPPINGS`
    on the first model and loss: a rule that is right for one model, loss or wrapping only is caught.

    ``problem_kwargs`` go to :func:`make_problem` (``batch``, ``heads``, ``head_dim``, ``tokens``,
    ``mini_batch_size``, ...). Without a shape among them, the values are also checked at each shape
    of :data:`PLUGIN_CHECK_SHAPES` (three sequences and heads, an odd head dim, a 37-token call; five
    heads, head dim 8 and a 150-token call), with the first loss and wrapping, and at
    :data:`WIDE_MINI_BATCH_SHAPE` (K = 32, head dim 20, 45 tokens) and :data:`MINI_BATCH_LONGER_THAN_CALL_SHAPE`
    (K = 12 > T = 7, head dim 12) on the first model, :data:`ONE_TOKEN_MINI_BATCH_SHAPE` (K = 1 at several sequences and heads), :data:`UNIT_CHECK_SHAPE` (sizes 1),
    and a call of :data:`LONG_CALL_SHAPE` (2063 tokens) against itself in pieces (:func:`_check_rule_long_call`). First, on
    every model and loss, rates up to :data:`LARGE_RATES_BOUND` (:func:`_check_rule_at_large_rates`). A failure names
    the seed and ``max_lr``, a values one the ``make_problem`` call that builds it again."""
    _check_flags(gradients=gradients, without_grad=without_grad)  # "no" would run the checks it names
    rule = _named("update_rule", rule)
    tolerance = _refuse_variant_kwargs("check_update_rule", problem_kwargs, tolerance)
    losses = _losses_to_check(loss, problem_kwargs, tolerance)
    seed = checked_seed(seed)  # torch's generator takes a Python int only
    cut_points = _check_cut_points(cut_points, problem_kwargs)
    given, wrappings, mixed = _wrappings_to_check(problem_kwargs)  # norm and residual popped
    check = _RuleCheck(rule, cut_points, seed, tolerance, gradients)
    with _memoised_references():  # the reference once per distinct problem
        for index, each_model in enumerate(_models_for(rule, model, problem_kwargs.get("head_dim"))):
            _check_rule_at_large_rates(check, each_model, losses, problem_kwargs, wrappings, index == 0)
            no_grad_too = without_grad and index == 0  # the no-grad modes at the wide shapes: first model
            shapes_of = (check, each_model, losses[0], problem_kwargs, wrappings[0], given)
            _check_default_shapes(*shapes_of, no_grad_too, index == 0)
            _check_rule_with(check, each_model, losses, wrappings, gradients, problem_kwargs)
            first_wrapping = {**problem_kwargs, **wrappings[0]}
            if without_grad:  # every model: a fast path without autograd may differ for one model only
                _check_rule_without_grad(check, each_model, losses, mixed, first_wrapping)
            if index == 0:  # the mixed wrappings, float32, the log gate, a state far into a sequence
                _check_rule_on_first(check, each_model, losses, mixed, first_wrapping)


@dataclass(frozen=True)
class _RuleCheck:
    """What :func:`check_update_rule` checks every case with: the rule, where it cuts each sequence (None:
    :func:`default_cuts`), the problems' seed, the relative error allowed and whether gradients are checked."""

    rule: UpdateRule
    cut_points: list[int] | None
    seed: int
    tolerance: float
    gradients: bool = True


def _is_builtin(kind: str, plugin: object) -> bool:
    """Whether ``plugin`` is the object a built-in registered under ``kind`` (checked by this suite)."""
    from innerloop.registry import get_registry
    from innerloop.registry.manager import BUILTIN_PREFIX

    entries = get_registry().entries(kind)
    return any(e.obj is plugin and e.origin.startswith(BUILTIN_PREFIX) for e in entries)


def _check_given_model(model: InnerModel, head_dim: int = 5) -> None:
    """A model a caller gave :func:`check_update_rule`, checked where its mistake would read as the
    rule's (the dual form runs a ``StackModel``'s declared stack, the naive loop its ``forward``):
    ``AssertionError`` naming the model."""
    registrar_smoke_test("inner_model", model)
    mismatch = check_stack_on_random_weights(model, head_dim)
    if mismatch is not None:
        raise AssertionError(
            f"{mismatch}: the dual form runs the stack and the naive loop runs forward, so every "
            "rule would disagree with it (check_inner_model names this too)"
        )


def _check_given_loss(
    loss: InnerLoss, heads: int = 2, head_dim: int = 3, tolerance: float = FLOAT64_TOLERANCE
) -> None:
    """A loss a caller gave :func:`check_update_rule` or :func:`check_inner_model`, checked where its mistake would read as the
    rule's (a rule runs ``token_loss_grad``, the naive loop autograd of ``token_loss``; a rule and the
    loop would draw different noise): its closed form
    against autograd, and its pairs a function of their inputs (no fresh noise, no writes into them),
    ``AssertionError`` naming the loss. ``heads`` and ``head_dim``: the caller's (a loss may take one
    head dim only); ``tolerance``: the caller's (a closed form within it of autograd passes the rule's
    check, so it is not refused here)."""
    registrar_smoke_test("inner_loss", loss)
    generator = torch.Generator().manual_seed(0)
    shape = (2, heads, 6, head_dim)
    views = Views(*(torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(3)))
    check_pairs_deterministic(loss, views, loss.init_carry(2, heads, head_dim, views.key))
    target = torch.randn(shape, generator=generator, dtype=torch.float64)
    scales = torch.logspace(-2, 2, target.shape[2], dtype=torch.float64)[:, None]
    noise = torch.randn(target.shape, generator=generator, dtype=torch.float64)
    check_loss_gradient(loss, target + scales * noise, target, tolerance)


def _given_size(value: Any, default: int) -> int:
    """A size the caller gave (``heads``, ``head_dim``) as an int when it is an integer >= 1
    (:func:`as_integer`: a numpy one too), else ``default``: :func:`make_problem` names a wrong one."""
    size = as_integer(value)
    return size if size is not None and size >= 1 else default


def _losses_to_check(
    loss: InnerLoss | str | None, problem_kwargs: dict[str, Any], tolerance: float = FLOAT64_TOLERANCE
) -> list[InnerLoss]:
    """``loss`` (an instance or a registered name) as a list of one, checked at the ``heads`` and
    ``head_dim`` of ``problem_kwargs`` (when given as integers: :func:`as_integer`, a numpy one too) and
    the caller's ``tolerance``; every built-in loss when None."""
    from innerloop.registry import get_registry

    if loss is not None:
        given = _named("inner_loss", loss)
        if not _is_builtin("inner_loss", given):  # a plugin's own mistake named as its, not the rule's
            heads, head_dim = (
                _given_size(problem_kwargs.get(k), d) for k, d in (("heads", 2), ("head_dim", 3))
            )
            _check_given_loss(given, heads, head_dim, tolerance)
        return [given]
    return [get_registry().inner_loss(name) for name in BUILTIN_LOSSES]


def _default_check_shapes(
    wrapping: dict, given: dict, first_model: bool = True
) -> list[tuple[dict[str, int], dict]]:
    """The shapes (and wrappings) :func:`check_update_rule` checks a rule's values at when no shape is
    given: :data:`PLUGIN_CHECK_SHAPES` in ``wrapping``, :data:`UNIT_CHECK_SHAPE` in the ``given``
    wrapping, else :data:`UNIT_CHECK_WRAPPING`, and :data:`ONE_TOKEN_MINI_BATCH_SHAPE` in ``wrapping``;
    on the ``first_model``, :data:`WIDE_MINI_BATCH_SHAPE` and :data:`MINI_BATCH_LONGER_THAN_CALL_SHAPE`
    too (in ``wrapping``; on the first model only, as the no-grad modes at these shapes: their cost)."""
    unit = {**UNIT_CHECK_WRAPPING, **given}
    shapes = [*((shape, wrapping) for shape in PLUGIN_CHECK_SHAPES), (UNIT_CHECK_SHAPE, unit)]
    shapes.append((ONE_TOKEN_MINI_BATCH_SHAPE, wrapping))
    if first_model:
        shapes += [(WIDE_MINI_BATCH_SHAPE, wrapping), (MINI_BATCH_LONGER_THAN_CALL_SHAPE, wrapping)]
    return shapes


def _wrappings_to_check(problem_kwargs: dict) -> tuple[dict, list[dict], list[dict]]:
    """The wrapping ``norm`` / ``residual`` given in ``problem_kwargs`` (popped from it), the wrappings
    :func:`check_update_rule` checks every model and loss with (:data:`WRAPPINGS`, or the given one) and
    the mixed ones it checks on the first (:data:`MIXED_WRAPPINGS`; none when one is given)."""
    given = {k: problem_kwargs.pop(k) for k in ("norm", "residual") if k in problem_kwargs}
    wrappings = [dict(zip(("norm", "residual"), w, strict=True)) for w in WRAPPINGS] if not given else [given]
    mixed = [] if given else [dict(zip(("norm", "residual"), w, strict=True)) for w in MIXED_WRAPPINGS]
    return given, wrappings, mixed


def _check_default_shapes(
    check: _RuleCheck,
    model: InnerModel,
    loss: InnerLoss,
    problem_kwargs: dict,
    wrapping: dict,
    given: dict,
    without_grad: bool,
    first_model: bool = True,
) -> None:
    """Where ``problem_kwargs`` give no shape, :func:`check_update_rule`'s values at
    :func:`_default_check_shapes` (``wrapping``: the first one; ``given``: the caller's; ``first_model``:
    whether ``model`` is check_update_rule's first, which alone meets the widest shapes), and with
    ``without_grad`` (check_update_rule: on its first model), the plain rule's values under ``no_grad``
    and ``inference_mode`` there too (:func:`check_update_rule_without_grad`); then the long call
    (:func:`_check_rule_long_call`: last, so that a rule wrong at a shorter call is named by the reference's
    comparison, with its shortest repro). Before (review s53j), those
    ran at ``make_problem``'s shape only (11 tokens, K = 4, head dim 4): a fast path without autograd
    wrong past 16 tokens (an inference-only chunked form), at more heads or another head dim passed."""
    if set(problem_kwargs) & set(PLUGIN_CHECK_SHAPE):  # a shape given: that shape only
        return
    for shape, each_wrapping in _default_check_shapes(given or wrapping, given, first_model):
        options = {**problem_kwargs, **shape, **each_wrapping}
        _check_rule_on(check, model, loss, options)
        if without_grad:
            problem = make_problem(model, loss, seed=check.seed, **options).for_rule(check.rule)
            check_update_rule_without_grad(check.rule, problem, check.cut_points, check.tolerance)
    _check_rule_long_call(check, model, loss, {**problem_kwargs, **given}, first_model, without_grad)


def _check_rule_long_call(
    check: _RuleCheck,
    model: InnerModel,
    loss: InnerLoss,
    options: dict,
    first_model: bool,
    without_grad: bool,
) -> None:
    """:func:`check_update_rule`'s long call on ``model`` (no shape given): at :data:`LONG_CALL_SHAPE`, one
    call against the same tokens in pieces (:func:`check_long_call_as_pieces`), with the most the rule
    takes; on the ``first_model`` plain too, and for the richest variant there the gradients (with
    ``check.gradients``) and the values under the no-grad modes (with ``without_grad``). Without the inner
    LayerNorm (residual off unless given): over thousands of tokens its normalising of weights that a full
    reset or a strong decay brings near zero makes make_problem's problems chaotic (seed 0, dual_form with
    decay: float32 and float64 apart by O(1) from token ~640; plain, some losses and seeds too), so a right
    rule's two runs part by amplified rounding; without it they agree to ~1e-16 (every built-in rule, model,
    loss and variant, seeds 0-2). Skipped when the caller gives ``norm=True`` (a rule that needs it); at
    make_problem's rates whatever ``max_lr`` is given (the case is about the call's length, and large rates
    without the LayerNorm diverge over thousands of tokens)."""
    if options.get("norm", False):
        return
    options = {k: v for k, v in options.items() if k != "max_lr"}
    variants = rule_variants(check.rule)
    chosen = ([variants[0]] if first_model and len(variants) > 1 else []) + variants[-1:]
    wrapping = {"norm": False, "residual": options.get("residual", False)}
    for variant in chosen:
        problem_options = {**options, **LONG_CALL_SHAPE, **wrapping, **variant}
        problem = make_problem(model, loss, seed=check.seed, **problem_options).for_rule(check.rule)
        full = first_model and variant is variants[-1]
        try:
            check_long_call_as_pieces(
                check.rule, problem, check.tolerance, check.gradients and full, without_grad and full
            )
        except AssertionError as error:
            error.add_note(
                f"repro: p = {_problem_text(problem)}.for_rule(rule); check_long_call_as_pieces(rule, p)"
            )
            raise


def _refuse_variant_kwargs(function: str, problem_kwargs: dict, tolerance: Any = FLOAT64_TOLERANCE) -> float:
    """``decay`` and ``momentum`` are not the caller's to give: the check runs each variant the rule
    takes (:func:`rule_variants`). Given, they clashed with a variant's (Python's 'got multiple values'),
    or replaced it, so that a variant labelled 'decay' ran without decay and blamed the rule. Returns
    ``tolerance`` as :func:`checked_tolerance` reads it."""
    tolerance = checked_tolerance(function, tolerance)
    options = [name for name in inspect.signature(make_problem).parameters if name not in ("model", "loss")]
    unknown = sorted(set(problem_kwargs) - set(options))
    if unknown:  # else make_problem()'s own TypeError, naming a function the caller did not call
        raise TypeError(
            f"{function}() got unexpected keyword arguments {unknown}; its problem options (make_problem's): "
            f"{options}"
        )
    chosen = sorted({"decay", "momentum"} & set(problem_kwargs))
    if chosen:
        raise TypeError(
            f"{function}: {', '.join(f'{k}={problem_kwargs[k]!r}' for k in chosen)} is not a problem option "
            "here: the check runs the rule plain and with each of decay and momentum it supports "
            "(rule_variants(rule)); call make_problem(..., decay=True) to build one such problem yourself"
        )
    return tolerance


def _check_cut_points(cut_points: list[int] | None, problem_kwargs: dict) -> list[int] | None:
    """Given ``cut_points`` must cut some sequence :func:`check_update_rule` checks: a list whose every
    point lies outside ``(0, T)`` for each length ``T`` checked would check the whole sequence only.
    Returns them as ints (numpy and 0-d torch integers are taken)."""
    if cut_points is None:
        return None
    cuts = _cut_indices(cut_points, "check_update_rule")
    lengths = {as_index(problem_kwargs.get("tokens", _MAKE_PROBLEM_TOKENS))}
    if not set(problem_kwargs) & set(PLUGIN_CHECK_SHAPE):  # the wide shapes are checked too
        lengths |= {
            shape["tokens"] for shape in (*PLUGIN_CHECK_SHAPES, ONE_TOKEN_MINI_BATCH_SHAPE, UNIT_CHECK_SHAPE)
        }
    if None in lengths:
        return cuts  # make_problem names a length it cannot build
    if cuts and not any(0 < p < tokens for p in cuts for tokens in lengths if tokens is not None):
        raise ValueError(
            f"cut_points={cut_points!r} cut none of the sequences checked (lengths {sorted(lengths)}): a "
            "cut must lie strictly inside a sequence, 0 < cut < T; pass tokens= for a longer one"
        )
    return cuts


#: The bound of the rates :func:`check_update_rule` also checks a rule at (``make_problem(max_lr=...)``):
#: a layer's rates are up to ``base_lr / head_dim`` with any ``base_lr`` >= 0 (1 by default; 10 in
#: docs/science.md, at head dim 4 a rate of 2.5), linear attention's ``base_lr`` itself (1 by default),
#: DeltaNet's and Gated DeltaNet's up to 2 (``base_lr * sigmoid``, ``base_lr <= 2``). make_problem draws
#: rates in [0, 0.5) by default: a rule that clamped rates at 0.5, or stepped wrongly above 1, passed
#: every check (review s55e, s55m). At make_problem's shape with the inner LayerNorm the problem stays well
#: conditioned there: the naive loop's float32 error is 4e-6 at most (0.5e-6 at the default rates), over
#: the built-in rules, models, losses and gates, three seeds each.
LARGE_RATES_BOUND = 2.5


def _large_rates_bound(problem_kwargs: dict, wrapping: dict) -> float:
    """The ``max_lr`` of :func:`check_update_rule`'s large-rates case: :data:`LARGE_RATES_BOUND` with the
    inner LayerNorm; without it ``LARGE_RATES_BOUND / (1 + head_dim)`` (0.5 at head dim 4, 5 times the
    default draw's bound there, not over the mini-batch size), as a layer's reach ``base_lr / head_dim``:
    nothing bounds the inner model's outputs, and at rates up to 2.5 the naive loop itself diverges. Measured
    at 15 shapes of ``problems()`` and the check's, every built-in rule, model and loss, 2 seeds: the naive
    loop's float32 error <= 2.7e-5, 3 of 540 (momentum, MLP) diverged (passed over)"""
    if wrapping.get("norm", True):
        return LARGE_RATES_BOUND
    return LARGE_RATES_BOUND / (1 + _given_size(problem_kwargs.get("head_dim"), 4))


def _check_rule_at_large_rates(
    check: _RuleCheck,
    model: InnerModel,
    losses: list[InnerLoss],
    problem_kwargs: dict,
    wrappings: list[dict],
    first: bool,
) -> None:
    """:func:`check_update_rule`'s large-rates case on ``model``: rates in [0, :func:`_large_rates_bound`)
    (:data:`LARGE_RATES_BOUND` with the inner LayerNorm), at the given shape or make_problem's, unless the
    caller gives ``max_lr`` (every problem is then drawn below it, in its place). With each loss in the
    first of ``wrappings``, the values of the most the rule takes (whole and cut); on the ``first`` model
    and loss, in every wrapping, the values of every variant and, with ``check.gradients``, the gradients
    of the most the rule takes. A problem whose reference itself is not finite there (an MLP read a token
    at a time over many tokens without the LayerNorm) is passed over: the default rates check it. Before
    (review s56i) it ran on the first model and loss only, at make_problem's shape with the LayerNorm: a
    rule wrong at large rates for another loss, without the LayerNorm or at the caller's shape passed."""
    if "max_lr" in problem_kwargs:
        return
    for loss_index, loss in enumerate(losses):
        full = first and loss_index == 0
        for wrapping in wrappings if full else wrappings[:1]:
            max_lr = _large_rates_bound(problem_kwargs, wrapping)
            try:
                _check_large_rates_case(
                    check, model, loss, {**problem_kwargs, **wrapping, "max_lr": max_lr}, full
                )
            except ReferenceDivergedError:  # past what the reference computes: the default rates check it
                continue
            # the rule's own error or a failed comparison: said where, and the way out
            except Exception as err:
                err.add_note(
                    f"check_update_rule: this is its large-rates case, inner learning rates in [0, {max_lr:g}) "
                    "(LARGE_RATES_BOUND; a layer's reach base_lr / head_dim). A rule defined only for smaller rates "
                    "(its documented domain) is checked within it by passing that bound: check_update_rule(rule, "
                    "max_lr=...), which every problem then draws its rates below."
                )
                raise


def _check_large_rates_case(
    check: _RuleCheck, model: InnerModel, loss: InnerLoss, options: dict, full: bool
) -> None:
    """One case of :func:`_check_rule_at_large_rates` (``options``: the problem's, ``max_lr`` set): the
    values of every variant and the gradients (``full``), else the values of the most the rule takes."""
    richest = rule_variants(check.rule)[-1:]
    _check_rule_on(check, model, loss, options, None if full else richest)
    if full and check.gradients:
        problem = make_problem(model, loss, seed=check.seed, **richest[0], **options).for_rule(check.rule)
        with _repro_noted(problem):
            check_update_rule_gradients_match_naive(check.rule, problem, check.tolerance, check.cut_points)


def _check_rule_on_first(
    check: _RuleCheck, model: InnerModel, losses: list[InnerLoss], mixed: list[dict], options: dict
) -> None:
    """:func:`check_update_rule`'s checks on its first model (``options``: the problem's, with the first
    wrapping): the ``mixed`` wrappings with the first loss, and float32 (unless the problem's dtype is
    given) with every loss (a rule that rounds one loss's outputs through a lower precision is met there);
    then the gate as ``decay_log`` and a state far into a sequence, with the first loss."""
    for wrapping in mixed:
        _check_rule_on(check, model, losses[0], {**options, **wrapping})
    if "dtype" not in options:  # layers run their rules in float32
        for loss in losses:
            check_update_rule_in_float32(check.rule, model, loss, check.cut_points, check.seed, options)
    _check_rule_log_gate(check, model, losses[0], options)
    _check_rule_far_into_sequence(check, model, losses[0], options)


#: How many mini-batches into a sequence :func:`check_update_rule` also starts a call: about
#: half a million tokens, a long-context prefill or a long generation (beyond a table sized for 4096 or
#: 65536 positions, and an int16 position).
FAR_MINI_BATCHES = 100_003


def _check_rule_log_gate(check: _RuleCheck, model: InnerModel, loss: InnerLoss, options: dict) -> None:
    """A rule that forgets and names ``decay_log`` (the built-ins do), given its gate as ``decay_log =
    log(1 - decay)`` (as Gated DeltaNet and Titans give it), whole and cut, equals its reference given
    ``decay``: every other check gives the gate as ``decay``, which left the log path unchecked."""
    rule = check.rule
    if not (rule.supports_decay and takes_decay_log(rule)):
        return
    for momentum in (False, True) if rule.supports_momentum else (False,):
        problem = make_problem(model, loss, seed=check.seed, decay=True, momentum=momentum, **options)
        problem = problem.for_rule(rule)
        expected_out, expected_state = finite_expected(problem, rule, check.seed)
        as_log = replace(problem, decay=None, decay_log=torch.log1p(-problem.decay))  # -inf: the full reset
        for cuts in ([], default_cuts(problem) if check.cut_points is None else check.cut_points):
            what = (
                f"{rule.name} ({model.name}, {loss.name}, the gate as decay_log = log(1 - decay)"
                f"{', momentum' if momentum else ''}) vs {reference_name(rule)} given decay, at "
                f"{_shape_text(problem)}, cut at {cuts}"
            )
            out, state = run_in_chunks(rule, as_log, cuts, what)
            reference_problem = {**options, "decay": True, "momentum": momentum}  # the gate given as decay
            _assert_close_allowing_rounding(
                (out, state), (expected_out, expected_state), what, check, model, loss, reference_problem
            )


def _check_rule_far_into_sequence(
    check: _RuleCheck, model: InnerModel, loss: InnerLoss, options: dict
) -> None:
    """The rule from a state :data:`FAR_MINI_BATCHES` mini-batches into its sequence (every variant it
    takes; whole and cut where ``check`` says) equals its reference from that state.
    A rule reads the position only modulo the mini-batch size; every other check starts at position 0
    and runs at most 150 tokens against the reference (the long call, :data:`LONG_CALL_SHAPE`, against
    the rule itself in pieces), so a rule wrong only past some position (a per-position table, a
    position kept in a narrow type) passed them all (review s48l)."""
    rule = check.rule
    for variant in rule_variants(rule):
        problem = make_problem(model, loss, seed=check.seed, **variant, **options).for_rule(rule)
        far = FAR_MINI_BATCHES * problem.task.mini_batch_size
        problem = replace(problem, state=replace(problem.state, position=far))
        expected_out, expected_state = finite_expected(problem, rule, check.seed)
        given = ", ".join(name for name, on in variant.items() if on) or "plain"
        for cuts in ([], default_cuts(problem) if check.cut_points is None else check.cut_points):
            what = (
                f"{rule.name} ({model.name}, {loss.name}, {given}) from a state at position {far} vs "
                f"{reference_name(rule)} from it, at {_shape_text(problem)}, cut at {cuts}"
            )
            out, state = run_in_chunks(rule, problem, cuts, what)
            _assert_close_allowing_rounding(
                (out, state), (expected_out, expected_state), what, check, model, loss, {**variant, **options}
            )


#: The shape :func:`check_update_rule` also runs a rule at when no shape is given, on every model (first
#: loss and wrapping): one call of 2063 tokens (past 2048, a layer's ``inference_chunk_size`` and a usual
#: training length, and past 64 mini-batches of 32; ending mid-mini-batch), compared with the same tokens
#: in pieces of at most :data:`LONG_CALL_PIECE` tokens (:func:`check_long_call_as_pieces`). Every other
#: shape runs at most 150 tokens: a rule wrong only for longer calls (an internal block of 256 or 1024
#: tokens that drops its carry, a cumulative sum kept in a narrow type) passed them all (review s61).
LONG_CALL_SHAPE: dict[str, int] = {
    "batch": 2,
    "heads": 2,
    "head_dim": 3,
    "tokens": 2063,
    "mini_batch_size": 64,
}

#: The longest piece :func:`check_long_call_as_pieces` feeds a long call's tokens in: no longer than the
#: calls :data:`LONG_CHECK_SHAPE` checks against the reference, and not a multiple of any mini-batch size
#: above 1 (each piece after the first starts inside a mini-batch).
LONG_CALL_PIECE = 149


def check_long_call_as_pieces(
    rule: UpdateRule | str,
    problem: InnerProblem,
    tolerance: float = FLOAT64_TOLERANCE,
    gradients: bool = True,
    without_grad: bool = True,
) -> None:
    """``rule`` over ``problem``'s tokens in one call equals it fed the same tokens in pieces of at most
    :data:`LONG_CALL_PIECE` tokens, each continuing the state the one before returned: outputs, final
    state and (with ``gradients``) the gradients w.r.t. every input (:func:`_differentiable_inputs`),
    and (with ``without_grad``) the one call's values under ``torch.no_grad()`` and
    ``torch.inference_mode()`` too. The pieces are what the reference checks (calls of up to 150 tokens,
    whole and cut); the naive loop itself, a token at a time with autograd, costs ~2 ms a token, too slow
    for a call of thousands: so a rule wrong only for long calls is caught by this comparison, one wrong
    for every call from some position on is not (the far-position check meets that)."""
    rule = _named("update_rule", rule)
    tolerance = checked_tolerance("check_long_call_as_pieces", tolerance)
    tokens = problem.views.query.shape[2]
    cuts = list(range(LONG_CALL_PIECE, tokens, LONG_CALL_PIECE))
    what = f"{rule.name} ({problem.task.model.name}, {problem.task.loss.name}, {_options_text(problem)})"
    wanted = f"in pieces of at most {LONG_CALL_PIECE} tokens (cut at {cuts[:3]}...{cuts[-1:]})"
    one = f"{what} in one call of {tokens} tokens"
    pieces: list[tuple[torch.Tensor, TTTState]] = []

    def compare(how: str, out: torch.Tensor, state: TTTState) -> None:  # the first run: the pieces
        if not pieces:
            pieces.append((out.detach(), state.detach()))
            return
        told = f"{what} {how.rstrip(', ')} vs {wanted}, at {_shape_text(problem)}"
        assert_close(out, pieces[0][0], told, tolerance)
        assert_states_close(state, pieces[0][1], told, tolerance)

    runs = {
        "in pieces, ": lambda ruled: run_in_chunks(rule, ruled, cuts, f"{what} {wanted}"),
        f"in one call of {tokens} tokens, ": lambda ruled: run_in_chunks(rule, ruled, [], one),
    }
    if gradients:  # one forward each for the values and the gradients
        _assert_gradients_alike(problem, runs, f"that {wanted}", rule.name, tolerance, compare)
    else:
        for how, run in runs.items():
            compare(how, *run(problem))
    for label, mode in NO_GRAD_MODES if without_grad else ():
        with mode():
            out, state = run_in_chunks(rule, problem, [], f"{one} under {label}")
        compare(f"in one call of {tokens} tokens under {label}", out, state)


def _check_rule_without_grad(
    check: _RuleCheck, model: InnerModel, losses: list[InnerLoss], mixed: list[dict], options: dict
) -> None:
    """The modes without autograd on one model, with every loss, plain and with the rule's decay and
    momentum, and with the first loss in each ``mixed`` wrapping: a fast path taken without autograd
    (evaluation, generation) that drops the loss's carry, the decay or the residual is met there."""
    rule = check.rule
    variants = rule_variants(rule)[:1] + rule_variants(rule)[1:][-1:]  # plain; all the rule takes
    runs = [(each, {**variant, **options}) for each in losses for variant in variants]
    runs += [(losses[0], {**options, **wrapping}) for wrapping in mixed]
    for each, each_options in runs:
        problem = make_problem(model, each, seed=check.seed, **each_options).for_rule(rule)
        check_update_rule_without_grad(rule, problem, check.cut_points, check.tolerance)


def _models_for(rule: UpdateRule, model: InnerModel | str | None, head_dim: Any = None) -> list[InnerModel]:
    """The models :func:`check_update_rule` checks ``rule`` on: ``model`` (an instance or a registered
    name), or every built-in model the rule accepts, ``linear`` first (as registration does: what a
    plugin's tests check does not depend on which other plugins are installed). A given plugin model is
    checked first (:func:`_check_given_model`, at the caller's ``head_dim`` when it is an integer)."""
    from innerloop.registry import get_registry
    from innerloop.registry.manager import BUILTIN_PREFIX

    registry = get_registry()
    if model is not None:
        given = _named("inner_model", model)
        refusal = model_refusal(rule, given)
        if refusal is not None:  # the rule would fail inside its own forward, with a raw error
            raise ValueError(
                f"update rule {rule.name!r} refuses inner model {given.name!r} (its check_model: {refusal}); "
                "check it with a model it accepts"
            )
        if not _is_builtin("inner_model", given):  # a plugin's own mistake named as its, not the rule's
            _check_given_model(given, _given_size(head_dim, 5))
        return [given]
    builtins = [e.name for e in registry.entries("inner_model") if e.origin.startswith(BUILTIN_PREFIX)]
    names = sorted(builtins, key=lambda n: (n != "linear", n))
    accepted = [m for m in (registry.inner_model(n) for n in names) if model_refusal(rule, m) is None]
    if not accepted:
        raise ValueError(
            f"update rule {rule.name!r} accepts none of the built-in inner models {names} (its check_model "
            "refuses each): pass the model it is written for, check_update_rule(rule, model=MyModel())"
        )
    return accepted


def _check_rule_with(
    check: _RuleCheck,
    model: InnerModel,
    losses: list[InnerLoss],
    wrappings: list[dict],
    gradients: bool,
    problem_kwargs: dict,
) -> None:
    """:func:`check_update_rule` on one model: each loss and wrapping, values, zero decay and momentum
    and (with ``gradients``) the gradients, zero learning rates (first loss and wrapping), and a declared reference's against finite differences
    (:func:`check_reference_gradients`)."""
    rule, seed, tolerance = check.rule, check.seed, check.tolerance
    for each_loss in losses:
        for wrapping in wrappings:
            options = {**problem_kwargs, **wrapping}
            _check_rule_on(check, model, each_loss, options)
            check_zero_decay_and_momentum(rule, model, each_loss, seed=seed, tolerance=tolerance, **options)
            if gradients:
                variant = rule_variants(rule)[-1]  # the most the rule takes
                problem = make_problem(model, each_loss, seed=seed, **variant, **options).for_rule(rule)
                with _repro_noted(problem):
                    check_update_rule_gradients_match_naive(rule, problem, tolerance, check.cut_points)
    gates = rule_variants(rule)[-1]  # the most the rule takes; lr 0 (base_lr=0), first loss and wrapping
    check_zero_learning_rate(
        rule, model, losses[0], seed, tolerance, **gates, **problem_kwargs, **wrappings[0]
    )
    if gradients and getattr(rule, "reference", None) is not None:  # a reference the rule wrote itself
        check_reference_gradients(rule, model, losses[0], seed, **problem_kwargs, **wrappings[0])


def _check_rule_on(
    check: _RuleCheck,
    model: InnerModel,
    loss: InnerLoss,
    problem_kwargs: dict,
    variants: list[dict[str, bool]] | None = None,
) -> None:
    """The values half of :func:`check_update_rule` for one model, loss and wrapping: each of ``variants``
    (by default every one the rule takes, :func:`rule_variants`)."""
    rule, cut_points, seed = check.rule, check.cut_points, check.seed
    wrapping = ", ".join(f"{k}={problem_kwargs[k]}" for k in ("norm", "residual") if k in problem_kwargs)
    max_lr = problem_kwargs.get("max_lr")
    rates = "" if max_lr is None else f", rates in [0, {max_lr:g})"
    for variant in rule_variants(rule) if variants is None else variants:
        options = {**variant, **problem_kwargs}
        problem = make_problem(model, loss, seed=seed, **options).for_rule(rule)
        expected_out, expected_state = finite_expected(problem, rule, seed)
        cuts_of_variant = default_cuts(problem) if cut_points is None else cut_points
        given = ", ".join(name for name, on in variant.items() if on) or "plain"
        untouched = problem.state.clone()
        for cuts in ([], cuts_of_variant):
            what = (
                f"{rule.name} ({model.name}, {loss.name}, {given}{', ' + wrapping if wrapping else ''}) "
                f"vs {reference_name(rule)} at {_shape_text(problem)}{rates}, cut at {cuts}"
            )
            with _repro_noted(problem, cuts):
                out, state = run_in_chunks(rule, problem, cuts, what)
                assert_state_unchanged(problem.state, untouched, f"{what}: the rule")
                _assert_close_allowing_rounding(
                    (out, state), (expected_out, expected_state), what, check, model, loss, options
                )


def _shape_text(problem: InnerProblem) -> str:
    """``problem``'s shape for a message, e.g. ``B=1 H=1 T=9 f=1 K=1``."""
    batch, heads, tokens, width = problem.views.query.shape
    return f"B={batch} H={heads} T={tokens} f={width} K={problem.task.mini_batch_size}"


@contextmanager
def _repro_noted(problem: InnerProblem, cuts: list[int] | None = None) -> Iterator[None]:
    """An ``AssertionError`` raised inside, noted (PEP 678, shown with the traceback) with one line that
    builds ``problem`` again, its seed and ``max_lr`` included, and computes what was compared: the rule
    ``cut`` at ``cuts`` against its reference, or (``cuts`` None) the gradients against the naive loop's."""
    try:
        yield
    except AssertionError as error:
        build = f"p = {_problem_text(problem)}.for_rule(rule)"
        if cuts is None:
            error.add_note(f"repro: {build}; check_update_rule_gradients_match_naive(rule, p)")
        else:
            error.add_note(f"repro: {build}; out, state = run_in_chunks(rule, p, {cuts}) vs p.expected(rule)")
        raise


#: A problem that amplifies rounding (an ill-conditioned inner model, a long sequence) moves a correct
#: rule's float64 numbers from its reference's by about the reference's own float32 error times the ratio
#: of the two roundoffs (2^-53 / 2^-24): :func:`check_update_rule` allows this many times that, when it
#: exceeds its ``tolerance``. A wrong rule (a missing factor, a detached term) is off by far more.
FLOAT64_CONDITIONING_FACTOR = 100.0
FLOAT64_PER_FLOAT32 = 2.0**-29


def _assert_close_to_reference(
    out: torch.Tensor,
    state: TTTState,
    expected_out: torch.Tensor,
    expected_state: TTTState,
    what: str,
    tolerance: float,
    float32_error: float,
) -> None:
    """Outputs and state within ``tolerance`` of the reference's, or within what the problem's own
    amplification of rounding (``float32_error``: the reference's in float32) explains in float64."""
    allowed = max(tolerance, FLOAT64_CONDITIONING_FACTOR * float32_error * FLOAT64_PER_FLOAT32)
    note = (
        f" (allowed: {tolerance:.1e}, or {FLOAT64_CONDITIONING_FACTOR:g}x the reference's own float32 error "
        f"{float32_error:.1e} scaled to float64's roundoff)"
    )
    assert_close(out, expected_out, what + note, allowed)
    assert_states_close(state, expected_state, what + note, allowed)


def _assert_close_allowing_rounding(
    got: tuple[torch.Tensor, TTTState],
    expected: tuple[torch.Tensor, TTTState],
    what: str,
    check: _RuleCheck,
    model: InnerModel,
    loss: InnerLoss,
    options: dict,
) -> None:
    """:func:`_assert_close_to_reference` of ``check``'s rule at ``check.tolerance``; where the numbers are
    not that close, the reference's own float32 error on the problem ``options`` make is measured (only
    then: it runs the reference again) and allowed as every value check allows it."""
    (out, state), (expected_out, expected_state) = got, expected
    if _states_and_outputs_close(out, state, expected_out, expected_state, check.tolerance):
        return
    float32_error = _reference_float32_error(check.rule, model, loss, check.seed, options, expected)
    _assert_close_to_reference(out, state, expected_out, expected_state, what, check.tolerance, float32_error)


def _states_and_outputs_close(
    out: torch.Tensor, state: TTTState, expected_out: torch.Tensor, expected_state: TTTState, tolerance: float
) -> bool:
    try:
        assert_close(out, expected_out, "", tolerance)
        assert_states_close(state, expected_state, "", tolerance)
    except AssertionError:
        return False
    return True


def _reference_float32_error(
    rule: UpdateRule,
    model: InnerModel,
    loss: InnerLoss,
    seed: int,
    options: dict,
    expected: tuple[torch.Tensor, TTTState],
) -> float:
    """The largest relative error of what ``rule`` is compared with, run in float32 on the same problem
    rounded to float32, against its float64 numbers ``expected`` (outputs and every tensor of the final
    state, as check_kernel measures it): how much the problem amplifies rounding. The state's pending sums
    can amplify it 10x more than the outputs (a tanh stack with decay: 2.9e-2 against 2.3e-3)."""
    low = make_problem(model, loss, seed=seed, **{**options, "dtype": torch.float32}).for_rule(rule)
    low_out, low_state = low.expected(rule)
    expected_out, expected_state = expected
    errors = [relative_error(low_out, expected_out)]
    for group in COMPARED_STATE_GROUPS:
        wanted = getattr(expected_state, group)
        errors += [relative_error(getattr(low_state, group)[name], wanted[name]) for name in wanted]
    if not all(math.isfinite(error) for error in errors):
        return 0.0  # an overflow in float32 widens nothing
    return min(max(errors), 1.0)


#: How far :func:`check_update_rule_in_float32` lets a rule's float32 numbers be from float64: this many
#: times the float32 error of what the rule is compared with (its reference, or the naive loop) ...
FLOAT32_ERROR_FACTOR = 100.0
#: ... and at least this relative error.
FLOAT32_ERROR_FLOOR = 1e-5


def check_update_rule_in_float32(
    rule: UpdateRule,
    model: InnerModel,
    loss: InnerLoss,
    cut_points: list[int] | None = None,
    seed: int = 0,
    problem_kwargs: dict | None = None,
) -> None:
    """``rule`` in float32, whole and cut, against the float64 numbers of what it is compared with: within
    :data:`FLOAT32_ERROR_FACTOR` times that reference's own float32 error (at least
    :data:`FLOAT32_ERROR_FLOOR`). A layer runs its rule in float32 (the default dtype, and under autocast):
    a rule right in float64 only (a dtype-dependent branch, a constant rounded to float32) is caught."""
    options = {k: v for k, v in (problem_kwargs or {}).items() if k != "dtype"}
    exact = make_problem(model, loss, seed=seed, **options).for_rule(rule)
    low = make_problem(model, loss, seed=seed, dtype=torch.float32, **options).for_rule(rule)
    expected_out, expected_state = finite_expected(exact, rule, seed)
    reference_error = relative_error(low.expected(rule)[0], expected_out)
    allowed = max(FLOAT32_ERROR_FACTOR * reference_error, FLOAT32_ERROR_FLOOR)
    for cuts in ([], default_cuts(low) if cut_points is None else cut_points):
        what = (
            f"{rule.name} ({model.name}, {loss.name}) in float32 vs {reference_name(rule)} in float64, cut at "
            f"{cuts} (allowed: {FLOAT32_ERROR_FACTOR:g}x the reference's own float32 error, {reference_error:.1e})"
        )
        out, state = run_in_chunks(rule, low, cuts, what)
        assert_close(out, expected_out, what, allowed)
        assert_states_close(state, expected_state, what, allowed)


def default_cuts(problem: InnerProblem) -> list[int]:
    """Where :func:`check_update_rule` cuts ``problem``'s sequence by default: inside, at and across
    mini-batch boundaries, before the last token, and at each of the ``k`` tokens after ``k + 2`` (one-token
    chunks), so that a chunk starts at every offset of a mini-batch where the sequence is long enough."""
    tokens, k = problem.views.query.shape[2], problem.task.mini_batch_size
    every_offset = range(k + 3, 2 * k + 3)
    return sorted(c for c in {1, max(1, k - 1), k, k + 2, tokens - 1, *every_offset} if 0 < c < tokens)


class RaisedWithoutGradError(AssertionError):
    """An update rule that runs with autograd on raised under ``torch.no_grad()`` or
    ``torch.inference_mode()`` (:func:`check_update_rule_without_grad`): a layer with it fails, loudly,
    in evaluation and generation. Registration skips such a problem, as it skips any the rule refuses
    to run; its wrong values there are refused."""


#: The modes a layer runs its rule in without autograd (evaluation, generation, a prefill), by name.
NO_GRAD_MODES: tuple[tuple[str, type], ...] = (
    ("torch.no_grad()", torch.no_grad),
    ("torch.inference_mode()", torch.inference_mode),
)


def _options_text(problem: InnerProblem) -> str:
    """``problem``'s wrapping and variant for a message, e.g. ``norm=True, residual=False, decay``."""
    given = [name for name in ("decay", "momentum") if getattr(problem, name) is not None]
    task = problem.task
    return ", ".join([f"norm={task.norm_weight is not None}", f"residual={task.residual}", *given])


def check_update_rule_without_grad(
    rule: UpdateRule,
    problem: InnerProblem,
    cut_points: list[int] | None = None,
    tolerance: float = FLOAT64_TOLERANCE,
) -> None:
    """``rule`` on ``problem`` under each of :data:`NO_GRAD_MODES` (``torch.no_grad()``,
    ``torch.inference_mode()``: evaluation, generation, a prefill) equals what it must compute
    (:meth:`InnerProblem.expected`), whole and cut at ``cut_points`` (default: :func:`default_cuts`);
    forward only. A fast path taken only without autograd (``if not torch.is_grad_enabled()``) is
    otherwise never run by the checks, which compare values with autograd on. A rule that raises in
    one of these modes fails with :class:`RaisedWithoutGradError`."""
    expected_out, expected_state = finite_expected(problem, rule)
    task = problem.task
    untouched = problem.state.clone()
    for label, mode in NO_GRAD_MODES:
        for cuts in ([], default_cuts(problem) if cut_points is None else cut_points):
            what = (
                f"{rule.name} ({task.model.name}, {task.loss.name}, {_options_text(problem)}) under {label} "
                f"vs {reference_name(rule)}, cut at {cuts}"
            )
            try:
                with mode():
                    out, state = run_in_chunks(rule, problem, cuts, what)
            except (RuleOutputError, StateWrittenError):
                raise
            except Exception as error:  # a rule that runs with autograd on must run without it too
                raise RaisedWithoutGradError(
                    f"{what}: forward raised {error!r}; a layer runs its rule so in evaluation and generation "
                    "(torch.autograd.grad cannot run under torch.inference_mode: take the inner gradients with "
                    "torch.func, as minibatch_gd does)"
                ) from error
            # a rule may write into the state it was given only without autograd (a fast path)
            assert_state_unchanged(problem.state, untouched, f"{what}: the rule")
            assert_close(out, expected_out, what, tolerance)
            assert_states_close(state, expected_state, what, tolerance)


def check_update_rule_gradients_match_naive(
    rule: UpdateRule,
    problem: InnerProblem,
    tolerance: float = FLOAT64_TOLERANCE,
    cut_points: list[int] | None = None,
) -> None:
    """The gradients of a random projection of ``rule``'s outputs and final weights on ``problem``
    w.r.t. every input it takes equal those of the naive loop (which autograd differentiates token
    by token), with the rule run over the whole sequence in one call and cut at ``cut_points``
    (:func:`default_cuts` when None), each chunk continuing the state the one before returned: a rule
    that detaches the lr, the initial weights or anything else, or differentiates a part wrongly,
    trains wrongly even when its forward values are right, and one that detaches what it is given in
    a carried state (its weights, pending sums, momentum, decay product or loss carry) trains wrongly
    through a state carried between calls."""
    cuts = default_cuts(problem) if cut_points is None else cut_points
    runs = {
        "": lambda ruled: finite_expected(ruled, rule),
        "whole, ": lambda ruled: ruled.run(rule),
        f"cut at {cuts}, ": lambda ruled: run_in_chunks(rule, ruled, cuts),
    }
    _assert_gradients_alike(problem, runs, f"that of {reference_name(rule)}", rule.name, tolerance)


def _assert_gradients_alike(
    problem: InnerProblem,
    runs: dict[str, Callable[[InnerProblem], tuple[torch.Tensor, TTTState]]],
    wanted_of: str,
    who: str,
    tolerance: float,
    on_run: Callable[[str, torch.Tensor, TTTState], None] | None = None,
) -> None:
    """The gradients of one random projection of the outputs and final weights of each of ``runs`` (each
    given ``problem`` with every differentiable input a leaf, :func:`_differentiable_inputs`) equal those
    of the first run (named ``wanted_of`` in a message), within ``tolerance``, else an AssertionError
    naming ``who``, the run (its key) and the input. ``on_run(key, outputs, state)``, if given, sees each
    run's values first (one forward serves a values check too)."""
    inputs = _differentiable_inputs(problem)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
    ruled = _with_inputs(problem, leaves)
    generator = torch.Generator().manual_seed(2)
    gradients, probes = {}, None
    with torch.enable_grad():
        for how, run in runs.items():
            out, state = run(ruled)
            if on_run is not None:
                on_run(how, out, state)
            outputs = [out, *state.current_weights(ruled.tau).values()]
            if probes is None:
                probes = [torch.randn(o.shape, generator=generator, dtype=o.dtype) for o in outputs]
            total = sum((o * p).sum() for o, p in zip(outputs, probes, strict=True))
            grads = torch.autograd.grad(total, list(leaves.values()), allow_unused=True)
            gradients[how] = [
                torch.zeros_like(v) if g is None else g for g, v in zip(grads, leaves.values(), strict=True)
            ]
    wanted = gradients.pop(next(iter(runs)))
    task = problem.task
    for how, got in gradients.items():
        for name, got_one, wanted_one in zip(leaves, got, wanted, strict=True):
            what = (
                f"{who} ({task.model.name}, {task.loss.name}, {how}{_shape_text(problem)}): "
                f"gradient w.r.t. {name} vs {wanted_of}"
            )
            assert_close(got_one, wanted_one, what, tolerance)


def _differentiable_inputs(problem: InnerProblem) -> dict[str, torch.Tensor]:
    """Every tensor input of ``problem`` the outer loop differentiates, by a readable name."""
    inputs = {
        "query": problem.views.query,
        "key": problem.views.key,
        "value": problem.views.value,
        "lr": problem.lr,
    }
    inputs.update({f"initial params[{k!r}]": v for k, v in problem.state.params.items()})
    for name in ("tau", "decay", "momentum"):
        if getattr(problem, name) is not None:
            inputs[name] = getattr(problem, name)
    for name in ("norm_weight", "norm_bias"):
        if getattr(problem.task, name) is not None:
            inputs[name] = getattr(problem.task, name)
    return inputs


def _with_inputs(problem: InnerProblem, leaves: dict[str, torch.Tensor]) -> InnerProblem:
    """``problem`` with the inputs named as in :func:`_differentiable_inputs` replaced by ``leaves``."""
    params = {k: leaves[f"initial params[{k!r}]"] for k in problem.state.params}
    views = Views(leaves["query"], leaves["key"], leaves["value"])
    norms = {k: leaves[k] for k in ("norm_weight", "norm_bias") if k in leaves}
    extras = {k: leaves[k] for k in ("tau", "decay", "momentum") if k in leaves}
    return replace(
        problem,
        state=replace(problem.state, params=params),
        task=replace(problem.task, **norms),
        views=views,
        lr=leaves["lr"],
        **extras,
    )


@with_autograd
def check_zero_decay_and_momentum(
    rule: UpdateRule | str,
    model: InnerModel | str,
    loss: InnerLoss | str,
    seed: int = 0,
    tolerance: float = FLOAT64_TOLERANCE,
    **problem_kwargs: Any,
) -> None:
    """Where ``rule`` takes them, a decay of 0 and a momentum of 0 give the plain rule's outputs and
    weights (the returned state then also carries the zero-decay product and the momentum). Each
    plugin may be an instance or a registered name."""
    tolerance = checked_tolerance("check_zero_decay_and_momentum", tolerance)
    rule, model, loss = _named("update_rule", rule), _named("inner_model", model), _named("inner_loss", loss)
    plain = make_problem(model, loss, seed=seed, **problem_kwargs).for_rule(rule)
    expected_out, expected_state = plain.run(rule)
    zeros = torch.zeros_like(plain.lr)
    options = {"decay": rule.supports_decay, "momentum": rule.supports_momentum}
    for name in (name for name, supported in options.items() if supported):
        out, state = replace(plain, **{name: zeros}).run(rule)
        what = f"{rule.name} ({model.name}, {loss.name}) with {name} 0 vs without {name}"
        assert_close(out, expected_out, what, tolerance)
        for key, value in expected_state.params.items():
            assert_close(state.params[key], value, f"{what}: params[{key!r}]", tolerance)
            assert_close(
                state.pending[key], expected_state.pending[key], f"{what}: pending[{key!r}]", tolerance
            )


@with_autograd
def check_zero_learning_rate(
    rule: UpdateRule | str,
    model: InnerModel | str,
    loss: InnerLoss | str,
    seed: int = 0,
    tolerance: float = FLOAT64_TOLERANCE,
    **problem_kwargs: Any,
) -> None:
    """With every inner learning rate 0 (``base_lr=0``, which turns a family member's test-time training
    off), ``rule`` equals its reference (the naive loop: no step, the weights only decayed where decay
    is given), whole and cut at :func:`default_cuts`. ``problem_kwargs`` go to :func:`make_problem`
    (``decay=True`` / ``momentum=True`` among them). Each plugin may be an instance or a registered name.

    :func:`make_problem` draws rates in (0, 0.5): a rule that divides by a rate, or by a sum of rates
    (a share of a mean, a normalised step), is exact there and NaN at 0 (review s53j)."""
    tolerance = checked_tolerance("check_zero_learning_rate", tolerance)
    rule, model, loss = _named("update_rule", rule), _named("inner_model", model), _named("inner_loss", loss)
    drawn = make_problem(model, loss, seed=seed, **problem_kwargs).for_rule(rule)
    problem = replace(drawn, lr=torch.zeros_like(drawn.lr))
    expected_out, expected_state = finite_expected(problem, rule, seed)
    for cuts in ([], default_cuts(problem)):
        what = f"{rule.name} ({model.name}, {loss.name}) with lr 0 vs {reference_name(rule)}, cut at {cuts}"
        out, state = run_in_chunks(rule, problem, cuts, what)
        assert_close(out, expected_out, what, tolerance)
        assert_states_close(state, expected_state, what, tolerance)


@with_autograd
def check_update_rule_gradients(
    rule: UpdateRule | str,
    model: InnerModel | str,
    loss: InnerLoss | str,
    seed: int = 0,
    **problem_kwargs: Any,
) -> None:
    """``torch.autograd.gradcheck`` (float64) of the rule's outputs and final weights w.r.t. the
    views, lr, the initial weights and, where the rule takes them, decay and momentum: with the rule run
    over the whole sequence in one call, and cut once with the state carried (:func:`gradcheck_cut`: a
    rule that detaches what a carried state holds is wrong there only)."""
    _refuse_variant_kwargs("check_update_rule_gradients", problem_kwargs)
    seed = checked_seed(seed)
    rule = _named("update_rule", rule)
    variant = rule_variants(rule)[-1]  # the most the rule takes
    problem = make_problem(model, loss, seed=seed, **variant, **problem_kwargs).for_rule(rule)
    _gradcheck(rule, problem, lambda ruled: ruled.run(rule), f"{rule.name} (whole)")
    cuts = gradcheck_cut(problem)
    if cuts:
        _gradcheck(
            rule, problem, lambda ruled: run_in_chunks(rule, ruled, cuts), f"{rule.name} (cut at {cuts})"
        )


def gradcheck_cut(problem: InnerProblem) -> list[int]:
    """Where :func:`check_update_rule_gradients` cuts ``problem``'s sequence for its second gradcheck: one
    token into the second mini-batch (inside the last mini-batch of a shorter sequence), so that the
    second chunk continues a state that holds updated weights and pending sums; one cut keeps the
    gradcheck's cost near twice that of the whole call. None (``[]``) for a one-token sequence."""
    tokens, k = problem.views.query.shape[2], problem.task.mini_batch_size
    return [min(k + 1, tokens - 1)] if tokens > 1 else []


def check_reference_gradients(
    rule: UpdateRule, model: InnerModel, loss: InnerLoss, seed: int = 0, **problem_kwargs: Any
) -> None:
    """A rule that declares its own ``reference``: gradcheck (float64) of that reference, as
    :func:`check_update_rule_gradients` does of the rule. The rule's gradients are compared with its
    reference's, so a ``.detach()`` (of the lr, a view, the weights) or a term left out in both passes
    that comparison: finite differences see it. The naive loop, the default reference, needs none."""
    variant = rule_variants(rule)[-1]
    problem = make_problem(model, loss, seed=seed, **variant, **problem_kwargs).for_rule(rule)
    what = f"{rule.name}: its declared reference (UpdateRule.reference), against finite differences"
    _gradcheck(rule, problem, lambda ruled: ruled.expected(rule), what)


#: How far inside [0, 1] :func:`_gradcheck` holds :func:`make_problem`'s full reset: its finite differences
#: (steps of 1e-6) then stay in the range ``ops.scan`` takes, which a rule may check. The values and the
#: gradients compared with the naive loop (:func:`check_update_rule`) are taken at the reset itself.
GRADCHECK_DECAY_MARGIN = 1e-5


def _gradcheck(
    rule: UpdateRule,
    problem: InnerProblem,
    runner: Callable[[InnerProblem], tuple[torch.Tensor, TTTState]],
    what: str,
) -> None:
    """gradcheck of ``runner(problem)``'s outputs and final weights w.r.t. the views, lr, decay and
    momentum where set, and the initial weights; an ``AssertionError`` naming ``what`` if they differ."""
    names = [k for k in ("decay", "momentum") if getattr(problem, k) is not None]
    if problem.decay is not None:  # finite differences about a full reset would step outside [0, 1]
        problem = replace(problem, decay=problem.decay.clamp_max(1.0 - GRADCHECK_DECAY_MARGIN))
    leaves = [problem.views.query, problem.views.key, problem.views.value, problem.lr]
    leaves += [getattr(problem, k) for k in names] + list(problem.state.params.values())
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]

    def run(
        query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, lr: torch.Tensor, *rest: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        extras = dict(zip(names, rest[: len(names)], strict=True))
        params = dict(zip(problem.state.params, rest[len(names) :], strict=True))
        state = replace(problem.state, params=params)
        ruled = replace(problem, state=state, views=Views(query, key, value), lr=lr, **extras)
        out, new_state = runner(ruled)
        return (out, *new_state.current_weights(ruled.tau).values())

    try:
        torch.autograd.gradcheck(run, leaves, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)
    except GradcheckError as error:
        with torch.no_grad():
            finite_expected(problem, rule)  # a reference that diverged there is named, not the rule blamed
        inputs = ", ".join(
            ["query", "key", "value", "lr", *names, *(f"weight {k}" for k in problem.state.params)]
        )
        raise AssertionError(
            f"{what}: gradients w.r.t. ({inputs}) differ from finite differences in float64 (a .detach() or "
            f"a term left out?): {str(error).strip()[:600]}"
        ) from error


__all__ = [
    "FLOAT32_PLUGIN_TOLERANCE",
    "FLOAT64_TOLERANCE",
    "REGISTRATION_TOLERANCE",
    "InnerProblem",
    "LONG_CHECK_SHAPE",
    "LARGE_RATES_BOUND",
    "EXTREME_LOG_GATES",
    "PLUGIN_CHECK_SHAPE",
    "PLUGIN_CHECK_SHAPES",
    "ONE_TOKEN_MINI_BATCH_SHAPE",
    "UNIT_CHECK_SHAPE",
    "assert_close",
    "assert_layers_train_alike",
    "assert_states_close",
    "reference_name",
    "rule_refusal",
    "check_activation_derivatives",
    "check_derivative_in_graph",
    "check_float32_like_float64",
    "check_forward_batch_independent",
    "check_forward_head_independent",
    "check_forward_leaves_inputs",
    "check_leaves_its_inputs",
    "check_forward_token_independent",
    "check_init_params_uses_generator",
    "check_inner_loss",
    "check_inner_loss_in_float32",
    "check_inner_model",
    "check_inner_model_in_float32",
    "check_loss_gradient",
    "check_model_inner_loss_batch_independent",
    "check_model_update_rule_batch_independent",
    "check_loss_gradient_at_zero_error",
    "check_pairs_batch_independent",
    "check_pairs_by_differences",
    "check_pairs_causal",
    "check_pairs_chunk_invariant",
    "check_pairs_deterministic",
    "check_pairs_head_independent",
    "check_pairs_token_by_token",
    "check_stack_matches_forward",
    "check_token_loss_per_token",
    "check_update_rule",
    "check_update_rule_gradients",
    "check_reference_gradients",
    "check_update_rule_gradients_match_naive",
    "check_update_rule_without_grad",
    "copy_views_and_carry",
    "check_rule_returns",
    "default_cuts",
    "MIXED_WRAPPINGS",
    "NO_GRAD_MODES",
    "RaisedWithoutGradError",
    "ReferenceDivergedError",
    "RuleOutputError",
    "StateWrittenError",
    "WRAPPINGS",
    "check_zero_decay_and_momentum",
    "check_zero_learning_rate",
    "make_problem",
    "registrar_smoke_test",
    "rule_variants",
    "run_in_chunks",
    "run_layer_in_chunks",
    "run_stack",
    "twin_layers",
]
