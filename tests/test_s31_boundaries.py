"""Three inputs that met torch or Python deep inside instead of innerloop's own line (review s31a's
leftovers): a reference state dict of meta tensors, a check of ``innerloop.testing`` given something
that is not a plugin, and a stack model whose stack names a weight ``param_shapes`` does not declare."""

from __future__ import annotations

import pytest
import torch
from core.test_interop_trust import CONFIG, one_line_error, reference_state_dict

import innerloop
from innerloop.core.protocol import AffineLayer, StackModel
from innerloop.interop.ttt_lm_pytorch import load_layer
from innerloop.registry.kinds import PluginError
from innerloop.testing.checks import check_inner_loss, check_inner_model, check_update_rule


def test_a_reference_state_dict_of_meta_tensors_is_refused_naming_the_key() -> None:
    meta = {k: v.to("meta") for k, v in reference_state_dict().items()}
    one_line_error(lambda: load_layer(CONFIG, meta), "state_dict['", "meta device", "no values")


@pytest.mark.parametrize(
    ("check", "parameter", "given"),
    [
        (check_update_rule, "rule", None),
        (check_update_rule, "rule", innerloop.UpdateRule),
        (check_inner_model, "model", 3),
        (check_inner_loss, "loss", object()),
        (lambda model: check_update_rule("dual_form", model=model), "model", "W1"),
    ],
)
def test_the_plugin_checks_name_an_argument_that_is_not_a_plugin(check, parameter, given) -> None:
    if isinstance(given, str):  # a name that is no registered model: the registry's own line
        # s50d: this took any Exception whose text held 'W1': a raw KeyError('W1') passed it
        with pytest.raises(ValueError, match=r"^unknown inner model 'W1'; registered: \['linear', "):
            check(given)
        return
    with pytest.raises(
        TypeError, match=rf"^{parameter} must be an instance of \w+ or a registered .*'s name, got"
    ):
        check(given)


class _StackNamingAnUndeclaredBias(StackModel):
    name = "stack_naming_an_undeclared_bias"

    def param_shapes(self, head_dim: int) -> dict[str, tuple[int, ...]]:
        return {"W": (head_dim, head_dim), "b": (1, head_dim)}

    def init_params(self, num_heads: int, head_dim: int, generator=None) -> dict[str, torch.Tensor]:
        return {"W": torch.zeros(num_heads, head_dim, head_dim), "b": torch.zeros(num_heads, 1, head_dim)}

    @property
    def stack(self) -> tuple[AffineLayer, ...]:
        return (AffineLayer("W", "c", None),)


def test_a_stack_naming_a_weight_param_shapes_does_not_declare_is_refused_by_name() -> None:
    model = _StackNamingAnUndeclaredBias()
    with pytest.raises(PluginError, match=r"its stack names the weight\(s\) \['c'\].*declares \['W', 'b'\]"):
        innerloop.register_inner_model(model)
    with pytest.raises(AssertionError, match=r"its stack names the weight\(s\) \['c'\]"):
        check_inner_model(model)


class _Forwarding:
    """An object that forwards every attribute to a loss (a proxy, a wrapper that counts calls, ...)."""

    def __init__(self, target) -> None:
        self._target = target

    def __getattr__(self, name: str):
        return getattr(self._target, name)


@pytest.mark.parametrize("name", ["reconstruction", "next_token"])
def test_a_loss_reached_through_a_forwarding_object_is_checked_as_the_loss_itself(name) -> None:
    """Whether a loss keeps the default token_loss_grad was read from its class: a forwarding object's
    class has none ('type object ... has no attribute token_loss_grad'); its bound method says."""
    from innerloop.registry import get_registry
    from innerloop.registry.kinds import _default_token_loss_grad

    loss = get_registry().inner_loss(name)
    assert _default_token_loss_grad(_Forwarding(loss)) == _default_token_loss_grad(loss)
    check_inner_loss(_Forwarding(loss), tokens=9, heads=1, head_dim=3, batch=2, mini_batch_size=4)
