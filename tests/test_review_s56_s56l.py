"""s56l: fair comparisons and evaluation (compare, eval, --no-ttt)."""

from __future__ import annotations

import types

import pytest
import torch

from innerloop.config.load import ConfigError
from innerloop.core.layer import TTTLayer
from innerloop.models.ablation import modules_learning_at_test_time, no_test_time_training
from innerloop.plugins.optimizers.minibatch_gd import MiniBatchGD
from innerloop.train.run import _refuse_no_ttt_without_ttt


class _LrFloorStep(MiniBatchGD):
    """Mini-batch gradient descent at ``lr + 0.5``: a step that does not vanish at inner learning rate 0
    (as a sign step of fixed size, or a rule with a rate of its own)."""

    name = "s56l_lr_floor_step"

    def forward(self, state, task, views, lr, tau, **options):
        return super().forward(state, task, views, lr + 0.5, tau, **options)


def _layer_at_lr_0(monkeypatch, rule) -> TTTLayer:
    # the rule would be checked against a token-by-token reference at registration (seconds): not under test
    monkeypatch.setattr("innerloop.registry.check_instance", lambda kind, instance: None)
    torch.manual_seed(0)
    return TTTLayer(
        16, 2, inner_model="linear", update_rule=rule, mini_batch_size=4, base_lr=0.0, kernel="torch"
    )


def test_a_layer_at_lr_0_whose_rule_still_moves_the_weights_learns_at_test_time(monkeypatch):
    """A layer at base_lr 0 counted as "no test-time training" by its learning rate alone: with a rule
    that steps at lr 0, --no-ttt ran it unchanged (its weights moving) under a name saying TTT was off,
    and eval --no-ttt refused it as having "no test-time training to switch off"."""
    layer = _layer_at_lr_0(monkeypatch, _LrFloorStep())
    model = torch.nn.Sequential(layer)
    assert modules_learning_at_test_time(model) == ["0"]
    with pytest.raises(ValueError, match=r"the TTT layer '0': the update rule 's56l_lr_floor_step' .*moves"):
        with no_test_time_training(model):
            pass  # pragma: no cover
    assert layer.base_lr == 0.0

    module = types.SimpleNamespace(model=model)
    with pytest.raises(ConfigError, match=r"'run/last.safetensors': the TTT layer '0': the update rule"):
        _refuse_no_ttt_without_ttt(module, "run/last.safetensors", no_ttt=True)


def test_a_layer_at_lr_0_with_a_rule_that_keeps_the_weights_has_no_test_time_training(monkeypatch):
    layer = _layer_at_lr_0(monkeypatch, MiniBatchGD())
    model = torch.nn.Sequential(layer)
    assert modules_learning_at_test_time(model) == []
    with no_test_time_training(model) as switched:
        assert switched == 0
