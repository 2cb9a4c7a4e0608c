"""Regression tests of review s46e: defects other reviewers found and left open.

- A TTT-E2E model update rule (or model inner loss) returning NaN at a call's batch, which registration
  does not try, gave NaN logits and state without a word, where a TTT layer raises naming its plugins
  (``non_finite="raise"``); the model now does too, and ``model.e2e.non_finite="ignore"`` lets them
  propagate as the layer's option does.
- An installed plugin refused at its first registration (a built-in's name) was skipped before its other
  hooks ran, so a name it also offered, which another installed distribution provides too, was not seen
  as a clash (the other one used); its hooks' names are now surveyed and the clash refused from both.
- Numpy integers, taken by every other public argument (``as_integer``), were refused by the Triton
  kernels' ``checkpoint_every``, ``chunk_delta_rule``'s ``chunk_size`` and ``KernelSpec.priority``.
"""

from __future__ import annotations

import re
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import innerloop
from innerloop import HalfSquaredError, LossPairs, hookimpl
from innerloop.plugins.e2e import NextTokenChunkLoss, ScoreFirstSGD
from innerloop.plugins.models.linear import LinearModel
from innerloop.registry.kinds import PluginError
from innerloop.registry.manager import PluginLoadWarning

_E2E = {"mixer": "e2e", "vocab_size": 11, "hidden_size": 16, "num_layers": 2, "num_heads": 2}


def _e2e_model():
    from innerloop.models import build_model

    torch.manual_seed(0)
    return build_model({**_E2E, "intermediate_size": 24, "window": 8, "e2e": {"chunk_size": 4}})


class _NanAtBatch4Rule(ScoreFirstSGD):
    name = "s46e_nan_rule"

    def step(self, fast, losses, lr, max_grad_norm, create_graph):
        new = super().step(fast, losses, lr, max_grad_norm, create_graph)
        return {k: v * float("nan") for k, v in new.items()} if losses.shape[0] > 3 else new


class _NanAtBatch4Loss(NextTokenChunkLoss):
    name = "s46e_nan_loss"

    def chunk_loss(self, logits, ids):
        losses = super().chunk_loss(logits, ids)
        return losses * float("nan") if logits.shape[0] > 3 else losses


@pytest.mark.slow  # builds the registry when run alone (~0.8 s), then a 2-block E2E model on 9 tokens
@pytest.mark.parametrize(
    ("plugin", "message"),
    [
        (
            "update_rule",
            r"model update rule 's46e_nan_rule' \(.*_NanAtBatch4Rule\): step returned non-finite",
        ),
        (
            "inner_loss",
            r"model inner loss 's46e_nan_loss' \(.*_NanAtBatch4Loss\): chunk_loss returned non-finite",
        ),
    ],
)
def test_an_e2e_plugin_returning_nan_is_named_unless_non_finite_is_ignore(plugin, message) -> None:
    model = _e2e_model()
    setattr(model, plugin, _NanAtBatch4Rule() if plugin == "update_rule" else _NanAtBatch4Loss())
    ids = torch.randint(0, 11, (4, 9))
    with torch.no_grad():
        assert torch.isfinite(model(ids[:2])[0]).all()  # the batch of 2 is right
        with pytest.raises(ValueError, match=message + r".*non_finite='ignore'"):
            model(ids)
        model.config.e2e.non_finite = "ignore"  # read at every call, as a TTT layer's option
        logits, state = model(ids)
    assert not torch.isfinite(logits).all()


class _EntryPoint:
    """What ``importlib.metadata.entry_points`` yields, with the plugin we choose."""

    def __init__(self, name, plugin):
        self.name, self.value, self.plugin = name, f"{name}_module", plugin
        self.dist = SimpleNamespace(name=f"{name}-dist", version="0.1")

    def load(self):
        return self.plugin


class _SharedLoss(HalfSquaredError):
    name = "s46e_shared"

    def pairs(self, views, carry):
        return LossPairs(inputs=views.key, targets=views.value, valid=None, carry={})


class _TakesLinearThenShares:
    """Its first registration fails (a built-in's name), its second offers a name another plugin has."""

    @hookimpl
    def register_inner_models(self, register):
        register(LinearModel())

    @hookimpl
    def register_inner_losses(self, register):
        register(_SharedLoss())


class _Shares:
    @hookimpl
    def register_inner_losses(self, register):
        register(_SharedLoss())


