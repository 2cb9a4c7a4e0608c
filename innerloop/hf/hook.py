"""Register innerloop's model with transformers' Auto classes, without importing transformers.

``import innerloop`` calls :func:`install`. transformers is not imported by it (it takes seconds);
instead, the two Auto-class modules are watched:

- ``transformers.models.auto.configuration_auto`` (``AutoConfig``): when it has been loaded,
  :class:`~innerloop.hf.configuration.InnerloopConfig` is registered for ``model_type="innerloop"``;
- ``transformers.models.auto.modeling_auto`` (``AutoModelForCausalLM``, ``AutoModel``): when it has
  been loaded *and* an :class:`~innerloop.hf.configuration.InnerloopConfig` has been built (whichever
  comes second), :class:`~innerloop.hf.modeling.InnerloopForCausalLM` and
  :class:`~innerloop.hf.modeling.InnerloopModel` are registered for that config.
  Registering the model imports transformers' modeling stack (seconds), and other libraries load
  ``modeling_auto`` without using innerloop's model (torchmetrics does, under Lightning, so every
  ``innerloop train`` would pay for it). Every way the Auto classes reach innerloop's model builds the
  config first (``from_pretrained`` loads it, ``from_config`` is given it), so nothing is missed.
- ``innerloop.hf.modeling`` itself: its own imports of transformers load ``modeling_auto``, when the
  model is not defined yet; with a config built before, the model is registered once its import ends.

A module already loaded (transformers imported before innerloop) is handled at once; one not yet
loaded is handled right after it is, by a finder on ``sys.meta_path`` that wraps its loader. Either
import order ends in the same registration, and a user who never touches the Auto classes never
pays for them.
"""

from __future__ import annotations

import importlib.machinery
import sys
import warnings
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

CONFIG_MODULE = "transformers.models.auto.configuration_auto"
MODEL_MODULE = "transformers.models.auto.modeling_auto"
INNERLOOP_MODELING = "innerloop.hf.modeling"


def register_config() -> None:
    """``AutoConfig.register("innerloop", InnerloopConfig)`` (idempotent)."""
    from transformers import AutoConfig

    from innerloop.hf.configuration import MODEL_TYPE, InnerloopConfig

    AutoConfig.register(MODEL_TYPE, InnerloopConfig, exist_ok=True)


def register_model() -> None:
    """``AutoModelForCausalLM.register(InnerloopConfig, InnerloopForCausalLM)`` and
    ``AutoModel.register(InnerloopConfig, InnerloopModel)`` (idempotent)."""
    modeling = sys.modules.get(INNERLOOP_MODELING)
    if modeling is not None and not hasattr(modeling, "InnerloopModel"):
        # its own imports of transformers loaded the Auto classes, before it defines the model (a config
        # built before it was imported): registered once its import ends (register_model_after_import)
        return
    from transformers import AutoModel, AutoModelForCausalLM

    from innerloop.hf.configuration import InnerloopConfig
    from innerloop.hf.modeling import InnerloopForCausalLM, InnerloopModel

    register_config()  # the model's registration needs the config's
    AutoModelForCausalLM.register(InnerloopConfig, InnerloopForCausalLM, exist_ok=True)
    AutoModel.register(InnerloopConfig, InnerloopModel, exist_ok=True)


def register_model_when_wanted() -> None:
    """Register the model now if an InnerloopConfig has been built, or else when the first one is."""
    from innerloop.hf import configuration

    configuration.when_first_built(lambda: _register(MODEL_MODULE, register_model))


def register_model_after_import() -> None:
    """Run once :mod:`innerloop.hf.modeling` is imported (a watched module): register the model if the
    Auto classes were loaded meanwhile (its own imports of transformers load them, when the model is not
    yet defined: the registration skipped it then) or before."""
    if MODEL_MODULE in sys.modules:
        register_model_when_wanted()


_REGISTRATIONS: dict[str, Callable[[], None]] = {
    CONFIG_MODULE: register_config,
    MODEL_MODULE: register_model_when_wanted,
    INNERLOOP_MODELING: register_model_after_import,
}
"""The watched module -> what to register once it is loaded."""


def _register(module_name: str, registration: Callable[[], None] | None = None) -> None:
    """Run the registration for ``module_name`` (or ``registration``); a failure warns (it must not
    break the user's import of transformers) and names what to do."""
    try:
        (registration or _REGISTRATIONS[module_name])()
    except Exception as err:  # noqa: BLE001 (any failure is reported, none is fatal)
        warnings.warn(
            f"innerloop could not register its model with transformers' Auto classes "
            f"({type(err).__name__}: {err}); load it with innerloop.hf.InnerloopForCausalLM instead",
            RuntimeWarning,
            stacklevel=2,
        )


class _ThenRegister:
    """A loader that runs the wrapped loader, then the registration for the module it loaded; every
    other attribute (``get_source``, ``is_package`` ...) is the wrapped loader's. (Loaders and finders
    are protocols: no ``importlib.abc`` base class, which would cost an import.)"""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        _register(module.__name__)


class _AutoClassWatcher:
    """Finds nothing itself: for a watched module it asks the finders after it on ``sys.meta_path``
    for the spec (so an editable or zipped transformers is found as usual) and wraps its loader in
    :class:`_ThenRegister`. It stops watching a module once it has been asked for it."""

    def __init__(self, names: set[str]) -> None:
        self.pending = names

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.pending:
            return None
        self.pending.discard(fullname)
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _ThenRegister(spec.loader)
                return spec
        return None


def install() -> None:
    """Register now what transformers has loaded, and watch for what it has not (idempotent)."""
    if any(isinstance(finder, _AutoClassWatcher) for finder in sys.meta_path):
        return
    waiting = set()
    for name in _REGISTRATIONS:
        if name in sys.modules:
            _register(name)
        else:
            waiting.add(name)
    if waiting:
        sys.meta_path.insert(0, _AutoClassWatcher(waiting))
