"""Review s21: a third-party user writes plugins from the docs alone (README "Plugins", CONTRIBUTING
"Write and register a plugin") and checks them.

The working example plugins (a cosine reconstruction loss, a SiLU MLP stack model with its fused
kernel, a gated linear model that is not a stack, another inner optimizer with a declared reference)
are registered both ways (a hook module, ``innerloop.register_<kind>``), compared with a float64
implementation written here from their math, and property-tested. The defects found are the
``xfail(strict=True)`` tests; docs/notes in /work/notes/review_s21_plugins.md.
"""

from __future__ import annotations

import types
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_passed_checks import _autograd_inside  # a rule taking torch.autograd.grad inside

import innerloop
from innerloop import (
    Activation,
    AffineLayer,
    InnerLoss,
    InnerModel,
    LossPairs,
    PluginError,
    StackModel,
    TTTLayer,
    UpdateRule,
)
from innerloop.kernels import cpu, fused_torch
from innerloop.registry import isolated_registry
from innerloop.testing import (
    check_inner_loss,
    check_inner_model,
    check_kernel,
    make_problem,
    naive_token_loop,
    run_layer_in_chunks,
)
from innerloop.testing.strategies import layer_configs, seeds, split_points

# --------------------------------------------------------------------------------------------------
# The plugins, as a user writes them from the docs
# --------------------------------------------------------------------------------------------------


class CosineReconstruction(InnerLoss):
    """``1 - cos(prediction, target)`` per token, key view -> value view (norms smoothed by ``eps``)."""

    name = "s21_cosine"
    eps = 1e-6

    def pairs(self, views, carry):
        return LossPairs(views.key, views.value)

    def token_loss(self, prediction, target):
        pn = (prediction.pow(2).sum(-1) + self.eps).sqrt()
        tn = (target.pow(2).sum(-1) + self.eps).sqrt()
        return 1 - (prediction * target).sum(-1) / (pn * tn)

    def token_loss_grad(self, prediction, target):
        pn = (prediction.pow(2).sum(-1, keepdim=True) + self.eps).sqrt()
        tn = (target.pow(2).sum(-1, keepdim=True) + self.eps).sqrt()
        dot = (prediction * target).sum(-1, keepdim=True)
        return -(target / (pn * tn) - dot * prediction / (pn**3 * tn))


def _silu(x):
    return x * torch.sigmoid(x)


def _silu_derivative(x):
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


SILU = Activation("s21_silu", _silu, _silu_derivative)


class SiluMLP(StackModel):
    """``g(x) = silu(x W1 + b1) W2 + b2``, hidden 2f."""

    name = "s21_silu_mlp"

    @property
    def stack(self):
        return (AffineLayer("W1", "b1", SILU), AffineLayer("W2", "b2", None))

    def param_shapes(self, f):
        return {"W1": (f, 2 * f), "b1": (1, 2 * f), "W2": (2 * f, f), "b2": (1, f)}

    def init_params(self, num_heads, f, generator=None):
        return {
            "W1": torch.randn(num_heads, f, 2 * f, generator=generator) * 0.02,
            "b1": torch.zeros(num_heads, 1, 2 * f),
            "W2": torch.randn(num_heads, 2 * f, f, generator=generator) * 0.02,
            "b2": torch.zeros(num_heads, 1, f),
        }


class GatedLinear(InnerModel):
    """``g(x) = (x W) * sigmoid(x G)``: not a stack, so primal form only."""

    name = "s21_gated_linear"

    def param_shapes(self, f):
        return {"W": (f, f), "G": (f, f)}

    def init_params(self, num_heads, f, generator=None):
        return {
            "W": torch.randn(num_heads, f, f, generator=generator) * 0.02,
            "G": torch.randn(num_heads, f, f, generator=generator) * 0.02,
        }

    def forward(self, params, x):
        return (x @ params["W"]) * torch.sigmoid(x @ params["G"])


class HalfLrGD(UpdateRule):
    """Another inner optimizer: mini-batch GD at half the learning rate, with its declared reference.
    Its forward delegates to the primal form of ``minibatch_gd`` (runs under inference_mode)."""

    name = "s21_half_lr_gd"

    def forward(self, state, task, views, lr, tau):
        return innerloop.get_registry().update_rule("minibatch_gd").forward(state, task, views, 0.5 * lr, tau)

    def reference(self, state, task, views, lr, tau):
        return naive_token_loop(state, task, views, lr * 0.5, tau)


