"""Review s56g: the plugin discipline -- a third-party plugin takes every path a built-in takes."""

from __future__ import annotations

import types

import pytest
import torch

from innerloop.checkpoints import used_plugins
from innerloop.core.protocol import GELU_TANH, AffineLayer, StackModel
from innerloop.models.config import ModelConfig
from innerloop.models.factory import build_model
from innerloop.ops import scan
from innerloop.registry import get_registry, hookimpl, isolated_registry, register, register_inner_model
from innerloop.registry.manager import PluginError


class NarrowMemory(StackModel):
    """A plugin's deep memory: two affine maps with tanh-GELU between them, hidden width 2f."""

    name = "s56g_narrow_memory"

    @property
    def stack(self) -> tuple[AffineLayer, ...]:
        return (AffineLayer("W1", "b1", GELU_TANH), AffineLayer("W2", "b2", None))

    def param_shapes(self, head_dim: int) -> dict[str, tuple[int, ...]]:
        hidden = 2 * head_dim
        return {"W1": (head_dim, hidden), "b1": (1, hidden), "W2": (hidden, head_dim), "b2": (1, head_dim)}

    def init_params(self, num_heads: int, head_dim: int, generator: torch.Generator | None = None):
        hidden = 2 * head_dim
        return {
            "W1": torch.randn(num_heads, head_dim, hidden, generator=generator) * 0.02,
            "b1": torch.zeros(num_heads, 1, hidden),
            "W2": torch.randn(num_heads, hidden, head_dim, generator=generator) * 0.02,
            "b2": torch.zeros(num_heads, 1, head_dim),
        }


def _titans(memory: str) -> ModelConfig:
    return ModelConfig.from_dict(
        {"hidden_size": 16, "num_heads": 2, "num_layers": 1, "mixer": "titans", "family": {"memory": memory}}
    )


@pytest.mark.slow  # registering the memory runs its conformance checks (~3 s)
def test_titans_takes_a_plugins_memory_from_the_config_as_its_layer_does() -> None:
    """``TitansLayer(inner_model=...)`` takes any registered inner model; ``model.family.memory`` took only
    the built-in names ``matrix`` and ``mlp`` (a list of built-ins consulted in place of the registry)."""
    with isolated_registry():
        memory = register_inner_model(NarrowMemory())
        model = build_model(_titans(memory.name))
        layers = [m for m in model.modules() if getattr(m, "inner_model", None) is not None]
        assert [layer.inner_model.name for layer in layers] == [memory.name]


def test_titans_refuses_an_unregistered_memory_naming_the_registered_ones() -> None:
    with pytest.raises(ValueError, match=r"model.family.memory='rnn'.*registered.*'matrix', 'mlp'"):
        build_model(_titans("rnn"))


def test_a_checkpoint_records_a_titans_memory_plugin() -> None:
    """The memory is a plugin a Titans checkpoint uses: recorded with its origin, as ``model.ttt``'s are."""
    saved = {"mixer": "titans", "family": {"memory": "s56g_narrow_memory"}}
    assert used_plugins(saved) == [("inner_model", "s56g_narrow_memory")]
    assert used_plugins({"mixer": "titans"}) == [("inner_model", "matrix")]
    assert used_plugins({"mixer": "deltanet"}) == []  # its memory is fixed: matrix


def test_a_hook_with_an_argument_no_hook_passes_is_refused_in_one_line_naming_it() -> None:
    """pluggy's refusal of a hookimpl argument the spec does not declare came as its three lines, which
    broke ``innerloop plugins``' table of broken plugins and the one line ``innerloop -p`` prints."""
    plugin = types.ModuleType("s56g_extra_argument")

    @hookimpl
    def register_inner_losses(register, config):  # noqa: ARG001 (the mistake under test)
        pass

    plugin.register_inner_losses = register_inner_losses
    before = get_registry().names("inner_loss")
    with pytest.raises(PluginError) as refused:
        register(plugin)
    message = str(refused.value)
    assert "\n" not in message
    assert "s56g_extra_argument" in message and "'config'" in message and "register_inner_losses" in message
    assert "def register_inner_losses(register)" in message  # what to write instead
    assert get_registry().names("inner_loss") == before


def test_decay_given_to_a_rule_without_it_says_how_a_plugin_rule_takes_decay(monkeypatch) -> None:
    """The refusal listed the three built-in rules as "rules that do", as if no plugin's could: it now
    says what makes a rule take decay (``supports_decay``), and that the built-ins are not the only ones."""
    rule = get_registry().update_rule("minibatch_gd")  # registered: no registration checks to run
    monkeypatch.setattr(type(rule), "supports_decay", False)  # a rule that takes no decay
    q = k = v = torch.randn(1, 1, 4, 2)
    lr = torch.full((1, 1, 4), 0.1)
    with pytest.raises(ValueError, match="decay") as refused:
        scan(q, k, v, lr, update_rule=rule, mini_batch_size=2, decay=torch.zeros(1, 1, 4))
    message = str(refused.value)
    assert "supports_decay" in message and "'minibatch_gd'" in message
    assert "built-in" in message and "innerloop plugins" in message


def test_momentum_given_to_a_rule_without_it_says_how_a_plugin_rule_takes_it() -> None:
    """The sibling of the decay refusal: it named only the built-in ``momentum`` rule."""
    q = k = v = torch.randn(1, 1, 4, 2)
    lr = torch.full((1, 1, 4), 0.1)
    with pytest.raises(ValueError, match="momentum") as refused:
        scan(q, k, v, lr, update_rule="dual_form", mini_batch_size=2, momentum=torch.zeros(1, 1, 4))
    assert "supports_momentum" in str(refused.value)
