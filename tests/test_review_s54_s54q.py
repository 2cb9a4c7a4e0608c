"""Review s54q: first-use verdicts kept with plugin settings, settings records, gate probes, metrics."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import innerloop
from innerloop.core.layer import TTTLayer
from innerloop.kernels import first_use, fused_torch
from innerloop.kernels.dispatch import KernelUnavailableError
from innerloop.kernels.first_use import KernelCheckWarning
from innerloop.plugins.models.linear import LinearModel
from tests.test_review_s54_s54c import _scaled_layer_output, _ScaledGradient


@pytest.mark.slow  # probes on CPU: ~1.5 s
def test_a_verdict_about_one_object_does_not_pass_a_copy_whose_settings_changed_alike(
    fresh_global_registry,
) -> None:
    """A verdict kept for ``loss`` at scale 1 is about scale 1. ``twin`` (a copy, equal by value, never
    probed) and ``loss`` both set to scale 2: ``twin`` was compared to the kept object as it is NOW
    (scale 2, equal), so the scale-1 pass applied and the default-scale kernel ran on scale 2, silently."""
    loss = _ScaledGradient(1.0)
    innerloop.register_inner_loss(loss)
    fused = fused_torch.kernel_spec("linear", LinearModel().stack)
    innerloop.register_kernel(
        dataclasses.replace(fused, name="s54c_default_scale", inner_loss=loss.name, priority=10**6)
    )
    twin = _ScaledGradient(1.0)
    assert _scaled_layer_output(loss, "auto")[1][0][0] == "s54c_default_scale"
    loss.scale = twin.scale = 2.0
    expected, _ = _scaled_layer_output(twin, "torch")
    with pytest.warns(KernelCheckWarning, match="s54c_default_scale: failed its first-use check"):
        got, dispatches = _scaled_layer_output(twin, "auto")
    assert dispatches[0][0] == "torch"
    torch.testing.assert_close(got, expected)
    with pytest.raises(KernelUnavailableError, match="failed its first-use check"):
        _scaled_layer_output(twin, "s54c_default_scale")


@pytest.mark.slow  # a probe on CPU: ~1.3 s
def test_a_block_with_a_kept_verdict_reads_each_plugins_settings_once(
    fresh_global_registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Choosing a block's kernel asks for its verdict twice (select_kernel's refusal, then checked), and
    each question read the model's, loss's and rule's settings anew: 6 reads a block, 288 a decoded token
    of a 48-layer model (2.5 ms of a 175 ms CPU step, 1.4%). One decision reads them once."""
    loss = _ScaledGradient(1.0)
    innerloop.register_inner_loss(loss)
    fused = fused_torch.kernel_spec("linear", LinearModel().stack)
    innerloop.register_kernel(
        dataclasses.replace(fused, name="s54c_default_scale", inner_loss=loss.name, priority=10**6)
    )
    assert _scaled_layer_output(loss, "auto")[1][0][0] == "s54c_default_scale"  # probed: verdict kept
    reads = []
    settings_of = first_use._settings_of
    monkeypatch.setattr(
        first_use, "_settings_of", lambda obj, *args, **kw: reads.append(obj) or settings_of(obj, *args, **kw)
    )
    _, dispatches = _scaled_layer_output(loss, "auto")
    assert [path for path, _ in dispatches] == ["s54c_default_scale"]
    assert len(reads) == 3, [type(obj).__name__ for obj in reads]
    loss.scale = 2.0  # still read at each decision: the change is seen
    with pytest.warns(KernelCheckWarning, match="failed its first-use check"):
        _scaled_layer_output(loss, "auto")


class _RaisingGateLayer(TTTLayer):
    """A user's layer whose random gate draws, then raises."""

    def forgetting(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        torch.rand(3)
        raise RuntimeError("s54q gate failed")


class _HookingGateLayer(TTTLayer):
    """A user's layer whose gate code registers hooks while it runs (as another thread may meanwhile)."""

    def forgetting(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        self.handles = [
            self.q_proj.register_forward_hook(lambda *args: self.calls.append("q_proj")),
            torch.nn.modules.module.register_module_forward_hook(lambda *args: self.calls.append("global")),
        ]
        return None, None


@pytest.mark.slow  # builds a layer: 0.5 s on this shared CPU
def test_a_gate_that_raises_while_asked_leaves_hooks_and_draws_as_they_were() -> None:
    """An exception inside the gate code: the hook tables and the random state are put back."""
    from innerloop.kernels.dispatch import layer_gates

    layer, calls = _RaisingGateLayer(16, 2), []
    layer.q_proj.register_forward_hook(lambda *args: calls.append("q_proj"))
    drawn = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="s54q gate failed"):
        layer_gates(layer)
    assert torch.equal(torch.get_rng_state(), drawn)
    layer.q_proj(torch.zeros(1, 16))
    assert calls == ["q_proj"]


@pytest.mark.slow  # builds a layer: 0.5 s on this shared CPU
def test_hooks_registered_while_a_layer_is_asked_its_gates_are_kept() -> None:
    """The hook tables were emptied while the gate code ran and then set back to what they held before:
    a hook registered meanwhile (by the gate code, or another thread's code: the global tables are
    shared) was dropped without a word, and its handle removed nothing."""
    from innerloop.kernels.dispatch import layer_gates

    layer = _HookingGateLayer(16, 2)
    layer.calls = []
    try:
        assert layer_gates(layer) == (False, False)
        layer.q_proj(torch.zeros(1, 16))
        assert sorted(layer.calls) == ["global", "q_proj"]
    finally:
        for handle in layer.handles:
            handle.remove()


def test_a_zero_dim_numpy_array_setting_is_recorded_as_a_zero_dim_tensor_is() -> None:
    """``np.asarray(0.5)`` (a 0-dim array, not a numpy scalar) was left out of a plugin's settings while a
    0-dim tensor and ``np.float32(0.5)`` are recorded: a changed value loaded unchecked. Arrays of values,
    complex and object arrays stay out."""
    import numpy as np

    from innerloop.registry.settings import plugin_settings

    class Scaled:
        def __init__(self) -> None:
            self.scale = np.asarray(0.5, dtype=np.float32)
            self.count = np.array(3)
            self.table = np.ones(2)
            self.phase = np.array(1j)
            self.anything = np.array(object(), dtype=object)

    assert plugin_settings(Scaled()) == {"scale": 0.5, "count": 3}


class _Leveled:
    """A plugin whose setting is a 0-dim tensor off the CPU (meta here, a GPU's in use: reading its value
    waits for the device; a meta tensor's value cannot be read at all)."""

    def __init__(self) -> None:
        self.level = torch.tensor(2.0, device="meta")


def test_a_verdicts_lookup_reads_no_device_tensor_value_yet_sees_it_changed() -> None:
    """Since 2a79136 a 0-dim tensor is a setting, read as ``tensor.item()``; a first-use lookup reads
    the plugins' settings at every dispatch, so a plugin holding a 0-dim GPU tensor waited for the GPU
    at each layer's every call (and one whose value cannot be read fell back to its plain attributes,
    where a replaced tensor went unseen). The lookup reads a stamp of a tensor off the CPU (its id and
    in-place version): a value changed in place, or a tensor replaced, is another setting (probed again)."""
    plugin = _Leveled()
    kept = first_use._Held(plugin).kept()
    assert first_use._Held(plugin) == kept
    plugin.level.fill_(3.0)
    assert first_use._Held(plugin) != kept
    kept = first_use._Held(plugin).kept()
    plugin.level = torch.tensor(3.0, device="meta")
    assert first_use._Held(plugin) != kept