def _plugin_module() -> types.ModuleType:
    """The hook module of the docs (what an entry point names)."""
    module = types.ModuleType("s21_plugin_module")

    @innerloop.hookimpl
    def register_inner_losses(register):
        register(CosineReconstruction())

    @innerloop.hookimpl
    def register_inner_models(register):
        register(SiluMLP())
        register(GatedLinear())

    @innerloop.hookimpl
    def register_update_rules(register):
        register(HalfLrGD())

    @innerloop.hookimpl
    def register_kernels(register):
        model = SiluMLP()
        register(fused_torch.kernel_spec(model.name, model.stack))
        register(cpu.kernel_spec(model.name, model.stack))

    for hook in (register_inner_losses, register_inner_models, register_update_rules, register_kernels):
        setattr(module, hook.__name__, hook)
    return module


@pytest.fixture
def plugins():
    with isolated_registry():
        innerloop.register(_plugin_module())
        yield innerloop.get_registry()


# --------------------------------------------------------------------------------------------------
# A float64 implementation of the plugins' math, written here without innerloop
# --------------------------------------------------------------------------------------------------


def _my_layer_norm(z, weight, bias, eps):
    mean = z.mean(-1, keepdim=True)
    var = ((z - mean) ** 2).mean(-1, keepdim=True)
    return (z - mean) / torch.sqrt(var + eps) * weight + bias


def _my_g(model, p, x):
    if model == "s21_silu_mlp":
        h = x @ p["W1"] + p["b1"]
        return (h * torch.sigmoid(h)) @ p["W2"] + p["b2"]
    return (x @ p["W"]) * torch.sigmoid(x @ p["G"])


def _my_loss(loss, prediction, target):
    if loss == "s21_cosine":
        eps = 1e-6
        pn = torch.sqrt((prediction**2).sum(-1) + eps)
        tn = torch.sqrt((target**2).sum(-1) + eps)
        return 1 - (prediction * target).sum(-1) / (pn * tn)
    return 0.5 * ((prediction - target) ** 2).sum(-1)


def _my_token_loop(problem, model, loss, lr_scale):
    """Mini-batch TTT, one (sequence, head) and one token at a time, with my own autograd calls."""
    state, task, views = problem.state, problem.task, problem.views
    B, H, T, f = views.query.shape
    K = task.mini_batch_size
    out = torch.zeros(B, H, T, f, dtype=torch.float64)
    for b in range(B):
        for h in range(H):

            def wrapped(p, x, h=h):
                z = _my_g(model, p, x)
                if task.norm_weight is not None:
                    z = _my_layer_norm(z, task.norm_weight[h], task.norm_bias[h], task.norm_eps)
                return x + z if task.residual else z

            start = {k: v[b, h].clone() for k, v in state.params.items()}
            summed = {k: torch.zeros_like(v) for k, v in start.items()}
            for t in range(T):
                leaves = {k: v.detach().clone().requires_grad_(True) for k, v in start.items()}
                value = _my_loss(
                    loss, wrapped(leaves, views.key[b, h, t : t + 1]), views.value[b, h, t : t + 1]
                )
                grads = torch.autograd.grad(value.sum(), list(leaves.values()))
                for key, grad in zip(leaves, grads, strict=True):
                    summed[key] = summed[key] + lr_scale * problem.lr[b, h, t] * grad
                current = {k: start[k] - problem.tau[t % K] * summed[k] for k in start}
                out[b, h, t] = wrapped(current, views.query[b, h, t : t + 1])[0].detach()
                if t % K == K - 1:
                    start, summed = current, {k: torch.zeros_like(v) for k, v in start.items()}
    return out


CASES = [
    (model, loss, rule, scale)
    for model in ("s21_silu_mlp", "s21_gated_linear")
    for loss in ("s21_cosine", "reconstruction")
    for rule, scale in (("dual_form", 1.0), ("minibatch_gd", 1.0), ("s21_half_lr_gd", 0.5))
    if not (model == "s21_gated_linear" and rule == "dual_form")
]


@pytest.mark.slow  # 10 problems x 2 wrappings through a per-token autograd loop (~2 s)
@pytest.mark.parametrize("wrapping", [(True, True), (False, False)])
def test_plugin_numbers_are_their_math(plugins, wrapping):
    for model, loss, rule, scale in CASES:
        problem = make_problem(
            plugins.inner_model(model),
            plugins.inner_loss(loss),
            batch=2,
            heads=2,
            head_dim=4,
            tokens=9,
            mini_batch_size=4,
            norm=wrapping[0],
            residual=wrapping[1],
        )
        out, _ = problem.run(plugins.update_rule(rule))
        mine = _my_token_loop(problem, model, loss, scale)
        torch.testing.assert_close(out, mine, rtol=1e-10, atol=1e-12, msg=f"{model} {loss} {rule} {wrapping}")


