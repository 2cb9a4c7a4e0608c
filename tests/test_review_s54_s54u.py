"""Review s54u of s54l/s54o: a plugin object given where a config takes a name is told the exact
registration function of its kind, and only a TTT layer's kinds are told that a TTTLayer takes the
instance (``model.e2e``'s loss and rule are not a TTTLayer's)."""

from __future__ import annotations

import pytest

import innerloop
from innerloop.models import build_model
from innerloop.models.config import E2EConfig, ModelConfig, TTTConfig


def _registered(kind: str):
    return innerloop.get_registry().get(kind, innerloop.available(kind)[0])


@pytest.mark.parametrize(
    ("section", "field", "kind"),
    [
        ("ttt", "inner_model", "inner_model"),
        ("ttt", "inner_loss", "inner_loss"),
        ("ttt", "update_rule", "update_rule"),
        ("e2e", "inner_loss", "model_inner_loss"),
        ("e2e", "update_rule", "model_update_rule"),
    ],
)
def test_a_plugin_object_in_a_config_names_its_kinds_registration_function(section, field, kind) -> None:
    plugin = _registered(kind)
    sections = (
        {"ttt": TTTConfig(**{field: plugin})} if section == "ttt" else {"e2e": E2EConfig(**{field: plugin})}
    )
    config = ModelConfig(vocab_size=11, hidden_size=8, num_layers=1, num_heads=2, **sections)
    with pytest.raises(ValueError) as raised:
        build_model(config)
    message = str(raised.value)
    assert f"model.{section}.{field}=" in message
    assert f"innerloop.register_{kind}(" in message, message  # not a placeholder register_<kind>
    assert repr(plugin.name) in message
    assert ("TTTLayer" in message) == (section == "ttt"), message  # a TTTLayer takes no e2e plugin
