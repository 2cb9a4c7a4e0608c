"""``check_kernel``: a registered kernel against the torch path, through a layer, on every case its
first-use probe leaves out.

Dispatch's first-use probe (:mod:`innerloop.kernels.first_use`) compares a kernel with the torch path
on the first two mini-batches of the first block of each kind only, so a kernel wrong from its third
mini-batch on, in its backward, under ``torch.no_grad`` only, or for some batch rows, may still be
chosen by ``kernel="auto"``. :func:`check_kernel` settles those in a plugin's own tests: it builds two
layers with the same weights (:func:`~innerloop.testing.checks.twin_layers`), one forced onto the
kernel and one on ``kernel="torch"``, and compares them on

- calls of three and of seventeen whole mini-batches plus a partial one (more than the 4, 8 or 16
  mini-batches a kernel may tile its loop by), and of fewer tokens than a mini-batch, each in one call
  and split in several calls with the state carried between them;
- from a fresh state, from a state carried from a first call (different weights in each of the
  three batch rows, and pending sums: the call starts inside a mini-batch), and from one carried to a
  mini-batch boundary (the kernel is given the state's own weights);
- an even head dim (:class:`~innerloop.core.layer.TTTLayer`) and an odd one
  (:class:`~innerloop.core.family_layers.FamilyLayer`, which has no RoPE), three heads;
- with gradients (outputs, final state, and the gradients of a fixed random projection of both with
  respect to the input and every parameter), under ``torch.no_grad`` and under
  ``torch.inference_mode`` (outputs and final state);
- and, when the kernel has a ``decode`` step, a prefill then token-by-token decoding;
- two wide cases, with mini-batches of 32 (unless ``mini_batch_size`` is given), past a tile of 8 or
  16 tokens: 32 features, past a tile of 8 or 16 features; and 40 (no power of two, past a tile of
  32) with ``base_lr`` 2.5 (unless given: every other case runs the default 1.0);
- first of all, the large-rates case: at the first head dim, per-token rates up to
  :data:`~innerloop.testing.checks.LARGE_RATES_BOUND` (2.5; ``base_lr`` 10 at head dim 4, 2.5 on a
  ``FamilyLayer``), three and a half mini-batches from a carried state, cut, with gradients (skipped,
  saying so, when ``base_lr`` is given): every other case rated tokens below 1, so a kernel that clamped
  the rate at 1 passed (review s56v);
- the first case (and the decoding) again on layers with other weights, as after an optimizer step: a
  kernel that caches what it derives from the weights, keyed by their shape, is caught;
- for a kernel that declares ``supports_decay``, each case again with decay (but those under
  ``torch.inference_mode``, whose values are no_grad's), on a layer that forgets
  (:class:`ForgettingLayer`: every block then carries a decay, and a state a decay product);
- with ``dtype=torch.float64`` (the default), one case in float32 too (seventeen and a half mini-batches
  from a carried state, with gradients), last: layers run in float32 by default.

Outputs are compared as a whole and token by token (an error on one token in several is not averaged
away), and the state each call is given must be unchanged after it (a :class:`TTTState` is immutable:
a kernel that writes its new weights into the ones it was given corrupts a state a caller reuses).

A case the kernel refuses (its ``verify``, or what its :class:`~innerloop.kernels.spec.KernelSpec`
declares: a training-only path, no decode step, ...) is skipped and the report says why; a case with no
whole mini-batch for the kernel is compared all the same. If the kernel computed nothing in any case,
the check fails: a kernel that refuses everything is not checked.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from innerloop.core.family_layers import REFUSED_TTT_OPTIONS, FamilyLayer
from innerloop.core.functional import as_integer, relative_error
from innerloop.core.layer import TTTLayer
from innerloop.core.state import TTTState
from innerloop.kernels.dispatch import KernelCheckError, KernelUnavailableError
from innerloop.kernels.first_use import tolerance_for
from innerloop.kernels.spec import KernelSpec, names_parameter
from innerloop.testing.checks import (
    COMPARED_STATE_GROUPS,
    FLOAT64_CONDITIONING_FACTOR,
    FLOAT64_PER_FLOAT32,
    FLOAT64_TOLERANCE,
    LARGE_RATES_BOUND,
    assert_close,
    assert_state_unchanged,
    assert_states_close,
    checked_seed,
    run_layer_in_chunks,
    twin_layers,
    with_autograd,
)

#: Relative error :func:`check_kernel` allows by dtype, for outputs, states and gradients alike.
#: float64 asks as much as of two mathematically equal computations; float32 leaves room for a
#: different order of summation over a few mini-batches (the built-in kernels differ by < 1e-5), or,
#: where ``torch.set_float32_matmul_precision`` lets products round to TF32 or bfloat16, the first-use
#: check's tolerance for that precision (:func:`~innerloop.kernels.first_use.tolerance_for`). A wrong
#: kernel is off by far more.
KERNEL_CHECK_TOLERANCES: dict[torch.dtype, float] = {
    torch.float64: FLOAT64_TOLERANCE,
    torch.float32: 1e-4,
}

BATCH_SIZE = 3
"""Sequences per call: a kernel that reads one batch row's data or weights for all is caught."""