@pytest.mark.slow  # check_inner_model runs every rule on each model (~1 s)
def test_the_docs_checks_pass_on_the_plugins(plugins):
    check_inner_model(SiluMLP())
    check_inner_model(GatedLinear())


@pytest.mark.slow  # check_inner_loss runs every model and rule (~3 s)
def test_check_inner_loss_passes_on_the_cosine_loss(plugins):
    check_inner_loss(CosineReconstruction())


@pytest.mark.slow  # a layer forced onto the kernel, many cases (~1 s)
def test_check_kernel_passes_on_the_plugin_stack(plugins):
    report = check_kernel("fused_torch_s21_silu_mlp")
    assert report.compared


@pytest.mark.slow  # the plugins fixture runs the update rule's registration check (~0.8 s)
def test_dispatch_of_plugin_kernels_says_why(plugins):
    layer = TTTLayer(16, 2, inner_model="s21_silu_mlp", mini_batch_size=4)
    layer(torch.randn(2, 8, 16))
    path, reason = layer.dispatches[0]
    assert path == "fused_torch_s21_silu_mlp"
    assert "cpu_ttt_s21_silu_mlp" in reason and "s21_silu" in reason  # the CPU kernel's refusal, named
    # the kernel fuses the reconstruction loss: a layer with the cosine loss never gets it
    with pytest.raises(ValueError, match="not a kernel for"):
        TTTLayer(
            16, 2, inner_model="s21_silu_mlp", inner_loss="s21_cosine", kernel="fused_torch_s21_silu_mlp"
        )
    with pytest.raises(ValueError, match="fuses the inner LayerNorm"):
        TTTLayer(16, 2, inner_model="s21_silu_mlp", inner_norm=False, kernel="fused_torch_s21_silu_mlp")
    with pytest.raises(ValueError, match="dual form needs"):
        TTTLayer(16, 2, inner_model="s21_gated_linear")


@pytest.mark.slow  # hypothesis over layer configurations, three paths each (~3 s)
@given(
    config=layer_configs(
        inner_models=("s21_silu_mlp",),
        inner_losses=("s21_cosine", "reconstruction"),
        update_rules=("dual_form",),
        max_heads=2,
        head_dims=(4, 6),
        max_mini_batch=4,
    ),
    seed=seeds(),
    data=st.data(),
)
@settings(max_examples=8, deadline=None)
def test_plugin_layer_dual_equals_primal_split_and_decode(config, seed, data):
    with isolated_registry():
        innerloop.register(_plugin_module())
        length = data.draw(st.integers(1, 2 * config["mini_batch_size"] + 2), label="length")
        cuts = data.draw(split_points(length), label="cuts")
        torch.manual_seed(seed)
        dual = TTTLayer(**config).double()
        primal = TTTLayer(**{**config, "update_rule": "minibatch_gd"}).double()
        primal.load_state_dict(dual.state_dict())
        x = torch.randn(2, length, config["hidden_size"], dtype=torch.float64)
        whole, _ = primal(x)
        split, _ = run_layer_in_chunks(dual, x, cuts)
        torch.testing.assert_close(split, whole, rtol=1e-9, atol=1e-10)
        pieces, state = [], None
        for t in range(length):  # token by token (decoding)
            y, state = dual(x[:, t : t + 1], state)
            pieces.append(y)
        torch.testing.assert_close(torch.cat(pieces, 1), whole, rtol=1e-9, atol=1e-10)


@pytest.mark.slow  # gradcheck through the inner loop (~1 s)
@pytest.mark.parametrize("rule", ["dual_form", "minibatch_gd"])
def test_plugin_layer_gradcheck(plugins, rule):
    torch.manual_seed(0)
    layer = TTTLayer(
        4,
        1,
        inner_model="s21_silu_mlp",
        inner_loss="s21_cosine",
        update_rule=rule,
        mini_batch_size=2,
    ).double()
    x = torch.randn(1, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: layer(x)[0], (x,), eps=1e-6, atol=1e-6)


