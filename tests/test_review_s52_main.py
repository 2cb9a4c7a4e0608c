"""Review s52 (main session): a plugin's declared ``settings()`` is checked when the plugin is registered.

s52l found that a ``settings()`` giving what a checkpoint cannot record (a numpy number, a nested mapping,
a tensor) passed registration and model building and was refused only when a finished training run saved
(a plain loop: no file written, the trained model lost when the script died); and a method named
``settings`` that takes arguments crashed the save with Python's missing-argument error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import innerloop
from innerloop import HalfSquaredError, LossPairs
from innerloop.registry import get_registry
from innerloop.registry.kinds import PluginError
from innerloop.registry.settings import plugin_settings

ORIGIN = "s52_main_pkg"


class _Loss(HalfSquaredError):
    """Reconstruction of the value view from the key view; the subclasses differ in their settings()."""

    name = "s52_main_settings_loss"

    def pairs(self, views, carry):
        return LossPairs(inputs=views.key, targets=views.value, valid=None, carry={})


def _register(loss) -> None:
    if any(entry.origin == ORIGIN for entry in get_registry().entries()):
        get_registry().remove_plugin(ORIGIN)
    innerloop.register_inner_loss(loss, origin=ORIGIN)


@pytest.mark.parametrize(
    "given",
    [
        {"delta": np.ones(2)},  # a numpy scalar is recorded as its number (s54c), an array is refused
        {"nested": {"a": 1}},
        {"weights": torch.ones(2)},
        [("delta", 1.0)],
        {1: 2.0},
    ],
    ids=["numpy-array", "nested", "tensor", "not-a-mapping", "int-key"],
)
def test_registration_refuses_settings_a_checkpoint_cannot_record(fresh_global_registry, given) -> None:
    class Loss(_Loss):
        def settings(self):
            return given

    with pytest.raises(PluginError) as error:
        _register(Loss())
    message = str(error.value)
    assert "s52_main_settings_loss" in message and "settings() gave" in message and "plain values" in message


def test_registration_refuses_a_settings_method_that_takes_arguments(fresh_global_registry) -> None:
    class Loss(_Loss):
        def settings(self, which):
            return {which: 1.0}

    with pytest.raises(PluginError, match=r"settings\(which\) that takes arguments.*rename the method"):
        _register(Loss())
    with pytest.raises(TypeError, match="takes arguments"):  # the same rule where a checkpoint reads it
        plugin_settings(Loss())


def test_plain_declared_settings_register_and_read_back(fresh_global_registry) -> None:
    class Loss(_Loss):
        def settings(self, scale: float = 2.0):  # arguments with defaults: callable with none
            return {"scale": scale, "dims": (1, 2), "label": None}

    _register(Loss())
    assert plugin_settings(get_registry().inner_loss("s52_main_settings_loss")) == {
        "scale": 2.0,
        "dims": [1, 2],
        "label": None,
    }


# -- s52o's surviving mutant S18: the next-token loss's first pair (no previous key) takes no step -------


@pytest.mark.parametrize("inner_model", ["linear", "mlp"])
@pytest.mark.parametrize("update_rule", ["dual_form", "minibatch_gd"])
@pytest.mark.parametrize("kernel", ["auto", "torch"])
def test_the_first_token_of_a_sequence_moves_no_weight_under_next_token(
    inner_model, update_rule, kernel
) -> None:
    """A sequence's first token has no previous key, so its next-token pair is invalid (zero learning
    rate): reading it alone (a whole mini-batch of one) leaves every inner weight and bias as it was.
    s52o's mutant that dropped the validity from the learning rates (``prepare_chunk``) passed the suite:
    the paths compared with one another all build their pairs there; a bias still moves on a pair whose
    input is the zero previous key."""
    torch.manual_seed(0)
    layer = innerloop.TTTLayer(
        16,
        2,
        mini_batch_size=1,
        inner_model=inner_model,
        inner_loss="next_token",
        update_rule=update_rule,
        kernel=kernel,
    ).double()
    x = torch.randn(3, 1, 16, dtype=torch.float64)
    start = layer.init_state(3, like=x)
    _, after = layer(x, start)
    assert after.position == 1
    for name, weight in start.params.items():  # [3, heads, ...] each
        assert torch.equal(after.params[name], weight), name
    moved = layer(torch.randn(3, 2, 16, dtype=torch.float64), start)[1]  # the second token's pair moves them
    assert not all(torch.equal(moved.params[name], weight) for name, weight in start.params.items())
