"""The registrars refuse plugins that would fail later, far from the cause: an inner model whose
``init_params`` has weights ``param_shapes`` does not declare, a model update rule whose ``step``
returns non-tensors or another dtype, a model inner loss with integer losses, a name with surrounding
whitespace. Each refusal is a PluginError naming the plugin and what was wrong, and leaves the
registry as it was."""

from __future__ import annotations

import pytest
import torch

from innerloop.core.model_inner import ModelInnerLoss, ModelUpdateRule
from innerloop.plugins.models.linear import LinearModel
from innerloop.registry import PluginError, Registry, build_registry, hookimpl


class ExtraParams(LinearModel):
    """``init_params`` adds a weight ``param_shapes`` does not declare (its state would be refused)."""

    name = "linear_extra"

    def init_params(self, num_heads, head_dim, generator=None):
        params = super().init_params(num_heads, head_dim, generator)
        params["extra"] = torch.zeros(num_heads, 3)
        return params


class Spaced(LinearModel):
    name = " spaced "


class StepRule(ModelUpdateRule):
    """A model update rule whose ``step`` returns ``convert(weight)`` for every fast weight."""

    def __init__(self, name, convert):
        self.name, self.convert = name, convert

    def step(self, fast, losses, lr, max_grad_norm, create_graph):
        return {k: self.convert(v.detach()) for k, v in fast.items()}


class IntegerLoss(ModelInnerLoss):
    name = "integer_loss"

    def chunk_loss(self, logits, ids):
        return ids.sum(dim=1)  # int64 [B]


class Offers:
    """A plugin registering ``obj`` through the hook of its kind."""

    def __init__(self, obj):
        self.obj = obj

    @hookimpl
    def register_inner_models(self, register):
        if isinstance(self.obj, LinearModel):
            register(self.obj)

    @hookimpl
    def register_model_update_rules(self, register):
        if isinstance(self.obj, ModelUpdateRule):
            register(self.obj)

    @hookimpl
    def register_model_inner_losses(self, register):
        if isinstance(self.obj, ModelInnerLoss):
            register(self.obj)


def _entries(registry: Registry) -> list[tuple[str, str, int, str]]:
    return [(e.kind, e.name, id(e.obj), e.origin) for e in registry.entries()]


@pytest.fixture(scope="module")
def registry() -> Registry:
    return build_registry(include_external=False)


REFUSED = {
    "undeclared-init-params": (
        "inner_model",
        ExtraParams(),
        r"inner model 'linear_extra': init_params\(\) returns keys \['extra'\] that param_shapes\(\) "
        r"does not declare \(it declares \['W1', 'b1'\]\)",
    ),
    "name-with-spaces": ("inner_model", Spaced(), r"inner model name ' spaced ' has leading or trailing whitespace.*name it 'spaced'"),
    "step-returns-lists": (
        "model_update_rule",
        StepRule("list_rule", lambda v: v.tolist()),
        r"model update rule 'list_rule': step\(\) must return .*tensors.*got non-tensors \{'w': 'list', 'v': 'list'\}",
    ),
    "step-returns-none": (
        "model_update_rule",
        StepRule("none_rule", lambda v: None),
        r"model update rule 'none_rule': .*got non-tensors \{'w': 'NoneType', 'v': 'NoneType'\}",
    ),
    "step-returns-float64": (
        "model_update_rule",
        StepRule("float64_rule", lambda v: v.double()),
        r"model update rule 'float64_rule': .*same names and shapes.*as tensors of their dtype \(torch.float32\); "
        r"got dtypes \{'w': torch.float64, 'v': torch.float64\}",
    ),
    "step-returns-wrong-shapes": (
        "model_update_rule",
        StepRule("flat_rule", lambda v: v.flatten()),
        r"model update rule 'flat_rule': .*got shapes \{'w': \(24,\), 'v': \(8,\)\}",
    ),
    "integer-chunk-loss": (
        "model_inner_loss",
        IntegerLoss(),
        r"model inner loss 'integer_loss': chunk_loss\(\) must return floating-point losses.*got torch.int64",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_plugin_that_would_fail_later_is_refused_by_name_and_changes_nothing(registry, case):
    kind, obj, match = REFUSED[case]
    before = _entries(registry)
    with pytest.raises(PluginError, match=match):
        registry.add_plugin(Offers(obj), origin=f"refused_{case}")
    assert _entries(registry) == before
    assert obj.name not in registry.names(kind)


def test_correct_model_update_rules_still_register(registry):
    class KeepsGraph(StepRule):  # review s26: a step must keep the new weights' graph to the old ones
        def step(self, fast, losses, lr, max_grad_norm, create_graph):
            return {k: self.convert(v) for k, v in fast.items()}

    rule = KeepsGraph("identity_rule_inputs_test", lambda v: v.clone())
    registry.add_plugin(Offers(rule), origin="identity_rule_inputs_test")
    assert registry.model_update_rule("identity_rule_inputs_test") is rule