def test_plugin_refusals_name_the_plugin():
    class ShapeMismatch(GatedLinear):
        name = "s21_shape_mismatch"

        def param_shapes(self, f):
            return {"W": (f, f), "G": (f, f + 1)}

    class Clash(CosineReconstruction):
        name = "reconstruction"

    class WrongGradient(CosineReconstruction):
        name = "s21_wrong_gradient"

        def token_loss_grad(self, prediction, target):
            return 2 * super().token_loss_grad(prediction, target)

    with isolated_registry():
        with pytest.raises(PluginError, match="s21_shape_mismatch.*param_shapes"):
            innerloop.register_inner_model(ShapeMismatch())
        with pytest.raises(PluginError, match="'reconstruction'.*already registered by plugin 'builtin:"):
            innerloop.register_inner_loss(Clash())
        with pytest.raises(PluginError, match="s21_wrong_gradient.*token_loss_grad vs autograd"):
            innerloop.register_inner_loss(WrongGradient())
        innerloop.register_inner_loss(CosineReconstruction())
        with pytest.raises(PluginError, match="already registered"):
            innerloop.register_inner_loss(CosineReconstruction())
    assert "s21_cosine" not in innerloop.available("inner_loss")  # the isolated registry is gone


@pytest.mark.slow  # three Lightning fits of 2 steps (~3 s)
def test_plugins_train_through_the_lightning_module(plugins):
    import lightning as L

    from innerloop.models import ModelConfig, TTTConfig
    from innerloop.train import LanguageModelModule, TextDataModule

    for model, loss, rule in [
        ("s21_silu_mlp", "s21_cosine", "dual_form"),
        ("s21_silu_mlp", "reconstruction", "dual_form"),
        ("s21_gated_linear", "s21_cosine", "s21_half_lr_gd"),
    ]:
        L.seed_everything(0, verbose=False)
        config = ModelConfig(
            mixer="ttt",
            backbone="transformer",
            hidden_size=16,
            num_layers=1,
            num_heads=2,
            intermediate_size=32,
            ttt=TTTConfig(inner_model=model, inner_loss=loss, update_rule=rule, mini_batch_size=4),
        )
        module = LanguageModelModule(config, lr=3e-3, warmup_steps=1, max_steps=2)
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=2,
            max_epochs=-1,
            val_check_interval=2,
            check_val_every_n_epoch=None,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Lightning's own
            trainer.fit(module, datamodule=TextDataModule(seq_len=16, batch_size=2, val_batches=1))
        assert torch.isfinite(trainer.callback_metrics["val_loss"])


# --------------------------------------------------------------------------------------------------
# Defects
# --------------------------------------------------------------------------------------------------


class PrevKeyLazyCarry(InnerLoss):
    """XK_{t-1} -> XV_t; its carry (the last key, and whether there is one) is made by the first
    ``pairs`` call, not by ``init_carry``: CONTRIBUTING says such a loss overrides
    ``batched_carry_keys``, which it does. Every carry entry is batch-first."""

    name = "s21_prev_key_lazy"

    def batched_carry_keys(self, num_heads, head_dim, like):
        return frozenset({"prev", "seen"})

    def pairs(self, views, carry):
        B, H, T, f = views.key.shape
        prev = carry.get("prev", views.key.new_zeros(B, H, 1, f))
        seen = carry.get("seen", views.key.new_zeros(B))
        valid = torch.ones(B, 1, T, dtype=views.key.dtype)
        valid[:, 0, 0] = seen
        inputs = torch.cat([prev, views.key], dim=2)[:, :, :T]
        return LossPairs(
            inputs, views.value, valid, {"prev": views.key[:, :, -1:], "seen": torch.ones_like(seen)}
        )

    def token_loss(self, prediction, target):
        return 0.5 * (prediction - target).pow(2).sum(-1)

    def token_loss_grad(self, prediction, target):
        return prediction - target


def test_the_lazy_carry_loss_is_batch_independent():
    """What the registrar's refusal below accuses the loss of is false: each sequence's pairs and
    carry equal those of the sequence read alone, from the initial carry and from a carried one."""
    loss = PrevKeyLazyCarry()
    g = torch.Generator().manual_seed(0)
    views = innerloop.Views(*(torch.randn(2, 2, 3, 4, generator=g) for _ in range(3)))
    for carry in ({}, loss.pairs(views, {}).carry):
        whole = loss.pairs(views, carry)
        for row in range(2):
            alone = loss.pairs(
                innerloop.Views(*(v[row : row + 1] for v in (views.query, views.key, views.value))),
                {k: v[row : row + 1] for k, v in carry.items()},
            )
            torch.testing.assert_close(whole.inputs[row : row + 1], alone.inputs)
            for key in whole.carry:
                torch.testing.assert_close(whole.carry[key][row : row + 1], alone.carry[key])


