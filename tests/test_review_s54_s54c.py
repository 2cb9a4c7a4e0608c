"""Review s54c: kernels matched by plugin settings, numpy settings, gate probes, interrupts in metrics."""

from __future__ import annotations

import dataclasses
import enum
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import innerloop
from innerloop import HalfSquaredError, LossPairs
from innerloop.core.layer import TTTLayer
from innerloop.kernels import first_use, fused_torch
from innerloop.kernels.dispatch import KernelUnavailableError
from innerloop.kernels.first_use import KernelCheckWarning
from innerloop.plugins.models.linear import LinearModel
from innerloop.registry.settings import plugin_settings
from innerloop.train.metrics import Float64States


class _InterruptedSum(Float64States):
    """A metric whose update writes one state, then is interrupted before the other."""

    full_state_update = True

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.interrupt = False

    def update(self, values: torch.Tensor) -> None:
        self.total += values.sum()
        if self.interrupt:
            raise KeyboardInterrupt
        self.count += values.numel()

    def compute(self) -> torch.Tensor:
        return self.total / self.count


class _InterruptedSumReduced(_InterruptedSum):
    full_state_update = False


@pytest.mark.parametrize("metric_class", [_InterruptedSum, _InterruptedSumReduced])
def test_metric_forward_interrupted_keeps_earlier_sums(metric_class: type[_InterruptedSum]) -> None:
    """A KeyboardInterrupt inside update (a BaseException, not an Exception) leaves the metric as it was
    before the batch: torchmetrics' forward resets it first, so without restoring every earlier batch's
    sums were lost (``full_state_update=False``), and the accumulated total, updated in place first under
    ``full_state_update=True``, kept the batch's half write."""
    metric = metric_class()
    metric(torch.tensor([1.0, 2.0]))
    metric.interrupt = True
    with pytest.raises(KeyboardInterrupt):
        metric(torch.tensor([100.0]))
    assert (metric.total.item(), metric.count.item()) == (3.0, 2.0)
    metric.interrupt = False
    metric(torch.tensor([3.0]))
    assert metric.compute().item() == pytest.approx(2.0)


class _Mode(enum.Enum):
    SUM = "sum"
    MEAN = "mean"


class _Kinds:
    """A plugin whose public attributes are of every kind a plugin may keep a setting as."""

    def __init__(self) -> None:
        self.f32 = np.float32(0.1)
        self.i64 = np.int64(3)
        self.f64 = np.float64(0.25)
        self.flag = np.bool_(True)
        self.sizes = (1, 2)
        self.pairs = ((1, 2), (3, 4))
        self.mode = _Mode.MEAN
        self.level = torch.tensor(2.0)
        self.root = Path("/data")
        self.nothing = None
        self.weights = torch.ones(3)  # a tensor of values: no setting
        self.table = np.ones(3)  # an array: no setting
        self.graph = torch.tensor(1.0, requires_grad=True)  # a learned value: no setting


def test_settings_record_numpy_scalars_enums_paths_and_torch_scalars() -> None:
    """numpy scalars (np.float32, np.int64, np.bool_), enum members, paths, nested tuples and 0-dim
    tensors were left out of a plugin's settings record (so a changed value loaded unchecked); each is
    recorded as the plain value it holds, in JSON's types."""
    settings = plugin_settings(_Kinds())
    assert settings == {
        "f32": float(np.float32(0.1)),
        "i64": 3,
        "f64": 0.25,
        "flag": True,
        "sizes": [1, 2],
        "pairs": [[1, 2], [3, 4]],
        "mode": "_Mode.MEAN",
        "level": 2.0,
        "root": "/data",
        "nothing": None,
    }
    assert {key: type(value) for key, value in settings.items() if key in ("f32", "i64", "f64", "flag")} == {
        "f32": float,
        "i64": int,
        "f64": float,
        "flag": bool,
    }
    assert json.loads(json.dumps(settings)) == settings


def test_declared_settings_refuse_what_they_cannot_record_by_name() -> None:
    class Declared:
        def settings(self) -> dict:
            return {"scale": np.float32(0.5), "weights": torch.ones(2), "mode": _Mode.SUM}

    with pytest.raises(TypeError, match=r"gave weights=tensor\(\[1\., 1\.\]\): a checkpoint records only"):
        plugin_settings(Declared())

    class Fine(Declared):
        def settings(self) -> dict:
            return {"scale": np.float32(0.5), "mode": _Mode.SUM}

    assert plugin_settings(Fine()) == {"scale": 0.5, "mode": "_Mode.SUM"}


@pytest.mark.slow  # a tiny model built and saved: 0.6 s
def test_a_numpy_setting_changed_since_the_save_is_not_loaded_quietly(
    fresh_global_registry, tmp_path
) -> None:
    """``ScaledTargets(np.float32(2.0))`` saved, ``np.float32(1.0)`` registered at the load: the value was
    left out of the record, and the model loaded quietly with the other scale."""
    from test_review_s52_s52a import NAME, ScaledTargets, _register, _saved

    from innerloop.checkpoints import PluginChangedWarning, load_model, recorded_plugins

    path = _saved(tmp_path, ScaledTargets(np.float32(2.0)))
    assert recorded_plugins(path)["inner_loss"][NAME]["settings"] == {"scale": 2.0}
    _register(ScaledTargets(np.float32(1.0)))
    with pytest.warns(PluginChangedWarning, match=r"differing in 'scale'"):
        load_model(path)


