"""Review s26: a new user's journeys through the docs (a plugin loss, training, long-context decoding,
comparing with attention, hostile inputs). Each test is one finding of /work/notes/review_s26_journeys.md."""

from __future__ import annotations

import pytest
import torch

import innerloop
from innerloop import InnerLoss, LossPairs


class _ShapeAfterEight(InnerLoss):
    """Right at registration's small shape, wrong once a call holds more than 8 tokens: ``pairs``
    returns what ``mode`` says there (a plausible plugin bug: a window or a pad sized for short calls)."""

    name = "s26_shape_after_eight"

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def pairs(self, views, carry):
        if views.key.shape[2] <= 8:
            return LossPairs(views.key, views.value)
        if self.mode == "inputs":
            return LossPairs(views.key[:, :, :-1], views.value)
        if self.mode == "valid":
            return LossPairs(views.key, views.value, views.key.new_ones(views.key.shape[0], 1, 8))
        return (views.key, views.value)  # "type": a tuple, not a LossPairs

    def token_loss(self, prediction, target):
        return (prediction - target).pow(2).sum(-1)


@pytest.mark.parametrize("update_rule", ["dual_form", "minibatch_gd"])
@pytest.mark.parametrize(
    ("mode", "error", "message"),
    [
        (
            "inputs",
            ValueError,
            r"pairs\(\) must give inputs and targets of shape .*\(2, 2, 40, 8\).*got inputs \(2, 2, 39, 8\)",
        ),
        (
            "valid",
            ValueError,
            r"pairs\(\) gave valid of shape \(2, 1, 8\); valid must broadcast to \[B, H, T\] = \(2, 2, 40\)",
        ),
        ("type", TypeError, r"pairs\(\) must return an innerloop.LossPairs; got tuple"),
    ],
)
def test_a_plugin_loss_wrong_at_run_time_is_named_at_the_boundary(update_rule, mode, error, message):
    """Finding 1: a plugin loss whose ``pairs`` is right at registration's shape but not at a call's
    failed inside torch (vmap's 'Expected all tensors to have the same size', a broadcast error, an
    AttributeError on a tuple), without the plugin's name: the pairs are now checked where they are used."""
    torch.manual_seed(0)
    layer = innerloop.TTTLayer(16, 2, inner_loss=_ShapeAfterEight(mode), update_rule=update_rule)
    with pytest.raises(error, match=message) as caught:
        layer(torch.randn(2, 40, 16))
    assert "'s26_shape_after_eight'" in str(caught.value) and "_ShapeAfterEight" in str(caught.value)


@pytest.mark.parametrize(
    ("check", "args"),
    [
        ("check_inner_loss", ("next_token",)),
        ("check_inner_model", ("linear", "next_token")),
        ("check_update_rule", ("minibatch_gd", "linear", "next_token")),
    ],
)
def test_the_conformance_checks_take_a_registered_name(check, args):
    """Finding 2: ``check_kernel("name")`` and ``check_update_rule``'s ``model`` take a registered name,
    but ``check_update_rule("dual_form")`` failed with AttributeError "'str' object has no attribute
    'check_model'" and ``check_inner_loss("reconstruction")`` with "inner loss 'str' failed its smoke
    test": every plugin argument of the checks now takes an instance or a registered name."""
    from innerloop import testing

    options = {"gradients": False, "without_grad": False} if check == "check_update_rule" else {}
    getattr(testing, check)(*args, tokens=5, **options)  # no error: the named plugins conform


def test_a_check_given_an_unknown_name_says_which_are_registered():
    from innerloop.testing import check_update_rule

    with pytest.raises(ValueError, match=r"unknown update rule 'dual_fom'; registered: \['dual_form'"):
        check_update_rule("dual_fom")


class _WithinChunkOnly(innerloop.ModelInnerLoss):
    """A TTT-E2E inner loss written for ids ``[B, C]`` only (the registrar's smoke test used to give
    nothing else), while the default ``chunk_targets: next_token`` gives ``[B, C + 1]``."""

    name = "s26_within_chunk_only"

    def chunk_loss(self, logits, input_ids):
        batch, chunk, vocab = logits.shape
        flat = torch.nn.functional.cross_entropy(
            logits.reshape(batch * chunk, vocab),
            input_ids.reshape(batch * chunk).clamp(min=0),
            reduction="none",
        )
        return flat.view(batch, chunk).mean(1)