def test_a_loss_that_overrides_batched_carry_keys_as_documented_registers():
    with isolated_registry():
        innerloop.register_inner_loss(PrevKeyLazyCarry())


def test_a_carry_entry_missing_from_init_carry_is_refused_with_the_reason():
    class NoOverride(PrevKeyLazyCarry):
        name = "s21_prev_key_no_override"
        batched_carry_keys = InnerLoss.batched_carry_keys

    with isolated_registry(), pytest.raises(PluginError) as refused:
        innerloop.register_inner_loss(NoOverride())
    assert "carry['prev'] holds a row per sequence" in str(refused.value)
    assert "(init_carry does not make it)" in str(refused.value)


def test_a_carry_not_batch_first_is_refused_with_the_reason():
    class HeadsFirst(PrevKeyLazyCarry):
        name = "s21_heads_first_carry"
        batched_carry_keys = InnerLoss.batched_carry_keys

        def init_carry(self, batch, heads, head_dim, like):
            return {"prev": like.new_zeros(heads, batch, 1, head_dim), "seen": like.new_zeros(batch)}

        def pairs(self, views, carry):
            pairs = super().pairs(views, {"prev": carry["prev"].transpose(0, 1), "seen": carry["seen"]})
            new = {"prev": pairs.carry["prev"].transpose(0, 1), "seen": pairs.carry["seen"]}
            return LossPairs(pairs.inputs, pairs.targets, pairs.valid, new)

    with isolated_registry(), pytest.raises(PluginError) as refused:
        innerloop.register_inner_loss(HeadsFirst())
    assert "neither batch-first nor shared by the batch" in str(refused.value)


def test_a_nan_token_loss_is_refused_naming_token_loss():
    class NanLoss(CosineReconstruction):
        name = "s21_nan_loss"
        token_loss_grad = InnerLoss.token_loss_grad

        def token_loss(self, prediction, target):
            return (prediction - target).pow(2).sum(-1) * float("nan")

    with isolated_registry(), pytest.raises(PluginError) as refused:
        innerloop.register_inner_loss(NanLoss())
    message = str(refused.value)
    assert "s21_nan_loss" in message
    assert "token_loss returned non-finite values (NaN)" in message


class AutogradTokenLoop(UpdateRule):
    """A rule written like the library's own naive_token_loop (torch.autograd.grad), the 'shape' of a
    reference that CONTRIBUTING points to: right with autograd and under no_grad, raises under
    torch.inference_mode."""

    name = "s21_autograd_loop"

    def check_model(self, model):  # registration checks linear alone: the dispatch is the same on every model
        return None if model.name == "linear" else "s21: the linear model only"

    def forward(self, state, task, views, lr, tau):
        _autograd_inside()
        return naive_token_loop(state, task, views, 0.5 * lr, tau)

    def reference(self, state, task, views, lr, tau):
        return naive_token_loop(state, task, views, lr * 0.5, tau)


@pytest.mark.slow  # registers a rule (its conformance check): ~0.4 s
def test_dispatches_say_something_for_a_plugin_rule():
    with isolated_registry():
        with pytest.warns(innerloop.PluginWarning):  # it takes torch.autograd.grad: not without autograd
            innerloop.register_update_rule(AutogradTokenLoop())  # a plain token loop: calls no dispatch
        layer = TTTLayer(8, 2, update_rule="s21_autograd_loop", mini_batch_size=2)
        layer(torch.randn(1, 5, 8))
        (path, reason), *rest = layer.dispatches
        assert not rest and path == "torch"
        assert reason.startswith("update rule 's21_autograd_loop' (origin ") and reason.endswith(
            "runs its own forward: no kernel dispatch"
        )


def test_a_directly_registered_kernel_names_its_own_origin():
    with isolated_registry():
        innerloop.register_inner_model(SiluMLP())
        innerloop.register_kernel(fused_torch.kernel_spec("s21_silu_mlp", SiluMLP().stack))
        origin = next(
            e.origin
            for e in innerloop.get_registry().entries("kernel")
            if e.name == "fused_torch_s21_silu_mlp"
        )
        assert origin == f"{__name__}.KernelSpec", origin
