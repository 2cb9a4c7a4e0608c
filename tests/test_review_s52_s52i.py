"""s52i: a newcomer's inner loss plugin, end to end, and the checks a buggy one meets."""

from __future__ import annotations

import pytest
import torch

from innerloop.core.protocol import InnerLoss, LossPairs, Views
from innerloop.registry import PluginError, isolated_registry, register_inner_loss


class _Reconstruction(InnerLoss):
    """XK -> XV under 1/2 ||p - t||^2, written out (the base of the buggy losses below)."""

    def pairs(self, views: Views, carry: dict) -> LossPairs:
        return LossPairs(inputs=views.key, targets=views.value, valid=None, carry={})

    def token_loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 0.5 * (prediction - target).pow(2).sum(-1)


class _GradSubtractsInPlace(_Reconstruction):
    """The closed form computed into the prediction: ``prediction.sub_(target)``."""

    name = "s52i_grad_sub_in_place"

    def token_loss_grad(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return prediction.sub_(target)


class _LossSubtractsInPlace(_Reconstruction):
    """``prediction -= target`` in ``token_loss`` (autograd's gradient, no closed form)."""

    name = "s52i_loss_sub_in_place"

    def token_loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        prediction -= target
        return 0.5 * prediction.pow(2).sum(-1)


class _GradScalesTargetInPlace(_Reconstruction):
    """Writes into the target inside the closed form."""

    name = "s52i_grad_target_in_place"

    def token_loss_grad(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return prediction - target.mul_(1.0 + 1e-3)


@pytest.mark.parametrize(
    ("loss", "method", "tensor"),
    [
        (_GradSubtractsInPlace(), "token_loss_grad", "the prediction"),
        (_LossSubtractsInPlace(), "token_loss", "the prediction"),
        (_GradScalesTargetInPlace(), "token_loss_grad", "the target"),
    ],
)
def test_a_loss_writing_into_its_prediction_is_refused_naming_the_write(
    loss: InnerLoss, method: str, tensor: str
) -> None:
    """A loss that computes in place into what it is given was refused with torch's 'a leaf Variable
    that requires grad is being used in an in-place operation' (and for a token_loss, a hint about
    .item() and numpy): nothing said which method wrote into what. Now the registrar names both."""
    with isolated_registry(), pytest.raises(PluginError) as refused:
        register_inner_loss(loss)
    message = str(refused.value)
    assert f"{method} wrote into {tensor}" in message, message
    assert "leaf Variable" not in message and ".item()" not in message, message


class _WrongSignGradient(_Reconstruction):
    """A closed form with the wrong sign: the inner loop would climb its loss."""

    name = "s52i_wrong_sign"

    def token_loss_grad(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return target - prediction


@pytest.mark.slow  # check_loss_gradient's finite differences: about 0.5 s
def test_check_update_rule_names_a_wrong_loss_gradient_as_the_losses() -> None:
    """Given a plugin loss whose closed-form gradient is wrong, check_update_rule said 'dual_form (linear,
    s52i_wrong_sign, ...) vs the naive token loop: relative error 1.2': it blamed the built-in rule, and
    the user looked for a bug in innerloop. The loss it is given is now checked first and named."""
    from innerloop.testing import check_update_rule

    with pytest.raises(AssertionError, match=r"s52i_wrong_sign: token_loss_grad vs autograd of token_loss"):
        check_update_rule("dual_form", "linear", loss=_WrongSignGradient(), gradients=False)


def test_check_update_rule_names_a_model_whose_forward_is_not_its_stack() -> None:
    """A StackModel whose forward scales its declared stack by 1.5 made check_update_rule('dual_form',
    model) say 'dual_form (wrong_stack, ...) vs the naive token loop': the rule was blamed for the model."""
    from innerloop.registry import get_registry
    from innerloop.testing import check_update_rule

    linear = type(get_registry().inner_model("linear"))

    class ScaledForward(linear):
        name = "s52i_scaled_forward"

        def forward(self, params: dict, x: torch.Tensor) -> torch.Tensor:
            return 1.5 * super().forward(params, x)

    with pytest.raises(AssertionError, match=r"s52i_scaled_forward: forward vs its declared stack"):
        check_update_rule("dual_form", ScaledForward(), loss="reconstruction", gradients=False)


class _NoisyTargets(_Reconstruction):
    """Fresh noise in the targets on every call of pairs."""

    name = "s52i_noisy_targets"

    def pairs(self, views: Views, carry: dict) -> LossPairs:
        return LossPairs(inputs=views.key, targets=views.value + 1e-6 * torch.randn_like(views.value))

    def token_loss_grad(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return prediction - target  # closed form: the test does not wait for torch.func's first vmap


def test_check_update_rule_names_a_loss_whose_pairs_are_random() -> None:
    """check_update_rule('dual_form', loss=noisy) said 'dual_form ... vs the naive token loop: relative
    error 1e-7': the rule blamed for the loss's fresh noise."""
    from innerloop.testing import check_update_rule

    with pytest.raises(AssertionError, match=r"s52i_noisy_targets: pairs\(\) is not deterministic"):
        check_update_rule("dual_form", "linear", loss=_NoisyTargets(), gradients=False)


@pytest.mark.slow  # check_loss_gradient's finite differences: about 0.5 s
def test_check_inner_model_names_a_wrong_loss_gradient_as_the_losses() -> None:
    """check_inner_model(model, loss) with a loss whose closed form is wrong said 'dual_form vs the
    naive token loop on model 'linear'': the model (and a rule) blamed for the loss."""
    from innerloop.testing import check_inner_model

    with pytest.raises(AssertionError, match=r"s52i_wrong_sign: token_loss_grad vs autograd of token_loss"):
        check_inner_model("linear", loss=_WrongSignGradient(), batch=2, heads=2, head_dim=3, tokens=7)


def test_a_model_writing_into_its_weights_is_refused_naming_the_write() -> None:
    """An inner model whose forward adds into its weights (params['W1'].add_) was refused with 'failed
    its smoke test (gradient): RuntimeError('a leaf Variable that requires grad is being used in an
    in-place operation.')', naming neither forward nor the weight; now the registrar names both."""
    from innerloop.registry import get_registry, register_inner_model

    linear = type(get_registry().inner_model("linear"))

    class WeightsInPlace(linear):
        name = "s52i_weights_in_place"

        def forward(self, params: dict, x: torch.Tensor) -> torch.Tensor:
            out = super().forward(params, x)
            params["W1"].add_(0.01)
            return out

    with isolated_registry(), pytest.raises(PluginError) as refused:
        register_inner_model(WeightsInPlace())
    message = str(refused.value)
    assert "forward wrote into params['W1']" in message, message
    assert "leaf Variable" not in message, message