@pytest.mark.slow  # builds the registry when run alone (~1 s); each order then costs 0.01 s
@pytest.mark.parametrize("broken_first", [True, False])
def test_a_plugin_refused_at_its_first_name_still_clashes_with_its_later_ones(
    monkeypatch, broken_first
) -> None:
    """An entry point refused at its first registration (it took the name ``linear``) was skipped before
    its later hooks ran, so a name it would also have provided, which another installed distribution
    provides too, was never seen as a clash: the other one was used, and which one a run gets then
    depends on the broken plugin being fixed. Its other hooks are now surveyed for the names they offer,
    so the clash is refused from both, as when the failure comes after the shared name."""
    from innerloop.registry import isolated_registry, manager

    points = [_EntryPoint("s46e_broken", _TakesLinearThenShares()), _EntryPoint("s46e_fine", _Shares())]
    monkeypatch.setattr(manager, "_entry_points", lambda: points if broken_first else points[::-1])
    with isolated_registry(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        registry = innerloop.get_registry()
        with pytest.raises(PluginError, match="'s46e_shared' is provided by two installed plugins"):
            registry.inner_loss("s46e_shared")
    messages = [str(w.message) for w in caught if issubclass(w.category, PluginLoadWarning)]
    assert len(messages) == 1 and "inner model name 'linear'" in messages[0], messages


def _chunk_inputs():
    B, H, T, f, K = 1, 2, 4, 16, 2
    xq = xk = xv = torch.zeros(B, H, T, f)
    return xq, xk, xv, torch.zeros(B, H, T), torch.ones(K), torch.ones(H, f), torch.zeros(H, f)


@pytest.mark.parametrize("kernel", ["ttt_linear", "ttt_mlp"])
def test_the_triton_kernels_take_a_numpy_integer_checkpoint_every(monkeypatch, kernel) -> None:
    """``forward(..., checkpoint_every=np.int64(2))`` was refused ("must be a positive int") where the rest
    of innerloop takes numpy integers; it is read as the int 2 now. A bad one is named before the
    device check (on a CPU without the Triton interpreter that check refused first, naming the device)."""
    import importlib

    from innerloop.kernels.triton import common

    fused = importlib.import_module(f"innerloop.kernels.triton.{kernel}.fused")
    xq, xk, xv, lr, tau, ln_weight, ln_bias = _chunk_inputs()
    params = {
        name: torch.zeros(shape)
        for name, shape in importlib.import_module(f"innerloop.kernels.triton.{kernel}.naive")
        .param_shapes(1, 2, 16)
        .items()
    }
    args = (xq, xk, xv, lr, tau, params, ln_weight, ln_bias)
    for bad in (2.0, True, 0, np.int64(0)):
        with pytest.raises(
            ValueError, match=re.escape(f"checkpoint_every must be a positive integer, got {bad!r}")
        ):
            fused.forward(*args, checkpoint_every=bad)
    monkeypatch.setattr(common.HostChecks, "check_launchable", lambda *_: None)  # no kernel is launched
    given = fused.CHECKS.check_forward(*args, np.int64(2))
    assert given == 2 and type(given) is int


def test_chunk_delta_rule_takes_a_numpy_integer_chunk_size() -> None:
    """``chunk_delta_rule(..., chunk_size=np.int64(2))`` was refused ("must be an int >= 1"); it computes
    what ``chunk_size=2`` does now."""
    from innerloop.kernels.delta_chunk.chunk import chunk_delta_rule

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 5, 3, generator=g, dtype=torch.float64) for _ in range(3))
    beta = torch.rand(1, 1, 5, generator=g, dtype=torch.float64)
    expected = chunk_delta_rule(q, k, v, beta, chunk_size=2)
    got = chunk_delta_rule(q, k, v, beta, chunk_size=np.int64(2))
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    with pytest.raises(ValueError, match=r"chunk_size must be an int >= 1, got 2.0"):
        chunk_delta_rule(q, k, v, beta, chunk_size=2.0)


def test_a_kernel_spec_takes_a_numpy_integer_priority() -> None:
    """``KernelSpec(priority=np.int64(3))`` was refused ("priority must be an int"); it is kept as the int 3."""
    from dataclasses import replace

    from innerloop.kernels.triton.ttt_linear import KERNEL

    spec = replace(KERNEL, priority=np.int64(3))
    assert spec.priority == 3 and type(spec.priority) is int
    with pytest.raises(TypeError, match="priority must be an int"):
        replace(KERNEL, priority=3.0)


