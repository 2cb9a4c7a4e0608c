"""Review s48l: the testing kit against wrong third-party plugins (each passed the kit before its fix).

- an update rule right for the first 150 tokens of a sequence only (it halves the inner learning rate
  from position 160 on: a per-position table sized for a few hundred tokens): every check started at
  position 0 and ran at most 150 tokens; now one call also starts far into a sequence;
- an inner loss whose ``token_loss`` clips the target to [-4, 4] while its closed-form gradient does not:
  the targets checked were the views' (unit-sized), never large; now targets of sizes 0.01 to 100 too;
- a kernel that caches what it derives from the weights by their shape: every case of ``check_kernel``
  ran the same layer weights; now a case runs after the weights changed.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import innerloop
from innerloop.core.protocol import InnerLoss, LossPairs, UpdateRule
from innerloop.kernels import fused_torch
from innerloop.plugins.models.linear import LinearModel
from innerloop.plugins.optimizers.minibatch_gd import MiniBatchGD
from innerloop.registry import PluginError, get_registry, isolated_registry
from innerloop.testing import check_inner_loss, check_kernel, checks, kernel_checks

PRIMAL = MiniBatchGD()


class WrongPastPosition160(UpdateRule):
    """Mini-batch GD whose inner learning rate halves from position 160 on (a table sized for 160)."""

    name = "wrong_past_position_160"
    supports_decay = True

    def forward(self, state, task, views, lr, tau, decay=None):  # noqa: ANN001, ANN201
        positions = state.position + torch.arange(lr.shape[-1])
        return PRIMAL.forward(state, task, views, torch.where(positions >= 160, lr / 2, lr), tau, decay)


def _far_check(rule: UpdateRule) -> None:
    registry = get_registry()
    check = checks._RuleCheck(rule, None, 0, checks.FLOAT64_TOLERANCE)
    options = {"norm": True, "residual": True}
    checks._check_rule_far_into_sequence(
        check, registry.inner_model("linear"), registry.inner_loss("next_token"), options
    )


@pytest.mark.slow
def test_a_rule_wrong_far_into_a_sequence_is_caught_by_the_far_check() -> None:
    with pytest.raises(AssertionError, match=r"from a state at position 400012 vs the naive"):
        _far_check(WrongPastPosition160())


@pytest.mark.slow
def test_the_far_check_passes_the_built_in_rules() -> None:
    for name in ("minibatch_gd", "dual_form", "momentum"):
        _far_check(get_registry().update_rule(name))


def test_check_update_rule_runs_the_far_check_on_its_first_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """check_update_rule (and so registration, which calls it) reaches the far check; the values before
    it are stubbed to keep this fast."""
    seen = []
    stubbed_checks = (
        "_check_rule_on",
        "_check_rule_with",
        "_check_rule_without_grad",
        "check_update_rule_in_float32",
        "_check_rule_log_gate",
        "_check_default_shapes",
    )  # every check but the far one (the first model's checks call it since s54h)
    for stubbed in stubbed_checks:
        monkeypatch.setattr(checks, stubbed, lambda *args, **kwargs: None)
    monkeypatch.setattr(
        checks, "_check_rule_far_into_sequence", lambda check, model, *rest: seen.append(model.name)
    )
    checks.check_update_rule("minibatch_gd")
    assert seen == ["linear"]


@pytest.mark.slow
def test_registration_refuses_a_rule_wrong_far_into_a_sequence() -> None:
    with isolated_registry(), pytest.raises(PluginError, match="wrong_past_position_160.*position"):
        innerloop.register_update_rule(WrongPastPosition160())


class ClippedTargetLoss(InnerLoss):
    """token_loss clips the target to [-4, 4]; the closed form forgets to (right for unit-sized targets)."""

    name = "clipped_target_s48l"

    def pairs(self, views, carry):  # noqa: ANN001, ANN201
        return LossPairs(inputs=views.key, targets=views.value, valid=None, carry={})

    def token_loss(self, prediction, target):  # noqa: ANN001, ANN201
        return (prediction - target.clamp(-4, 4)).pow(2).sum(dim=-1)

    def token_loss_grad(self, prediction, target):  # noqa: ANN001, ANN201
        return 2 * (prediction - target)


def test_check_inner_loss_catches_a_closed_form_wrong_for_large_targets_only() -> None:
    with pytest.raises(AssertionError, match="clipped_target_s48l: token_loss_grad vs autograd"):
        check_inner_loss(ClippedTargetLoss(), batch=2, heads=1, head_dim=3, tokens=8, mini_batch_size=4)


def test_registration_refuses_a_closed_form_wrong_for_large_targets_only() -> None:
    with isolated_registry(), pytest.raises(PluginError, match="clipped_target_s48l.*token_loss_grad"):
        innerloop.register_inner_loss(ClippedTargetLoss())


_FUSED = fused_torch.kernel_spec("linear", LinearModel().stack)


def _stale_ln_weight_forward(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps, _cache={}):  # noqa: ANN001, ANN202, B006
    """The fused path with its LayerNorm weight cached by shape: stale once the weights change."""
    key = (tuple(ln_weight.shape), ln_weight.dtype)
    cached = _cache.setdefault(key, ln_weight.detach().clone())
    return _FUSED.forward(
        xq, xk, xv, lr, tau, params, cached + (ln_weight - ln_weight.detach()), ln_bias, eps
    )


def test_check_kernel_runs_a_case_after_the_weights_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    ran = []
    monkeypatch.setattr(kernel_checks._Checker, "run", lambda self, case: ran.append((case, self.reference)))
    kernel_checks._check_head_dim(
        _FUSED,
        kernel_checks._layer_config(_FUSED, None, None, None, {}),
        4,
        torch.float64,
        torch.device("cpu"),
        0,
        1e-10,
        kernel_checks.KernelCheckReport("k"),
    )
    first_layer = ran[0][1]
    changed = [(case, layer) for case, layer in ran if case.weights_changed]
    assert changed and "the weights changed" in str(changed[0][0])
    assert not torch.equal(changed[0][1].ttt_norm_weight, first_layer.ttt_norm_weight)


@pytest.mark.slow
def test_check_kernel_catches_a_kernel_caching_the_weights_by_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the first case of each kind runs (for time); before the fix, every case of check_kernel passed
    this kernel (73 ran, 99 s)."""
    first_only = kernel_checks._cases
    monkeypatch.setattr(kernel_checks, "_cases", lambda *args: iter([next(first_only(*args))]))
    stale = replace(_FUSED, name="stale_cache_s48l", forward=_stale_ln_weight_forward, priority=-100)
    with isolated_registry():
        innerloop.register_kernel(stale)
        with pytest.raises(AssertionError, match="the weights changed since the earlier cases.*output"):
            check_kernel("stale_cache_s48l", head_dims=(4,))