NUM_HEADS = 3
"""Heads per layer: a kernel that reads one head's inner LayerNorm or weights for all is caught."""

DEFAULT_MINI_BATCH_SIZE = 4

MODES = ("grad", "no_grad", "inference_mode")
"""How each call is made: recording a graph (gradients compared too), or not (two ways)."""

_MODE_CONTEXTS: dict[str, Callable[[], AbstractContextManager]] = {
    "grad": torch.enable_grad,
    "no_grad": torch.no_grad,
    "inference_mode": torch.inference_mode,
}

_PROJECTION_SEED = 1


@dataclass
class KernelCheckReport:
    """What :func:`check_kernel` compared: ``ran``, the cases in which the kernel computed part of the
    result; ``compared``, those the layer gave it no block of (fewer tokens than a mini-batch), checked
    all the same; ``skipped``, the cases it refused, with the reason its spec gave."""

    kernel: str
    ran: list[str] = field(default_factory=list)
    compared: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class KernelCase:
    """One comparison: the layer (head dim), the call (tokens, where it starts, where it is cut) and
    the mode (:data:`MODES`, or ``"decode"``)."""

    head_dim: int
    tokens: int
    carried: bool
    cuts: tuple[int, ...]
    mode: str
    at_boundary: bool = False  # a carried state at a mini-batch boundary (else inside a mini-batch)
    in_float32: bool = False  # the float32 case of a float64 check (:data:`FLOAT32_CASE`)
    decaying: bool = False  # on a ForgettingLayer (a kernel that supports decay)
    gate_as_log: bool = False  # its gate given as decay_log (a kernel whose forward names decay_log)
    weights_changed: bool = False  # on layers whose weights differ from the earlier cases' (another seed)
    wide: bool = False  # a wide case: mini-batches of WIDE_MINI_BATCH_SIZE (unless given)
    base_lr: object = None  # a base lr the case's layers were given (a wide case's, WIDE_BASE_LR)
    large_rates: bool = False  # the large-rates case: per-token rates up to LARGE_RATES_BOUND

    def __str__(self) -> str:
        layer = "TTTLayer" if self.head_dim % 2 == 0 else "FamilyLayer"
        if self.decaying:
            layer = "ForgettingLayer, with decay" + (" given as decay_log" if self.gate_as_log else "")
        start = "a fresh state"
        if self.carried:
            start = (
                f"a state carried {'to a mini-batch boundary' if self.at_boundary else 'from a first call'}"
            )
        if self.mode == "decode":
            split = f"prefill of {self.cuts[0]} then token by token"
        else:
            split = f"split at {list(self.cuts)}" if self.cuts else "in one call"
        layer += ", in float32" if self.in_float32 else ""
        layer += ", the weights changed since the earlier cases" if self.weights_changed else ""
        layer += f", the wide case: mini_batch_size {WIDE_MINI_BATCH_SIZE} unless given" if self.wide else ""
        layer += f", base_lr {self.base_lr}" if self.base_lr is not None else ""
        layer += (
            f", the large-rates case: per-token rates up to {LARGE_RATES_BOUND:g}" if self.large_rates else ""
        )
        return f"head_dim {self.head_dim} ({layer}), {self.tokens} tokens from {start}, {split}, {self.mode}"