class _PerTokenAtRealChunks(innerloop.ModelInnerLoss):
    """Right (``[B]``) at the registrar's chunks of 4 tokens, per-token ``[B, C - 1]`` at longer ones."""

    name = "s26_per_token_at_real_chunks"

    def chunk_loss(self, logits, input_ids):
        chunk = logits.shape[1]
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), input_ids[:, 1:chunk].clamp(min=0), reduction="none"
        )
        return losses.mean(1) if chunk <= 4 else losses


def test_a_model_inner_loss_for_within_chunk_ids_only_is_refused_at_registration():
    """Finding 3: registration smoke-tested ``chunk_loss`` on ids ``[B, C]`` only; a plugin written to
    that passed and then failed the first forward of a default E2E model (ids ``[B, C + 1]``) with a
    raw torch error from its own code ("shape '[32]' is invalid for input of size 34")."""
    from innerloop.registry import isolated_registry

    with (
        isolated_registry(),
        pytest.raises(innerloop.PluginError, match=r"ids \[B, C \+ 1\] = \(2, 5\).*next_token"),
    ):
        innerloop.register_model_inner_loss(_WithinChunkOnly())


def test_a_model_inner_loss_wrong_at_a_real_chunk_size_is_named_not_summed():
    """Finding 4: an E2E model inner loss that returned ``[B, C - 1]`` losses at the model's chunk size
    (``[B]`` at the registrar's) ran without a word: the update rule took the gradient of their sum,
    a loss weighted otherwise than the plugin's contract ([B]) says. Now one error names it."""
    from innerloop.models import E2EConfig, ModelConfig, build_model
    from innerloop.registry import isolated_registry

    with isolated_registry():
        innerloop.register_model_inner_loss(_PerTokenAtRealChunks())
        e2e = E2EConfig(chunk_size=8, inner_loss="s26_per_token_at_real_chunks")
        config = ModelConfig(
            mixer="e2e", hidden_size=16, num_heads=2, num_layers=2, intermediate_size=32, window=8, e2e=e2e
        )
        model = build_model(config)
        with pytest.raises(ValueError, match=r"'s26_per_token_at_real_chunks'.*\[B\] = \(2,\); got \(2, 7\)"):
            model(torch.randint(0, 256, (2, 12)))


class _StepUnderNoGrad(innerloop.ModelUpdateRule):
    """SGD written the usual torch way, the update under ``torch.no_grad()``: the meta-gradient through
    the fast weights is cut, whatever ``create_graph`` asks."""

    name = "s26_step_under_no_grad"

    def step(self, fast, losses, lr, max_grad_norm, create_graph):
        grads = torch.autograd.grad(losses.sum(), list(fast.values()), retain_graph=True)
        with torch.no_grad():
            return {k: v - lr * g for (k, v), g in zip(fast.items(), grads, strict=True)}


def test_a_model_update_rule_that_cuts_the_meta_gradient_is_refused_at_registration():
    """Finding 5: a TTT-E2E update rule whose step returns fast weights without a graph (a step under
    ``torch.no_grad()``, or ``.detach()``) registered and trained without a word, while the outer
    gradient through every later chunk's fast weights was silently lost."""
    from innerloop.registry import isolated_registry

    with (
        isolated_registry(),
        pytest.raises(
            innerloop.PluginError,
            match=r"create_graph=True\) returned fast weights \['v', 'w'\] that do not depend",
        ),
    ):
        innerloop.register_model_update_rule(_StepUnderNoGrad())


class _CarryGrowsAfterEight(InnerLoss):
    """``XK_{t-1} -> XV_t`` with the last key carried, right at registration's shapes; past 8 tokens in a
    call it carries the last two keys instead (a plausible slip), a carry of another shape."""

    name = "s26_carry_grows_after_eight"

    def init_carry(self, batch_size, num_heads, head_dim, like):
        return {"last": like.new_zeros(batch_size, num_heads, 1, head_dim)}

    def pairs(self, views, carry):
        keys = torch.cat([carry["last"], views.key], dim=2)
        kept = 2 if views.key.shape[2] > 8 else 1
        return LossPairs(keys[:, :, :-1], views.value, carry={"last": views.key[:, :, -kept:]})

    def token_loss(self, prediction, target):
        return (prediction - target).pow(2).sum(-1)


