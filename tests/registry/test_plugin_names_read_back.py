"""A plugin name is refused exactly when a config cannot choose it (review of s11 regressions, L3):
registering accepts a name iff an override ``model.ttt.inner_loss=<name>`` and a YAML file's
``inner_loss: <name>`` both read back that same string (``2``, ``1.5`` and ``a b`` do: the key is a
str), and refuses names with control characters, leading or trailing whitespace, ``=`` or ``${``."""

from __future__ import annotations

import pytest

import innerloop
from innerloop.config.load import ConfigError, load_config
from innerloop.plugins.losses.reconstruction import Reconstruction
from innerloop.registry import PluginError, available, isolated_registry

READ_BACK = ["2", "10", "1.5", "a b", "huber:0.5", "loss#2", "ℓ2", "NaN", "-x", "2024-01-01", "x'y", "a,b"]
READ_AS_ANOTHER = ["1e3", "true", "on", "Yes", "null", "~", "0x10", "1_000", "007", "1.50", "+1", ".inf"]
NOT_PARSED = ["[a]", "{x}", "x: y", "a #b", "*x", "!x", "%x", '"q"']
NEVER = ["${x}", "a=b", "a\tb", "a\nb", " a", "a ", "a\x00b"]


class NamedReconstruction(Reconstruction):
    def __init__(self, name: str) -> None:
        self.name = name


@pytest.fixture(scope="module")
def names_registry():
    """One isolated registry for the tests below that each register a distinct name (building a registry
    checks every built-in plugin: ~0.08 s, which 40 fresh ones spent again and again)."""
    with isolated_registry():
        yield


def _config_reads(name: str, tmp_path) -> list[str | None]:
    """What ``model.ttt.inner_loss`` is after loading ``name`` as an override and from a YAML file
    (None: the config is refused, e.g. as not a registered inner loss or not parsed)."""
    path = tmp_path / "mine.yaml"
    path.write_text(f"model:\n  ttt:\n    inner_loss: {name}\n", encoding="utf-8")
    reads: list[str | None] = []
    for preset, overrides in (("tiny", [f"model.ttt.inner_loss={name}"]), (str(path), [])):
        try:
            reads.append(load_config(preset, overrides, model_only=True)[0].model.ttt.inner_loss)
        except ConfigError:
            reads.append(None)
    return reads


@pytest.mark.parametrize("name", READ_BACK + READ_AS_ANOTHER + NOT_PARSED)
def test_a_name_is_registered_exactly_when_a_config_reads_it_back(names_registry, tmp_path, name) -> None:
    try:
        innerloop.register_inner_loss(NamedReconstruction(name), origin=f"names_test_{id(name)}")
        registered = True
    except PluginError as error:
        assert "cannot be chosen from a config" in str(error)
        registered = False
    assert registered == (name in READ_BACK)
    reads = _config_reads(name, tmp_path)
    assert (reads == [name, name]) == registered, reads


@pytest.mark.slow  # loads configs and builds models for several plugins: ~0.4 s
def test_names_a_config_reads_back_are_chosen_by_an_override(fresh_global_registry, tmp_path) -> None:
    for name in ("2", "a b"):
        innerloop.register_inner_loss(NamedReconstruction(name), origin=f"names_test_{name}")
        assert name in available("inner_loss")
        assert _config_reads(name, tmp_path) == [name, name]


@pytest.mark.parametrize("name", NEVER)
def test_control_characters_edge_whitespace_equals_and_interpolations_are_refused(
    names_registry, name
) -> None:
    with pytest.raises(PluginError, match="whitespace|cannot be chosen from a config"):
        innerloop.register_inner_loss(NamedReconstruction(name), origin="names_test_never")
    assert name not in available("inner_loss")


def test_every_built_in_name_passes() -> None:
    from innerloop.registry import build_registry
    from innerloop.registry.kinds import KIND_NAMES

    registry = build_registry(include_external=False)
    assert all(registry.names(kind) for kind in ("inner_model", "inner_loss", "update_rule"))
    assert sum(len(registry.names(kind)) for kind in KIND_NAMES) >= 8
