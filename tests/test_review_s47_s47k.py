"""Review s47k (issue 10, the house): one way to decide what is built in."""

from __future__ import annotations

import pytest

import innerloop
from innerloop.plugins.optimizers.dual_form import DualForm


class _DoubledOutputs(DualForm):
    """A wrong update rule (its outputs doubled) whose class claims to live in a built-in plugin module."""

    name = "dual_form"

    def forward(self, state, task, views, lr, tau, **gates):  # type: ignore[no-untyped-def]
        outputs, new_state = super().forward(state, task, views, lr, tau, **gates)
        return 2 * outputs, new_state


_DoubledOutputs.__module__ = DualForm.__module__  # not defined there: only its name says so


@pytest.mark.slow  # the naive-loop check of an external rule: ~1 s
def test_an_instance_is_built_in_only_if_its_class_is_the_built_in_modules_own() -> None:
    """Registration decides built-in status by the module object itself (``_is_builtin_module``); a rule
    handed to a layer as an instance was built in when its class's ``__module__`` *string* named a
    built-in module, so a class defined elsewhere skipped the naive-loop check and a layer ran its
    wrong numbers silently. Now the class must be the one that module defines under its name."""
    with pytest.raises(innerloop.PluginError):
        innerloop.TTTLayer(16, 2, mini_batch_size=4, update_rule=_DoubledOutputs())


def test_an_instance_of_a_built_in_class_still_skips_the_external_check(monkeypatch) -> None:
    import innerloop.registry.manager as manager

    innerloop.get_registry()  # built before the patch: only the instance's check is recorded
    seen = []

    def recording(kind, obj, external):  # type: ignore[no-untyped-def]
        seen.append((kind.name, type(obj).__name__, external))
        return obj.name

    monkeypatch.setattr(manager, "validate_plugin", recording)
    manager.check_instance("update_rule", DualForm())
    assert seen == [("update_rule", "DualForm", False)]


def test_a_layer_built_from_instances_asks_the_registry_as_the_docs_say() -> None:
    """docs/architecture.md's lazy-import row for ``core.layer -> registry`` said "passing instances never
    touches the registry"; a layer given instances builds the process registry (``check_instance`` asks
    whether each is the registered object, else runs the registrar's checks once), entry points included.
    The row (and LAZY_IMPORTS, which the docs must equal) now says so."""
    from test_layering import LAZY_IMPORTS

    import innerloop.registry.manager as manager
    from innerloop.plugins.losses.reconstruction import Reconstruction
    from innerloop.plugins.models.linear import LinearModel

    with innerloop.registry.isolated_registry():  # no registry inside, as in a fresh process
        assert manager._REGISTRY is None
        layer = innerloop.TTTLayer(
            16, 2, inner_model=LinearModel(), inner_loss=Reconstruction(), update_rule=DualForm()
        )
        assert manager._REGISTRY is not None, f"{layer} was built without the registry"
    reason = LAZY_IMPORTS["innerloop.core.layer", "innerloop.registry"]
    assert "never touches the registry" not in reason and "check_instance" in reason


def test_the_list_of_built_in_plugins_cannot_grow() -> None:
    """Built-in status (no naive-loop check of an update rule, the ``builtin:`` origin) is membership in
    ``innerloop.plugins.DEFAULT_PLUGINS``; as a list, ``DEFAULT_PLUGINS.append("mine")`` let any module
    register as built in. It is a tuple."""
    from innerloop.plugins import DEFAULT_PLUGINS

    assert isinstance(DEFAULT_PLUGINS, tuple), type(DEFAULT_PLUGINS)
