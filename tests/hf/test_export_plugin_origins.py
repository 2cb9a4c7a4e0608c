"""An export's config.json records where each plugin its model uses came from (review s11, M1), and
``from_pretrained`` compares it with the plugins registered where it runs: another plugin under a
recorded name warns, naming both; a name no plugin registers fails naming the plugin it came from; an
export written before the record existed loads quietly, as before."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from plugin_testing import NAME, TargetsAsGiven, TargetsDoubled, class_name

import innerloop
from innerloop.checkpoints import PluginChangedWarning
from innerloop.hf import InnerloopForCausalLM
from innerloop.hf.export import export_model
from innerloop.models import ModelConfig, build_model
from innerloop.registry import get_registry


@pytest.fixture
def exported(fresh_global_registry, tmp_path):
    """An export of a tiny model whose inner loss the plugin ``first_pkg`` registers."""
    innerloop.register_inner_loss(TargetsAsGiven(), origin="first_pkg (first-dist)")
    config = {
        "vocab_size": 64,
        "hidden_size": 16,
        "num_layers": 1,
        "num_heads": 2,
        "ttt": {"inner_loss": NAME},
    }
    torch.manual_seed(0)
    return export_model(build_model(ModelConfig.from_dict(config)), tmp_path / "exported", tokenizer=None)


def _plugin_warnings(folder) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        InnerloopForCausalLM.from_pretrained(folder)
    return [str(w.message) for w in caught if issubclass(w.category, PluginChangedWarning)]


def _swap() -> None:
    get_registry().remove_plugin("first_pkg (first-dist)")
    innerloop.register_inner_loss(TargetsDoubled(), origin="second_pkg (second-dist)")


def test_config_json_records_each_plugin_with_its_origin(exported) -> None:
    record = json.loads((exported / "config.json").read_text())["innerloop_plugins"]
    assert record["inner_loss"] == {
        NAME: {"origin": "first_pkg (first-dist)", "class": class_name(TargetsAsGiven)}
    }
    assert record["update_rule"] == {
        "dual_form": {"origin": "builtin:innerloop.plugins.optimizers.dual_form"}
    }


def test_another_plugin_under_the_recorded_name_is_warned_about_once(fresh_global_registry, exported) -> None:
    _swap()
    messages = _plugin_warnings(exported)
    assert len(messages) == 1, messages
    for part in (
        str(exported),
        f"inner loss {NAME!r}",
        "'first_pkg (first-dist)'",
        "'second_pkg (second-dist)'",
    ):
        assert part in messages[0]
    assert _plugin_warnings(exported) == []  # the same folder and change: said once


def test_the_same_plugin_loads_quietly(exported) -> None:
    assert _plugin_warnings(exported) == []


def test_an_export_written_before_the_record_loads_quietly(fresh_global_registry, exported) -> None:
    config_path = exported / "config.json"
    config = json.loads(config_path.read_text())
    del config["innerloop_plugins"]
    config_path.write_text(json.dumps(config))
    _swap()
    assert _plugin_warnings(exported) == []
    get_registry().remove_plugin("second_pkg (second-dist)")
    with pytest.raises(ValueError, match=f"inner_loss={NAME!r} is not a registered") as error:
        InnerloopForCausalLM.from_pretrained(exported)
    assert "when it was saved" not in str(error.value)


def test_a_missing_plugin_is_named_with_where_it_came_from(fresh_global_registry, exported) -> None:
    get_registry().remove_plugin("first_pkg (first-dist)")
    with pytest.raises(ValueError) as error:
        InnerloopForCausalLM.from_pretrained(exported)
    message = str(error.value)
    assert f"inner_loss={NAME!r} is not a registered inner_loss" in message
    assert "was registered by plugin 'first_pkg (first-dist)'" in message
