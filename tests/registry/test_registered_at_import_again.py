"""An installed plugin whose module registers its objects when imported (``innerloop.register_<kind>`` at
import, no hooks) is in every registry of the process: a registry built after the module was imported
(``reset_registry``, ``isolated_registry``) gets what the import registered, not a "broken plugin"."""

from __future__ import annotations

import sys
import textwrap
import warnings
from importlib.metadata import EntryPoint

import pytest

from innerloop.registry import get_registry, isolated_registry, manager, reset_registry

MODULE = "innerloop_test_registers_at_import"


@pytest.fixture
def installed(tmp_path, monkeypatch):
    (tmp_path / f"{MODULE}.py").write_text(
        textwrap.dedent(
            """
            import innerloop
            from innerloop import HalfSquaredError, LossPairs

            @innerloop.register_inner_loss
            class AtImport(HalfSquaredError):
                name = "registered_at_import"

                def pairs(self, views, carry):
                    return LossPairs(inputs=views.key, targets=views.value, valid=None, carry={})
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(manager, "_entry_points", lambda: [EntryPoint("at_import", MODULE, "innerloop")])
    monkeypatch.delenv(manager.DISABLE_ENV, raising=False)
    monkeypatch.delenv(manager.ALLOW_ENV, raising=False)
    with isolated_registry():
        yield
    sys.modules.pop(MODULE, None)
    manager._REGISTERED_AT_IMPORT.pop(MODULE, None)


def test_a_registry_built_after_the_import_has_what_the_import_registered(installed) -> None:
    assert "registered_at_import" in get_registry().names("inner_loss")  # the first build imports it
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no PluginLoadWarning ("implements no innerloop hook")
        with isolated_registry():
            registry = get_registry()
            assert "registered_at_import" in registry.names("inner_loss")
            assert registry.broken() == []
        reset_registry()
        assert "registered_at_import" in get_registry().names("inner_loss")
