"""Every kernel's numbers are checked against the torch path on a probe of its first block.

``verify`` says whether a kernel *can* run on some inputs; it says nothing of whether its numbers are
right. A registered kernel that computes something else (a plugin with a sign error, a build that
miscompiles, a Triton kernel on a GPU it was never tested on) would otherwise be chosen by
``kernel="auto"`` and give silently wrong outputs, states or gradients.

So the first time a kernel is chosen for a kind of block (its :func:`signature`: the kernel, inner
model, inner loss and update rule objects themselves, device, dtype, head dim, mini-batch size, whether
gradients are needed, the layer's residual/norm/decay options, and for decoding whether the token
closes its mini-batch) dispatch runs it and the torch path on a probe of
that block: the block's first two mini-batches (one token when decoding), with learning rates drawn
so that every weight update is exercised. It compares the outputs and new weights, and with gradients
needed, the gradient of a fixed random projection of them with respect to every input that records a
graph. The relative RMS error must stay under :data:`TOLERANCES` for the dtype. The verdict is kept
for the process, for those very objects or copies of them (not by name: a loss of another class
registered under the name of one that was removed, or an instance configured differently, is checked
again; a deep copy of a layer is not, unless a plugin of it holds tensors: such an object's verdicts
are its own, and are forgotten when it is freed). It is about the objects with the settings they had when it was
kept (:func:`~innerloop.registry.settings.plugin_settings`, what a checkpoint records): a setting
changed in place afterwards (``loss.scale = 2.0`` on the very object) is checked again, since a kernel registered for
a plugin's name may compute its default settings only:

- a kernel that passes runs from then on without further checks;
- a kernel that fails is refused for that signature: ``kernel="auto"`` moves on to the next candidate
  (or torch), warning once and recording the failure in the dispatch reason; a layer that named the
  kernel gets :class:`~innerloop.kernels.dispatch.KernelUnavailableError` with the numbers.

A verdict is about the kernel, so it does not rest on user data too degenerate or ill-conditioned to
tell a right kernel from a wrong one. Weak data (queries, keys or values all zero, constant along each
token's features, or so small that their products underflow, e.g. float32 subnormals; starting weights
or pending sums that are zero or the same in every batch row, as a fresh layer's are; a decoded token's
scale of 1, where it opens its mini-batch, or a block's scales all 1, mini-batches of one token)
tests too little: a pass on it is confirmed on seeded random data of the same shapes, dtypes and device
(the layer's own weights and inner LayerNorm, or seeded ones where those are weak too, and a drawn token
scale), and a kernel that differs there is refused. A difference on weak data, or where the inner
LayerNorm normalises two features or fewer (ill-conditioned whatever the data), or where the torch
path's own result is further than the tolerance from its float64 result (data that only looks
well-conditioned: targets the starting weights already fit, whose learning rates' gradients are rounding
noise), is not pinned on the kernel: that block runs the torch path (:class:`Deferred`, the dispatch
reason says so), no verdict is recorded, and the next block like it is probed again. On well-conditioned
data the user's block decides.

A probe whose torch result is not finite (the user's data overflows), or that holds no values (a batch
of 0), decides nothing and is repeated on the next block. A kernel that raises, or returns non-finite
values (outputs or gradients) where the torch path's are finite, is refused whatever the data.
Gradients of gradients (``needs_double_backward``) are not probed: the built-in kernels refuse those
blocks in ``verify``. The probe covers a block's first two mini-batches (one token when decoding): a
kernel wrong only from a later mini-batch on is not caught here, which its own tests must settle. The
probe costs one pass of two mini-batches on each path (twice that with
gradients; twice again where random data confirms a pass), once per signature and process, and again
on each later block while deferred.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import threading
import types
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch.utils._python_dispatch import _disable_current_modes

from innerloop.core.callers import warning_stacklevel
from innerloop.core.environment import EnvironmentSwitchError
from innerloop.core.functional import relative_error, saved_tensors_hooks_suspended
from innerloop.core.protocol import InnerTask, Params, UpdateRule
from innerloop.core.scan import ChunkInputs
from innerloop.kernels.spec import KernelInputs, KernelSpec, check_kernel_output

TOLERANCES: dict[torch.dtype, float] = {
    torch.float64: 1e-6,  # a float64 kernel may accumulate in float32 internally
    torch.float32: 1e-3,
    torch.bfloat16: 5e-2,
    torch.float16: 2e-2,
}
"""Largest relative RMS error of a kernel's outputs and new weights against the torch path, by dtype.
A wrong kernel (a missing term, a sign, a wrong scale) is off by order one."""

MATMUL_PRECISION_DTYPES = {"high": torch.float16, "medium": torch.bfloat16}
"""``torch.set_float32_matmul_precision`` levels below ``"highest"`` and the precision their float32
products may round to (TF32's 10-bit mantissa like float16's; ``"medium"`` allows bfloat16)."""


def tolerance_for(dtype: torch.dtype) -> float:
    """:data:`TOLERANCES` for ``dtype``; for float32, that of the precision its matrix products may
    round to under ``torch.set_float32_matmul_precision`` (both paths then round, each its own way)."""
    if dtype == torch.float32:
        dtype = MATMUL_PRECISION_DTYPES.get(torch.get_float32_matmul_precision(), torch.float32)
    return TOLERANCES.get(dtype, TOLERANCES[torch.float32])


GRADIENT_FACTOR = 10.0
"""Gradients may differ by this factor more than :data:`TOLERANCES` (a backward is a longer chain)."""

PROBE_MINI_BATCHES = 2
"""Mini-batches in a block's probe: two, so that the first update's weights are used by the second."""

_VERDICTS: dict[tuple, str | None] = {}
"""signature -> None (passed) or why the kernel failed; a signature not here is not checked yet."""

DEFERRALS_BEFORE_WARNING = 8
"""After this many :class:`Deferred` probes of one signature in a row, a :class:`KernelCheckWarning`
says that the torch path keeps running those blocks (once per signature)."""

_DEFERRALS: dict[tuple, int] = {}  # signature -> Deferred probes so far (until a verdict is kept)

SETTINGS_CHANGES_BEFORE_WARNING = 8
"""After this many first-use checks of one kernel run again because the public attributes of a plugin that
declares no settings changed since its verdict (:func:`_forget_other_settings`), a :class:`KernelCheckWarning`
says so (once per kernel and plugin class): one that bumps a public attribute as it runs is checked at every
block. Declared settings changed on purpose (a sweep) are checked again without a warning."""

_SETTINGS_CHANGES: dict[tuple[str, str], int] = {}  # (kernel, plugin class) -> checks run again so far


class _Held:
    """An object in a verdict's key: equal to the same object, or to one of the very same class whose
    attributes are equal (:func:`_same_state`: a ``copy.deepcopy`` of a layer, whose plugins are
    copies, computes what the original does), never to an object of another class (a plugin registered
    under a removed one's name) nor by the plugin's own ``__eq__`` (which may call equal two objects that
    compute different things).

    An object holding tensors (a plugin with a weighting vector, an ``nn.Module``) is equal only to
    itself and held by a weak reference: comparing its tensors by value would read them back from their
    device at every dispatch, and holding it would keep them in memory for the whole process. Its
    verdicts are forgotten when it is freed (a copy of it is checked anew). Any other object is held."""

    __slots__ = ("by_identity", "kind", "now", "obj", "pinned", "plain", "ref")

    def __init__(self, obj: object) -> None:
        self.kind = type(obj)
        self.obj: object | None = obj
        self.ref: weakref.ref | None = None
        self.plain: str | None = None  # a kept object's settings when it was kept (:meth:`kept`)
        self.now: str | None = None  # a looked-up object's settings, read once per lookup key
        self.pinned: list[torch.Tensor] = []  # the 0-dim tensors ``plain`` names: their ids stay theirs
        self.by_identity = _holds_tensors(obj)
        if self.by_identity:
            with contextlib.suppress(TypeError):  # an object that takes no weak reference stays held
                self.ref, self.obj = weakref.ref(obj, _forget_freed), None

    def target(self) -> object | None:
        """The object, or None once a weakly held one was freed."""
        return self.ref() if self.ref is not None else self.obj

    def kept(self) -> _Held:
        """This entry as a verdict's key keeps it: with the object's settings as they are now
        (:func:`~innerloop.registry.settings.plugin_settings`, what a checkpoint records), so that a
        setting changed in place afterwards (``loss.scale = 2.0`` on the very object a verdict was about)
        is not what the verdict was about. A kernel spec (a frozen dataclass) is kept as it is."""
        obj = self.target()
        if obj is None or isinstance(obj, KernelSpec):
            return self
        held = copy.copy(self)
        held.pinned = []
        held.plain = _settings_of(obj, held.pinned, stamps=self.by_identity)
        return held

    def _settings_now(self) -> str | None:
        """The settings this entry is about: a kept one's when it was kept; else its object's now, read
        once per entry (a lookup's key lives for one dispatch decision: :func:`one_lookup`)."""
        target = self.target()
        if self.plain is not None or target is None:
            return self.plain
        if self.now is None:
            self.now = _settings_of(target, stamps=self.by_identity)
        return self.now

    def __hash__(self) -> int:
        return hash(self.kind)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Held):
            return False
        mine, theirs = self.target(), other.target()
        if mine is None or theirs is None:
            return other is self
        if mine is not theirs and (
            self.by_identity
            or other.by_identity
            or type(mine) is not type(theirs)
            or not _same_state(mine, theirs)
        ):
            return False
        # a kept entry is about the settings its object had when it was kept, not those it holds now: an
        # equal copy whose settings changed alike with the kept object's is not what the verdict was about
        return (self.plain is None and other.plain is None) or self._settings_now() == other._settings_now()


def _settings_of(obj: object, pinned: list[torch.Tensor] | None = None, *, stamps: bool = False) -> str:
    """The settings of the plugin object ``obj`` (:func:`~innerloop.registry.settings.plugin_settings`)
    as one comparable str; its public plain attributes where its ``settings()`` is broken. With
    ``stamps`` (an object holding tensors), a 0-dim tensor setting off the CPU is read as a stamp (its id
    and in-place version counter), not its value: reading a GPU tensor's value waits for its device, at
    every dispatch; a tensor changed in place or replaced is another stamp (probed again). ``pinned``:
    where a kept key holds the tensors its stamps name, so that no other tensor takes one's id meanwhile."""
    from innerloop.registry import settings

    try:
        if not stamps:
            return repr(sorted(settings.plugin_settings(obj).items()))
        with settings.tensors_read_as(functools.partial(_tensor_stamp, pinned)):
            return repr(sorted(settings.plugin_settings(obj).items()))
    except Exception:  # a broken settings(): registration refuses it; its attributes stand in
        return repr(sorted((k, v) for k, v in vars(obj).items() if type(v) in _PLAIN_TYPES))


def _tensor_stamp(pinned: list[torch.Tensor] | None, tensor: torch.Tensor) -> object:
    """A 0-dim tensor setting as :func:`_settings_of` reads it: its value on the CPU, else its id and
    in-place version counter (``pinned``: where the tensor is held, or None)."""
    if tensor.device.type == "cpu":  # no device to wait for
        from innerloop.registry.settings import recorded_setting

        return recorded_setting(tensor.item())
    if pinned is not None:
        pinned.append(tensor)
    return f"tensor {id(tensor):#x} version {tensor._version}"


def _kept_key(key: tuple) -> tuple:
    """A verdict's (or deferral count's) ``key`` as the table keeps it: its plugin objects as they are
    now (:meth:`_Held.kept`)."""
    return tuple(part.kept() if isinstance(part, _Held) else part for part in key)


def _forget_other_settings(table: dict[tuple, Any], key: tuple) -> list[str]:
    """Drop ``table``'s entries about the very objects of ``key`` under other settings than theirs now:
    one verdict per object and kind of block, so that a plugin whose settings change at every call (a
    public counter of an object that declares no settings) does not fill the table (each change is
    probed again). Returns the classes of the objects that declare no settings and whose public attributes
    changed (of the entries dropped): a change of declared settings is on purpose."""
    changed: list[str] = []
    for kept in [k for k in list(table) if len(k) == len(key)]:
        same_objects = all(
            (a.target() is b.target()) if isinstance(a, _Held) and isinstance(b, _Held) else a == b
            for a, b in zip(kept, key, strict=True)
        )
        if same_objects and kept != key:
            table.pop(kept, None)
            changed += [
                type(b.target()).__qualname__
                for a, b in zip(kept, key, strict=True)
                if isinstance(a, _Held)
                and isinstance(b, _Held)
                and a._settings_now() != b._settings_now()
                and not _declares_settings(b.target())
            ]
    return changed


def _declares_settings(obj: object) -> bool:
    """Whether ``obj`` declares its settings (:func:`~innerloop.registry.settings.declares_settings`):
    then a change of them is on purpose (a sweep, an annealed weight), rightly checked again, and no
    reason to tell it to declare them."""
    from innerloop.registry import settings

    return settings.declares_settings(obj)


def _count_settings_changes(kernel: KernelSpec, classes: list[str]) -> None:
    """Count a first-use check of ``kernel`` run again because the settings of plugins of ``classes``
    changed; the :data:`SETTINGS_CHANGES_BEFORE_WARNING`-th of one class warns, naming it and the remedy."""
    for name in dict.fromkeys(classes):
        count = _SETTINGS_CHANGES[kernel.name, name] = _SETTINGS_CHANGES.get((kernel.name, name), 0) + 1
        if count == SETTINGS_CHANGES_BEFORE_WARNING:
            warnings.warn(
                f"{kernel.name}: its first-use check ran again {count} times because the settings of a {name} "
                "plugin changed since the last (a public attribute of a plugin that declares no settings, such "
                "as a counter bumped as it runs, counts as one): each such block probes the kernel and the "
                f"torch path again; declare the plugin's settings (a settings() method, or dataclass fields) "
                "so that only what changes its numbers is compared",
                KernelCheckWarning,
                stacklevel=warning_stacklevel(),
            )


def _holds_tensors(obj: object) -> bool:
    """Whether ``obj``'s attributes (``vars``) hold a tensor (or an array), directly or through the
    dicts, lists, tuples and sets among them and the attributes of the objects among them (an
    ``nn.Module`` helper, a plain object holding a tensor: held by value, such an object would keep its
    tensors for the whole process, and being equal to no other object, take one verdict per instance).
    A walk longer than :data:`_WALK_LIMIT` counts as holding one (held by identity, weakly)."""
    pending, seen = [getattr(obj, "__dict__", {})], set()
    while pending:
        value = pending.pop()
        if type(value) in _PLAIN_TYPES:  # most attributes (names, flags, sizes): nothing to look into
            continue
        if isinstance(value, torch.Tensor) or _is_array(value):
            return True
        if id(value) in seen:  # a container or object may hold itself
            continue
        if isinstance(value, dict):
            pending.extend(value.values())
        elif isinstance(value, (list, tuple, set, frozenset)):
            pending.extend(value)
        elif _has_own_attributes(value):
            pending.append(vars(value))
        else:
            continue
        seen.add(id(value))
        if len(seen) > _WALK_LIMIT:
            return True
    return False


_PLAIN_TYPES = frozenset({str, int, float, bool, type(None), types.FunctionType, torch.dtype, torch.device})
"""Types of attribute values :func:`_holds_tensors` need not look into (checked first: it runs at every
dispatch, on the kernel's attributes too)."""

_WALK_LIMIT = 10_000
"""Containers and objects :func:`_holds_tensors` walks at most (a plugin referring to a large structure)."""


def _is_array(value: object) -> bool:
    """Whether ``value`` is an array of another library (numpy's): compared by ``==`` it answers an
    array, not whether the two are equal."""
    return hasattr(value, "__array__") and getattr(value, "ndim", 0) != 0


def _has_own_attributes(value: object) -> bool:
    """Whether ``value`` is an instance whose attributes (``vars``) are its own state: not a class, a
    module or a function (whose ``__dict__`` reaches the whole program)."""
    return isinstance(getattr(value, "__dict__", None), dict) and not isinstance(
        value, (type, types.ModuleType, types.FunctionType, types.MethodType, types.BuiltinFunctionType)
    )


_FREED: list[weakref.ref] = []
"""Weak references of held objects that were freed, whose verdicts :func:`_drop_freed` drops (a
weak reference's callback runs inside the garbage collector, where changing the tables is unsafe)."""


def _forget_freed(ref: weakref.ref) -> None:
    _FREED.append(ref)


def _drop_freed() -> None:
    """Drop the verdicts and deferral counts about the objects that were freed since the last call.
    Safe while other threads dispatch: it walks a copy of each table's keys (another thread may add a
    verdict meanwhile) and stops when another thread took the last freed reference."""
    while True:
        try:
            ref = _FREED.pop()
        except IndexError:
            return
        for table in (_VERDICTS, _DEFERRALS):
            for key in [k for k in list(table) if any(isinstance(p, _Held) and p.ref is ref for p in k)]:
                table.pop(key, None)


def _same_state(a: object, b: object) -> bool:
    """Whether two objects of one class hold equal attributes (``vars``): tensors equal in shape, dtype
    and values, containers item by item, nested objects of a class without its own ``__eq__`` by their
    attributes in turn (a fresh settings object per plugin instance: by identity, each instance would
    take a verdict of its own, kept for the process), anything else by ``==``. False where that cannot
    be told (no ``__dict__``)."""
    try:
        return _equal_values(vars(a), vars(b), set())
    except (TypeError, RecursionError):  # no vars; or a chain of objects deeper than Python recurses
        return False


def _equal_values(x: object, y: object, comparing: set[tuple[int, int]]) -> bool:
    """``comparing``: the pairs of objects compared by attributes further up (an object that refers back
    to itself is equal where the rest of it is)."""
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return (
            isinstance(x, torch.Tensor)
            and isinstance(y, torch.Tensor)
            and (x.shape, x.dtype, x.device) == (y.shape, y.dtype, y.device)
            and bool(torch.equal(x, y))
        )
    if type(x) is not type(y):
        return False
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(_equal_values(x[k], y[k], comparing) for k in x)  # type: ignore[attr-defined]
    if isinstance(x, (list, tuple)):
        return len(x) == len(y) and all(_equal_values(a, b, comparing) for a, b in zip(x, y, strict=True))  # type: ignore[arg-type]
    if x is not y and type(x).__eq__ is object.__eq__ and _has_own_attributes(x):
        pair = (id(x), id(y))
        if pair in comparing:
            return True
        comparing.add(pair)
        return _equal_values(vars(x), vars(y), comparing)
    try:
        return bool(x == y)
    except Exception:  # an == that raises or returns an array: not known to be equal
        return False


BlockPath = Callable[[InnerTask, Params, ChunkInputs, torch.Tensor], tuple[torch.Tensor, Params]]
"""The torch path of a block: ``(task, params, chunk, tau) -> (out, new_params)``."""

TokenPath = Callable[
    [InnerTask, Params, Params, ChunkInputs, torch.Tensor, bool], tuple[torch.Tensor, Params, Params]
]
"""The torch path of one decoded token: ``(task, params, pending, token, tau_i, is_last) ->
(out [B, H, 1, f], params, pending)``."""


class KernelCheckWarning(UserWarning):
    """A kernel failed its first-use check and ``kernel="auto"`` did not use it."""


def signature(kernel: KernelSpec, inputs: KernelInputs, task: InnerTask, rule: UpdateRule) -> tuple:
    """What a verdict about ``kernel`` applies to (module docstring): the kernel, ``task``'s inner model
    and loss and ``rule`` (the objects, or copies of them: :class:`_Held`), and the kind of block (a
    decoded token's ``inputs.extra`` says whether it closes its mini-batch)."""
    extra = tuple(sorted((k, v) for k, v in inputs.extra.items() if isinstance(v, bool)))
    return (
        *(_Held(obj) for obj in (kernel, task.model, task.loss, rule)),
        inputs.device,  # with its index: each GPU is probed (its shared memory may differ)
        inputs.dtype,
        inputs.head_dim,
        inputs.mini_batch_size,
        inputs.requires_grad,
        extra,
    )


_LOOKUPS = threading.local()
"""This thread's signatures of the dispatch decision under way (:func:`one_lookup`), or none."""


@contextlib.contextmanager
def one_lookup() -> Iterator[None]:
    """One dispatch decision (choosing a block's kernel, then asking whether it was checked): inside,
    :func:`failure` and :func:`checked` of the very same kernel, inputs, task and rule objects share one
    signature, and so read each plugin's settings once rather than at each question (a lookup reads them
    to match a verdict kept under other settings: two questions per block cost a decoded token of a
    48-layer model ~1.4% more on CPU). Nested, the innermost decision's signatures are its own."""
    outer = getattr(_LOOKUPS, "signatures", None)
    _LOOKUPS.signatures = {}
    try:
        yield
    finally:
        _LOOKUPS.signatures = outer


def _lookup_signature(kernel: KernelSpec, inputs: KernelInputs, task: InnerTask, rule: UpdateRule) -> tuple:
    """:func:`signature`, shared inside one :func:`one_lookup` by the questions about the same objects
    (held with it, so that no other object can take one of their ids meanwhile)."""
    shared = getattr(_LOOKUPS, "signatures", None)
    if shared is None:
        return signature(kernel, inputs, task, rule)
    objects = (kernel, inputs, task, rule)
    found = shared.get(tuple(map(id, objects)))
    if found is None or any(a is not b for a, b in zip(found[0], objects, strict=True)):
        found = shared[tuple(map(id, objects))] = (objects, signature(kernel, inputs, task, rule))
    return found[1]


def failure(kernel: KernelSpec, inputs: KernelInputs, task: InnerTask, rule: UpdateRule) -> str | None:
    """Why ``kernel`` failed its first-use check for blocks like ``inputs`` of ``task`` under ``rule``;
    None if it passed or was not checked yet."""
    return _VERDICTS.get(_lookup_signature(kernel, inputs, task, rule))


def checked(kernel: KernelSpec, inputs: KernelInputs, task: InnerTask, rule: UpdateRule) -> bool:
    """Whether a verdict about ``kernel`` for blocks like ``inputs`` of ``task`` under ``rule`` is known."""
    return _lookup_signature(kernel, inputs, task, rule) in _VERDICTS


def forget_verdicts() -> None:
    """Forget every verdict: each kernel is checked again on its next first use (the registry calls
    this when a plugin is removed, which also lets the removed objects go)."""
    _VERDICTS.clear()
    _DEFERRALS.clear()
    _SETTINGS_CHANGES.clear()
    _FREED.clear()


def saved_verdicts() -> tuple[dict[tuple, str | None], dict[tuple, int]]:
    """A copy of every verdict and deferral count, for :func:`restore_verdicts`."""
    return dict(_VERDICTS), dict(_DEFERRALS)


def restore_verdicts(saved: tuple[dict[tuple, str | None], dict[tuple, int]]) -> None:
    """The verdicts and deferral counts :func:`saved_verdicts` copied, and no others (the counts of checks
    run again after a settings change start anew: they were about the verdicts replaced)."""
    verdicts, deferrals = saved
    _SETTINGS_CHANGES.clear()
    _VERDICTS.clear()
    _VERDICTS.update(verdicts)
    _DEFERRALS.clear()
    _DEFERRALS.update(deferrals)


def check_block(
    kernel: KernelSpec,
    inputs: KernelInputs,
    task: InnerTask,
    rule: UpdateRule,
    params: Params,
    chunk: ChunkInputs,
    tau: torch.Tensor,
    torch_path: BlockPath,
) -> str | None:
    """Probe ``kernel.forward`` against ``torch_path`` on this block's first mini-batches (module
    docstring); records and returns the verdict (None: it passed, or the probe decided nothing)."""
    tokens = min(chunk.query.shape[2], PROBE_MINI_BATCHES * task.mini_batch_size)
    probe = _probe_inputs(
        {
            "xq": chunk.query[:, :, :tokens],
            "xk": chunk.inputs[:, :, :tokens],
            "xv": chunk.targets[:, :, :tokens],
            "lr": chunk.lr[:, :, :tokens],
            "decay": None if chunk.decay is None else chunk.decay[:, :, :tokens],
            "ln_weight": task.norm_weight,
            "ln_bias": task.norm_bias,
            "tau": tau,  # a leaf of the probe: its gradient trains learnable_token_idx (review s48m)
        },
        params,
        inputs.head_dim,
    )

    def run_kernel(t: dict, p: Params) -> tuple[torch.Tensor, Params]:
        decay = {} if t["decay"] is None else {"decay": t["decay"]}
        with _raised_is_a_verdict():
            result = kernel.forward(
                xq=t["xq"],
                xk=t["xk"],
                xv=t["xv"],
                lr=t["lr"],
                tau=t["tau"],
                params=p,
                ln_weight=t["ln_weight"],
                ln_bias=t["ln_bias"],
                eps=task.norm_eps,
                **decay,
            )
        check_kernel_output(kernel, t["xq"], p, *result)  # a broken contract is an error, not a verdict
        return result

    def run_torch(t: dict, p: Params) -> tuple[torch.Tensor, Params]:
        probe_task = _with_norm(task, t["ln_weight"], t["ln_bias"])
        return torch_path(
            probe_task, p, ChunkInputs(t["xq"], t["xk"], t["xv"], t["lr"], t["decay"]), t["tau"]
        )

    return _record(signature(kernel, inputs, task, rule), kernel, inputs, probe, run_kernel, run_torch)


def check_decode(
    kernel: KernelSpec,
    inputs: KernelInputs,
    task: InnerTask,
    rule: UpdateRule,
    params: Params,
    pending: Params,
    token: ChunkInputs,
    tau_i: torch.Tensor,
    is_last: bool,
    torch_path: TokenPath,
) -> str | None:
    """Probe ``kernel.decode`` against ``torch_path`` on this token (``token``: ``[B, H, 1, f]``
    views); records and returns the verdict as :func:`check_block` does."""
    probe = _probe_inputs(
        {
            "xq": token.query,
            "xk": token.inputs,
            "xv": token.targets,
            "lr": token.lr,
            "decay": None,
            "ln_weight": task.norm_weight,
            "ln_bias": task.norm_bias,
            "tau": tau_i,  # in the probe's inputs, so that random data can draw it (1 opens a mini-batch)
        },
        joined_weights(params, pending),
        inputs.head_dim,
    )

    def split(p: Params) -> tuple[Params, Params]:
        return {k: p[k] for k in params}, {k: p[f"pending.{k}"] for k in pending}

    def run_kernel(t: dict, p: Params) -> tuple[torch.Tensor, Params]:
        start, sums = split(p)
        with _raised_is_a_verdict():
            out, new_params, new_pending = kernel.decode(
                xq=t["xq"][:, :, 0],
                xk=t["xk"][:, :, 0],
                xv=t["xv"][:, :, 0],
                lr=t["lr"][:, :, 0],
                tau_i=t["tau"],
                params=start,
                pending=sums,
                ln_weight=t["ln_weight"],
                ln_bias=t["ln_bias"],
                eps=task.norm_eps,
                is_last=is_last,
            )
        for given, returned in ((start, new_params), (sums, new_pending)):  # pending as the weights
            check_kernel_output(kernel, t["xq"][:, :, 0], given, out, returned)
        return out, joined_weights(new_params, new_pending)

    def run_torch(t: dict, p: Params) -> tuple[torch.Tensor, Params]:
        start, sums = split(p)
        probe_task = _with_norm(task, t["ln_weight"], t["ln_bias"])
        one = ChunkInputs(t["xq"], t["xk"], t["xv"], t["lr"])
        out, new_params, new_pending = torch_path(probe_task, start, sums, one, t["tau"], is_last)
        return out[:, :, 0], joined_weights(new_params, new_pending)

    return _record(signature(kernel, inputs, task, rule), kernel, inputs, probe, run_kernel, run_torch)


def refusal_message(kernel: KernelSpec, reason: str) -> str:
    """The sentence a refused kernel is reported with."""
    return f"{kernel.name}: failed its first-use check against the torch path ({reason})"


def warn_refused(kernel: KernelSpec, reason: str) -> None:
    """Tell the user once (per signature) that ``kernel="auto"`` refused a kernel for its numbers."""
    warnings.warn(
        refusal_message(kernel, reason) + "; innerloop runs these blocks without it",
        KernelCheckWarning,
        stacklevel=warning_stacklevel(),
    )


# --------------------------------------------------------------------------------------------------
# The probe
# --------------------------------------------------------------------------------------------------


def _probe_inputs(tensors: dict, params: Params, head_dim: int) -> tuple[dict, Params]:
    """Private copies of a probe's inputs (a kernel may write into what it is given), with learning
    rates drawn in ``(0, 1/f]`` so that every update of the probe moves the weights."""
    copies = {k: None if v is None else v.detach().clone() for k, v in tensors.items()}
    generator = torch.Generator(device=copies["lr"].device).manual_seed(0)
    lr = torch.rand(copies["lr"].shape, generator=generator, device=copies["lr"].device, dtype=torch.float32)
    copies["lr"] = ((0.5 + 0.5 * lr) / head_dim).to(copies["lr"].dtype)
    copies = {
        k: v.requires_grad_(tensors[k].requires_grad) if v is not None else None for k, v in copies.items()
    }
    weights = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in params.items()}
    return copies, weights


