"""The registry validates plugins, loads entry points, and can keep external plugins out."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

import innerloop
from innerloop import TTTLayer
from innerloop.plugins.losses.reconstruction import HalfSquaredError
from innerloop.registry import PluginError, Registry, build_registry, format_plugin_table, hookimpl
from innerloop.registry.hookspecs import register_inner_losses
from innerloop.registry.manager import PluginLoadWarning, isolated_registry


def test_builtins_register_through_the_plugin_path():
    registry = build_registry(include_external=False)
    assert registry.names("inner_model") == ["linear", "matrix", "mlp"]
    assert registry.names("inner_loss") == ["dot_product", "next_token", "reconstruction"]
    assert registry.names("update_rule") == ["dual_form", "minibatch_gd", "momentum"]
    assert registry.names("model_inner_loss") == ["next_token"]
    assert registry.names("model_update_rule") == ["score_first_sgd"]
    origins = {e.origin for e in registry.entries()}
    assert all(o.startswith("builtin:innerloop.plugins.") for o in origins)
    table = format_plugin_table(registry)
    assert "inner_model" in table and "builtin:innerloop.plugins.models.linear" in table


def test_every_hook_is_documented():
    from innerloop.registry import hookspecs

    hooks = [name for name in dir(hookspecs) if name.startswith("register_")]
    assert set(hooks) == {
        "register_inner_models",
        "register_inner_losses",
        "register_update_rules",
        "register_kernels",
        "register_model_inner_losses",
        "register_model_update_rules",
    }
    for name in hooks:
        assert (getattr(hookspecs, name).__doc__ or "").strip(), name
    assert register_inner_losses.__doc__


class MissingMethodLoss:
    name = "missing_method"

    def pairs(self, views, carry):  # no token_loss
        raise NotImplementedError


class PluginWith:
    """A plugin object registering one given object as an inner loss."""

    def __init__(self, obj):
        self.obj = obj

    @hookimpl
    def register_inner_losses(self, register):
        register(self.obj)


def test_plugin_missing_a_method_is_rejected():
    registry = build_registry(include_external=False)
    with pytest.raises(PluginError, match=r"lacks required method\(s\) \['token_loss'"):
        registry.add_plugin(PluginWith(MissingMethodLoss()), origin="broken")
    assert "missing_method" not in registry.names("inner_loss")
    assert registry.plugin_manager.get_plugin("broken") is None  # rolled back


def test_plugin_reusing_a_name_is_rejected():
    registry = build_registry(include_external=False)

    class Impostor(HalfSquaredError):
        name = "reconstruction"

        def pairs(self, views, carry):
            return registry.inner_loss("reconstruction").pairs(views, carry)

    with pytest.raises(PluginError, match="'reconstruction'.*already registered by plugin 'builtin:"):
        registry.add_plugin(PluginWith(Impostor()), origin="impostor")


def test_plugin_with_wrong_shapes_is_rejected():
    registry = Registry()

    class Shrinking(HalfSquaredError):
        name = "shrinking"

        def pairs(self, views, carry):
            from innerloop.core.protocol import LossPairs

            return LossPairs(views.key[..., :1], views.value, None, {})

    with pytest.raises(PluginError, match="pairs\\(\\) must give inputs and targets of shape"):
        registry.add_plugin(PluginWith(Shrinking()), origin="shrinking")


def test_a_hook_with_a_typo_is_rejected():
    class Typo:
        @hookimpl
        def register_inner_modles(self, register):  # misspelt hook
            pass

    with pytest.raises(PluginError, match="not a valid innerloop plugin"):
        Registry().add_plugin(Typo(), origin="typo")


def test_unknown_names_list_the_registered_ones():
    with pytest.raises(
        ValueError, match=r"unknown inner model 'nope'; registered: \['linear', 'matrix', 'mlp'"
    ):
        innerloop.TTTLayer(8, 2, inner_model="nope")
    with pytest.raises(ValueError, match="unknown update rule"):
        innerloop.TTTLayer(8, 2, update_rule="adamw")


ENTRY_POINT_PLUGIN = textwrap.dedent(
    '''
    import torch
    from innerloop import hookimpl
    from innerloop.core.protocol import LossPairs
    from innerloop.plugins.losses.reconstruction import HalfSquaredError

    class Denoise(HalfSquaredError):
        """Reconstruct the value view from a scaled key view."""
        name = "denoise_test"

        def pairs(self, views, carry):
            return LossPairs(0.5 * views.key, views.value, None, {})

    @hookimpl
    def register_inner_losses(register):
        register(Denoise())
    '''
)


@pytest.fixture
def installed_entry_point(tmp_path):
    """A package with an ``innerloop`` entry point, importable with ``tmp_path`` on the path."""
    (tmp_path / "denoise_plugin.py").write_text(ENTRY_POINT_PLUGIN)
    dist = tmp_path / "denoise_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: denoise-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[innerloop]\ndenoise = denoise_plugin\n")
    return tmp_path


def test_entry_point_plugin_is_usable_by_name(installed_entry_point, monkeypatch):
    """The process-wide registry, built anew with the package on the path (as a fresh Python builds it),
    finds the entry point through importlib.metadata; the slow tests below do the same under the
    environment switches."""
    monkeypatch.syspath_prepend(str(installed_entry_point))  # also clears the import caches
    monkeypatch.delitem(sys.modules, "denoise_plugin", raising=False)  # and puts nothing back after
    monkeypatch.setattr(innerloop.registry.manager, "_REGISTRY", None)  # the session's is restored after
    try:
        layer = TTTLayer(8, 2, inner_loss="denoise_test", mini_batch_size=2)
        y, _ = layer(torch.randn(1, 5, 8))
        origins = [
            e.origin for e in innerloop.get_registry().entries("inner_loss") if e.name == "denoise_test"
        ]
    finally:
        sys.modules.pop("denoise_plugin", None)
    assert tuple(y.shape) == (1, 5, 8)
    assert origins == ["denoise (denoise-plugin)"]


def _use_the_plugin_in_a_registry_built_anew(installed_entry_point, monkeypatch, **env: str) -> list[str]:
    """test_entry_point_plugin_is_usable_by_name's steps under the environment variables ``env`` (the
    switches are read when the registry is built): the process-wide registry built anew, as a fresh
    Python builds it, with the package on the path; the origins of the plugin's loss. These tests ran
    the same steps in fresh interpreters (~2.5 s each), which checked nothing more."""
    for name in ("INNERLOOP_DISABLE_EXTERNAL_PLUGINS", "INNERLOOP_PLUGINS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.syspath_prepend(str(installed_entry_point))  # also clears the import caches
    monkeypatch.delitem(sys.modules, "denoise_plugin", raising=False)  # and puts nothing back after
    monkeypatch.setattr(innerloop.registry.manager, "_REGISTRY", None)  # the session's is restored after
    try:
        layer = TTTLayer(8, 2, inner_loss="denoise_test", mini_batch_size=2)
        assert tuple(layer(torch.randn(1, 5, 8))[0].shape) == (1, 5, 8)
        return [e.origin for e in innerloop.get_registry().entries("inner_loss") if e.name == "denoise_test"]
    finally:
        sys.modules.pop("denoise_plugin", None)


@pytest.mark.slow  # reason: builds the process registry anew (~0.5 s); the fast loop keeps the default
def test_block_variable_keeps_external_plugins_out(installed_entry_point, monkeypatch):
    with pytest.raises(ValueError, match="unknown inner loss 'denoise_test'"):
        _use_the_plugin_in_a_registry_built_anew(
            installed_entry_point, monkeypatch, INNERLOOP_DISABLE_EXTERNAL_PLUGINS="1"
        )


@pytest.mark.slow  # reason: builds the process registry anew twice (~1 s)
def test_allow_list_limits_external_plugins(installed_entry_point, monkeypatch):
    with (
        pytest.warns(
            PluginLoadWarning, match=r"INNERLOOP_PLUGINS='something_else' names \['something_else'\]"
        ),
        pytest.raises(ValueError, match="unknown inner loss 'denoise_test'"),
    ):
        _use_the_plugin_in_a_registry_built_anew(
            installed_entry_point, monkeypatch, INNERLOOP_PLUGINS="something_else"
        )
    allowed = _use_the_plugin_in_a_registry_built_anew(
        installed_entry_point, monkeypatch, INNERLOOP_PLUGINS="denoise"
    )
    assert allowed == ["denoise (denoise-plugin)"]


@pytest.mark.slow  # reason: builds the process registry anew (~0.5 s); test_config checks `innerloop plugins` in process
def test_plugins_command_lists_origins(installed_entry_point, monkeypatch):
    _use_the_plugin_in_a_registry_built_anew(installed_entry_point, monkeypatch)
    table = format_plugin_table()
    assert "denoise_test" in table and "denoise (denoise-plugin)" in table


def test_in_process_registration_and_removal():
    registry = build_registry(include_external=False)

    class Scaled(HalfSquaredError):
        name = "scaled_test"

        def pairs(self, views, carry):
            from innerloop.core.protocol import LossPairs

            return LossPairs(views.key, 2 * views.value, None, {})

    registry.add_plugin(PluginWith(Scaled()), origin="scaled")
    assert "scaled_test" in registry.names("inner_loss")
    registry.remove_plugin("scaled")
    assert "scaled_test" not in registry.names("inner_loss")


@pytest.mark.parametrize(
    "context",
    [torch.no_grad, torch.inference_mode, lambda: torch.device("meta")],
    ids=["no_grad", "inference", "meta"],
)
def test_registry_builds_under_no_grad_and_inference_mode(context):
    # meta: count_config_parameters builds models under `with torch.device("meta")`, and may be the
    # first to need the registry
    with context():
        registry = build_registry(include_external=False)
    assert "score_first_sgd" in registry.names("model_update_rule")
    assert registry.names("inner_model") == ["linear", "matrix", "mlp"]


def test_building_the_registry_leaves_the_global_seed_alone():
    """Validating plugins draws random inputs from a forked generator: the first layer made after
    manual_seed gets the same weights as any later one (the registry is built on first use)."""
    with isolated_registry():
        torch.manual_seed(0)
        first = TTTLayer(16, 2).state_dict()
        torch.manual_seed(0)
        second = TTTLayer(16, 2).state_dict()
        for key in first:
            assert torch.equal(first[key], second[key]), key
