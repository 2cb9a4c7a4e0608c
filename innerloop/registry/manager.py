"""The plugin registry: pluggy underneath, typed registrars on top.

``get_registry()`` builds the process-wide registry on first use: the built-in plugins
(``innerloop.plugins.DEFAULT_PLUGINS``), then the ``innerloop`` entry points of installed packages
unless the environment forbids them:

- ``INNERLOOP_DISABLE_EXTERNAL_PLUGINS=1`` loads no entry-point plugin at all;
- ``INNERLOOP_PLUGINS=name1,name2`` loads only the entry points with those names.

Every registered object remembers the plugin it came from (its origin), shown by
``innerloop plugins``.

Registering a plugin is all or nothing: if one of its hooks raises, one of its objects fails
validation or a name clashes, the registry is left exactly as it was. An entry-point plugin that
fails to load is skipped with one :class:`PluginLoadWarning` and listed as broken; only asking for a
name it would have provided fails, with the reason.
"""

from __future__ import annotations

import importlib
import inspect
import os
import threading
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import pluggy
import torch

from innerloop.core.protocol import InnerLoss, InnerModel, UpdateRule, Views
from innerloop.kernels.spec import KernelSpec
from innerloop.registry import hookspecs
from innerloop.testing.checks import (
    REGISTRATION_TOLERANCE,
    check_activation_derivatives,
    check_loss_gradient,
    check_pairs_deterministic,
    check_stack_matches_forward,
    check_update_rule,
)

ENTRY_POINT_GROUP = "innerloop"
DISABLE_ENV = "INNERLOOP_DISABLE_EXTERNAL_PLUGINS"
ALLOW_ENV = "INNERLOOP_PLUGINS"
BUILTIN_PREFIX = "builtin:"

KINDS = ("inner_model", "inner_loss", "update_rule", "kernel", "model_inner_loss", "model_update_rule")


class PluginError(ValueError):
    """A plugin does not conform to the protocol, or clashes with one already registered."""


class PluginLoadWarning(UserWarning):
    """An external (entry-point) plugin failed to load and was skipped."""


@dataclass(frozen=True)
class Entry:
    """One registered object and where it came from."""

    kind: str
    name: str
    obj: Any
    origin: str


@dataclass(frozen=True)
class BrokenPlugin:
    """An entry-point plugin that failed to load and was skipped.

    ``names`` are the ``(kind, name)`` pairs it registered or tried to register before it failed:
    empty when it failed to import (what it would have provided is then unknowable).
    """

    entry_point: str
    distribution: str
    error: str
    names: tuple[tuple[str, str], ...] = ()

    @property
    def origin(self) -> str:
        return f"{self.entry_point} ({self.distribution})"

    def message(self) -> str:
        """One line: which plugin, from which distribution, what went wrong, what to do."""
        return (
            f"plugin {self.entry_point!r} from distribution {self.distribution!r} failed to load and was "
            f"skipped: {self.error} (fix or uninstall {self.distribution!r}, or set {DISABLE_ENV}=1 to load "
            "no external plugin)"
        )


# --------------------------------------------------------------------------------------------------
# Validation: what each registrar checks before accepting an object
# --------------------------------------------------------------------------------------------------


def _missing_methods(obj: Any, required: Iterable[str]) -> list[str]:
    missing = []
    for method in required:
        attr = getattr(obj, method, None)
        if attr is None or not callable(attr) or getattr(attr, "__isabstractmethod__", False):
            missing.append(method)
    return missing


def _check_name(obj: Any, kind: str) -> str:
    name = getattr(obj, "name", None)
    if not isinstance(name, str) or not name.strip():
        raise PluginError(f"{kind} {obj!r} has no 'name' (a non-empty string); got {name!r}")
    return name


def _conformance(label: str, name: str, check: Callable[[], None]) -> None:
    """Run a cheap conformance check of :mod:`innerloop.testing.checks`; its failure is a refusal."""
    try:
        check()
    except AssertionError as error:
        raise PluginError(
            f"{label} {name!r} fails a conformance check: {error} "
            "(innerloop.testing has the full checks to run in the plugin's own tests)"
        ) from error
    except PluginError:
        raise
    except Exception as error:  # the plugin's own failure, reported as a rejection
        raise PluginError(f"{label} {name!r} failed its conformance check: {error!r}") from error


