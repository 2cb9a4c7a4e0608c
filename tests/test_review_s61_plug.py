"""Review s61 (plug): the plugin checks of innerloop.testing against deliberately broken plugins.

- check_update_rule ran calls of at most 150 tokens, so a rule wrong only for longer calls (an internal
  block of 256 tokens that drops its carry, a fast path for long prefills) passed it. Now, with no shape
  given, every model also runs one call of LONG_CALL_SHAPE (2063 tokens) against the same tokens in pieces
  of at most LONG_CALL_PIECE (check_long_call_as_pieces): values, and on the first model the gradients and
  the values under no_grad / inference_mode.
- A loss whose token_loss or token_loss_grad draws fresh noise was refused as one that mixes sequences;
  check_loss_gradient (check_inner_loss, and check_update_rule given a loss) now calls each twice first and
  names it as not deterministic.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from innerloop.plugins.losses.reconstruction import Reconstruction
from innerloop.plugins.optimizers.dual_form import DualForm
from innerloop.plugins.optimizers.momentum import Momentum
from innerloop.testing import check_update_rule, make_problem
from innerloop.testing.checks import (
    LONG_CALL_PIECE,
    LONG_CALL_SHAPE,
    check_long_call_as_pieces,
    check_loss_gradient,
    check_token_loss_deterministic,
)


class _WrongPastToken150(DualForm):
    """The dual form whose outputs past a call's 150th token are 0.1% off."""

    name = "s61_wrong_past_150"

    def forward(self, state, task, views, lr, tau, decay=None, decay_log=None):  # noqa: ANN001, ANN201, D102
        out, new_state = super().forward(state, task, views, lr, tau, decay, decay_log)
        if out.shape[2] > 150:
            out = torch.cat([out[:, :, :150], out[:, :, 150:] * 1.001], dim=2)
        return out, new_state


class _BlocksOf256(DualForm):
    """The dual form run in internal blocks of 256 tokens, the weights after the first block nudged (a
    carry between blocks kept wrongly): right for every call of up to 256 tokens."""

    name = "s61_blocks_of_256"

    def forward(self, state, task, views, lr, tau, decay=None, decay_log=None):  # noqa: ANN001, ANN201, D102
        tokens = views.query.shape[2]
        if tokens <= 256:
            return super().forward(state, task, views, lr, tau, decay, decay_log)
        outputs = []
        for start in range(0, tokens, 256):
            end = min(tokens, start + 256)

            def part(t, start=start, end=end):  # noqa: ANN001, ANN202
                return None if t is None else t[:, :, start:end]

            out, state = super().forward(
                state, task, views.slice_tokens(start, end), part(lr), tau, part(decay), part(decay_log)
            )
            if start == 0:
                state = replace(state, params={k: v * (1 + 1e-3) for k, v in state.params.items()})
            outputs.append(out)
        return torch.cat(outputs, dim=2), state


class _KeyGradientWrongWhenLong(DualForm):
    """Right values; the key's gradient 10% short in calls past 150 tokens."""

    name = "s61_key_gradient_wrong_when_long"

    def forward(self, state, task, views, lr, tau, decay=None, decay_log=None):  # noqa: ANN001, ANN201, D102
        if views.query.shape[2] > 150:
            key = views.key * 0.9 + (views.key * 0.1).detach()
            views = type(views)(views.query, key, views.value)
        return super().forward(state, task, views, lr, tau, decay, decay_log)


class _WrongWithoutGradWhenLong(DualForm):
    """Wrong only without autograd in calls past 256 tokens (a prefill's fast path)."""

    name = "s61_wrong_without_grad_when_long"

    def forward(self, state, task, views, lr, tau, decay=None, decay_log=None):  # noqa: ANN001, ANN201, D102
        out, new_state = super().forward(state, task, views, lr, tau, decay, decay_log)
        if not torch.is_grad_enabled() and out.shape[2] > 256:
            out = out * 1.001
        return out, new_state


def _long_problem(rule, tokens: int = LONG_CALL_SHAPE["tokens"], **variant: bool):  # noqa: ANN001, ANN202
    """A problem at LONG_CALL_SHAPE (``tokens`` long) as check_update_rule's long call builds it."""
    shape = {**LONG_CALL_SHAPE, "tokens": tokens, "mini_batch_size": 16}
    if tokens == LONG_CALL_SHAPE["tokens"]:
        shape = LONG_CALL_SHAPE
    return make_problem("linear", "reconstruction", **shape, norm=False, residual=False, **variant).for_rule(
        rule
    )