class _ScaledGradient(HalfSquaredError):
    """A plugin loss with a setting its kernel does not compute: the gradient is ``scale * (p - t)``."""

    name = "s54c_scaled_gradient"

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    def pairs(self, views, carry):
        return LossPairs(inputs=views.key, targets=views.value, valid=None, carry={})

    def token_loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.scale * (prediction - target).pow(2).sum(dim=-1)

    def token_loss_grad(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.scale * (prediction - target)


class _ScaledGradientHoldingATensor(_ScaledGradient):
    """The same holding a tensor: its verdicts are kept by identity, not by value."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__(scale)
        self.offsets = torch.zeros(2)


def _scaled_layer_output(loss: object, kernel: str) -> tuple[torch.Tensor, list[tuple[str, str]]]:
    torch.manual_seed(0)
    layer = TTTLayer(hidden_size=32, num_heads=2, inner_loss=loss, mini_batch_size=4, kernel=kernel)
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return layer(x)[0], list(layer.dispatches)


@pytest.mark.slow  # probes on CPU: 1.2 s each
@pytest.mark.parametrize("loss_class", [_ScaledGradient, _ScaledGradientHoldingATensor])
def test_a_setting_changed_in_place_after_a_kernels_verdict_is_checked_again(
    fresh_global_registry, loss_class: type[_ScaledGradient]
) -> None:
    """A kernel registered for a plugin's name computes the default scale only. The first-use check
    refuses it for an instance of another scale (its verdict is kept per object state), but a verdict
    was about the very object, whatever it held later: ``loss.scale = 2.0`` after a first run kept the
    pass, and the kernel ran with scale 1 (outputs off by 0.35, silently, with or without naming it)."""
    loss = loss_class(1.0)
    innerloop.register_inner_loss(loss)
    fused = fused_torch.kernel_spec("linear", LinearModel().stack)
    innerloop.register_kernel(
        dataclasses.replace(fused, name="s54c_default_scale", inner_loss=loss.name, priority=10**6)
    )
    assert _scaled_layer_output(loss, "auto")[1][0] == (
        "s54c_default_scale",
        "kernel 's54c_default_scale' verified",
    )
    verdicts = len(first_use._VERDICTS)
    loss.scale = 2.0  # the very object registered (this test's own registry)
    expected, _ = _scaled_layer_output(loss, "torch")
    with pytest.warns(KernelCheckWarning, match="s54c_default_scale: failed its first-use check"):
        got, dispatches = _scaled_layer_output(loss, "auto")
    assert dispatches[0][0] == "torch" and "relative RMS error" in dispatches[0][1]
    torch.testing.assert_close(got, expected)
    with pytest.raises(KernelUnavailableError, match="s54c_default_scale: failed its first-use check"):
        _scaled_layer_output(loss, "s54c_default_scale")
    loss.scale = 1.0  # as it was verified: the kernel runs again, unchecked
    assert _scaled_layer_output(loss, "auto")[1][0][0] == "s54c_default_scale"
    assert len(first_use._VERDICTS) == verdicts  # one verdict per object and kind of block: none piles up


def _gate_layers() -> list[TTTLayer]:
    """A layer of each built-in class that may forget, with test-time training on and off."""
    from innerloop.core.family_layers import (
        DeltaNetLayer,
        GatedDeltaNetLayer,
        LinearAttentionLayer,
        TitansLayer,
    )

    return [
        cls(hidden_size=8, num_heads=2, base_lr=base_lr)
        for cls in (TTTLayer, LinearAttentionLayer, DeltaNetLayer, GatedDeltaNetLayer, TitansLayer)
        for base_lr in (0.0, 1.0)
    ]


def _run_gates(layer: TTTLayer) -> tuple[bool, bool]:
    with torch.no_grad():
        decay, momentum, decay_log = layer.scan_gates(torch.zeros(1, 1, layer.hidden_size))
    return decay is not None or decay_log is not None, momentum is not None


@pytest.mark.slow  # ten layers built: 0.3 s
def test_declared_gates_are_the_gates_the_layers_compute() -> None:
    """Which gates a layer has is told by its class and settings, without running its modules, and is
    what running them gives (the built-in classes, test-time training on and off)."""
    layers = _gate_layers()
    told = [(type(layer).__name__, layer.base_lr, layer.declared_gates()) for layer in layers]
    ran = [(type(layer).__name__, layer.base_lr, _run_gates(layer)) for layer in layers]
    assert told == ran
    assert ("TitansLayer", 1.0, (True, True)) in told and ("GatedDeltaNetLayer", 1.0, (True, False)) in told


class _RandomGateLayer(TTTLayer):
    """A user's layer whose forgetting gate draws (a dropout-like random gate): only running it tells."""

    def forgetting(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        decay = torch.sigmoid(self.q_proj(x)[..., : self.num_heads]).transpose(1, 2)
        return decay * torch.rand_like(decay), None


def test_asking_a_layer_its_gates_fires_no_hook_and_draws_nothing() -> None:
    """refused_named_kernels asked each layer naming a kernel for its gates by running its gate
    projections on a token of zeros: a user's forward hook on them fired, and a random gate moved the
    global random number generator (a run's draws then depended on whether a kernel was named)."""
    from innerloop.core.family_layers import GatedDeltaNetLayer
    from innerloop.kernels.dispatch import layer_gates

    calls: list[str] = []
    gated, random_gate = GatedDeltaNetLayer(hidden_size=16, num_heads=2), _RandomGateLayer(16, 2)
    gated.a_proj.register_forward_hook(lambda *args: calls.append("a_proj"))
    random_gate.q_proj.register_forward_hook(lambda *args: calls.append("q_proj"))
    random_gate.register_forward_pre_hook(lambda *args: calls.append("layer"))
    drawn = torch.get_rng_state()
    assert (layer_gates(gated), layer_gates(random_gate)) == ((True, False), (True, False))
    assert calls == [] and torch.equal(torch.get_rng_state(), drawn)
    random_gate.forgetting(torch.zeros(1, 1, 16))  # the hooks are there again
    assert calls == ["q_proj"]