SYNTHETIC_SEED = 2
"""Seed of the synthetic probe's draws (:func:`_synthetic_probe`): its verdict is the same in every run."""

_VIEWS = {"xq": "queries", "xk": "keys", "xv": "values"}


def _ill_conditioned(tensors: Mapping[str, torch.Tensor | None]) -> str | None:
    """Why a difference on a probe's data may be its conditioning, not the kernel, whatever the data:
    the inner LayerNorm normalises two features or fewer (its output is then +-1 or 0 whatever the
    input, and its backward cancels); or None."""
    if tensors.get("ln_weight") is not None and tensors["xq"].shape[-1] <= 2:
        return "its inner LayerNorm normalises two features or fewer, where it is ill-conditioned"
    return None


def _degenerate(tensors: Mapping[str, torch.Tensor | None]) -> str | None:
    """Why a probe's data tests too little for a pass on it to be kept (and a difference on it may be
    its conditioning), or None: its queries, keys or values are :func:`_weak` (all zero, constant
    rows, subnormal)."""
    for name, said in _VIEWS.items():
        weakness = _weak(tensors[name])
        if weakness is not None:
            return f"its {said} {weakness}"
    return None


def _weak(tensor: torch.Tensor | None) -> str | None:
    """Why ``tensor`` exercises a kernel too little, or None: every row (last dim) holds one value
    (all zero, or constant rows: the inner LayerNorm then has nothing to normalise), or its largest
    |value| is under the square root of the dtype's smallest normal number (zero or subnormal, or so
    small that the products of two values underflow). One ``amax`` and ``amin`` over the tensor."""
    if tensor is None or tensor.numel() == 0:
        return None
    values = tensor.detach()
    if bool((values.amax(dim=-1) == values.amin(dim=-1)).all()):
        return "are constant along each row"
    largest = _magnitude(values)
    if largest < torch.finfo(values.dtype).tiny ** 0.5:
        return "are so small that their products underflow"
    return None