def _validate_inner_model(model: Any) -> str:
    if inspect.isclass(model):
        raise PluginError(f"register an instance of the inner model, not the class {model.__name__}")
    name = _check_name(model, "inner model")
    missing = _missing_methods(model, ("param_shapes", "init_params", "forward"))
    if missing:
        raise PluginError(f"inner model {name!r} lacks required method(s) {missing} of InnerModel")
    heads, head_dim = 2, 4
    try:
        shapes = model.param_shapes(head_dim)
        params = model.init_params(heads, head_dim)
        for key, shape in shapes.items():
            if key not in params or tuple(params[key].shape) != (heads, *shape):
                got = tuple(params[key].shape) if key in params else "missing"
                raise PluginError(
                    f"inner model {name!r}: init_params()[{key!r}] has shape {got}, "
                    f"param_shapes() says {(heads, *shape)}"
                )
        x = torch.zeros(heads, 3, head_dim)
        out = model.forward(params, x)
    except PluginError:
        raise
    except Exception as error:  # the model's own failure, reported as a rejection
        raise PluginError(f"inner model {name!r} failed its smoke test: {error!r}") from error
    if tuple(out.shape) != tuple(x.shape):
        raise PluginError(
            f"inner model {name!r}: forward maps [heads, N, f] = {tuple(x.shape)} to {tuple(out.shape)}; "
            "it must return the same shape (g maps head_dim features to head_dim features)"
        )

    def stack_and_activations() -> None:
        # float64 weights perturbed so that every term (zero-initialised biases too) matters
        weights = {k: v.double() + 0.1 * torch.randn(v.shape, dtype=torch.float64) for k, v in params.items()}
        check_stack_matches_forward(
            model, weights, torch.randn(heads, 3, head_dim, dtype=torch.float64), REGISTRATION_TOLERANCE
        )
        check_activation_derivatives(
            model, 3 * torch.randn(4, 5, dtype=torch.float64), REGISTRATION_TOLERANCE
        )

    _conformance("inner model", name, stack_and_activations)
    return name


def _validate_inner_loss(loss: Any) -> str:
    if inspect.isclass(loss):
        raise PluginError(f"register an instance of the inner loss, not the class {loss.__name__}")
    name = _check_name(loss, "inner loss")
    missing = _missing_methods(loss, ("pairs", "token_loss", "token_loss_grad", "init_carry"))
    if missing:
        raise PluginError(f"inner loss {name!r} lacks required method(s) {missing} of InnerLoss")
    batch, heads, tokens, head_dim = 1, 2, 3, 4
    try:
        views = Views(*(torch.randn(batch, heads, tokens, head_dim) for _ in range(3)))
        carry = loss.init_carry(batch, heads, head_dim, views.key)
        pairs = loss.pairs(views, carry)
        per_token = loss.token_loss(pairs.inputs, pairs.targets)
    except Exception as error:
        raise PluginError(f"inner loss {name!r} failed its smoke test: {error!r}") from error
    expected = (batch, heads, tokens, head_dim)
    if tuple(pairs.inputs.shape) != expected or tuple(pairs.targets.shape) != expected:
        raise PluginError(
            f"inner loss {name!r}: pairs() must give inputs and targets of shape [B, H, T, f] = {expected}; "
            f"got {tuple(pairs.inputs.shape)} and {tuple(pairs.targets.shape)}"
        )
    if tuple(per_token.shape) != expected[:-1]:
        raise PluginError(
            f"inner loss {name!r}: token_loss() must reduce the feature dim to [B, H, T] = {expected[:-1]}; "
            f"got {tuple(per_token.shape)}"
        )

    def gradient_and_determinism() -> None:
        check_pairs_deterministic(loss, views, carry)
        if type(loss).token_loss_grad is not InnerLoss.token_loss_grad:  # a closed form to check
            prediction = torch.randn(expected, dtype=torch.float64)
            check_loss_gradient(loss, prediction, pairs.targets, REGISTRATION_TOLERANCE)

    _conformance("inner loss", name, gradient_and_determinism)
    return name


def _validate_update_rule(rule: Any) -> str:
    if inspect.isclass(rule):
        raise PluginError(f"register an instance of the update rule, not the class {rule.__name__}")
    name = _check_name(rule, "update rule")
    missing = _missing_methods(rule, ("forward", "check_model"))
    if missing:
        raise PluginError(f"update rule {name!r} lacks required method(s) {missing} of UpdateRule")
    return name


