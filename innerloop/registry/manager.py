"""The plugin registry: pluggy underneath, typed registrars on top.

``get_registry()`` builds the process-wide registry on first use: the built-in plugins
(``innerloop.plugins.DEFAULT_PLUGINS``), then the ``innerloop`` entry points of installed packages
unless the environment forbids them:

- ``INNERLOOP_DISABLE_EXTERNAL_PLUGINS=1`` loads no entry-point plugin at all;
- ``INNERLOOP_PLUGINS=name1,name2`` loads only the entry points with those names.

Every registered object remembers the plugin it came from (its origin), shown by
``innerloop plugins``.
"""

from __future__ import annotations

import importlib
import inspect
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import pluggy
import torch

from innerloop.core.protocol import InnerLoss, InnerModel, UpdateRule, Views
from innerloop.kernels.spec import KernelSpec
from innerloop.registry import hookspecs

ENTRY_POINT_GROUP = "innerloop"
DISABLE_ENV = "INNERLOOP_DISABLE_EXTERNAL_PLUGINS"
ALLOW_ENV = "INNERLOOP_PLUGINS"

KINDS = ("inner_model", "inner_loss", "update_rule", "kernel", "model_inner_loss", "model_update_rule")


class PluginError(ValueError):
    """A plugin does not conform to the protocol, or clashes with one already registered."""


@dataclass(frozen=True)
class Entry:
    """One registered object and where it came from."""

    kind: str
    name: str
    obj: Any
    origin: str


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
    return name


def _validate_update_rule(rule: Any) -> str:
    if inspect.isclass(rule):
        raise PluginError(f"register an instance of the update rule, not the class {rule.__name__}")
    name = _check_name(rule, "update rule")
    missing = _missing_methods(rule, ("forward", "check_model"))
    if missing:
        raise PluginError(f"update rule {name!r} lacks required method(s) {missing} of UpdateRule")
    return name


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


class Registry:
    """Registered inner models, inner losses, update rules, kernels and the model-level inner losses
    and update rules (TTT-E2E), by name, with origins."""

    def __init__(self) -> None:
        self.plugin_manager = pluggy.PluginManager("innerloop")
        self.plugin_manager.add_hookspecs(hookspecs)
        self._entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}

    # ---- registering -----------------------------------------------------------------------------

    def registrar(self, kind: str, origin: str) -> Callable[[Any], Any]:
        """The ``register`` callable handed to a plugin's hook for ``kind``."""
        validate = _VALIDATORS[kind]
        entries = self._entries[kind]

        def register(obj: Any) -> Any:
            # Smoke tests may take gradients: run them the same way whatever context the registry is
            # first built in (e.g. under torch.no_grad or inference mode in a validation worker). Their
            # random inputs come from a forked generator: building the registry (on first use) must not
            # move the user's seed, or the first layer made after manual_seed would differ from later ones.
            with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():
                name = validate(obj)
            if name in entries:
                raise PluginError(
                    f"{kind.replace('_', ' ')} name {name!r} from plugin {origin!r} is already registered "
                    f"by plugin {entries[name].origin!r}; choose another name"
                )
            entries[name] = Entry(kind, name, obj, origin)
            return obj

        register.__doc__ = f"Register a {kind.replace('_', ' ')} (validated against the protocol)."
        return register

    def add_plugin(self, plugin: Any, origin: str | None = None) -> None:
        """Register a plugin (module or object with hookimpls) and run its registration hooks."""
        origin = origin or getattr(plugin, "__name__", None) or type(plugin).__name__
        if self.plugin_manager.is_registered(plugin):
            raise PluginError(f"plugin {origin!r} is already registered")
        try:
            self.plugin_manager.register(plugin, name=origin)
            self.plugin_manager.check_pending()
        except (pluggy.PluginValidationError, ValueError) as error:
            self.remove_plugin(origin)
            raise PluginError(f"plugin {origin!r} is not a valid innerloop plugin: {error}") from error
        try:
            for kind, hook_name in _HOOK_OF_KIND.items():
                for impl in getattr(self.plugin_manager.hook, hook_name).get_hookimpls():
                    if impl.plugin is plugin:
                        impl.function(register=self.registrar(kind, origin))
        except Exception:
            self.remove_plugin(origin)
            raise

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
            raise ValueError(
                f"unknown {kind.replace('_', ' ')} {name!r}; registered: {sorted(entries)} "
                f"(see `innerloop plugins`)"
            )
        return entries[name].obj

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


def load_entry_point_plugins(registry: Registry) -> list[str]:
    """Load the ``innerloop`` entry points the environment allows; returns their origins."""
    enabled, allowlist = _allowed_external()
    if not enabled:
        return []
    loaded = []
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if allowlist is not None and entry_point.name not in allowlist:
            continue
        dist = getattr(entry_point, "dist", None)
        origin = f"{entry_point.name} ({dist.name if dist else entry_point.value})"
        try:
            plugin = entry_point.load()
        except Exception as error:
            raise PluginError(f"entry-point plugin {origin} failed to import: {error!r}") from error
        registry.add_plugin(plugin, origin=origin)
        loaded.append(origin)
    return loaded


def build_registry(include_external: bool = True) -> Registry:
    """A fresh registry with the built-ins and (if allowed) the entry-point plugins."""
    from innerloop.plugins import DEFAULT_PLUGINS

    registry = Registry()
    for module_name in DEFAULT_PLUGINS:
        registry.add_plugin(importlib.import_module(module_name), origin=f"builtin:{module_name}")
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
    """A plain-text table of every registered plugin: kind, name, origin."""
    registry = registry or get_registry()
    rows = [(e.kind, e.name, e.origin) for e in registry.entries()]
    header = ("kind", "name", "origin")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
