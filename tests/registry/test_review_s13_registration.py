"""Review s13 (the user journey), registration: an update rule right for ``linear`` only, two installed
distributions registering one name, a loss whose gradient is NaN at a zero error, and an update rule
that declares its own token-by-token reference (another inner optimizer)."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from plugin_testing import One

import innerloop
from innerloop.core.protocol import HalfSquaredError, InnerLoss, LossPairs, UpdateRule
from innerloop.core.scan import advance_state, close_mini_batch, prepare_chunk, split_segments
from innerloop.kernels.primal import _flatten_heads, _primal_parts
from innerloop.plugins.optimizers.minibatch_gd import MiniBatchGD
from innerloop.registry import PluginError, build_registry, isolated_registry
from innerloop.registry.manager import PluginLoadWarning, format_plugin_table


@pytest.fixture(scope="module")
def registry():
    return build_registry(include_external=False)


# ---- a primal mini-batch rule with a per-token gradient transform (the review's rules.py) ---------


def primal(state, task, views, lr, tau, transform=lambda g: g, keys=None):
    """Mini-batch GD in the primal form, each token's gradient through ``transform``; only the weights
    named in ``keys`` (all when None) are updated."""
    chunk, loss_carry = prepare_chunk(state, task, views, lr, None)
    params, pending = state.params, state.pending
    outputs = []
    for seg in split_segments(state.position, views.query.shape[2], task.mini_batch_size):
        seg_tau = tau[seg.offset : seg.offset + seg.length]
        part = chunk.segment(seg)
        batch, heads, n, _ = part.query.shape
        parts = _primal_parts(task, params, part)
        lr_flat = _flatten_heads(part.lr)
        weights, new_pending = {}, {}
        for key, grad in parts.grads.items():
            grad = transform(grad) if keys is None or key in keys else torch.zeros_like(grad)
            extra = (1,) * (grad.dim() - 2)
            running = torch.cumsum(lr_flat.reshape(lr_flat.shape + extra) * grad, dim=1)
            running = running + _flatten_heads(pending[key])[:, None]
            new_pending[key] = running[:, -1].unflatten(0, (batch, heads))
            weights[key] = _flatten_heads(params[key])[:, None] - seg_tau.reshape((1, n) + extra) * running
        outputs.append(parts.read(weights))
        pending = new_pending
        if seg.closes_mini_batch:
            params, pending = close_mini_batch(params, pending, seg_tau[-1])
    return torch.cat(outputs, dim=2), advance_state(state, params, pending, views.query.shape[2], loss_carry)


class LinearOnlyGD(UpdateRule):
    """Wrong: updates only W1 / b1 (the linear model's weights), yet accepts every model."""

    name = "linear_only_gd"

    def forward(self, state, task, views, lr, tau):
        return primal(state, task, views, lr, tau, keys={"W1", "b1"})


def soft_sign(grad):
    return grad / (1 + grad.abs())


def soft_sign_token_loop(state, task, views, lr, tau):
    """Soft-sign GD token by token: each token's gradient (autograd, at the mini-batch's starting
    weights) squashed by g / (1 + |g|), summed into the pending step; independent of ``primal``."""
    pairs = task.loss.pairs(views, state.loss_carry)
    if pairs.valid is not None:
        lr = lr * pairs.valid.to(lr.dtype)
    params, pending, outputs = dict(state.params), dict(state.pending), []
    for t in range(views.query.shape[2]):
        offset = (state.position + t) % task.mini_batch_size
        leaves = {k: v.detach().requires_grad_(True) if not v.requires_grad else v for k, v in params.items()}
        with torch.enable_grad():
            loss = task.loss.token_loss(
                task.predict(leaves, pairs.inputs[:, :, t : t + 1]), pairs.targets[:, :, t : t + 1]
            )
            grads = torch.autograd.grad(
                loss.sum(), list(leaves.values()), create_graph=torch.is_grad_enabled()
            )
        for (key, value), grad in zip(params.items(), grads, strict=True):
            scale = lr[:, :, t].reshape(lr.shape[:2] + (1,) * (value.dim() - 2))
            pending[key] = pending[key] + scale * soft_sign(grad)
        current = {k: params[k] - tau[offset] * pending[k] for k in params}
        outputs.append(task.predict(current, views.query[:, :, t : t + 1]))
        if offset == task.mini_batch_size - 1:
            params, pending = current, {k: torch.zeros_like(v) for k, v in pending.items()}
    new_state = replace(
        state,
        params=params,
        pending=pending,
        position=state.position + views.query.shape[2],
        loss_carry=pairs.carry,
    )
    return torch.cat(outputs, dim=2), new_state


class SoftSignGD(UpdateRule):
    """A new inner optimizer (not gradient descent): each gradient coordinate squashed."""

    name = "soft_sign_gd"

    def forward(self, state, task, views, lr, tau):
        return primal(state, task, views, lr, tau, transform=soft_sign)


class SoftSignWithReference(SoftSignGD):
    name = "soft_sign_with_reference"

    def reference(self, state, task, views, lr, tau):
        return soft_sign_token_loop(state, task, views, lr, tau)


class SoftSignWrongReference(SoftSignGD):
    """Declares a reference that the rule does not compute (it halves every step)."""

    name = "soft_sign_wrong"

    def forward(self, state, task, views, lr, tau):
        return primal(state, task, views, lr * 0.5, tau, transform=soft_sign)

    def reference(self, state, task, views, lr, tau):
        return soft_sign_token_loop(state, task, views, lr, tau)


# ---- H1: every built-in model the rule accepts is checked at registration --------------------------


@pytest.mark.slow  # reason: registration checks three models (~1 s idle, several s on a loaded machine)
def test_a_rule_right_for_linear_only_is_refused_naming_the_model(registry):
    with pytest.raises(PluginError, match=r"linear_only_gd \((mlp|matrix), .*mini-batch gradient descent"):
        registry.add_plugin(One("update_rules", LinearOnlyGD()), origin="test.linear_only")
    assert "linear_only_gd" not in registry.names("update_rule")


# ---- M3: a rule declares its own token-by-token reference -------------------------------------------


def test_a_new_optimizer_without_a_reference_is_refused_saying_what_a_rule_is(registry):
    with pytest.raises(
        PluginError, match=r"implementation of mini-batch gradient descent.*UpdateRule.reference"
    ):
        registry.add_plugin(One("update_rules", SoftSignGD()), origin="test.soft_sign")


@pytest.mark.slow  # reason: registration runs the token-loop reference on three models
def test_a_new_optimizer_with_its_reference_registers_and_runs(registry):
    registry.add_plugin(One("update_rules", SoftSignWithReference()), origin="test.soft_sign_ref")
    assert "soft_sign_with_reference" in registry.names("update_rule")


def test_a_rule_that_disagrees_with_its_own_reference_is_refused(registry):
    with pytest.raises(PluginError, match=r"soft_sign_wrong .*its declared reference"):
        registry.add_plugin(One("update_rules", SoftSignWrongReference()), origin="test.soft_sign_wrong")


def test_a_reference_that_is_not_callable_is_refused(registry):
    class NotCallable(MiniBatchGD):
        name = "not_callable_reference"
        reference = "naive"

    with pytest.raises(PluginError, match="reference must be None .* got str 'naive'"):
        registry.add_plugin(One("update_rules", NotCallable()), origin="test.not_callable")


# ---- L1: the gradient probe at prediction == target ------------------------------------------------


class NormLoss(InnerLoss):
    """||p - t|| (no eps): a finite gradient at p == t, a NaN second derivative there."""

    name = "norm_loss_s13"

    def pairs(self, views, carry):
        return LossPairs(views.key, views.value)

    def token_loss(self, prediction, target):
        return (prediction - target).norm(dim=-1)


def test_a_loss_nan_at_zero_error_is_refused_naming_it_and_the_case(registry):
    with pytest.raises(PluginError, match=r"'norm_loss_s13'.*not finite where prediction == target"):
        registry.add_plugin(One("inner_losses", NormLoss()), origin="test.norm_loss")


class LogOfTarget(InnerLoss):
    """Finite at registration (random targets), NaN at run time on an all-zero input (0 * log 0)."""

    name = "log_of_target"

    def pairs(self, views, carry):
        return LossPairs(views.key, views.value)

    def token_loss(self, prediction, target):
        return 0.5 * (prediction - target).pow(2).sum(-1) * (1 + 0 * target.abs().sum(-1).log())


def test_a_nan_a_plugin_makes_at_run_time_names_the_plugins(fresh_global_registry):
    """The layer's message for a plugin's NaN (what tests/registry/test_plugin_review_s11.py checked
    with a norm loss, which registration now refuses)."""
    innerloop.register_inner_loss(LogOfTarget(), origin="logplug")
    layer = innerloop.TTTLayer(8, 2, inner_loss="log_of_target")
    with pytest.raises(ValueError, match="non-finite outputs") as raised:
        layer(torch.zeros(1, 8, 8))
    assert "inner loss 'log_of_target' (origin 'logplug')" in str(raised.value)


# ---- M1: two installed distributions registering one name -----------------------------------------


class FakeEntryPoint:
    def __init__(self, name, plugin, distribution):
        self.name, self.value, self._plugin = name, f"{name}_module", plugin
        self.dist = SimpleNamespace(name=distribution, version="1.0")

    def load(self):
        return self._plugin


class Huber(InnerLoss):
    name = "clashing_huber"

    def __init__(self, delta):
        self.delta = delta

    def pairs(self, views, carry):
        return LossPairs(views.key, views.value)

    def token_loss(self, prediction, target):
        error = (prediction - target).abs()
        return torch.where(error <= self.delta, 0.5 * error**2, self.delta * (error - 0.5 * self.delta)).sum(
            -1
        )


@pytest.mark.parametrize("order", ["a-first", "b-first"])
def test_a_name_two_distributions_register_is_an_error_naming_both(order):
    registry = build_registry(include_external=False)
    a = FakeEntryPoint("plug_a", One("inner_losses", Huber(1.0)), "plug-a")
    b = FakeEntryPoint("plug_b", One("inner_losses", Huber(0.1)), "plug-b")
    with pytest.warns(PluginLoadWarning, match="already registered"):
        for entry_point in (a, b) if order == "a-first" else (b, a):
            registry.add_entry_point(entry_point)
    with pytest.raises(PluginError, match="two installed plugins") as raised:
        registry.inner_loss("clashing_huber")
    assert "'plug-a'" in str(raised.value) and "'plug-b'" in str(raised.value)


def test_a_clashed_name_is_listed_and_warned_about_as_refused():
    """The listing, the valid names and the load warning agree with the lookup that refuses the name."""
    registry = build_registry(include_external=False)
    with pytest.warns(
        PluginLoadWarning, match="which another installed distribution also provides, is refused"
    ):
        for name in ("plug_a", "plug_b"):
            registry.add_entry_point(
                FakeEntryPoint(name, One("inner_losses", Huber(1.0)), name.replace("_", "-"))
            )
    assert "clashing_huber" not in registry.names("inner_loss")
    assert "reconstruction" in registry.names("inner_loss")
    row = next(line for line in format_plugin_table(registry).splitlines() if "clashing_huber" in line)
    assert "[refused: another installed distribution provides the same name" in row


def test_the_registry_loads_under_a_float64_default_dtype():
    """The plugin checks run in float32 whatever the caller's default dtype (they failed with "expected
    scalar type Double but found Float" when the registry was first loaded under float64)."""
    torch.set_default_dtype(torch.float64)  # the suite's autouse fixture restores it
    with isolated_registry():
        layer = innerloop.TTTLayer(16, 2, mini_batch_size=4)
        assert torch.get_default_dtype() == torch.float64  # the checks gave the caller's default back
        assert {p.dtype for p in layer.parameters()} == {torch.float64}
        y, _ = layer(torch.randn(1, 8, 16))
        assert y.dtype == torch.float64 and bool(torch.isfinite(y).all())


def test_a_plugin_taking_a_builtin_name_keeps_the_builtin():
    registry = build_registry(include_external=False)
    builtin = registry.inner_loss("reconstruction")

    class Imposter(HalfSquaredError):
        name = "reconstruction"

        def pairs(self, views, carry):
            return LossPairs(views.key, views.value)

    with pytest.warns(PluginLoadWarning, match="already registered"):
        registry.add_entry_point(FakeEntryPoint("imposter", One("inner_losses", Imposter()), "imposter-dist"))
    assert registry.inner_loss("reconstruction") is builtin
