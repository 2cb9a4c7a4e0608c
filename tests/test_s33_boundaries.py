"""Boundaries fixed in session 33 (no helper review): each test fails without its fix."""

from __future__ import annotations

import warnings

import pytest

from innerloop.registry import manager


class _EntryPoint:
    """An installed entry point whose load records that it was asked for."""

    def __init__(self, name: str, loaded: list[str]) -> None:
        self.name, self.value, self.dist, self._loaded = name, f"pkg_{name}.plugin", None, loaded

    def load(self) -> object:
        self._loaded.append(self.name)
        raise ImportError("not a real plugin")


@pytest.mark.parametrize("allow", ["", " ", " , "])
def test_an_empty_plugin_allowlist_says_that_it_loads_no_installed_plugin(monkeypatch, allow: str) -> None:
    """``INNERLOOP_PLUGINS=""`` (set, naming nothing) skipped every installed plugin without a word: a
    name that is then asked for said only that it was unknown. It now warns, naming the installed entry
    points and the two clear ways (unset it; the switch that turns them off)."""
    loaded: list[str] = []
    monkeypatch.setattr(manager, "_entry_points", lambda: [_EntryPoint("denoise", loaded)])
    monkeypatch.delenv(manager.DISABLE_ENV, raising=False)
    monkeypatch.setenv(manager.ALLOW_ENV, allow)
    with pytest.warns(manager.PluginLoadWarning, match=r"names no plugin, so none of .*\['denoise'\]"):
        manager.load_entry_point_plugins(manager.Registry())
    assert loaded == []


def test_an_empty_plugin_allowlist_with_nothing_installed_is_quiet(monkeypatch) -> None:
    monkeypatch.setattr(manager, "_entry_points", lambda: [])
    monkeypatch.delenv(manager.DISABLE_ENV, raising=False)
    monkeypatch.setenv(manager.ALLOW_ENV, "")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert manager.load_entry_point_plugins(manager.Registry()) == []


def test_a_kernel_registered_in_process_for_a_misspelt_model_is_warned_of_at_once() -> None:
    """The registry's build warned of an entry point's kernel for a name no plugin provides, but a kernel
    registered in-process (``register_kernel``, ``register``) after the build registered silently and
    could never run. It is warned of when registered, pointing at the caller's line; a kernel whose
    model is registered first is not."""
    import innerloop
    from innerloop.kernels import fused_torch
    from innerloop.plugins.models.mlp import MLPModel
    from innerloop.registry.manager import isolated_registry

    class Renamed(MLPModel):
        name = "s33_mlp"

    with isolated_registry():
        with pytest.warns(manager.PluginLoadWarning, match="inner_model='s33_mpl'.* yet") as caught:
            innerloop.register_kernel(fused_torch.kernel_spec("s33_mpl", MLPModel().stack))
        assert caught[0].filename == __file__
        innerloop.register_inner_model(Renamed())
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            innerloop.register_kernel(fused_torch.kernel_spec("s33_mlp", MLPModel().stack))


@pytest.mark.parametrize("forced", [False, True], ids=["auto", "named"])
def test_a_training_only_kernel_is_not_chosen_for_a_block_without_a_graph(forced: bool) -> None:
    """``training_only`` says a path 'only speeds up training', and a layer that names it sends its
    blocks without a graph where ``kernel="auto"`` would; but ``auto`` took such a kernel by priority for
    those blocks too (a plugin's at priority 100 ran every inference, and a layer that named it got it
    back from ``auto`` for its inference). It now runs blocks that record a graph only."""
    import torch
    from plugin_testing import register_linear_dual_form_kernel

    import innerloop
    from innerloop.kernels import fused_torch
    from innerloop.registry.manager import isolated_registry

    with isolated_registry():
        fused = fused_torch.kernel_spec("linear", innerloop.get_registry().inner_model("linear").stack)
        register_linear_dual_form_kernel(
            "s33_trains", fused.forward, verify=fused.verify, priority=100, training_only=True
        )
        layer = innerloop.TTTLayer(16, 2, mini_batch_size=4, kernel="s33_trains" if forced else "auto")
        x = torch.randn(1, 8, 16)
        layer(x)
        assert [path for path, _ in layer.dispatches] == ["s33_trains"]
        with torch.no_grad():
            layer(x)
        ((path, reason),) = layer.dispatches
        assert path not in ("s33_trains", "torch"), reason


def test_the_chunk_runners_refuse_a_cut_that_is_not_an_index_and_the_reference_names_bad_shapes() -> None:
    """s33a's leftovers: a cut point 2.5 reached ``x[:, 0:2.5]`` (torch's 'slice indices must be
    integers'), and ``causal_linear_attention`` of mismatched shapes failed in a matmul naming no argument."""
    import numpy as np
    import torch

    import innerloop
    from innerloop.testing import causal_linear_attention, run_layer_in_chunks

    layer = innerloop.TTTLayer(8, 2, mini_batch_size=2)
    x = torch.randn(1, 6, 8)
    with pytest.raises(
        TypeError, match=r"run_layer_in_chunks: cut_points must be a list of token indices.*2\.5"
    ):
        run_layer_in_chunks(layer, x, [2.5])
    whole, _ = layer(x)
    split, _ = run_layer_in_chunks(layer, x, [np.int64(3), torch.tensor(3), 0, 6, 9])
    torch.testing.assert_close(split, whole)
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match=r"causal_linear_attention takes .*'key': \(1, 2, 5, 3\)"):
        causal_linear_attention(q, q[..., :3], q)
    assert causal_linear_attention(q, q, q[..., :2]).shape == (1, 2, 5, 2)


def test_check_update_rule_names_itself_for_an_unknown_keyword() -> None:
    """s33a's leftover: a misspelt option (``tokenz=9``) was reported as 'make_problem() got an
    unexpected keyword argument', naming a function the caller never called."""
    from innerloop.testing import check_update_rule, check_update_rule_gradients

    for check in (check_update_rule, check_update_rule_gradients):
        with pytest.raises(
            TypeError, match=rf"{check.__name__}\(\) got unexpected keyword arguments \['tokenz'\]"
        ):
            check("minibatch_gd", model="linear", loss="reconstruction", tokenz=9)


def test_registering_an_abstract_class_names_its_missing_methods_and_messages_read_right() -> None:
    """s33d's leftovers: ``register_inner_loss(AbstractSubclass)`` raised Python's bare "Can't instantiate
    abstract class"; and the registrar wrote "register a InnerLoss instance for a inner loss"."""
    import innerloop
    from innerloop import InnerLoss, PluginError
    from innerloop.registry.manager import isolated_registry

    class Unfinished(InnerLoss):
        name = "s33_unfinished"

    with isolated_registry():
        with pytest.raises(
            PluginError, match=r"Unfinished does not implement \['pairs', 'token_loss'\] of InnerLoss"
        ):
            innerloop.register_inner_loss(Unfinished)
        with pytest.raises(PluginError, match="register an InnerLoss instance for an inner loss, not a name"):
            innerloop.register_inner_loss("s33_unfinished")
