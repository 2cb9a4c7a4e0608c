"""Review s53r: check_held_plugins, settings read fresh, metrics' forward restore, at inputs nobody tried.

- A model built with a plugin class whose definition was run again since (a notebook cell re-run,
  ``importlib.reload``) and an object of the new class registered under the name: the save is refused
  (the model computes with the old class's code), but the message read "of class DeclaredScaled with the
  settings {'scale': 2.0}, but ... is a DeclaredScaled with {'scale': 2.0}": two identical sides and no
  word of what differs. It now names that the classes are two class objects of one name, defined again.
"""

from __future__ import annotations

import pytest
from test_review_s52_s52a import DeclaredScaled
from test_review_s53_s53i import _model_then_another_registered

from innerloop.checkpoints import PluginSettingsError

pytestmark = pytest.mark.usefixtures("fresh_global_registry")


def test_a_save_refused_for_a_class_defined_again_says_so(tmp_path) -> None:
    """The class cell run again: same name, same settings, another class object. The refusal says the
    class was defined again (its code may differ), not two sides that read alike."""
    from innerloop.train.module import save_model_checkpoint

    again = type(
        "DeclaredScaled",
        (DeclaredScaled,),
        {"__module__": DeclaredScaled.__module__, "__qualname__": DeclaredScaled.__qualname__},
    )
    model = _model_then_another_registered(DeclaredScaled(2.0), again(2.0))
    path = tmp_path / "c.safetensors"
    with pytest.raises(PluginSettingsError) as error:
        save_model_checkpoint(model, path)
    message = str(error.value)
    for part in ("defined again", "its code may differ", "'scale': 2.0"):
        assert part in message, message
    assert not path.exists()