@with_autograd
def check_kernel(
    kernel: str | KernelSpec,
    *,
    inner_model: object | None = None,
    inner_loss: object | None = None,
    update_rule: object | None = None,
    dtype: torch.dtype = torch.float64,
    tolerance: float | None = None,
    head_dims: tuple[int, ...] = (4, 5),
    device: str | torch.device = "cpu",
    seed: int = 0,
    **layer_options: object,
) -> KernelCheckReport:
    """Compare a layer forced onto ``kernel`` with the same layer on ``kernel="torch"`` (module
    docstring: the cases); raise ``AssertionError`` naming the kernel, the case and the tensor that
    differs, with its relative error.

    Args:
        kernel: a registered kernel's name, or its registered :class:`~innerloop.kernels.spec.KernelSpec`.
        inner_model, inner_loss, update_rule: the plugins (names or instances) the layer is built
            with; by default the names the spec declares.
        dtype: the layers' dtype, ``torch.float64`` (tolerance ``1e-10``, or on a case that amplifies
            rounding 100x the torch path's own float32 error scaled to float64's roundoff, as
            :func:`~innerloop.testing.check_update_rule` allows: the message then says so) or ``torch.float32``
            (``1e-4``, looser under a lowered float32 matmul precision; on a case that amplifies
            rounding, 10x the torch path's own float32 error against float64, at most ``1e-2``: the
            message then says so), :data:`KERNEL_CHECK_TOLERANCES`.
            With float64, one case runs in float32 too, last, at float32's tolerance (a kernel that
            refuses float32 has it skipped): layers run in float32 by default.
        tolerance: another largest relative error, for outputs, states and gradients alike.
        head_dims: the head dims checked (an odd one runs on a ``FamilyLayer``, which has no RoPE); the
            first also at per-token rates up to ``LARGE_RATES_BOUND`` (2.5), before the rest, unless
            ``base_lr`` is given.
        device: where the layers run.
        seed: the layers' weights and inputs.
        layer_options: further ``TTTLayer`` arguments (``mini_batch_size``, default 4; ``inner_norm``
            and ``inner_residual``, by default on for a kernel that ``fuses_inner_norm``, else off; ...).

    Returns the :class:`KernelCheckReport` of the cases run, compared and skipped. Raises ``AssertionError``
    also when the kernel ran in no case at all (the wide cases, :data:`WIDE_HEAD_DIM` and
    :data:`WIDE_UNEVEN_HEAD_DIM`, run after the others).
    """
    spec = _kernel_spec(kernel)
    tolerance = _tolerance(dtype, tolerance)
    seed, report = checked_seed(seed), KernelCheckReport(spec.name)  # named here, not from inside a case
    config = _layer_config(spec, inner_model, inner_loss, update_rule, layer_options)
    device, head_dims = _checked_device(device), _checked_head_dims(head_dims)
    # first, one cheap case at rates up to 2.5: a kernel wrong above rates of 1 fails at once (review s56v)
    _check_large_rates_case(spec, config, head_dims[0], dtype, device, seed, tolerance, report)
    for head_dim in head_dims:
        _check_head_dim(spec, config, head_dim, dtype, device, seed, tolerance, report)
        if spec.decode is None:
            report.skipped[f"head_dim {head_dim}, decode"] = f"{spec.name} has no decode step"
    _check_wide_case(spec, config, dtype, device, seed, tolerance, report, "mini_batch_size" in layer_options)
    if dtype == torch.float64:  # layers run in float32 (torch's default dtype): one case there too
        _check_float32_case(spec, config, head_dims[0], device, seed, report)
    _assert_ran(report)
    return report


def _assert_ran(report: KernelCheckReport) -> None:
    """``AssertionError`` when the kernel computed nothing in any case: nothing of it was checked."""
    if not report.ran:
        raise AssertionError(
            f"check_kernel({report.kernel!r}): the kernel computed nothing in any of the {len(report.skipped)} "
            f"cases it refused and {len(report.compared)} without a block for it, so nothing of it was "
            f"checked; the reasons: {sorted(set(report.skipped.values()))}"
        )


def _check_head_dim(
    spec: KernelSpec,
    config: dict,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
    tolerance: float,
    report: KernelCheckReport,
) -> None:
    """Every case of one head dim (:func:`_cases`); for a kernel that takes decay, each right after on a
    :class:`ForgettingLayer` too, but under ``torch.inference_mode`` (no_grad's values, as a rule)."""
    checker = _Checker(spec, config, head_dim, dtype, device, seed, tolerance, report)
    forgetting = []  # (checker, gate as log)
    if spec.supports_decay:
        for as_log in (False, True) if names_parameter(spec.forward, "decay_log") else (False,):
            forgetting.append(
                (
                    _Checker(
                        spec,
                        config,
                        head_dim,
                        dtype,
                        device,
                        seed,
                        tolerance,
                        report,
                        "log" if as_log else True,
                    ),
                    as_log,
                )
            )
    cases = list(_cases(head_dim, checker.mini_batch_size, spec.decode is not None))
    for case in cases:
        checker.run(case)
        for forgets, as_log in forgetting if case.mode != "inference_mode" else ():
            forgets.run(dataclasses.replace(case, decaying=True, gate_as_log=as_log))
    # the same shapes with other weights, as after an optimizer step: every case above ran one layer's
    # weights, so a kernel that caches what it derives from them (keyed by shape) passed (review s48l)
    changed = _Checker(spec, config, head_dim, dtype, device, seed + 1, tolerance, report)
    for case in (cases[0], *(c for c in cases if c.mode == "decode")):
        changed.run(dataclasses.replace(case, weights_changed=True))