def _check_update_rule_against_naive_loop(rule: Any, name: str) -> None:
    """The rule equals the naive token loop on a tiny TTT-Linear problem, whole and cut mid-mini-batch.

    A rule that cannot run a linear model is checked only by its own tests.
    """
    from innerloop.plugins.losses.reconstruction import Reconstruction
    from innerloop.plugins.models.linear import LinearModel

    model = LinearModel()
    if _conformance_refusal(rule, model, name) is not None:
        return
    problem = {"batch": 1, "heads": 1, "head_dim": 2, "tokens": 5, "mini_batch_size": 2}
    _conformance(
        "update rule",
        name,
        lambda: check_update_rule(rule, model, Reconstruction(), tolerance=REGISTRATION_TOLERANCE, **problem),
    )


def _conformance_refusal(rule: Any, model: InnerModel, name: str) -> str | None:
    """``rule.check_model(model)``, its own failure reported as a rejection."""
    try:
        return rule.check_model(model)
    except Exception as error:
        raise PluginError(
            f"update rule {name!r} failed its smoke test: check_model raised {error!r}"
        ) from error


def _validate_kernel(spec: Any) -> str:
    if not isinstance(spec, KernelSpec):
        raise PluginError(f"register a KernelSpec for a kernel; got {type(spec).__name__}")
    name = _check_name(spec, "kernel")
    if not callable(spec.forward) or not callable(spec.verify):
        raise PluginError(f"kernel {name!r}: 'forward' and 'verify' must be callable")
    return name


def _validate_model_inner_loss(loss: Any) -> str:
    if inspect.isclass(loss):
        raise PluginError(f"register an instance of the model inner loss, not the class {loss.__name__}")
    name = _check_name(loss, "model inner loss")
    missing = _missing_methods(loss, ("chunk_loss",))
    if missing:
        raise PluginError(f"model inner loss {name!r} lacks required method(s) {missing} of ModelInnerLoss")
    batch, chunk, vocab = 2, 4, 5
    try:
        logits = torch.randn(batch, chunk, vocab)
        losses = loss.chunk_loss(logits, torch.randint(vocab, (batch, chunk)))
    except Exception as error:
        raise PluginError(f"model inner loss {name!r} failed its smoke test: {error!r}") from error
    if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (batch,):
        got = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise PluginError(
            f"model inner loss {name!r}: chunk_loss(logits [B, C, V], ids [B, C]) must return one loss per "
            f"sequence, [B] = {(batch,)}; got {got}"
        )
    return name


def _validate_model_update_rule(rule: Any) -> str:
    if inspect.isclass(rule):
        raise PluginError(f"register an instance of the model update rule, not the class {rule.__name__}")
    name = _check_name(rule, "model update rule")
    missing = _missing_methods(rule, ("step",))
    if missing:
        raise PluginError(f"model update rule {name!r} lacks required method(s) {missing} of ModelUpdateRule")
    try:
        fast = {"w": torch.randn(2, 3, 4, requires_grad=True), "v": torch.randn(2, 4, requires_grad=True)}
        losses = (fast["w"] ** 2).sum((1, 2)) + fast["v"].sum(1)  # [B]
        new = rule.step(fast, losses, lr=0.1, max_grad_norm=1.0, create_graph=False)
    except Exception as error:
        raise PluginError(f"model update rule {name!r} failed its smoke test: {error!r}") from error
    shapes = {k: tuple(v.shape) for k, v in fast.items()}
    got = {k: tuple(v.shape) for k, v in new.items()} if isinstance(new, Mapping) else type(new).__name__
    if got != shapes:
        raise PluginError(
            f"model update rule {name!r}: step() must return the fast weights with the same names and shapes "
            f"{shapes}; got {got}"
        )
    return name


_VALIDATORS: dict[str, Callable[[Any], str]] = {
    "inner_model": _validate_inner_model,
    "inner_loss": _validate_inner_loss,
    "update_rule": _validate_update_rule,
    "kernel": _validate_kernel,
    "model_inner_loss": _validate_model_inner_loss,
    "model_update_rule": _validate_model_update_rule,
}

#: Checks run only on plugins that do not ship with innerloop (origin not ``builtin:...``). The
#: built-in update rules are checked against the naive loop to float64 precision by the test suite
#: (tests/core/test_invariances.py); checking them at every start-up would cost ~2 s (the first
#: ``torch.func.grad`` call imports torch's compiler stack).
_EXTERNAL_CHECKS: dict[str, Callable[[Any, str], None]] = {
    "update_rule": _check_update_rule_against_naive_loop,
}