def test_the_primal_form_is_a_shared_helper_beside_the_dual_form() -> None:
    """``primal_planned_segment`` lived in the built-in ``minibatch_gd`` plugin, so the ``momentum`` rule
    (and a third-party rule) imported one plugin from another, where the dual form's equivalent is in
    ``kernels/reference.py``. It is in ``kernels/primal.py`` now; the old import gives the same function."""
    from innerloop.kernels import primal
    from innerloop.plugins.optimizers import minibatch_gd, momentum

    assert minibatch_gd.primal_planned_segment is primal.primal_planned_segment
    assert minibatch_gd.primal_segment is primal.primal_segment
    assert momentum.primal_planned_segment is primal.primal_planned_segment


@pytest.mark.slow  # builds the registry when run alone (~0.6 s: is the rule built in?); the checks take 0.02 s
def test_an_e2e_plugin_is_blamed_only_for_non_finite_values_from_finite_ones() -> None:
    """The check of each inner step (sums, read back once per call) names the update rule only when the
    weights it returned hold NaN or inf and what it was given did not: NaN fast weights passed in blame no
    plugin, nor do huge finite weights in and out (whose float32 sum overflows); a rule returning NaN from
    huge finite weights is named (s57d: the sums no longer overflow, so given weights of 3e38 count as
    finite, as they are)."""
    from innerloop.models.e2e import _raise_if_a_plugin_went_non_finite, _step_sums

    rule, loss = _NanAtBatch4Rule(), _NanAtBatch4Loss()
    finite, huge, nan = torch.ones(2, 3), torch.full((2, 3), 3e38), torch.full((2, 3), float("nan"))
    logits, losses = torch.zeros(2, 4, 5), torch.ones(2)
    for before, after in ((nan, nan), (finite, huge), (huge, huge)):
        _raise_if_a_plugin_went_non_finite(
            loss, rule, torch.stack([_step_sums({"w": before}, logits, losses, {"w": after})])
        )
    with pytest.raises(ValueError, match=r"'s46e_nan_rule' .* from finite ones"):
        _raise_if_a_plugin_went_non_finite(
            loss, rule, torch.stack([_step_sums({"w": huge}, logits, losses, {"w": nan})])
        )
    # the call's read-back: [steps, 2 W + 2] (one stacked read per call since s54)
    steps = torch.stack([_step_sums({"w": finite}, logits, losses, {"w": after}) for after in (finite, nan)])
    with pytest.raises(ValueError, match=r"'s46e_nan_rule' .* at inner step 2 of this call") as raised:
        _raise_if_a_plugin_went_non_finite(loss, rule, steps)
    assert "built-in" not in str(raised.value)
    with pytest.raises(
        ValueError, match=r"'score_first_sgd' \(origin 'builtin:.*\(a built-in plugin: more likely"
    ):
        _raise_if_a_plugin_went_non_finite(loss, ScoreFirstSGD(), steps)
    with pytest.raises(ValueError, match=r"'s46e_nan_loss' .* at inner step 1 of this call"):
        _raise_if_a_plugin_went_non_finite(
            loss, rule, torch.stack([_step_sums({"w": finite}, logits, losses * nan[0, :2], {"w": finite})])
        )


class _SneakyLoss(_SharedLoss):
    name = "s46e_sneaky"


class _TakesLinearThenRegistersDirectly:
    @hookimpl
    def register_inner_models(self, register):
        register(LinearModel())

    @hookimpl
    def register_inner_losses(self, register):
        innerloop.register_inner_loss(_SneakyLoss(), origin="s46e_sneaky_origin")


@pytest.mark.slow  # builds the registry when run alone (~1 s)
def test_surveying_a_refused_plugin_s_names_registers_nothing(monkeypatch) -> None:
    """The survey of a refused plugin's names reruns its hooks; what one registers in the registry itself
    (``innerloop.register_<kind>`` inside a hook) is rolled back with the rest of the plugin."""
    from innerloop.registry import isolated_registry, manager

    monkeypatch.setattr(
        manager, "_entry_points", lambda: [_EntryPoint("s46e_direct", _TakesLinearThenRegistersDirectly())]
    )
    with isolated_registry(), warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginLoadWarning)
        registry = innerloop.get_registry()
        assert "s46e_sneaky" not in registry.names("inner_loss")
        with pytest.raises(PluginError, match="s46e_sneaky"):
            registry.inner_loss("s46e_sneaky")