def test_a_plugin_carry_that_changes_shape_is_named_not_blamed_on_the_state():
    """Finding 6: a plugin loss whose ``pairs`` returned a carry of another shape than it received ran,
    and the next call with the state the layer had returned failed with "state.loss_carry must hold what
    inner loss ... keeps for this batch ...: pass the state this layer returned, or None", which the
    user had done. The carry is now checked where the plugin returns it, naming the plugin."""
    torch.manual_seed(0)
    layer = innerloop.TTTLayer(16, 2, inner_loss=_CarryGrowsAfterEight())
    with pytest.raises(
        ValueError, match=r"'s26_carry_grows_after_eight'.*carry whose entries changed shape.*'last'"
    ):
        layer(torch.randn(2, 20, 16))
    _, state = layer(torch.randn(2, 5, 16))  # calls of up to 8 tokens keep the carry's shape
    layer(torch.randn(2, 3, 16), state)


def test_an_allow_list_naming_no_installed_entry_point_is_warned_about(monkeypatch):
    """Finding 7: ``INNERLOOP_PLUGINS=hubr`` (for an installed ``huber``) loaded no plugin without a
    word: ``innerloop plugins`` listed none, and a run asking for the plugin's loss said "Only the
    entry-point plugins ['hubr'] are loaded", a name no package provides."""
    from types import SimpleNamespace

    from innerloop import PluginLoadWarning
    from innerloop.registry import manager

    point = SimpleNamespace(name="huber", value="huber_plugin", dist=SimpleNamespace(name="huber-plugin"))
    monkeypatch.setattr(manager, "_entry_points", lambda: [point])
    monkeypatch.delenv(manager.DISABLE_ENV, raising=False)
    monkeypatch.setenv(manager.ALLOW_ENV, "hubr")
    with pytest.warns(
        PluginLoadWarning,
        match=r"INNERLOOP_PLUGINS='hubr' names \['hubr'\], which no installed .*\['huber'\]",
    ):
        assert manager.load_entry_point_plugins(manager.Registry()) == []


def _rule_wrong_past(tokens: int, how: str) -> innerloop.UpdateRule:
    """``minibatch_gd`` itself, except that on a call of more than ``tokens`` tokens its ``forward``
    returns one output token too few (``how="outputs"``) or a state one position too far ("position"):
    right at every shape registration checks, wrong at a user's longer call."""
    from dataclasses import replace

    base = type(innerloop.get_registry().update_rule("minibatch_gd"))

    class WrongPast(base):
        name = f"s26_wrong_{how}_past_{tokens}"

        # the layer's linear model only: registration checks it alone, not mlp and matrix
        def check_model(self, model):
            return None if model.name == "linear" else "s26: the linear model only"

        def forward(self, state, task, views, lr, tau, **options):
            out, new = super().forward(state, task, views, lr, tau, **options)
            if views.key.shape[2] > tokens and how == "outputs":
                out = out[:, :, :-1]
            if views.key.shape[2] > tokens and how == "position":
                new = replace(new, position=new.position + 1)
            return out, new

    return WrongPast()


@pytest.mark.slow  # a layer given a rule instance runs the registrar's conformance checks on it (~0.7 s)
@pytest.mark.parametrize(
    ("how", "message"),
    [
        (
            "outputs",
            r"forward must return outputs of the query's shape \[B, H, T, f\] = \(1, 2, 9, 8\); got .*\(1, 2, 8, 8\)",
        ),
        (
            "position",
            r"the state forward returns must be at position 9 \(the input state's 0 \+ the call's 9 tokens\); got 10",
        ),
    ],
)
def test_an_update_rule_wrong_at_a_call_s_shape_is_named(how, message):
    """Finding 8: an update rule plugin whose ``forward`` returned too few outputs at a call's shape
    failed in the layer's reshape ("shape '[1, 210, 16]' is invalid for input of size 3344"), and one
    returning a state at a wrong position ran silently (the next call then cut its mini-batches
    elsewhere: wrong numbers). ``run_scan`` now checks what the rule returned, as the checks do."""
    from innerloop.core.scan import RuleOutputError

    torch.manual_seed(0)
    layer = innerloop.TTTLayer(16, 2, update_rule=_rule_wrong_past(8, how), mini_batch_size=4)
    layer(torch.randn(1, 8, 16))  # right up to 8 tokens
    with pytest.raises(RuleOutputError, match=rf"update rule 's26_wrong_{how}_past_8': {message}"):
        layer(torch.randn(1, 9, 16))
