"""Registration and innerloop.testing refuse plugins that compute wrong numbers silently: closed
forms outside the autograd graph, carries wrong for one-token chunks, update rules wrong for another
loss, wrapping or the outer gradients, eager-only losses, dtype slips and losses or models with no
gradient."""

from __future__ import annotations

import dataclasses
import sys
import types

import pytest
import torch
from plugin_testing import GradientByAutograd, One, ScaledWithoutGrad

import innerloop
from innerloop.core.protocol import Activation, AffineLayer, InnerLoss, InnerModel, LossPairs, StackModel
from innerloop.plugins.losses.reconstruction import HalfSquaredError
from innerloop.plugins.models.linear import LinearModel
from innerloop.plugins.optimizers.dual_form import DualForm
from innerloop.registry import PluginError, build_registry
from innerloop.testing import check_inner_loss, check_update_rule


@pytest.fixture(scope="module")
def registry():
    return build_registry(include_external=False)


def refused(registry, kind: str, obj, match: str) -> None:
    before = {k: registry.names(k) for k in ("inner_model", "inner_loss", "update_rule")}
    with pytest.raises(PluginError, match=match):
        registry.add_plugin(One(kind, obj), origin=f"test.{obj.name}")
    assert {k: registry.names(k) for k in before} == before  # left as it was


# ---- 1. closed forms outside the autograd graph ------------------------------------------------


class DetachedGrad(HalfSquaredError):
    name = "detached_grad"

    def pairs(self, views, carry):
        return LossPairs(views.key, views.value)

    def token_loss_grad(self, prediction, target):
        return (prediction - target).detach()  # the right values, no graph


def softplus_model(derivative) -> StackModel:
    class Softplus(StackModel):
        name = "softplus_detached"
        stack = (AffineLayer("W1", "b1", Activation("softplus", torch.nn.functional.softplus, derivative)),
                 AffineLayer("W2", "b2", None))  # fmt: skip

        def param_shapes(self, f):
            return {"W1": (f, f), "b1": (1, f), "W2": (f, f), "b2": (1, f)}

        def init_params(self, heads, f, generator=None):
            return {
                k: 0.3 * torch.randn(heads, *s, generator=generator) for k, s in self.param_shapes(f).items()
            }

    return Softplus()


def test_a_closed_form_gradient_outside_the_graph_is_refused(registry):
    refused(
        registry,
        "inner_losses",
        DetachedGrad(),
        r"detached_grad.*derivative w\.r\.t\. prediction.*outside the autograd graph",
    )


def test_an_activation_derivative_outside_the_graph_is_refused(registry):
    model = softplus_model(lambda z: torch.sigmoid(z).detach())
    refused(registry, "inner_models", model, r"derivative of activation 'softplus'.*w\.r\.t\. z")


def test_the_in_graph_versions_pass():
    innerloop.testing.checks.check_activation_derivatives(
        softplus_model(torch.sigmoid), torch.randn(3, 4).double()
    )

    class InGraph(DetachedGrad):
        def token_loss_grad(self, prediction, target):
            return prediction - target

    innerloop.testing.checks.check_loss_gradient(InGraph(), torch.randn(2, 3), torch.randn(2, 3))


# ---- 2. a carry wrong for one-token chunks -----------------------------------------------------


class TwoBack(HalfSquaredError):
    """Token t maps key[t-2] to value[t]; the carry (the last two keys) is wrong after a one-token chunk."""

    name = "two_back"

    def init_carry(self, batch, heads, f, like):
        return {"keys": like.new_zeros(batch, heads, 2, f)}

    def pairs(self, views, carry):
        keys = torch.cat([carry["keys"], views.key], 2)
        tokens = views.key.shape[2]
        pad = views.key.new_zeros(views.key.shape[:2] + (1, views.key.shape[3]))
        new = (
            views.key[:, :, -2:] if tokens >= 2 else torch.cat([pad, views.key], 2)
        )  # should be keys[:, :, -2:]
        return LossPairs(keys[:, :, :tokens], views.value, None, {"keys": new})


def test_a_carry_wrong_for_one_token_chunks_is_refused(registry):
    refused(registry, "inner_losses", TwoBack(), "built token by token")


def test_check_inner_loss_catches_it_too():
    with pytest.raises(AssertionError, match="token by token|chunked at"):
        check_inner_loss(TwoBack())


# ---- 3, 4. update rules wrong for another loss, wrapping, the gradients, or off linear --------


class DetachLR(DualForm):
    name = "detach_lr"

    def forward(self, state, task, views, lr, tau, **kw):
        return super().forward(state, task, views, lr.detach(), tau, **kw)


class AlwaysResidual(DualForm):
    name = "always_residual"

    def forward(self, state, task, views, lr, tau, **kw):
        return super().forward(state, dataclasses.replace(task, residual=True), views, lr, tau, **kw)


class IgnoresCarry(DualForm):
    name = "ignores_carry"

    def forward(self, state, task, views, lr, tau, **kw):
        b, h, _, f = views.key.shape
        fresh = dataclasses.replace(state, loss_carry=task.loss.init_carry(b, h, f, views.key))
        return super().forward(fresh, task, views, lr, tau, **kw)


class MLPOnlyTripled(DualForm):
    name = "mlp_only_tripled"

    def check_model(self, model):
        return "mlp only" if model.name == "linear" else super().check_model(model)

    def forward(self, state, task, views, lr, tau, **kw):
        return super().forward(state, task, views, 3 * lr, tau, **kw)