_HOOK_OF_KIND = {
    "inner_model": "register_inner_models",
    "inner_loss": "register_inner_losses",
    "update_rule": "register_update_rules",
    "kernel": "register_kernels",
    "model_inner_loss": "register_model_inner_losses",
    "model_update_rule": "register_model_update_rules",
}


# --------------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------------


class _Staging:
    """What one plugin registers, held back until all its hooks have run (then committed at once)."""

    def __init__(self) -> None:
        self.entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
        self.attempted: list[tuple[str, str]] = []  # (kind, name) of every object offered, accepted or not


class Registry:
    """Registered inner models, inner losses, update rules, kernels and the model-level inner losses
    and update rules (TTT-E2E), by name, with origins; and the entry-point plugins that failed to load."""

    def __init__(self) -> None:
        self.plugin_manager = pluggy.PluginManager("innerloop")
        self.plugin_manager.add_hookspecs(hookspecs)
        self._entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
        self._broken: list[BrokenPlugin] = []

    # ---- registering -----------------------------------------------------------------------------

    def registrar(self, kind: str, origin: str, staging: _Staging) -> Callable[[Any], Any]:
        """The ``register`` callable handed to a plugin's hook for ``kind``; accepted objects go to
        ``staging`` (the registry itself changes only when the whole plugin has been accepted)."""
        validate = _VALIDATORS[kind]
        label = kind.replace("_", " ")

        def register(obj: Any) -> Any:
            offered = getattr(obj, "name", None)
            if isinstance(offered, str):
                staging.attempted.append((kind, offered))
            # Smoke tests may take gradients: run them the same way whatever context the registry is
            # first built in (e.g. under torch.no_grad or inference mode in a validation worker). Their
            # random inputs come from a forked generator: building the registry (on first use) must not
            # move the user's seed, or the first layer made after manual_seed would differ from later ones.
            with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():
                name = validate(obj)
                if kind in _EXTERNAL_CHECKS and not origin.startswith(BUILTIN_PREFIX):
                    _EXTERNAL_CHECKS[kind](obj, name)
            if name in self._entries[kind]:
                raise PluginError(
                    f"{label} name {name!r} from plugin {origin!r} is already registered "
                    f"by plugin {self._entries[kind][name].origin!r}; choose another name"
                )
            if name in staging.entries[kind]:
                raise PluginError(f"plugin {origin!r} registers the {label} name {name!r} twice")
            staging.entries[kind][name] = Entry(kind, name, obj, origin)
            return obj

        register.__doc__ = f"Register a {label} (validated against the protocol)."
        return register

    def add_plugin(self, plugin: Any, origin: str | None = None) -> None:
        """Register a plugin (module or object with hookimpls) and run its registration hooks.

        All or nothing: if the plugin is refused (a hook raises, an object fails validation, a name
        clashes, the plugin or its origin is already registered), the error is raised and the
        registry is left exactly as it was.
        """
        origin = origin or getattr(plugin, "__name__", None) or type(plugin).__name__
        self._add(plugin, origin, _Staging())

    def _add(self, plugin: Any, origin: str, staging: _Staging) -> None:
        self._check_new(plugin, origin)
        try:
            self.plugin_manager.register(plugin, name=origin)
            self.plugin_manager.check_pending()
        except (pluggy.PluginValidationError, ValueError) as error:
            self._forget(plugin)
            raise PluginError(f"plugin {origin!r} is not a valid innerloop plugin: {error}") from error
        try:
            for kind, hook_name in _HOOK_OF_KIND.items():
                for impl in getattr(self.plugin_manager.hook, hook_name).get_hookimpls():
                    if impl.plugin is plugin:
                        impl.function(register=self.registrar(kind, origin, staging))
        except BaseException:
            self._forget(plugin)
            raise
        for kind, accepted in staging.entries.items():
            self._entries[kind].update(accepted)

    def _check_new(self, plugin: Any, origin: str) -> None:
        """Refuse, before touching anything, a plugin object or an origin that is already registered."""
        if self.plugin_manager.is_registered(plugin):
            raise PluginError(
                f"plugin {self.plugin_manager.get_name(plugin)!r} is already registered (this same object); "
                "nothing was changed"
            )
        if self.plugin_manager.has_plugin(origin):
            raise PluginError(
                f"a plugin named {origin!r} is already registered; nothing was changed. To replace it (e.g. when "
                f"re-running a notebook cell) call innerloop.get_registry().remove_plugin({origin!r}) first, "
                "or register this one under another origin"
            )

    def _forget(self, plugin: Any) -> None:
        """Undo a partial pluggy registration of ``plugin`` (this object only, never another by name)."""
        if self.plugin_manager.is_registered(plugin):
            self.plugin_manager.unregister(plugin)

    def add_entry_point(self, entry_point: Any) -> BrokenPlugin | None:
        """Load and register one ``innerloop`` entry point; never raises for the plugin's faults.

        A plugin that fails to import, whose hook raises or whose object is refused is skipped: the
        registry is left as it was, one :class:`PluginLoadWarning` says why, and the failure is
        remembered (and returned) so that asking for one of its names explains itself.
        """
        distribution = _distribution_of(entry_point)
        origin = f"{entry_point.name} ({distribution})"
        staging = _Staging()
        try:
            plugin = entry_point.load()
        except Exception as error:
            failure = f"importing {entry_point.value!r} raised {type(error).__name__}: {error}"
        else:
            try:
                self._add(plugin, origin, staging)
                return None
            except PluginError as error:
                failure = str(error)
            except Exception as error:
                failure = f"its registration hook raised {type(error).__name__}: {error}"
        broken = BrokenPlugin(entry_point.name, distribution, failure, tuple(staging.attempted))
        self._broken.append(broken)
        warnings.warn(broken.message(), PluginLoadWarning, stacklevel=2)
        return broken

    def broken(self) -> list[BrokenPlugin]:
        """The entry-point plugins that failed to load (skipped), in load order."""
        return list(self._broken)

    def remove_plugin(self, origin: str) -> None:
        """Unregister a plugin and everything it registered (used by tests and notebooks)."""
        plugin = self.plugin_manager.get_plugin(origin)
        if plugin is not None:
            self.plugin_manager.unregister(plugin)
        for entries in self._entries.values():
            for name in [n for n, e in entries.items() if e.origin == origin]:
                del entries[name]

    # ---- looking up ------------------------------------------------------------------------------

    def names(self, kind: str) -> list[str]:
        """Registered names of a kind, sorted."""
        self._check_kind(kind)
        return sorted(self._entries[kind])

    def entries(self, kind: str | None = None) -> list[Entry]:
        kinds = KINDS if kind is None else (self._check_kind(kind),)
        return [e for k in kinds for e in sorted(self._entries[k].values(), key=lambda e: e.name)]

    def get(self, kind: str, name: str) -> Any:
        """The object registered under ``name``; a ValueError listing the valid names otherwise."""
        self._check_kind(kind)
        entries = self._entries[kind]
        if not isinstance(name, str) or name not in entries:
            raise self.unknown_name_error(kind, name)
        return entries[name].obj

    def unknown_name_error(self, kind: str, name: Any) -> ValueError:
        """The error for asking for a name that is not registered: the valid names, and the broken
        plugin that provides it (then a :class:`PluginError`) or the broken ones that may have."""
        label = kind.replace("_", " ")
        hint = self.broken_hint(kind, name)
        if any((kind, name) in b.names for b in self._broken):
            return PluginError(f"{label} {name!r} is not registered: {hint}")
        message = f"unknown {label} {name!r}; registered: {self.names(kind)} (see `innerloop plugins`)"
        return ValueError(f"{message}. {hint}" if hint else message)

    def broken_hint(self, kind: str, name: Any) -> str:
        """Why ``name`` may be missing: the broken plugin that provides it, or every broken plugin
        when it is not known which would have (one that failed to import); "" when none is broken."""
        providers = [b for b in self._broken if (kind, name) in b.names]
        if providers:
            return providers[0].message()
        if self._broken:
            return "Plugins that failed to load and may have provided it: " + "; ".join(
                b.message() for b in self._broken
            )
        return ""

    def inner_model(self, name: str) -> InnerModel:
        return self.get("inner_model", name)

    def inner_loss(self, name: str) -> InnerLoss:
        return self.get("inner_loss", name)

    def update_rule(self, name: str) -> UpdateRule:
        return self.get("update_rule", name)

    def model_inner_loss(self, name: str) -> Any:
        """The :class:`~innerloop.core.model_inner.ModelInnerLoss` registered under ``name``."""
        return self.get("model_inner_loss", name)

    def model_update_rule(self, name: str) -> Any:
        """The :class:`~innerloop.core.model_inner.ModelUpdateRule` registered under ``name``."""
        return self.get("model_update_rule", name)

    def kernels(self) -> list[KernelSpec]:
        return [e.obj for e in self.entries("kernel")]

    def kernels_for(self, inner_model: str, inner_loss: str, update_rule: str) -> list[KernelSpec]:
        """Kernels registered for this combination, best (highest priority) first."""
        matching = [
            k
            for k in self.kernels()
            if (k.inner_model, k.inner_loss, k.update_rule) == (inner_model, inner_loss, update_rule)
        ]
        return sorted(matching, key=lambda k: -k.priority)

    def _check_kind(self, kind: str) -> str:
        if kind not in KINDS:
            raise ValueError(f"unknown plugin kind {kind!r}; valid kinds: {list(KINDS)}")
        return kind


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _allowed_external() -> tuple[bool, set[str] | None]:
    if os.environ.get(DISABLE_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return False, None
    allow = os.environ.get(ALLOW_ENV)
    if allow is None:
        return True, None
    return True, {name.strip() for name in allow.split(",") if name.strip()}


def _distribution_of(entry_point: Any) -> str:
    """The name of the distribution that installed ``entry_point`` (its value if unknown)."""
    dist = getattr(entry_point, "dist", None)
    return dist.name if dist is not None else entry_point.value


def _entry_points() -> Iterable[Any]:
    """The installed ``innerloop`` entry points (tests replace this function to fake some)."""
    return metadata.entry_points(group=ENTRY_POINT_GROUP)


def load_entry_point_plugins(registry: Registry) -> list[str]:
    """Load the ``innerloop`` entry points the environment allows; returns the origins that loaded.

    One that fails is skipped with a warning (see :meth:`Registry.add_entry_point`).
    """
    enabled, allowlist = _allowed_external()
    if not enabled:
        return []
    loaded = []
    for entry_point in _entry_points():
        if allowlist is not None and entry_point.name not in allowlist:
            continue
        if registry.add_entry_point(entry_point) is None:
            loaded.append(f"{entry_point.name} ({_distribution_of(entry_point)})")
    return loaded


def build_registry(include_external: bool = True) -> Registry:
    """A fresh registry with the built-ins and (if allowed) the entry-point plugins."""
    from innerloop.plugins import DEFAULT_PLUGINS

    registry = Registry()
    for module_name in DEFAULT_PLUGINS:
        registry.add_plugin(importlib.import_module(module_name), origin=f"{BUILTIN_PREFIX}{module_name}")
    if include_external:
        load_entry_point_plugins(registry)
    return registry


_REGISTRY: Registry | None = None
_LOCK = threading.RLock()


def get_registry() -> Registry:
    """The process-wide registry, built on first use."""
    global _REGISTRY
    with _LOCK:
        if _REGISTRY is None:
            _REGISTRY = build_registry()
        return _REGISTRY


def reset_registry() -> None:
    """Forget the process-wide registry; the next :func:`get_registry` rebuilds it."""
    global _REGISTRY
    with _LOCK:
        _REGISTRY = None


def register(plugin: Any, origin: str | None = None) -> None:
    """Register an in-process plugin (module or object with hookimpls) in the global registry."""
    get_registry().add_plugin(plugin, origin=origin)


def available(kind: str) -> list[str]:
    """Registered names of ``kind`` (one of :data:`KINDS`)."""
    return get_registry().names(kind)


def format_plugin_table(registry: Registry | None = None) -> str:
    """A plain-text table of every registered plugin (kind, name, origin), then the broken ones (skipped)
    with the reason each failed."""
    registry = registry or get_registry()
    rows = [(e.kind, e.name, e.origin) for e in registry.entries()]
    header = ("kind", "name", "origin")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    broken = registry.broken()
    if broken:
        lines += ["", f"broken plugins (skipped; {DISABLE_ENV}=1 loads no external plugin):"]
        for plugin in broken:
            provided = ", ".join(f"{kind} {name!r}" for kind, name in plugin.names) or "unknown"
            lines.append(f"  {plugin.origin}: {plugin.error} [names: {provided}]")
    return "\n".join(lines)