def _check_float32_case(
    spec: KernelSpec, config: dict, head_dim: int, device: torch.device, seed: int, report: KernelCheckReport
) -> None:
    """A float64 check's float32 case: seventeen and a half mini-batches from a state carried into a
    mini-batch, in one call, with gradients, at float32's tolerance (:func:`_tolerance`). Layers run in
    float32 (torch's default dtype); a kernel wrong there only (a dtype-dependent branch, an accumulator
    in a lower precision that drifts after the two mini-batches dispatch's first-use check sees) passed a
    float64 check. A kernel that refuses float32 has the case skipped, with its reason."""
    checker = _Checker(
        spec, config, head_dim, torch.float32, device, seed, _tolerance(torch.float32, None), report
    )
    k = checker.mini_batch_size
    checker.run(KernelCase(head_dim, 17 * k + k // 2 + 1, True, (), "grad", in_float32=True))


#: The head dims, mini-batch size and base lr of :func:`check_kernel`'s wide cases (the other cases run 4 and
#: 5 features, mini-batches of 4 and ``base_lr`` 1.0). Mini-batches of 32: a mini-batch's rows past a tile of
#: 16 (the Triton kernels pad K to a power of two >= 16), where a kernel wrong past its first tile of rows
#: passed at the mini-batches of 16 these cases had before (review s55e). 32 features: past a tile of 8 or 16
#: features, and a power of two (what the Triton kernels take); 40: past a tile of 32 and no power of two,
#: where a kernel that mishandles a tile's remainder passed (each seen passing the old default check), run
#: at ``base_lr`` :data:`WIDE_BASE_LR` (unless given): every other case ran the default 1.0, whose per-token
#: rates stay below ``1 / head_dim``, so a kernel that assumed so (a clamp, a scaled low-precision store)
#: passed too. The paper's mini-batch of 16 is still met: ``mini_batch_size`` given replaces 32.
WIDE_HEAD_DIM = 32
WIDE_UNEVEN_HEAD_DIM = 40
WIDE_MINI_BATCH_SIZE = 32
WIDE_BASE_LR = 2.5


def _check_wide_case(
    spec: KernelSpec,
    config: dict,
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
    tolerance: float,
    report: KernelCheckReport,
    mini_batch_given: bool,
) -> None:
    """The wide cases: at :data:`WIDE_HEAD_DIM`, then at :data:`WIDE_UNEVEN_HEAD_DIM` features with
    ``base_lr`` :data:`WIDE_BASE_LR` (unless ``config`` gives one), each with mini-batches of
    :data:`WIDE_MINI_BATCH_SIZE` (unless the caller gave ``mini_batch_size``): three and a half mini-batches
    from a carried state, cut after the first, with gradients. A kernel whose ``verify`` refuses one has it
    skipped, with its reason."""
    wide_config = config if mini_batch_given else {**config, "mini_batch_size": WIDE_MINI_BATCH_SIZE}
    other_base_lr = None if "base_lr" in config else WIDE_BASE_LR
    for head_dim, base_lr in ((WIDE_HEAD_DIM, None), (WIDE_UNEVEN_HEAD_DIM, other_base_lr)):
        layer_config = wide_config if base_lr is None else {**wide_config, "base_lr": base_lr}
        checker = _Checker(spec, layer_config, head_dim, dtype, device, seed, tolerance, report)
        k = checker.mini_batch_size
        case = KernelCase(head_dim, 3 * k + k // 2 + 1, True, (k + 1,), "grad", wide=True, base_lr=base_lr)
        checker.run(case)


def _check_large_rates_case(
    spec: KernelSpec,
    config: dict,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
    tolerance: float,
    report: KernelCheckReport,
) -> None:
    """The large-rates case: at ``head_dim`` with per-token rates up to :data:`LARGE_RATES_BOUND`
    (:func:`_large_rates_base_lr`), three and a half mini-batches from a carried state, cut after the
    first, with gradients. Skipped, saying so, where the caller gave ``base_lr`` (its layers' rates are
    then the caller's to choose)."""
    base_lr = _large_rates_base_lr(head_dim)
    if "base_lr" in config:
        report.skipped[f"head_dim {head_dim}, the large-rates case"] = (
            f"base_lr={config['base_lr']!r} given: the case runs base_lr {base_lr:g}, rates up to {LARGE_RATES_BOUND:g}"
        )
        return
    checker = _Checker(spec, {**config, "base_lr": base_lr}, head_dim, dtype, device, seed, tolerance, report)
    k = checker.mini_batch_size
    checker.run(
        KernelCase(head_dim, 3 * k + k // 2 + 1, True, (k + 1,), "grad", base_lr=base_lr, large_rates=True)
    )


def _large_rates_base_lr(head_dim: int) -> float:
    """The ``base_lr`` whose per-token rates reach :data:`LARGE_RATES_BOUND` at ``head_dim``: a
    :class:`TTTLayer` (even head dim) rates ``base_lr * sigmoid(gate) / head_dim``, a :class:`FamilyLayer`
    (odd) ``base_lr`` itself."""
    return LARGE_RATES_BOUND * head_dim if head_dim % 2 == 0 else LARGE_RATES_BOUND


def _kernel_spec(kernel: str | KernelSpec) -> KernelSpec:
    """The registered spec of that name (the registry's error lists the valid names), or ``kernel``."""
    if not isinstance(kernel, (str, KernelSpec)):
        raise TypeError(f"kernel must be a registered kernel's name or a KernelSpec, got {kernel!r}")
    if isinstance(kernel, KernelSpec):
        return kernel
    from innerloop.registry import get_registry  # late import: the registry uses innerloop.testing's checks

    return get_registry().get("kernel", kernel)


def _checked_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` that can hold tensors in this process; a ValueError naming it
    otherwise (torch says so with an ``AssertionError``, which would read as a failed check)."""
    try:
        resolved = torch.device(device)
        torch.empty(0, device=resolved)
    except (AssertionError, RuntimeError, TypeError) as error:
        raise ValueError(
            f"device={device!r} cannot hold tensors in this process ({error}); check_kernel runs the layers there"
        ) from None
    return resolved


def _tolerance(dtype: torch.dtype, tolerance: float | None) -> float:
    if dtype not in KERNEL_CHECK_TOLERANCES:
        raise ValueError(
            f"dtype must be one of {list(KERNEL_CHECK_TOLERANCES)} (the layers' dtype), got {dtype!r}"
        )
    if tolerance is None:
        lowered = dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"
        return tolerance_for(dtype) if lowered else KERNEL_CHECK_TOLERANCES[dtype]  # TF32 / bfloat16 products
    if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real) or not 0 < tolerance < math.inf:
        raise ValueError(f"tolerance must be a positive number (a relative error), got {tolerance!r}")
    return float(tolerance)


def _checked_head_dims(head_dims: tuple[int, ...]) -> tuple[int, ...]:
    valid = isinstance(head_dims, (tuple, list)) and len(head_dims) > 0
    dims = [as_integer(d) for d in head_dims] if valid else []  # numpy's integers too
    if not valid or any(d is None or d < 1 for d in dims):
        raise ValueError(f"head_dims must be a non-empty tuple of positive ints, got {head_dims!r}")
    return tuple(dims)


def _layer_config(
    spec: KernelSpec, inner_model: object, inner_loss: object, update_rule: object, options: dict
) -> dict:
    """The layer's arguments: the spec's plugins unless given, its wrapping, ``options`` on top."""
    for name in ("kernel", "hidden_size", "num_heads"):
        if name in options:
            raise TypeError(
                f"check_kernel sets {name} itself (got {name}={options[name]!r}): pass the kernel as its "
                "first argument and the head dims as head_dims"
            )
    wrapped = spec.fuses_inner_norm
    return {
        "inner_model": spec.inner_model if inner_model is None else inner_model,
        "inner_loss": spec.inner_loss if inner_loss is None else inner_loss,
        "update_rule": spec.update_rule if update_rule is None else update_rule,
        "mini_batch_size": DEFAULT_MINI_BATCH_SIZE,
        "inner_norm": wrapped,
        "inner_residual": wrapped,
        **options,
    }


def _cases(head_dim: int, mini_batch_size: int, decodes: bool) -> Iterator[KernelCase]:
    """Every case of one head dim: each length, start and cut, in each mode; then decoding."""
    k = mini_batch_size
    # three whole mini-batches and a partial one (K = 1: four whole ones), then seventeen: past a tile
    # of 4, 8 or 16 mini-batches, or a loop carry that goes wrong after a few iterations
    lengths = [3 * k + k // 2 + 1, 17 * k + k // 2 + 1]
    if k > 1:
        lengths.append(k - 1)
    for tokens in lengths:
        cuts = tuple(c for c in (1, k + k // 2 + 1, 3 * k) if 0 < c < tokens)
        for carried, at_boundary in ((False, False), (True, False), (True, True)):
            for mode in MODES:
                yield KernelCase(head_dim, tokens, carried, (), mode, at_boundary)
                if cuts:
                    yield KernelCase(head_dim, tokens, carried, cuts, mode, at_boundary)
    if decodes:
        yield KernelCase(head_dim, 2 * k + 1, True, (k + 1,), "decode")


FORGETTING_BIASES = (-1.0, 1.5, 7.0)
""":class:`ForgettingLayer`'s gate biases, head by head (cycled): decays about 0.27 (a memory of a few
tokens, so that what the state carries still counts), 0.82, and 0.999 (nearly a full reset, as Gated
DeltaNet's gates reach): a kernel that clamps decays near 1 (at 0.99) was passed when every decay was
below 0.8."""


class ForgettingLayer(FamilyLayer):
    """A :class:`FamilyLayer` that forgets: ``decay = sigmoid(decay_proj(x))`` per head and token (at the
    start about 0.27, 0.82 and 0.999 by head: :data:`FORGETTING_BIASES`), no momentum.
    :func:`check_kernel` runs a kernel that declares ``supports_decay`` on it, which the other layers
    never give a decay."""

    def _build_gates(self) -> None:
        self.decay_proj = nn.Linear(self.hidden_size, self.num_heads)
        biases = [FORGETTING_BIASES[head % len(FORGETTING_BIASES)] for head in range(self.num_heads)]
        with torch.no_grad():
            self.decay_proj.bias.copy_(torch.tensor(biases))

    def forgetting(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(decay [B, H, T], None)`` for ``x [B, T, D]``, in :attr:`scan_dtype`."""
        return torch.sigmoid(self._head_gate(x, self.decay_proj)), None


class LogForgettingLayer(ForgettingLayer):
    """:class:`ForgettingLayer` giving the scan its gate as ``decay_log = log(1 - decay) =
    logsigmoid(-decay_proj(x))``, as Gated DeltaNet and Titans give theirs: dispatch then hands a kernel
    whose forward names ``decay_log`` the log gate, which :func:`check_kernel` checks too."""

    def log_forgetting(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        """``(log(1 - decay) [B, H, T], None)`` for ``x [B, T, D]``, in :attr:`scan_dtype`."""
        return F.logsigmoid(-self._head_gate(x, self.decay_proj)), None


def _twin_layers(
    config: dict, head_dim: int, seed: int, kernel: str, dtype: torch.dtype, forgets: bool | str = False
) -> tuple[TTTLayer, TTTLayer]:
    """:func:`twin_layers` at ``head_dim`` (an odd one, or ``forgets``: ``FamilyLayer``s, without
    TTTLayer's RoPE; ``forgets``: :class:`ForgettingLayer`, ``"log"``: :class:`LogForgettingLayer`)."""
    sizes = {"hidden_size": NUM_HEADS * head_dim, "num_heads": NUM_HEADS}
    if head_dim % 2 == 0 and not forgets:
        return twin_layers({**config, **sizes}, seed, kernel, dtype)
    family = {k: v for k, v in config.items() if k not in REFUSED_TTT_OPTIONS}
    layer_class = {"log": LogForgettingLayer, True: ForgettingLayer}.get(forgets, FamilyLayer)
    torch.manual_seed(seed)
    reference = layer_class(**sizes, **family, kernel="torch").to(dtype)
    with torch.no_grad():  # away from the initial values, as twin_layers does
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    fast = layer_class(**sizes, **family, kernel=kernel).to(dtype)
    fast.load_state_dict(reference.state_dict())
    return reference, fast


#: A float32 case that amplifies rounding moves a correct kernel's numbers from the torch path's, both in
#: float32, by up to about their two own errors against float64: :func:`check_kernel` allows this many
#: times the torch path's own float32 error there (at most :data:`FLOAT32_ALLOWANCE_CAP`), when that
#: exceeds its tolerance. A kernel wrong in float32 only (a dtype-dependent branch, a half-precision
#: accumulator) is off by far more.
FLOAT32_CONDITIONING_FACTOR = 10.0
FLOAT32_ALLOWANCE_CAP = 1e-2


def _rounding_allowance(dtype: torch.dtype, tolerance: float, float32_error: float) -> tuple[float, str]:
    """The relative error a case allows a kernel in ``dtype`` when the torch path's own float32 error
    against float64 is ``float32_error`` (for a float32, bfloat16 or float16 case, its error in that
    dtype), and the words that say so in a message, naming that dtype."""
    if dtype == torch.float64:
        allowed = FLOAT64_CONDITIONING_FACTOR * float32_error * FLOAT64_PER_FLOAT32
        return allowed, (
            f" (allowed: {tolerance:.1e}, or {FLOAT64_CONDITIONING_FACTOR:g}x the torch path's own "
            f"float32 error {float32_error:.1e} scaled to float64's roundoff)"
        )
    allowed = min(FLOAT32_CONDITIONING_FACTOR * float32_error, FLOAT32_ALLOWANCE_CAP)
    precision = str(dtype).removeprefix("torch.")  # a bfloat16 case measured its bfloat16 error
    return allowed, (
        f" (allowed: {tolerance:.1e}, or {FLOAT32_CONDITIONING_FACTOR:g}x the torch path's own {precision} "
        f"error {float32_error:.1e} against float64, at most {FLOAT32_ALLOWANCE_CAP:.0e})"
    )


def _assert_results_close(
    actual: tuple, expected: tuple, got: dict, want: dict, what: str, tolerance: float
) -> None:
    """The kernel's outputs (as a whole and token by token), final state and gradients within
    ``tolerance`` of the torch path's."""
    assert_close(actual[0], expected[0], f"{what}: output", tolerance)
    _assert_close_per_token(actual[0], expected[0], f"{what}: output", tolerance)
    assert_states_close(actual[1], expected[1], f"{what}: final state", tolerance)
    for name, gradient in want.items():
        assert_close(got[name], gradient, f"{what}: gradient of {name}", tolerance)


def _copy(state: TTTState | None) -> TTTState | None:
    return None if state is None else state.clone()


def _assert_close_per_token(
    actual: torch.Tensor, expected: torch.Tensor, what: str, tolerance: float
) -> None:
    """Each token's output ``[B, T, D]`` within ``tolerance`` of its reference (relative error over the
    batch and features): an error on one token in several is not diluted by the others."""
    actual, expected = actual.detach(), expected.detach()
    difference = (actual.double() - expected.double()).square().sum(dim=(0, 2)).sqrt()  # [T]
    scale = expected.double().square().sum(dim=(0, 2)).sqrt()  # [T]
    errors = torch.where(scale > 0, difference / scale.clamp_min(torch.finfo(torch.float64).tiny), difference)
    worst = int(errors.argmax()) if errors.numel() else 0
    if errors.numel() and not float(errors[worst]) <= tolerance:  # also catches NaN
        raise AssertionError(
            f"{what}: token {worst} has a relative error of {float(errors[worst]):.3e} > {tolerance:.1e}"
        )


def _run_recorded(
    layer: TTTLayer, x: torch.Tensor, cuts: tuple[int, ...], state: TTTState | None
) -> tuple[tuple[torch.Tensor, TTTState], list[tuple[str, str]]]:
    """:func:`run_layer_in_chunks` and the dispatch decisions of every call it made."""
    paths: list[tuple[str, str]] = []
    hook = layer.register_forward_hook(lambda module, args, out: paths.extend(module.dispatches))
    try:
        result = run_layer_in_chunks(layer, x, list(cuts), state)
    finally:
        hook.remove()
    return result, paths


def _projected_gradients(
    layer: TTTLayer, x: torch.Tensor, result: tuple[torch.Tensor, TTTState]
) -> dict[str, torch.Tensor]:
    """The gradients of a fixed random projection of the outputs and the final state's weights and
    pending sums with respect to ``x`` and every parameter (zero where none flows). The projection is
    drawn in float64 whatever the layer's dtype: the same numbers for a layer and its float32 copy."""
    outputs, state = result
    generator = torch.Generator().manual_seed(_PROJECTION_SEED)
    weights = [group[k] for group in (state.params, state.pending) for k in sorted(group)]  # one order
    projected = sum(
        (t * torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t.device, t.dtype)).sum()
        for t in (outputs, *weights)
    )
    leaves = {"the input x": x, **{f"parameter {n}": p for n, p in layer.named_parameters()}}
    grads = torch.autograd.grad(projected, list(leaves.values()), allow_unused=True)
    return {
        name: torch.zeros_like(leaf) if grad is None else grad
        for (name, leaf), grad in zip(leaves.items(), grads, strict=True)
    }


class _Checker:
    """The twin layers of one head dim, the state carried from a first call, and the cases run on them."""

    def __init__(
        self,
        spec: KernelSpec,
        config: dict,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        seed: int,
        tolerance: float,
        report: KernelCheckReport,
        forgets: bool | str = False,
    ) -> None:
        self.spec, self.tolerance, self.report = spec, tolerance, report
        # checks the options
        reference, fast = _twin_layers(config, head_dim, seed, spec.name, dtype, forgets)
        self.mini_batch_size = reference.mini_batch_size
        self.reference, self.fast = reference.to(device), fast.to(device)
        self.generator = torch.Generator().manual_seed(seed)
        self.shape, self.dtype, self.device = (BATCH_SIZE, NUM_HEADS * head_dim), dtype, device
        with torch.no_grad():  # different weights in each batch row; inside a mini-batch, and at its end
            self.carried = self.reference(self.draw(self.mini_batch_size + 1))[1]
            self.carried_to_boundary = self.reference(self.draw(2 * self.mini_batch_size))[1]

    def draw(self, tokens: int) -> torch.Tensor:
        batch, hidden = self.shape
        x = torch.randn(batch, tokens, hidden, generator=self.generator, dtype=torch.float64)
        return x.to(device=self.device, dtype=self.dtype)

    def run(self, case: KernelCase) -> None:
        """Compare the two layers on ``case`` and record whether the kernel computed part of it."""
        what = f"check_kernel({self.spec.name!r}): {case}"
        x, state = self.draw(case.tokens), None
        if case.carried:
            state = self.carried_to_boundary if case.at_boundary else self.carried
        try:
            paths = self._compare(case, x, state, what)
        except KernelCheckError as error:
            raise AssertionError(f"{what}: dispatch's first-use check refused the kernel: {error}") from error
        except KernelUnavailableError as error:  # its verify, or what its spec declares, refuses the case
            self.report.skipped[str(case)] = f"not compared: {error}"
            return
        except AssertionError:
            raise
        except Exception as error:
            raise AssertionError(f"{what}: raised {type(error).__name__}: {error}") from error
        self._record(case, paths)

    def _compare(
        self, case: KernelCase, x: torch.Tensor, state: TTTState | None, what: str
    ) -> list[tuple[str, str]]:
        grad = case.mode == "grad"
        cuts = case.cuts
        if case.mode == "decode":  # a prefill, then one call per token
            cuts = tuple(range(case.cuts[0], case.tokens))
        with _MODE_CONTEXTS["inference_mode" if case.mode == "decode" else case.mode]():
            x_reference, x_fast = (x.clone().requires_grad_(grad) for _ in range(2))
            expected = self.reference(x_reference, _copy(state))
            given, untouched = _copy(state), _copy(state)
            actual, paths = _run_recorded(self.fast, x_fast, cuts, given)
            assert_state_unchanged(given, untouched, f"{what}: the kernel")
            want = _projected_gradients(self.reference, x_reference, expected) if grad else {}
            got = _projected_gradients(self.fast, x_fast, actual) if grad else {}
        try:
            _assert_results_close(actual, expected, got, want, what, self.tolerance)
        except AssertionError:
            error = self._float32_error(case, x, state, expected, want)
            allowed, note = _rounding_allowance(self.dtype, self.tolerance, error)
            if not allowed > self.tolerance:
                raise
            try:
                _assert_results_close(actual, expected, got, want, what, allowed)
            except AssertionError as error:  # the allowance at the end: "<case>: output: ..." reads as ever
                raise AssertionError(f"{error}{note}") from None
        return paths

    def _float32_error(
        self, case: KernelCase, x: torch.Tensor, state: TTTState | None, expected: tuple, want: dict
    ) -> float:
        """How much the case amplifies rounding: the largest relative error of the torch path's outputs,
        final state (every group the checks compare) and gradients run in float32 against the same run in float64, on
        the same inputs in one call (the case's own run is one of the two; at most 1: an overflow or a
        float32 run that is all rounding widens no further; 0, no allowance, where the other run cannot be
        made, so that the kernel's own mismatch is what the check reports)."""
        try:
            return self._measured_float32_error(case, x, state, expected, want)
        except Exception:  # e.g. a plugin whose float64 constant is not a buffer (.float() leaves it)
            return 0.0

    def _measured_float32_error(
        self, case: KernelCase, x: torch.Tensor, state: TTTState | None, expected: tuple, want: dict
    ) -> float:
        """:meth:`_float32_error`, raising what the other run raises."""
        other = torch.float32 if self.dtype == torch.float64 else torch.float64
        reference = copy.deepcopy(self.reference).to(other)
        with _MODE_CONTEXTS["inference_mode" if case.mode == "decode" else case.mode]():
            other_x = x.to(other).requires_grad_(bool(want))
            result = reference(other_x, None if state is None else state.to(other))
            other_want = _projected_gradients(reference, other_x, result) if want else {}
        low, high = (result, expected) if other == torch.float32 else (expected, result)
        low_want, high_want = (other_want, want) if other == torch.float32 else (want, other_want)
        errors = [relative_error(low[0], high[0])]
        for group in COMPARED_STATE_GROUPS:
            wanted = getattr(high[1], group)
            errors += [relative_error(getattr(low[1], group)[name], wanted[name]) for name in wanted]
        errors += [relative_error(low_want[name], high_want[name]) for name in high_want]
        finite = [e for e in errors if math.isfinite(e)]
        return min(max(finite, default=0.0), 1.0) if len(finite) == len(errors) else 0.0

    def _record(self, case: KernelCase, paths: list[tuple[str, str]]) -> None:
        """``ran`` when the kernel (its decode step, for a decoding case) computed part of the case;
        else ``skipped`` with the reasons dispatch gave about it, or ``compared`` where it gave none
        (no whole mini-batch for it)."""
        name = self.spec.name
        wanted = {name, f"{name}.decode"}
        if case.mode == "decode" and self.mini_batch_size > 1:  # K = 1: each token is a whole mini-batch
            wanted = {f"{name}.decode"}
        if any(path in wanted for path, _ in paths):
            self.report.ran.append(str(case))
            return
        refusals = sorted({reason for path, reason in paths if name in reason})
        if refusals:
            self.report.skipped[str(case)] = "compared on another path: " + "; ".join(refusals)
        else:
            self.report.compared.append(str(case))


__all__ = [
    "KERNEL_CHECK_TOLERANCES",
    "ForgettingLayer",
    "LogForgettingLayer",
    "KernelCase",
    "KernelCheckReport",
    "check_kernel",
]