@pytest.mark.parametrize(
    ("rule", "match"),
    [
        (DetachLR(), r"gradient w\.r\.t\. lr"),
        (AlwaysResidual(), "residual=False"),
        (IgnoresCarry(), "next_token"),
        (MLPOnlyTripled(), r"mlp_only_tripled \(mlp"),  # checked on the first built-in model it accepts
    ],
)
def test_a_rule_wrong_beyond_the_default_problem_is_refused(registry, rule, match):
    refused(registry, "update_rules", rule, match)


def test_check_update_rule_defaults_cover_losses_wrappings_and_gradients():
    linear = LinearModel()
    for rule, match in (
        (DetachLR(), "gradient"),
        (AlwaysResidual(), "residual=False"),
        (IgnoresCarry(), "next_token"),
    ):
        with pytest.raises(AssertionError, match=match):
            check_update_rule(rule, linear, tokens=5, mini_batch_size=2, head_dim=2)


# ---- 9. built-in status is not the caller's to claim --------------------------------------------


class TauOne(DualForm):
    name = "tau_one"

    def forward(self, state, task, views, lr, tau, **kw):
        return super().forward(state, task, views, lr, torch.ones_like(tau), **kw)


def test_the_builtin_origin_prefix_is_reserved(registry):
    with pytest.raises(PluginError, match="reserved for innerloop's own plugins"):
        registry.add_plugin(One("update_rules", TauOne()), origin="builtin:mine")
    assert "tau_one" not in registry.names("update_rule")


def test_a_class_in_an_innerloop_named_module_is_still_checked(monkeypatch):
    module = types.ModuleType("innerloop.userext")
    monkeypatch.setitem(sys.modules, "innerloop.userext", module)
    spoofed = type("TauOne2", (TauOne,), {"__module__": "innerloop.userext", "name": "tau_one2"})
    with pytest.raises(PluginError, match="naive token loop"):
        innerloop.TTTLayer(8, 2, update_rule=spoofed(), mini_batch_size=2)


# ---- 11, 12, 13. eager-only losses, dtype slips, no gradient ------------------------------------


def loss_with(name: str, **methods) -> InnerLoss:
    body = {"name": name, "pairs": lambda self, v, c: LossPairs(v.key, v.value)}
    body.setdefault("token_loss", lambda self, p, t: 0.5 * (p - t).pow(2).sum(-1))
    body.update(methods)
    return type(name, (InnerLoss,), body)()


@pytest.mark.parametrize(
    ("loss", "match"),
    [
        (loss_with("item", token_loss=lambda s, p, t: (p - t).pow(2).sum(-1) * float((p - t).abs().max().item() > -1)),
         r"token_loss_grad failed.*no \.item\(\)"),
        (loss_with("pairs_f64", pairs=lambda s, v, c: LossPairs(v.key.double(), v.value.double())),
         r"pairs\(\) gave inputs of dtype torch.float64 for views of dtype torch.float32"),
        (loss_with("grad_f64", token_loss_grad=lambda s, p, t: (p - t).double()),
         r"token_loss_grad returned torch.float64 for a torch.float32 prediction"),
        (loss_with("detached", token_loss=lambda s, p, t: 0.5 * (p.detach() - t).pow(2).sum(-1)),
         "token_loss_grad is zero at a random point"),
    ],
)  # fmt: skip
def test_a_loss_that_would_fail_or_never_learn_in_a_layer_is_refused(registry, loss, match):
    refused(registry, "inner_losses", loss, match)


class Rounded(InnerModel):
    name = "rounded"

    def param_shapes(self, f):
        return {"W": (f, f)}

    def init_params(self, heads, f, generator=None):
        return {"W": 0.5 * torch.randn(heads, f, f, generator=generator)}

    def forward(self, params, x):
        return torch.round(x @ params["W"])


class Float64Init(LinearModel):
    name = "float64_init"

    def init_params(self, heads, f, generator=None):
        return {k: v.double() for k, v in super().init_params(heads, f, generator).items()}


def test_a_model_with_no_gradient_is_refused(registry):
    refused(registry, "inner_models", Rounded(), "gradient of forward w.r.t. its weights")


def test_a_model_with_float64_init_params_is_accepted_as_a_layer_would_take_it():
    registry = build_registry(include_external=False)
    registry.add_plugin(One("inner_models", Float64Init()), origin="test.float64_init")
    assert "float64_init" in registry.names("inner_model")


# ---- a closed form that breaks without autograd (review s64) ------------------------------------


def test_a_closed_form_that_breaks_without_autograd_is_warned_of_or_refused(registry):
    """A layer calls token_loss_grad under no_grad / inference_mode in evaluation and generation; both
    losses registered silently before, and a layer with the first raised under inference_mode."""
    refused(
        registry, "inner_losses", ScaledWithoutGrad(), r"s64_scaled_without_grad.*under torch.no_grad\(\)"
    )
    with pytest.warns(innerloop.PluginWarning, match=r"s64_gradient_by_autograd.*torch.inference_mode\(\)"):
        registry.add_plugin(One("inner_losses", GradientByAutograd()), origin="test.s64_gradient_by_autograd")
    registry.remove_plugin("test.s64_gradient_by_autograd")