@pytest.mark.parametrize(
    ("rule", "words"),
    [
        (_WrongPastToken150(), "in one call of 531 tokens vs in pieces of at most 149 tokens"),
        (_BlocksOf256(), "in one call of 531 tokens vs in pieces of at most 149 tokens"),
        (_KeyGradientWrongWhenLong(), "gradient w.r.t. key vs that in pieces of at most 149 tokens"),
        (_WrongWithoutGradWhenLong(), "in one call of 531 tokens under torch.no_grad() vs in pieces"),
    ],
    ids=lambda value: getattr(value, "name", None),
)
def test_a_rule_wrong_only_for_long_calls_is_refused(rule: DualForm, words: str) -> None:
    """At 531 tokens (past 512, in mini-batches of 16) to stay fast: the check takes any length."""
    with pytest.raises(AssertionError, match="relative error") as caught:
        check_long_call_as_pieces(rule, _long_problem(rule, 531, decay=True))
    assert words in str(caught.value)


@pytest.mark.parametrize("rule", [DualForm(), Momentum()], ids=lambda r: r.name)
def test_the_builtin_rules_pass_the_long_call(rule) -> None:  # noqa: ANN001
    variant = {"decay": True, "momentum": rule.supports_momentum}
    check_long_call_as_pieces(rule, _long_problem(rule, **variant))
    assert LONG_CALL_SHAPE["tokens"] > 2048 and LONG_CALL_PIECE <= 150  # past a layer's inference chunk


def test_check_update_rule_runs_the_long_call() -> None:
    """The default check (no shape given) reaches the long call: the rule wrong past token 150 fails it,
    named as the long call (one wrapping, gradients and no-grad off to keep this fast: the values alone
    catch it; ~1 s CPU, 3 s with every wrapping)."""
    rule = _WrongPastToken150()
    with pytest.raises(AssertionError, match="in one call of 2063 tokens") as caught:
        check_update_rule(
            rule, "linear", "reconstruction", gradients=False, without_grad=False, norm=False, residual=False
        )
    assert "check_long_call_as_pieces(rule, p)" in "\n".join(getattr(caught.value, "__notes__", []))


class _NoisyTokenLoss(Reconstruction):
    """token_loss and its closed form scaled by a fresh draw of torch's global RNG on every call."""

    name = "s61_noisy_token_loss"

    def token_loss(self, prediction, target):  # noqa: ANN001, ANN201, D102
        return super().token_loss(prediction, target) * (1 + 1e-3 * torch.rand(()).item())

    def token_loss_grad(self, prediction, target):  # noqa: ANN001, ANN201, D102
        return super().token_loss_grad(prediction, target) * (1 + 1e-3 * torch.rand(()).item())


class _NoisyClosedForm(Reconstruction):
    """token_loss right; its closed form with noise far below check_loss_gradient's tolerance: named as not
    deterministic, not as a wrong closed form or a mixing one."""

    name = "s61_noisy_closed_form"

    def token_loss_grad(self, prediction, target):  # noqa: ANN001, ANN201, D102
        return super().token_loss_grad(prediction, target) + 1e-14 * torch.randn(
            prediction.shape, dtype=prediction.dtype
        )


@pytest.mark.parametrize(
    ("loss", "method"), [(_NoisyTokenLoss(), "token_loss"), (_NoisyClosedForm(), "token_loss_grad")]
)
def test_a_loss_drawing_fresh_noise_is_named_as_not_deterministic(loss: Reconstruction, method: str) -> None:
    """It was refused as a loss that mixes sequences ('token_loss of 3 sequences in one call vs each of the
    sequences alone'): the first check that called it twice."""
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(3, 2, 6, 4, generator=generator, dtype=torch.float64)
    prediction = target + torch.randn(target.shape, generator=generator, dtype=torch.float64)
    with pytest.raises(AssertionError, match=rf"^{loss.name}: {method}\(\) is not deterministic"):
        check_loss_gradient(loss, prediction, target)


def test_a_loss_giving_nan_alike_on_both_calls_is_deterministic() -> None:
    loss = Reconstruction()
    target = torch.full((1, 1, 2, 3), float("nan"), dtype=torch.float64)
    check_token_loss_deterministic(loss, target.clone(), target)  # NaN in both calls: the same
