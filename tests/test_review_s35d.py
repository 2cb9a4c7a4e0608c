"""Review s35d: a passed registration check (innerloop/registry/verdicts.py) is not reused for an object
whose behaviour changed in a way the behaviour key did not see: a function's code swapped in place
(IPython's autoreload), its defaults or closure rebound, a class held as a setting or the metaclass
changed, a float setting's sign. And benchmarks/science.py reads back its own result in an --out whose
name has a space."""

from __future__ import annotations

import dataclasses
import json

import pytest
from test_review_s35c import load_science  # benchmarks/science.py, loaded once under one name

import innerloop
from innerloop.plugins.losses.reconstruction import Reconstruction
from innerloop.registry import PluginError, isolated_registry
from innerloop.registry.verdicts import behaviour_key


def _key(obj):
    keyed = behaviour_key("inner_loss", obj, True)
    assert keyed is not None, "these plugins hold only state the key compares"
    return keyed[0]


def _nan_loss(self, prediction, target):
    return (prediction - target).pow(2).sum(-1) * float("nan")


def test_a_method_whose_code_is_swapped_in_place_is_checked_again() -> None:
    # IPython's %autoreload 2 keeps the function object and assigns the edited __code__ to it
    class Swapped(Reconstruction):
        name = "review_s35d_swapped"

        def token_loss(self, prediction, target):
            return Reconstruction.token_loss(self, prediction, target)

    with isolated_registry():
        innerloop.register_inner_loss(Swapped(), origin="review_s35d")
    Swapped.token_loss.__code__ = _nan_loss.__code__
    with isolated_registry(), pytest.raises(PluginError, match="review_s35d_swapped"):
        innerloop.register_inner_loss(Swapped(), origin="review_s35d")


def test_a_method_whose_defaults_or_closure_change_has_another_key() -> None:
    scale = 1.0

    class Defaults(Reconstruction):
        name = "review_s35d_defaults"

        def token_loss(self, prediction, target, factor=1.0):
            return factor * scale * Reconstruction.token_loss(self, prediction, target)

    before = _key(Defaults())
    Defaults.token_loss.__defaults__ = (2.0,)
    assert _key(Defaults()) != before
    before = _key(Defaults())
    scale = 2.0  # noqa: F841 (read by the closure)
    assert _key(Defaults()) != before


def test_a_class_held_as_a_setting_and_the_metaclass_are_read_by_value() -> None:
    class Settings:
        factor = 1.0

    class Meta(type(Reconstruction)):
        factor = 1.0

    class Held(Reconstruction, metaclass=Meta):
        name = "review_s35d_held"
        settings = Settings

        def token_loss(self, prediction, target):
            factor = self.settings.factor * type(self).factor
            return factor * Reconstruction.token_loss(self, prediction, target)

    before = _key(Held())
    Settings.factor = 2.0
    assert _key(Held()) != before
    before = _key(Held())
    Meta.factor = 2.0
    assert _key(Held()) != before


def test_a_float_setting_is_compared_with_its_sign_and_a_dataclass_keeps_its_key() -> None:
    @dataclasses.dataclass
    class Signed(Reconstruction):
        offset: float = 0.0
        name: str = "review_s35d_signed"

    assert _key(Signed(0.0)) == _key(Signed(0.0))
    assert _key(Signed(0.0)) != _key(Signed(-0.0))


def test_a_recursive_closure_has_a_key() -> None:
    # a helper that calls itself holds itself in its closure: read once, not until the stack overflows
    def halved(n):
        return 1.0 if n <= 0 else halved(n - 1)

    class Recursive(Reconstruction):
        name = "review_s35d_recursive"
        helper = staticmethod(halved)

    assert _key(Recursive()) == _key(Recursive())


FACTOR = 1.0  # a module global the plugin below reads


def _factor() -> float:
    return FACTOR


class ReadsGlobals(Reconstruction):
    name = "review_s35d_reads_globals"

    def token_loss(self, prediction, target):
        return _factor() * Reconstruction.token_loss(self, prediction, target)


def test_a_global_helper_swapped_in_place_or_a_global_setting_rebound_has_another_key(monkeypatch) -> None:
    # autoreload swaps the __code__ of the module's helper functions too, and a notebook rebinds settings
    before = _key(ReadsGlobals())
    monkeypatch.setattr(_factor, "__code__", (lambda: 2.0 * FACTOR).__code__)
    assert _key(ReadsGlobals()) != before
    before = _key(ReadsGlobals())
    monkeypatch.setitem(globals(), "FACTOR", float("nan"))
    assert _key(ReadsGlobals()) != before


@pytest.mark.parametrize("folder", ["plain", "my runs"])
def test_a_study_reads_back_its_own_result_in_an_out_with_a_space(tmp_path, folder) -> None:
    """A point's recorded command split at every space: an --out with a space left part of its out_dir
    among the settings, and a study rerun with the same command in it was refused as 'another command'."""
    science = load_science()
    point = next(p for p in science.SWEEP if p.name == "linear")
    out = tmp_path / folder
    run_dir = out / "runs" / science.slug(point.name)
    run_dir.mkdir(parents=True)
    command = science.command_for(point, science.sized_overrides(point, science.QUICK, None), run_dir)
    (run_dir / "result.json").write_text(json.dumps({"command": science.shown_command(command)}))
    science.check_recorded_results([point], out, science.QUICK, None)  # the same command: read back
    other = science.command_for(point, science.sized_overrides(point, science.FULL, None), run_dir)
    (run_dir / "result.json").write_text(json.dumps({"command": science.shown_command(other)}))
    with pytest.raises(SystemExit, match="trained by another command"):
        science.check_recorded_results([point], out, science.QUICK, None)