def _same_in_every_row(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` (batch first) holds the same values in every batch row: a fresh layer's
    starting weights, on which a kernel that reads one row's weights for all looks right."""
    return tensor.dim() > 0 and tensor.shape[0] > 1 and bool((tensor.detach() == tensor.detach()[:1]).all())


def _unit_token_scale(tensors: Mapping[str, torch.Tensor | None]) -> str | None:
    """Why token scales test too little: they are all 1 (a decoded token that opens its mini-batch, a
    block of one-token mini-batches), where a kernel that ignores them looks right; or None."""
    tau = tensors.get("tau")
    return "its token scale is 1" if tau is not None and bool((tau == 1).all()) else None


def _weak_weights(weights: Params) -> str | None:
    """Why a probe's starting weights (and pending sums) test too little for a pass on them to be kept:
    one of them is :func:`_weak` (a zero bias, zero pending sums) or the same in every batch row (a
    fresh layer's); or None."""
    for name, tensor in weights.items():
        weakness = _weak(tensor)
        if weakness is None and _same_in_every_row(tensor):
            weakness = "are the same in every batch row"
        if weakness is not None:
            return f"its starting {name} {weakness}"
    return None


def _magnitude(tensor: torch.Tensor) -> float:
    return float(tensor.detach().abs().amax()) if tensor.numel() else 0.0


def _largest_magnitude(tensors: Mapping[str, torch.Tensor | None]) -> float:
    """The largest |value| of a probe's queries, keys and values (what a refusal reports)."""
    return max(_magnitude(tensors[name]) for name in _VIEWS)  # type: ignore[arg-type]


def _synthetic_probe(tensors: dict, weights: Params) -> tuple[dict, Params]:
    """Well-conditioned inputs of a probe's shapes, dtypes, layouts, devices and ``requires_grad``:
    seeded standard normal queries, keys and values, decays drawn in ``[0.5, 1)``, the probe's drawn
    learning rates, token scales drawn in ``[0.25, 1)`` for a decoded token or a block whose are all 1
    (else the block's own), and the layer's own weights (pending sums) and inner LayerNorm where they are not
    :func:`_weak` or non-finite themselves, else seeded ones of an initialisation's scale (weights
    ``randn / sqrt(rows)``; LayerNorm weight ``1 + randn / 4``, bias ``randn / 4``)."""
    generator = torch.Generator(device=tensors["lr"].device).manual_seed(SYNTHETIC_SEED)

    def drawn(like: torch.Tensor, scale: float, shift: float = 0.0, uniform: bool = False) -> torch.Tensor:
        draw = torch.rand if uniform else torch.randn
        values = draw(like.shape, generator=generator, device=like.device, dtype=torch.float32)
        copy = torch.empty_like(like).copy_(shift + scale * values)  # like's dtype and layout
        return copy.requires_grad_(like.requires_grad)

    def own_or_drawn(like: torch.Tensor, scale: float, shift: float = 0.0) -> torch.Tensor:
        usable = (
            _weak(like) is None and not _same_in_every_row(like) and bool(torch.isfinite(like.detach()).all())
        )
        return (
            like.detach().clone().requires_grad_(like.requires_grad) if usable else drawn(like, scale, shift)
        )

    synthetic = {name: drawn(tensors[name], 1.0) for name in _VIEWS}
    synthetic["lr"] = tensors["lr"].detach().clone().requires_grad_(tensors["lr"].requires_grad)
    decay, ln_weight, ln_bias = tensors["decay"], tensors["ln_weight"], tensors["ln_bias"]
    synthetic["decay"] = None if decay is None else drawn(decay, 0.5, 0.5, uniform=True)
    tau = tensors.get("tau")
    if tau is not None:  # a decoded token's scale (1 where it opens its mini-batch, hiding its use) is drawn;
        # a block's scales are the layer's own unless all 1 (a mini-batch of one token)
        keep = tau.dim() > 0 and _unit_token_scale(tensors) is None
        synthetic["tau"] = (
            tau.detach().clone().requires_grad_(tau.requires_grad)
            if keep
            else drawn(tau, 0.75, 0.25, uniform=True)
        )
    synthetic["ln_weight"] = None if ln_weight is None else own_or_drawn(ln_weight, 0.25, 1.0)
    synthetic["ln_bias"] = None if ln_bias is None else own_or_drawn(ln_bias, 0.25)
    own = {
        k: own_or_drawn(v, max(v.shape[-2], 1) ** -0.5 if v.dim() > 1 else 1.0) for k, v in weights.items()
    }
    return synthetic, own


def joined_weights(params: Params, pending: Params) -> Params:
    """A decoded token's weights and pending sums in one dict (``pending.<name>``), as its ``verify``
    sees them and its probe compares them."""
    return {**params, **{f"pending.{k}": v for k, v in pending.items()}}


def _with_norm(task: InnerTask, weight: torch.Tensor | None, bias: torch.Tensor | None) -> InnerTask:
    """``task`` with the probe's copies of the inner LayerNorm (so their gradients are the probe's)."""
    return dataclasses.replace(task, norm_weight=weight, norm_bias=bias, kernel="torch", on_dispatch=None)


def _record(
    key: tuple,
    kernel: KernelSpec,
    inputs: KernelInputs,
    probe: tuple[dict, Params],
    run_kernel: Callable[[dict, Params], tuple[torch.Tensor, Params]],
    run_torch: Callable[[dict, Params], tuple[torch.Tensor, Params]],
) -> str | None:
    """Probe on the user's data; records and returns the verdict, or returns a :class:`Deferred` (not
    recorded) where that data cannot decide a difference (module docstring)."""
    tensors, weights = probe
    weak, ill = _degenerate(tensors), _ill_conditioned(tensors)
    said = _said_data(_largest_magnitude(tensors), weak or ill)
    untested = weak or _weak_weights(weights) or _unit_token_scale(tensors)  # a pass here is confirmed
    synthetic = _synthetic_probe(tensors, weights) if untested else None  # drawn before a kernel may write
    on_data = _probe_once(inputs, tensors, weights, run_kernel, run_torch)
    if on_data == _UNDECIDED:
        return None  # the data overflows on the torch path too: nothing decided, probe again later
    if isinstance(on_data, (_CouldNotRun, _NotFinite)):  # wrong or unable whatever the data's conditioning
        verdict: str | None = on_data if isinstance(on_data, _CouldNotRun) else f"{said}: {on_data}"
    elif on_data is not None and (weak or ill):  # a difference this data cannot pin on the kernel
        return _deferred(key, kernel, f"{said}: {on_data}")
    elif on_data is not None and (inaccurate := _torch_path_inaccurate(inputs, tensors, weights, run_torch)):
        return _deferred(key, kernel, f"{said}: {on_data}; {inaccurate}")
    elif on_data is not None or not untested:  # well-conditioned data decides; so does a pass on it
        verdict = None if on_data is None else f"{said}: {on_data}"
    else:  # a pass on data that tests too little: seeded random data of the same shapes confirms it
        on_random = _probe_once(inputs, *synthetic, run_kernel, run_torch)
        if on_random is None or on_random == _UNDECIDED:
            verdict = None
        elif ill and not isinstance(on_random, (_CouldNotRun, _NotFinite)):
            return _deferred(
                key, kernel, f"{said}: it matched; on seeded random data of the same shapes: {on_random}"
            )
        else:
            tested = "such data" if weak else f"{untested}, which"
            verdict = f"{said}: it matched, but {tested} tests too little; on seeded random data of the same shapes: {on_random}"
    _drop_freed()
    _count_settings_changes(kernel, _forget_other_settings(_VERDICTS, key))
    _VERDICTS[_kept_key(key)] = verdict
    _DEFERRALS.pop(key, None)
    return verdict


def _torch_path_inaccurate(
    inputs: KernelInputs,
    tensors: dict,
    weights: Params,
    run_torch: Callable[[dict, Params], tuple[torch.Tensor, Params]],
) -> str | None:
    """Why the torch path's own result on a probe is not accurate to the probe's tolerance (so that a
    kernel's difference from it says nothing of the kernel), or None: the torch path in the probe's
    dtype differs by more than the tolerance from itself in float64 on the same values. Data that looks
    well-conditioned can be so: targets that the starting weights already fit exactly leave an inner
    loss of 0, whose learning rates' gradients are rounding noise on every path. Not asked in float64
    (nothing wider) nor on a device without it (MPS)."""
    if inputs.dtype == torch.float64 or tensors["xq"].device.type == "mps":
        return None
    dtype = inputs.dtype

    def run_torch_in_float64(t: dict, p: Params) -> tuple[torch.Tensor, Params]:
        wide = {k: v.to(torch.float64) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
        out, new = run_torch(wide, {k: v.to(torch.float64) for k, v in p.items()})
        return out.to(dtype), {k: v.to(dtype) for k, v in new.items()}

    try:
        own_error = _probe_once(inputs, tensors, weights, run_torch_in_float64, run_torch)
    except Exception:  # a plugin's torch path that cannot run in float64: the difference stands
        return None
    if own_error is None or own_error == _UNDECIDED or isinstance(own_error, (_CouldNotRun, _NotFinite)):
        return None
    return (
        f"the torch path itself is that far from its float64 result here ({own_error}): this data cannot tell"
    )


def _deferred(key: tuple, kernel: KernelSpec, reason: str) -> Deferred:
    """A :class:`Deferred` probe of ``key``, counted: the :data:`DEFERRALS_BEFORE_WARNING`-th in a row
    warns that the torch path keeps running these blocks (every block so far was degenerate, e.g. a head
    dim of 2 with the inner LayerNorm, where a wrong kernel would be deferred for ever)."""
    _drop_freed()
    count = _DEFERRALS.get(key, 0) + 1
    _DEFERRALS.pop(key, None)  # kept anew: an equal key already there would stay the table's
    _DEFERRALS[_kept_key(key)] = count
    if count == DEFERRALS_BEFORE_WARNING:
        warnings.warn(
            f"{kernel.name}: its first-use check was deferred on {count} blocks in a row, each too degenerate "
            f"or ill-conditioned to decide ({reason}); the torch path runs these blocks until one decides",
            KernelCheckWarning,
            stacklevel=warning_stacklevel(),
        )
    return Deferred(reason)


class Deferred(str):
    """A probe that found a difference on data too degenerate or ill-conditioned to pin it on the
    kernel: no verdict is recorded, this block runs the torch path (whose numbers are the reference)
    and the next block like it is probed again."""


_UNDECIDED = "undecided: the torch path's own result is not finite, or the probe holds no values"
""":func:`_probe_once`'s answer when the probe decides nothing."""


class _CouldNotRun(str):
    """A verdict that the kernel (or its backward) raised: it cannot run such blocks, whatever their
    values, so no other data is tried."""


class _NotFinite(str):
    """A verdict that the kernel returned non-finite values where the torch path's are finite: wrong on
    that data whatever its conditioning, so no other data can excuse it."""


def _probe_once(
    inputs: KernelInputs,
    tensors: dict,
    weights: Params,
    run_kernel: Callable[[dict, Params], tuple[torch.Tensor, Params]],
    run_torch: Callable[[dict, Params], tuple[torch.Tensor, Params]],
) -> str | None:
    """Both paths on one probe's inputs: None (they match), why not, or :data:`_UNDECIDED`."""
    tolerance = tolerance_for(inputs.dtype)
    # the probe's graph keeps its saved tensors itself: an enclosing activation checkpoint's hooks must not
    # take them (suspended, not shadowed by identity hooks, which torch warns make a reference cycle)
    with (
        _outside_callers_dispatch_modes({**tensors, **weights}),
        saved_tensors_hooks_suspended(),
        torch.enable_grad() if inputs.requires_grad else torch.no_grad(),
    ):
        expected = run_torch(tensors, weights)
        inputs_given = {**weights, **{k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}}
        given = {name: value.detach().clone() for name, value in inputs_given.items()}
        try:
            actual = run_kernel(tensors, weights)
        except _KernelRaised as raised:  # it cannot run these blocks (a launch or build failure): refused
            return _CouldNotRun(raised)
        written = _written(inputs_given, given)
        if written:  # the caller's state, the layer's parameters and views: refused whatever the data
            return _CouldNotRun(
                f"it wrote into what it was given ({', '.join(written)}): the caller's state, the layer's "
                "LayerNorm or its views; a kernel returns new weights and leaves its inputs as they were"
            )
        if not _all_finite(expected) or tensors["xq"].numel() == 0:  # overflow, or no values (B = 0)
            return _UNDECIDED
        if not _all_finite(actual):
            return _NotFinite("it returned non-finite values where the torch path's are finite")
        got, want = _flatten(actual), _flatten(expected)
        reason = _compare(got, want, tolerance)
        if reason is None and inputs.requires_grad:
            try:
                reason = _compare_gradients(got, want, tensors, weights, tolerance * GRADIENT_FACTOR)
            except _KernelRaised as raised:  # its backward cannot run (e.g. out of shared memory): refused
                reason = _CouldNotRun(f"its backward: {raised}")
    return reason


@contextlib.contextmanager
def _outside_callers_dispatch_modes(probe: Mapping[str, object]) -> Iterator[None]:
    """The probe's runs outside the caller's ``TorchDispatchMode``s: a ``FlopCounterMode`` (or any mode
    that counts or logs ops) around a layer's first call would otherwise count the probe's two extra runs
    of the block as the caller's work. Only where every probe tensor is a plain tensor: a tensor
    subclass (a ``FakeTensor``, a functional tensor under tracing) needs its mode to run at all."""
    plain = all(type(value) in (torch.Tensor, torch.nn.Parameter) for value in _tensors_of(probe))
    if not plain:
        yield
        return
    with _disable_current_modes():
        yield


def _tensors_of(probe: Mapping[str, object]) -> Iterator[torch.Tensor]:
    """Every tensor of a probe's inputs (its values, and the tensors of a value that is a dict)."""
    for value in probe.values():
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, Mapping):
            yield from (item for item in value.values() if isinstance(item, torch.Tensor))


def _written(weights: Params, given: Params) -> list[str]:
    """The names of ``weights`` whose values differ from the copies ``given`` (NaN equal to NaN)."""
    return [
        name
        for name, weight in weights.items()
        if not bool(
            ((weight.detach() == given[name]) | (weight.detach().isnan() & given[name].isnan())).all()
        )
    ]


def _said_data(magnitude: float, weakness: str | None) -> str:
    """The user's data a verdict was reached on, as a refusal names it."""
    said = "" if weakness is None else f"; {weakness}"
    return f"on this call's data (largest |query, key, value| {magnitude:.2g}{said})"


class _KernelRaised(Exception):
    """A kernel's forward or decode raised during its probe (the message says what)."""


@contextlib.contextmanager
def _raised_is_a_verdict() -> Iterator[None]:
    """An exception from the kernel's own call becomes the probe's verdict (``_KernelRaised``); an
    environment switch the user set to neither yes nor no is the user's error, raised as it is."""
    try:
        yield
    except EnvironmentSwitchError:
        raise
    except Exception as error:
        raise _KernelRaised(f"it raised {type(error).__name__}: {error}") from error


def _flatten(result: tuple[torch.Tensor, Params]) -> dict[str, torch.Tensor]:
    out, new_params = result
    return {"out": out, **{f"new {k}": v for k, v in new_params.items()}}


def _all_finite(result: tuple[torch.Tensor, Params]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in _flatten(result).values())


def _compare(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], tolerance: float) -> str | None:
    """The first of ``want``'s tensors that ``got`` does not match within ``tolerance``, said."""
    if set(got) != set(want):
        return f"it returned {sorted(got)}, the torch path {sorted(want)}"
    for name, reference in want.items():
        value = got[name]
        if value.shape != reference.shape:
            return f"{name} has shape {tuple(value.shape)}, the torch path's {tuple(reference.shape)}"
        error = relative_error(value.detach(), reference.detach())
        if not error <= tolerance:  # NaN fails too
            return f"{name} differs by a relative RMS error of {error:.3g}, over the {tolerance:g} allowed"
    return None


def _gradients(
    results: dict[str, torch.Tensor], projection: dict[str, torch.Tensor], leaves: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The gradient of ``sum(results * projection)`` w.r.t. each leaf (zero where none flows)."""
    terms = [(results[k] * projection[k]).sum() for k in results if results[k].requires_grad]
    names = list(leaves)
    grads = torch.autograd.grad(sum(terms), [leaves[k] for k in names], allow_unused=True) if terms else []
    found = dict(zip(names, grads, strict=True)) if terms else {}
    return {
        f"the gradient of {k}": torch.zeros_like(v) if found.get(k) is None else found[k]
        for k, v in leaves.items()
    }


def _compare_gradients(
    actual: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    tensors: Mapping[str, torch.Tensor | None],
    weights: Params,
    tolerance: float,
) -> str | None:
    """Both paths' gradients of one random projection of the results, w.r.t. every input that records
    a graph."""
    leaves = {k: v for k, v in tensors.items() if v is not None and v.requires_grad}
    leaves.update({k: v for k, v in weights.items() if v.requires_grad})
    if not leaves:
        return None
    generator = torch.Generator(device=expected["out"].device).manual_seed(1)
    projection = {
        k: torch.randn(v.shape, generator=generator, device=v.device, dtype=torch.float32).to(v.dtype)
        for k, v in expected.items()
    }
    with _raised_is_a_verdict():  # the kernel's backward runs here
        kernel_gradients = _gradients(actual, projection, leaves)
    torch_gradients = _gradients(expected, projection, leaves)
    finite = [
        all(bool(torch.isfinite(g).all()) for g in grads.values())
        for grads in (torch_gradients, kernel_gradients)
    ]
    if finite == [True, False]:
        return _NotFinite("its gradients are not finite where the torch path's are")
    return _compare(kernel_gradients, torch_gradients, tolerance)


__all__ = [
    "GRADIENT_FACTOR",
    "MATMUL_PRECISION_DTYPES",
    "KernelCheckWarning",
    "PROBE_MINI_BATCHES",
    "SYNTHETIC_SEED",
    "TOLERANCES",
    "check_block",
    "check_decode",
    "DEFERRALS_BEFORE_WARNING",
    "SETTINGS_CHANGES_BEFORE_WARNING",
    "Deferred",
    "checked",
    "failure",
    "forget_verdicts",
    "joined_weights",
    "refusal_message",
    "signature",
    "tolerance_for",
    "warn_refused",
]