def _tiled_by_8_tokens(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps):  # noqa: ANN001, ANN202
    """The fused path, wrong past a tile of 8 tokens of a mini-batch (its token scales past 8 shrink)."""
    if tau.shape[0] > 8:
        tau = torch.cat([tau[:8], tau[8:] * 0.9])
    return _FUSED.forward(xq, xk, xv, lr, tau, params, ln_weight, ln_bias, eps)


@pytest.mark.slow  # ~1 s: the checker's carried states at 32 features
def test_check_kernel_runs_a_wide_case(monkeypatch: pytest.MonkeyPatch) -> None:
    ran = []
    monkeypatch.setattr(
        kernel_checks._Checker, "run", lambda self, case: ran.append((case, self.mini_batch_size))
    )
    config = kernel_checks._layer_config(_FUSED, None, None, None, {})
    report = kernel_checks.KernelCheckReport("k")
    kernel_checks._check_wide_case(
        _FUSED, config, torch.float64, torch.device("cpu"), 0, 1e-10, report, False
    )
    (case, mini_batch_size), *_ = ran
    assert (case.head_dim, mini_batch_size, case.wide) == (32, 32, True)  # K 16 before review s55e
    assert case.tokens > 2 * mini_batch_size and "the wide case" in str(case)


@pytest.mark.slow
def test_check_kernel_catches_a_kernel_wrong_past_a_tile_of_8_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the first case of each kind runs (for time); before the fix, every case of check_kernel passed
    this kernel (73 ran: mini-batches of 4)."""
    first_only = kernel_checks._cases
    monkeypatch.setattr(kernel_checks, "_cases", lambda *args: iter([next(first_only(*args))]))
    tiled = replace(_FUSED, name="tiled_by_8_s48l", forward=_tiled_by_8_tokens, priority=-100)
    with isolated_registry():
        innerloop.register_kernel(tiled)
        with pytest.raises(AssertionError, match="head_dim 32 .*the wide case"):
            check_kernel("tiled_by_8_s48l", head_dims=(4,))
